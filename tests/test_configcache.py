"""The config cache: bootstrap, pub/sub invalidation, safety re-reads, reconnects."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import anyio
import msgspec
import pytest
from redis.asyncio import Redis

from tests.conftest import wait_for
from tierpool.connect.redisconn import connect
from tierpool.core.configcache import ConfigCache
from tierpool.core.errors import InvalidMessage, TierConfigError
from tierpool.core.keys import Keys
from tierpool.core.settings import Settings
from tierpool.core.snapshot import ConfigSnapshot
from tierpool.core.state import PoolState
from tierpool.core.tierconfig import parse_tier_config, to_json
from tierpool.schemas import (
    AllocateRequest,
    ConfigRequest,
    MerchantPolicy,
    PodRegister,
    decode_request,
)
from tierpool.workers.redisproc import RedisProcess

pytestmark = pytest.mark.anyio

KEYS = Keys("t")
LONG = "1h"  # a resync period that never comes during a test
GOLD = '{"gold": {"type": "exclusive", "target": 2}}'

CacheFactory = Callable[..., Awaitable[ConfigCache]]


def make_settings(**env: str) -> Settings:
    base = {
        "TIERPOOL_NAMESPACE": "t",
        "TIER_CONFIG": GOLD,
        "TIERPOOL_CONFIG_RESYNC": LONG,
        "TIERPOOL_MERCHANT_CACHE_TTL": LONG,
    }
    return Settings.from_env({**base, **env})


@pytest.fixture
async def caches(redis_url: str) -> AsyncIterator[CacheFactory]:
    """Factory of caches, each on its own client (as in separate workers); closes them."""
    clients: list[Redis] = []

    async def make(env: Mapping[str, str] | None = None, **kw: object) -> ConfigCache:
        client = connect(redis_url)
        clients.append(client)
        return ConfigCache(client, KEYS, make_settings(**dict(env or {})), **kw)  # type: ignore[arg-type]

    try:
        yield make
    finally:
        for client in clients:
            await client.aclose()


@asynccontextmanager
async def running(*caches: ConfigCache) -> AsyncIterator[None]:
    """Run each cache's listener (started = subscribed and loaded) for the block."""
    async with anyio.create_task_group() as tg:
        for cache in caches:
            await tg.start(cache.run)
        yield
        tg.cancel_scope.cancel()


def running_soon(cache: ConfigCache) -> AbstractAsyncContextManager[None]:
    """Run a cache's listener without waiting for it to start (Redis may be down)."""

    @asynccontextmanager
    async def ctx() -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            tg.start_soon(cache.run)
            yield
            tg.cancel_scope.cancel()

    return ctx()


async def write_silently(r: Redis, config: str, version: int) -> None:
    """Change the config in Redis without a pub/sub message: a lost notification."""
    cfg = parse_tier_config(config, version=version)
    await r.mset({KEYS.config: to_json(cfg), KEYS.config_version: str(version)})


class Health:
    subscribed = False
    config_loaded = False


# --- bootstrap -----------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        '{"tiers": {"gold": {"type": "exclusive", "target": 2}}, "default_chain": ["gold"]}',
        '{"gold": {"type": "exclusive", "target": 2}, "basic": {"type": "shared", "target": 1}}',
        '{"gold": 2, "standard": 3}',
    ],
    ids=["structured", "flat", "integer-map"],
)
async def test_bootstrap_writes_the_env_config_when_redis_has_none(
    r: Redis, caches: CacheFactory, raw: str
) -> None:
    cache = await caches({"TIER_CONFIG": raw})
    snap = await cache.refresh()
    expected = parse_tier_config(raw, version=1)
    assert snap.config == expected
    assert await r.get(KEYS.config) == to_json(expected)
    assert await r.get(KEYS.config_version) == "1"


async def test_redis_config_wins_over_the_env(r: Redis, caches: CacheFactory) -> None:
    await write_silently(r, '{"silver": 4}', version=7)
    cache = await caches()
    assert cache.current().config.pools == ("gold",)  # env until loaded
    snap = await cache.refresh()
    assert (snap.version, snap.config.pools) == (7, ("silver",))
    assert await r.get(KEYS.config_version) == "7"
    assert "gold" not in (await r.get(KEYS.config) or "")


async def test_started_means_subscribed_and_loaded(r: Redis, caches: CacheFactory) -> None:
    health = Health()
    cache = await caches(health=health)
    seen: list[int] = []
    cache.on_change.append(lambda s: seen.append(s.version))
    async with running(cache):
        assert health.subscribed and health.config_loaded and seen == [1]
        state = PoolState(r, KEYS, cache.settings, cache)
        out = await state.apply(ConfigRequest(request_id="c", config='{"silver": 1}'))
        assert out.status == "applied"
        await cache.wait_for_version(2, timeout_s=2)
        assert seen == [1, 2]
    assert not health.subscribed


