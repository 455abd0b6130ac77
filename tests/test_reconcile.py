"""The leader's repairs against real Redis: assignment, rebalancing, reaping, gauges.

Time is controlled with the scripts' ``now_ms`` argument, so lease, liveness
and drain expiry are exact and no test waits for a clock.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from redis.asyncio import Redis

from tests.statekit import KEYS, Ops, make_state
from tierpool.core.leader import Election
from tierpool.core.reconcile import (
    Move,
    apply_moves,
    plan,
    publish_gauges,
    read_view,
    reap,
    reconcile,
)
from tierpool.core.state import PoolState
from tierpool.core.tierconfig import pod_may_join
from tierpool.schemas import ConfigRequest, DrainRequest

pytestmark = pytest.mark.anyio

T0 = 1_700_000_000_000
SEC = 1000


async def lead(r: Redis) -> str:
    token = await Election(r, KEYS, "test-leader", 600_000, 1.0).try_acquire()
    assert token is not None
    return token


async def set_config(state: PoolState, cfg: dict[str, Any], rid: str = "cfg") -> None:
    out = await state.apply(ConfigRequest(request_id=rid, config=msgspec.json.encode(cfg).decode()))
    assert out.status == "applied", out
    await state.source.refresh()


async def pools(r: Redis) -> dict[str, str]:
    return await r.hgetall(KEYS.pod_pool)


async def events(r: Redis, kind: str) -> list[dict[str, str]]:
    return [e for _, e in await r.xrange(KEYS.events) if e["event"] == kind]


async def dump(r: Redis) -> dict[str, object]:
    """Every pool-state key: to prove nothing changed.

    Streams (requests, replies, audit log), the gauges, the leader lease and
    the workers' presence are left out: they change without any pool change.
    """
    out: dict[str, object] = {}
    for key in sorted(await r.keys(f"{KEYS.prefix}*")):
        if key in (KEYS.gauges, KEYS.leader, KEYS.leader_term, KEYS.workers):
            continue
        kind = await r.type(key)
        if kind == "stream":
            continue
        if kind == "hash":
            out[key] = await r.hgetall(key)
        elif kind == "zset":
            out[key] = await r.zrange(key, 0, -1, withscores=True)
        else:
            out[key] = await r.get(key)
    return out


# --- assignment -------------------------------------------------------------------
async def test_unassigned_pods_fill_dedicated_then_chain_in_order_then_overflow(r: Redis) -> None:
    state = await make_state(r, {"old": {"target": 10}})
    ops = Ops(state)
    for i in range(5):
        await ops.register(f"p{i}")
    await set_config(
        state,
        {
            "tiers": {"gold": {"target": 1}, "standard": {"target": 1}, "acme": {"target": 1}},
            "default_chain": ["gold", "standard"],
        },
    )
    assert set((await pools(r)).values()) == {""}  # the config change unassigned them
    token = await lead(r)
    res = await reconcile(state, token)
    assert res.status == "ok"
    assert [m.reason for m in res.moved] == ["assign"] * 5
    assert await pools(r) == {
        "p0": "acme",
        "p1": "gold",
        "p2": "standard",
        "p3": "standard",
        "p4": "standard",
    }
    assert await r.hgetall(KEYS.pool_count) == {"acme": "1", "gold": "1", "standard": "3"}
    assert await r.zrange(KEYS.pool_free("gold", "open"), 0, -1) == ["p1"]
    assert len(await events(r, "pod_moved")) == 5
    again = await reconcile(state, token)
    assert (again.planned, again.count_drift) == ([], {})


async def test_assignment_respects_zone_and_capability(r: Redis) -> None:
    state = await make_state(r, {"old": {"target": 10}})
    ops = Ops(state)
    await ops.register("open1")
    await ops.register("safe1", zone="restricted")
    await ops.register("weak1", capability=1)
    await set_config(
        state,
        {
            "tiers": {
                "vault": {"target": 5, "zone": "restricted"},
                "big": {"target": 5, "capability": 3},
                "basic": {"target": 5},
            },
            "default_chain": ["vault", "big", "basic"],
        },
    )
    await reconcile(state, await lead(r))
    assert await pools(r) == {"open1": "basic", "safe1": "vault", "weak1": "basic"}


async def test_silent_unassigned_pod_is_left_for_the_reaper(r: Redis) -> None:
    state = await make_state(r, {"old": {"target": 10}})
    await Ops(state).register("p0", now_ms=T0)
    await set_config(state, {"gold": {"target": 1}})
    res = await reconcile(state, await lead(r), now_ms=T0 + 16 * SEC)
    assert res.planned == []
    assert await pools(r) == {"p0": ""}


# --- rebalancing ------------------------------------------------------------------
CHAIN = {
    "tiers": {"gold": {"target": 1}, "standard": {"target": 1}},
    "default_chain": ["gold", "standard"],
}


async def test_rebalance_moves_only_idle_pods(r: Redis) -> None:
    """Guards anchor §6: a pod with a call, a lease or a drain mark never moves."""
    state = await make_state(r, CHAIN)
    ops = Ops(state)
    for i in range(4):
        await ops.register(f"p{i}")
    assert await pools(r) == {"p0": "gold", "p1": "standard", "p2": "standard", "p3": "standard"}
    busy = (await ops.allocate("c1", chain=("standard",))).fields["pod_id"]
    draining = next(p for p in ("p1", "p2", "p3") if p != busy)
    assert (await ops.drain(draining)).status == "drained"
    idle = ({"p1", "p2", "p3"} - {busy, draining}).pop()
    await set_config(
        state,
        {
            "tiers": {"gold": {"target": 4}, "standard": {"target": 1}},
            "default_chain": ["gold", "standard"],
        },
    )
    token = await lead(r)
    res = await reconcile(state, token)
    assert [(m.pod, m.source, m.dest) for m in res.moved] == [(idle, "standard", "gold")]
    after = await pools(r)
    assert (after[busy], after[draining]) == ("standard", "standard")
    assert await r.zrange(KEYS.pool_free("gold", "open"), 0, -1) == sorted(["p0", idle])
    assert await r.hgetall(KEYS.pool_count) == {"gold": "2", "standard": "2"}
    assert (await reconcile(state, token)).planned == []  # nothing else may move
    assert (await ops.release("c1")).status == "released"
    assert [m.pod for m in (await reconcile(state, token)).moved] == [busy]


async def test_move_rechecks_the_pod_atomically(r: Redis) -> None:
    """A pod idle when read but busy or draining when the move runs stays put."""
    state = await make_state(r, CHAIN)
    ops = Ops(state)
    for i in range(4):
        await ops.register(f"p{i}")
    await set_config(
        state,
        {
            "tiers": {"gold": {"target": 4}, "standard": {"target": 0}},
            "default_chain": ["gold", "standard"],
        },
    )
    snap = state.source.current()
    moves = plan(await read_view(r, KEYS, state.settings.pod_ttl_ms), snap)
    assert {m.pod for m in moves} == {"p1", "p2", "p3"}
    busy = (await ops.allocate("c1", chain=("standard",))).fields["pod_id"]
    draining = next(p for p in ("p1", "p2", "p3") if p != busy)
    await ops.drain(draining)
    res = await apply_moves(state, snap, await lead(r), moves)
    assert sorted((m.pod, why) for m, why in res.skipped) == sorted(
        [(busy, "pod has calls"), (draining, "pod is draining")]
    )
    assert len(res.moved) == 1
    assert (await pools(r))[busy] == (await pools(r))[draining] == "standard"


async def test_rebalance_never_puts_a_pod_where_it_may_not_join(r: Redis) -> None:
    state = await make_state(r, {"old": {"target": 10}})
    ops = Ops(state)
    await ops.register("open1")
    await ops.register("open2")
    await set_config(
        state,
        {
            "tiers": {"vault": {"target": 1, "zone": "restricted"}, "basic": {"target": 1}},
            "default_chain": ["vault", "basic"],
        },
    )
    token = await lead(r)
    await reconcile(state, token)
    assert await pools(r) == {"open1": "basic", "open2": "basic"}
    await ops.register("safe1", zone="restricted")
    assert await r.hget(KEYS.pod_pool, "safe1") == "vault"
    assert (await reconcile(state, token)).planned == []


async def test_pass_two_between_dedicated_and_chain_pools(r: Redis) -> None:
    state = await make_state(
        r, {"tiers": {"gold": {"target": 1}, "acme": {"target": 2}}, "default_chain": ["gold"]}
    )
    ops = Ops(state)
    for i in range(3):
        await ops.register(f"p{i}")
    assert await pools(r) == {"p0": "acme", "p1": "acme", "p2": "gold"}
    token = await lead(r)
    await set_config(
        state,
        {"tiers": {"gold": {"target": 2}, "acme": {"target": 1}}, "default_chain": ["gold"]},
        rid="c2",
    )
    res = await reconcile(state, token)
    assert [(m.source, m.dest) for m in res.moved] == [("acme", "gold")]
    await set_config(
        state,
        {"tiers": {"gold": {"target": 1}, "acme": {"target": 2}}, "default_chain": ["gold"]},
        rid="c3",
    )
    res = await reconcile(state, token)
    assert [(m.source, m.dest) for m in res.moved] == [("gold", "acme")]
    assert await r.hgetall(KEYS.pool_count) == {"acme": "2", "gold": "1"}


async def test_reconcile_with_an_old_snapshot_refreshes_and_retries(r: Redis) -> None:
    state = await make_state(r, {"old": {"target": 10}})
    await Ops(state).register("p0")
    old = state.source.current()
    out = await state.apply(ConfigRequest(request_id="x", config='{"gold": 1}'))
    assert out.status == "applied"
    state.source.snap = old  # type: ignore[attr-defined]  # this worker missed the change
    res = await reconcile(state, await lead(r))
    assert res.status == "ok"
    assert await pools(r) == {"p0": "gold"}


async def test_moves_with_a_foreign_token_are_fenced(r: Redis) -> None:
    state = await make_state(r, {"old": {"target": 10}})
    await Ops(state).register("p0")
    await set_config(state, {"gold": {"target": 1}})
    await lead(r)
    before = await dump(r)
    res = await reconcile(state, "someone-else:7")
    assert (res.status, res.moved) == ("fenced", [])
    assert await dump(r) == before


# --- zombie cleanup -----------------------------------------------------------------
async def test_expired_lease_ends_the_call_like_a_release(r: Redis) -> None:
    state = await make_state(r, {"gold": {"target": 1}}, env={"LEASE_TTL": "60s"})
    ops = Ops(state)
    await ops.register("p0", now_ms=T0)
    await ops.allocate("c1", now_ms=T0)
    await ops.heartbeat("p0", [], now_ms=T0 + 50 * SEC)  # alive, but does not list c1
    token = await lead(r)
    early = await reap(state, token, now_ms=T0 + 60 * SEC - 1)
    assert (early.leases, early.pods) == (0, 0)
    res = await reap(state, token, now_ms=T0 + 60 * SEC)
    assert (res.status, res.leases, res.pods, res.drains) == ("ok", 1, 0, 0)
    assert await r.hlen(KEYS.calls) == 0
    assert await r.hget(KEYS.pod_load, "p0") == "0"
    assert await r.zscore(KEYS.pool_free("gold", "open"), "p0") == 0.0
    [ev] = await events(r, "lease_expired")
    assert (ev["call_id"], ev["pod_id"], ev["pool"]) == ("c1", "p0", "gold")
    assert (await ops.release("c1")).status == "not_found"


async def test_silent_pod_is_removed_and_its_calls_reported_lost(r: Redis) -> None:
    state = await make_state(r, {"basic": {"type": "shared", "target": 2}})
    ops = Ops(state)
    await ops.register("p0", now_ms=T0)
    await ops.register("p1", now_ms=T0)
    await ops.allocate("c1", now_ms=T0, chain=("basic",))
    await ops.heartbeat("p1", now_ms=T0 + 10 * SEC)
    lost_pod = msgspec.json.decode(await r.hget(KEYS.calls, "c1"))["pod"]
    await ops.heartbeat("p1" if lost_pod == "p0" else "p0", now_ms=T0 + 10 * SEC)
    token = await lead(r)
    assert (await reap(state, token, now_ms=T0 + 15 * SEC)).pods == 0  # exactly POD_TTL: alive
    res = await reap(state, token, now_ms=T0 + 15 * SEC + 1)
    assert (res.pods, res.leases) == (1, 0)
    assert lost_pod not in await pools(r)
    assert await r.hgetall(KEYS.pool_count) == {"basic": "1"}
    [pod_ev] = await events(r, "pod_lost")
    [call_ev] = await events(r, "call_lost")
    assert (pod_ev["pod_id"], msgspec.json.decode(pod_ev["calls"])) == (lost_pod, ["c1"])
    assert (call_ev["call_id"], call_ev["reason"]) == ("c1", "pod_silent")
    assert await r.zcard(KEYS.leases) == 0


async def test_lapsed_drain_mark_returns_the_pod_with_its_load(r: Redis) -> None:
    state = await make_state(
        r,
        {"basic": {"type": "shared", "target": 1, "max_concurrent": 3}},
        env={"DRAINING_TTL": "60s"},
    )
    ops = Ops(state)
    await ops.register("p0", now_ms=T0)
    await ops.allocate("c1", now_ms=T0)
    out = await state.apply(DrainRequest(request_id="d", pod_id="p0"), now_ms=T0)
    assert out.status == "drained"
    await ops.heartbeat("p0", ["c1"], now_ms=T0 + 55 * SEC)
    token = await lead(r)
    assert (await reap(state, token, now_ms=T0 + 59 * SEC)).drains == 0
    assert await r.zscore(KEYS.pool_free("basic", "open"), "p0") is None
    res = await reap(state, token, now_ms=T0 + 60 * SEC)
    assert res.drains == 1
    assert await r.zscore(KEYS.pool_free("basic", "open"), "p0") == 1.0  # load kept, not 0
    assert await r.hget(KEYS.pod_load, "p0") == "1"
    assert [e["pod_id"] for e in await events(r, "drain_lapsed")] == ["p0"]


async def test_call_kept_alive_by_heartbeats_outlives_the_lease_ttl(r: Redis) -> None:
    """Guards anchor defect 10: calls longer than the lease were re-offered."""
    state = await make_state(r, {"gold": {"target": 1}}, env={"LEASE_TTL": "60s"})
    ops = Ops(state)
    await ops.register("p0", now_ms=T0)
    await ops.allocate("c1", now_ms=T0)
    token = await lead(r)
    for t in range(T0 + 5 * SEC, T0 + 4 * 60 * SEC, 5 * SEC):  # 4 lease TTLs
        assert (await ops.heartbeat("p0", ["c1"], now_ms=t)).status == "alive"
        res = await reap(state, token, now_ms=t)
        assert (res.leases, res.pods) == (0, 0)
    assert await r.hexists(KEYS.calls, "c1")
    assert (await ops.allocate("c2", now_ms=t)).status == "rejected"  # never re-offered
    assert (await ops.allocate("c1", now_ms=t)).fields["existing"] == "1"


async def test_reap_runs_batches_until_one_comes_back_short(r: Redis) -> None:
    state = await make_state(
        r,
        {"basic": {"type": "shared", "target": 1, "max_concurrent": 10}},
        env={"LEASE_TTL": "60s"},
    )
    ops = Ops(state)
    await ops.register("p0", now_ms=T0)
    for i in range(7):
        await ops.allocate(f"c{i}", now_ms=T0)
    await ops.heartbeat("p0", [], now_ms=T0 + 59 * SEC)
    res = await reap(state, await lead(r), batch=3, now_ms=T0 + 61 * SEC)
    assert (res.leases, res.batches) == (7, 3)
    assert await r.hget(KEYS.pod_load, "p0") == "0"


async def test_reap_with_a_foreign_token_changes_nothing(r: Redis) -> None:
    state = await make_state(r, {"gold": {"target": 1}})
    ops = Ops(state)
    await ops.register("p0", now_ms=T0)
    await ops.allocate("c1", now_ms=T0)
    await lead(r)
    before = await dump(r)
    res = await reap(state, "someone-else:3", now_ms=T0 + 3600 * SEC)
    assert res.status == "fenced"
    assert await dump(r) == before


# --- gauges -------------------------------------------------------------------------
async def test_gauges_are_computed_in_redis_and_fenced(r: Redis) -> None:
    state = await make_state(
        r, {"gold": {"target": 2}, "basic": {"type": "shared", "target": 3, "max_concurrent": 4}}
    )
    ops = Ops(state)
    await ops.register("g1")
    await ops.register("g2")
    await ops.register("b1")
    await ops.allocate("c1", chain=("basic",))
    await ops.allocate("c2", chain=("gold",))
    token = await lead(r)
    res = await publish_gauges(state, token)
    assert res.status == "ok"
    stored = await r.hgetall(KEYS.gauges)
    assert stored["token"] == token
    gauges = msgspec.json.decode(stored["json"])
    assert gauges == res.gauges
    assert gauges["active_calls"] == 2
    gold = gauges["pools"]["gold"]
    assert [gold[k] for k in ("pods", "free", "full", "free_capacity")] == [2, 1, 1, 1]
    assert (gauges["pools"]["basic"]["busy"], gauges["pools"]["basic"]["free_capacity"]) == (1, 3)
    assert (await publish_gauges(state, "old:1")).status == "fenced"
    assert (await r.hgetall(KEYS.gauges))["token"] == token


# --- a config change and pod conformance (issue 14 item 13) -------------------------
async def test_config_change_sends_pods_that_no_longer_conform_to_a_pool_they_meet(
    r: Redis,
) -> None:
    """Regression: a pool whose zone or capability is raised keeps no pod that
    fails it (a ``config_apply.lua`` that only unassigned pods of removed pools
    survived the suite); the leader then puts each pod where it conforms, and
    a pod with a live call keeps it through the move."""
    state = await make_state(r, {"gold": {"target": 4}, "std": {"target": 4}})
    ops = Ops(state)
    await ops.register("open1", zone="open", capability=1)
    await ops.register("open5", zone="open", capability=5)
    await ops.register("restr1", zone="restricted", capability=1)
    await ops.register("restr5", zone="restricted", capability=5)
    assert set((await pools(r)).values()) == {"gold"}
    busy = await ops.allocate("c1", chain=("gold",))
    assert busy.status == "allocated"
    await set_config(
        state,
        {
            "tiers": {
                "gold": {"target": 3, "zone": "restricted", "capability": 3},
                "std": {"target": 3},
            },
            "default_chain": ["gold", "std"],
        },
    )
    assert await pools(r) == {"open1": "", "open5": "", "restr1": "", "restr5": "gold"}
    assert await r.hgetall(KEYS.pool_count) == {"gold": "1"}
    for zone in ("open", "restricted"):
        assert set(await r.zrange(KEYS.pool_free("gold", zone), 0, -1)) <= {"restr5"}
    (applied,) = await events(r, "config_applied")
    assert applied["unassigned_pods"] == "3"

    token = await lead(r)
    result = await reconcile(state, token)
    assert result.status == "ok" and not result.skipped and not result.errors
    assert await pools(r) == {"open1": "std", "open5": "std", "restr1": "std", "restr5": "gold"}
    assert (await ops.release("c1")).status == "released"


async def test_move_refuses_a_pool_the_pod_does_not_meet(r: Redis) -> None:
    """The fenced move re-checks zone and capability: a plan made from an older
    read (the pod re-registered as open in between) never puts it in a
    restricted pool."""
    state = await make_state(
        r,
        {
            "tiers": {"vip": {"target": 1, "zone": "restricted"}, "std": {"target": 1}},
            "default_chain": ["vip", "std"],
        },
    )
    await r.hset(KEYS.pod_pool, "p0", "")
    await r.hset(KEYS.pod_zone, "p0", "open")
    await r.hset(KEYS.pod_capability, "p0", "1")
    await r.zadd(KEYS.pod_seen, {"p0": T0})
    token = await lead(r)
    snap = state.source.current()
    bad = [Move("p0", "", "vip", "assign")]
    res = await apply_moves(state, snap, token, bad, now_ms=T0)
    assert [why for _, why in res.skipped] == ["pod does not meet pool vip's zone or capability"]
    assert await pools(r) == {"p0": ""}
    res = await apply_moves(state, snap, token, [Move("p0", "", "std", "assign")], now_ms=T0)
    assert res.moved and await pools(r) == {"p0": "std"}


async def test_lua_may_join_is_the_python_pod_may_join(r: Redis) -> None:
    """The pod-may-join rule lives once per language (``pod_may_join`` in
    ``core/tierconfig.py``, ``may_join`` in ``_prelude.lua``): for every pool
    zone and capability, a config change keeps exactly the pods Python says
    may join."""
    kinds = [(zone, cap) for zone in ("open", "restricted") for cap in (1, 2, 3)]
    for pool_zone in ("open", "restricted"):
        for pool_cap in (1, 2, 3):
            await r.flushall()
            state = await make_state(r, {"p": {"type": "shared", "target": 10}})
            ops = Ops(state)
            for zone, cap in kinds:
                await ops.register(f"{zone}-{cap}", zone=zone, capability=cap)
            tier = {"type": "shared", "target": 10, "zone": pool_zone, "capability": pool_cap}
            await set_config(state, {"p": tier}, rid=f"cfg-{pool_zone}-{pool_cap}")
            kept = {pod for pod, pool in (await pools(r)).items() if pool == "p"}
            rule = state.source.current().config.tier("p")
            assert kept == {
                f"{zone}-{cap}" for zone, cap in kinds if pod_may_join(rule, zone, cap)
            }, (pool_zone, pool_cap)
