"""Batch calls (issue 20): consecutive allocate or release calls of a pipeline go
as one script call (``_batch.lua``), and every entry keeps every guarantee a
call of its own has: exactly-once, request_id in use, deadline, version
guard, reply kind and echo; a Lua error in one entry is that entry's alone."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from tests.statekit import KEYS, Ops, make_state
from tierpool.core.scripts import Call, batch_script, run_calls
from tierpool.core.state import Entry
from tierpool.schemas import AllocateRequest, ReleaseRequest

pytestmark = pytest.mark.anyio


async def _reset(r: Redis) -> None:
    """Scripts loaded (no NOSCRIPT round), command counts at 0."""
    for name in ("allocate", "release"):
        await r.script_load(batch_script(name).source)
    await r.config_resetstat()


async def _evalsha_calls(r: Redis, command: str = "evalsha") -> int:
    line = (await r.info("commandstats")).get(f"cmdstat_{command}", {})
    return int(line.get("calls", 0))


async def _entries(r: Redis, stream: str, n: int) -> list[str]:
    await r.xgroup_create(stream, "tierpool", id="0", mkstream=True)
    for i in range(n):
        await r.xadd(stream, {"n": str(i)})
    [[_, read]] = await r.xreadgroup("tierpool", "w1", {stream: ">"})
    return [entry_id for entry_id, _ in read]


async def test_a_batch_is_one_script_call_and_each_entry_keeps_its_guarantees(
    r: Redis,
) -> None:
    ops = Ops(await make_state(r, {"gold": 2}))
    await ops.register("p0")
    await ops.register("p1")
    stream = KEYS.request_stream("allocate")
    e = await _entries(r, stream, 6)
    items = [
        (AllocateRequest(request_id="q1", call_id="c1"), Entry(stream, e[0])),
        # the same entry again in the same batch: processed once
        (AllocateRequest(request_id="q1", call_id="c1"), Entry(stream, e[0])),
        # a deadline long past: expired, nothing changed
        (AllocateRequest(request_id="q2", call_id="c2", deadline_ms=0), Entry(stream, e[1])),
        # q1's reply is unread: request_id in use, dead-lettered
        (AllocateRequest(request_id="q1", call_id="c3"), Entry(stream, e[2])),
        # c1 again under another request: the same pod, existing
        (AllocateRequest(request_id="q4", call_id="c1"), Entry(stream, e[3])),
        (AllocateRequest(request_id="q5", call_id="c5"), Entry(stream, e[4])),
        # both pods are taken now
        (AllocateRequest(request_id="q6", call_id="c6"), Entry(stream, e[5])),
    ]
    await _reset(r)
    out = await ops.state.run(items)
    assert await _evalsha_calls(r) == 1
    assert await _evalsha_calls(r, "mget") == 1  # the version guard, read once per batch
    assert [o.status for o in out] == [
        "allocated",
        "dup",
        "expired",
        "invalid",
        "allocated",
        "allocated",
        "rejected",
    ]
    assert out[4].fields["pod_id"] == out[0].fields["pod_id"]
    assert out[4].fields["existing"] == "1"
    assert out[5].fields["pod_id"] != out[0].fields["pod_id"]
    assert (await r.xpending(stream, "tierpool"))["pending"] == 0
    for rid, call, status in (("q1", "c1", "allocated"), ("q2", "c2", "expired")):
        [(_, reply)] = await r.xrange(KEYS.reply(rid))
        assert (reply["status"], reply["kind"], reply["call_id"]) == (status, "allocate", call)
    assert await r.xlen(KEYS.dead) == 1
    assert sum(int(v) for v in (await r.hgetall(KEYS.pod_load)).values()) == 2

    # Releases batch the same way.
    rel = KEYS.request_stream("release")
    f = await _entries(r, rel, 3)
    await _reset(r)
    done = await ops.state.run(
        [
            (ReleaseRequest(request_id=f"x{i}", call_id=c), Entry(rel, f[i]))
            for i, c in enumerate(("c1", "c5", "c1"))
        ]
    )
    assert await _evalsha_calls(r) == 1
    assert [o.status for o in done] == ["released", "released", "not_found"]
    assert await r.hlen(KEYS.calls) == 0


async def test_a_lua_error_in_one_entry_leaves_the_others_results(r: Redis) -> None:
    ops = Ops(await make_state(r, {"gold": 3}))
    for p in ("p0", "p1", "p2"):
        await ops.register(p)
    stream = KEYS.request_stream("allocate")
    e = await _entries(r, stream, 3)
    snap = ops.state.source.current()
    calls = []
    for i in range(3):
        call = ops.state.prepare(
            AllocateRequest(request_id=f"q{i}", call_id=f"c{i}"), snap, Entry(stream, e[i])
        )
        assert isinstance(call, Call)
        calls.append(call)
    # The candidate count of the middle call is not a number: its body fails.
    bad = list(calls[1].args)
    bad[-2] = "x"
    calls[1] = Call(calls[1].script, calls[1].keys, bad)
    await _reset(r)
    results = await run_calls(r, calls)
    assert await _evalsha_calls(r) == 1
    assert isinstance(results[0], list) and results[0][0] == "allocated"
    assert isinstance(results[1], ResponseError)
    assert isinstance(results[2], list) and results[2][0] == "allocated"
    # The failed entry changed nothing: no reply, still pending, retried later.
    assert await r.exists(KEYS.reply("q1")) == 0
    assert (await r.xpending(stream, "tierpool"))["pending"] == 1
    assert await r.hlen(KEYS.calls) == 2