async def test_bad_stored_config_keeps_the_snapshot_and_logs_once(
    r: Redis, caches: CacheFactory, caplog: pytest.LogCaptureFixture
) -> None:
    cache = await caches()
    async with running(cache):
        await r.mset({KEYS.config: '{"gold": {"type": "shard"', KEYS.config_version: "2"})
        before = cache.reads
        for _ in range(3):
            await r.publish(KEYS.config_changed, "2")
            await wait_for(lambda n=cache.reads: _true(cache.reads > n))
        assert cache.reads >= before + 3
        assert cache.current().version == 1
        with pytest.raises(TierConfigError):
            await cache.refresh()  # a caller is told; the snapshot in hand stays
        assert cache.current().config.pools == ("gold",)
        bad = [rec for rec in caplog.records if "stored tier config ignored" in rec.getMessage()]
        assert len(bad) == 1, [rec.getMessage() for rec in bad]
        await write_silently(r, '{"silver": 1}', version=3)
        await r.publish(KEYS.config_changed, "3")
        assert (await cache.wait_for_version(3, timeout_s=2)).config.pools == ("silver",)


async def _true(value: bool) -> bool:
    return value


# --- invalidation and its safety nets ------------------------------------------


async def test_a_missed_message_is_recovered_by_the_safety_read(
    r: Redis, caches: CacheFactory
) -> None:
    quick = await caches({"TIERPOOL_CONFIG_RESYNC": "300ms"})
    control = await caches()  # same, but its safety read never comes during the test
    async with running(quick, control):
        await write_silently(r, '{"silver": 1}', version=2)
        await quick.wait_for_version(2, timeout_s=3)
        assert control.version == 1


async def test_merchant_cache_ttl_also_bounds_the_safety_read(
    r: Redis, caches: CacheFactory
) -> None:
    cache = await caches({"TIERPOOL_MERCHANT_CACHE_TTL": "300ms"})
    assert cache.resync_s == pytest.approx(0.3)
    async with running(cache):
        await r.hset(KEYS.merchants, "m1", '{"zone": "restricted"}')
        await r.set(KEYS.merchants_version, "1")
        snap = await cache.wait_until(lambda s: s.merchants_version == 1, timeout_s=3)
        assert snap.merchants["m1"] == MerchantPolicy(zone="restricted")


async def test_pubsub_reconnect_rereads_at_once(r: Redis, caches: CacheFactory) -> None:
    health = Health()
    cache = await caches(health=health)
    async with running(cache):
        await write_silently(r, '{"silver": 1}', version=2)
        assert cache.version == 1  # no message: nothing tells the cache
        killed = await r.client_kill_filter(_type="pubsub")
        assert killed >= 1
        await cache.wait_for_version(2, timeout_s=3)
        await wait_for(lambda: _true(health.subscribed), timeout_s=3)
        # and it listens again
        await write_silently(r, '{"bronze": 1}', version=3)
        await r.publish(KEYS.config_changed, "3")
        await cache.wait_for_version(3, timeout_s=2)


async def test_an_unanswered_ping_counts_as_a_dropped_connection(
    r: Redis, caches: CacheFactory
) -> None:
    """Guards against redis-py #2417: a silent pub/sub connection is never noticed."""
    cache = await caches(ping_interval_s=0.2)
    async with running(cache):
        await write_silently(r, '{"silver": 1}', version=2)
        reads = cache.reads
        await r.execute_command("CLIENT", "PAUSE", "800", "ALL")  # nothing answers meanwhile
        await cache.wait_for_version(2, timeout_s=5)
        assert cache.reads > reads


async def test_a_burst_of_messages_costs_a_few_reads(r: Redis, caches: CacheFactory) -> None:
    cache = await caches()
    async with running(cache):
        await r.hset(KEYS.merchants, "m1", '{"zone": "restricted"}')
        await r.set(KEYS.merchants_version, "200")
        before, heard = cache.reads, cache.messages
        async with r.pipeline(transaction=False) as pipe:
            for n in range(1, 201):
                pipe.publish(KEYS.config_changed, f"merchants:{n}")
            await pipe.execute()
        await wait_for(lambda: _true(cache.messages == heard + 200), timeout_s=3)
        await cache.wait_until(lambda s: s.merchants_version == 200, timeout_s=2)
        assert cache.reads - before <= 5, cache.reads - before


