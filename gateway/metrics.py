"""The gateway's HTTP metrics, named as the anchor's under the ``tierpool_`` prefix.

A registry of its own: the gateway is not a worker, and exporting every
worker metric at zero from it would double what a dashboard sums.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Histogram

REGISTRY: Final = CollectorRegistry(auto_describe=True)

LABELS: Final = ("method", "endpoint", "status")

http_requests = Counter(
    "tierpool_http_requests",
    "HTTP requests answered by the gateway, by method, route pattern and status.",
    LABELS,
    registry=REGISTRY,
)
http_request_duration = Histogram(
    "tierpool_http_request_duration_seconds",
    "Time from the request's arrival to its answer, by method, route pattern and status.",
    LABELS,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
refused = Counter(
    "tierpool_http_refused",
    "Requests the gateway refused before any allocation, by reason.",
    ("reason",),
    registry=REGISTRY,
)
