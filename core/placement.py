"""Placement decisions made in Python, before a script runs.

Which pools a call may try, in which order, and why others were excluded;
which pools a pod may join. These read only a ``ConfigSnapshot``: the
script then checks the snapshot is current and does the atomic part.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tierpool.core.snapshot import ConfigSnapshot, dedicated_pools
from tierpool.core.tierconfig import pod_may_join
from tierpool.schemas import AllocateRequest, Reason


@dataclass(frozen=True, slots=True)
class Placement:
    """The pools to try, in order, and the reasons others were left out.

    ``widen``: pools outside the chain that ``tier_mode=flexible`` would add
    (empty when the request is already flexible); the allocate script names
    them in a rejection only when one of them really has a free pod, so
    "use tier_mode=flexible" is never suggested when it would not help.
    """

    candidates: tuple[str, ...]
    zone: str  # "restricted" | "any"
    excluded: tuple[Reason, ...]
    min_capability: int = 1
    widen: tuple[str, ...] = ()


def place(req: AllocateRequest, snap: ConfigSnapshot) -> Placement:
    """Resolve the chain for one allocation.

    Order: the merchant's dedicated pool, then the merchant's ``fallback``
    when set (an empty list means "the dedicated pool only", unlike the
    anchor where it meant the default chain), else the request's ``chain``,
    else the default chain; then, in flexible mode, every other pool that
    meets zone and capability. A dedicated pool (a tier outside the default
    chain) is tried only for the merchant whose policy names it: never for
    a request without ``merchant_id``, never for another merchant, and by
    nobody while no policy names it (contract v1.1). The allocate script
    checks the same against the stored policy, so a placement bug cannot
    undo it.
    """
    cfg = snap.config
    if req.merchant_id and req.merchant_id in snap.unreadable:
        # Only this merchant is affected: its requests are rejected, with the reason.
        return Placement(
            (),
            req.zone,
            (
                Reason(
                    filter="merchant",
                    detail=f"the stored policy of merchant {req.merchant_id} cannot be read: "
                    f"{snap.unreadable[req.merchant_id]}",
                    suggested_action=(
                        "store the policy again (a config request with merchant_id and "
                        "merchant), or remove it; a policy written by a newer release "
                        "needs that release"
                    ),
                ),
            ),
        )
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
    flexible = req.tier_mode == "flexible"

    dedicated = dedicated_pools(cfg)
    owners = snap.pool_owners

    def usable(name: str) -> bool:
        """Not a dedicated pool, or this request's merchant's own."""
        return name not in dedicated or (
            req.merchant_id is not None and owners.get(name) == req.merchant_id
        )

    qualifying = [n for n in cfg.pools if usable(n) and cfg.tier(n).capability >= min_cap]
    in_order = set(order)
    widen = tuple(n for n in qualifying if n not in in_order)
    seen: set[str] = set()
    candidates: list[str] = []
    excluded: list[Reason] = []
    for name in order:
        if name in seen:
            continue
        seen.add(name)
        tier = cfg.get(name)
        if tier is None:
            excluded.append(
                Reason(
                    filter="config",
                    detail=f"pool {name} is not configured",
                    suggested_action=f"add tier {name} to the tier config or fix the chain",
                    pool=name,
                )
            )
            continue
        reasons: list[Reason] = []
        if not usable(name):
            reasons.append(_dedicated_reason(name, owners.get(name), cfg.default_chain))
        if tier.capability < min_cap:
            reasons.append(
                _capability_reason(name, tier.capability, min_cap, qualifying, widen, flexible)
            )
        if reasons:
            excluded.extend(reasons)
        else:
            candidates.append(name)
    if flexible:
        # Widening adds only pools that qualify: those left out are not reasons.
        candidates.extend(n for n in widen if n not in seen)
    return Placement(
        tuple(candidates),
        zone,
        tuple(excluded),
        min_cap,
        () if flexible else widen,
    )


def _dedicated_reason(name: str, owner: str | None, default_chain: Sequence[str]) -> Reason:
    if owner is None:
        return Reason(
            filter="merchant",
            detail=f"pool {name} is a dedicated pool (not in default_chain) that no merchant "
            "policy names: it serves nobody",
            suggested_action=f"set a merchant policy with pool {name} and send that merchant_id, "
            "or use the default chain",
            pool=name,
        )
    chain = ", ".join(default_chain) or "none configured"
    return Reason(
        filter="merchant",
        detail=(
            f"pool {name} is dedicated to merchant {owner}: it serves only that merchant's requests"
        ),
        suggested_action=(
            f"use pools of the default chain ({chain}), or your merchant's own dedicated pool"
        ),
        pool=name,
    )


def _capability_reason(
    name: str,
    capability: int,
    required: int,
    qualifying: Sequence[str],
    widen: Sequence[str],
    flexible: bool,
) -> Reason:
    detail = (
        f"pool {name} is a capability-{capability} tier, below the required {required}; "
        "a pool's capability is its tier's, so a pod of higher capability in it "
        "does not qualify the pool"
    )
    lower = f"ask for min_capability <= {capability} to use pool {name}"
    if not qualifying:
        action = f"add a tier of capability >= {required} to the tier config, or {lower}"
    elif widen and not flexible:
        # Whether tier_mode=flexible would help depends on free pods there:
        # the allocate script suggests it (a "chain" reason) only when it would.
        action = f"{lower}; pools of capability >= {required} outside the chain: " + ", ".join(
            widen
        )
    else:
        action = f"{lower} (pools {', '.join(qualifying)} qualify and are tried)"
    return Reason(
        filter="capability",
        detail=detail,
        suggested_action=action,
        pool=name,
        required_capability=required,
    )


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
