"""The Procfile as its users run it: honcho, with the venv's bin on PATH.

Regression (issue 14.5 and 14.4 for honcho): the instructions failed unless
``.venv/bin`` was on PATH, the Redis port was fixed, and on Ctrl-C honcho
stopped Redis together with the pod simulator, which then waited out its
10 s grace and honcho's 5 s kill came first.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from tests.conftest import ROOT, process_env
from tierpool.core.keys import Keys
from tierpool.workers.redisproc import free_port

pytestmark = pytest.mark.slow


def _wait(predicate: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate():  # type: ignore[operator]
                return
        except redis.RedisError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_honcho_starts_serves_and_stops_within_its_kill_timeout(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is needed (make test installs it)")
    bin_dir = Path(sys.executable).parent
    port = free_port()
    env = process_env(
        PATH=f"{bin_dir}:{os.environ.get('PATH', '')}",
        REDIS_PORT=str(port),
        HTTP_PORT=str(free_port()),
        LOG_FORMAT="console",
    )
    shutil.copy(ROOT / "Procfile", tmp_path / "Procfile")
    proc = subprocess.Popen(
        [str(bin_dir / "honcho"), "start", "-c", "worker=2"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's job
    )
    try:
        r = redis.Redis(port=port, decode_responses=True, socket_timeout=5)
        keys = Keys("default")
        _wait(lambda: r.hlen(keys.pod_pool) >= 12, 60, "12 simulated pods")
        done = subprocess.run(
            [
                str(bin_dir / "tierpool"),
                "allocate",
                "c1",
                "--redis-url",
                f"redis://127.0.0.1:{port}/0",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0 and done.stdout.startswith("allocated"), done
        started = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole group
        out, _ = proc.communicate(timeout=30)
        elapsed = time.monotonic() - started
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "SIGKILL" not in out, out[-3000:]
    assert elapsed < 6, (elapsed, out[-3000:])
