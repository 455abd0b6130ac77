"""The README's client example runs, as written, against real workers."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import anyio
import pytest
from redis.asyncio import Redis

from tests.procs import WorkerPool

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parent.parent


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python example"
    return str(blocks[0])


async def test_readme_client_example_runs(redis_url: str, r: Redis, tmp_path: Path) -> None:
    code = readme_example()
    assert 'from_url("redis://localhost:6379", namespace="default")' in code
    with WorkerPool(redis_url, tmp_path) as pool:
        await pool.start(r, 1)
        code = code.replace("redis://localhost:6379", redis_url).replace(
            'namespace="default"', f'namespace="{pool.namespace}"'
        )
        script = tmp_path / "example.py"
        script.write_text(code)
        done = await anyio.run_process([sys.executable, str(script)], cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    lines = done.stdout.decode().splitlines()
    assert lines[0].startswith("pod-1 joined pool ")
    status, pod, url = lines[1].split()
    assert (status, pod) == ("allocated", "pod-1")
    assert url.endswith(
        "/ws/pod/pod-1/agent/voice/breeze-buddy/twilio/callback/order-confirmation/v2"
    )
    assert lines[2] == "released"
    assert await r.hlen(pool.keys.pod_pool) == 0  # the pod left on shutdown
