"""The pool state machine against real Redis: every transition and its reply."""

from __future__ import annotations

import msgspec
import pytest
from redis.asyncio import Redis

from tests.statekit import KEYS, Ops, RedisSource, make_state
from tierpool.core.snapshot import STALE_TRIES
from tierpool.core.state import Entry, PoolState
from tierpool.schemas import AllocateRequest, ConfigRequest, MerchantPolicy

pytestmark = pytest.mark.anyio

ANCHOR_PROD = {
    "gold": {"type": "exclusive", "target": 1},
    "standard": {"type": "exclusive", "target": 1},
    "basic": {"type": "shared", "target": 1, "max_concurrent": 3},
}


async def test_register_fills_chain_in_order_then_overflows_to_last(r: Redis) -> None:
    ops = Ops(await make_state(r, ANCHOR_PROD))
    pools = [(await ops.register(f"p{i}")).fields["pool"] for i in range(5)]
    assert pools == ["gold", "standard", "basic", "basic", "basic"]
    assert await r.hgetall(KEYS.pool_count) == {"gold": "1", "standard": "1", "basic": "3"}


async def test_exclusive_pod_takes_one_call_and_a_full_pool_falls_through(r: Redis) -> None:
    ops = Ops(await make_state(r, ANCHOR_PROD))
    for i in range(3):
        await ops.register(f"p{i}")
    a = await ops.allocate("c1")
    b = await ops.allocate("c2")
    assert (a.status, a.fields["pool"], a.fields["existing"]) == ("allocated", "gold", "0")
    assert (b.status, b.fields["pool"]) == ("allocated", "standard")
    assert a.fields["pod_id"] != b.fields["pod_id"]
    shared = [await ops.allocate(f"s{i}") for i in range(3)]
    assert {o.fields["pool"] for o in shared} == {"basic"}
    full = await ops.allocate("c9")
    assert full.status == "rejected"
    reasons = msgspec.json.decode(full.fields["reasons"])
    assert {x["filter"] for x in reasons} == {"capacity"}
    assert any("basic" in x["detail"] and "max_concurrent 3" in x["detail"] for x in reasons)
    assert all(x["suggested_action"] for x in reasons)


async def test_allocate_is_idempotent_per_call_id(r: Redis) -> None:
    ops = Ops(await make_state(r, ANCHOR_PROD))
    await ops.register("p0")
    await ops.register("p1")
    first = await ops.allocate("c1")
    again = await ops.allocate("c1")
    assert again.status == "allocated"
    assert again.fields["existing"] == "1"
    assert again.fields["pod_id"] == first.fields["pod_id"]
    assert again.fields["session_url"] == first.fields["session_url"]
    assert await r.hget(KEYS.pod_load, first.fields["pod_id"]) == "1"


async def test_session_url_is_built_like_the_anchors_ws_url(r: Redis) -> None:
    ops = Ops(await make_state(r, ANCHOR_PROD, env={"VOICE_AGENT_BASE_URL": "wss://va.example"}))
    await ops.register("p0")
    out = await ops.allocate("c1", provider="plivo", flow="v1", template="t1")
    assert out.fields["session_url"] == (
        "wss://va.example/ws/pod/p0/agent/voice/breeze-buddy/plivo/callback/t1"
    )
    assert out.fields["endpoint"] == "http://p0:8080"


async def test_shared_pool_picks_least_loaded_and_never_exceeds_max(r: Redis) -> None:
    cfg = {"basic": {"type": "shared", "target": 2, "max_concurrent": 2}}
    ops = Ops(await make_state(r, cfg))
    await ops.register("a")
    await ops.register("b")
    pods = [(await ops.allocate(f"c{i}")).fields.get("pod_id") for i in range(4)]
    assert sorted(pods) == ["a", "a", "b", "b"]
    assert pods[0] != pods[1]  # the second call went to the idle pod
    assert (await ops.allocate("c5")).status == "rejected"
    assert await r.hgetall(KEYS.pod_load) == {"a": "2", "b": "2"}


async def test_release_frees_capacity_and_a_second_release_is_not_found(r: Redis) -> None:
    ops = Ops(await make_state(r, {"gold": 1}))
    await ops.register("p0")
    await ops.allocate("c1")
    assert (await ops.allocate("c2")).status == "rejected"
    rel = await ops.release("c1")
    assert (rel.status, rel.fields["pod_id"], rel.fields["pool"]) == ("released", "p0", "gold")
    assert (await ops.release("c1")).status == "not_found"
    assert (await ops.release("never")).status == "not_found"
    assert (await ops.allocate("c2")).fields["pod_id"] == "p0"


