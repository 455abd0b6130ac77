"""The worker's tiny HTTP server: ``/metrics``, ``/healthz`` and ``/readyz``.

Plain HTTP/1.1 over anyio streams, GET and HEAD only, one request per
connection (``Connection: close``): Prometheus and Kubernetes probes need
nothing more, and it keeps a web framework out of the dependencies.

- ``/metrics``: every metric of :data:`tierpool.workers.metrics.REGISTRY`, Prometheus text format.
- ``/healthz``: liveness. 200 as long as the event loop answers.
- ``/readyz``: readiness. 200 only when Redis answers a PING *now*, the tier
  config is loaded and the consumer group is joined (``ctx.health``);
  otherwise 503 with a JSON body that lists what is missing.
- ``/health`` and ``/ready``: the anchor's paths for the same two probes
  (contract v1.1), so a smart-router deployment's probes keep working.

Several workers on one host each need their own ``METRICS_PORT`` (the
Procfile uses honcho's per-process ``$PORT``). A port that is taken fails the
worker at start with :class:`MetricsPortBusy`, naming ``METRICS_PORT``,
rather than leaving a worker nobody can scrape or probe.
"""

from __future__ import annotations

import errno
import logging
from typing import Final

import anyio
import orjson
from anyio.abc import SocketAttribute, SocketStream, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tierpool.core.errors import TierpoolError
from tierpool.workers.context import WorkerContext
from tierpool.workers.metrics import REGISTRY

log = logging.getLogger(__name__)

PING_TIMEOUT_S: Final = 1.0
"""/readyz gives Redis this long to answer; a probe must not hang on a dead server."""
READ_TIMEOUT_S: Final = 5.0
MAX_HEADER_BYTES: Final = 8192

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
    checks = {
        "redis": redis_ok,
        "config_loaded": ctx.health.config_loaded,
        "group_joined": ctx.health.group_joined,
    }
    missing = [name for name, ok in checks.items() if not ok]
    ready = not missing
    body: dict[str, object] = {
        "status": "ready" if ready else "not ready",
        **checks,
        "missing": missing,
        "worker_id": ctx.worker_id,
    }
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
    return _response(status, _JSON, orjson.dumps(doc) + b"\n", head=head)


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


async def _handle(ctx: WorkerContext, stream: SocketStream) -> None:
    async with stream:
        try:
            with anyio.fail_after(READ_TIMEOUT_S):
                buffered = BufferedByteReceiveStream(stream)
                head = await buffered.receive_until(b"\r\n\r\n", MAX_HEADER_BYTES)
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = request_line.split()
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
            return  # a client that went away or sent garbage: nothing to answer
        except Exception:
            log.exception("http: failed to answer a request")


async def serve(
    ctx: WorkerContext,
    *,
    port: int | None = None,
    host: str = "0.0.0.0",  # probes and Prometheus come from outside the host
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; ``task_status.started(port)`` once listening.

    ``port`` defaults to ``METRICS_PORT``; ``0`` picks a free port (tests and
    ``tierpool run`` use it), and the port actually bound is what
    ``started()`` reports and what the start log line names.
    """
    want = ctx.settings.metrics_port if port is None else port
    try:
        listener = await anyio.create_tcp_listener(local_host=host, local_port=want)
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EACCES):
            raise MetricsPortBusy(want, exc) from None
        raise
    async with listener:
        bound = int(listener.extra(SocketAttribute.local_port))
        log.info(
            "metrics and health on http://%s:%d (/metrics /healthz /readyz)",
            host,
            bound,
            extra={"metrics_port": bound},
        )
        task_status.started(bound)

        async def handler(stream: SocketStream) -> None:
            await _handle(ctx, stream)

        await listener.serve(handler)


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
