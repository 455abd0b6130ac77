"""The one way tierpool opens a Redis connection.

Every client retries a dropped connection a few times with jittered backoff,
so a Redis restart costs a retry, not a crash. Blocking reads set their own
per-call timeouts below ``socket_timeout`` (redis-py #3138: a blocking read
longer than the socket timeout raises), so the socket timeout here is long.

Two costs of redis-py's asyncio client are cut here, both measured by
``tierpool bench`` (``bench/README.md``):

- commands are serialised by hiredis (C), not by redis-py's pure-Python
  asyncio packer: packing a batch of 256 script calls of ~60 arguments took
  ~4 ms in Python, two thirds of a worker's time;
- a pipeline made only of ``EVALSHA`` calls (``core.scripts.run_calls``:
  every state transition) reads its replies under one deadline instead of
  arming and cancelling a timer per reply, which was a third of what was
  left. Any other pipeline (transactions, WATCH, other commands and their
  response callbacks) runs as redis-py runs it.

Where Redis is comes in a :class:`RedisTarget`: a URL alone (standalone
Redis), or the URL plus Sentinels. With Sentinels, every connection asks
them for the master's address when it (re)connects, so after a failover
the next reconnect reaches the new master; a connection still open to a
demoted master gets ``READONLY``, which redis-py's Sentinel connection turns
into a connection error (retried like any lost connection). While no
master is known (between the kill and the election) connecting fails with
``MasterNotFoundError``, a ``ConnectionError``: callers see "Redis down",
as for a restart, and back off.
"""

from __future__ import annotations

import math
from typing import Any

