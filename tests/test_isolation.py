"""Isolation and placement truth (issues 13 and 14): regression tests on real Redis.

Each test names the break it guards. Most drive ``PoolState`` (the same
scripts a worker runs); the wire-level ones XADD raw entries to a worker
process as any producer would.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from redis.asyncio import Redis

from tests.conftest import wait_for
from tests.procs import KEYS, NAMESPACE, WorkerPool, reply, send, settled
from tests.statekit import Ops, make_state
from tierpool.client import TierpoolClient
from tierpool.core import placement
from tierpool.core.errors import ReplyMismatch
from tierpool.core.state import REQUEST_ID_IN_USE, Outcome, PoolState
from tierpool.schemas import AllocateRequest, ConfigRequest, MerchantPolicy, PodRegister

pytestmark = pytest.mark.anyio

# gold and silver form the default chain; vip is a dedicated pool (outside it).
CHAIN_AND_VIP = {
    "tiers": {
        "gold": {"type": "exclusive", "target": 1},
        "silver": {"type": "exclusive", "target": 1},
        "vip": {"type": "exclusive", "target": 2},
    },
    "default_chain": ["gold", "silver"],
}


async def set_merchant(state: PoolState, merchant: str, **policy: Any) -> str:
    out = await state.apply(
        ConfigRequest(
            request_id=f"m-{merchant}-{len(policy)}",
            merchant_id=merchant,
            merchant=MerchantPolicy(**policy),
        )
    )
    await state.source.refresh()
    return out.status


def reasons_of(out: Outcome) -> list[dict[str, Any]]:
    assert out.status == "rejected", out
    got: list[dict[str, Any]] = msgspec.json.decode(out.fields["reasons"])
    return got


# --- issue 13 item 1: dedicated pools serve only their merchant -------------------


async def test_unowned_dedicated_pool_serves_nobody_whatever_the_request_says(r: Redis) -> None:
    """Issue 13.1: a request without merchant_id reached a dedicated pool nobody
    owns through ``chain`` or ``tier_mode=flexible``."""
    state = await make_state(r, CHAIN_AND_VIP)
    ops = Ops(state)
    for pod in ("v1", "v2"):  # dedicated pools below target fill first
        assert (await ops.register(pod)).fields["pool"] == "vip"
    through_chain = await ops.allocate("c1", chain=("vip",))
    assert [(x["filter"], x["pool"]) for x in reasons_of(through_chain)] == [("merchant", "vip")]
    assert (await ops.allocate("c2", tier_mode="flexible")).status == "rejected"
    stranger = await ops.allocate("c3", merchant_id="m1", chain=("vip",), tier_mode="flexible")
    assert stranger.status == "rejected"
    # once a policy names it, it serves that merchant only
    assert await set_merchant(state, "owner", pool="vip", fallback=[]) == "applied"
    assert (await ops.allocate("c4", chain=("vip",), tier_mode="flexible")).status == "rejected"
    assert (await ops.allocate("c5", merchant_id="m1", chain=("vip",))).status == "rejected"
    assert (await ops.allocate("c6", merchant_id="owner")).fields["pool"] == "vip"
    assert await r.hkeys(KEYS.calls) == ["c6"]


async def test_allocate_script_refuses_a_dedicated_pool_even_if_placement_offers_it(
    r: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13.1, enforced where it cannot be bypassed: the allocate script
    checks the stored policy, so a placement bug cannot place a stranger."""
    state = await make_state(r, CHAIN_AND_VIP)
    ops = Ops(state)
    await ops.register("v1")
    assert await set_merchant(state, "owner", pool="vip") == "applied"

    def leaky(req: Any, snap: Any) -> placement.Placement:
        return placement.Placement(("vip",), req.zone, ())

    monkeypatch.setattr(placement, "place", leaky)
    for merchant in (None, "m1"):
        out = await ops.allocate(f"c-{merchant}", merchant_id=merchant)
        assert [x["filter"] for x in reasons_of(out)] == ["merchant"]
    assert await r.hlen(KEYS.calls) == 0
    assert (await ops.allocate("c-owner", merchant_id="owner")).fields["pool"] == "vip"


