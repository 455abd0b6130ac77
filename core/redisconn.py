"""The one way tierpool opens a Redis connection.

Every client retries a dropped connection a few times with jittered backoff,
so a Redis restart costs a retry, not a crash. Blocking reads set their own
per-call timeouts below ``socket_timeout`` (redis-py #3138: a blocking read
longer than the socket timeout raises), so the socket timeout here is long.
"""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

SOCKET_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 5.0
RETRIES = 3


def connect(url: str, *, client_name: str | None = None, max_connections: int = 64) -> Redis:
    """An asyncio client with ``decode_responses=True`` and connection retries."""
    return Redis.from_url(
        url,
        decode_responses=True,
        # A producer may XADD bytes that are not UTF-8: decoding them must not
        # raise inside redis-py's reply parser (that would stop every read of
        # the batch); they arrive with U+FFFD and are dead-lettered as invalid.
        encoding_errors="replace",
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), RETRIES),
        retry_on_error=[RedisConnectionError, RedisTimeoutError, ConnectionResetError],
        health_check_interval=15,
        client_name=client_name,
        max_connections=max_connections,
    )
