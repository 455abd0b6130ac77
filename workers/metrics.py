"""Every Prometheus metric tierpool exports, defined once.

Names are prefixed ``tierpool_`` (contract). Counters and histograms are per
process (Prometheus sums them across workers); pool gauges are copied from
what the leader computed in Redis (``gauges.lua``), so every replica exports
the same pool figures (the anchor's per-process gauges drifted, §12).

Every counter is exported from the start at 0 (contract v1.1) for every
label set known then (:func:`export_from_start`, and :func:`export_pools`
for each pool a config brings), so ``rate()`` and ``increase()`` see the
first event instead of a series that appears already at 1.

The anchor's 11 metrics map as follows (``deploy/prometheus/`` records the
anchor's names from ours): http_request_duration_seconds /
http_requests_total -> request_duration_seconds / requests_total (by kind and
outcome); allocations_total{pool,status} and releases_total{pool} keep their
pool label; active_calls -> active_calls; pool_available_pods / pool_assigned_pods ->
pods{pool,state} and pool_target; leader_status -> leader; panics_recovered
-> worker_errors_total; drains_total -> requests_total{kind="drain"};
zombies_recovered -> reaped_total{what=...}.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)

requests_total = Counter(
    "tierpool_requests_total",
    "Requests processed, by kind and outcome (reply status).",
    ["kind", "outcome"],
    registry=REGISTRY,
)
request_duration = Histogram(
    "tierpool_request_duration_seconds",
    "From the entry's stream id (its XADD time) to its reply, by kind and outcome.",
    ["kind", "outcome"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
batch_size = Histogram(
    "tierpool_batch_size",
    "Entries per batch a worker processed.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
    registry=REGISTRY,
)
dead_letters_total = Counter(
    "tierpool_dead_letters_total",
    "Entries dead-lettered, by stream and reason.",
    ["stream", "reason"],
    registry=REGISTRY,
)
redeliveries_total = Counter(
    "tierpool_redeliveries_total",
    "Entries processed again after a delivery that did not finish.",
    ["stream"],
    registry=REGISTRY,
)
claimed_total = Counter(
    "tierpool_claimed_total",
    "Entries claimed from silent consumers (XAUTOCLAIM).",
    ["stream"],
    registry=REGISTRY,
)
allocations_total = Counter(
    "tierpool_allocations_total",
    "Allocate requests answered, by pool placed on (empty unless allocated) and reply status.",
    ["pool", "status"],
    registry=REGISTRY,
)
releases_total = Counter(
    "tierpool_releases_total",
    "Calls released, by the pool of the pod that held them.",
    ["pool"],
    registry=REGISTRY,
)
stale_retries_total = Counter(
    "tierpool_stale_retries_total",
    "Script calls refused because Redis held a newer config, then retried.",
    registry=REGISTRY,
)
worker_errors_total = Counter(
    "tierpool_worker_errors_total",
    "Failures a worker loop survived, by loop.",
    ["loop"],
    registry=REGISTRY,
)

stream_length = Gauge(
    "tierpool_stream_length", "Entries in a stream.", ["stream"], registry=REGISTRY
)
stream_lag = Gauge(
    "tierpool_stream_lag",
    "Entries not yet delivered to the consumer group.",
    ["stream"],
    registry=REGISTRY,
)
stream_pending = Gauge(
    "tierpool_stream_pending",
    "Entries delivered but not yet acknowledged.",
    ["stream"],
    registry=REGISTRY,
)

pods = Gauge(
    "tierpool_pods",
    "Pods by pool and state (free, busy, full, draining, silent).",
    ["pool", "state"],
    registry=REGISTRY,
)
pool_target = Gauge(
    "tierpool_pool_target", "Configured target pod count by pool.", ["pool"], registry=REGISTRY
)
free_capacity = Gauge(
    "tierpool_free_capacity", "Calls the pool can take now.", ["pool"], registry=REGISTRY
)
pool_calls = Gauge("tierpool_pool_calls", "Live calls by pool.", ["pool"], registry=REGISTRY)
active_calls = Gauge("tierpool_active_calls", "Live calls in the namespace.", registry=REGISTRY)
unassigned_pods = Gauge(
    "tierpool_unassigned_pods", "Registered pods with no pool.", registry=REGISTRY
)
gauges_age = Gauge(
    "tierpool_gauges_age_seconds",
    "Age of the pool gauges the leader computed (they freeze when no leader runs): "
    "alert when it grows. NaN until a leader has computed them once.",
    registry=REGISTRY,
)
config_version = Gauge(
    "tierpool_config_version", "Tier config version this worker serves.", registry=REGISTRY
)
leader = Gauge("tierpool_leader", "1 when this worker is the leader.", registry=REGISTRY)
leader_changes_total = Counter(
    "tierpool_leader_changes_total",
    "Times this worker gained or lost leadership.",
    ["change"],
    registry=REGISTRY,
)
reaped_total = Counter(
    "tierpool_reaped_total",
    "Leader repairs: expired leases, silent pods, lapsed drains.",
    ["what"],
    registry=REGISTRY,
)
moves_total = Counter(
    "tierpool_moves_total", "Pods assigned or moved by the leader.", ["reason"], registry=REGISTRY
)
pod_source_events_total = Counter(
    "tierpool_pod_source_events_total",
    "Pod changes the leader's pod source received (POD_SOURCE=kubernetes: watch events).",
    ["type"],
    registry=REGISTRY,
)
pod_source_relists_total = Counter(
    "tierpool_pod_source_relists_total",
    "Full relists by the pod source: takeover, expired (410 Gone), interval, retry.",
    ["reason"],
    registry=REGISTRY,
)
pod_source_errors_total = Counter(
    "tierpool_pod_source_errors_total",
    "Failures the pod source survived, by stage: list, watch (dropped or refused), sync (Redis).",
    ["stage"],
    registry=REGISTRY,
)


# --- every counter from the start ---------------------------------------------------

REPLY_STATUSES: Final[dict[str, tuple[str, ...]]] = {
    "allocate": ("allocated", "rejected", "expired", "invalid"),
    "release": ("released", "not_found", "expired", "invalid"),
    "drain": ("drained", "undrained", "not_found", "expired", "invalid"),
    "config": ("applied", "conflict", "expired", "invalid"),
    "pods": ("registered", "alive", "unknown_pod", "deregistered", "expired", "invalid"),
}
"""Reply statuses each input stream's entries can end with (the Lua scripts' returns)."""
DEAD_REASONS: Final = ("invalid", "request_id_in_use", "too_many_deliveries", "internal_error")
WORKER_LOOPS: Final = (
    "consumer",
    "claimer",
    "batch",
    "gauges",
    "leader_reconcile",
    "leader_reap",
    "leader_gauges",
    "leader_upstream",
    "leader_pod_source",
)
POD_SOURCE_EVENTS: Final = ("added", "modified", "deleted")
POD_SOURCE_RELISTS: Final = ("takeover", "expired", "interval", "retry")
ALLOCATION_FAILURES: Final = ("rejected", "expired", "invalid")
"""Allocation statuses that place nothing: their ``pool`` label is empty."""


def export_from_start() -> None:
    """Create every counter series known before any config is read, at 0."""
    for kind, statuses in REPLY_STATUSES.items():
        for status in statuses:
            requests_total.labels(kind, status)
        for reason in DEAD_REASONS:
            dead_letters_total.labels(kind, reason)
        redeliveries_total.labels(kind)
        claimed_total.labels(kind)
    for status in ALLOCATION_FAILURES:
        allocations_total.labels("", status)
    for loop in WORKER_LOOPS:
        worker_errors_total.labels(loop)
    for change in ("gained", "lost"):
        leader_changes_total.labels(change)
    for what in ("lease", "pod", "drain"):
        reaped_total.labels(what)
    for reason in ("assign", "rebalance"):
        moves_total.labels(reason)
    for kind in POD_SOURCE_EVENTS:
        pod_source_events_total.labels(kind)
    for reason in POD_SOURCE_RELISTS:
        pod_source_relists_total.labels(reason)
    for stage in ("list", "watch", "sync"):
        pod_source_errors_total.labels(stage)


def export_pools(pools: Iterable[str]) -> None:
    """Create the per-pool counter series of ``pools`` at 0 (kept when a pool goes:
    a counter that vanishes would read as a reset)."""
    for pool in pools:
        allocations_total.labels(pool, "allocated")
        releases_total.labels(pool)


class Children:
    """The children of one labelled metric, each looked up once.

    ``metric.labels(...)`` validates its values and takes a lock on every
    call (about as much as the increment itself, several times per message
    on the hot path): this keeps each child after its first lookup. The
    label values come from fixed sets (stream kinds, statuses, configured
    pools), so the dict stays small.
    """

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (0-1) of ``values`` by nearest rank: the smallest value
    with at least ``q`` of all values at or below it. ``None`` when empty.

    The one quantile of measured samples (``tierpool run``'s progress line,
    ``tierpool bench``), so their p50 and p99 mean the same.
    """
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]
