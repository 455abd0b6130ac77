"""The worker end to end: raw XADDs in, replies out, through real worker processes.

Producers here write flat string maps with XADD and read the reply stream,
as a producer in any language would; nothing goes through tierpool's Python
API. Faults are injected where they happen: signals to the worker processes,
a FLUSHALL, a Redis restart, a message that fails every time.
"""

from __future__ import annotations

import logging
import signal
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from redis.asyncio import Redis

from tests.conftest import wait_for
from tests.procs import KEYS, WorkerPool, replies, reply, send, settled
from tierpool.core.keys import GROUP
from tierpool.core.settings import Settings
from tierpool.workers.claimer import Claimer, remove_consumers
from tierpool.workers.context import WorkerContext
from tierpool.workers.metrics import REGISTRY
from tierpool.workers.processor import Processor
from tierpool.workers.redisproc import RedisProcess
from tierpool.workers.streams import Delivery, Outage, ensure_groups, parse_read, trim_streams
from tierpool.workers.worker import Worker

pytestmark = pytest.mark.anyio

ALLOCATE, RELEASE, DRAIN, CONFIG = (
    KEYS.request_stream(k) for k in ("allocate", "release", "drain", "config")
)
PODS = KEYS.pods_stream


@pytest.fixture
def pool(redis_url: str, tmp_path: Path) -> Iterator[WorkerPool]:
    with WorkerPool(redis_url, tmp_path) as p:
        yield p


async def ask(r: Redis, stream: str, rid: str, **fields: str) -> dict[str, str]:
    await send(r, stream, {"request_id": rid, **fields})
    return await reply(r, rid)


async def register(r: Redis, pod: str, rid: str | None = None) -> dict[str, str]:
    rid = rid or f"reg-{pod}"
    return await ask(r, PODS, rid, event="register", pod_id=pod, endpoint=f"http://{pod}:8080")


async def test_every_request_kind_gets_its_contract_reply(r: Redis, pool: WorkerPool) -> None:
    await pool.start(r, 2)
    got = await register(r, "p1")
    assert (got["status"], got["pool"]) == ("registered", "gold")
    assert (await ask(r, PODS, "hb1", event="heartbeat", pod_id="p1", calls="[]"))[
        "status"
    ] == "alive"
    assert (await ask(r, PODS, "hb2", event="heartbeat", pod_id="ghost"))["status"] == "unknown_pod"

    first = await ask(r, ALLOCATE, "a1", call_id="c1", provider="plivo")
    assert (first["status"], first["pod_id"], first["existing"]) == ("allocated", "p1", "0")
    again = await ask(r, ALLOCATE, "a2", call_id="c1")
    assert (again["status"], again["pod_id"], again["existing"]) == ("allocated", "p1", "1")
    full = await ask(r, ALLOCATE, "a3", call_id="c2")
    assert full["status"] == "rejected"
    assert all(x["filter"] and x["suggested_action"] for x in msgspec.json.decode(full["reasons"]))

    assert (await ask(r, RELEASE, "r1", call_id="c1"))["status"] == "released"
    assert (await ask(r, RELEASE, "r2", call_id="c1"))["status"] == "not_found"
    assert (await ask(r, DRAIN, "d1", pod_id="p1"))["status"] == "drained"
    assert (await ask(r, DRAIN, "d2", pod_id="p1", action="undrain"))["status"] == "undrained"

    new_config = msgspec.json.encode(
        {"gold": {"type": "exclusive", "target": 2}, "basic": {"type": "shared", "target": 1}}
    ).decode()
    conflict = await ask(r, CONFIG, "k1", config=new_config, expected_version="99")
    assert (conflict["status"], conflict["config_version"]) == ("conflict", "1")
    applied = await ask(r, CONFIG, "k2", config=new_config, expected_version="1")
    assert (applied["status"], applied["config_version"]) == ("applied", "2")

    bad_config = await ask(r, CONFIG, "k3", config='{"gold": {"type": "weird"}}')
    assert (bad_config["status"], "weird" in bad_config["error"]) == ("invalid", True)
    bad = await ask(r, ALLOCATE, "x1", min_capability="9")  # no call_id, capability too high
    assert bad["status"] == "invalid"
    assert "call_id" in bad["error"] and "min_capability" in bad["error"]
    late = await ask(r, ALLOCATE, "e1", call_id="c3", deadline_ms="1")
    assert late["status"] == "expired"
    gone = await ask(r, PODS, "dr1", event="deregister", pod_id="p1")
    assert gone["status"] == "deregistered"

    dead = await r.xrange(KEYS.dead)
    assert [(d["request_id"], d["stream"]) for _, d in dead] == [("k3", CONFIG), ("x1", ALLOCATE)]
    await wait_for(lambda: settled(r))


