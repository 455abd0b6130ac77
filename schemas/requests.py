"""Request messages: one Struct per request stream (allocate, release, drain, config).

Field names are the wire names of CONTRACT.md. Every optional field has a
default, so a producer written against an older contract still decodes
(msgspec schema evolution: add fields with defaults, never change a type).
"""

from __future__ import annotations

from typing import Literal

from msgspec import Struct

from tierpool.schemas.fields import (
    Capability,
    ConfigText,
    DrainAction,
    EpochMs,
    FreeText,
    Ident,
    Name,
    PoolList,
    RequestZone,
    TierMode,
    Version,
)

RequestKind = Literal["allocate", "release", "drain", "config"]


class _RequestBase(Struct, frozen=True, kw_only=True):
    """What every request carries: the id its reply is keyed by, and its deadline."""

    request_id: Ident
    deadline_ms: EpochMs | None = None


class AllocateRequest(_RequestBase, frozen=True, kw_only=True):
    """Place ``call_id`` on a pod. Idempotent per call_id, so retries are safe."""

    call_id: Ident
    merchant_id: Ident | None = None
    chain: PoolList | None = None
    zone: RequestZone = "any"
    min_capability: Capability | None = None
    tier_mode: TierMode = "strict"
    provider: Name | None = None
    flow: Name | None = None
    template: Name | None = None


class ReleaseRequest(_RequestBase, frozen=True, kw_only=True):
    """Free the capacity ``call_id`` holds; ``reason`` only goes to the audit log."""

    call_id: Ident
    reason: FreeText | None = None


class DrainRequest(_RequestBase, frozen=True, kw_only=True):
    """Stop (or resume) giving ``pod_id`` new calls, without touching its live ones."""

    pod_id: Ident
    action: DrainAction = "drain"
    reason: FreeText | None = None


class MerchantPolicy(
    Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True
):
    """A merchant's placement policy, as sent in the ``merchant`` JSON field.

    Unknown keys are rejected rather than ignored: the policy is stored as
    sent, and rejecting keeps an ``api_key`` or any other secret a producer
    pastes in from ever reaching Redis. ``omit_defaults`` keeps the stored
    JSON to the keys that were actually set.
    """

    pool: Name | None = None
    fallback: PoolList | None = None
    zone: RequestZone | None = None
    min_capability: Capability | None = None


class ConfigRequest(_RequestBase, frozen=True, kw_only=True):
    """Replace the tier config, or set or remove one merchant's policy.

    A message with ``merchant_id`` and a ``merchant`` field is a policy change
    (an empty ``merchant`` removes the policy: ``remove_merchant``, which is
    not a wire field of its own); any other config message needs ``config``.
    ``config`` stays raw text because ``core.tierconfig`` owns its three
    formats; decoding only guarantees it is a JSON object.
    """

    config: ConfigText | None = None
    expected_version: Version | None = None
    merchant_id: Ident | None = None
    merchant: MerchantPolicy | None = None
    remove_merchant: bool = False

    @property
    def is_merchant_change(self) -> bool:
        """Whether this message changes a merchant policy rather than the tier config."""
        return self.merchant is not None or self.remove_merchant


Request = AllocateRequest | ReleaseRequest | DrainRequest | ConfigRequest

REQUEST_TYPES: dict[RequestKind, type[Request]] = {
    "allocate": AllocateRequest,
    "release": ReleaseRequest,
    "drain": DrainRequest,
    "config": ConfigRequest,
}
"""The message type carried by each request stream."""

REQUEST_KINDS: tuple[RequestKind, ...] = tuple(REQUEST_TYPES)
"""The request streams, in the order workers read them: the one list of kinds."""
