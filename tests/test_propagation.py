"""How fast a config change reaches every worker's cache.

Three set-ups, each printing p50 / p99 / max over 100 changes:

- real worker processes (``python -m tierpool.workers``): from the config request's
  XADD to the last worker logging that it serves the new version (log stamps
  have millisecond resolution, so this may read up to 1 ms short);
- bare ConfigCache processes: from just before ``PoolState.apply`` (its round
  trip included) to the last cache's ``on_change`` hook;
- ConfigCaches in this process, each on its own client, measured the same way.

The only timed assertion is a generous bound: every change seen within 2 s.

Run as a module (``python -m tests.test_propagation child URL NS``) it is the
child: one ConfigCache that prints ``version monotonic_ns`` for each snapshot.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime
from pathlib import Path

import anyio
import msgspec
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream
from redis.asyncio import Redis

from tests.conftest import wait_for
from tests.procs import WorkerPool, WorkerProc, reply, send
from tierpool.connect.redisconn import connect
from tierpool.core.configcache import ConfigCache
from tierpool.core.keys import Keys
from tierpool.core.settings import Settings
from tierpool.core.state import PoolState
from tierpool.schemas import ConfigRequest

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
NS = "prop"
CHANGES = 100
READERS = 3
BOUND_S = 2.0


def settings() -> Settings:
    # the safety re-read never comes during the run: only pub/sub is measured
    return Settings.from_env(
        {
            "TIERPOOL_NAMESPACE": NS,
            "TIER_CONFIG": '{"gold": 1}',
            "TIERPOOL_CONFIG_RESYNC": "1h",
            "TIERPOOL_MERCHANT_CACHE_TTL": "1h",
        }
    )


def summary(latencies_s: list[float]) -> str:
    ms = sorted(x * 1000 for x in latencies_s)
    p50 = ms[(len(ms) - 1) // 2]
    p99 = ms[math.ceil(0.99 * len(ms)) - 1]
    return f"n={len(ms)} p50={p50:.2f} ms p99={p99:.2f} ms max={ms[-1]:.2f} ms"


async def apply_changes(r: Redis, seen: list[dict[int, int]], label: str) -> list[float]:
    """Apply CHANGES configs one after another; latency of each to its last reader."""
    writer = ConfigCache(r, Keys(NS), settings())
    await writer.refresh()
    state = PoolState(r, Keys(NS), writer.settings, writer)
    latencies: list[float] = []
    applies: list[float] = []
    for i in range(CHANGES):
        t0 = time.monotonic_ns()
        out = await state.apply(ConfigRequest(request_id=f"c{i}", config=f'{{"gold": {i + 2}}}'))
        applies.append((time.monotonic_ns() - t0) / 1e9)
        assert out.status == "applied", out
        version = int(out.fields["config_version"])
        await wait_for(lambda v=version: _all_have(seen, v), timeout_s=BOUND_S, interval_s=0.001)
        latencies.append((max(s[version] for s in seen) - t0) / 1e9)
    print(
        f"\nconfig propagation, {label}, {len(seen)} caches: {summary(latencies)}"
        f" (of which the apply round trip: {summary(applies)})"
    )
    assert max(latencies) < BOUND_S
    return latencies


async def _all_have(seen: list[dict[int, int]], version: int) -> bool:
    return all(version in s for s in seen)


@pytest.mark.slow
async def test_propagation_to_worker_processes(redis_url: str, r: Redis, tmp_path: Path) -> None:
    env = {
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "info",
        "TIER_CONFIG": '{"gold": 1}',
        "TIERPOOL_CONFIG_RESYNC": "1h",
        "TIERPOOL_MERCHANT_CACHE_TTL": "1h",
    }
    with WorkerPool(redis_url, tmp_path, env=env) as pool:
        logs = [ServedLog(wp) for wp in await pool.start(r, READERS)]
        stream = pool.keys.request_stream("config")
        latencies: list[float] = []
        for i in range(CHANGES):
            t0 = time.time()
            await send(r, stream, {"request_id": f"w{i}", "config": f'{{"gold": {i + 2}}}'})
            version = int((await reply(r, f"w{i}", timeout_s=BOUND_S))["config_version"])
            await wait_for(
                lambda v=version: _true(all(log.served(v) for log in logs)),
                timeout_s=BOUND_S,
                interval_s=0.005,
            )
            latencies.append(max(log.served(version) or 0.0 for log in logs) - t0)
    print(
        f"\nconfig propagation, worker processes, {READERS} workers, "
        f"XADD -> last worker serving: {summary(latencies)}"
    )
    assert max(latencies) < BOUND_S


class ServedLog:
    """When a worker process first logged serving each config version (its JSON log)."""

    _SERVING = re.compile(r"serving config version (\d+)")

    def __init__(self, wp: WorkerProc) -> None:
        self.path = wp.log_path
        self.offset = 0
        self.first: list[tuple[int, float]] = []  # (version, epoch s), in log order

    def served(self, version: int) -> float | None:
        """The first time it served ``version`` or newer (it may skip a version)."""
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.decode().splitlines():
            if "serving config version" in line:
                record = msgspec.json.decode(line)
                found = self._SERVING.search(record["msg"])
                if found:
                    stamp = datetime.fromisoformat(record["ts"].replace("Z", "+00:00"))
                    self.first.append((int(found.group(1)), stamp.timestamp()))
        return next((t for v, t in self.first if v >= version), None)


async def _true(value: bool) -> bool:
    return value


async def test_propagation_to_caches_in_separate_processes(redis_url: str, r: Redis) -> None:
    seen: list[dict[int, int]] = [{} for _ in range(READERS)]
    async with AsyncExitStack() as stack, anyio.create_task_group() as tg:
        for i in range(READERS):
            proc = await stack.enter_async_context(_child(redis_url))
            lines = BufferedByteReceiveStream(proc.stdout)  # type: ignore[arg-type]
            with anyio.fail_after(20):
                while (await lines.receive_until(b"\n", 1024)) != b"ready":
                    pass
            tg.start_soon(_collect, lines, seen[i])
        await apply_changes(r, seen, "separate processes")
        tg.cancel_scope.cancel()


async def test_propagation_to_caches_in_one_process(redis_url: str, r: Redis) -> None:
    seen: list[dict[int, int]] = [{} for _ in range(READERS)]
    clients = [connect(redis_url) for _ in range(READERS)]
    try:
        async with anyio.create_task_group() as tg:
            for client, record in zip(clients, seen, strict=True):
                cache = ConfigCache(client, Keys(NS), settings())
                cache.on_change.append(
                    lambda s, rec=record: rec.__setitem__(s.version, time.monotonic_ns())
                )
                await tg.start(cache.run)
            await apply_changes(r, seen, "one process")
            tg.cancel_scope.cancel()
    finally:
        for client in clients:
            await client.aclose()


async def _collect(lines: BufferedByteReceiveStream, record: dict[int, int]) -> None:
    while True:
        version, stamp = (await lines.receive_until(b"\n", 1024)).split()
        record[int(version)] = int(stamp)


@asynccontextmanager
async def _child(url: str) -> AsyncIterator[Process]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await anyio.open_process(
        [sys.executable, "-m", "tests.test_propagation", "child", url, NS],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=None,
    )
    try:
        yield proc
    finally:
        with anyio.CancelScope(shield=True):
            if proc.stdin is not None:
                await proc.stdin.aclose()  # the child exits on EOF
            with anyio.move_on_after(5):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def _child_main(url: str, namespace: str) -> None:
    async def main() -> None:
        client = connect(url)
        cache = ConfigCache(client, Keys(namespace), settings())
        cache.on_change.append(lambda s: print(s.version, time.monotonic_ns(), flush=True))
        async with anyio.create_task_group() as tg:
            await tg.start(cache.run)
            print("ready", flush=True)
            await anyio.to_thread.run_sync(sys.stdin.read)
            tg.cancel_scope.cancel()
        await client.aclose()

    anyio.run(main)


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    _child_main(sys.argv[2], sys.argv[3])
