"""One regression test per admitted defect of the anchor that applies to tierpool.

Each test names the defect (ANCHOR-SMART-ROUTER.md §14) it guards. They
would fail on a design that, like the anchor, spreads one state change over
several commands. Defects about Kubernetes, HTTP or the anchor's rollout
are covered elsewhere (leader, pod agent) or do not apply; see the README.
"""

from __future__ import annotations

import anyio
import msgspec
import pytest
from redis.asyncio import Redis

from tests.invariants import violations
from tests.statekit import KEYS, Ops, RedisSource, make_state
from tierpool.connect.redisconn import connect
from tierpool.core.state import PoolState
from tierpool.schemas import AllocateRequest, ConfigRequest

pytestmark = pytest.mark.anyio

SHARED = {"basic": {"type": "shared", "target": 2, "max_concurrent": 3}}


async def test_d1_d2_same_call_id_from_many_connections_gets_one_pod(
    r: Redis, redis_url: str
) -> None:
    """§14.1/2: a request seeing only the idempotency placeholder, or an error
    on the idempotency check, allocated a second pod. Here the check and the
    allocation are one script: 40 concurrent workers, one pod."""
    state = await make_state(r, {"gold": 10})
    ops = Ops(state)
    for i in range(10):
        await ops.register(f"p{i}")
    clients = [connect(redis_url) for _ in range(8)]
    results: list[str] = []

    async def worker(i: int) -> None:
        source = RedisSource(clients[i % 8], KEYS)
        await source.refresh()
        st = PoolState(clients[i % 8], KEYS, state.settings, source)
        out = await st.apply(AllocateRequest(request_id=f"q{i}", call_id="same-call"))
        assert out.status == "allocated"
        results.append(out.fields["pod_id"])

    async with anyio.create_task_group() as tg:
        for i in range(40):
            tg.start_soon(worker, i)
    for c in clients:
        await c.aclose()
    assert len(set(results)) == 1
    assert await r.hlen(KEYS.calls) == 1
    assert sum(int(v) for v in (await r.hgetall(KEYS.pod_load)).values()) == 1


async def test_d3_allocation_never_recreates_a_removed_shared_member(r: Redis) -> None:
    """§14.3: a shared increment on a member removed meanwhile recreated it at
    score 1. A deregistered or draining pod is never scored again."""
    ops = Ops(await make_state(r, SHARED))
    await ops.register("a")
    await ops.deregister("a")
    assert (await ops.allocate("c1")).status == "rejected"
    assert await r.zcard(KEYS.pool_free("basic", "open")) == 0
    await ops.register("b")
    await ops.drain("b")
    assert (await ops.allocate("c1")).status == "rejected"
    assert await r.zscore(KEYS.pool_free("basic", "open"), "b") is None


async def test_d4_d7_d8_drained_pod_is_never_lost_and_undrain_restores_it_at_once(
    r: Redis,
) -> None:
    """§14.4/7/8: draining pods popped by the allocator were discarded, a
    failed put-back hid a pod, and pop-vs-drain left a pod invisible for
    ~6.5 min, all until zombie recovery. Here drain leaves the index in the
    same step that marks it, and undrain returns it in the same step."""
    ops = Ops(await make_state(r, {"gold": 1}))
    await ops.register("p0")
    for _ in range(3):
        await ops.drain("p0")
        assert (await ops.allocate("c1")).status == "rejected"
        await ops.drain("p0", "undrain")
        out = await ops.allocate("c1")
        assert out.fields["pod_id"] == "p0"
        await ops.release("c1")


async def test_d5_shared_release_on_a_draining_pod_does_not_return_it(r: Redis) -> None:
    """§14.5: the shared release path had no draining check."""
    ops = Ops(await make_state(r, SHARED))
    await ops.register("a")
    await ops.allocate("c1")
    await ops.allocate("c2")
    await ops.drain("a")
    await ops.release("c1")
    assert await r.zscore(KEYS.pool_free("basic", "open"), "a") is None
    assert (await ops.allocate("c3")).status == "rejected"
    assert await r.hget(KEYS.pod_load, "a") == "1"


