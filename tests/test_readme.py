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


def _section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def test_readme_tier_config_examples_are_valid() -> None:
    """Issue 14.14: the README shows a tier-config file, its fields and the three
    formats; every example there is a config the workers accept, read as the
    text says."""
    from tierpool.core.snapshot import dedicated_pools
    from tierpool.core.tierconfig import parse_tier_config

    blocks = re.findall(r"```json\n(.*?)```", _section("The tier config"), re.S)
    assert len(blocks) == 3
    structured, flat, integers = (parse_tier_config(b) for b in blocks)
    assert structured.pools == ("gold", "standard", "vault", "acme")
    assert dedicated_pools(structured) == {"acme"}
    assert structured.tier("vault").zone == "restricted"
    assert structured.tier("standard").max_concurrent == 4
    assert flat.tier("standard").type == "shared" and flat.default_chain == ("gold", "standard")
    assert integers.tier("standard").type == "exclusive" and integers.tier("gold").target == 10


def test_readme_session_url_shape_is_what_allocations_return() -> None:
    from tierpool.core.placement import session_url_parts

    documented = (
        "{VOICE_AGENT_BASE_URL}/ws/pod/{pod_id}/agent/voice/breeze-buddy/"
        "{provider}/callback/{template}[/v2]"
    )
    assert documented in _section("The tier config")
    head, tail = session_url_parts("wss://agents.example", None, None, None)
    assert head + "p1" + tail == (
        "wss://agents.example/ws/pod/p1/agent/voice/breeze-buddy/twilio/callback/"
        "order-confirmation/v2"
    )
    head, tail = session_url_parts("wss://a", "exotel", "v1", None)
    assert (
        head + "p1" + tail == "wss://a/ws/pod/p1/agent/voice/breeze-buddy/exotel/callback/template"
    )


def test_protocol_reference_is_the_contract() -> None:
    """docs/PROTOCOL.md keeps the wire contract with the code; it must not drift
    from the shared CONTRACT.md it copies (checked wherever that is beside us)."""
    ours = (ROOT / "docs" / "PROTOCOL.md").read_text()
    assert "# tierpool wire contract (v1.1)" in ours
    shared = ROOT.parent / "shared" / "CONTRACT.md"
    if shared.is_file():
        assert ours.endswith(shared.read_text())
