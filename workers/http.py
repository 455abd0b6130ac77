"""The worker's tiny HTTP server: ``/metrics``, ``/healthz`` and ``/readyz``.

Plain HTTP/1.1 over anyio streams, GET and HEAD only, one request per
connection (``Connection: close``): Prometheus and Kubernetes probes need
nothing more, and it keeps a web framework out of the dependencies.

- ``/metrics``: every metric of :data:`tierpool.workers.metrics.REGISTRY`, Prometheus text format.
- ``/healthz``: liveness. 200 as long as the event loop answers.
- ``/readyz``: readiness. 200 only when Redis answers a PING *now*, the tier
  config is loaded, the consumer group is joined and Redis accepts this
  worker's writes (``ctx.health``); otherwise 503 with a JSON body that lists
  what is missing (``writes_refused``: Redis's own words, e.g. OOM).
- ``/health`` and ``/ready``: the anchor's paths for the same two probes
  (contract v1.1), so a smart-router deployment's probes keep working.

The listener is exposed to whatever can reach ``METRICS_HOST`` and must not be
a way to stop a worker: at most :data:`MAX_CONNECTIONS` connections are open
at once (a new one evicts the oldest that is still idle), a connection that
sends no request within :data:`IDLE_TIMEOUT_S` is closed, and running out
of file descriptors (``EMFILE``) makes the accept loop back off instead of
ending the worker.

``METRICS_HOST`` defaults to ``0.0.0.0``: Kubernetes probes and Prometheus
reach a worker on its pod address, from outside the container, and the
endpoints only read (no secret, no write). A worker on a shared host can
bind ``127.0.0.1`` or a private interface instead.

Several workers on one host each need their own ``METRICS_PORT`` (the
Procfile uses honcho's per-process ``$PORT``). A port that is taken fails the
worker at start with :class:`MetricsPortBusy`, naming ``METRICS_PORT``,
rather than leaving a worker nobody can scrape or probe.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Iterator
from typing import Final, Protocol, cast

import anyio
import anyio.lowlevel
import msgspec
from anyio.abc import SocketAttribute, SocketStream, TaskGroup, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tierpool.core.errors import TierpoolError
from tierpool.workers.context import WorkerContext
from tierpool.workers.metrics import REGISTRY

log = logging.getLogger(__name__)

PING_TIMEOUT_S: Final = 1.0
"""/readyz gives Redis this long to answer; a probe must not hang on a dead server."""
IDLE_TIMEOUT_S: Final = 5.0
"""A connection that has not sent its whole request head by then is closed."""
WRITE_TIMEOUT_S: Final = 10.0
"""Answering one request (a /readyz PING included) may take this long; then the socket is closed."""
MAX_HEADER_BYTES: Final = 8192
MAX_CONNECTIONS: Final = 64
"""Connections open at once. Prometheus and the probes need a handful; the cap
keeps a flood from taking the descriptors the worker needs for Redis."""
ACCEPT_BACKOFF_MIN_S: Final = 0.05
ACCEPT_BACKOFF_MAX_S: Final = 1.0
FD_RESERVE: Final = 8
"""Descriptors the listener leaves to the rest of the worker once ``accept()`` hit ``EMFILE``."""
CAP_RESTORE_S: Final = 30.0
_OUT_OF_RESOURCES: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_CLIENT_GONE: Final = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.ECONNRESET})

_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}
_JSON: Final = "application/json"
_ALIASES: Final = {"/health": "/healthz", "/ready": "/readyz"}
"""The anchor's probe paths, answered exactly as ours."""


class MetricsPortBusy(TierpoolError):
    """Raised by :func:`serve` at start when ``METRICS_PORT`` is already taken."""

    def __init__(self, port: int, cause: OSError) -> None:
        self.port = port
        super().__init__(
            f"METRICS_PORT={port}: cannot listen ({cause.strerror or cause}); another process "
            "uses it. Give each worker on one host its own METRICS_PORT "
            "(honcho/foreman: METRICS_PORT=$PORT)"
        )


