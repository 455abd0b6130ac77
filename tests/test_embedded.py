"""``tierpool run`` (the README's ``make run``): works with no Redis and no REDIS_URL."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tierpool.core.keys import Keys
from tierpool.workers.embedded import LoadStats, percentile, progress_line
from tierpool.workers.gauges import ClusterView, PoolGauges


def _gone(pid: int) -> bool:
    """No such process, or only a zombie nobody reaped yet (it runs nothing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _port_closed(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.slow
def test_run_without_redis_url_shows_allocations_and_cleans_up(tmp_path: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "REDIS_URL" and not k.startswith("TIERPOOL_") and k != "METRICS_PORT"
    }
    done = subprocess.run(
        [sys.executable, "-m", "tierpool", "run", "--duration", "8"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = done.stdout
    assert done.returncode == 0, f"{out}\n{done.stderr}"

    redis_port = int(re.search(r"private Redis on redis://127\.0\.0\.1:(\d+)", out)[1])  # type: ignore[index]
    pids = [int(p) for p in re.findall(r"started \S+ \(pid (\d+)", out)]
    assert len(pids) == 3, out  # 2 workers and the pod simulator

    rates = [float(m) for m in re.findall(r"^\s*\d+s\s+([\d.]+) alloc/s", out, re.MULTILINE)]
    assert len(rates) >= 5, out  # a line about every second
    assert sum(1 for rate in rates if rate > 0) >= 3, out
    assert re.search(r"gold \d+ free \d+ busy", out), out
    assert re.search(r"leader \S+-\d+-[0-9a-f]+", out), out
    summary = re.search(r"stopped\. (\d+) allocated, (\d+) rejected", out)
    assert summary is not None and int(summary[1]) > 10, out

    assert all(_gone(pid) for pid in pids), out
    assert _port_closed(redis_port)
    logdir = re.search(r"logs in (\S+?);", out)
    assert logdir is not None and not Path(logdir[1]).exists()  # removed after a clean run


def test_run_without_redis_server_says_how_to_install(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["PATH"] = str(tmp_path)  # no redis-server here
    done = subprocess.run(
        [sys.executable, "-m", "tierpool", "run", "--duration", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "./scripts/install-redis" in done.stderr


def test_progress_line() -> None:
    stats = LoadStats()
    for ms in (1, 2, 3, 100):
        stats.record("allocated", ms / 1000)
    stats.record("rejected", 0.004)
    window = stats.take_window()
    assert stats.take_window() == (0, 0, [])
    view = ClusterView(
        now_ms=0,
        pools={"gold": PoolGauges(pods=3, free=1, full=2), "spare": PoolGauges()},
        unassigned=0,
        active_calls=2,
        gauges_at_ms=0,
        leader="host-1-abc:4",
        workers=[],
        streams=[],
    )
    line = progress_line(2.0, 1.0, window, view)
    assert "4.0 alloc/s" in line and "1.0 rejected/s" in line
    assert "p50   3.0ms" in line and "p99 100.0ms" in line
    assert "gold 1 free 2 busy" in line and "spare" not in line
    assert "calls   2" in line and line.endswith("leader host-1-abc")
    assert "Redis not answering" in progress_line(1.0, 1.0, (0, 0, []), None)
    assert percentile([], 0.5) is None


@pytest.mark.slow
def test_run_uses_redis_url_when_set(redis_url: str) -> None:
    """With REDIS_URL, ``tierpool run`` starts no Redis of its own and works on that one."""
    import redis

    env = {
        k: v for k, v in os.environ.items() if not k.startswith("TIERPOOL_") and k != "METRICS_PORT"
    }
    env.update(REDIS_URL=redis_url, TIERPOOL_NAMESPACE="emb")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tierpool",
            "run",
            "--duration",
            "2",
            "--workers",
            "1",
            "--pods",
            "2",
            "--callers",
            "2",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "using REDIS_URL=" in done.stdout and "private Redis" not in done.stdout
    with redis.Redis.from_url(redis_url, decode_responses=True) as r:
        events = [f["event"] for _, f in r.xrange(Keys("emb").events)]
    assert "allocated" in events and "released" in events
