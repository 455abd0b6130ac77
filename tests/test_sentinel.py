"""Redis Sentinel: the primary is killed under load and the Sentinels promote its replica.

The fixture starts a primary, its replica and three Sentinels (quorum 2,
``down-after-milliseconds`` 1 s). Worker processes, one client and pod
agents reach Redis only through ``REDIS_SENTINELS``; nothing is restarted
or re-pointed by hand after the kill. What a user would notice is checked
from the client's side: when allocations succeed again, whether an
exclusive pod was ever handed to a second call while the first still held
it, and whether the calls the client still holds are known to Redis.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import msgspec
import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import SSLConnection
from redis.asyncio.sentinel import SentinelManagedSSLConnection

from tests.conftest import wait_for
from tests.invariants import violations
from tests.loadharness import CallLoad
from tests.procs import KEYS, NAMESPACE, WorkerPool
from tierpool.client.client import TierpoolClient
from tierpool.client.podagent import PodAgent
from tierpool.connect.redisconn import connect
from tierpool.core.clock import monotonic_s
from tierpool.core.redistarget import RedisTarget
from tierpool.core.settings import Settings
from tierpool.core.tierconfig import parse_tier_config
from tierpool.workers.redisfarm import MASTER_NAME, SentinelSetup

pytestmark = [pytest.mark.anyio]

TIER_CONFIG = {
    "gold": {"type": "exclusive", "target": 3},
    "basic": {"type": "shared", "target": 2, "max_concurrent": 4},
}
PODS = 5
LOOPS = 6
LONG_LOOPS = 3
TIMEOUT_S = 1.0
RECOVERY_LIMIT_S = 15.0


@pytest.fixture
def sentinel_setup() -> Iterator[SentinelSetup]:
    with SentinelSetup(down_after_ms=1_000) as setup:
        yield setup


@pytest.fixture
def target(sentinel_setup: SentinelSetup) -> RedisTarget:
    return RedisTarget(sentinel_setup.url, sentinel_setup.sentinels.split(","), MASTER_NAME)


@pytest.fixture
async def sr(target: RedisTarget) -> AsyncIterator[Redis]:
    client = connect(target)
    try:
        yield client
    finally:
        await client.aclose()


def test_settings_read_the_sentinels(env_clean: pytest.MonkeyPatch) -> None:
    env = {
        "REDIS_URL": "rediss://:pw@ignored:1/2?ssl_ca_certs=/ca.pem",
        "REDIS_SENTINELS": " s1:26379, [::1]:26380 ",
    }
    target = Settings.from_env(env).redis_target
    assert target.sentinels == ("s1:26379", "[::1]:26380")
    assert target.sentinel_master == "mymaster"
    assert target.sentinel_addresses() == [("s1", 26379), ("::1", 26380)]
    assert Settings.from_env({**env, "REDIS_SENTINEL_MASTER": "pool"}).redis_target == (
        RedisTarget(env["REDIS_URL"], ("s1:26379", "[::1]:26380"), "pool")
    )
    for bad in ("s1", "s1:0", "s1:port", ":26379"):
        with pytest.raises(Exception, match="REDIS_SENTINELS"):
            Settings.from_env({"REDIS_SENTINELS": bad})


async def test_connect_follows_the_master_the_sentinels_name(
    sentinel_setup: SentinelSetup, sr: Redis
) -> None:
    """Credentials and database from the URL, host from the Sentinels; a failover is followed."""
    await sr.set("k", "1")
    assert (await sr.info("server"))["tcp_port"] == sentinel_setup.primary.port
    t_kill = monotonic_s()
    await anyio.to_thread.run_sync(lambda: sentinel_setup.primary.stop(kill=True))

    async def written() -> bool:
        try:
            await sr.set("k2", "2")
        except (ConnectionError, OSError, Exception):
            return False
        return True

    await wait_for(written, timeout_s=RECOVERY_LIMIT_S, interval_s=0.1)
    assert (await sr.info("server"))["tcp_port"] == sentinel_setup.replica.port
    print(f"\n[sentinel] plain client writes again {monotonic_s() - t_kill:.2f}s after the kill")


@pytest.mark.slow
async def test_primary_killed_under_load(
    sentinel_setup: SentinelSetup, target: RedisTarget, sr: Redis, tmp_path: Path
) -> None:
    env = {
        "TIER_CONFIG": msgspec.json.encode(TIER_CONFIG).decode(),
        "POD_TTL": "10s",  # longer than a failover, as the 15 s default
        "TIERPOOL_HEARTBEAT": "250ms",
        "REDIS_SENTINELS": ",".join(target.sentinels),
        "REDIS_SENTINEL_MASTER": target.sentinel_master,
    }
    with WorkerPool(target.url, tmp_path, env=env) as pool:
        workers = await pool.start(sr, 2)
        async with (
            TierpoolClient.from_url(target, namespace=NAMESPACE) as c,
            anyio.create_task_group() as tg,
        ):
            agents = {
                f"pod{i}": PodAgent(c, f"pod{i}", f"http://pod{i}:8080", heartbeat_s=0.25)
                for i in range(PODS)
            }
            for agent in agents.values():
                await tg.start(agent.run)
            load = CallLoad(c, agents, give_up_s=RECOVERY_LIMIT_S + 10)
            d = await load.through(
                lambda: sentinel_setup.primary.stop(kill=True),
                sr,
                KEYS,
                loops=LOOPS,
                long_loops=LONG_LOOPS,
                recovery_limit_s=RECOVERY_LIMIT_S,
            )
            promoted = sentinel_setup.master_port()
            for agent in agents.values():
                tg.start_soon(agent.shutdown, 2.0)
        assert all(w.alive() for w in workers), "a worker died instead of following the failover"
        now_ms = int((await sr.time())[0]) * 1000
        config = parse_tier_config(msgspec.json.encode(TIER_CONFIG).decode(), version=1)
        broken = await violations(sr, KEYS, config, now_ms=now_ms, pod_ttl_ms=10_000)

    print(
        f"\n[sentinel failover] primary killed under load; allocations resumed "
        f"{d.recovery_s:.2f}s after the kill (new master port {promoted}, replica "
        f"{sentinel_setup.replica.port}); {load.timeouts} request timeouts resent, "
        f"{len(load.unanswered)} never answered; "
        f"{len(d.held_at_kill)} calls live at the kill, {len(d.holding)} still held 1s after the "
        f"first allocation, {len(d.forgotten)} of them unknown to Redis; "
        f"client reconnects {c.stats.reconnects}; "
        f"double-booked {len(load.double_booked)}"
    )
    assert promoted == sentinel_setup.replica.port
    assert d.recovery_s < RECOVERY_LIMIT_S
    assert load.unanswered == [], load.unanswered
    assert load.double_booked == [], load.double_booked
    assert d.forgotten == [], d.forgotten
    assert broken == [], broken


async def test_sentinel_connections_take_the_urls_credentials_and_tls() -> None:
    """The master gets the URL's password, database and TLS; the Sentinels only its TLS."""
    url = "rediss://:pw@ignored:1/3?ssl_ca_certs=/ca.pem&socket_timeout=7"
    r = connect(RedisTarget(url, ("127.0.0.1:26379",)))
    try:
        pool = r.connection_pool
        assert issubclass(pool.connection_class, SentinelManagedSSLConnection)
        kw = pool.connection_kwargs
        assert (kw["password"], kw["db"], kw["ssl_ca_certs"]) == ("pw", 3, "/ca.pem")
        assert kw["socket_timeout"] == 7  # the URL's own options win
        (sentinel,) = r._sentinel.sentinels  # type: ignore[attr-defined]
        skw = sentinel.connection_pool.connection_kwargs
        assert skw["ssl_ca_certs"] == "/ca.pem" and skw["password"] is None
        assert issubclass(sentinel.connection_pool.connection_class, SSLConnection)
    finally:
        await r.aclose()
