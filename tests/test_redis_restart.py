"""Redis restarts empty under load: everything recovers without being restarted.

Worker processes, one client (shared by the load loops) and pod agents run
while Redis is killed, stays down for a second, and starts again on the same
port with no data. No
process is restarted: workers recreate their groups and bootstrap the config,
the client's reader and writer reconnect, agents are told ``unknown_pod`` and
register again. The test measures how long until allocations succeed again.
"""

from __future__ import annotations

import random
from pathlib import Path

import anyio
import msgspec
import pytest
from redis.asyncio import Redis

from tests.conftest import wait_for
from tests.invariants import violations
from tests.procs import KEYS, NAMESPACE, WorkerPool
from tierpool.client.client import TierpoolClient
from tierpool.client.podagent import PodAgent
from tierpool.core.clock import monotonic_s
from tierpool.core.errors import RequestTimeout
from tierpool.core.tierconfig import parse_tier_config
from tierpool.workers.redisproc import RedisProcess

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

TIER_CONFIG = {
    "gold": {"type": "exclusive", "target": 2},
    "basic": {"type": "shared", "target": 2, "max_concurrent": 4},
}
ENV = {
    "TIER_CONFIG": msgspec.json.encode(TIER_CONFIG).decode(),
    "POD_TTL": "2s",
    "TIERPOOL_HEARTBEAT": "250ms",
}
PODS = 4
LOOPS = 4
TIMEOUT_S = 1.0
DOWN_S = 1.0
"""How long Redis stays down (killed, then started empty on the same port)."""


async def test_everything_recovers_when_redis_restarts_empty(
    redis_server: RedisProcess, redis_url: str, r: Redis, tmp_path: Path
) -> None:
    ok_at: list[float] = []
    failures = 0
    calls = 0

    async def load(loop: int, stop: anyio.Event) -> None:
        nonlocal failures, calls
        rng = random.Random(loop)
        while not stop.is_set():
            calls += 1
            call = f"L{loop}-{calls}"
            try:
                reply = await c.allocate(call, timeout_s=TIMEOUT_S)
            except RequestTimeout:
                failures += 1
                continue
            if reply.status != "allocated":
                failures += 1
                await anyio.sleep(0.01)
                continue
            ok_at.append(monotonic_s())
            await anyio.sleep(rng.uniform(0.001, 0.01))
            try:
                await c.release(call, timeout_s=TIMEOUT_S)
            except RequestTimeout:
                failures += 1

    with WorkerPool(redis_url, tmp_path, env=ENV) as pool:
        workers = await pool.start(r, 2)
        async with (
            TierpoolClient.from_url(redis_url, namespace=NAMESPACE) as c,
            anyio.create_task_group() as tg,
        ):
            agents = [
                PodAgent(c, f"pod{i}", f"http://pod{i}:8080", heartbeat_s=0.25) for i in range(PODS)
            ]
            for agent in agents:
                await tg.start(agent.run)
            stop = anyio.Event()
            for i in range(LOOPS):
                tg.start_soon(load, i, stop)
            await wait_for(lambda: _at_least(ok_at, 200), timeout_s=10)

            before = len(ok_at)
            t_kill = monotonic_s()
            await anyio.to_thread.run_sync(lambda: redis_server.stop(kill=True))
            await anyio.sleep(DOWN_S)  # the load goes on against a dead Redis
            await anyio.to_thread.run_sync(redis_server.start)
            t_up = monotonic_s()
            await wait_for(lambda: _at_least(ok_at, before + 1, after=t_up), timeout_s=15)
            t_first = min(t for t in ok_at if t > t_up)

            async def all_back() -> bool:
                return (
                    all(a.registrations == 2 for a in agents)
                    and await r.hlen(KEYS.pod_pool) == PODS
                )

            await wait_for(all_back, timeout_s=10)
            t_pods = monotonic_s()
            # steady again: plenty of allocations after the restart
            await wait_for(lambda: _at_least(ok_at, 200, after=t_up), timeout_s=15)
            stop.set()
            for agent in agents:
                tg.start_soon(agent.shutdown, 2.0)
        assert all(w.alive() for w in workers), "a worker died instead of recovering"
        assert [w.pid for w in pool.procs] == [w.pid for w in workers]  # none restarted
        now_ms = int((await r.time())[0]) * 1000
        config = parse_tier_config(msgspec.json.encode(TIER_CONFIG).decode(), version=1)
        broken = await violations(r, KEYS, config, now_ms=now_ms, pod_ttl_ms=2_000)

    print(
        f"\n[redis restart] Redis down and back in {t_up - t_kill:.3f}s; first allocation "
        f"{t_first - t_up:.3f}s after Redis answered again; all {PODS} pods re-registered "
        f"within {t_pods - t_up:.3f}s; {failures} requests failed or timed out meanwhile; "
        f"client reconnects {c.stats.reconnects}"
    )
    assert broken == [], broken
    assert t_first - t_up < 5.0


async def _at_least(times: list[float], n: int, after: float = 0.0) -> bool:
    return sum(1 for t in times if t > after) >= n
