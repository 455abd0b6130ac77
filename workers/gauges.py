"""Pool and stream gauges: read once per cycle from Redis, exported by every worker.

The leader computes pool figures with ``gauges.lua`` into the ``gauges``
hash; every worker copies them into its Prometheus gauges, so all replicas
export the same numbers and a dashboard may take ``max()`` over them (the
anchor's per-process gauges drifted, digest §12). Stream length, lag and
pending come from ``XLEN`` and ``XINFO GROUPS`` (Redis 7 reports ``lag``).

:func:`read_view` is the one read of this "cluster view" — one pipelined
round trip — shared by the exporter and ``tierpool status``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Final

import anyio
import msgspec
from anyio.abc import TaskStatus
from prometheus_client import Gauge
from redis.asyncio import Redis

from tierpool.core.clock import redis_time_ms
from tierpool.core.keys import GROUP, Keys
from tierpool.core.tierconfig import TierConfig
from tierpool.workers import metrics
from tierpool.workers.context import WorkerContext

log = logging.getLogger(__name__)

EXPORT_INTERVAL_S: Final = 2.0
POD_STATES: Final = ("free", "busy", "full", "draining", "silent")
"""Pod states of ``gauges.lua``; the ``state`` label of ``tierpool_pods``."""


@dataclass(frozen=True, slots=True)
class PoolGauges:
    """One pool as the leader last computed it."""

    pods: int = 0
    free: int = 0
    busy: int = 0
    full: int = 0
    draining: int = 0
    silent: int = 0
    calls: int = 0
    free_capacity: int = 0
    max_concurrent: int = 0

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> PoolGauges:
        return cls(**{k: int(doc.get(k) or 0) for k in cls.__slots__})


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """One stream: its label (``allocate``, ``pods``, ``dead``...), key and group figures."""

    label: str
    key: str
    length: int
    consumed: bool
    """Whether the stream has the ``tierpool`` group (lag/pending mean something)."""
    lag: int | None = None
    """Entries not yet delivered to the group; None when Redis cannot tell."""
    pending: int = 0
    consumers: int = 0


@dataclass(frozen=True, slots=True)
class ClusterView:
    """What one pipelined read of a namespace returns."""

    now_ms: int
    pools: dict[str, PoolGauges]
    unassigned: int
    active_calls: int
    gauges_at_ms: int | None
    """When the leader computed the pool figures; None when it never did."""
    leader: str | None
    """``{holder}:{term}`` of the current leader lease, if any."""
    workers: list[tuple[str, int]]
    """Every worker id with its last-seen epoch ms, most recent first."""
    streams: list[StreamInfo]
    config_raw: str | None = None
    config_version: int = 0

    def workers_alive(self, within_ms: int) -> list[str]:
        return [w for w, seen in self.workers if self.now_ms - seen <= within_ms]

    @property
    def leader_holder(self) -> str | None:
        return None if self.leader is None else self.leader.rsplit(":", 1)[0]


def stream_label(keys: Keys, key: str) -> str:
    """The ``stream`` label of a stream key: ``tp:{ns}:req:allocate`` -> ``allocate``."""
    short = key.removeprefix(keys.prefix)
    return short.removeprefix("req:")


def _streams(keys: Keys) -> list[tuple[str, bool]]:
    """Every stream worth watching and whether the workers consume it."""
    return [*((s, True) for s in keys.all_input_streams), (keys.events, False), (keys.dead, False)]


async def read_view(redis: Redis, keys: Keys, *, with_config: bool = False) -> ClusterView:
    """Read gauges, leader, workers and every stream's figures in one round trip.

    Raises what redis-py raises when Redis cannot be reached; a missing
    stream or group is not an error (length 0, ``consumed=False``).
    """
    streams = _streams(keys)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.time()
        pipe.hget(keys.gauges, "json")
        pipe.get(keys.leader)
        pipe.zrange(keys.workers, 0, -1, desc=True, withscores=True)
        if with_config:
            pipe.get(keys.config)
            pipe.get(keys.config_version)
        for key, consumed in streams:
            pipe.xlen(key)
            if consumed:
                pipe.xinfo_groups(key)
        answers = await pipe.execute(raise_on_error=False)
    for answer in answers[:4]:
        if isinstance(answer, BaseException):
            raise answer
    it = iter(answers)
    now_ms = redis_time_ms(next(it))
    gauges_raw, leader, workers_raw = next(it), next(it), next(it)
    config_raw, config_version = (next(it), next(it)) if with_config else (None, None)
    infos = [_stream_info(keys, key, consumed, it) for key, consumed in streams]

    pools: dict[str, PoolGauges] = {}
    unassigned = active = 0
    at_ms: int | None = None
    if gauges_raw:
        doc = msgspec.json.decode(gauges_raw)
        # cjson encodes an empty table as {}; a pool-less config is an empty object.
        pools = {name: PoolGauges.from_json(g) for name, g in (doc.get("pools") or {}).items()}
        unassigned = int(doc.get("unassigned") or 0)
        active = int(doc.get("active_calls") or 0)
        at_ms = int(doc["at_ms"]) if doc.get("at_ms") is not None else None
    return ClusterView(
        now_ms=now_ms,
        pools=pools,
        unassigned=unassigned,
        active_calls=active,
        gauges_at_ms=at_ms,
        leader=leader,
        workers=[(str(w), int(score)) for w, score in workers_raw],
        streams=infos,
        config_raw=None if isinstance(config_raw, BaseException) else config_raw,
        config_version=_int_or_zero(config_version),
    )


def _int_or_zero(value: object) -> int:
    if value is None or isinstance(value, BaseException):
        return 0
    return int(str(value))


def _stream_info(keys: Keys, key: str, consumed: bool, it: Any) -> StreamInfo:
    length_raw = next(it)
    length = 0 if isinstance(length_raw, BaseException) else int(length_raw)
    label = stream_label(keys, key)
    if not consumed:
        return StreamInfo(label, key, length, consumed=False)
    groups = next(it)
    if isinstance(groups, BaseException):  # "no such key": the stream was never written
        return StreamInfo(label, key, length, consumed=False)
    for g in groups:
        if g.get("name") == GROUP:
            lag = g.get("lag")
            return StreamInfo(
                label,
                key,
                length,
                consumed=True,
                lag=None if lag is None else int(lag),
                pending=int(g.get("pending") or 0),
                consumers=int(g.get("consumers") or 0),
            )
    return StreamInfo(label, key, length, consumed=False)


class GaugeExporter:
    """Copies a :class:`ClusterView` into the Prometheus gauges of ``tierpool.workers.metrics``.

    Remembers which label sets it exported, so a pool removed from the
    config disappears from ``/metrics`` instead of freezing at its last value.
    """

    def __init__(self) -> None:
        self._pools: set[str] = set()
        self._targets: set[str] = set()

    def apply(self, view: ClusterView, config: TierConfig, *, is_leader: bool) -> None:
        for name, g in view.pools.items():
            for state in POD_STATES:
                metrics.pods.labels(pool=name, state=state).set(getattr(g, state))
            metrics.free_capacity.labels(pool=name).set(g.free_capacity)
            metrics.pool_calls.labels(pool=name).set(g.calls)
        for gone in self._pools - view.pools.keys():
            for state in POD_STATES:
                _remove(metrics.pods, gone, state)
            _remove(metrics.free_capacity, gone)
            _remove(metrics.pool_calls, gone)
        self._pools = set(view.pools)

        targets = {name: config.tier(name).target for name in config.pools}
        for name, target in targets.items():
            metrics.pool_target.labels(pool=name).set(target)
        for gone in self._targets - targets.keys():
            _remove(metrics.pool_target, gone)
        self._targets = set(targets)

        metrics.active_calls.set(view.active_calls)
        metrics.unassigned_pods.set(view.unassigned)
        metrics.gauges_age.set(
            math.nan
            if view.gauges_at_ms is None
            else max(0.0, (view.now_ms - view.gauges_at_ms) / 1000)
        )
        metrics.config_version.set(config.version)
        metrics.leader.set(1 if is_leader else 0)
        for s in view.streams:
            metrics.stream_length.labels(stream=s.label).set(s.length)
            if s.consumed:
                metrics.stream_pending.labels(stream=s.label).set(s.pending)
                if s.lag is not None:  # Redis cannot always tell (tombstones): keep the last
                    metrics.stream_lag.labels(stream=s.label).set(s.lag)


def _remove(gauge: Gauge, *labels: str) -> None:
    with contextlib.suppress(KeyError):
        gauge.remove(*labels)


async def export_once(ctx: WorkerContext, exporter: GaugeExporter) -> ClusterView:
    view = await read_view(ctx.redis, ctx.keys)
    exporter.apply(view, ctx.cache.current().config, is_leader=ctx.is_leader)
    return view


async def run_exporter(
    ctx: WorkerContext,
    *,
    interval_s: float = EXPORT_INTERVAL_S,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Refresh the gauges every ``interval_s`` until cancelled.

    ``started()`` comes after the first attempt, so a worker that says it is
    ready already exports figures (or, with Redis down, logged why not).
    A failed cycle is logged and counted (``worker_errors_total{loop="gauges"}``)
    and the loop goes on; ``config_version`` and ``leader`` are local facts
    and are exported even then.
    """
    exporter = GaugeExporter()
    started = False
    failing = False
    while True:
        try:
            await export_once(ctx, exporter)
            if failing:
                log.info("gauges: reading Redis again")
            failing = False
        except Exception as exc:
            metrics.worker_errors_total.labels(loop="gauges").inc()
            metrics.config_version.set(ctx.cache.current().version)
            metrics.leader.set(1 if ctx.is_leader else 0)
            if not failing:  # once per outage, not every 2 s
                log.warning("gauges: cannot read Redis: %s", exc)
            failing = True
        if not started:
            task_status.started()
            started = True
        await anyio.sleep(interval_s)
