"""The client library against real Redis, with an in-test worker loop.

The in-test worker (``fake_worker``) is the real state machine behind a
minimal consumer loop (XREADGROUP -> decode -> ``PoolState.run``), so these
tests exercise the client's wire behaviour without worker subprocesses. The
crash and restart tests use real workers.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import anyio
import pytest
from anyio.abc import TaskStatus
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from tests.conftest import wait_for
from tests.statekit import KEYS, make_state
from tierpool.client.client import ClientClosed, TierpoolClient
from tierpool.connect.redisconn import connect
from tierpool.core.errors import InvalidMessage, RequestTimeout
from tierpool.core.keys import GROUP, Keys
from tierpool.core.scripts import run_calls
from tierpool.core.state import Entry, PoolState
from tierpool.schemas import (
    PodDeregister,
    PodHeartbeat,
    PodRegister,
    decode_pod_event,
    decode_request,
)
from tierpool.workers.redisproc import RedisProcess

pytestmark = pytest.mark.anyio

NS = KEYS.namespace
CONFIG = {
    "gold": {"type": "exclusive", "target": 2},
    "basic": {"type": "shared", "target": 2, "max_concurrent": 3},
}


async def fake_worker(
    redis_url: str,
    state_env: dict[str, str] | None = None,
    *,
    config: Any = None,
    task_status: TaskStatus[PoolState] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """A one-process worker: the real state machine behind a minimal consumer loop."""
    r = connect(redis_url)
    try:
        state = await make_state(r, config or CONFIG, state_env)
        kinds = {KEYS.request_stream(k): k for k in ("allocate", "release", "drain", "config")}
        kinds[KEYS.pods_stream] = "pods"
        for stream in kinds:
            try:
                await r.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        task_status.started(state)
        while True:
            resp = await r.xreadgroup(GROUP, "fake", {s: ">" for s in kinds}, count=256, block=100)
            items: list[Any] = []
            raw: list[dict[str, str]] = []
            for stream, entries in resp or []:
                for entry_id, fields in entries:
                    kind = kinds[stream]
                    msg = (
                        decode_pod_event(fields) if kind == "pods" else decode_request(kind, fields)
                    )
                    items.append((msg, Entry(stream, entry_id)))
                    raw.append(fields)
            outcomes = await state.run(items) if items else []
            rejects = [
                state.reject_call(
                    entry=entry, request_id=msg.request_id, error=out.fields["error"], fields=fields
                )
                for (msg, entry), out, fields in zip(items, outcomes, raw, strict=True)
                if out.status == "invalid"
            ]
            if rejects:  # invalid against the config: answered like the real worker does
                await run_calls(r, rejects)
    finally:
        with anyio.CancelScope(shield=True):
            await r.aclose()


@asynccontextmanager
async def running_worker(redis_url: str, **kw: Any) -> AsyncIterator[PoolState]:
    async with anyio.create_task_group() as tg:
        state: PoolState = await tg.start(
            lambda task_status: fake_worker(redis_url, task_status=task_status, **kw)
        )
        try:
            yield state
        finally:
            tg.cancel_scope.cancel()


def register(pod: str, zone: str = "open", capability: int = 1) -> PodRegister:
    return PodRegister(
        pod_id=pod,
        endpoint=f"http://{pod}:8080",
        zone=zone,  # type: ignore[arg-type]
        capability=capability,
    )


async def test_every_method_round_trips(redis_url: str, r: Redis) -> None:
    async with running_worker(redis_url), TierpoolClient.from_url(redis_url, namespace=NS) as c:
        reg = await c.send_pod_event(register("p0"))
        assert reg is not None
        assert (reg.status, reg.pod_id, reg.pool) == ("registered", "p0", "gold")
        await c.send_pod_event(register("p1"))
        a = await c.allocate("c1", provider="plivo", flow="v1", template="t1")
        assert (a.status, a.pool, a.existing) == ("allocated", "gold", False)
        assert a.pod_id in ("p0", "p1") and a.session_url and a.lease_expires_ms
        again = await c.allocate("c1")
        assert (again.status, again.pod_id, again.existing) == ("allocated", a.pod_id, True)
        assert (await c.release("c1", reason="done")).status == "released"
        assert (await c.release("c1")).status == "not_found"
        assert (await c.drain("p0", reason="test")).status == "drained"
        assert (await c.undrain("p0")).status == "undrained"
        assert (await c.drain("ghost")).status == "not_found"
        hb = await c.send_pod_event(PodHeartbeat(pod_id="p0"))
        assert hb is not None and hb.status == "alive"
        ghost = await c.send_pod_event(PodHeartbeat(pod_id="ghost"))
        assert ghost is not None and ghost.status == "unknown_pod"
        applied = await c.change_config({"gold": 3, "basic": 1}, expected_version=1)
        assert (applied.status, applied.config_version) == ("applied", 2)
        conflict = await c.change_config('{"gold": 1}', expected_version=1)
        assert conflict.status == "conflict"
        bad = await c.change_config({"gold": {"type": "exclusive", "target": -1}})
        assert bad.status == "invalid" and bad.error
        assert (await c.set_merchant("m1", {"zone": "restricted"})).status == "applied"
        assert await r.hget(KEYS.merchants, "m1") == '{"zone":"restricted"}'
        assert (await c.set_merchant("m1", None)).status == "applied"
        assert await r.hget(KEYS.merchants, "m1") is None
        rej = await c.allocate("c2", zone="restricted")
        assert rej.status == "rejected" and "zone" in {x.filter for x in rej.reasons or ()}
        gone = await c.send_pod_event(PodDeregister(pod_id="p1"))
        assert gone is not None and gone.status == "deregistered"
        assert await c.send_pod_event(PodHeartbeat(pod_id="p0"), wait=False) is None
        # every reply stream the client read is deleted
        await wait_for(lambda: _no_reply_keys(r))


async def _no_reply_keys(r: Redis) -> bool:
    return not [k async for k in r.scan_iter(match=KEYS.reply("*"))]


async def test_invalid_message_is_refused_before_sending(redis_url: str, r: Redis) -> None:
    async with TierpoolClient.from_url(redis_url, namespace=NS) as c:
        with pytest.raises(InvalidMessage, match="call_id"):
            await c.allocate("has space")
        with pytest.raises(InvalidMessage, match="min_capability"):
            await c.allocate("c1", min_capability=9)
        with pytest.raises(InvalidMessage, match="merchant"):
            await c.set_merchant("m1", {"pool": "gold", "api_key": "secret"})
    assert await r.xlen(KEYS.request_stream("allocate")) == 0
    assert await r.xlen(KEYS.request_stream("config")) == 0


async def test_no_reply_raises_request_timeout_and_forgets_the_waiter(redis_url: str) -> None:
    async with TierpoolClient.from_url(redis_url, namespace=NS) as c:
        t0 = time.monotonic()
        with pytest.raises(RequestTimeout) as info:
            await c.allocate("c1", request_id="req-1", timeout_s=0.3)
        assert info.value.request_id == "req-1"
        assert 0.3 <= time.monotonic() - t0 < 5  # the upper bound only catches a hang
        assert not c.mux._waiters


async def test_500_concurrent_allocations_share_two_connections(redis_url: str, r: Redis) -> None:
    cfg = {"basic": {"type": "shared", "target": 100, "max_concurrent": 5}}
    async with (
        running_worker(redis_url, config=cfg),
        TierpoolClient.from_url(redis_url, namespace=NS) as c,
    ):
        async with anyio.create_task_group() as tg:
            for i in range(100):
                tg.start_soon(c.send_pod_event, register(f"p{i}"))
        replies: dict[str, Any] = {}
        peak_clients = 0

        async def one(i: int) -> None:
            replies[f"c{i}"] = await c.allocate(f"c{i}", timeout_s=20)

        async def watch() -> None:
            nonlocal peak_clients
            while True:
                peak_clients = max(peak_clients, await _client_connections(r))
                await anyio.sleep(0.005)

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            async with anyio.create_task_group() as load:
                for i in range(500):
                    load.start_soon(one, i)
            tg.cancel_scope.cancel()
        # The load can finish before the watcher's first sample: the client's
        # connections stay open, so one more sample after it counts too.
        peak_clients = max(peak_clients, await _client_connections(r))
        assert {rep.status for rep in replies.values()} == {"allocated"}
        assert len({(rep.pod_id, k) for k, rep in replies.items()}) == 500
        assert 1 <= peak_clients <= 2, peak_clients  # the writer and the reader, nothing more
        assert c.stats.batches < 100, c.stats  # 600 requests in far fewer round trips
        assert c.stats.sent == 600
        await wait_for(lambda: _no_reply_keys(r))


async def _client_connections(r: Redis) -> int:
    return sum(1 for cl in await r.client_list() if cl["name"].startswith("tierpool-client-"))


async def test_reply_written_before_the_read_is_not_missed(redis_url: str, r: Redis) -> None:
    """Regression guard: the reader reads each reply stream from its start."""
    await r.xadd(KEYS.reply("early"), {"request_id": "early", "status": "alive", "pod_id": "p"})
    async with TierpoolClient.from_url(redis_url, namespace=NS) as c:
        reply = await c.mux.submit(
            "early", KEYS.reply("sink"), {"x": "1"}, KEYS.reply("early"), 2.0
        )
        assert reply is not None and reply.status == "alive"


@pytest.mark.parametrize("unblock", [True, False])
async def test_a_new_request_does_not_wait_for_the_current_block(
    redis_url: str, unblock: bool
) -> None:
    """With CLIENT UNBLOCK a request made while the reader is blocked is answered at
    once; without it (the control case) it waits for the block to end."""
    block_ms = 1_500
    async with (
        running_worker(redis_url),
        TierpoolClient.from_url(redis_url, namespace=NS, block_ms=block_ms, unblock=unblock) as c,
    ):
        await c.send_pod_event(register("p0"))
        async with anyio.create_task_group() as tg:
            # a request nobody answers keeps the reader blocked on its stream
            tg.start_soon(
                _swallow_timeout,
                c.mux.submit("never", KEYS.reply("sink"), {"x": "1"}, KEYS.reply("never"), 5.0),
            )
            await wait_for(lambda: _blocked(c))
            t0 = time.monotonic()
            assert (await c.allocate("c1")).status == "allocated"
            took = time.monotonic() - t0
            tg.cancel_scope.cancel()
        if unblock:
            assert took < 0.5, took  # polling waits out the 1.5 s block instead
            assert c.stats.kicks >= 1
        else:
            assert took > 0.5, took


async def _blocked(c: TierpoolClient) -> bool:
    return c.mux._blocked_gen is not None


async def _swallow_timeout(aw: Any) -> None:
    with suppress(RequestTimeout):
        await aw


async def test_close_fails_waiting_requests_with_client_closed(redis_url: str) -> None:
    c = TierpoolClient.from_url(redis_url, namespace=NS)
    failed: list[BaseException] = []

    async def wait_reply() -> None:
        try:
            await c.allocate("c1", timeout_s=10)
        except ClientClosed as exc:
            failed.append(exc)

    async with anyio.create_task_group() as tg, c:
        tg.start_soon(wait_reply)
        await wait_for(lambda: _has_waiters(c))
        # leaving the block failed the waiting request
    assert len(failed) == 1
    with pytest.raises(RuntimeError):
        await c.allocate("c2")
    with pytest.raises(RuntimeError):  # entered once
        await c.__aenter__()


async def _has_waiters(c: TierpoolClient) -> bool:
    return bool(c.mux._waiters)


async def test_client_recovers_after_redis_restarts(
    redis_server: RedisProcess, redis_url: str
) -> None:
    """The reader and writer reconnect by themselves: a lost request times out,
    the next one is answered, with the same client object."""
    async with TierpoolClient.from_url(redis_url, namespace=NS) as c:
        async with running_worker(redis_url):
            await c.send_pod_event(register("p0"))
            assert (await c.allocate("c1")).status == "allocated"
        async with anyio.create_task_group() as tg:
            tg.start_soon(_swallow_timeout, c.allocate("lost", timeout_s=1.0))
            await wait_for(lambda: _blocked(c))
            redis_server.restart()
        async with running_worker(redis_url):
            # no retry: a connection Redis closed is replaced before sending on it
            reg = await c.send_pod_event(register("p0"), timeout_s=3)
            assert reg is not None and reg.status == "registered"
            assert (await c.allocate("c2")).status == "allocated"
        assert c.stats.reconnects >= 1


async def test_keys_of_the_namespace_are_used(redis_url: str, r: Redis) -> None:
    async with TierpoolClient.from_url(redis_url, namespace="other") as c:
        with pytest.raises(RequestTimeout):
            await c.drain("p0", timeout_s=0.1)
    assert await r.xlen(Keys("other").request_stream("drain")) == 1
    assert await r.xlen(KEYS.request_stream("drain")) == 0