async def _load(r: Redis, n: int, *, prefix: str, every: int = 50) -> list[str]:
    """n requests, allocate and release of the same calls, XADDed in paced bursts."""
    rids = []
    for start in range(0, n, every):
        async with r.pipeline(transaction=False) as pipe:
            for i in range(start, min(n, start + every)):
                call = f"{prefix}c{i // 2}"
                rid = f"{prefix}{i}"
                pipe.xadd(RELEASE if i % 2 else ALLOCATE, {"request_id": rid, "call_id": call})
                rids.append(rid)
            await pipe.execute()
        await anyio.sleep(0.005)
    return rids


async def _assert_processed_once(r: Redis, rids: list[str]) -> None:
    got = await replies(r, rids, timeout_s=60)
    assert {rid: len(entries) for rid, entries in got.items() if len(entries) != 1} == {}
    events = await r.xrange(KEYS.events)
    per_request = Counter(e["request_id"] for _, e in events if e.get("request_id") in got)
    assert [rid for rid, n in per_request.items() if n > 1] == []
    await wait_for(lambda: settled(r), timeout_s=10)


@pytest.mark.slow
async def test_sigterm_during_load_loses_nothing(r: Redis, pool: WorkerPool) -> None:
    a, b = await pool.start(r, 2)
    for i in range(6):
        await register(r, f"p{i}")
    async with anyio.create_task_group() as tg:
        sent: list[str] = []

        async def produce() -> None:
            sent.extend(await _load(r, 3000, prefix="L"))

        tg.start_soon(produce)
        await wait_for(lambda: _true(len(sent) >= 1000), timeout_s=30)
        a.send_signal(signal.SIGTERM)
    assert await a.wait_exit() == 0
    await _assert_processed_once(r, sent)
    assert b.alive()


async def _true(value: bool) -> bool:
    return value


async def test_stalled_consumer_entries_are_claimed_and_processed_once(
    r: Redis, pool: WorkerPool
) -> None:
    a, b = await pool.start(r, 2)
    for i in range(3):
        await register(r, f"p{i}")
    rids: list[str] = []
    held: list[dict[str, object]] = []
    for attempt in range(40):
        a.send_signal(signal.SIGSTOP)  # its blocking read is still open in Redis
        for i in range(4):
            rid = f"s{attempt}-{i}"
            await send(r, ALLOCATE, {"request_id": rid, "call_id": f"call-{rid}"})
            rids.append(rid)
        held = await r.xpending_range(ALLOCATE, GROUP, "-", "+", 100, consumername=a.worker_id)
        if held:
            break
        a.send_signal(signal.SIGCONT)
        await wait_for(lambda: _consumer_idle_below(r, a.worker_id or "", 50), timeout_s=5)
    assert held, "the stopped worker never received an entry"
    await _assert_processed_once(r, rids)  # b claimed what a holds, a never woke
    assert a.alive() and b.alive()
    a.kill()


async def _consumer_idle_below(r: Redis, name: str, idle_ms: int) -> bool:
    for c in await r.xinfo_consumers(ALLOCATE, GROUP):
        if c["name"] == name:
            return int(c["idle"]) < idle_ms
    return False


async def test_entry_failing_every_time_is_dead_lettered_after_max_deliveries(
    r: Redis, pool: WorkerPool
) -> None:
    pool.env["TIERPOOL_MAX_DELIVERIES"] = "3"
    await pool.start(r, 2)
    await r.hset(KEYS.calls, "poison", "{not json")  # release.lua fails decoding it
    await send(r, RELEASE, {"request_id": "bad1", "call_id": "poison"})
    assert (await register(r, "p1"))["status"] == "registered"  # the stream goes on
    got = await reply(r, "bad1", timeout_s=15)
    assert (got["status"], got["error"]) == ("invalid", "too many deliveries (4)")
    [(_, dead)] = await r.xrange(KEYS.dead)
    assert (dead["request_id"], dead["deliveries"], dead["stream"]) == ("bad1", "4", RELEASE)
    assert msgspec.json.decode(dead["fields"]) == {"request_id": "bad1", "call_id": "poison"}
    await wait_for(lambda: settled(r))


