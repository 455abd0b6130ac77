"""Redis losing state under worker processes (issue 12 items 2 and 3, guarantee 6).

- A consumer group Redis lost (``XGROUP DESTROY``, a restore) is created
  again at the stream's processed-up-to mark: no processed entry is replayed,
  no entry added while it was gone is skipped.
- Redis restarted without persistence under load, pods holding calls: pods
  register again listing their calls, which come back before the pod can be
  given another one; no exclusive pod is double-booked.

Each test prints the recovery time it measured.
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
from tierpool.core.errors import RedisUnavailable, RequestTimeout
from tierpool.core.tierconfig import parse_tier_config
from tierpool.workers.redisproc import RedisProcess

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

EXCLUSIVE = {"gold": {"type": "exclusive", "target": 6}}
ENV = {
    "TIER_CONFIG": msgspec.json.encode(EXCLUSIVE).decode(),
    "POD_TTL": "3s",
    "TIERPOOL_HEARTBEAT": "250ms",
}


async def _events(r: Redis, kind: str) -> list[dict[str, str]]:
    return [f for _, f in await r.xrange(KEYS.events) if f.get("event") == kind]


async def test_a_destroyed_group_replays_nothing_and_skips_nothing(
    redis_url: str, r: Redis, tmp_path: Path
) -> None:
    """Issue 12 item 3: after XGROUP DESTROY the workers re-created the groups at
    id 0 and allocated 21 of 50 finished calls again."""
    calls = [f"old{i}" for i in range(50)]
    with WorkerPool(redis_url, tmp_path, env=ENV) as pool:
        await pool.start(r, 2)
        async with (
            TierpoolClient.from_url(redis_url, namespace=NAMESPACE) as c,
            anyio.create_task_group() as tg,
        ):
            agents = [PodAgent(c, f"pod{i}", f"http://pod{i}:8080") for i in range(6)]
            for agent in agents:
                await tg.start(agent.run)
            for call in calls:  # 50 finished calls
                assert (await c.allocate(call)).status == "allocated"
                assert (await c.release(call)).status == "released"
            allocate = KEYS.request_stream("allocate")
            release = KEYS.request_stream("release")
            # Both groups vanish, and requests arrive while they are gone.
            async with r.pipeline(transaction=True) as pipe:
                pipe.xgroup_destroy(allocate, "tierpool")
                pipe.xgroup_destroy(release, "tierpool")
                for i in range(5):
                    pipe.xadd(allocate, {"request_id": f"new-r{i}", "call_id": f"new{i}"})
                await pipe.execute()
            t_lost = monotonic_s()

            async def new_ones_done() -> bool:
                return int(await r.exists(*[KEYS.reply(f"new-r{i}") for i in range(5)])) == 5

            await wait_for(new_ones_done, timeout_s=20)
            recovered_s = monotonic_s() - t_lost

            async def settled() -> bool:
                for stream in (allocate, release):
                    if int((await r.xpending(stream, "tierpool"))["pending"]):
                        return False
                    groups = await r.xinfo_groups(stream)
                    if not groups or groups[0]["lag"] not in (0, None):
                        return False
                return True

            await wait_for(settled, timeout_s=20)
            allocated = [e["call_id"] for e in await _events(r, "allocated")]
            replays = len(allocated) - len(set(allocated))
            assert replays == 0, f"{replays} allocations replayed"
            assert sorted(allocated) == sorted(calls + [f"new{i}" for i in range(5)])
            released = [e["call_id"] for e in await _events(r, "released")]
            assert sorted(released) == sorted(calls)  # each once, none replayed
            live = await r.hgetall(KEYS.calls)
            assert sorted(live) == [f"new{i}" for i in range(5)]  # no ghost allocation
            assert await r.xlen(KEYS.dead) == 0
            print(f"group destroyed -> new entries processed in {recovered_s:.2f}s")
            for agent in agents:
                tg.start_soon(agent.shutdown, 0.0)


async def test_redis_restarted_empty_under_load_double_books_no_pod(
    redis_server: RedisProcess, redis_url: str, r: Redis, tmp_path: Path
) -> None:
    """Issue 12 item 2: pods re-registered at load 0 although they still served
    calls; 13 exclusive pods got a second live call in one run."""
    double_booked: list[tuple[str, str, str]] = []
    held: dict[str, str] = {}  # call -> pod, as the pods see it
    ok_at: list[float] = []

    async def load(loop: int, stop: anyio.Event) -> None:
        rng = random.Random(loop)
        n = 0
        while not stop.is_set():
            n += 1
            call = f"L{loop}-{n}"
            try:
                reply = await c.allocate(call, timeout_s=1.0)
            except (RequestTimeout, RedisUnavailable):
                await anyio.sleep(0.05)
                continue
            if reply.status != "allocated":
                await anyio.sleep(0.02)
                continue
            pod = reply.pod_id or ""
            agent = by_id[pod]
            if agent.calls - {call}:
                double_booked.append((pod, call, ",".join(sorted(agent.calls))))
            agent.call_started(call)
            held[call] = pod
            ok_at.append(monotonic_s())
            await anyio.sleep(rng.uniform(0.3, 1.5))  # the call goes on
            agent.call_ended(call)
            held.pop(call, None)
            for _ in range(20):
                try:
                    await c.release(call, timeout_s=1.0)
                    break
                except (RequestTimeout, RedisUnavailable):
                    await anyio.sleep(0.1)

    with WorkerPool(redis_url, tmp_path, env=ENV) as pool:
        await pool.start(r, 2)
        async with (
            TierpoolClient.from_url(redis_url, namespace=NAMESPACE) as c,
            anyio.create_task_group() as tg,
        ):
            agents = [
                PodAgent(c, f"pod{i}", f"http://pod{i}:8080", heartbeat_s=0.25) for i in range(6)
            ]
            by_id = {a.pod_id: a for a in agents}
            for agent in agents:
                await tg.start(agent.run)
            stop = anyio.Event()
            for i in range(8):
                tg.start_soon(load, i, stop)

            async def busy() -> bool:
                return sum(1 for a in agents if a.calls) >= 4

            await wait_for(busy, timeout_s=15)
            across = dict(held)  # calls live across the restart
            t_kill = monotonic_s()
            await anyio.to_thread.run_sync(lambda: redis_server.stop(kill=True))
            await anyio.sleep(0.5)
            await anyio.to_thread.run_sync(redis_server.start)
            t_up = monotonic_s()

            async def restored() -> bool:
                still = {call: pod for call, pod in held.items() if call in across}
                if not still:
                    return True
                recs = await r.hmget(KEYS.calls, list(still))
                return all(
                    raw is not None and msgspec.json.decode(raw)["pod"] == pod
                    for raw, pod in zip(recs, still.values(), strict=True)
                )

            await wait_for(restored, timeout_s=15)
            t_restored = monotonic_s()

            async def allocating_again() -> bool:
                return any(t > t_up for t in ok_at)

            await wait_for(allocating_again, timeout_s=15)
            t_first = min(t for t in ok_at if t > t_up)
            await anyio.sleep(3.0)  # more load after the restart
            stop.set()
            for agent in agents:
                tg.start_soon(agent.shutdown, 3.0)
        assert double_booked == [], f"exclusive pods double-booked: {double_booked[:5]}"
        # A heartbeat crossing a release may find its pod full (a benign
        # over-limit conflict); a call claimed by two pods never happens.
        conflicts = [e for e in await _events(r, "call_conflict") if e.get("held_by")]
        assert conflicts == [], conflicts[:5]
        now_ms = int((await r.time())[0]) * 1000
        config = parse_tier_config(msgspec.json.encode(EXCLUSIVE).decode(), version=1)
        assert await violations(r, KEYS, config, now_ms=now_ms, pod_ttl_ms=3_000) == []
        print(
            f"restart: {len(across)} calls live across it; restored "
            f"{t_restored - t_up:.2f}s after Redis was up ({t_restored - t_kill:.2f}s after "
            f"the kill); first allocation {t_first - t_up:.2f}s after"
        )
