"""/metrics, /healthz and /readyz: in process, and on live workers under traffic."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path

import anyio
import msgspec
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from tests.conftest import wait_for
from tests.procs import WorkerPool
from tierpool.client.client import TierpoolClient
from tierpool.connect.redisconn import connect
from tierpool.core.keys import Keys
from tierpool.core.settings import Settings
from tierpool.core.tierconfig import parse_tier_config
from tierpool.schemas import PodRegister
from tierpool.workers import http, metrics
from tierpool.workers.context import WorkerContext
from tierpool.workers.gauges import ClusterView, GaugeExporter, PoolGauges, StreamInfo, read_view
from tierpool.workers.redisproc import RedisProcess, free_port

pytestmark = pytest.mark.anyio

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of ``name`` over every label set that includes ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


async def scrape(port: int) -> Samples:
    status, body = await http.get("127.0.0.1", port, "/metrics")
    assert status == 200
    return parse(body.decode())


# --- in process ---------------------------------------------------------------------


@pytest.fixture
async def ctx(redis_url: str) -> AsyncIterator[WorkerContext]:
    context = WorkerContext.create(Settings(redis_url=redis_url, namespace="t"))
    try:
        yield context
    finally:
        await context.redis.aclose()


async def _raw(port: int, request: bytes) -> bytes:
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(request)
        chunks = []
        try:
            while True:
                chunks.append(await stream.receive())
        except anyio.EndOfStream:
            pass
    return b"".join(chunks)


async def test_endpoints(ctx: WorkerContext) -> None:
    async with anyio.create_task_group() as tg:
        port = await tg.start(lambda task_status: http.serve(ctx, port=0, task_status=task_status))
        status, body = await http.get("127.0.0.1", port, "/healthz")
        assert status == 200 and msgspec.json.decode(body)["status"] == "ok"

        status, body = await http.get("127.0.0.1", port, "/readyz")
        doc = msgspec.json.decode(body)
        assert status == 503
        assert doc["redis"] is True
        assert doc["missing"] == ["config_loaded", "group_joined"]

        ctx.health.config_loaded = True
        status, body = await http.get("127.0.0.1", port, "/readyz")
        assert status == 503 and msgspec.json.decode(body)["missing"] == ["group_joined"]
        ctx.health.group_joined = True
        status, body = await http.get("127.0.0.1", port, "/readyz?verbose=1")
        assert status == 200 and msgspec.json.decode(body)["status"] == "ready"

        metrics.requests_total.labels("allocate", "allocated").inc(0)
        raw = await _raw(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert f"Content-Type: {CONTENT_TYPE_LATEST}".encode() in head
        assert (
            "tierpool_requests_total",
            frozenset({("kind", "allocate"), ("outcome", "allocated")}),
        ) in parse(body.decode())

        assert (await http.get("127.0.0.1", port, "/nope"))[0] == 404
        raw = await _raw(port, b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 405")
        raw = await _raw(port, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b"\r\n\r\n")
        raw = await _raw(port, b"garbage\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 400")
        tg.cancel_scope.cancel()


async def test_readyz_follows_redis_in_process() -> None:
    """A PING that fails *now* makes /readyz 503, whatever the worker last knew."""
    server = RedisProcess()
    server.start()
    context = WorkerContext.create(Settings(redis_url=server.url, namespace="t"))
    context.health.config_loaded = context.health.group_joined = True
    try:
        async with anyio.create_task_group() as tg:
            port = await tg.start(
                lambda task_status: http.serve(context, port=0, task_status=task_status)
            )

            async def status_is(code: int) -> bool:
                return (await http.get("127.0.0.1", port, "/readyz", timeout_s=5))[0] == code

            assert await status_is(200)
            await anyio.to_thread.run_sync(server.stop)
            await wait_for(lambda: status_is(503))
            _, body = await http.get("127.0.0.1", port, "/readyz", timeout_s=5)
            assert msgspec.json.decode(body)["missing"] == ["redis"]
            assert (await http.get("127.0.0.1", port, "/healthz"))[0] == 200
            await anyio.to_thread.run_sync(server.start)
            await wait_for(lambda: status_is(200))
            tg.cancel_scope.cancel()
    finally:
        await context.redis.aclose()
        server.close()


async def test_busy_port_names_metrics_port(ctx: WorkerContext) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(http.MetricsPortBusy, match=f"METRICS_PORT={port}"):
            await http.serve(ctx, port=port)


def test_busy_port_is_one_line_and_exit_2(redis_url: str) -> None:
    """Regression (issue 14.2): a taken METRICS_PORT printed a 48-line
    ExceptionGroup traceback and exited 1; the README promises one line, and
    a setting that cannot work is exit 2 like any settings error."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("TIERPOOL_")},
            "REDIS_URL": redis_url,
            "METRICS_PORT": str(port),
        }
        done = subprocess.run(
            [sys.executable, "-m", "tierpool", "worker"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2, done.stderr
    lines = [
        line for line in done.stderr.splitlines() if "Traceback" in line or "METRICS_PORT" in line
    ]
    assert lines == [lines[0]] and lines[0].startswith(f"tierpool worker: METRICS_PORT={port}")


# --- the gauge exporter ---------------------------------------------------------------


async def test_read_view_of_an_empty_namespace(r: Redis) -> None:
    view = await read_view(r, Keys("t"), with_config=True)
    assert view.pools == {} and view.leader is None and view.gauges_at_ms is None
    assert view.config_raw is None and view.config_version == 0
    assert {s.label for s in view.streams} == {
        "allocate",
        "release",
        "drain",
        "config",
        "pods",
        "events",
        "dead",
    }
    assert all(s.length == 0 and not s.consumed for s in view.streams)


def _view(
    pools: Mapping[str, PoolGauges],
    lag: int | None,
    *,
    now_ms: int = 0,
    gauges_at_ms: int | None = 0,
) -> ClusterView:
    return ClusterView(
        now_ms=now_ms,
        pools=dict(pools),
        unassigned=1,
        active_calls=3,
        gauges_at_ms=gauges_at_ms,
        leader=None,
        workers=[],
        streams=[StreamInfo("allocate", "k", 10, consumed=True, lag=lag, pending=2)],
    )


@pytest.fixture
def clean_gauges() -> Iterator[None]:
    yield
    for g in (
        metrics.pods,
        metrics.free_capacity,
        metrics.pool_calls,
        metrics.pool_target,
        metrics.stream_lag,
        metrics.stream_pending,
        metrics.stream_length,
    ):
        g.clear()


@pytest.mark.usefixtures("clean_gauges")
def test_exporter_copies_and_forgets_pools() -> None:
    exporter = GaugeExporter()
    both = parse_tier_config('{"a": 2, "b": {"type": "shared", "target": 1}}', version=4)
    exporter.apply(
        _view(
            {
                "a": PoolGauges(pods=2, free=1, full=1, free_capacity=1, calls=1),
                "b": PoolGauges(pods=1, busy=1, free_capacity=3, calls=2),
            },
            lag=5,
        ),
        both,
        is_leader=True,
    )
    samples = parse(metrics_text())
    assert value(samples, "tierpool_pods", pool="a", state="free") == 1
    assert value(samples, "tierpool_pods", pool="a", state="full") == 1
    assert value(samples, "tierpool_free_capacity", pool="b") == 3
    assert value(samples, "tierpool_pool_calls", pool="b") == 2
    assert value(samples, "tierpool_pool_target", pool="a") == 2
    assert value(samples, "tierpool_active_calls") == 3
    assert value(samples, "tierpool_unassigned_pods") == 1
    assert value(samples, "tierpool_config_version") == 4
    assert value(samples, "tierpool_leader") == 1
    assert value(samples, "tierpool_stream_lag", stream="allocate") == 5

    only_a = parse_tier_config('{"a": 2}', version=5)
    exporter.apply(
        _view({"a": PoolGauges(pods=2, free=2, free_capacity=2)}, lag=None), only_a, is_leader=False
    )
    samples = parse(metrics_text())
    assert not any(dict(ls).get("pool") == "b" for (_n, ls) in samples)
    assert value(samples, "tierpool_leader") == 0
    # Redis could not tell the lag this time: the last known value stays, never NaN.
    lag = value(samples, "tierpool_stream_lag", stream="allocate")
    assert lag == 5 and not math.isnan(lag)


def test_gauges_age_shows_when_no_leader_refreshes_them() -> None:
    """Pool gauges freeze without a leader: their age says so, for alerting."""
    exporter = GaugeExporter()
    cfg = parse_tier_config('{"a": 1}', version=1)
    exporter.apply(_view({}, lag=0, now_ms=50_000, gauges_at_ms=20_000), cfg, is_leader=False)
    assert value(parse(metrics_text()), "tierpool_gauges_age_seconds") == 30.0
    exporter.apply(_view({}, lag=0, now_ms=50_000, gauges_at_ms=None), cfg, is_leader=False)
    assert math.isnan(value(parse(metrics_text()), "tierpool_gauges_age_seconds"))


def metrics_text() -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.REGISTRY).decode()


# --- live workers ---------------------------------------------------------------------


@pytest.fixture
def pool(redis_url: str, tmp_path: Path) -> Iterator[WorkerPool]:
    with WorkerPool(redis_url, tmp_path, env={"POD_TTL": "60s"}) as workers:
        yield workers


async def _register(client: TierpoolClient, n: int) -> None:
    for i in range(n):
        reply = await client.send_pod_event(
            PodRegister(pod_id=f"pod-{i}", endpoint=f"http://10.0.0.{i}:8080")
        )
        assert reply is not None and reply.status == "registered"


@pytest.mark.slow
async def test_metrics_move_with_traffic(r: Redis, redis_url: str, pool: WorkerPool) -> None:
    """Counters grow by exactly the requests made; gauges follow the pods and calls."""
    workers = await pool.start(r, 2)
    ports = [w.metrics_port for w in workers]

    async def scrape_all() -> list[Samples]:
        return [await scrape(p) for p in ports]

    async with TierpoolClient.from_url(redis_url, namespace="t") as client:
        await _register(client, 4)

        async def gauges_show(pods: int, calls: int) -> bool:
            for s in await scrape_all():
                if total(s, "tierpool_pods") != pods or value(s, "tierpool_active_calls") != calls:
                    return False
            return True

        await wait_for(lambda: gauges_show(4, 0), timeout_s=20)
        before = await scrape_all()
        assert sum(value(s, "tierpool_leader") for s in before) == 1
        assert all(value(s, "tierpool_config_version") == 1 for s in before)
        assert all(value(s, "tierpool_pool_target", pool="gold") == 10 for s in before)

        for i in range(3):
            assert (await client.allocate(f"call-{i}")).status == "allocated"
        assert (await client.allocate("call-0")).status == "allocated"  # existing
        await wait_for(lambda: gauges_show(4, 3), timeout_s=20)
        after = await scrape_all()

        def grew(name: str, **labels: str) -> float:
            return sum(total(s, name, **labels) for s in after) - sum(
                total(s, name, **labels) for s in before
            )

        assert grew("tierpool_requests_total", kind="allocate", outcome="allocated") == 4
        assert grew("tierpool_request_duration_seconds_count", kind="allocate") == 4
        for s in after:  # every replica exports the leader's figures
            assert total(s, "tierpool_pods", state="full") == 3
            assert total(s, "tierpool_pods", state="free") == 1
            assert total(s, "tierpool_free_capacity") == 1
            assert total(s, "tierpool_pool_calls") == 3

        for i in range(3):
            assert (await client.release(f"call-{i}")).status == "released"
        await wait_for(lambda: gauges_show(4, 0), timeout_s=20)
        done = await scrape_all()
        released = sum(total(s, "tierpool_requests_total", kind="release") for s in done) - sum(
            total(s, "tierpool_requests_total", kind="release") for s in before
        )
        assert released == 3
        for s in done:
            assert total(s, "tierpool_free_capacity") == 4
            assert value(s, "tierpool_stream_length", stream="events") > 0


@pytest.mark.slow
async def test_readyz_of_a_live_worker_follows_redis(tmp_path: Path) -> None:
    """Redis stops: /readyz says 503 (liveness stays 200); Redis returns empty: 200 again."""
    server = RedisProcess(free_port())
    server.start()
    r = connect(server.url)
    try:
        with WorkerPool(server.url, tmp_path) as workers:
            (worker,) = await workers.start(r, 1)
            port = worker.metrics_port

            async def ready_is(code: int) -> bool:
                try:
                    return (await http.get("127.0.0.1", port, "/readyz", timeout_s=5))[0] == code
                except (OSError, TimeoutError):
                    return False

            await wait_for(lambda: ready_is(200))
            await anyio.to_thread.run_sync(lambda: server.stop(kill=True))
            await wait_for(lambda: ready_is(503), timeout_s=15)
            assert (await http.get("127.0.0.1", port, "/healthz"))[0] == 200
            await anyio.to_thread.run_sync(server.start)
            await wait_for(lambda: ready_is(200), timeout_s=20)
            assert worker.alive()
    finally:
        await r.aclose()
        server.close()