async def test_d6_release_removes_record_lease_and_capacity_together(r: Redis) -> None:
    """§14.6: a failed pool return left the lease and the record behind."""
    ops = Ops(await make_state(r, {"gold": 1}))
    await ops.register("p0")
    await ops.allocate("c1")
    await ops.release("c1")
    assert await r.hlen(KEYS.calls) == 0
    assert await r.zcard(KEYS.leases) == 0
    assert await r.zcard(KEYS.pod_calls) == 0
    assert await r.zscore(KEYS.pool_free("gold", "open"), "p0") == 0.0


async def test_d9_d21_drain_keeps_the_shared_count_so_undrain_cannot_overload(
    r: Redis,
) -> None:
    """§14.9/21: drain lost the shared score and the pod came back at 0, so it
    could take max more calls on top of its live ones."""
    ops = Ops(await make_state(r, SHARED))
    await ops.register("a")
    for c in ("c1", "c2"):
        await ops.allocate(c)
    await ops.drain("a")
    await ops.drain("a", "undrain")
    assert (await ops.allocate("c3")).status == "allocated"
    assert (await ops.allocate("c4")).status == "rejected"
    assert await r.hget(KEYS.pod_load, "a") == "3"


async def test_d10_call_longer_than_the_lease_is_kept_while_its_pod_reports_it(
    r: Redis,
) -> None:
    """§14.10: calls longer than the 15 min lease were re-offered. A heartbeat
    listing the call renews its lease, so the leader never reaps it."""
    state = await make_state(r, {"gold": 1}, env={"LEASE_TTL": "60s"})
    ops = Ops(state)
    t = 5_000_000
    await ops.register("p0", now_ms=t)
    await ops.allocate("c1", now_ms=t)
    for minute in range(1, 6):  # five lease periods of heartbeats
        assert (await ops.heartbeat("p0", ["c1"], now_ms=t + minute * 30_000)).status == "alive"
    lease = await r.zscore(KEYS.leases, "c1")
    assert lease is not None and lease > t + 5 * 30_000
    assert (await ops.allocate("c2", now_ms=t + 150_000)).status == "rejected"


async def test_d12_a_silent_pod_is_never_offered_even_before_it_is_reaped(r: Redis) -> None:
    """§14.12: a Redis blip during remove-pod let zombie cleanup re-offer a dead
    pod. Allocation itself skips pods silent past POD_TTL."""
    ops = Ops(await make_state(r, {"gold": 2}))
    await ops.register("old", now_ms=1_000_000)
    await ops.register("new", now_ms=1_010_000)
    out = await ops.allocate("c1", now_ms=1_020_000)  # old is 20 s silent, POD_TTL 15 s
    assert out.fields["pod_id"] == "new"
    assert (await ops.allocate("c2", now_ms=1_020_000)).status == "rejected"
    assert (await ops.heartbeat("old", now_ms=1_021_000)).status == "alive"
    assert (await ops.allocate("c2", now_ms=1_021_000)).fields["pod_id"] == "old"


async def test_d13_a_same_name_pod_is_not_blocked_by_an_old_drain_mark(r: Redis) -> None:
    """§14.13: a failed drain-mark delete blocked a same-name pod for 6 min.
    Deregister removes the mark in the same step."""
    ops = Ops(await make_state(r, {"gold": 1}))
    await ops.register("p0")
    await ops.drain("p0")
    await ops.deregister("p0")
    await ops.register("p0")
    assert (await ops.allocate("c1")).fields["pod_id"] == "p0"


async def test_d16_calls_of_a_removed_pod_are_reported_not_silently_purged(r: Redis) -> None:
    """§14.16: unready or crashed pods lost their call records without trace."""
    ops = Ops(await make_state(r, SHARED))
    await ops.register("a")
    await ops.allocate("c1")
    out = await ops.deregister("a")
    assert msgspec.json.decode(out.fields["calls"]) == ["c1"]
    events = [e for _, e in await r.xrange(KEYS.events)]
    assert any(e["event"] == "call_lost" and e["call_id"] == "c1" for e in events)


async def test_d17_re_registering_keeps_pool_calls_and_load(r: Redis) -> None:
    """§14.17: a restarting pod was removed over and over and its state not
    recreated. Re-registering keeps the pod's pool and live calls."""
    ops = Ops(await make_state(r, SHARED))
    await ops.register("a")
    await ops.allocate("c1")
    pool = await r.hget(KEYS.pod_pool, "a")
    again = await ops.register("a")
    assert again.fields["pool"] == pool
    assert await r.hget(KEYS.pod_load, "a") == "1"
    assert (await ops.release("c1")).status == "released"