async def test_drain_keeps_live_calls_and_count_and_undrain_restores(r: Redis) -> None:
    cfg = {"basic": {"type": "shared", "target": 1, "max_concurrent": 3}}
    ops = Ops(await make_state(r, cfg))
    await ops.register("p0")
    await ops.allocate("c1")
    await ops.allocate("c2")
    assert (await ops.drain("p0")).status == "drained"
    assert (await ops.allocate("c3")).status == "rejected"
    assert await r.hget(KEYS.pod_load, "p0") == "2"
    assert (await ops.drain("p0", "undrain")).status == "undrained"
    assert await r.zscore(KEYS.pool_free("basic", "open"), "p0") == 2.0
    assert (await ops.allocate("c3")).status == "allocated"
    assert (await ops.allocate("c4")).status == "rejected"  # 3 = max, not 1 + 3


async def test_drain_unknown_pod_is_not_found(r: Redis) -> None:
    ops = Ops(await make_state(r, {"gold": 1}))
    assert (await ops.drain("ghost")).status == "not_found"


async def test_restricted_call_never_lands_on_an_open_pod(r: Redis) -> None:
    ops = Ops(await make_state(r, {"gold": 2}))
    await ops.register("open1")
    out = await ops.allocate("c1", zone="restricted")
    assert out.status == "rejected"
    assert [x["filter"] for x in msgspec.json.decode(out.fields["reasons"])] == ["zone"]
    await ops.register("safe1", zone="restricted")
    ok = await ops.allocate("c1", zone="restricted")
    assert ok.fields["pod_id"] == "safe1"


async def test_any_zone_prefers_open_pods_to_keep_restricted_capacity(r: Redis) -> None:
    ops = Ops(await make_state(r, {"gold": 2}))
    await ops.register("safe1", zone="restricted")
    await ops.register("open1")
    assert (await ops.allocate("c1")).fields["pod_id"] == "open1"


async def test_restricted_tier_accepts_only_restricted_pods(r: Redis) -> None:
    cfg = {
        "tiers": {"vault": {"target": 5, "zone": "restricted"}, "gold": {"target": 5}},
        "default_chain": ["vault", "gold"],
    }
    ops = Ops(await make_state(r, cfg))
    assert (await ops.register("o1")).fields["pool"] == "gold"
    assert (await ops.register("r1", zone="restricted")).fields["pool"] == "vault"


async def test_min_capability_skips_lower_pools_with_a_reason(r: Redis) -> None:
    cfg = {
        "tiers": {"small": {"target": 1, "capability": 1}, "big": {"target": 1, "capability": 4}},
        "default_chain": ["small", "big"],
    }
    ops = Ops(await make_state(r, cfg))
    await ops.register("s1")
    await ops.register("b1", capability=5)
    out = await ops.allocate("c1", min_capability=3)
    assert (out.status, out.fields["pool"]) == ("allocated", "big")
    out2 = await ops.allocate("c2", min_capability=3)
    reasons = msgspec.json.decode(out2.fields["reasons"])
    assert {x["filter"] for x in reasons} == {"capability", "capacity"}


async def test_flexible_mode_widens_past_the_chain(r: Redis) -> None:
    cfg = {
        "tiers": {"gold": {"target": 1}, "spare": {"type": "shared", "target": 0}},
        "default_chain": ["gold", "spare"],
    }
    ops = Ops(await make_state(r, cfg))
    await ops.register("g1")
    await ops.register("x1")  # overflow: last chain pool, spare
    out = await ops.allocate("c1", chain=("gold",))
    assert out.fields["pool"] == "gold"
    assert (await ops.allocate("c2", chain=("gold",))).status == "rejected"
    flex = await ops.allocate("c2", chain=("gold",), tier_mode="flexible")
    assert flex.fields["pool"] == "spare"


async def _set_merchant(state: PoolState, merchant: str, **policy: object) -> str:
    out = await state.apply(
        ConfigRequest(
            request_id=f"m-{merchant}", merchant_id=merchant, merchant=MerchantPolicy(**policy)
        )
    )  # type: ignore[arg-type]
    await state.source.refresh()
    return out.status


