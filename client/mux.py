"""Many concurrent requests over two connections: the client library's transport.

:class:`Mux` runs two background tasks, each owning one dedicated connection:
the **writer** sends every request queued since its last round trip as one
pipelined batch of ``XADD`` (500 concurrent requests cost a few round trips,
not 500 connections); the **reader** waits on every reply stream awaited at
the moment with one ``XREAD BLOCK``, and deletes the ones it read (one
``DEL``) in the same round trip as its next read.

A waiter is registered *before* its ``XADD``, and the reader reads each
stream from its start, so a fast reply is never missed. A stream awaited
while the reader is blocked must not wait for that block to end: the writer
puts a ``CLIENT UNBLOCK`` of the reader at the head of its batch, retried a
few times when it reached Redis before the read it aimed at (the block's
timeout, ``block_ms``, bounds the rest). A short block is no substitute:
Redis ends a timed-out blocking read only at its next event-loop tick
(``hz 10``: up to 100 ms). Measured against one worker with a request
outstanding, p50/p99: unblock 0.6/1.2 ms, ``BLOCK 1`` 36/80 ms, ``BLOCK 10``
33/106 ms; with none outstanding both add ~0.1 ms over a bare redis-py producer.

On a Redis Cluster both connections go to the node serving the namespace's
slot (``core.clusterslot``) and follow it when it moves. ``CLIENT UNBLOCK``
names a client of one server, so the writer sends it only while it is
connected to the very node (host and port) where the reader got its id; in
between (a failover, a migration) the block's timeout bounds the wait. An
``XADD`` answered ``MOVED``/``ASK``/``TRYAGAIN``/``CLUSTERDOWN`` did not
happen: it is queued again and sent to the slot's node once known; a
redirected read is read again there. Nothing waiting is failed for it.

The connections have no redis-py retries, which would resend a batch that
may have reached Redis and reconnect the reader behind our back (a new
``CLIENT ID``). A batch that failed before anything was sent is sent once
Redis is back; one that failed after may have happened, so its requests
keep waiting and time out if no reply comes. Both loops reconnect with
jittered backoff: a Redis restart costs the requests in flight, not the mux.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import anyio
from anyio.abc import TaskGroup
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tierpool.connect.clusterslot import is_redirect
from tierpool.connect.redisconn import server_name
from tierpool.core.clock import now_ms, redis_time_ms
from tierpool.core.errors import (
    ClientClosed,
    InvalidMessage,
    RedisUnavailable,
    ReplyMismatch,
    RequestNotSent,
    RequestTimeout,
)
from tierpool.core.logutil import LogLimit
from tierpool.schemas import Reply, decode_reply

log = logging.getLogger(__name__)

_NETWORK_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
_KICK_RETRIES = 3
FAKE_SERVER_BLOCK_MS = 20
"""Block of each reply read where CLIENT UNBLOCK does nothing (fakeredis)."""
_BACKOFF_BASE_S = 0.05
_BACKOFF_CAP_S = 1.0
_READ_TIMEOUT_MARGIN_S = 5.0


def backoff_s(failures: int) -> float:
    """Full-jitter exponential backoff, so many clients do not reconnect in lockstep."""
    return random.uniform(0, min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2 ** min(failures, 10)))


ReplyCheck = Callable[[Reply], str | None]
"""What is wrong with a reply that does not answer the request, or None."""


@dataclass(eq=False, slots=True)
class _Pending:
    """One request on its way: queued, then sent, then answered (or abandoned)."""

    request_id: str
    stream: str
    fields: Mapping[str, str]
    reply_key: str | None  # None: no reply expected (a pod event sent without waiting)
    check: ReplyCheck | None = None
    done: anyio.Event = field(default_factory=anyio.Event)
    reply: Reply | None = None
    error: BaseException | None = None
    sent: bool = False
    abandoned: bool = False

    def resolve(self, reply: Reply | None = None, error: BaseException | None = None) -> None:
        if not self.done.is_set():
            self.reply, self.error = reply, error
            self.done.set()


@dataclass(slots=True)
class MuxStats:
    """Counters for tests and benchmarks: how the two connections are used."""

    batches: int = 0
    sent: int = 0
    reads: int = 0
    replies: int = 0
    kicks: int = 0
    kick_misses: int = 0
    reconnects: int = 0
    redirects: int = 0


class Mux:
    """Sends requests and awaits their replies over one writer and one reader connection.

    ``redis`` only lends its connection settings (host, password, TLS...):
    the mux opens its own two connections. It runs only as an async context
    manager: ``async with mux:`` starts the reader and writer in a task group
    that lives exactly as long as the block, and leaving it fails the
    requests still waiting (ClientClosed) and closes both connections. A mux
    is entered once.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        block_ms: int = 1_000,
        unblock: bool = True,
        delete_replies: bool = True,
        client_name: str = "tierpool-client",
    ) -> None:
        if block_ms < 1:
            raise ValueError("block_ms must be at least 1 (0 would block forever)")
        self.block_ms = block_ms
        self.unblock = unblock
        self.delete_replies = delete_replies
        self.stats = MuxStats()
        # Longer than the longest block, so a blocking read never hits it (redis-py #3138).
        read_timeout_s = block_ms / 1000 + _READ_TIMEOUT_MARGIN_S
        self._reader_conn = _dedicated(redis, f"{client_name}-reader", read_timeout_s)
        self._writer_conn = _dedicated(redis, f"{client_name}-writer", None)
        self._waiters: dict[str, _Pending] = {}
        self._outbox: list[_Pending] = []
        self._to_delete: list[str] = []
        self._reader_wake = anyio.Event()
        self._writer_wake = anyio.Event()
        self._reader_id: int | None = None
        self._reader_node: tuple[str, int] | None = None  # where _reader_id is an id
        self._read_gen = 0
        self._blocked_gen: int | None = None  # the read now blocked in Redis, if any
        self._kick_gen: int | None = None  # the read the writer should unblock, if any
        self._kick_tries = 0
        self._tg: TaskGroup | None = None
        self._closed = False
        self._redis_log = LogLimit(log, "Redis connection warnings", per_window=2, window_s=10.0)
        """Reconnect attempts repeat every few hundred ms while Redis is away."""
        self.clock_offset_ms = 0
        """Redis's clock minus ours (``TIME``, at each connect): deadlines are in Redis time."""

    async def __aenter__(self) -> Self:
        if self._tg is not None or self._closed:
            raise RuntimeError("the client was already started" if self._tg else "closed")
        with anyio.move_on_after(1.0) as scope:  # best effort: the writer measures again
            try:
                await self._connect_writer()
            except _NETWORK_ERRORS as exc:
                log.warning("tierpool client cannot reach Redis yet: %s", exc)
        if scope.cancelled_caught:  # a handshake cut short may leave a reply unread
            await self._writer_conn.disconnect(nowait=True)
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        tg.start_soon(self._read_loop, name="tierpool-client-reader")
        tg.start_soon(self._write_loop, name="tierpool-client-writer")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop both loops, fail waiting requests, close both connections."""
        if self._closed:
            return
        self._closed = True
        tg, self._tg = self._tg, None
        if tg is not None:
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
        for pending in [*self._waiters.values(), *self._outbox]:
            pending.resolve(error=ClientClosed(pending.request_id))
        self._waiters.clear()
        self._outbox.clear()
        with anyio.CancelScope(shield=True):
            for conn in (self._reader_conn, self._writer_conn):
                await conn.disconnect()

    async def submit(
        self,
        request_id: str,
        stream: str,
        fields: Mapping[str, str],
        reply_key: str | None,
        timeout_s: float,
        check: ReplyCheck | None = None,
    ) -> Reply | None:
        """XADD ``fields`` to ``stream`` and return the reply on ``reply_key``.

        With ``reply_key=None`` it returns None once the entry is written.
        ``check`` says what is wrong with a reply that is not this request's
        (None when it is): such a reply raises ReplyMismatch and is left in
        place, for the request it does answer (a reused request id).
        Raises RequestTimeout when nothing came within ``timeout_s``
        (RequestNotSent when it was still queued: it is then never sent),
        RedisUnavailable when Redis refused the XADD, ClientClosed when the
        mux closes first.
        """
        if self._tg is None:
            raise RuntimeError("the client is not started: use `async with client:`")
        pending = _Pending(request_id, stream, fields, reply_key, check)
        if reply_key is not None:
            if reply_key in self._waiters:
                raise ValueError(f"request {request_id} is already waiting for a reply")
            self._waiters[reply_key] = pending  # before the XADD: a fast reply is never missed
            if self._blocked_gen is not None and self.unblock:
                self._kick_gen = self._blocked_gen
                self._writer_wake.set()
            self._reader_wake.set()
        self._outbox.append(pending)
        self._writer_wake.set()
        try:
            with anyio.move_on_after(timeout_s):
                await pending.done.wait()
        finally:
            pending.abandoned = True
            if reply_key is not None and self._waiters.get(reply_key) is pending:
                del self._waiters[reply_key]
        if pending.error is not None:
            raise pending.error
        if not pending.done.is_set():
            if not pending.sent:
                raise RequestNotSent(request_id, timeout_s)
            raise RequestTimeout(request_id, timeout_s)
        return pending.reply

    # --- writer ----------------------------------------------------------------------
    async def _write_loop(self) -> None:
        failures = 0
        while True:
            while not self._outbox and self._kick_gen is None:
                self._writer_wake = anyio.Event()
                await self._writer_wake.wait()
            batch = [p for p in self._outbox if not p.abandoned]
            self._outbox = []
            kick, self._kick_gen = self._kick_gen, None  # _kick_result may ask again
            if kick != self._blocked_gen or self._reader_id is None:
                kick = None
            conn = self._writer_conn
            try:
                await self._connect_writer()
            except _NETWORK_ERRORS as exc:
                # Nothing was sent: keep the batch, in order, for when Redis is back.
                self._outbox[:0] = batch
                failures += 1
                self.stats.reconnects += 1
                if self._redis_log.allow():
                    log.warning("tierpool client cannot reach Redis to send: %s", exc)
                await anyio.sleep(backoff_s(failures))
                continue
            try:
                redirected = await self._send_batch(conn, batch, kick)
            except Exception as exc:  # a bug, not Redis: fail the batch, keep the loop
                log.exception("tierpool client writer failed")
                await conn.disconnect(nowait=True)
                for p in batch:
                    p.resolve(error=exc)
                continue
            if redirected:  # the slot moves: ask again where, after a pause
                failures += 1
                await anyio.sleep(backoff_s(failures))
            else:
                failures = 0

    async def _connect_writer(self) -> None:
        conn = self._writer_conn
        if await _still_open(conn):
            return
        await conn.connect()  # type: ignore[no-untyped-call]
        before = now_ms()
        await conn.send_command("TIME", check_health=False)
        server = redis_time_ms(await conn.read_response())
        self.clock_offset_ms = server - (before + now_ms()) // 2

    async def _send_batch(
        self, conn: AbstractConnection, batch: list[_Pending], kick: int | None
    ) -> bool:
        """Send ``batch``; True when the cluster redirected some of it (queued again)."""
        batch = [p for p in batch if not p.abandoned]  # none timed out while connecting
        commands: list[list[Any]] = []
        if kick is not None and _node(conn) != self._reader_node:
            kick = None  # another server: the id names some other client there
        if kick is not None:
            commands.append(["CLIENT", "UNBLOCK", self._reader_id])
        for p in batch:
            commands.append(["XADD", p.stream, "*", *(x for kv in p.fields.items() for x in kv)])
        if not commands:
            return False
        for p in batch:
            p.sent = True  # from here on it may reach Redis
        redirected: list[_Pending] = []
        try:
            await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
            if kick is not None:
                self._kick_result(kick, await _read(conn))
            for p in batch:
                answer = await _read(conn)
                if isinstance(answer, ResponseError) and is_redirect(answer):
                    redirected.append(p)  # not written: send it again where the slot is
                elif isinstance(answer, ResponseError):
                    p.resolve(error=RedisUnavailable(f"XADD to {p.stream} refused", answer))
                elif p.reply_key is None:
                    p.resolve()
        except _NETWORK_ERRORS as exc:
            # Sent, or partly: each request may have reached Redis, so each keeps
            # waiting for its reply (and times out if none comes).
            await conn.disconnect(nowait=True)
            if self._redis_log.allow():
                log.warning("tierpool client lost Redis sending %d requests: %s", len(batch), exc)
            for p in batch:
                if p.reply_key is None:
                    p.resolve(error=RedisUnavailable("the event may not have been written", exc))
            return False
        self.stats.batches += 1
        self.stats.sent += len(batch) - len(redirected)
        if not redirected:
            return False
        for p in redirected:
            p.sent = False
        self._outbox[:0] = redirected
        self.stats.redirects += 1
        await conn.disconnect(nowait=True)  # reconnects to the node serving the slot now
        return True

    def _kick_result(self, gen: int, answer: object) -> None:
        """After CLIENT UNBLOCK: retry when it reached Redis before the read it aimed at."""
        self.stats.kicks += 1
        if answer == 1 or self._blocked_gen != gen:
            self._kick_tries = 0
            return
        self.stats.kick_misses += 1
        self._kick_tries += 1
        if self._kick_tries < _KICK_RETRIES:
            self._kick_gen = gen
        else:
            self._kick_tries = 0  # the block's own timeout bounds the wait

    # --- reader ----------------------------------------------------------------------
    async def _read_loop(self) -> None:
        failures = 0
        while True:
            while not self._waiters and not self._to_delete:
                self._reader_wake = anyio.Event()
                await self._reader_wake.wait()
            try:
                await self._read_once()
                failures = 0
                continue
            except _NETWORK_ERRORS as exc:
                if self._redis_log.allow():
                    log.warning("tierpool client reply reader lost Redis: %s", exc)
            except Exception:  # a bug, not Redis: log it and keep reading
                log.exception("tierpool client reply reader failed")
            self._reader_id = self._reader_node = None
            await self._reader_conn.disconnect(nowait=True)
            failures += 1
            self.stats.reconnects += 1
            await anyio.sleep(backoff_s(failures))

    def _poll_instead_of_unblock(self) -> None:
        """Capability check: a server whose ``CLIENT UNBLOCK`` does nothing.

        fakeredis (``tierpool run`` without redis-server) answers it with 0
        and never wakes the read, so a request whose reply stream the blocked
        read does not list would wait for the whole block. Short blocks take
        the place of the kick there; real Redis keeps the kick.
        """
        self.unblock = False
        self.block_ms = min(self.block_ms, FAKE_SERVER_BLOCK_MS)
        log.info("tierpool client: server is fakeredis; polling every %d ms", self.block_ms)

    async def _read_once(self) -> None:
        conn = self._reader_conn
        if not await _still_open(conn) or self._reader_id is None:
            await conn.connect()  # type: ignore[no-untyped-call]
            await conn.send_command("CLIENT", "ID", check_health=False)
            self._reader_id = int(await conn.read_response())
            self._reader_node = _node(conn)
            if self.unblock and await _server_is_fakeredis(conn):
                self._poll_instead_of_unblock()
        deleting, self._to_delete = self._to_delete, []
        commands: list[list[Any]] = [["DEL", *deleting]] if deleting else []
        keys = list(self._waiters)
        if keys:
            commands.append(
                [
                    "XREAD",
                    "COUNT",
                    1,
                    "BLOCK",
                    self.block_ms,
                    "STREAMS",
                    *keys,
                    *("0-0" for _ in keys),
                ]
            )
        elif not commands:
            return
        self._read_gen += 1
        self._kick_gen = None  # this read covers every stream awaited now
        if keys:
            self._blocked_gen = self._read_gen
        try:
            await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
            if deleting:
                await _read(conn)
            answer = await _read(conn) if keys else None
        except BaseException:
            self._to_delete[:0] = deleting
            raise
        finally:
            self._blocked_gen = None
        self.stats.reads += 1
        if isinstance(answer, ResponseError) and is_redirect(answer):
            self.stats.redirects += 1
            raise RedisConnectionError(f"reply read redirected ({answer}): reading there")
        if isinstance(answer, ResponseError):
            log.error("tierpool client: XREAD of %d reply streams refused: %s", len(keys), answer)
            for key in keys:
                pending = self._waiters.pop(key, None)
                if pending is not None:
                    pending.resolve(error=RedisUnavailable("reading the reply refused", answer))
            return
        for key, entry in _xread_entries(answer):
            pending = self._waiters.pop(key, None)
            if pending is None:
                if self.delete_replies:
                    self._to_delete.append(key)
                continue  # its requester gave up: the reply is only deleted
            self.stats.replies += 1
            try:
                reply = decode_reply(entry)
            except InvalidMessage as exc:
                if self.delete_replies:
                    self._to_delete.append(key)
                pending.resolve(error=exc)
                continue
            problem = pending.check(reply) if pending.check is not None else None
            if problem is not None:
                pending.resolve(error=ReplyMismatch(pending.request_id, problem))
                continue  # not ours: its own requester may still be waiting for it
            if self.delete_replies:
                self._to_delete.append(key)
            pending.resolve(reply)


def _node(conn: AbstractConnection) -> tuple[str, int] | None:
    """The server ``conn`` is connected to (host, port); None for a unix socket."""
    host, port = getattr(conn, "host", None), getattr(conn, "port", None)
    return (str(host), int(port)) if host is not None and port is not None else None


async def _still_open(conn: AbstractConnection) -> bool:
    """Whether ``conn`` is connected and idle; a connection the server closed (EOF,
    seen without I/O) is dropped here, before a send could make a batch ambiguous."""
    if not conn.is_connected:
        return False
    try:
        if not await conn.can_read():
            return True
    except OSError:
        pass
    await conn.disconnect(nowait=True)
    return False


async def _read(conn: AbstractConnection) -> object:
    """One answer of a pipeline; an error answer is returned, not raised, so the rest is read."""
    try:
        answer: object = await conn.read_response()
    except ResponseError as exc:
        return exc
    return answer


def _xread_entries(answer: object) -> list[tuple[str, dict[str, str]]]:
    """(stream, its first entry's fields) of an XREAD answer, RESP2 list or RESP3 map."""
    if not answer:
        return []
    items: Any = answer.items() if isinstance(answer, dict) else answer
    out: list[tuple[str, dict[str, str]]] = []
    for key, entries in items:
        if entries:
            _entry_id, flat = entries[0]
            if isinstance(flat, dict):
                out.append((key, flat))
            else:
                it = iter(flat)
                out.append((key, dict(zip(it, it, strict=True))))
    return out


def _dedicated(redis: Redis, name: str, socket_timeout_s: float | None) -> AbstractConnection:
    """A connection with ``redis``'s settings, but decoded and without hidden retries."""
    pool = redis.connection_pool
    kwargs = dict(pool.connection_kwargs)
    kwargs.update(
        decode_responses=True,
        retry=Retry(NoBackoff(), 0),
        retry_on_error=[],
        retry_on_timeout=False,
        health_check_interval=0,
        client_name=name,
    )
    if "slot_owner" in kwargs:  # a cluster's redirects are answers here, handled above
        kwargs["redirects_raise"] = False
    current = kwargs.get("socket_timeout")
    if current is None or (socket_timeout_s is not None and current < socket_timeout_s):
        kwargs["socket_timeout"] = socket_timeout_s or 30.0
    conn: AbstractConnection = pool.connection_class(**kwargs)
    return conn


async def _server_is_fakeredis(conn: AbstractConnection) -> bool:
    """Whether ``HELLO`` names the server fakeredis (Redis says ``redis``)."""
    await conn.send_command("HELLO", check_health=False)
    try:
        answer = await conn.read_response()
    except ResponseError:  # a server before HELLO (Redis < 6): a real one
        return False
    return server_name(answer) == "fakeredis"
