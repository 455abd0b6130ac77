"""Pods against Redis's real faults (issue 12 items 2 and 4, issue 13 item 3).

- Removing a pod (deregister, reap) is linear in its calls: a pod with
  10,000 calls leaves without any script holding Redis for 50 ms.
- The pod is the witness of its own calls (contract v1.1): calls it lists
  that Redis lost come back, in the same script as its register, before it
  can take a new one; a call held elsewhere or past its pool's limit is a
  ``call_conflict`` event, never a second placement.
- A pod may not change zone or lower its capability under a call that needs
  them: the register is ``invalid`` and changes nothing.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from redis.asyncio import Redis

from tests.invariants import violations
from tests.statekit import KEYS, Ops, make_state
from tierpool.core.reconcile import reap
from tierpool.schemas import AllocateRequest

pytestmark = pytest.mark.anyio

BIG = {"big": {"type": "shared", "target": 1, "max_concurrent": 10_000}}
EXCLUSIVE = {"gold": {"type": "exclusive", "target": 4}}


async def _events(r: Redis, kind: str) -> list[dict[str, str]]:
    return [f for _, f in await r.xrange(KEYS.events) if f.get("event") == kind]


async def _slow_scripts(r: Redis) -> list[tuple[int, list[Any]]]:
    """Slow-log entries of script calls: (microseconds, command)."""
    out = []
    for e in await r.slowlog_get(128):
        cmd = e["command"]
        name = cmd.decode() if isinstance(cmd, bytes) else str(cmd)
        if name.upper().startswith(("EVALSHA", "EVAL", "FCALL")):
            out.append((int(e["duration"]), name[:80]))
    return out


async def _fill(ops: Ops, pod_calls: int) -> None:
    batch = 500
    for start in range(0, pod_calls, batch):
        items = [
            (AllocateRequest(request_id=f"f{i}", call_id=f"call-{i:05d}"), None)
            for i in range(start, min(start + batch, pod_calls))
        ]
        outs = await ops.state.run(items)  # type: ignore[arg-type]
        assert {o.status for o in outs} == {"allocated"}
    await ops.state.redis.delete(*[KEYS.reply(f"f{i}") for i in range(pod_calls)])


async def _check(r: Redis, ops: Ops, now_ms: float | None = None) -> None:
    import time

    cfg = ops.state.source.current().config
    now = now_ms if now_ms is not None else time.time() * 1000
    ttl = ops.state.settings.pod_ttl_ms
    assert await violations(r, KEYS, cfg, now_ms=now, pod_ttl_ms=ttl) == []


async def test_deregistering_a_pod_with_10000_calls_holds_redis_under_50ms(r: Redis) -> None:
    """Issue 12 item 4: removal was quadratic (10,000 calls: one 14 s script).
    Now linear and in steps of 500 calls, each a short script."""
    ops = Ops(await make_state(r, BIG))
    await ops.register("p0")
    await _fill(ops, 10_000)
    assert int(await r.hget(KEYS.pod_load, "p0") or 0) == 10_000
    await r.config_set("slowlog-log-slower-than", 50_000)
    await r.slowlog_reset()
    out = await ops.deregister("p0")
    assert out.status == "deregistered"
    assert 0 < len(msgspec.json.decode(out.fields["calls"])) <= 500  # the calls of the last step
    assert await _slow_scripts(r) == []
    assert await r.hlen(KEYS.calls) == 0
    assert await r.zcard(KEYS.leases) == 0
    assert await r.zcard(KEYS.pod_calls) == 0
    assert len(await _events(r, "call_lost")) == 10_000
    await _check(r, ops)


async def test_reaping_silent_pods_with_10000_calls_each_holds_redis_under_50ms(
    r: Redis,
) -> None:
    """Issue 12 item 4, reap path: a batch stops at its call budget and the next
    batch goes on, so two silent pods of 10,000 calls cost two short scripts."""
    import time

    from tierpool.core.leader import Election

    ops = Ops(await make_state(r, {"big": {**BIG["big"], "target": 2}}))
    await ops.register("p0")
    await ops.register("p1")
    await _fill(ops, 20_000)
    assert int(await r.hget(KEYS.pod_load, "p1") or 0) > 0
    token = await Election(r, KEYS, "test-leader", 600_000, 1.0).try_acquire()
    assert token is not None
    await r.config_set("slowlog-log-slower-than", 50_000)
    await r.slowlog_reset()
    later = int(time.time() * 1000) + ops.state.settings.pod_ttl_ms + 1_000
    res = await reap(ops.state, token, now_ms=later)
    assert res.pods == 2
    assert await _slow_scripts(r) == []
    assert await r.hlen(KEYS.calls) == 0
    assert await r.zcard(KEYS.pod_calls) == 0


async def test_register_listing_lost_calls_restores_them_before_any_new_call(r: Redis) -> None:
    """Issue 12 item 2: after Redis lost its data a pod re-registered at load 0
    and its exclusive slot was given to a second call."""
    ops = Ops(await make_state(r, EXCLUSIVE))
    await ops.register("p0")
    assert (await ops.allocate("c1")).fields["pod_id"] == "p0"
    # Redis loses the pool state (restart without persistence); config stays.
    await r.delete(
        KEYS.pod_pool,
        KEYS.pod_load,
        KEYS.pod_calls,
        KEYS.calls,
        KEYS.leases,
        KEYS.pod_seen,
        KEYS.pool_count,
        KEYS.pool_free("gold", "open"),
        KEYS.pod_zone,
        KEYS.pod_capability,
    )
    assert (await ops.heartbeat("p0", ["c1"])).status == "unknown_pod"
    assert (await ops.register("p0", calls=["c1"])).status == "registered"
    rec = msgspec.json.decode(await r.hget(KEYS.calls, "c1") or "{}")
    assert rec["pod"] == "p0"
    assert await r.zscore(KEYS.leases, "c1") is not None
    assert await r.hget(KEYS.pod_load, "p0") == "1"
    assert [e["call_id"] for e in await _events(r, "call_restored")] == ["c1"]
    # The exclusive pod is busy: a new call is rejected, never placed on it.
    assert (await ops.allocate("c2")).status == "rejected"
    # Repeating c1 answers the same pod.
    again = await ops.allocate("c1")
    assert (again.status, again.fields["pod_id"], again.fields["existing"]) == (
        "allocated",
        "p0",
        "1",
    )
    await _check(r, ops)


async def test_a_call_held_elsewhere_or_past_the_limit_is_a_conflict_not_a_placement(
    r: Redis,
) -> None:
    """Issue 12 item 2: conflicts are call_conflict events, never a second placement."""
    ops = Ops(await make_state(r, EXCLUSIVE))
    await ops.register("p0")
    await ops.register("p1")
    c1 = await ops.allocate("c1")
    holder = c1.fields["pod_id"]
    other = "p1" if holder == "p0" else "p0"
    # The other pod claims c1 (held by holder) and two unknown calls (limit 1).
    assert (await ops.heartbeat(other, ["c1", "x1", "x2"])).status == "alive"
    assert msgspec.json.decode(await r.hget(KEYS.calls, "c1") or "{}")["pod"] == holder
    conflicts = await _events(r, "call_conflict")
    assert {e["call_id"] for e in conflicts} == {"c1", "x2"}
    assert await r.hget(KEYS.pod_load, other) == "1"
    assert await r.hexists(KEYS.calls, "x1")
    await _check(r, ops)


async def test_a_restored_call_the_pod_stops_listing_ends_within_two_pod_ttls(
    r: Redis,
) -> None:
    """A heartbeat that crossed a release restores a call the pod is ending:
    known only from the pod's word, it gets a lease of 2 x POD_TTL (not the
    15-minute LEASE_TTL), renewed only while the pod lists it."""
    import time

    from tierpool.core.leader import Election

    ops = Ops(await make_state(r, EXCLUSIVE))
    await ops.register("p0")
    await ops.allocate("c1")
    await ops.release("c1")
    now = int(time.time() * 1000)
    await ops.heartbeat("p0", ["c1"], now_ms=now)  # sent before the pod learned of the release
    assert await r.hget(KEYS.pod_load, "p0") == "1"
    ttl = ops.state.settings.pod_ttl_ms
    assert await r.zscore(KEYS.leases, "c1") == now + 2 * ttl
    later = now + 2 * ttl + 1
    await ops.heartbeat("p0", [], now_ms=later)  # the pod no longer lists it
    token = await Election(r, KEYS, "test-leader", 600_000, 1.0).try_acquire()
    assert token is not None
    res = await reap(ops.state, token, now_ms=later)
    assert res.leases == 1 and res.pods == 0
    assert await r.hget(KEYS.pod_load, "p0") == "0"
    assert not await r.hexists(KEYS.calls, "c1")
    await _check(r, ops, now_ms=later)


async def test_a_pod_cannot_leave_the_restricted_zone_under_a_restricted_call(
    r: Redis,
) -> None:
    """Issue 13 item 3: re-registering a restricted pod as open moved its
    restricted call into an open pool, and no invariant noticed."""
    cfg = {
        "secure": {"type": "exclusive", "target": 1, "zone": "restricted"},
        "open": {"type": "exclusive", "target": 1},
    }
    ops = Ops(await make_state(r, cfg))
    await ops.register("p0", zone="restricted")
    assert (await ops.allocate("c1", zone="restricted")).fields["pod_id"] == "p0"
    pool = await r.hget(KEYS.pod_pool, "p0")
    out = await ops.register("p0", zone="open")
    assert out.status == "invalid"
    assert "zone" in out.fields["error"]
    assert await r.hget(KEYS.pod_zone, "p0") == "restricted"
    assert await r.hget(KEYS.pod_pool, "p0") == pool
    dead = await r.xrange(KEYS.dead)
    assert len(dead) == 1 and "zone" in dead[0][1]["error"]
    await _check(r, ops)
    # Once the call is over, the pod may change.
    await ops.release("c1")
    assert (await ops.register("p0", zone="open")).status == "registered"


async def test_a_pod_cannot_lower_its_capability_under_a_call_that_needs_it(r: Redis) -> None:
    """Issue 13 item 3, capability: the call required 3; the pod may not drop to 1."""
    cfg = {"hi": {"type": "exclusive", "target": 1, "capability": 3}}
    ops = Ops(await make_state(r, cfg))
    await ops.register("p0", capability=3)
    assert (await ops.allocate("c1", min_capability=3)).status == "allocated"
    out = await ops.register("p0", capability=1)
    assert out.status == "invalid"
    assert "capability" in out.fields["error"]
    assert await r.hget(KEYS.pod_capability, "p0") == "3"
    assert (await ops.register("p0", capability=4)).status == "registered"
    await _check(r, ops)


async def test_the_invariant_checker_reads_the_pod_not_only_the_record(r: Redis) -> None:
    """Issue 13 item 3: a pod's zone changed behind the scripts' back is reported."""
    cfg = {"secure": {"type": "exclusive", "target": 1, "zone": "restricted"}}
    ops = Ops(await make_state(r, cfg))
    await ops.register("p0", zone="restricted")
    await ops.allocate("c1", zone="restricted")
    await r.hset(KEYS.pod_zone, "p0", "open")
    cfg_obj = ops.state.source.current().config
    found = await violations(r, KEYS, cfg_obj, now_ms=0, pod_ttl_ms=10**12)
    assert any("now of zone open" in v for v in found)