import anyio
import hiredis
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import AbstractConnection, ConnectionPool, SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import (
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tierpool.connect.clusterslot import SlotOwner, namespace_slot, slot_pinned
from tierpool.core.redistarget import RedisTarget, on_cluster

SOCKET_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 5.0
RETRIES = 3
SENTINEL_TIMEOUT_S = 1.0
"""Per Sentinel query: a dead Sentinel must not hold up asking the next one."""


class _HiredisPacking(AbstractConnection):
    """Packs commands with ``hiredis.pack_command``; anything it refuses goes the usual way.

    Same bytes as redis-py's packer for str (UTF-8), bytes, int and float.
    A multi-word command name (``CLIENT UNBLOCK``), a lone surrogate (packed
    with ``encoding_errors``), or a type redis-py refuses (``DataError``) is
    left to redis-py.
    """

    def pack_command(self, *args: Any) -> list[bytes]:
        first = args[0] if args else None
        if isinstance(first, str) and " " not in first:
            try:
                return [hiredis.pack_command(args)]
            except (TypeError, UnicodeEncodeError):
                pass
        return super().pack_command(*args)


_PACKING_CLASSES: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def _with_hiredis_packing(cls: type[AbstractConnection]) -> type[AbstractConnection]:
    """``cls`` (plain, TLS or unix socket connection) packing with hiredis; made once."""
    if issubclass(cls, _HiredisPacking):
        return cls
    fast = _PACKING_CLASSES.get(cls)
    if fast is None:
        fast = _PACKING_CLASSES[cls] = type(f"Hiredis{cls.__name__}", (_HiredisPacking, cls), {})
    return fast


async def _exchange(conn: AbstractConnection, commands: list[Any]) -> list[Any]:
    """Write ``commands`` at once, read one reply each under one deadline.

    An error reply takes its command's place, as in a pipeline. Any other
    failure (including cancellation) leaves the connection disconnected by
    redis-py, never half-read.
    """
    await conn.send_packed_command(conn.pack_commands(commands))
    answers: list[Any] = []
    timeout_s = conn.socket_timeout
    try:
        with anyio.fail_after(timeout_s or math.inf):
            for _ in commands:
                try:
                    answers.append(await conn.read_response(timeout=math.inf))
                except ResponseError as exc:
                    answers.append(exc)
    except TimeoutError:
        await conn.disconnect()
        raise RedisTimeoutError(f"no reply to {len(commands)} commands in {timeout_s}s") from None
    return answers


async def _round_trip(pool: ConnectionPool, commands: list[Any]) -> list[Any]:
    conn: AbstractConnection = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        answers: list[Any] = await conn.retry.call_with_retry(
            lambda: _exchange(conn, commands), lambda _error: conn.disconnect()
        )
        return answers
    finally:
        await pool.release(conn)


class _ScriptPipeline(Pipeline):
    """A pipeline that sends a batch of ``EVALSHA`` calls the lean way (see the module doc)."""

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        stack = self.command_stack
        if (
            self.is_transaction
            or self.explicit_transaction
            or self.watching
            or self.scripts
            or self.connection is not None
            or not stack
            or any(args[0] != "EVALSHA" for args, _ in stack)
        ):
            answers: list[Any] = await super().execute(raise_on_error)
            return answers
        try:
            answers = await _round_trip(self.connection_pool, [args for args, _ in stack])
        finally:
            await self.reset()  # type: ignore[no-untyped-call]
        if raise_on_error:
            self.raise_first_error(stack, answers)
        return answers


class _Redis(Redis):
    _sentinel: Sentinel | None = None

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        return _ScriptPipeline(
            self.connection_pool, self.response_callbacks, transaction, shard_hint
        )

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        """Close the connections, and the Sentinel clients when this client made them."""
        try:
            await super().aclose(close_connection_pool)
        finally:
            sentinel, self._sentinel = self._sentinel, None
            if sentinel is not None:
                await sentinel.aclose()


def connect(
    target: str | RedisTarget,
    *,
    client_name: str | None = None,
    max_connections: int = 64,
    retries: int | None = None,
    connect_timeout_s: float | None = None,
    namespace: str | None = None,
) -> Redis:
    """An asyncio client with ``decode_responses=True`` and connection retries.

    ``target`` is a URL (standalone Redis) or a :class:`RedisTarget`
    (``Settings.redis_target``), which may name Sentinels and carries the
    anchor's ``REDIS_MAX_RETRIES`` and ``REDIS_DIAL_TIMEOUT``; ``retries`` and
    ``connect_timeout_s``, when given, override the target's.

    On a Redis Cluster the client serves one ``namespace``: every connection
    goes to the node that serves its slot (``core.clusterslot``). Without a
    namespace, connecting to a cluster fails with a message saying so.
    """
    if isinstance(target, str):
        target = RedisTarget(target, retries=RETRIES, connect_timeout_s=CONNECT_TIMEOUT_S)
    if retries is None:
        retries = target.retries
    if connect_timeout_s is None:
        connect_timeout_s = target.connect_timeout_s
    options: dict[str, Any] = {
        "decode_responses": True,
        "encoding_errors": "replace",  # producers' non-UTF-8 bytes become U+FFFD, never a crash
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": connect_timeout_s,
        "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError, ConnectionResetError],
        "health_check_interval": 15,
        "client_name": client_name,
        "max_connections": max_connections,
    }
    redis: Redis
    if target.sentinels:
        redis = _via_sentinels(target, options)
    else:
        redis = _Redis.from_url(target.url, **options)
        if not target.url.startswith("unix:") and target.cluster != "no":
            _pin_to_slot(redis.connection_pool, target, namespace)
    pool = redis.connection_pool
    if str(pool.connection_kwargs.get("encoding", "utf-8")).lower() in ("utf-8", "utf8"):
        pool.connection_class = _with_hiredis_packing(pool.connection_class)
    return redis


def _via_sentinels(target: RedisTarget, options: dict[str, Any]) -> _Redis:
    """A client of the master the Sentinels name, with the URL's credentials and TLS."""
    url_options: dict[str, Any] = dict(parse_url(target.url))
    url_options.pop("host", None)
    url_options.pop("port", None)
    tls = url_options.pop("connection_class", None) is SSLConnection
    tls_options = {k: v for k, v in url_options.items() if k.startswith("ssl_")}
    if tls:
        tls_options["ssl"] = True
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        target.sentinel_addresses(),
        sentinel_kwargs={
            "socket_timeout": SENTINEL_TIMEOUT_S,
            "socket_connect_timeout": SENTINEL_TIMEOUT_S,
            "decode_responses": True,
            **tls_options,
        },
    )
    pool = SentinelConnectionPool(  # type: ignore[no-untyped-call]
        target.sentinel_master,
        sentinel,
        connection_class=SentinelManagedSSLConnection if tls else SentinelManagedConnection,
        **{**options, **url_options},  # the URL's own options win, as in from_url
    )
    redis = _Redis.from_pool(pool)
    assert isinstance(redis, _Redis)
    redis._sentinel = sentinel
    return redis


def server_name(hello: object) -> str:
    """The ``server`` field of a ``HELLO`` answer (RESP2 list or RESP3 map), or ``""``.

    Redis answers ``redis``, fakeredis ``fakeredis``: the one capability check
    tierpool needs, for the few commands fakeredis accepts but does not do.
    """
    if isinstance(hello, dict):
        items = list(hello.items())
    elif isinstance(hello, list | tuple):
        items = list(zip(hello[::2], hello[1::2], strict=False))
    else:
        return ""
    for key, value in items:
        k = key.decode() if isinstance(key, bytes) else key
        if k == "server":
            return value.decode() if isinstance(value, bytes) else str(value)
    return ""


def _pin_to_slot(pool: ConnectionPool, target: RedisTarget, namespace: str | None) -> None:
    """Connections that go to the node serving ``namespace``'s slot when Redis is a cluster."""
    url_options: dict[str, Any] = dict(parse_url(target.url))
    seed = (str(url_options.pop("host", "localhost")), int(url_options.pop("port", 6379)))
    url_options.pop("connection_class", None)
    probe_kwargs = {**url_options, "decode_responses": True}
    owner = SlotOwner(
        seed,
        None if namespace is None else namespace_slot(namespace),
        target.cluster,
        pool.connection_class,
        probe_kwargs,
    )
    pool.connection_class = slot_pinned(pool.connection_class)
    pool.connection_kwargs["slot_owner"] = owner


is_cluster = on_cluster
"""Whether ``redis`` (made by :func:`connect`) talks to a Redis Cluster."""