# --- issue 13 item 2: a reused request_id takes no effect --------------------------


async def test_reused_request_id_is_dead_lettered_and_the_first_reply_stands(r: Redis) -> None:
    """Issue 13.2: the second request took effect and its sender read the
    first request's reply (the wrong pod)."""
    state = await make_state(r, {"gold": {"type": "exclusive", "target": 2}})
    ops = Ops(state)
    await ops.register("p1")
    await ops.register("p2")
    first = await state.apply(AllocateRequest(request_id="same", call_id="c1"))
    assert first.status == "allocated"
    second = await state.apply(AllocateRequest(request_id="same", call_id="c2"))
    assert second == Outcome("invalid", {"error": REQUEST_ID_IN_USE})
    assert await r.hkeys(KEYS.calls) == ["c1"]
    entries = await r.xrange(KEYS.reply("same"))
    assert [(f["call_id"], f["pod_id"]) for _, f in entries] == [("c1", first.fields["pod_id"])]
    (dead,) = [f for _, f in await r.xrange(KEYS.dead)]
    assert (dead["request_id"], dead["error"]) == ("same", "request_id in use")
    # once the first reply is read and deleted, the id may be used again
    await r.delete(KEYS.reply("same"))
    assert (await state.apply(AllocateRequest(request_id="same", call_id="c2"))).status == (
        "allocated"
    )


# --- replies carry kind and echo the subject ---------------------------------------


async def test_every_reply_carries_kind_and_echoes_its_subject(r: Redis) -> None:
    """Contract v1.1: ``kind`` on every reply, ``call_id`` / ``pod_id`` echoed."""
    state = await make_state(r, {"gold": {"type": "exclusive", "target": 1}})
    ops = Ops(state)
    await ops.register("p1")
    await ops.heartbeat("p1")
    await ops.allocate("c1")
    await ops.allocate("c2")  # rejected: one exclusive pod
    await ops.release("c1")
    await ops.release("c1")  # not_found
    await ops.drain("ghost")  # not_found, no pod_id of its own
    await ops.drain("p1")
    await ops.deregister("p1")
    assert await set_merchant(state, "m1", pool="gold") in ("applied", "invalid")
    got = []
    for n in range(1, ops.n + 1):
        ((_, f),) = await r.xrange(KEYS.reply(f"r{n}"))
        got.append((f["status"], f["kind"], f.get("call_id") or f.get("pod_id")))
    assert got == [
        ("registered", "pod", "p1"),
        ("alive", "pod", "p1"),
        ("allocated", "allocate", "c1"),
        ("rejected", "allocate", "c2"),
        ("released", "release", "c1"),
        ("not_found", "release", "c1"),
        ("not_found", "drain", "ghost"),
        ("drained", "drain", "p1"),
        ("deregistered", "pod", "p1"),
    ]
    ((_, cfg),) = await r.xrange(KEYS.reply("m-m1-1"))
    assert cfg["kind"] == "config" and "call_id" not in cfg


# --- issue 13 item 4 and the wire: a worker process ---------------------------------


@pytest.fixture
def workers(redis_url: str, tmp_path: Path) -> Iterator[WorkerPool]:
    with WorkerPool(redis_url, tmp_path) as p:
        yield p


