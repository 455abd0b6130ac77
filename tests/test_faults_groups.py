"""A lost consumer group and entries processed out of order (issue 12 item 3).

The claimer processes entries out of order (a claimed old entry after newer
fresh ones), so "processed up to" is not the highest id acknowledged. The
mark is the id before the oldest pending entry; entries after it that were
processed are in the processed set, and a group created again at the mark
delivers them as ``dup``.
"""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from tests.statekit import KEYS, Ops, make_state
from tierpool.core.keys import GROUP
from tierpool.core.state import Entry
from tierpool.schemas import AllocateRequest
from tierpool.workers.streams import ensure_groups, id_before, trim_streams

pytestmark = pytest.mark.anyio

ALLOCATE = KEYS.request_stream("allocate")


async def _deliver(r: Redis) -> list[tuple[str, dict[str, str]]]:
    got = await r.xreadgroup(GROUP, "w1", {ALLOCATE: ">"}, count=100)
    return [(eid, fields) for _, entries in got for eid, fields in entries] if got else []


async def _allocated(r: Redis) -> list[str]:
    return [f["call_id"] for _, f in await r.xrange(KEYS.events) if f["event"] == "allocated"]


async def test_out_of_order_processing_then_group_loss_replays_and_skips_nothing(
    r: Redis,
) -> None:
    ops = Ops(await make_state(r, {"basic": {"type": "shared", "target": 1, "max_concurrent": 9}}))
    await ops.register("p0")
    await ensure_groups(r, [ALLOCATE], KEYS)
    ids = [await r.xadd(ALLOCATE, {"request_id": f"g{i}", "call_id": f"c{i}"}) for i in range(3)]
    delivered = await _deliver(r)
    assert [eid for eid, _ in delivered] == ids

    async def process(entries: list[tuple[str, dict[str, str]]]) -> list[str]:
        items = [
            (AllocateRequest(request_id=f["request_id"], call_id=f["call_id"]), Entry(ALLOCATE, e))
            for e, f in entries
        ]
        return [o.status for o in await ops.state.run(items)]  # type: ignore[arg-type]

    # The newer two are processed; the oldest is still pending (a slow consumer).
    assert await process(delivered[1:]) == ["allocated", "allocated"]
    await trim_streams(r, [ALLOCATE], backlog_warn=10**6, keys=KEYS)  # the claimer's tick
    assert await r.hget(KEYS.processed_mark, "allocate") == id_before(ids[0])

    await r.xgroup_destroy(ALLOCATE, GROUP)  # Redis loses the group
    new = await r.xadd(ALLOCATE, {"request_id": "g9", "call_id": "c9"})  # added while gone
    assert await ensure_groups(r, [ALLOCATE], KEYS) == 1
    again = await _deliver(r)
    assert [eid for eid, _ in again] == [*ids, new]  # nothing skipped
    assert await process(again) == ["allocated", "dup", "dup", "allocated"]  # nothing replayed
    assert sorted(await _allocated(r)) == ["c0", "c1", "c2", "c9"]
    assert int((await r.xpending(ALLOCATE, GROUP))["pending"]) == 0

    # The next tick moves the mark past everything and trims the processed set.
    await trim_streams(r, [ALLOCATE], backlog_warn=10**6, keys=KEYS)
    assert await r.hget(KEYS.processed_mark, "allocate") == new
    left = await r.zrange(KEYS.processed, 0, -1)
    assert all(m.split("|")[1] >= f"{new.split('-')[0]:0>16}" for m in left), left


async def test_group_lost_before_any_mark_is_recreated_at_0_and_replays_nothing(
    r: Redis,
) -> None:
    """No mark yet (the group is lost before the claimer's first tick): the
    group starts at 0 and the processed set still answers dup."""
    ops = Ops(await make_state(r, {"basic": {"type": "shared", "target": 1, "max_concurrent": 9}}))
    await ops.register("p0")
    await ensure_groups(r, [ALLOCATE], KEYS)
    await r.xadd(ALLOCATE, {"request_id": "g0", "call_id": "c0"})
    [(eid, _f)] = await _deliver(r)
    req = AllocateRequest(request_id="g0", call_id="c0")
    assert (await ops.state.apply(req, Entry(ALLOCATE, eid))).status == "allocated"
    await ops.release("c0")
    await r.xgroup_destroy(ALLOCATE, GROUP)
    await ensure_groups(r, [ALLOCATE], KEYS)
    [(again, _)] = await _deliver(r)
    assert again == eid
    assert (await ops.state.apply(req, Entry(ALLOCATE, again))).status == "dup"
    assert await r.hlen(KEYS.calls) == 0  # the released call is not allocated again
