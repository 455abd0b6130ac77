"""``tierpool gateway``: run the anchor's HTTP API on ``HTTP_PORT`` under uvicorn.

One process holds one :class:`TierpoolClient` (its two connections carry
every in-flight request) and one uvicorn server. Start: Redis must answer a
PING (the anchor's rule: a gateway that cannot reach Redis should not take
traffic), then the tier config is read, then the port listens. Stop
(SIGTERM or SIGINT): stop accepting, let requests in flight finish within
``HTTP_SHUTDOWN_TIMEOUT``, then close the client; a second signal stops at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import socket
import sys
from collections.abc import Callable, Iterator
from typing import Any, Final, cast

import anyio
import uvicorn
from anyio.abc import TaskStatus
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tierpool.client.client import TierpoolClient
from tierpool.connect.redisconn import connect
from tierpool.core.settings import Settings, mask_url, unknown_tierpool_variables
from tierpool.core.signals import stop_on_signals
from tierpool.gateway.app import Gateway

log = logging.getLogger(__name__)

HOST: Final = "0.0.0.0"  # the anchor listened on all interfaces (main.go:113)
START_PING_TIMEOUT_S: Final = 5.0


class _CoalescingTransport:
    """A transport whose writes of one event-loop turn leave in one ``send``.

    uvicorn writes a response's status line and headers, then its body, as
    two writes: with ``TCP_NODELAY`` that is two system calls and two wake-ups
    of the client per answer, and on a loaded machine the ``send`` calls were
    a third of the gateway's CPU. Writes are gathered and flushed at the end
    of the loop turn (before a close), so nothing waits longer than that.
    """

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._pending: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(bytes(data))

    def _flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _Protocol(HttpToolsProtocol):
    """uvicorn's httptools protocol writing through :class:`_CoalescingTransport`."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self.transport = cast(asyncio.Transport, _CoalescingTransport(self.transport))


class _Server(uvicorn.Server):
    """uvicorn's server with our signal handling (it re-raised the signal after a clean stop)."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_started = on_started

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self._on_started()


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (``port=0``: a free one; tests read the port back).

    Made with ``IPPROTO_TCP`` named: asyncio sets ``TCP_NODELAY`` on accepted
    connections only when the socket says it is TCP, and without it every
    answer written in two parts (headers, body) waited ~40 ms for the
    client's delayed ACK (Nagle).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class GatewayServer:
    """The gateway's lifecycle: client, config refresher and HTTP server, stopped together."""

    def __init__(self, settings: Settings, *, host: str = HOST, port: int | None = None) -> None:
        self.settings = settings
        self.host = host
        self.port = settings.http_port if port is None else port
        self.server: _Server | None = None
        self.gateway: Gateway | None = None
        self._stop_requested = False

    def stop(self) -> None:
        """Stop accepting and drain the requests in flight. Safe to call twice, and early."""
        self._stop_requested = True
        if self.server is not None:
            self.server.should_exit = True

    def kill(self) -> None:
        """Stop now: requests in flight are cancelled."""
        self.stop()
        if self.server is not None:
            self.server.force_exit = True

    async def run(self, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until :meth:`stop`; ``task_status.started(port)`` once listening."""
        s = self.settings
        redis = connect(
            s.redis_target,  # Sentinels or a cluster, as every component
            namespace=s.namespace,
            client_name="tierpool-gateway",
        )
        try:
            with anyio.fail_after(START_PING_TIMEOUT_S):
                await redis.ping()
            sock = bind(self.host, self.port)
            bound = int(sock.getsockname()[1])
            client = TierpoolClient(
                redis,
                namespace=s.namespace,
                default_timeout_s=max(0.1, s.http_write_timeout_s),
                client_name="tierpool-gateway",
            )
            async with client, anyio.create_task_group() as tg:
                self.gateway = gateway = Gateway(s, client, redis)
                for warning in gateway.guard.warnings():
                    log.warning("%s", warning)
                with contextlib.suppress(Exception):
                    await gateway.pools.refresh()
                await tg.start(gateway.pools.run)
                config = uvicorn.Config(
                    gateway.app(),
                    lifespan="off",
                    log_config=None,
                    access_log=False,
                    proxy_headers=False,
                    server_header=False,
                    http=_Protocol,
                    loop="none",
                    timeout_keep_alive=max(1, math.ceil(s.http_idle_timeout_s)),
                    timeout_graceful_shutdown=math.ceil(s.http_shutdown_timeout_s),
                )

                def started() -> None:
                    log.info(
                        "gateway listening on http://%s:%d/api/v1 (namespace %s)",
                        self.host,
                        bound,
                        s.namespace,
                        extra={"http_port": bound},
                    )
                    task_status.started(bound)

                self.server = _Server(config, started)
                if self._stop_requested:
                    self.server.should_exit = True
                await self.server.serve(sockets=[sock])
                tg.cancel_scope.cancel()
        finally:
            with anyio.move_on_after(2.0, shield=True):
                await redis.aclose()


# --- the command -------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument(
        "--port", type=int, default=None, help="listen on this port instead of HTTP_PORT"
    )


async def _watch_signals(server: GatewayServer) -> None:
    await stop_on_signals(server, log, "draining requests in flight")


class RedisAway(Exception):
    """Redis did not answer PING at start."""


async def serve(settings: Settings, port: int | None = None) -> None:
    """Run the gateway until a signal stops it; :class:`RedisAway` when Redis does not answer."""
    redis = connect(
        settings.redis_target,
        namespace=settings.namespace,
        client_name="tierpool-gateway",
    )
    try:
        with anyio.fail_after(START_PING_TIMEOUT_S):
            await redis.ping()
    except Exception as exc:
        raise RedisAway(
            f"Redis {mask_url(settings.redis_url)} did not answer PING: {exc!r}"
        ) from None
    finally:
        await redis.aclose()
    server = GatewayServer(settings, port=port)
    async with anyio.create_task_group() as tg:
        tg.start_soon(_watch_signals, server)
        await server.run()
        tg.cancel_scope.cancel()
    log.info("gateway stopped")


def main(args: argparse.Namespace) -> int:
    from tierpool.core.anchorenv import unused_variable_warnings
    from tierpool.core.errors import SettingsError
    from tierpool.workers.logs import bind as bind_fields
    from tierpool.workers.logs import setup_logging

    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        sys.stderr.write(f"tierpool gateway: {exc}\n")
        return 2
    setup_logging(settings)
    bind_fields(component="gateway", namespace=settings.namespace)
    for name in unknown_tierpool_variables():
        log.warning("unknown variable %s ignored (a typo?)", name)
    for text in unused_variable_warnings("gateway"):  # smart-router's, named once each
        log.warning(text)
    try:
        anyio.run(serve, settings, getattr(args, "port", None))
    except RedisAway as exc:
        log.error("gateway cannot start: %s", exc)
        return 3
    except OSError as exc:  # e.g. HTTP_PORT taken: fatal, as in the anchor
        log.error("gateway cannot start: %s (HTTP_PORT=%s)", exc, settings.http_port)
        return 1
    except Exception:
        log.exception("gateway failed")
        return 1
    return 0