async def readiness(ctx: WorkerContext) -> tuple[bool, dict[str, object]]:
    """Whether the worker is ready, and the JSON body that says why (not)."""
    redis_ok = False
    with anyio.move_on_after(PING_TIMEOUT_S):
        try:
            redis_ok = bool(await ctx.redis.ping())
        except Exception as exc:  # any failure to answer is "not ready", with the reason
            log.debug("readyz: Redis PING failed: %s", exc)
    refused = ctx.health.writes_refused
    checks = {
        "redis": redis_ok,
        "config_loaded": ctx.health.config_loaded,
        "group_joined": ctx.health.group_joined,
        "writes": not refused,
    }
    missing = [name for name, ok in checks.items() if not ok]
    ready = not missing
    body: dict[str, object] = {
        "status": "ready" if ready else "not ready",
        **checks,
        "missing": missing,
        "worker_id": ctx.worker_id,
    }
    if refused:
        body["writes_refused"] = refused
    return ready, body


def _response(status: int, content_type: str, body: bytes, *, head: bool = False) -> bytes:
    headers = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    )
    return headers.encode() + (b"" if head else body)


def _json(status: int, doc: object, *, head: bool = False) -> bytes:
    return _response(status, _JSON, msgspec.json.encode(doc) + b"\n", head=head)


async def respond(ctx: WorkerContext, method: str, target: str) -> bytes:
    """The full HTTP response to one request line (no I/O but the readiness PING)."""
    path = target.split("?", 1)[0]
    path = _ALIASES.get(path, path)
    head = method == "HEAD"
    if method not in ("GET", "HEAD"):
        return _json(405, {"error": f"method {method} not allowed; use GET"})
    if path == "/metrics":
        return _response(200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY), head=head)
    if path == "/healthz":
        return _json(200, {"status": "ok", "worker_id": ctx.worker_id}, head=head)
    if path == "/readyz":
        ready, body = await readiness(ctx)
        return _json(200 if ready else 503, body, head=head)
    return _json(
        404, {"error": f"no such path {path}; try /metrics, /healthz or /readyz"}, head=head
    )


class _Accepting(Protocol):
    """What the accept loop needs of a listener (anyio's ``SocketListener`` has it)."""

    async def accept(self) -> SocketStream: ...