async def test_merchant_dedicated_pool_serves_only_its_merchant(r: Redis) -> None:
    cfg = {"tiers": {"gold": {"target": 1}, "acme": {"target": 1}}, "default_chain": ["gold"]}
    state = await make_state(r, cfg)
    ops = Ops(state)
    assert (await ops.register("d1")).fields["pool"] == "acme"  # dedicated pools fill first
    assert (await ops.register("g1")).fields["pool"] == "gold"
    assert await _set_merchant(state, "acme-co", pool="acme", fallback=[]) == "applied"
    other = await ops.allocate("c1", merchant_id="globex", chain=("acme",))
    assert other.status == "rejected"
    reasons = msgspec.json.decode(other.fields["reasons"])
    # the dedicated pool is named; gold (outside this chain) has a free pod, so flexible helps
    got = [(x["filter"], x.get("pool")) for x in reasons]
    assert got == [("merchant", "acme"), ("chain", None)]
    mine = await ops.allocate("c2", merchant_id="acme-co")
    assert mine.fields["pool"] == "acme"
    # fallback [] means "dedicated pool only" (anchor §14.26 made it the default chain)
    assert (await ops.allocate("c3", merchant_id="acme-co")).status == "rejected"
    assert (await ops.allocate("c4")).fields["pool"] == "gold"


async def test_second_merchant_cannot_take_a_dedicated_pool(r: Redis) -> None:
    cfg = {"tiers": {"gold": {"target": 1}, "acme": {"target": 1}}, "default_chain": ["gold"]}
    state = await make_state(r, cfg)
    assert await _set_merchant(state, "acme-co", pool="acme") == "applied"
    out = await state.apply(
        ConfigRequest(request_id="m2", merchant_id="evil", merchant=MerchantPolicy(pool="acme"))
    )
    assert out.status == "invalid"
    assert "dedicated to merchant 'acme-co'" in out.fields["error"]


async def test_merchant_policy_requiring_restricted_zone_is_enforced(r: Redis) -> None:
    state = await make_state(r, {"gold": 3})
    ops = Ops(state)
    await ops.register("open1")
    assert await _set_merchant(state, "bank", zone="restricted") == "applied"
    assert (await ops.allocate("c1", merchant_id="bank")).status == "rejected"
    await ops.register("safe1", zone="restricted")
    assert (await ops.allocate("c1", merchant_id="bank")).fields["pod_id"] == "safe1"


async def test_heartbeat_from_unknown_pod_says_so_and_renews_only_own_leases(r: Redis) -> None:
    ops = Ops(await make_state(r, {"gold": 2}))
    assert (await ops.heartbeat("ghost")).status == "unknown_pod"
    await ops.register("a", now_ms=1_000_000)
    await ops.register("b", now_ms=1_000_000)
    await ops.allocate("ca", now_ms=1_000_000)
    await ops.allocate("cb", now_ms=1_000_000)
    pod_of = {c: msgspec.json.decode(v)["pod"] for c, v in (await r.hgetall(KEYS.calls)).items()}
    other = "cb" if pod_of["ca"] == "a" else "ca"
    mine = "ca" if other == "cb" else "cb"
    before = await r.zscore(KEYS.leases, other)
    assert (await ops.heartbeat("a", [mine, other], now_ms=1_060_000)).status == "alive"
    assert await r.zscore(KEYS.leases, other) == before
    assert await r.zscore(KEYS.leases, mine) == 1_060_000 + 15 * 60_000


async def test_deregister_ends_and_reports_calls(r: Redis) -> None:
    ops = Ops(await make_state(r, {"basic": {"type": "shared", "target": 1}}))
    await ops.register("p0")
    await ops.allocate("c1")
    await ops.allocate("c2")
    out = await ops.deregister("p0")
    assert out.status == "deregistered"
    assert sorted(msgspec.json.decode(out.fields["calls"])) == ["c1", "c2"]
    assert await r.hlen(KEYS.calls) == 0
    assert await r.zcard(KEYS.leases) == 0
    lost = [e for _, e in await r.xrange(KEYS.events) if e["event"] == "call_lost"]
    assert sorted(e["call_id"] for e in lost) == ["c1", "c2"]
    assert (await ops.deregister("p0")).status == "unknown_pod"
    assert (await ops.release("c1")).status == "not_found"


async def test_past_deadline_is_expired_and_changes_nothing(r: Redis) -> None:
    ops = Ops(await make_state(r, {"gold": 1}))
    await ops.register("p0")
    out = await ops.allocate("c1", deadline_ms=1_000, now_ms=2_000)
    assert out.status == "expired"
    assert await r.hlen(KEYS.calls) == 0


