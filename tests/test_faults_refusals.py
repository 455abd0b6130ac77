"""Redis refusing writes is not a bad message (issue 12 item 1, guarantee 5).

The reproduction: requests are added and ``maxmemory`` drops to 1 byte in
the same MULTI, so Redis holds valid entries it refuses to act on. Before,
each claim of a pending entry counted as a delivery and a refused script
looked like a failed one: past ``claim_min_idle`` x ``max_deliveries``
valid requests were dead-lettered (3,781 of 12,000), each worker logged a
warning per attempt and ``/readyz`` stayed 200. Now nothing is
dead-lettered, every request is answered truly once memory is freed, and
``/readyz`` says 503 with the reason meanwhile.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import anyio
import msgspec
import pytest
from redis.asyncio import Redis

from tests.conftest import wait_for
from tests.invariants import violations
from tests.procs import KEYS, NAMESPACE, WorkerPool, replies
from tierpool.client.client import TierpoolClient
from tierpool.client.podagent import PodAgent
from tierpool.core.clock import monotonic_s
from tierpool.core.tierconfig import parse_tier_config

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SHARED = {"basic": {"type": "shared", "target": 4, "max_concurrent": 50}}
CLAIM_IDLE_S = 0.4
MAX_DELIVERIES = 2
ENV = {
    "TIER_CONFIG": msgspec.json.encode(SHARED).decode(),
    "TIERPOOL_CLAIM_MIN_IDLE": f"{int(CLAIM_IDLE_S * 1000)}ms",
    "TIERPOOL_MAX_DELIVERIES": str(MAX_DELIVERIES),
    "POD_TTL": "30s",
}
OOM_S = 4.0
"""How long Redis refuses writes: several times claim idle x max deliveries."""


def _readyz(port: int) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            return resp.status, msgspec.json.decode(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, msgspec.json.decode(exc.read())


async def test_out_of_memory_dead_letters_nothing_and_readyz_says_why(
    redis_url: str, r: Redis, tmp_path: Path
) -> None:
    assert OOM_S > 3 * CLAIM_IDLE_S * MAX_DELIVERIES
    with WorkerPool(redis_url, tmp_path, env=ENV) as pool:
        workers = await pool.start(r, 2)
        async with (
            TierpoolClient.from_url(redis_url, namespace=NAMESPACE) as c,
            anyio.create_task_group() as tg,
        ):
            agents = [PodAgent(c, f"pod{i}", f"http://pod{i}:8080") for i in range(4)]
            for agent in agents:
                await tg.start(agent.run)
            held = [f"held{i}" for i in range(40)]
            for call in held:
                assert (await c.allocate(call)).status == "allocated"
            allocate = KEYS.request_stream("allocate")
            release = KEYS.request_stream("release")
            new = [f"new{i}" for i in range(60)]
            async with r.pipeline(transaction=True) as pipe:
                for call in new:
                    pipe.xadd(allocate, {"request_id": f"a-{call}", "call_id": call})
                for call in held:
                    pipe.xadd(release, {"request_id": f"r-{call}", "call_id": call})
                pipe.config_set("maxmemory", 1)
                await pipe.execute()
            t_oom = monotonic_s()
            seen_503: list[dict[str, object]] = []
            while monotonic_s() - t_oom < OOM_S:
                for w in workers:
                    status, body = await anyio.to_thread.run_sync(_readyz, w.metrics_port)
                    if status == 503:
                        seen_503.append(body)
                await anyio.sleep(0.2)
            assert await r.xlen(KEYS.dead) == 0
            await r.config_set("maxmemory", 0)
            t_free = monotonic_s()
            got = await replies(r, [f"a-{x}" for x in new] + [f"r-{x}" for x in held], timeout_s=30)
            drained_s = monotonic_s() - t_free
            for agent in agents:
                tg.start_soon(agent.shutdown, 0.0)
        assert await r.xlen(KEYS.dead) == 0, await r.xrange(KEYS.dead, count=3)
        assert {x: [e["status"] for e in got[f"a-{x}"]] for x in new} == {
            x: ["allocated"] for x in new
        }
        assert {x: [e["status"] for e in got[f"r-{x}"]] for x in held} == {
            x: ["released"] for x in held
        }
        assert any("OOM" in str(b.get("writes_refused", "")) for b in seen_503), seen_503[:3]
        now_ms = int((await r.time())[0]) * 1000
        config = parse_tier_config(msgspec.json.encode(SHARED).decode(), version=1)
        assert await violations(r, KEYS, config, now_ms=now_ms, pod_ttl_ms=30_000) == []

        async def ready_again() -> bool:
            codes = [(await anyio.to_thread.run_sync(_readyz, w.metrics_port))[0] for w in workers]
            return codes == [200] * len(workers)

        await wait_for(ready_again, timeout_s=10)
        said = 0
        for w in workers:
            lines = [ln for ln in w.log_text().splitlines() if "refuses writes" in ln]
            assert len(lines) <= 2 + OOM_S / 10, lines  # once per 10 s, not once per try
            said += len(lines)
        assert said >= 1
        print(
            f"OOM for {OOM_S:.1f}s: a backlog of {len(new) + len(held)} requests drained "
            f"{drained_s:.2f}s after memory was freed"
        )


async def test_a_demoted_primary_dead_letters_nothing_and_readyz_says_why(
    redis_url: str, r: Redis, tmp_path: Path
) -> None:
    """Issue 12 item 1, READONLY: the primary becomes a replica (of a primary
    that does not answer) while requests wait; then it is promoted again."""
    from tierpool.workers.redisproc import free_port

    with WorkerPool(redis_url, tmp_path, env=ENV) as pool:
        workers = await pool.start(r, 1)
        async with (
            TierpoolClient.from_url(redis_url, namespace=NAMESPACE) as c,
            anyio.create_task_group() as tg,
        ):
            agents = [PodAgent(c, f"pod{i}", f"http://pod{i}:8080") for i in range(2)]
            for agent in agents:
                await tg.start(agent.run)
            calls = [f"ro{i}" for i in range(20)]
            async with r.pipeline(transaction=True) as pipe:
                for call in calls:
                    pipe.xadd(
                        KEYS.request_stream("allocate"), {"request_id": call, "call_id": call}
                    )
                pipe.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
                await pipe.execute()
            t0 = monotonic_s()
            seen_503: list[dict[str, object]] = []
            while monotonic_s() - t0 < OOM_S:
                status, body = await anyio.to_thread.run_sync(_readyz, workers[0].metrics_port)
                if status == 503:
                    seen_503.append(body)
                await anyio.sleep(0.2)
            await r.execute_command("REPLICAOF", "NO", "ONE")
            got = await replies(r, calls, timeout_s=30)
            for agent in agents:
                tg.start_soon(agent.shutdown, 0.0)
        assert await r.xlen(KEYS.dead) == 0
        assert {x: [e["status"] for e in got[x]] for x in calls} == {
            x: ["allocated"] for x in calls
        }
        assert any("READONLY" in str(b.get("writes_refused", "")) for b in seen_503), seen_503[:3]


async def test_a_busy_script_dead_letters_nothing(redis_url: str, r: Redis, tmp_path: Path) -> None:
    """Issue 12 item 1, BUSY: a script runs past busy-reply-threshold while
    requests wait; every command gets BUSY until it ends."""
    import redis as syncredis

    calls = [f"busy{i}" for i in range(20)]

    def add_then_busy(seconds: float) -> None:
        """The requests and a script that spins for ``seconds``, in one MULTI:
        the requests are there, and Redis is busy, at the same instant."""
        with syncredis.Redis.from_url(redis_url) as sync:
            sync.config_set("busy-reply-threshold", 100)
            with sync.pipeline(transaction=True) as pipe:
                for call in calls:
                    fields = {"request_id": call, "call_id": call}
                    pipe.xadd(KEYS.request_stream("allocate"), fields)  # type: ignore[arg-type]
                pipe.eval(
                    "local t0 = redis.call('TIME')[1] "
                    "while tonumber(redis.call('TIME')[1]) - t0 < tonumber(ARGV[1]) do end",
                    0,
                    seconds,
                )
                pipe.execute()

    with WorkerPool(redis_url, tmp_path, env=ENV) as pool:
        await pool.start(r, 1)
        async with (
            TierpoolClient.from_url(redis_url, namespace=NAMESPACE) as c,
            anyio.create_task_group() as tg,
        ):
            agents = [PodAgent(c, f"pod{i}", f"http://pod{i}:8080") for i in range(2)]
            for agent in agents:
                await tg.start(agent.run)
            # Busy for longer than claim idle x max deliveries.
            await anyio.to_thread.run_sync(add_then_busy, 3)
            got = await replies(r, calls, timeout_s=30)
            for agent in agents:
                tg.start_soon(agent.shutdown, 0.0)
        assert await r.xlen(KEYS.dead) == 0
        assert {x: [e["status"] for e in got[x]] for x in calls} == {
            x: ["allocated"] for x in calls
        }