async def test_nogroup_after_flushall_is_recovered_without_restart(
    r: Redis, pool: WorkerPool
) -> None:
    workers = await pool.start(r, 2)
    assert (await register(r, "p1"))["status"] == "registered"
    await r.flushall()
    t0 = time.monotonic()
    assert (await register(r, "p2", rid="after-flush"))["status"] == "registered"
    print(f"serving again {time.monotonic() - t0:.2f}s after FLUSHALL")
    assert all(w.alive() for w in workers)
    for stream in KEYS.all_input_streams:
        assert [g["name"] for g in await r.xinfo_groups(stream)] == [GROUP]


async def test_redis_restart_worker_resumes_by_itself(
    r: Redis, pool: WorkerPool, redis_server: RedisProcess
) -> None:
    workers = await pool.start(r, 2)
    assert (await register(r, "p1"))["status"] == "registered"
    t_kill = time.monotonic()
    redis_server.restart()  # killed, back empty on the same port
    t0 = time.monotonic()
    assert (await register(r, "p1", rid="after-restart"))["status"] == "registered"
    took = time.monotonic() - t0
    print(
        f"Redis restart: first reply {took:.2f}s after Redis answered again "
        f"({time.monotonic() - t_kill:.2f}s after the kill)"
    )
    assert took < 10
    assert all(w.alive() for w in workers)
    assert (await ask(r, ALLOCATE, "a1", call_id="c1"))["status"] == "allocated"


@pytest.mark.slow
async def test_redis_away_for_a_while_is_logged_once_and_survived(
    r: Redis, pool: WorkerPool, redis_server: RedisProcess
) -> None:
    workers = await pool.start(r, 2)
    redis_server.stop(kill=True)
    t_down = time.monotonic()

    async def all_noticed() -> bool:
        return all("Redis unavailable" in w.log_text() for w in workers)

    await wait_for(all_noticed, timeout_s=15, interval_s=0.05)
    noticed = time.monotonic() - t_down
    await anyio.sleep(1.5)  # fault duration, not a wait for a result: several retries fail
    redis_server.start()
    t0 = time.monotonic()
    assert (await register(r, "p1", rid="after-outage"))["status"] == "registered"
    took = time.monotonic() - t0
    print(
        f"Redis away {t0 - t_down:.2f}s (noticed after {noticed:.2f}s): first reply "
        f"{took:.2f}s after it answered again"
    )
    assert took < 10
    for w in workers:
        assert w.alive()
        assert w.log_text().count("Redis unavailable") == 1, w.log_text()[-3000:]


async def test_streams_get_trimmed_but_never_past_unacked_entries(
    r: Redis, pool: WorkerPool
) -> None:
    pool.env["TIERPOOL_CLAIM_MIN_IDLE"] = "60s"  # the poison entry stays pending
    await pool.start(r, 2)
    await r.hset(KEYS.calls, "poison", "{not json")
    before = await _load_releases(r, "b", 300)
    poison = await send(r, RELEASE, {"request_id": "poison", "call_id": "poison"})
    after = await _load_releases(r, "a", 300)
    heartbeats = [f"hb{i}" for i in range(300)]
    for rid in heartbeats:
        await send(r, PODS, {"request_id": rid, "event": "heartbeat", "pod_id": "nobody"})
    await replies(r, before + after + heartbeats, timeout_s=30)

    await wait_for(lambda: _below(r.xlen(RELEASE), 500), timeout_s=10)
    await wait_for(lambda: _below(r.xlen(PODS), 150), timeout_s=10)
    kept = await r.xrange(RELEASE, poison, "+")
    assert kept[0][0] == poison
    assert len(kept) == 301  # the unacked entry and everything after it
    assert [e["request_id"] for _, e in await r.xrange(PODS, "-", "+")][-1] == "hb299"


async def _load_releases(r: Redis, prefix: str, n: int) -> list[str]:
    rids = [f"{prefix}{i}" for i in range(n)]
    async with r.pipeline(transaction=False) as pipe:
        for rid in rids:
            pipe.xadd(RELEASE, {"request_id": rid, "call_id": f"none-{rid}"})
        await pipe.execute()
    return rids


async def _below(value: object, limit: int) -> bool:
    return int(await value) < limit  # type: ignore[misc]