async def test_wire_deadline_zero_reuse_and_invalid_replies(r: Redis, workers: WorkerPool) -> None:
    """Issue 13.4: ``deadline_ms=0`` was "no deadline" and got allocated; an
    empty one still means none. Issue 13.2 over the wire. An ``invalid``
    reply says its kind and echoes a valid call_id."""
    await workers.start(r)
    pods = KEYS.pods_stream
    alloc = KEYS.request_stream("allocate")
    await send(r, pods, {"request_id": "reg", "event": "register", "pod_id": "p1",
                         "endpoint": "http://p1:8080"})  # fmt: skip
    assert (await reply(r, "reg"))["status"] == "registered"

    zero = await send(r, alloc, {"request_id": "z", "call_id": "c0", "deadline_ms": "0"})
    got = await reply(r, "z")
    assert (got["status"], got["kind"], got["call_id"]) == ("expired", "allocate", "c0"), zero
    empty = {"request_id": "e", "call_id": "c1", "deadline_ms": ""}
    await send(r, alloc, empty)
    assert (await reply(r, "e"))["status"] == "allocated"

    await send(r, alloc, {"request_id": "e", "call_id": "c2"})  # "e" has an unread reply
    await send(r, alloc, {"request_id": "bad", "call_id": "c3", "zone": "mars"})
    bad = await reply(r, "bad")
    assert (bad["status"], bad["kind"], bad["call_id"]) == ("invalid", "allocate", "c3")
    dead = [f for _, f in await r.xrange(KEYS.dead)]
    assert [(d["request_id"], d["error"][:17]) for d in dead] == [
        ("e", "request_id in use"),
        ("bad", "zone: must be one"),
    ]
    assert msgspec.json.decode(dead[0]["fields"]) == {"request_id": "e", "call_id": "c2"}
    assert await r.hkeys(KEYS.calls) == ["c1"]
    assert [f["call_id"] for _, f in await r.xrange(KEYS.reply("e"))] == ["c1"]


# --- issue 14 item 11: every reason true ---------------------------------------------


async def test_restricted_call_with_only_open_pods_is_not_told_to_retry(r: Redis) -> None:
    """Issue 14.11: no restricted pod exists, all open pods busy: the answer
    was "busy, retry shortly"; retrying never helps."""
    state = await make_state(r, {"gold": {"type": "exclusive", "target": 2}})
    ops = Ops(state)
    await ops.register("p1")
    await ops.allocate("c1")
    (reason,) = reasons_of(await ops.allocate("c2", zone="restricted"))
    assert reason["filter"] == "zone" and reason["pool"] == "gold"
    assert reason["required_zone"] == "restricted"
    assert "retry" not in reason["suggested_action"]
    assert "register restricted pods" in reason["suggested_action"]
    # with a restricted pod that is busy, retrying can help
    await ops.register("p2", zone="restricted")
    await ops.allocate("c3", zone="restricted")
    (busy,) = reasons_of(await ops.allocate("c4", zone="restricted"))
    assert busy["filter"] == "capacity" and "retry shortly" in busy["suggested_action"]


async def test_flexible_is_suggested_only_when_it_would_help(r: Redis) -> None:
    """Issue 14.11: "use tier_mode=flexible" was suggested to flexible requests
    and when no pool anywhere qualified."""
    cfg = {
        "tiers": {
            "gold": {"type": "exclusive", "target": 1, "capability": 1},
            "silver": {"type": "exclusive", "target": 1, "capability": 3},
        },
        "default_chain": ["gold", "silver"],
    }
    state = await make_state(r, cfg)
    ops = Ops(state)
    await ops.register("g1")
    await ops.register("s1", capability=3)
    await ops.allocate("c1", chain=("gold",))
    strict = reasons_of(await ops.allocate("c2", chain=("gold",)))
    assert [x["filter"] for x in strict] == ["capacity", "chain"]
    assert "tier_mode=flexible" in strict[1]["suggested_action"] and "silver" in strict[1]["detail"]
    await ops.allocate("c3", chain=("silver",))
    flexible = reasons_of(await ops.allocate("c4", chain=("gold",), tier_mode="flexible"))
    assert [(x["filter"], x["pool"]) for x in flexible] == [
        ("capacity", "gold"),
        ("capacity", "silver"),
    ]
    assert not any("flexible" in x["suggested_action"] for x in flexible)
    # silver qualifies by capability but is busy: flexible would not help, so no hint
    busy_elsewhere = reasons_of(await ops.allocate("c6", chain=("gold",), min_capability=3))
    assert [(x["filter"], x["pool"]) for x in busy_elsewhere] == [("capability", "gold")]
    assert "flexible" not in busy_elsewhere[0]["suggested_action"]
    nowhere = reasons_of(await ops.allocate("c5", min_capability=5))
    assert [(x["filter"], x["pool"], x["required_capability"]) for x in nowhere] == [
        ("capability", "gold", 5),
        ("capability", "silver", 5),
    ]
    for x in nowhere:
        assert "flexible" not in x["suggested_action"]
        assert "add a tier of capability >= 5" in x["suggested_action"]


