"""What one Kubernetes pod means for the pool: a pure translation, no I/O.

A pod is **ready** when its phase is Running, its ``Ready`` condition is
True, it has an IP and it is not terminating (the anchor's rule, digest §3,
plus the deletion timestamp: a terminating pod finishes its calls but takes
no new ones, instead of losing them as the anchor's remove-pod did).

What the pool needs besides readiness comes from the pod's annotations or,
failing those, its labels (annotations win: they are the place for values
that do not select anything):

- ``tierpool.io/zone``: ``restricted`` or ``open`` (default ``open``);
- ``tierpool.io/capability``: 1-5 (default 1);
- ``tierpool.io/port``: the port of the endpoint (default ``TIERPOOL_POD_PORT``).

A pod whose values are wrong (``zone: restrictd``) is never placed: it is
treated as not ready, with the problem logged, rather than guessed at.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import msgspec
from lightkube.resources.core_v1 import Pod

from tierpool.core.settings import Settings
from tierpool.schemas import PodRegister

ZONE_KEY: Final = "tierpool.io/zone"
CAPABILITY_KEY: Final = "tierpool.io/capability"
PORT_KEY: Final = "tierpool.io/port"

SOURCE_LABEL: Final = "tierpool.io/source"
"""Label the leader writes on the pods it registers (value ``kubernetes``):
how a new leader tells its pods from pods that run the agent."""
SOURCE_VALUE: Final = "kubernetes"
READY_LABEL: Final = "tierpool.io/ready"
"""``true``/``false``: what Kubernetes said when the leader last wrote the pod.
``false`` means the drain mark is the source's own, to lift when it turns ready."""


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a ready pod is reached and what it may serve."""

    endpoint: str
    zone: str
    capability: int


@dataclass(frozen=True, slots=True)
class Observed:
    """One pod as the watch reported it."""

    name: str
    ready: bool
    placement: Placement | None
    """None while the pod has no IP or its values are wrong (``problem``)."""
    problem: str | None = None

    @property
    def placeable(self) -> bool:
        return self.ready and self.placement is not None


def observe(pod: Pod, settings: Settings) -> Observed:
    """What Kubernetes says about ``pod``, in the pool's terms."""
    meta = pod.metadata
    name = (meta.name if meta else None) or ""
    status = pod.status
    ip = status.podIP if status else None
    ready = (
        status is not None
        and status.phase == "Running"
        and any(c.type == "Ready" and c.status == "True" for c in status.conditions or ())
        and bool(ip)
        and (meta is None or meta.deletionTimestamp is None)
    )
    if not ip:
        return Observed(name, ready=False, placement=None)
    labels = (meta.labels if meta else None) or {}
    notes = {**labels, **((meta.annotations if meta else None) or {})}
    problems: list[str] = []
    zone = notes.get(ZONE_KEY, "open")
    if zone not in ("open", "restricted"):
        problems.append(f"{ZONE_KEY}={zone!r} is neither open nor restricted")
    capability = _integer(notes.get(CAPABILITY_KEY, "1"), 1, 5, CAPABILITY_KEY, problems)
    port = _integer(notes.get(PORT_KEY, str(settings.pod_port)), 1, 65535, PORT_KEY, problems)
    host = f"[{ip}]" if ":" in ip else ip
    endpoint = settings.pod_endpoint_template.format(
        ip=host, port=port, name=name, namespace=(meta.namespace if meta else None) or ""
    )
    placement = Placement(endpoint, zone, capability)
    if not problems:
        try:
            register_message(name, placement, ready=ready)
        except msgspec.ValidationError as exc:
            problems.append(str(exc))
    if problems:
        return Observed(name, ready=False, placement=None, problem="; ".join(problems))
    return Observed(name, ready=ready, placement=placement)


def register_message(
    name: str, placement: Placement, *, ready: bool, labels: dict[str, str] | None = None
) -> PodRegister:
    """The contract's ``register`` for a watched pod, checked like any pod event.

    ``labels``: the pod's labels to keep (a pod that also runs the agent);
    the source's two labels are set over them.
    """
    return msgspec.convert(
        {
            "event": "register",
            "pod_id": name,
            "endpoint": placement.endpoint,
            "zone": placement.zone,
            "capability": placement.capability,
            "labels": {
                **(labels or {}),
                SOURCE_LABEL: SOURCE_VALUE,
                READY_LABEL: "true" if ready else "false",
            },
        },
        PodRegister,
    )


def _integer(text: str, low: int, high: int, key: str, problems: list[str]) -> int:
    if text.isascii() and text.isdigit() and low <= int(text) <= high:
        return int(text)
    problems.append(f"{key}={text!r} is not a whole number from {low} to {high}")
    return low