async def test_stale_snapshot_is_refused_then_refreshed(r: Redis) -> None:
    state = await make_state(r, {"gold": 1})
    ops = Ops(state)
    await ops.register("p0")
    # another worker applies a config where gold is gone
    other = PoolState(r, KEYS, state.settings, RedisSource(r, KEYS))
    await other.source.refresh()
    applied = await other.apply(ConfigRequest(request_id="cfg", config='{"silver": 1}'))
    assert (applied.status, applied.fields["config_version"]) == ("applied", "2")
    # this worker's snapshot still says gold: the script refuses, the state refreshes
    assert state.source.current().version == 1
    retried: list[int] = []
    state.on_stale_retry = retried.append  # tierpool_stale_retries_total in a worker
    out = await ops.allocate("c1")
    assert out.status == "rejected"
    assert state.source.current().version == 2
    assert retried == [1]
    assert await r.hget(KEYS.pod_pool, "p0") == ""


async def test_a_source_that_cannot_refresh_never_allocates_on_an_old_version(r: Redis) -> None:
    state = await make_state(r, {"gold": 1})
    await Ops(state).register("p0")
    await r.set(KEYS.config_version, "7")

    class Frozen(RedisSource):
        async def refresh(self):  # type: ignore[no-untyped-def]
            return self.current()

    frozen = PoolState(r, KEYS, state.settings, Frozen(r, KEYS))
    frozen.source.snap = state.source.current()  # type: ignore[attr-defined]
    retried: list[int] = []
    frozen.on_stale_retry = retried.append
    out = await frozen.apply(AllocateRequest(request_id="x", call_id="c1"))
    assert out.status == "stale"
    assert retried == [1] * (STALE_TRIES - 1)  # every try but the last is retried
    assert await r.hlen(KEYS.calls) == 0


async def test_reply_is_one_entry_with_a_ttl(r: Redis) -> None:
    ops = Ops(await make_state(r, {"gold": 1}))
    await ops.register("p0")
    await ops.state.apply(AllocateRequest(request_id="req-1", call_id="c1"))
    await ops.state.apply(AllocateRequest(request_id="req-1", call_id="c1"))
    entries = await r.xrange(KEYS.reply("req-1"))
    assert len(entries) == 1
    assert entries[0][1]["status"] == "allocated"
    ttl = await r.pttl(KEYS.reply("req-1"))
    assert 0 < ttl <= 60_000


async def test_redelivered_entry_is_processed_exactly_once(r: Redis) -> None:
    ops = Ops(await make_state(r, {"gold": 2}))
    await ops.register("p0")
    await ops.register("p1")
    stream = KEYS.request_stream("allocate")
    await r.xgroup_create(stream, "tierpool", id="0", mkstream=True)
    await r.xadd(stream, {"request_id": "q1", "call_id": "c1"})
    [[_, [(entry_id, _)]]] = await r.xreadgroup("tierpool", "w1", {stream: ">"})
    msg = AllocateRequest(request_id="q1", call_id="c1")
    first = await ops.state.apply(msg, Entry(stream, entry_id))
    second = await ops.state.apply(msg, Entry(stream, entry_id))
    assert first.status == "allocated"
    assert second.status == "dup"
    assert (await r.xpending(stream, "tierpool"))["pending"] == 0
    assert await r.xlen(KEYS.reply("q1")) == 1
    assert sum(int(v) for v in (await r.hgetall(KEYS.pod_load)).values()) == 1


async def test_noscript_after_script_flush_is_handled(r: Redis) -> None:
    ops = Ops(await make_state(r, {"gold": 1}))
    await ops.register("p0")
    await r.script_flush()
    assert (await ops.allocate("c1")).status == "allocated"


async def test_config_change_removing_a_pool_unassigns_its_pods_and_keeps_calls(r: Redis) -> None:
    state = await make_state(r, ANCHOR_PROD)
    ops = Ops(state)
    for i in range(3):
        await ops.register(f"p{i}")
    call = await ops.allocate("c1", chain=("basic",))
    out = await state.apply(
        ConfigRequest(request_id="cfg", config='{"gold": {"target": 1}, "standard": {"target": 1}}')
    )
    assert out.status == "applied"
    pod = call.fields["pod_id"]
    assert await r.hget(KEYS.pod_pool, pod) == ""
    assert not await r.exists(KEYS.pool_free("basic", "open"))
    assert "basic" not in await r.hgetall(KEYS.pool_count)
    assert (await ops.release("c1")).status == "released"


