"""A failover to a replica that missed the last writes never double-books a pod.

The pods are the witnesses of their calls (contract v1.1, guarantee 6). After
a restart without persistence they are unknown and must register, listing
their calls, before they take one. After a failover to a lagging replica they
are still registered and in their free indexes: without more, one could be
given a new call before its next heartbeat restores the call Redis lost.
``core/epoch.py`` notices the new ``master_replid`` and ``quarantine.lua``
keeps every pod out of its free index until it heartbeats again.

The lagging replica is made deterministically: a primary and its replica are
in sync, the replica is promoted (``REPLICAOF NO ONE``) and only then is a
call allocated on the old primary; the processes then talk to the promoted
replica, which never saw that call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import anyio
import pytest
from redis.asyncio import Redis

from tests.conftest import wait_for
from tests.invariants import violations
from tests.procs import reply, send
from tests.statekit import KEYS, Ops, make_state
from tierpool.core.clock import now_ms
from tierpool.core.epoch import Epoch, check_epoch, server_replid
from tierpool.core.settings import Settings
from tierpool.core.state import PoolState
from tierpool.workers.context import WorkerContext
from tierpool.workers.redisfarm import command, wait_until
from tierpool.workers.redisproc import RedisProcess
from tierpool.workers.streams import ensure_groups
from tierpool.workers.worker import Worker

pytestmark = [pytest.mark.anyio]

ALLOCATE = KEYS.request_stream("allocate")
CONFIG = {"gold": {"type": "exclusive", "target": 2}}
POD_TTL_MS = 15_000


async def _pods_in_free_index(r: Redis) -> set[str]:
    return set(await r.zrange(KEYS.pool_free("gold", "open"), 0, -1))


async def _events(r: Redis, kind: str) -> list[dict[str, str]]:
    return [f for _, f in await r.xrange(KEYS.events) if f.get("event") == kind]


# --- quarantine.lua on one server ------------------------------------------------


async def test_first_check_stores_the_replid_and_quarantines_nobody(r: Redis) -> None:
    state = await make_state(r, CONFIG)
    verdict, n = await check_epoch(state)  # no pods, no replid: nothing to protect
    assert (verdict, n) == ("fresh", 0)
    assert await r.get(KEYS.replid) == await server_replid(r)
    assert await check_epoch(state) == ("same", 0)


async def test_an_upgrade_adopts_the_replid_without_quarantine(r: Redis) -> None:
    state = await make_state(r, CONFIG)
    ops = Ops(state)
    await ops.register("p1")
    assert await r.get(KEYS.replid) is None  # state written before replids were kept
    assert await check_epoch(state) == ("adopted", 0)
    assert await r.smembers(KEYS.pod_unwitnessed) == set()
    assert await _pods_in_free_index(r) == {"p1"}


async def test_a_new_replid_quarantines_every_pod_once(r: Redis) -> None:
    state = await make_state(r, CONFIG)
    ops = Ops(state)
    for pod in ("p1", "p2"):
        await ops.register(pod)
    assert await check_epoch(state) == ("adopted", 0)
    await r.set(KEYS.replid, "0" * 40)  # as a replica promoted since would see it

    assert await check_epoch(state) == ("quarantined", 2)
    assert await r.smembers(KEYS.pod_unwitnessed) == {"p1", "p2"}
    assert await _pods_in_free_index(r) == set()
    waits = await ops.allocate("c1")  # for a heartbeat: no reply, still pending
    assert (waits.status, await r.exists(KEYS.reply(f"r{ops.n}"))) == ("wait", 0)
    [ev] = await _events(r, "pods_quarantined")
    assert (ev["pods"], ev["previous_replid"]) == ("2", "0" * 40)
    # the compare-and-set: a second worker finds the replid stored
    assert await check_epoch(state) == ("same", 0)
    assert len(await _events(r, "pods_quarantined")) == 1

    # a heartbeat (listing calls or not: report_calls=False cannot witness) clears it
    assert (await ops.heartbeat("p1", calls=[])).status == "alive"
    assert (await ops.heartbeat("p2")).status == "alive"
    assert await r.smembers(KEYS.pod_unwitnessed) == set()
    assert await _pods_in_free_index(r) == {"p1", "p2"}
    assert (
        await violations(
            r, KEYS, state.source.current().config, now_ms=now_ms(), pod_ttl_ms=POD_TTL_MS
        )
        == []
    )


async def test_an_unwitnessed_pod_stays_out_of_its_index_until_it_heartbeats(r: Redis) -> None:
    state = await make_state(r, CONFIG)
    ops = Ops(state)
    await ops.register("p1")
    await check_epoch(state)
    await r.set(KEYS.replid, "x")
    await check_epoch(state)
    # a release or drain/undrain on the pod re-runs refresh_free: it stays out
    await ops.drain("p1")
    await ops.drain("p1", "undrain")
    assert await _pods_in_free_index(r) == set()
    assert (
        await violations(
            r, KEYS, state.source.current().config, now_ms=now_ms(), pod_ttl_ms=POD_TTL_MS
        )
        == []
    )
    # a pod that leaves takes its mark with it
    await ops.deregister("p1")
    assert await r.smembers(KEYS.pod_unwitnessed) == set()


async def test_a_register_clears_the_mark_after_restoring_its_calls(r: Redis) -> None:
    state = await make_state(r, CONFIG)
    ops = Ops(state)
    await ops.register("p1")
    await check_epoch(state)
    await r.set(KEYS.replid, "x")
    await check_epoch(state)
    assert (await ops.register("p1", calls=["lost"])).status == "registered"
    assert await r.smembers(KEYS.pod_unwitnessed) == set()
    assert await r.hexists(KEYS.calls, "lost")
    assert await _pods_in_free_index(r) == set()  # exclusive, and busy with its call


async def test_epoch_checks_once_until_marked(r: Redis) -> None:
    state = await make_state(r, CONFIG)
    epoch = Epoch(state)
    assert epoch.dirty
    await epoch.ensure()
    assert (epoch.last, epoch.dirty) == ("fresh", False)
    await r.set(KEYS.replid, "x")
    await epoch.ensure()  # clean: no round trip, nothing noticed
    assert await r.get(KEYS.replid) == "x"
    epoch.mark()
    await epoch.ensure()
    assert epoch.last == "quarantined" or epoch.last == "fresh"
    assert await r.get(KEYS.replid) == await server_replid(r)


# --- the failover to a lagging replica -----------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[RedisProcess, RedisProcess]]:
    primary, replica = RedisProcess(), RedisProcess()
    primary.start()
    try:
        replica.start()
        try:
            command(replica.port, "REPLICAOF", "127.0.0.1", str(primary.port))
            yield primary, replica
        finally:
            replica.close()
    finally:
        primary.close()


async def _client(p: RedisProcess) -> Redis:
    return Redis.from_url(p.url, decode_responses=True)


@pytest.fixture
async def clients(
    pair: tuple[RedisProcess, RedisProcess],
) -> AsyncIterator[tuple[Redis, Redis, RedisProcess]]:
    primary, replica = pair
    a, b = await _client(primary), await _client(replica)
    try:
        yield a, b, replica
    finally:
        await a.aclose()
        await b.aclose()


async def _lagging_failover(
    clients: tuple[Redis, Redis, RedisProcess],
) -> tuple[PoolState, Ops, Redis]:
    """Pod p1 (exclusive) is registered, the replica in sync and promoted; then
    call c1 goes to p1 on the old primary only. Returns the state over the new
    master, which lost c1 but still has p1 free."""
    old, new, replica = clients
    state = await make_state(old, CONFIG)
    ops = Ops(state)
    await ops.register("p1")
    assert await check_epoch(state) == ("adopted", 0)  # the workers run with replids
    replid = await old.get(KEYS.replid)
    wait_until(
        "the replica holds the pod and the replid",
        lambda: (
            command(replica.port, "HEXISTS", KEYS.pod_pool, "p1") == "1"
            and command(replica.port, "GET", KEYS.replid) == replid
        ),
        30.0,
    )
    command(replica.port, "REPLICAOF", "NO", "ONE")  # promoted: the last write never reaches it
    got = await ops.allocate("c1")
    assert (got.status, got.fields["pod_id"]) == ("allocated", "p1")
    moved = await make_state(new, CONFIG)  # the workers' connections now reach the replica
    assert not await new.hexists(KEYS.calls, "c1")
    assert await _pods_in_free_index(new) == {"p1"}  # the hazard
    moved_ops = Ops(moved)
    moved_ops.n = ops.n  # request ids go on: the replies of the first ones were replicated
    return moved, moved_ops, new


async def test_without_the_check_the_exclusive_pod_gets_a_second_call(
    clients: tuple[Redis, Redis, RedisProcess],
) -> None:
    """What happened before core/epoch.py: the regression below fails this way."""
    _, ops, new = await _lagging_failover(clients)
    second = await ops.allocate("c2")
    assert (second.status, second.fields["pod_id"]) == ("allocated", "p1")
    await ops.heartbeat("p1", calls=["c1", "c2"])  # the pod really serves both
    [conflict] = await _events(new, "call_conflict")
    assert conflict["call_id"] == "c1"


async def test_after_a_lagging_failover_no_pod_is_double_booked(
    clients: tuple[Redis, Redis, RedisProcess],
) -> None:
    state, ops, new = await _lagging_failover(clients)
    epoch = Epoch(state)  # a worker's first write on the new master checks first
    await epoch.ensure()
    assert epoch.last == "quarantined"
    assert await new.smembers(KEYS.pod_unwitnessed) == {"p1"}

    second = await ops.allocate("c2")
    assert second.status == "wait"  # p1 takes nothing until it witnesses
    await ops.heartbeat("p1", calls=["c1"])
    assert await new.hexists(KEYS.calls, "c1")  # the lost call is known again
    assert await new.smembers(KEYS.pod_unwitnessed) == set()
    assert (await ops.allocate("c3")).status == "rejected"  # exclusive, and busy with c1
    assert await _events(new, "call_conflict") == []
    assert (await ops.release("c1")).status == "released"
    third = await ops.allocate("c4")
    assert (third.status, third.fields["pod_id"]) == ("allocated", "p1")
    assert (
        await violations(
            new, KEYS, state.source.current().config, now_ms=now_ms(), pod_ttl_ms=POD_TTL_MS
        )
        == []
    )


async def test_a_worker_on_the_promoted_replica_quarantines_before_its_first_write(
    clients: tuple[Redis, Redis, RedisProcess],
) -> None:
    """The whole path: a worker process's loops reach the replica, which
    refuses writes until promoted; the promotion loses call c1; the worker's
    first batch on the new master checks the history first, so the exclusive
    pod takes no new call until its heartbeat restores c1."""
    old, new, replica = clients
    state = await make_state(old, CONFIG)
    await ensure_groups(old, KEYS.all_input_streams, KEYS)
    ops = Ops(state)
    await ops.register("p1")
    assert await check_epoch(state) == ("adopted", 0)
    replid = await old.get(KEYS.replid)
    wait_until(
        "the replica holds the pod and the replid",
        lambda: command(replica.port, "GET", KEYS.replid) == replid,
        30.0,
    )
    settings = Settings(
        redis_url=replica.url, namespace=KEYS.namespace, block_ms=100, claim_interval_s=0.1
    )
    ctx = WorkerContext.create(settings)
    worker = Worker(ctx, without=frozenset({"http", "leader", "gauges", "config-listener"}))
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)

            # the worker is up and refused (a replica): it reads, cannot write
            async def refused() -> bool:
                return worker.outage.since is not None

            await wait_for(refused, timeout_s=30)
            command(replica.port, "REPLICAOF", "NO", "ONE")
            got = await ops.allocate("c1")  # on the old primary only: lost
            assert got.fields["pod_id"] == "p1"

            await send(new, ALLOCATE, {"request_id": "w1", "call_id": "c2"})

            async def quarantined() -> bool:
                return await new.smembers(KEYS.pod_unwitnessed) == {"p1"}

            await wait_for(quarantined, timeout_s=30)  # w1 waits for p1's heartbeat
            await anyio.sleep(0.5)
            assert not await new.exists(KEYS.reply("w1"))
            await send(
                new,
                KEYS.pods_stream,
                {"request_id": "w2", "event": "heartbeat", "pod_id": "p1", "calls": '["c1"]'},
            )
            assert (await reply(new, "w2"))["status"] == "alive"
            assert (await reply(new, "w1"))["status"] == "rejected"  # p1 serves c1
            assert await new.hexists(KEYS.calls, "c1")
            await send(new, ALLOCATE, {"request_id": "w3", "call_id": "c3"})
            assert (await reply(new, "w3"))["status"] == "rejected"  # busy with c1
            assert await _events(new, "call_conflict") == []
            worker.stop()


async def test_the_leader_tick_notices_a_failover_no_worker_saw(r: Redis, redis_url: str) -> None:
    """An idle worker may never see an error across a failover; the leader's
    periodic check (every EPOCH_INTERVAL_S) quarantines all the same."""
    from tierpool.workers.leader import epoch_once

    ctx = WorkerContext.create(Settings(redis_url=redis_url, namespace=KEYS.namespace))
    try:
        state = await make_state(r, CONFIG)
        ctx.state.source = state.source
        await Ops(state).register("p1")
        await epoch_once(ctx)
        assert ctx.epoch.last == "adopted"
        await r.set(KEYS.replid, "x")  # the history the pods were written under
        await epoch_once(ctx)
        assert ctx.epoch.last == "quarantined"
        assert await r.smembers(KEYS.pod_unwitnessed) == {"p1"}
    finally:
        await ctx.redis.aclose()
