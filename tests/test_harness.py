"""The harness itself: a private server, clean per test, restartable."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from tierpool.workers.redisproc import RedisProcess


@pytest.mark.anyio
async def test_private_server_is_not_6379_and_starts_clean(
    redis_server: RedisProcess, r: aioredis.Redis
) -> None:
    assert redis_server.port != 6379
    assert await r.dbsize() == 0
    await r.set("tp:{t}:probe", "1")
    assert await r.get("tp:{t}:probe") == "1"


@pytest.mark.anyio
async def test_restart_loses_data_and_answers_again(
    redis_server: RedisProcess, r: aioredis.Redis
) -> None:
    await r.set("tp:{t}:probe", "1")
    redis_server.restart()
    assert await r.get("tp:{t}:probe") is None
    assert await r.ping()