async def test_every_filter_excluding_a_pool_is_named_and_capability_explained(
    r: Redis,
) -> None:
    """Issue 14.11: only the first failing filter per pool was reported; a
    capability-5 pod in a capability-1 pool was not explained. The rejected
    audit event carries the reasons."""
    state = await make_state(r, CHAIN_AND_VIP)
    ops = Ops(state)
    await ops.register("v1", capability=5)  # a capability-5 pod in the capability-1 vip pool
    assert await set_merchant(state, "owner", pool="vip") == "applied"
    out = await ops.allocate("c1", merchant_id="m1", chain=("vip",), min_capability=3)
    got = reasons_of(out)
    assert [(x["filter"], x["pool"]) for x in got] == [("merchant", "vip"), ("capability", "vip")]
    assert got[1]["required_capability"] == 3
    assert "a pod of higher capability in it does not qualify the pool" in got[1]["detail"]
    ((_, event),) = [e for e in await r.xrange(KEYS.events) if e[1]["event"] == "rejected"]
    assert msgspec.json.decode(event["reasons"]) == got


# --- issue 14 item 12: zone=any keeps restricted capacity along the whole chain ----


async def test_zone_any_takes_an_open_pod_further_down_the_chain_first(r: Redis) -> None:
    """Issue 14.12: zone=any took the only restricted pod of the first pool
    while an open pod was free in the next."""
    cfg = {
        "tiers": {
            "gold": {"type": "exclusive", "target": 1},
            "silver": {"type": "exclusive", "target": 1},
        },
        "default_chain": ["gold", "silver"],
    }
    state = await make_state(r, cfg)
    ops = Ops(state)
    assert (await ops.register("r1", zone="restricted")).fields["pool"] == "gold"
    assert (await ops.register("o1")).fields["pool"] == "silver"
    assert (await ops.allocate("c1")).fields["pod_id"] == "o1"
    assert (await ops.allocate("c2", zone="restricted")).fields["pod_id"] == "r1"


# --- the client refuses a reply that is not its own --------------------------------


async def test_client_refuses_a_forged_or_misrouted_reply(redis_url: str, r: Redis) -> None:
    """Issue 13.8: nothing stopped a writer of reply keys from forging a reply;
    the client now checks kind, request_id and the echoed call_id / pod_id."""
    forged = {"request_id": "f1", "status": "allocated", "kind": "allocate", "call_id": "other",
              "pod_id": "evil", "pool": "gold", "session_url": "wss://evil/"}  # fmt: skip
    await r.xadd(KEYS.reply("f1"), forged)
    await r.xadd(KEYS.reply("f2"), {"request_id": "f2", "status": "released", "pod_id": "p1"})
    await r.xadd(KEYS.reply("f3"), {**forged, "request_id": "f3", "kind": "release",
                                    "call_id": "mine"})  # fmt: skip
    async with TierpoolClient.from_url(redis_url, namespace=NAMESPACE) as c:
        with pytest.raises(ReplyMismatch, match="call_id 'other', expected 'mine'"):
            await c.allocate("mine", request_id="f1", timeout_s=5)
        with pytest.raises(ReplyMismatch, match="kind None, expected 'release'"):
            await c.release("c1", request_id="f2", timeout_s=5)
        with pytest.raises(ReplyMismatch, match="kind 'release', expected 'allocate'"):
            await c.allocate("mine", request_id="f3", timeout_s=5)


