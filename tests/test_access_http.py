"""The metrics/health listener under connection floods and descriptor exhaustion.

Issue 13 item 5: the listener used to accept until the process ran out of
file descriptors, and the ``EMFILE`` of one ``accept()`` ended the worker.
"""

from __future__ import annotations

import errno
import resource
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from redis.asyncio import Redis

from tests.conftest import wait_for
from tests.procs import WorkerPool
from tierpool.core.settings import Settings
from tierpool.workers import http
from tierpool.workers.context import WorkerContext

pytestmark = pytest.mark.anyio

FLOOD = 1_100
WORKER_NOFILE = 1_024
"""The common default soft limit: the issue's worker died at this limit."""


@pytest.fixture
def pool(redis_url: str, tmp_path: Path) -> Iterator[WorkerPool]:
    with WorkerPool(redis_url, tmp_path) as p:
        yield p


def _lower_nofile() -> None:
    """Runs in the worker child before exec: the soft descriptor limit of a stock host."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (WORKER_NOFILE, hard))


def _open_idle(port: int, n: int) -> list[socket.socket]:
    """``n`` connected sockets that never send a byte (the kernel backlog completes them)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 1024), hard))
    out: list[socket.socket] = []
    try:
        for _ in range(n):
            out.append(socket.create_connection(("127.0.0.1", port), timeout=5))
    except BaseException:
        for s in out:
            s.close()
        raise
    return out


async def _metrics_ok(port: int) -> bool:
    try:
        status, body = await http.get("127.0.0.1", port, "/metrics", timeout_s=3)
    except (OSError, TimeoutError):
        return False
    return status == 200 and b"tierpool_" in body


async def test_idle_connection_flood_at_1024_descriptors(r: Redis, pool: WorkerPool) -> None:
    """Regression: 1,100 idle connections at RLIMIT_NOFILE=1024 no longer kill the worker.

    The worker keeps serving ``/metrics`` during the flood (new connections
    evict the oldest idle ones) and after it.
    """
    (worker,) = await pool.start(r, 1, preexec_fn=_lower_nofile)
    port = worker.metrics_port
    flood = await anyio.to_thread.run_sync(_open_idle, port, FLOOD)
    try:
        # Give the worker time to accept the whole backlog: it must neither exit
        # nor stop answering while the idle connections stay open.
        with anyio.move_on_after(3):
            while worker.alive():  # noqa: ASYNC110 - watching for an exit is the point
                await anyio.sleep(0.05)
        assert worker.alive(), worker.log_text()[-3000:]
        await wait_for(lambda: _metrics_ok(port), timeout_s=15, interval_s=0.2)
    finally:
        for s in flood:
            s.close()
    await wait_for(lambda: _metrics_ok(port), timeout_s=15, interval_s=0.2)
    status, _ = await http.get("127.0.0.1", port, "/readyz", timeout_s=5)
    assert status == 200
    assert worker.alive()
    assert "Traceback" not in worker.log_text()


def _starve_nofile() -> None:
    """Runs in the worker child: so few descriptors that accept() hits EMFILE below the cap."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (STARVED_NOFILE, hard))


STARVED_NOFILE = 48
"""A worker holds about 13 descriptors when idle: ~35 connections exhaust this limit."""


async def test_descriptor_exhaustion_backs_off_and_keeps_redis_working(
    r: Redis, pool: WorkerPool
) -> None:
    """At EMFILE the listener backs off and shrinks its cap; the worker keeps serving
    requests over Redis and answers /metrics during and after the flood."""
    (worker,) = await pool.start(r, 1, preexec_fn=_starve_nofile)
    port = worker.metrics_port
    flood = await anyio.to_thread.run_sync(_open_idle, port, 300)
    try:
        await wait_for(lambda: _async_true("backing off" in worker.log_text()), timeout_s=10)
        await wait_for(lambda: _metrics_ok(port), timeout_s=20, interval_s=0.2)
        # The worker's own Redis work goes on: a request gets its reply.
        await r.xadd(pool.keys.request_stream("release"), {"request_id": "rel-1", "call_id": "c"})
        await wait_for(lambda: _exists(r, pool.keys.reply("rel-1")), timeout_s=10)
        assert worker.alive(), worker.log_text()[-3000:]
    finally:
        for s in flood:
            s.close()
    await wait_for(lambda: _metrics_ok(port), timeout_s=15, interval_s=0.2)
    assert worker.alive()
    assert "Traceback" not in worker.log_text()


async def _exists(r: Redis, key: str) -> bool:
    return bool(await r.exists(key))


# --- in process: the cap, eviction, idle timeout and back-off ---------------------------


@pytest.fixture
async def ctx(redis_url: str) -> AsyncIterator[WorkerContext]:
    context = WorkerContext.create(Settings(redis_url=redis_url, namespace="t"))
    try:
        yield context
    finally:
        await context.redis.aclose()


def _closed_by_peer(s: socket.socket) -> bool:
    s.settimeout(0)
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


async def test_cap_evicts_the_oldest_idle_connection(ctx: WorkerContext) -> None:
    """More idle connections than the cap: the oldest are closed, a scrape still gets in."""
    async with anyio.create_task_group() as tg:
        port = await tg.start(
            lambda task_status: http.serve(ctx, port=0, max_connections=4, task_status=task_status)
        )
        idle = await anyio.to_thread.run_sync(_open_idle, port, 10)
        try:
            assert await _metrics_ok(port)
            await wait_for(lambda: _async_true(_closed_by_peer(idle[0])), timeout_s=5)
            assert not _closed_by_peer(idle[-1])  # the newest idle one is still open
        finally:
            for s in idle:
                s.close()
        tg.cancel_scope.cancel()


async def _async_true(value: bool) -> bool:
    return value


async def test_idle_connection_is_closed_after_the_timeout(
    ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http, "IDLE_TIMEOUT_S", 0.3)
    async with anyio.create_task_group() as tg:
        port = await tg.start(lambda task_status: http.serve(ctx, port=0, task_status=task_status))
        (s,) = await anyio.to_thread.run_sync(_open_idle, port, 1)
        with s:
            await wait_for(lambda: _async_true(_closed_by_peer(s)), timeout_s=5)
        tg.cancel_scope.cancel()


class _Exhausted:
    """A listener whose first ``failures`` accepts fail with EMFILE, as at the fd limit."""

    def __init__(self, inner: object, failures: int) -> None:
        self.inner = inner
        self.failures = failures

    async def accept(self) -> object:
        if self.failures:
            self.failures -= 1
            await anyio.lowlevel.checkpoint()
            raise OSError(errno.EMFILE, "Too many open files")
        return await self.inner.accept()  # type: ignore[attr-defined]


async def test_accept_backs_off_on_emfile(
    ctx: WorkerContext, caplog: pytest.LogCaptureFixture
) -> None:
    """EMFILE from accept() is waited out (one warning), not raised out of the worker."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with listener, anyio.create_task_group() as tg:
        (inner,) = listener.listeners
        port = int(listener.extra(http.SocketAttribute.local_port))
        conns = http._Connections(8)
        tg.start_soon(http._accept_loop, ctx, _Exhausted(inner, 4), conns, tg)
        assert await _metrics_ok(port)
        tg.cancel_scope.cancel()
    warnings = [r for r in caplog.records if "backing off" in r.getMessage()]
    assert len(warnings) == 1