async def test_bad_settings_exit_2_with_the_variable_named(r: Redis, pool: WorkerPool) -> None:
    [w] = pool.spawn(1, env={"TIERPOOL_BATCH_SIZE": "lots"})
    assert await w.wait_exit() == 2
    assert "TIERPOOL_BATCH_SIZE" in w.log_text()


@pytest.mark.slow
async def test_one_worker_throughput(r: Redis, pool: WorkerPool) -> None:
    """A quick number, not a benchmark: allocate/release pairs through one worker."""
    pool.env["TIERPOOL_CLAIM_MIN_IDLE"] = "30s"
    [w] = await pool.start(r, 1)
    for i in range(10):
        await register(r, f"p{i}")
    w.send_signal(signal.SIGSTOP)
    n = 6000
    rids = await _load(r, n, prefix="T", every=1000)
    t0 = time.monotonic()
    w.send_signal(signal.SIGCONT)
    await wait_for(lambda: _all_done(r), timeout_s=60, interval_s=0.01)
    took = time.monotonic() - t0
    print(f"one worker: {n} allocate/release requests in {took:.2f}s = {n / took:.0f} msg/s")
    assert len(await replies(r, rids[-10:])) == 10


async def _all_done(r: Redis) -> bool:
    for stream in (ALLOCATE, RELEASE):
        [g] = await r.xinfo_groups(stream)
        if g["lag"] != 0 or g["pending"] != 0:
            return False
    return True


# --- in-process: the loops' own rules ---------------------------------------------

QUIET = frozenset({"http", "leader", "gauges", "config-listener"})


def make_ctx(url: str, **overrides: object) -> WorkerContext:
    settings = Settings(
        redis_url=url,
        namespace="t",
        block_ms=100,
        claim_min_idle_ms=600,
        claim_interval_s=0.1,
        **overrides,
    )  # type: ignore[arg-type]
    return WorkerContext.create(settings)


class Gate:
    """Holds Processor.process at its start until opened: a batch 'in hand'."""

    def __init__(self, processor: Processor) -> None:
        self.entered = anyio.Event()
        self.opened = anyio.Event()
        self._real = processor.process
        processor.process = self.process  # type: ignore[method-assign]

    async def process(self, batch: Sequence[Delivery]) -> list[str]:
        self.entered.set()
        await self.opened.wait()
        return await self._real(batch)


async def test_stop_twice_lets_the_batch_in_hand_finish_then_leaves(
    r: Redis, redis_url: str
) -> None:
    ctx = make_ctx(redis_url, shutdown_grace_s=5)
    worker = Worker(ctx, without=QUIET)
    gate = Gate(worker.consumer.processor)
    async with anyio.create_task_group() as tg:
        await tg.start(worker.run)
        await send(r, PODS, {"request_id": "g1", "event": "heartbeat", "pod_id": "x"})
        await gate.entered.wait()
        worker.stop()
        worker.stop()
        gate.opened.set()
    assert (await reply(r, "g1"))["status"] == "unknown_pod"
    assert await settled(r)
    assert await r.zscore(KEYS.workers, ctx.worker_id) is None
    assert ctx.worker_id not in [c["name"] for c in await r.xinfo_consumers(PODS, GROUP)]


async def test_batch_past_the_grace_period_is_cut_and_stays_pending(
    r: Redis, redis_url: str
) -> None:
    ctx = make_ctx(redis_url, shutdown_grace_s=0.2)
    worker = Worker(ctx, without=QUIET)
    gate = Gate(worker.consumer.processor)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            entry = await send(r, PODS, {"request_id": "g2", "event": "heartbeat", "pod_id": "x"})
            await gate.entered.wait()
            worker.stop()  # the gate never opens: the grace period runs out
    [held] = await r.xpending_range(PODS, GROUP, "-", "+", 10)
    assert (held["message_id"], held["consumer"]) == (entry, ctx.worker_id)
    assert await r.exists(KEYS.reply("g2")) == 0