class _Connections:
    """The listener's open connections: at most ``limit``, the oldest idle one evicted first.

    A connection counts from ``accept()`` until it is closed. When the cap is
    reached, the connection that has waited longest without sending its
    request is closed to make room: a flood of idle sockets then only evicts
    itself, while a probe or a scrape, which sends its request at once, gets
    through. Only when every open connection is busy answering does the
    accept loop wait for one to finish.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self.evicted = 0
        self._idle: dict[object, anyio.CancelScope] = {}  # insertion order: oldest first
        self._freed = anyio.Event()

    def evict_oldest_idle(self) -> bool:
        """Close the connection idle the longest; False when none is idle."""
        for key in self._idle:
            self._idle.pop(key).cancel()
            self.evicted += 1
            return True
        return False

    async def wait_for_room(self) -> None:
        while self.open >= self.limit:
            if not self.evict_oldest_idle():
                self._freed = anyio.Event()
                await self._freed.wait()
            else:
                await anyio.lowlevel.checkpoint()  # let the evicted handler close its socket

    @contextlib.contextmanager
    def owned(self) -> Iterator[None]:
        """Around a handler: its connection, counted by the accept loop, is closed on exit."""
        try:
            yield
        finally:
            self.open -= 1
            self._freed.set()

    @contextlib.contextmanager
    def idle(self) -> Iterator[anyio.CancelScope]:
        """A scope around reading the request: :meth:`evict_oldest_idle` may cancel it."""
        key = object()
        with anyio.CancelScope() as scope:
            self._idle[key] = scope
            try:
                yield scope
            finally:
                self._idle.pop(key, None)


async def _handle(ctx: WorkerContext, stream: SocketStream, conns: _Connections) -> None:
    with conns.owned():
        async with stream:
            try:
                head = b""
                with conns.idle(), anyio.fail_after(IDLE_TIMEOUT_S):
                    buffered = BufferedByteReceiveStream(stream)
                    head = await buffered.receive_until(b"\r\n\r\n", MAX_HEADER_BYTES)
                if not head:
                    return  # evicted to make room for a newer connection
                request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
                parts = request_line.split()
                with anyio.fail_after(WRITE_TIMEOUT_S):
                    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                        await stream.send(_json(400, {"error": "bad request line"}))
                        return
                    await stream.send(await respond(ctx, parts[0], parts[1]))
            except (
                TimeoutError,
                anyio.EndOfStream,
                anyio.IncompleteRead,
                anyio.DelimiterNotFound,
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
                ConnectionError,
            ):
                return  # a client that went away, idled or sent garbage: nothing to answer
            except Exception:
                log.exception("http: failed to answer a request")


async def _accept_loop(
    ctx: WorkerContext, listener: _Accepting, conns: _Connections, tg: TaskGroup
) -> None:
    """Accept forever; out of descriptors, shrink the cap and back off instead of dying.

    ``EMFILE``/``ENFILE`` (and the kernel's ``ENOBUFS``/``ENOMEM``) mean the
    process or the host is out of descriptors or memory right now: the
    pending connection stays in the kernel's backlog, so retrying at once
    would spin. The cap drops to the connections open then minus
    :data:`FD_RESERVE` (the idle ones above it are evicted, which leaves
    descriptors to the worker's Redis connections), the loop sleeps
    (doubling from :data:`ACCEPT_BACKOFF_MIN_S` up to
    :data:`ACCEPT_BACKOFF_MAX_S`) and tries again; one warning per episode.
    The full cap comes back after :data:`CAP_RESTORE_S` without ``EMFILE``.
    """
    full_cap = conns.limit
    backoff = ACCEPT_BACKOFF_MIN_S
    short_of_fds = False
    last_short = 0.0
    while True:
        await conns.wait_for_room()
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno in _OUT_OF_RESOURCES:
                conns.limit = max(1, min(conns.limit, conns.open - FD_RESERVE))
                if not short_of_fds:
                    log.warning(
                        "http: cannot accept a connection (%s); backing off, "
                        "at most %d connections for now",
                        exc.strerror or exc,
                        conns.limit,
                    )
                    short_of_fds = True
                last_short = anyio.current_time()
                conns.evict_oldest_idle()
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, ACCEPT_BACKOFF_MAX_S)
                continue
            if exc.errno in _CLIENT_GONE:
                continue
            raise
        if short_of_fds:
            log.info("http: accepting connections again")
            short_of_fds = False
        if conns.limit < full_cap and anyio.current_time() - last_short > CAP_RESTORE_S:
            conns.limit = full_cap
        backoff = ACCEPT_BACKOFF_MIN_S
        conns.open += 1  # counted now, not when the handler first runs
        tg.start_soon(_handle, ctx, stream, conns)


async def serve(
    ctx: WorkerContext,
    *,
    port: int | None = None,
    host: str | None = None,
    max_connections: int = MAX_CONNECTIONS,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; ``task_status.started(port)`` once listening.

    ``host`` defaults to ``METRICS_HOST`` and ``port`` to ``METRICS_PORT``;
    ``0`` picks a free port (tests and ``tierpool run`` use it), and the port
    actually bound is what ``started()`` reports and what the start log line
    names.
    """
    want = ctx.settings.metrics_port if port is None else port
    bind = ctx.settings.metrics_host if host is None else host
    try:
        listener = await anyio.create_tcp_listener(local_host=bind, local_port=want)
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EACCES):
            raise MetricsPortBusy(want, exc) from None
        raise
    async with listener:
        bound = int(listener.extra(SocketAttribute.local_port))
        shown = f"[{bind}]" if ":" in bind else bind
        log.info(
            "metrics and health on http://%s:%d (/metrics /healthz /readyz)",
            shown,
            bound,
            extra={"metrics_port": bound},
        )
        conns = _Connections(max_connections)
        async with anyio.create_task_group() as tg:
            for one in listener.listeners:  # one per address family the host resolves to
                tg.start_soon(_accept_loop, ctx, cast(_Accepting, one), conns, tg)
            task_status.started(bound)


async def get(host: str, port: int, path: str, *, timeout_s: float = 2.0) -> tuple[int, bytes]:
    """GET ``path`` from a worker: ``(status, body)``. For ``tierpool run`` and tests.

    Raises ``OSError`` when nothing listens and ``TimeoutError`` after ``timeout_s``.
    """
    with anyio.fail_after(timeout_s):
        async with await anyio.connect_tcp(host, port) as stream:
            await stream.send(
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
            )
            chunks: list[bytes] = []
            try:
                while True:
                    chunks.append(await stream.receive())
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[1].isdigit():
        raise OSError(f"not an HTTP response from {host}:{port}: {raw[:80]!r}")
    return int(status_line[1]), body