async def test_redis_down_at_start_keeps_the_env_config_then_recovers(
    redis_server: RedisProcess,
    redis_url: str,
    caches: CacheFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    health = Health()
    cache = await caches(health=health)
    redis_server.stop()
    try:
        async with running_soon(cache):
            await wait_for(
                lambda: _true(any("config listener" in rec.getMessage() for rec in caplog.records)),
                timeout_s=5,
            )
            assert cache.current().config.pools == ("gold",)
            assert cache.version == 1 and not health.config_loaded and not health.subscribed
            redis_server.start()
            await wait_for(lambda: _true(health.config_loaded and health.subscribed), 10)
            r = connect(redis_url)
            try:
                assert await r.get(KEYS.config_version) == "1"  # bootstrapped
                state = PoolState(r, KEYS, cache.settings, cache)
                out = await state.apply(ConfigRequest(request_id="c", config='{"silver": 1}'))
                assert out.status == "applied"
                await cache.wait_for_version(2, timeout_s=2)
            finally:
                await r.aclose()
    finally:
        if redis_server.proc is None:
            redis_server.start()
    listener_logs = [rec for rec in caplog.records if "config listener" in rec.getMessage()]
    assert len(listener_logs) <= 3  # once per distinct error, not once per retry


async def test_data_loss_bootstraps_past_the_version_held(
    redis_server: RedisProcess, r: Redis, caches: CacheFactory
) -> None:
    await write_silently(r, '{"silver": 1}', version=5)
    cache = await caches()
    async with running(cache):
        assert cache.version == 5
        redis_server.restart()
        snap = await cache.wait_for_version(6, timeout_s=10)
        assert snap.config.pools == ("gold",)  # TIER_CONFIG again, under a new number
        assert await r.get(KEYS.config_version) == "6"


async def test_never_goes_backwards_and_moves_redis_past_what_it_held(
    r: Redis, caches: CacheFactory
) -> None:
    await write_silently(r, '{"silver": 1}', version=5)
    cache = await caches()
    assert (await cache.refresh()).version == 5
    # Redis went back (a failover that lost writes, a restored backup)
    await write_silently(r, '{"bronze": 1}', version=3)
    snap = await cache.refresh()
    assert (snap.version, snap.config.pools) == (5, ("silver",))
    # Redis's content won, under a number past any this worker used
    assert await r.get(KEYS.config_version) == "6"
    snap = await cache.refresh()
    assert (snap.version, snap.config.pools) == (6, ("bronze",))


async def test_same_version_with_other_content_is_not_taken_as_the_same(
    r: Redis, caches: CacheFactory
) -> None:
    await write_silently(r, '{"silver": 1}', version=4)
    cache = await caches()
    await cache.refresh()
    await write_silently(r, '{"bronze": 1}', version=4)
    assert (await cache.refresh()).config.pools == ("silver",)
    snap = await cache.refresh()
    assert (snap.version, snap.config.pools) == (5, ("bronze",))


async def test_concurrent_refreshes_share_one_read(r: Redis, caches: CacheFactory) -> None:
    cache = await caches()
    await cache.refresh()
    before = cache.reads
    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(cache.refresh)
    assert cache.reads - before <= 2


# --- merchant policies and secrets ----------------------------------------------

DEDICATED = '{"tiers": {"gold": 1, "vip": 1}, "default_chain": ["gold"]}'


async def test_merchant_policy_set_changed_removed_is_seen_by_another_cache(
    r: Redis, caches: CacheFactory
) -> None:
    writer = await caches({"TIER_CONFIG": DEDICATED})
    reader = await caches({"TIER_CONFIG": DEDICATED})
    async with running(writer, reader):
        state = PoolState(r, KEYS, writer.settings, writer)

        async def policy(rid: str, p: MerchantPolicy | None) -> ConfigSnapshot:
            msg = ConfigRequest(
                request_id=rid, merchant_id="m1", merchant=p, remove_merchant=p is None
            )
            assert (await state.apply(msg)).status == "applied"
            mv = int(await r.get(KEYS.merchants_version) or 0)
            return await reader.wait_until(lambda s: s.merchants_version == mv, timeout_s=2)

        snap = await policy("p1", MerchantPolicy(pool="vip"))
        assert snap.merchants["m1"] == MerchantPolicy(pool="vip")
        assert snap.owner_of("vip") == "m1"
        snap = await policy("p2", MerchantPolicy(pool="vip", zone="restricted", min_capability=2))
        assert snap.merchants["m1"].zone == "restricted"
        snap = await policy("p3", None)
        assert "m1" not in snap.merchants and snap.owner_of("vip") is None


async def test_secrets_are_never_stored_nor_logged(
    r: Redis, caches: CacheFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "sk-live-0123456789"
    cache = await caches({"TIER_CONFIG": DEDICATED})
    async with running(cache):
        state = PoolState(r, KEYS, cache.settings, cache)
        with pytest.raises(InvalidMessage) as bad:
            decode_request(
                "config",
                {
                    "request_id": "s1",
                    "merchant_id": "m1",
                    "merchant": f'{{"pool": "vip", "api_key": "{secret}"}}',
                },
            )
        assert "api_key" in str(bad.value) and secret not in str(bad.value)
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert({"pool": "vip", "api_key": secret}, MerchantPolicy)
        ok = await state.apply(
            ConfigRequest(request_id="s2", merchant_id="m1", merchant=MerchantPolicy(pool="vip"))
        )
        assert ok.status == "applied"
        assert msgspec.json.decode(await r.hget(KEYS.merchants, "m1") or "") == {"pool": "vip"}
        await cache.wait_until(lambda s: "m1" in s.merchants, timeout_s=2)
        # written behind tierpool's back: that policy is unreadable (only m2's
        # requests are refused, issue 12 item 5), the secret not echoed
        await r.hset(KEYS.merchants, "m2", f'{{"zone": "open", "api_key": "{secret}"}}')
        await r.incr(KEYS.merchants_version)
        await r.publish(KEYS.config_changed, "merchants:99")
        await cache.wait_until(lambda s: "m2" in s.unreadable, timeout_s=2)
        assert "m2" not in cache.current().merchants
        assert "m1" in cache.current().merchants
        assert secret not in cache.current().unreadable["m2"]
    for key in await r.keys("*"):
        kind = await r.type(key)
        dump = (
            str(await r.hgetall(key))
            if kind == "hash"
            else str(await r.get(key))
            if kind == "string"
            else ""
        )
        assert secret not in dump or key == KEYS.merchants
    assert all(secret not in rec.getMessage() for rec in caplog.records)
    # Policies are counted in the log, never printed (issue 14.15).
    assert any(
        "merchants version" in rec.getMessage() and "1 policy" in rec.getMessage()
        for rec in caplog.records
    )


# --- the version guard ------------------------------------------------------------


async def test_a_stale_workers_allocation_is_refused_and_it_refreshes(
    r: Redis, caches: CacheFactory
) -> None:
    """No allocation is ever made on a config version older than Redis's."""
    live = await caches()
    stale = await caches()  # never listens: its invalidation is suppressed
    await stale.refresh()
    refreshes: list[int] = []
    refresh = stale.refresh

    async def counted() -> ConfigSnapshot:
        snap = await refresh()
        refreshes.append(snap.version)
        return snap

    stale.refresh = counted  # type: ignore[method-assign]
    async with running(live):
        a = PoolState(r, KEYS, live.settings, live)
        b = PoolState(r, KEYS, stale.settings, stale)
        reg = await a.apply(PodRegister(request_id="r0", pod_id="p0", endpoint="http://p0"))
        assert reg.fields["pool"] == "gold"
        out = await a.apply(ConfigRequest(request_id="c", config='{"silver": 1}'))
        assert out.status == "applied"
        await live.wait_for_version(2, timeout_s=2)
        reg = await a.apply(PodRegister(request_id="r1", pod_id="p1", endpoint="http://p1"))
        assert reg.fields["pool"] == "silver"
        assert stale.version == 1  # still believes in gold
        got = await b.apply(AllocateRequest(request_id="x", call_id="c1"))
        assert (got.status, got.fields["pool"], got.fields["pod_id"]) == (
            "allocated",
            "silver",
            "p1",
        )
        assert refreshes == [2]  # refused once as stale, then run on version 2
        assert await r.hget(KEYS.pod_pool, "p0") == ""


async def test_start_says_when_tier_config_is_ignored_and_keeps_policies_out(
    caches: CacheFactory, r: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression (issue 14.15): nothing said that TIER_CONFIG was ignored because
    Redis already held a config, and the start-up line printed every merchant
    policy (a namespace may hold thousands)."""
    first = await caches()
    await first.refresh()
    await r.hset(KEYS.merchants, "m-secretive", '{"zone":"restricted"}')
    await r.incr(KEYS.merchants_version)
    with caplog.at_level(logging.INFO, "tierpool.core.configcache"):
        same = await caches()
        await same.refresh()
        assert "ignored" not in caplog.text  # same content: nothing to say
        other = await caches({"TIER_CONFIG": '{"silver": {"type": "exclusive"}}'})
        snap = await other.refresh()
    assert snap.config.pools == ("gold",)
    (warning,) = [r for r in caplog.records if "TIER_CONFIG is set but ignored" in r.message]
    assert "tierpool config set" in warning.message and KEYS.config in warning.message
    serving = [r.message for r in caplog.records if r.message.startswith("serving")]
    assert any("1 policy" in m for m in serving), serving
    assert not any("m-secretive" in m for m in serving), serving