async def test_config_cas_conflict_and_invalid_config(r: Redis) -> None:
    state = await make_state(r, {"gold": 1})
    bad = await state.apply(
        ConfigRequest(
            request_id="a", config='{"tiers": {"g": {"target": -1}}, "default_chain": ["x"]}'
        )
    )
    assert bad.status == "invalid"
    assert "target" in bad.fields["error"] and "'x'" in bad.fields["error"]
    conflict = await state.apply(
        ConfigRequest(request_id="b", config='{"gold": 2}', expected_version=5)
    )
    assert (conflict.status, conflict.fields["config_version"]) == ("conflict", "1")
    ok = await state.apply(ConfigRequest(request_id="c", config='{"gold": 2}', expected_version=1))
    assert (ok.status, ok.fields["config_version"]) == ("applied", "2")
    assert msgspec.json.decode(await r.get(KEYS.config))["version"] == 2


async def test_inapplicable_config_request_is_replied_dead_lettered_and_acked(r: Redis) -> None:
    """A merchant policy naming an unknown pool is well-formed but cannot apply:
    it must get its invalid reply and dead letter at once, not be retried."""
    state = await make_state(r, {"gold": 1})
    stream = KEYS.request_stream("config")
    await r.xgroup_create(stream, "tierpool", id="0", mkstream=True)
    await r.xadd(
        stream, {"request_id": "m1", "merchant_id": "acme", "merchant": '{"pool": "nope"}'}
    )
    [[_, [(entry_id, _)]]] = await r.xreadgroup("tierpool", "w1", {stream: ">"})
    out = await state.apply(
        ConfigRequest(request_id="m1", merchant_id="acme", merchant=MerchantPolicy(pool="nope")),
        Entry(stream, entry_id),
    )
    assert out.status == "invalid"
    assert "'nope' is not configured" in out.fields["error"]
    [(_, reply)] = await r.xrange(KEYS.reply("m1"))
    assert reply["status"] == "invalid" and "nope" in reply["error"]
    [(_, dead)] = await r.xrange(KEYS.dead)
    assert dead["request_id"] == "m1" and "nope" in dead["error"]
    assert (await r.xpending(stream, "tierpool"))["pending"] == 0


async def test_rejection_decided_on_an_old_snapshot_is_decided_again(r: Redis) -> None:
    """A policy naming a tier that another worker just added is applied, not
    rejected by a worker whose snapshot predates the tier."""
    state = await make_state(r, {"gold": 1})
    other = PoolState(r, KEYS, state.settings, RedisSource(r, KEYS))
    await other.source.refresh()
    assert (
        await other.apply(
            ConfigRequest(
                request_id="c",
                config='{"tiers": {"gold": {"target": 1}, "acme": {"target": 1}},'
                ' "default_chain": ["gold"]}',
            )
        )
    ).status == "applied"
    out = await state.apply(
        ConfigRequest(request_id="m", merchant_id="acme-co", merchant=MerchantPolicy(pool="acme"))
    )
    assert out.status == "applied"


async def test_every_config_reply_carries_the_version_in_force(r: Redis) -> None:
    """CONTRACT: config_version is on config replies, whatever their status."""
    state = await make_state(r, {"gold": 1})
    stream = KEYS.request_stream("config")
    await r.xgroup_create(stream, "tierpool", id="0", mkstream=True)
    cases = [
        (ConfigRequest(request_id="ok", config='{"gold": 2}'), "applied", "2"),
        (
            ConfigRequest(request_id="cas", config='{"gold": 3}', expected_version=1),
            "conflict",
            "2",
        ),
        (ConfigRequest(request_id="bad", config='{"gold": -1}'), "invalid", "2"),
        (ConfigRequest(request_id="late", config='{"gold": 3}', deadline_ms=1), "expired", "2"),
        (
            ConfigRequest(request_id="pol", merchant_id="m", merchant=MerchantPolicy()),
            "applied",
            "2",
        ),
    ]
    for msg, status, version in cases:
        await r.xadd(stream, {"request_id": msg.request_id})
        [[_, [(entry_id, _)]]] = await r.xreadgroup("tierpool", "w1", {stream: ">"}, count=1)
        out = await state.apply(msg, Entry(stream, entry_id))
        [(_, reply)] = await r.xrange(KEYS.reply(msg.request_id))
        assert (reply["status"], reply.get("config_version")) == (status, version), msg
        assert out.status == status
