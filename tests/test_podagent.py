"""The pod agent against real worker processes: register, heartbeat, drain, leave.

Timings are shrunk so leases, drain marks and pod liveness lapse within a
second or two, and the leader reaps every 100 ms.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import msgspec
import pytest
from redis.asyncio import Redis

from tests.conftest import wait_for
from tests.procs import KEYS, NAMESPACE, ROOT, WorkerPool
from tierpool.client.client import TierpoolClient
from tierpool.client.podagent import PodAgent
from tierpool.core.clock import monotonic_s

pytestmark = pytest.mark.anyio

HEARTBEAT_S = 0.25
LEASE_TTL_S = 1.5
DRAINING_TTL_S = 1.0
ENV = {
    "TIER_CONFIG": msgspec.json.encode({"gold": {"type": "exclusive", "target": 2}}).decode(),
    "POD_TTL": "1s",
    "LEASE_TTL": "1500ms",
    "DRAINING_TTL": "1s",
    "CLEANUP_INTERVAL": "100ms",
    "TIERPOOL_HEARTBEAT": "250ms",
}


@pytest.fixture
def workers(redis_url: str, tmp_path: Path) -> Iterator[WorkerPool]:
    with WorkerPool(redis_url, tmp_path, env=ENV) as pool:
        yield pool


@asynccontextmanager
async def agents(
    client: TierpoolClient, *pod_ids: str, report_calls: bool = True
) -> AsyncIterator[dict[str, PodAgent]]:
    """Running agents; any still running at the end are cancelled (no goodbye)."""
    out = {
        p: PodAgent(
            client, p, f"http://{p}:8080", heartbeat_s=HEARTBEAT_S, report_calls=report_calls
        )
        for p in pod_ids
    }
    async with anyio.create_task_group() as tg:
        for agent in out.values():
            await tg.start(agent.run)
        yield out
        tg.cancel_scope.cancel()


async def test_agents_register_and_heartbeat_over_one_client(
    redis_url: str, r: Redis, workers: WorkerPool
) -> None:
    await workers.start(r)
    async with TierpoolClient.from_url(redis_url, namespace=NAMESPACE) as c:
        pods = [f"p{i}" for i in range(20)]
        async with agents(c, *pods) as running:
            assert {a.pool for a in running.values()} == {"gold"}  # the last pool overflows
            assert await r.hlen(KEYS.pod_pool) == 20
            first = await r.zscore(KEYS.pod_seen, "p0")
            assert first is not None

            async def beaten() -> bool:
                seen = await r.zscore(KEYS.pod_seen, "p0")
                return seen is not None and seen > first + HEARTBEAT_S * 1000 * 0.5

            await wait_for(beaten, timeout_s=3)
            names = [cl["name"] for cl in await r.client_list()]
            assert sum(n.startswith("tierpool-client-") for n in names) <= 2, names


@pytest.mark.slow
async def test_heartbeats_renew_the_leases_of_the_calls_they_list(
    redis_url: str, r: Redis, workers: WorkerPool
) -> None:
    """A call held longer than LEASE_TTL by a heartbeating pod is never re-offered,
    while an unlisted call on the other pod expires (so reaping is really on)."""
    await workers.start(r)
    async with (
        TierpoolClient.from_url(redis_url, namespace=NAMESPACE) as c,
        agents(c, "a", "b") as running,
    ):
        held = await c.allocate("held")
        other = await c.allocate("unlisted")
        assert held.status == other.status == "allocated"
        assert held.pod_id is not None and held.pod_id != other.pod_id
        running[held.pod_id].call_started("held")

        async def unlisted_reaped() -> bool:
            return not await r.hexists(KEYS.calls, "unlisted")

        await wait_for(unlisted_reaped, timeout_s=LEASE_TTL_S + 3)
        # Watch the held call over two more lease periods: it must stay put.
        until = monotonic_s() + 2 * LEASE_TTL_S
        while monotonic_s() < until:
            assert await r.hexists(KEYS.calls, "held")
            assert (await c.allocate("held")).pod_id == held.pod_id
            await anyio.sleep(0.1)
        newcomer = await c.allocate("newcomer")
        assert (newcomer.status, newcomer.pod_id) == ("allocated", other.pod_id)
        assert (await c.allocate("one-more")).status == "rejected"


async def test_agent_registers_again_after_redis_lost_its_data(
    redis_url: str, r: Redis, workers: WorkerPool
) -> None:
    await workers.start(r)
    async with (
        TierpoolClient.from_url(redis_url, namespace=NAMESPACE) as c,
        agents(c, "p0") as running,
    ):
        agent = running["p0"]
        assert agent.registrations == 1
        await r.flushall()

        async def back() -> bool:
            return agent.registrations == 2 and await r.hexists(KEYS.pod_pool, "p0")

        await wait_for(back, timeout_s=5)
        assert (await c.allocate("after")).pod_id == "p0"


async def test_shutdown_drains_first_keeps_the_mark_then_deregisters(
    redis_url: str, r: Redis, workers: WorkerPool
) -> None:
    """Regression guard for anchor §14.15 (rollouts killed live calls) and §14.11
    (a drain mark lapsed while the pod was still terminating)."""
    await workers.start(r)
    async with (
        TierpoolClient.from_url(redis_url, namespace=NAMESPACE) as c,
        agents(c, "p0") as running,
    ):
        agent = running["p0"]
        live = await c.allocate("live")
        assert live.pod_id == "p0"
        agent.call_started("live")
        await c.release("live")  # free a slot: only the drain may keep new calls away
        await r.delete(KEYS.events)
        async with anyio.create_task_group() as tg:
            tg.start_soon(agent.shutdown, 30.0)

            async def draining() -> bool:
                return await r.zscore(KEYS.pod_draining, "p0") is not None

            await wait_for(draining, timeout_s=3)
            until = monotonic_s() + 2.5 * DRAINING_TTL_S
            while monotonic_s() < until:  # past DRAINING_TTL: re-drained by heartbeats
                assert await draining()
                assert await r.zscore(KEYS.pool_free("gold", "open"), "p0") is None
                assert (await c.allocate("new")).status == "rejected"
                await anyio.sleep(0.1)
            assert await r.hexists(KEYS.pod_pool, "p0")  # still there while its call runs
            agent.call_ended("live")
        assert not await r.hexists(KEYS.pod_pool, "p0")
        kinds = [f["event"] for _, f in await r.xrange(KEYS.events) if f.get("pod_id") == "p0"]
        assert kinds[0] == "drained" and kinds[-1] == "pod_deregistered", kinds
        assert "drain_lapsed" not in kinds


async def test_shutdown_deregisters_when_the_grace_period_ends(
    redis_url: str, r: Redis, workers: WorkerPool
) -> None:
    await workers.start(r)
    async with (
        TierpoolClient.from_url(redis_url, namespace=NAMESPACE) as c,
        agents(c, "p0") as running,
    ):
        agent = running["p0"]
        assert (await c.allocate("stuck")).pod_id == "p0"
        agent.call_started("stuck")
        t0 = monotonic_s()
        await agent.shutdown(0.5)
        assert 0.5 <= monotonic_s() - t0 < 3
        assert not await r.hexists(KEYS.pod_pool, "p0")
        assert not await r.hexists(KEYS.calls, "stuck")  # reported lost, not left behind
        await agent.shutdown(0.5)  # safe twice


async def test_pod_sim_registers_follows_calls_and_leaves_on_sigterm(
    redis_url: str, r: Redis, workers: WorkerPool, tmp_path: Path
) -> None:
    """``tierpool pod-sim``: N pods in one process; with --call-seconds they list
    the calls placed on them and end each with a release; SIGTERM drains and
    deregisters every pod, and the process exits 0."""
    await workers.start(r)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERPOOL_")}
    env.update(
        ENV,
        REDIS_URL=redis_url,
        TIERPOOL_NAMESPACE=NAMESPACE,
        LOG_FORMAT="console",
        PYTHONUNBUFFERED="1",
    )
    log_path = tmp_path / "podsim.log"
    with log_path.open("wb") as log_file:
        proc = await anyio.open_process(
            [
                sys.executable,
                "-m",
                "tierpool",
                "pod-sim",
                "--pods",
                "3",
                "--prefix",
                "s",
                "--call-seconds",
                "2",
            ],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:

        async def registered() -> bool:
            assert proc.returncode is None, log_path.read_text()
            return await r.hlen(KEYS.pod_pool) == 3

        await wait_for(registered, timeout_s=15)
        async with TierpoolClient.from_url(redis_url, namespace=NAMESPACE) as c:
            assert (await c.allocate("sim-call")).status == "allocated"
        t0 = monotonic_s()

        async def released() -> bool:
            return not await r.hexists(KEYS.calls, "sim-call")

        # LEASE_TTL is 1.5 s: only the sim's heartbeats keep the 2 s call alive
        await wait_for(released, timeout_s=10)
        assert monotonic_s() - t0 > 1.5
        kinds = [
            f["event"] for _, f in await r.xrange(KEYS.events) if f.get("call_id") == "sim-call"
        ]
        assert kinds == ["allocated", "released"], kinds
        proc.send_signal(signal.SIGTERM)
        with anyio.fail_after(15):
            code = await proc.wait()
        assert code == 0, log_path.read_text()
        assert await r.hlen(KEYS.pod_pool) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
        with anyio.CancelScope(shield=True):
            await proc.aclose()
