"""Placement decisions made in Python, before a script runs.

Which pools a call may try, in which order, and why others were excluded;
which pools a pod may join. These read only a ``ConfigSnapshot``: the
script then checks the snapshot is current and does the atomic part.
"""

from __future__ import annotations

from dataclasses import dataclass

from tierpool.core.snapshot import ConfigSnapshot, dedicated_pools
from tierpool.core.tierconfig import pod_may_join
from tierpool.schemas import AllocateRequest


@dataclass(frozen=True, slots=True)
class Reason:
    filter: str
    detail: str
    suggested_action: str

    def as_dict(self) -> dict[str, str]:
        return {
            "filter": self.filter,
            "detail": self.detail,
            "suggested_action": self.suggested_action,
        }


@dataclass(frozen=True, slots=True)
class Placement:
    """The pools to try, in order, and the reasons others were left out."""

    candidates: tuple[str, ...]
    zone: str  # "restricted" | "any"
    excluded: tuple[Reason, ...]


def place(req: AllocateRequest, snap: ConfigSnapshot) -> Placement:
    """Resolve the chain for one allocation.

    Order: the merchant's dedicated pool, then the merchant's ``fallback``
    when set (an empty list means "the dedicated pool only", unlike the
    anchor where it meant the default chain), else the request's ``chain``,
    else the default chain; then, in flexible mode, every other pool that
    meets zone and capability. Dedicated pools of other merchants are never
    tried, nor dedicated pools nobody owns.
    """
    cfg = snap.config
    policy = snap.merchants.get(req.merchant_id) if req.merchant_id else None
    zone = req.zone
    min_cap = req.min_capability or 1
    order: list[str] = []
    if policy is not None:
        if policy.zone == "restricted":
            zone = "restricted"
        if policy.min_capability:
            min_cap = max(min_cap, policy.min_capability)
        if policy.pool:
            order.append(policy.pool)
    if policy is not None and policy.fallback is not None:
        order.extend(policy.fallback)
    elif req.chain:
        order.extend(req.chain)
    else:
        order.extend(cfg.default_chain)
    widen_from = len(order)
    if req.tier_mode == "flexible":
        order.extend(cfg.pools)

    dedicated = dedicated_pools(cfg)
    owners = snap.pool_owners
    seen: set[str] = set()
    candidates: list[str] = []
    excluded: list[Reason] = []
    for position, name in enumerate(order):
        if name in seen:
            continue
        seen.add(name)
        tier = cfg.get(name)
        if tier is None:
            excluded.append(
                Reason(
                    "config",
                    f"pool {name} is not configured",
                    f"add tier {name} to the tier config or fix the chain",
                )
            )
            continue
        if name in dedicated and owners.get(name) != req.merchant_id:
            if position >= widen_from:
                continue  # flexible mode never widens into a dedicated pool: not a reason
            owner = owners.get(name)
            excluded.append(
                Reason(
                    "merchant",
                    f"pool {name} is dedicated to "
                    + (f"merchant {owner}" if owner else "a merchant pool no merchant owns"),
                    "remove it from the chain, or set this merchant's policy pool to it",
                )
            )
            continue
        if tier.capability < min_cap:
            if position >= widen_from:
                continue
            excluded.append(
                Reason(
                    "capability",
                    f"pool {name} has capability {tier.capability} < required {min_cap}",
                    f"use tier_mode=flexible or add a pool of capability >= {min_cap}",
                )
            )
            continue
        candidates.append(name)
    return Placement(tuple(candidates), zone, tuple(excluded))


def join_candidates(
    snap: ConfigSnapshot, zone: str, capability: int
) -> tuple[list[tuple[str, int]], str]:
    """Pools a pod may join with their targets, and the overflow pool.

    Dedicated (merchant) pools below target first, then the default chain in
    order (the anchor's rule, §5); when every target is met, the last chain
    pool the pod may join takes it (the anchor's overflow rule).
    """
    cfg = snap.config
    dedicated = sorted(dedicated_pools(cfg))
    ordered = [*dedicated, *cfg.default_chain]
    cands = [
        (name, cfg.tier(name).target)
        for name in ordered
        if pod_may_join(cfg.tier(name), zone, capability)  # type: ignore[arg-type]
    ]
    chain_ok = [
        n
        for n in cfg.default_chain
        if pod_may_join(cfg.tier(n), zone, capability)  # type: ignore[arg-type]
    ]
    return cands, (chain_ok[-1] if chain_ok else "")


def session_url_parts(
    base: str, provider: str | None, flow: str | None, template: str | None
) -> tuple[str, str]:
    """The session URL around the pod id, as the anchor built ``ws_url``.

    ``{base}/ws/pod/{pod}/agent/voice/breeze-buddy/{provider}/callback/{template}``
    plus ``/v2`` when flow is v2; defaults twilio, v2, and the template
    ``template`` for Exotel (the anchor's Exotel default), ``order-confirmation``
    for any other provider.
    """
    provider = provider or "twilio"
    flow = flow or "v2"
    template = template or ("template" if provider == "exotel" else "order-confirmation")
    suffix = f"/agent/voice/breeze-buddy/{provider}/callback/{template}"
    if flow == "v2":
        suffix += "/v2"
    return f"{base.rstrip('/')}/ws/pod/", suffix