async def test_client_reusing_a_request_id_gets_an_error_not_the_other_pod(
    redis_url: str, r: Redis, workers: WorkerPool
) -> None:
    """Issue 13.2 as a user meets it: the second sender read the first
    request's reply and got the wrong pod. Now it raises, and its request
    took no effect."""
    await workers.start(r)
    async with (
        TierpoolClient.from_url(redis_url, namespace=NAMESPACE, default_timeout_s=20) as pods,
        TierpoolClient.from_url(
            redis_url, namespace=NAMESPACE, delete_replies=False, default_timeout_s=20
        ) as first,
        TierpoolClient.from_url(redis_url, namespace=NAMESPACE, default_timeout_s=20) as second,
    ):
        for pod in ("p1", "p2"):
            await pods.send_pod_event(PodRegister(pod_id=pod, endpoint=f"http://{pod}:8080"))
        placed = await first.allocate("c1", request_id="shared-id")
        assert placed.status == "allocated"
        with pytest.raises(ReplyMismatch, match="call_id 'c1', expected 'c2'"):
            await second.allocate("c2", request_id="shared-id")

    # The client may see the other reply before its own XADD went out (then it
    # never sends it); when it did send it, the worker dead-lettered it.
    sent = [f for _, f in await r.xrange(KEYS.request_stream("allocate")) if f["call_id"] == "c2"]

    async def dead_lettered() -> bool:
        dead = [f for _, f in await r.xrange(KEYS.dead)]
        return len([f for f in dead if f["error"] == REQUEST_ID_IN_USE]) == len(sent)

    await wait_for(dead_lettered, timeout_s=20)
    await wait_for(lambda: settled(r), timeout_s=20)
    assert await r.hkeys(KEYS.calls) == ["c1"]
    # the second client left the reply it refused: it is the first request's
    assert [f["call_id"] for _, f in await r.xrange(KEYS.reply("shared-id"))] == ["c1"]


# --- issue 13 item 1 under load, through worker processes ----------------------------


@pytest.mark.slow
async def test_no_stranger_lands_in_a_dedicated_pool_under_load(
    redis_url: str, r: Redis, tmp_path: Path
) -> None:
    """Issue 13.1 reproduced as reported: 12 s of mixed load put 165-198
    calls without merchant_id into an unowned dedicated pool through
    ``chain`` and ``tier_mode=flexible``. Now: none, while the pool's owner
    (once it has one) is served from it."""
    env = {"TIER_CONFIG": json.dumps(CHAIN_AND_VIP | {"tiers": {
        **CHAIN_AND_VIP["tiers"], "vip": {"type": "shared", "target": 2, "max_concurrent": 50},
        "gold": {"type": "shared", "target": 1, "max_concurrent": 2}}})}  # fmt: skip
    with WorkerPool(redis_url, tmp_path, env=env) as pool:
        await pool.start(r, 2)
        async with TierpoolClient.from_url(
            redis_url, namespace=NAMESPACE, default_timeout_s=20
        ) as c:
            for pod in ("v1", "v2", "g1", "s1"):
                got = await c.send_pod_event(PodRegister(pod_id=pod, endpoint=f"http://{pod}:80"))
                assert got is not None and got.status == "registered"
            shapes: list[dict[str, Any]] = [
                {"chain": ["vip"]},
                {"tier_mode": "flexible"},
                {"chain": ["vip", "gold"], "tier_mode": "flexible"},
                {"merchant_id": "stranger", "chain": ["vip"], "tier_mode": "flexible"},
            ]
            counts = {"allocated": 0, "rejected": 0}

            async def caller(k: int, owner: bool) -> None:
                for i in range(60):
                    shape = {"merchant_id": "owner"} if owner and i % 4 == 0 else shapes[i % 4]
                    out = await c.allocate(f"c{k}-{i}", **shape)
                    counts[out.status] = counts.get(out.status, 0) + 1
                    if out.status == "allocated" and i % 3:
                        await c.release(f"c{k}-{i}")

            async with anyio.create_task_group() as tg:  # no policy names vip yet
                for k in range(4):
                    tg.start_soon(caller, k, False)
            got = await c.set_merchant("owner", {"pool": "vip"})
            assert got.status == "applied"
            async with anyio.create_task_group() as tg:
                for k in range(4, 8):
                    tg.start_soon(caller, k, True)
    placed = [f for _, f in await r.xrange(KEYS.events) if f["event"] == "allocated"]
    in_vip = [f.get("merchant_id") for f in placed if f["pool"] == "vip"]
    assert counts["allocated"] > 30 and counts["rejected"] > 0, counts
    assert [m for m in in_vip if m != "owner"] == []
    assert len(in_vip) >= 30  # the owner's 4 x 15 requests