async def test_d22_removed_tier_leaves_no_stale_entries(r: Redis) -> None:
    """§14.22: deleted tiers left stale assigned entries."""
    state = await make_state(r, {"gold": 1, "old": 1})
    ops = Ops(state)
    await ops.register("a")
    await ops.register("b")
    out = await state.apply(ConfigRequest(request_id="cfg", config='{"gold": 1}'))
    assert out.status == "applied"
    assert "old" not in await r.hgetall(KEYS.pool_count)
    assert not await r.exists(KEYS.pool_free("old", "open"))
    await state.source.refresh()
    snap = state.source.current()
    assert not await violations(r, KEYS, snap.config, now_ms=0, pod_ttl_ms=1e18)


async def test_d26_merchant_pools_may_be_shared(r: Redis) -> None:
    """§14.26: merchant pools were exclusive only."""
    cfg = {
        "tiers": {
            "gold": {"target": 1},
            "acme": {"type": "shared", "target": 1, "max_concurrent": 2},
        },
        "default_chain": ["gold"],
    }
    state = await make_state(r, cfg)
    ops = Ops(state)
    await ops.register("d1")
    from tierpool.schemas import MerchantPolicy

    await state.apply(
        ConfigRequest(
            request_id="m", merchant_id="acme-co", merchant=MerchantPolicy(pool="acme", fallback=())
        )
    )
    await state.source.refresh()
    a = await ops.allocate("c1", merchant_id="acme-co")
    b = await ops.allocate("c2", merchant_id="acme-co")
    assert a.fields["pod_id"] == b.fields["pod_id"] == "d1"


async def test_drain_racing_allocations_never_loses_a_pod_or_a_count(
    r: Redis, redis_url: str
) -> None:
    """§14.8/9 under real concurrency: drains and undrains race 60 allocations
    and releases on shared pods from several connections."""
    state = await make_state(r, {"basic": {"type": "shared", "target": 3, "max_concurrent": 4}})
    ops = Ops(state)
    for p in ("a", "b", "c"):
        await ops.register(p)
    clients = [connect(redis_url) for _ in range(4)]

    async def states() -> list[PoolState]:
        out = []
        for c in clients:
            src = RedisSource(c, KEYS)
            await src.refresh()
            out.append(PoolState(c, KEYS, state.settings, src))
        return out

    sts = await states()

    async def churn(i: int) -> None:
        o = Ops(sts[i % 4])
        o.n = 1000 * i
        for k in range(15):
            await o.allocate(f"c{i}-{k}")
            if k % 3 == 0:
                await o.release(f"c{i}-{k}")

    async def drainer() -> None:
        o = Ops(sts[0])
        o.n = 99_000
        for k in range(30):
            await o.drain("abc"[k % 3], "drain" if k % 2 == 0 else "undrain")

    async with anyio.create_task_group() as tg:
        for i in range(4):
            tg.start_soon(churn, i)
        tg.start_soon(drainer)
    for p in ("a", "b", "c"):
        await ops.drain(p, "undrain")
    snap = state.source.current()
    assert not await violations(r, KEYS, snap.config, now_ms=0, pod_ttl_ms=1e18)
    for c in clients:
        await c.aclose()


async def test_d28_d29_gauges_count_every_call_of_a_shared_pod(r: Redis) -> None:
    """§14.28/29: status pools were empty, and lease-based active_calls counted a
    shared pod with several calls once (4 instead of 6). Gauges count pod:load."""
    from tierpool.core.leader import Election
    from tierpool.core.reconcile import publish_gauges

    state = await make_state(
        r, {"basic": {"type": "shared", "target": 2, "max_concurrent": 4}, "gold": {"target": 1}}
    )
    ops = Ops(state)
    for p in ("s1", "s2", "g1"):
        await ops.register(p)
    for i in range(5):
        await ops.allocate(f"s{i}", chain=("basic",))
    await ops.allocate("g", chain=("gold",))
    token = await Election(r, KEYS, "t", 2000, 0.5).try_acquire()
    assert token is not None
    res = await publish_gauges(state, token)
    basic = res.gauges["pools"]["basic"]  # type: ignore[index]
    assert res.gauges["active_calls"] == 6
    assert (basic["pods"], basic["calls"], basic["free_capacity"]) == (2, 5, 3)
