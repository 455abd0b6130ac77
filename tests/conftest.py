"""Test harness: a private redis-server per session, a clean database per test.

The server runs on a free loopback port (never 6379) without persistence and
is ours alone, so wiping it between tests harms nobody. ``redis_server``
exposes ``restart()`` for crash tests.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tierpool.connect.redisconn import connect
from tierpool.workers.fakeserver import FakeRedisServer
from tierpool.workers.redisproc import RedisProcess

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def process_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child tierpool process, less anything that
    would point it at another Redis or namespace (``REDIS_*``, ``TIERPOOL_*``,
    ``METRICS_PORT``), plus ``extra``."""
    keep = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("REDIS_", "TIERPOOL_")) and k != "METRICS_PORT"
    }
    return {**keep, **extra}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisProcess]:
    """One private redis-server for the whole session."""
    server = RedisProcess()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_url(redis_server: RedisProcess) -> Iterator[str]:
    """URL of a clean database on the private server (restarted if a test killed it)."""
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()
    import redis as syncredis

    with syncredis.Redis.from_url(redis_server.url) as r:
        r.flushall()
        r.script_flush()
    yield redis_server.url


@pytest.fixture
async def r(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """An asyncio client on the clean database; closed after the test."""
    client = connect(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


async def wait_for(
    predicate: Callable[[], Awaitable[bool]], timeout_s: float = 10.0, interval_s: float = 0.02
) -> None:
    """Poll ``predicate`` until it holds; fail the test with a clear message if it never does."""
    import anyio

    with anyio.fail_after(timeout_s):
        while not await predicate():  # noqa: ASYNC110 - polling is the point here
            await anyio.sleep(interval_s)


@pytest.fixture
def env_clean(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Remove every tierpool-relevant variable from the environment for the test."""
    for name in list(os.environ):
        if name.startswith(("TIERPOOL_", "TIER_CONFIG", "GATEWAY_")) or name in {
            "REDIS_URL",
            "LEASE_TTL",
            "DRAINING_TTL",
            "CLEANUP_INTERVAL",
            "RECONCILE_INTERVAL",
            "CALL_INFO_TTL",
            "METRICS_PORT",
            "HTTP_PORT",
            "HTTP_READ_TIMEOUT",
            "HTTP_WRITE_TIMEOUT",
            "HTTP_IDLE_TIMEOUT",
            "HTTP_SHUTDOWN_TIMEOUT",
            "TWILIO_AUTH_TOKEN",
            "PLIVO_AUTH_TOKEN",
            "EXOTEL_BASIC_AUTH",
            "METRICS_HOST",
            "LOG_LEVEL",
            "LOG_FORMAT",
            "VOICE_AGENT_BASE_URL",
            "POD_TTL",
            "REPLY_TTL",
        }:
            monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture(scope="session")
def fake_server() -> Iterator[FakeRedisServer]:
    """One fakeredis TCP server (``tierpool run``'s fallback) for the session."""
    server = FakeRedisServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(params=["redis", "fakeredis"])
def backend_url(request: pytest.FixtureRequest, env_clean: pytest.MonkeyPatch) -> Iterator[str]:
    """A clean database on each backend in turn: real Redis, then fakeredis.

    For the conformance tests: the flows a first user meets on ``tierpool run``
    must behave the same on both."""
    if request.param == "redis":
        url: str = request.getfixturevalue("redis_url")
    else:
        fake: FakeRedisServer = request.getfixturevalue("fake_server")
        import redis as syncredis

        with syncredis.Redis.from_url(fake.url) as r:
            r.flushall()
        url = fake.url
    yield url
