"""``tierpool run`` (the README's ``make run``): works with no Redis and no REDIS_URL."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, process_env
from tierpool.workers.embedded import LoadStats, progress_line
from tierpool.workers.gauges import ClusterView, PoolGauges
from tierpool.workers.metrics import percentile


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
    env = process_env()
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
    logdir = re.search(r"logs in (\S+) \(removed at exit", out)
    assert logdir is not None and not Path(logdir[1]).exists()  # removed after a clean run


@pytest.mark.slow
def test_run_without_redis_server_uses_fakeredis(tmp_path: Path) -> None:
    """Issue 17: with no redis-server on PATH and no REDIS_URL, ``tierpool run``
    serves on an in-process fakeredis, says it is not for production, and
    shows allocations."""
    env = process_env()
    env["PATH"] = str(tmp_path)  # no redis-server here
    done = subprocess.run(
        [sys.executable, "-m", "tierpool", "run", "--duration", "10"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = done.stdout
    assert done.returncode == 0, f"{out}\n{done.stderr}"
    assert "no redis-server on PATH: using fakeredis" in out and "NOT for production" in out
    summary = re.search(r"stopped\. (\d+) allocated, (\d+) rejected, (\d+) failed", out)
    assert summary is not None and int(summary[1]) > 10 and int(summary[3]) == 0, out
    pids = [int(p) for p in re.findall(r"started \S+ \(pid (\d+)", out)]
    assert len(pids) == 3 and all(_gone(pid) for pid in pids), out


def test_forcing_redis_server_without_one_says_how_to_install(tmp_path: Path) -> None:
    env = process_env()
    env["PATH"] = str(tmp_path)  # no redis-server here
    done = subprocess.run(
        [sys.executable, "-m", "tierpool", "run", "--duration", "1", "--backend", "redis-server"],
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
    assert "as of" not in line
    assert "Redis not answering" in progress_line(1.0, 1.0, (0, 0, []), None)
    # Regression (issue 14.16): the leader's figures lag; live calls are read
    # now, and pool figures older than an interval say how old they are.
    line = progress_line(3.0, 1.0, window, dataclasses.replace(view, now_ms=2_500), 4)
    assert "calls   4" in line and "as of" not in line  # within the leader's 2 s cadence
    old = dataclasses.replace(view, now_ms=4_500)
    line = progress_line(5.0, 1.0, window, old, live_calls=4)
    assert "calls   4" in line and "(pools as of 4.5s ago)" in line
    assert percentile([], 0.5) is None


@pytest.mark.slow
def test_run_uses_redis_url_when_set(redis_url: str) -> None:
    """With REDIS_URL, ``tierpool run`` starts no Redis of its own and works on that one."""
    import redis

    env = process_env(REDIS_URL=redis_url, TIERPOOL_NAMESPACE="emb")
    # Someone else's namespace on the same Redis: a real pod of theirs.
    with redis.Redis.from_url(redis_url, decode_responses=True) as r:
        r.set("tp:{default}:theirs", "1")
        r.set("tp:{emb}:theirs", "1")
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
    # Regression (issue 14.3): it used the `default` (here: TIERPOOL_NAMESPACE)
    # namespace and pods sim-0..5 of whoever else uses this Redis. It now runs
    # in a namespace of its own, says so, allocates there, and removes it.
    ns = re.search(r"this run's own namespace (run-[0-9a-f]+)", done.stdout)
    assert ns, done.stdout
    assert re.search(r"\s\d+\.\d alloc/s", done.stdout)
    assert not re.search(r"(?<!\d)0 allocated", done.stdout)  # "10 allocated" is fine
    assert f"removed namespace {ns[1]}" in done.stdout
    with redis.Redis.from_url(redis_url, decode_responses=True) as r:
        assert set(r.keys("*")) == {"tp:{default}:theirs", "tp:{emb}:theirs"}


@pytest.mark.slow
def test_ctrl_c_stops_promptly_with_redis_last(tmp_path: Path) -> None:
    """Regression (issue 14.4): Ctrl-C reaches the terminal's whole process
    group; the private redis-server was in it and died before the pod
    simulator drained, which then hung until killed (15 s). Redis now runs in
    its own session and is stopped last."""
    env = process_env()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tierpool", "run", "--workers", "1", "--pods", "2"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a process group of its own, as a terminal's job is
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("ready."):
                break
        found = re.search(r"127\.0\.0\.1:(\d+)/0 \(pid (\d+)", lines[0])
        assert found, lines
        redis_port, redis_pid = int(found[1]), int(found[2])
        assert os.getpgid(redis_pid) != proc.pid  # out of reach of the group's Ctrl-C
        started = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        rest, _ = proc.communicate(timeout=60)
        elapsed = time.monotonic() - started
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = "".join(lines) + rest
    assert proc.returncode == 0, out
    assert "did not stop within" not in out, out
    assert elapsed < 12, (elapsed, out)
    assert _port_closed(redis_port)
