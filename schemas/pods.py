"""Pod lifecycle events, the messages of the ``tp:{NS}:pods`` stream.

One stream carries three kinds, told apart by the ``event`` field, so they
form a msgspec tagged union: the tag is written by ``encode`` and checked
by msgspec on decode. ``request_id`` is optional here, unlike on requests:
a pod event gets a reply only when it asks for one.
"""

from __future__ import annotations

from msgspec import Struct

from tierpool.schemas.fields import CallList, Capability, Endpoint, EpochMs, Ident, Labels, PodZone


class _PodEventBase(Struct, frozen=True, kw_only=True, tag_field="event"):
    """Fields every pod event carries."""

    request_id: Ident | None = None
    deadline_ms: EpochMs | None = None
    pod_id: Ident


class PodRegister(_PodEventBase, frozen=True, kw_only=True, tag="register"):
    """A pod announces itself and is assigned a pool.

    ``calls`` (contract v1.1): the calls the pod serves, so that a pod
    registering again after Redis lost its data brings them back (the pod is
    the witness of its own calls). None when absent, as on heartbeats.
    """

    endpoint: Endpoint
    zone: PodZone = "open"
    capability: Capability = 1
    labels: Labels = {}
    calls: CallList | None = None


class PodHeartbeat(_PodEventBase, frozen=True, kw_only=True, tag="heartbeat"):
    """A pod is alive. ``calls`` renews those calls' leases.

    ``calls`` is None when the field is absent (renew nothing, say nothing)
    and ``()`` when the pod says it serves no call: the two must stay apart.
    """

    calls: CallList | None = None


class PodDeregister(_PodEventBase, frozen=True, kw_only=True, tag="deregister"):
    """A pod leaves; its live calls are freed."""


PodEvent = PodRegister | PodHeartbeat | PodDeregister

POD_EVENT_TYPES: dict[str, type[PodEvent]] = {
    "register": PodRegister,
    "heartbeat": PodHeartbeat,
    "deregister": PodDeregister,
}
"""Event tag -> message type, for dispatch before conversion."""
