"""The reply message: one entry on ``tp:{NS}:reply:{REQUEST_ID}``.

The Lua scripts write replies and the client decodes them, so this module
is the client's half of the contract. Its fields are the union of every
status's fields; which are set depends on ``status`` (see CONTRACT.md).
"""

from __future__ import annotations

from typing import Literal

from msgspec import Struct

from tierpool.schemas.fields import CallList, EpochMs, Ident, Name, Version

Status = Literal[
    "allocated",
    "rejected",
    "released",
    "not_found",
    "drained",
    "undrained",
    "applied",
    "conflict",
    "invalid",
    "expired",
    "registered",
    "alive",
    "unknown_pod",
    "deregistered",
]


class Reason(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Why one filter turned a request down, and what the producer could do about it.

    One reason per pool and filter that excludes it (v1.1); ``pool``,
    ``required_zone`` and ``required_capability`` are set where they apply.
    """

    filter: str
    detail: str
    suggested_action: str
    pool: str | None = None
    required_zone: str | None = None
    required_capability: int | None = None


ReplyKind = Literal["allocate", "release", "drain", "config", "pod"]


class Reply(Struct, frozen=True, kw_only=True):
    """The answer to one request or pod event.

    ``kind`` and the echoed ``call_id`` / ``pod_id`` (v1.1) say which request
    a reply answers, so a requester can refuse one that is not its own. On
    ``allocated``, ``pod_id`` is the pod the call was placed on.
    """

    request_id: Ident
    status: Status
    kind: ReplyKind | None = None
    call_id: Ident | None = None
    pod_id: Ident | None = None
    pool: Name | None = None
    endpoint: str | None = None
    session_url: str | None = None
    lease_expires_ms: EpochMs | None = None
    existing: bool | None = None
    reasons: tuple[Reason, ...] | None = None
    error: str | None = None
    config_version: Version | None = None
    merchants_version: Version | None = None
    calls: CallList | None = None
    was_draining: bool | None = None
    """On ``released``: the pod was draining, so the freed capacity stays out of
    service (the anchor's release reply field, v1.1)."""