async def test_one_failing_message_is_dead_lettered_and_the_batch_goes_on(
    r: Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = make_ctx(redis_url)
    await ctx.cache.refresh()
    await ensure_groups(r, KEYS.all_input_streams)
    real_prepare = ctx.state.prepare

    def prepare(msg: Any, *args: Any, **kw: Any) -> Any:
        if getattr(msg, "call_id", None) == "boom":
            raise KeyError("a bug meeting one message")
        return real_prepare(msg, *args, **kw)

    monkeypatch.setattr(ctx.state, "prepare", prepare)
    for rid, call in (("ok1", "c1"), ("bad", "boom"), ("ok2", "c2")):
        await send(r, RELEASE, {"request_id": rid, "call_id": call})
    read = await r.xreadgroup(GROUP, "me", {RELEASE: ">"}, count=10)
    before = _sample("tierpool_dead_letters_total", stream="release", reason="internal_error")
    statuses = await Processor(ctx).process(parse_read(read))
    assert statuses == ["not_found", "invalid", "not_found"]
    assert (await reply(r, "bad"))["error"].startswith("internal error: KeyError")
    assert (
        _sample("tierpool_dead_letters_total", stream="release", reason="internal_error")
        == before + 1
    )
    assert await settled(r)
    await ctx.redis.aclose()


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_trim_point_never_passes_pending_or_undelivered_entries(r: Redis) -> None:
    stream = RELEASE
    ids = []
    async with r.pipeline(transaction=False) as pipe:
        for i in range(1000):
            pipe.xadd(stream, {"i": str(i)})
        ids = await pipe.execute()
    await ensure_groups(r, [stream])
    await r.xreadgroup(GROUP, "c", {stream: ">"}, count=800)  # 800..999 undelivered
    await r.xack(stream, GROUP, *ids[:450])  # 450..799 pending
    await trim_streams(r, [stream], backlog_warn=10**6)
    kept = [e for e, _ in await r.xrange(stream)]
    assert kept[-550:] == ids[450:] and len(kept) < 1000
    await r.xack(stream, GROUP, *ids[450:800])  # nothing pending: up to the last delivered
    await trim_streams(r, [stream], backlog_warn=10**6)
    kept = [e for e, _ in await r.xrange(stream)]
    assert kept[-201:] == ids[799:] and len(kept) < 500


async def test_tidy_removes_only_silent_consumers_that_own_nothing(
    r: Redis, redis_url: str
) -> None:
    ctx = make_ctx(redis_url)
    await ensure_groups(r, KEYS.all_input_streams)
    await send(r, DRAIN, {"x": "1"})
    await r.xreadgroup(GROUP, "holder", {DRAIN: ">"})  # owns one pending entry
    await r.xgroup_createconsumer(DRAIN, GROUP, "idle")
    claimer = Claimer(ctx, consumer_gc_idle_ms=100)

    async def removed_one() -> bool:
        return bool(await claimer.tidy_consumers())

    await wait_for(removed_one, timeout_s=5, interval_s=0.05)
    names = [c["name"] for c in await r.xinfo_consumers(DRAIN, GROUP)]
    assert names == ["holder"]
    await ctx.redis.aclose()


async def test_removing_a_consumer_that_just_read_keeps_it_and_its_entries(r: Redis) -> None:
    """The owns-nothing check and the delete are one script: a consumer that
    read an entry after the idle check is kept, and the entry stays pending."""
    await ensure_groups(r, [DRAIN])
    entry = await send(r, DRAIN, {"x": "1"})
    await r.xreadgroup(GROUP, "late", {DRAIN: ">"})  # as if it read after the idle check
    await r.xgroup_createconsumer(DRAIN, GROUP, "empty")
    assert await remove_consumers(r, [(DRAIN, "late"), (DRAIN, "empty")]) == [(DRAIN, "empty")]
    [held] = await r.xpending_range(DRAIN, GROUP, "-", "+", 10)
    assert (held["message_id"], held["consumer"]) == (entry, "late")


async def test_an_outage_is_logged_once_not_per_attempt(caplog: pytest.LogCaptureFixture) -> None:
    outage = Outage()
    with caplog.at_level(logging.INFO, logger="tierpool.workers.streams"):
        for _ in range(4):
            await outage.backoff(ConnectionError("refused"), "reading")
        outage.ok()
        outage.ok()
    messages = [rec.getMessage() for rec in caplog.records]
    assert len([m for m in messages if "unavailable" in m]) == 1
    assert len([m for m in messages if "available again" in m]) == 1


async def test_outage_log_names_the_error_type(caplog: pytest.LogCaptureFixture) -> None:
    """Regression (issue 14.15): an error with an empty message was logged as its
    message alone (nothing), not as its type."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from tierpool.workers.streams import Outage

    with caplog.at_level(logging.WARNING, "tierpool.workers.streams"), anyio.move_on_after(0.01):
        await Outage().backoff(RedisConnectionError(), "reading")
    (line,) = [r.getMessage() for r in caplog.records]
    assert "reading: ConnectionError" in line
