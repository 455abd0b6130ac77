"""The upstream tier config source: fetched over HTTP, applied through the config stream."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anyio
import msgspec
import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from tests.conftest import wait_for
from tierpool.core import upstream as upstream_module
from tierpool.core.configcache import ConfigCache
from tierpool.core.keys import GROUP, Keys
from tierpool.core.settings import Settings
from tierpool.core.snapshot import ConfigSnapshot
from tierpool.core.state import Entry, PoolState
from tierpool.core.tierconfig import parse_tier_config, to_json
from tierpool.core.upstream import check_upstream, default_fetch, run_upstream, same_content
from tierpool.schemas import ConfigRequest, decode_request
from tierpool.workers.redisproc import free_port

pytestmark = pytest.mark.anyio

KEYS = Keys("t")
TOKEN = "s3cr3t-token"
UPSTREAM = '{"gold": {"type": "exclusive", "target": 3}, "basic": {"type": "shared", "target": 2}}'


@dataclass
class Upstream:
    """A local HTTP tier config service: what it answers, and how often it was asked."""

    status: int = 200
    body: bytes = UPSTREAM.encode()
    hits: int = 0
    port: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1/tiers/config?token={TOKEN}"


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    state = Upstream()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with state.lock:
                state.hits += 1
                status, body = state.status, state.body
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def make_settings(url: str, **env: str) -> Settings:
    return Settings.from_env(
        {"TIERPOOL_NAMESPACE": "t", "TIER_CONFIG": '{"gold": 1}', "TIER_CONFIG_URL": url, **env}
    )


@dataclass
class World:
    r: Redis
    cache: ConfigCache
    state: PoolState

    async def requests(self) -> list[dict[str, str]]:
        return [f for _, f in await self.r.xrange(KEYS.request_stream("config"))]


async def consume_config_stream(r: Redis, state: PoolState) -> None:
    """A tiny worker: the config stream through PoolState, as the real consumer does."""
    stream = KEYS.request_stream("config")
    while True:
        got = await r.xreadgroup(GROUP, "test-worker", {stream: ">"}, count=10, block=100)
        for _, entries in got or []:
            for entry_id, fields in entries:
                msg = decode_request("config", fields)
                await state.apply(msg, Entry(stream, entry_id))


@pytest.fixture
async def world(r: Redis, upstream: Upstream) -> AsyncIterator[World]:
    try:
        await r.xgroup_create(KEYS.request_stream("config"), GROUP, id="0", mkstream=True)
    except ResponseError as exc:  # pragma: no cover - the database is clean
        if "BUSYGROUP" not in str(exc):
            raise
    cache = ConfigCache(r, KEYS, make_settings(upstream.url))
    await cache.refresh()
    state = PoolState(r, KEYS, cache.settings, cache)
    async with anyio.create_task_group() as tg:
        tg.start_soon(consume_config_stream, r, state)
        yield World(r, cache, state)
        tg.cancel_scope.cancel()


async def test_a_changed_upstream_is_applied_through_the_config_stream(
    world: World, upstream: Upstream
) -> None:
    result = await check_upstream(world.r, KEYS, world.cache.settings, world.cache)
    assert (result.outcome, result.request_id, result.config_version) == (
        "applied",
        "upstream-1",
        2,
    )
    (sent,) = await world.requests()
    assert (sent["request_id"], sent["expected_version"]) == ("upstream-1", "1")
    snap = await world.cache.refresh()
    assert snap.version == 2
    assert same_content(snap.config, parse_tier_config(UPSTREAM))
    assert await world.r.exists(KEYS.reply("upstream-1")) == 0  # read, then deleted
    assert upstream.hits == 1


def large_config(pools: int = 200) -> bytes:
    """A valid tier config well over 16 KB (27 KB canonical at 200 pools)."""
    doc = {
        f"pool-{i:03d}-with-a-longer-name": {"type": "shared", "target": 3, "max_concurrent": 4}
        for i in range(pools)
    }
    return msgspec.json.encode(doc)


async def test_an_upstream_config_over_16_kb_is_applied_once(
    world: World, upstream: Upstream
) -> None:
    """Regression (issue 13 item 7): a valid upstream config over 16 KB was refused
    every period (the config request's ``config`` field hit the 16 KiB field limit)."""
    upstream.body = large_config()
    assert len(to_json(parse_tier_config(upstream.body))) > 16_384
    result = await check_upstream(world.r, KEYS, world.cache.settings, world.cache)
    assert (result.outcome, result.config_version) == ("applied", 2), result
    snap = await world.cache.refresh()
    assert len(snap.config.pools) == 200
    again = await check_upstream(world.r, KEYS, world.cache.settings, world.cache)
    assert again.outcome == "unchanged", again
    assert len(await world.requests()) == 1


async def test_an_upstream_config_over_the_limit_is_refused_before_sending(
    world: World, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(upstream_module, "MAX_CONFIG_BYTES", 20_000)
    upstream.body = large_config()
    result = await check_upstream(world.r, KEYS, world.cache.settings, world.cache)
    assert result.outcome == "invalid" and "larger than 20000 bytes" in result.detail, result
    assert await world.requests() == []


async def test_same_content_sends_no_request(world: World, upstream: Upstream) -> None:
    upstream.body = b'{"tiers": {"gold": {"target": 1}}, "default_chain": ["gold"], "version": 9}'
    result = await check_upstream(world.r, KEYS, world.cache.settings, world.cache)
    assert (result.outcome, result.config_version) == ("unchanged", 1)
    assert await world.requests() == []
    assert await world.r.get(KEYS.upstream_seq) is None


@pytest.mark.parametrize(
    ("status", "body", "outcome"),
    [
        (200, b'{"gold": {"type": "exclusive", "target": 3', "invalid"),
        (200, b'{"gold": {"type": "shard", "target": 3}}', "invalid"),
        (200, b'["gold"]', "invalid"),
        (500, UPSTREAM.encode(), "bad_status"),
        (404, b"", "bad_status"),
    ],
    ids=["bad-json", "bad-type", "not-an-object", "http-500", "http-404"],
)
async def test_a_bad_upstream_changes_nothing(
    world: World, upstream: Upstream, status: int, body: bytes, outcome: str
) -> None:
    upstream.status, upstream.body = status, body
    result = await check_upstream(world.r, KEYS, world.cache.settings, world.cache)
    assert result.outcome == outcome, result
    assert await world.requests() == []
    assert (await world.cache.refresh()).version == 1
    assert upstream.hits == 1


async def test_an_unreachable_upstream_changes_nothing(world: World) -> None:
    url = f"http://127.0.0.1:{free_port()}/tiers"  # nothing listens there
    settings = make_settings(url)
    result = await check_upstream(world.r, KEYS, settings, world.cache)
    assert result.outcome == "unreachable" and "refused" in result.detail.lower(), result
    assert await world.requests() == []
    assert (await world.cache.refresh()).version == 1


async def test_a_concurrent_operator_change_wins(world: World) -> None:
    async def fetch_while_an_operator_changes_the_config(
        url: str, timeout_s: float
    ) -> tuple[int, bytes]:
        out = await world.state.apply(ConfigRequest(request_id="op", config='{"silver": 1}'))
        assert out.status == "applied"
        return await default_fetch(url, timeout_s)

    stale = ConfigCache(world.r, KEYS, world.cache.settings)
    await stale.refresh()

    async def frozen() -> ConfigSnapshot:  # compares with version 1, as a cache a step behind
        return stale.current()

    stale.refresh = frozen  # type: ignore[method-assign]
    result = await check_upstream(
        world.r, KEYS, world.cache.settings, stale, fetch=fetch_while_an_operator_changes_the_config
    )
    assert (result.outcome, result.config_version) == ("conflict", 2), result
    snap = await world.cache.refresh()
    assert (snap.version, snap.config.pools) == (2, ("silver",))


async def test_run_upstream_fetches_only_while_leader_once_per_period(
    world: World, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "tierpool.core.upstream")
    settings = make_settings(upstream.url, TIER_CONFIG_TTL_SECONDS="300ms")
    asked = 0
    leader = False

    def is_leader() -> bool:
        nonlocal asked
        asked += 1
        return leader

    async with anyio.create_task_group() as tg:
        await tg.start(run_upstream, world.r, KEYS, settings, world.cache, is_leader)
        await wait_for(lambda: _true(asked >= 3), timeout_s=5)
        assert upstream.hits == 0  # polled three times, never leader: never fetched
        leader = True
        await world.cache.wait_for_version(2, timeout_s=5)  # fetched and applied
        await wait_for(lambda: _true(upstream.hits >= 3), timeout_s=5)  # once per period
        upstream.status = 503
        hits = upstream.hits
        await wait_for(lambda: _true(upstream.hits >= hits + 2), timeout_s=5)
        tg.cancel_scope.cancel()
    assert len(await world.requests()) == 1  # the same content was not sent again
    assert (await world.cache.refresh()).version == 2
    failures = [rec for rec in caplog.records if "HTTP status 503" in rec.getMessage()]
    assert len(failures) == 1  # logged once, not once per period
    assert all(TOKEN not in rec.getMessage() for rec in caplog.records)
    assert any("token=***" in rec.getMessage() for rec in caplog.records)


async def test_run_upstream_without_a_url_returns(r: Redis) -> None:
    settings = Settings.from_env({"TIERPOOL_NAMESPACE": "t"})
    cache = ConfigCache(r, KEYS, settings)
    with anyio.fail_after(2):
        await run_upstream(r, KEYS, settings, cache, lambda: True)


async def _true(value: bool) -> bool:
    return value
