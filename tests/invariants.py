"""Check the pool invariants against what Redis holds.

Used after every step of the stateful test and at the end of crash tests.
Returns a list of violations (empty = all good) so a failure names them all.
"""

from __future__ import annotations

from typing import Any

import msgspec
from redis.asyncio import Redis

from tierpool.core.keys import Keys
from tierpool.core.tierconfig import TierConfig


async def read_state(r: Redis, keys: Keys, config: TierConfig) -> dict[str, Any]:
    async with r.pipeline(transaction=True) as pipe:
        for k in (
            keys.pod_pool,
            keys.pod_zone,
            keys.pod_load,
            keys.pod_capability,
            keys.calls,
            keys.pool_count,
        ):
            pipe.hgetall(k)
        pipe.zrange(keys.pod_calls, 0, -1)
        pipe.zrange(keys.pod_seen, 0, -1, withscores=True)
        pipe.zrange(keys.pod_draining, 0, -1)
        pipe.zrange(keys.leases, 0, -1, withscores=True)
        pipe.smembers(keys.pod_unwitnessed)
        for name in config.pools:
            pipe.zrange(keys.pool_free(name, "open"), 0, -1, withscores=True)
            pipe.zrange(keys.pool_free(name, "restricted"), 0, -1, withscores=True)
        res = await pipe.execute()
    pools, zones, loads, caps, calls, counts, members, seen, draining, leases, unwit = res[:11]
    free: dict[tuple[str, str], dict[str, float]] = {}
    for i, name in enumerate(config.pools):
        free[(name, "open")] = dict(res[11 + 2 * i])
        free[(name, "restricted")] = dict(res[12 + 2 * i])
    pod_calls: dict[str, list[str]] = {p: [] for p in pools}
    for m in members:
        pod, _, call = m.partition(" ")
        pod_calls.setdefault(pod, []).append(call)
    return {
        "pools": pools,
        "zones": zones,
        "caps": {p: int(v) for p, v in caps.items()},
        "loads": {p: int(v) for p, v in loads.items()},
        "pod_calls": pod_calls,
        "calls": {c: msgspec.json.decode(v) for c, v in calls.items()},
        "counts": {p: int(v) for p, v in counts.items()},
        "seen": dict(seen),
        "draining": set(draining),
        "leases": dict(leases),
        "unwitnessed": set(unwit),
        "free": free,
    }


async def violations(
    r: Redis,
    keys: Keys,
    config: TierConfig,
    *,
    now_ms: float,
    pod_ttl_ms: float,
    owners: dict[str, str] | None = None,
    config_changed: bool = False,
) -> list[str]:
    """Every broken invariant, described. ``owners``: dedicated pool -> merchant.

    ``config_changed``: a config change may have lowered max_concurrent below
    a pod's live calls (they go on; the pod takes nothing new until below the
    new limit), so the static "load <= max" check does not apply; callers then
    check each allocation against the max in force when it was made.
    """
    s = await read_state(r, keys, config)
    out: list[str] = []
    # every live call on exactly one live pod, listed by it; load == its calls
    listed: dict[str, str] = {}
    for pod, cs in s["pod_calls"].items():
        for c in cs:
            if c in listed:
                out.append(f"call {c} listed by pods {listed[c]} and {pod}")
            listed[c] = pod
        if s["loads"].get(pod, 0) != len(cs):
            out.append(f"pod {pod}: load {s['loads'].get(pod)} but {len(cs)} calls {cs}")
    for c, rec in s["calls"].items():
        pod = rec["pod"]
        if pod not in s["pools"]:
            out.append(f"call {c} on unregistered pod {pod}")
        if listed.get(c) != pod:
            out.append(f"call {c} record says {pod}, pod list says {listed.get(c)}")
        if c not in s["leases"]:
            out.append(f"call {c} has no lease")
        if rec.get("rzone") == "restricted" and rec.get("zone") != "restricted":
            out.append(f"restricted call {c} on open pod {pod}")
        # the pod as it is now, not only as the record saw it (a pod cannot
        # change zone or lower its capability under a call that needs them)
        if rec.get("rzone") == "restricted" and s["zones"].get(pod) != "restricted":
            out.append(f"restricted call {c} on pod {pod}, now of zone {s['zones'].get(pod)}")
        if int(rec.get("rcap") or 1) > s["caps"].get(pod, 1):
            out.append(
                f"call {c} requires capability {rec.get('rcap')}, pod {pod} now has "
                f"{s['caps'].get(pod)}"
            )
        if owners and rec["pool"] in owners and rec.get("merchant") != owners[rec["pool"]]:
            out.append(
                f"call {c} of merchant {rec.get('merchant')!r} in dedicated pool "
                f"{rec['pool']} of {owners[rec['pool']]}"
            )
    for c in listed:
        if c not in s["calls"]:
            out.append(f"pod {listed[c]} lists call {c} that has no record")
    # capacity: never above max for pods of a configured pool
    for pod, pool in s["pools"].items():
        tier = config.get(pool) if pool else None
        if not config_changed and tier is not None and s["loads"].get(pod, 0) > tier.max_concurrent:
            out.append(f"pod {pod} in {pool}: load {s['loads'][pod]} > max {tier.max_concurrent}")
    # only registered pods are quarantined (a pod that leaves takes its mark)
    if s["unwitnessed"] - set(s["pools"]):
        out.append(f"unregistered pods marked unwitnessed: {s['unwitnessed'] - set(s['pools'])}")
    # pool counts equal the pods assigned
    counted: dict[str, int] = {}
    for pool in s["pools"].values():
        if pool:
            counted[pool] = counted.get(pool, 0) + 1
    if counted != s["counts"]:
        out.append(f"pool counts {s['counts']} but pods assigned {counted}")
    # free-index invariant: exactly the pods that can take a call, scored by
    # load; a pod that went silent leaves lazily (when an allocation finds it
    # at the head, or the reaper removes it), so it may still be there.
    for (pool, zone), members in s["free"].items():
        tier = config.tier(pool)
        could = {
            pod: float(s["loads"].get(pod, 0))
            for pod, p in s["pools"].items()
            if p == pool
            and s["zones"].get(pod) == zone
            and pod not in s["draining"]
            and pod not in s["unwitnessed"]
            and s["loads"].get(pod, 0) < tier.max_concurrent
        }
        want = {
            pod: load
            for pod, load in could.items()
            if s["seen"].get(pod, -1e18) + pod_ttl_ms >= now_ms
        }
        extra = {pod: load for pod, load in members.items() if pod not in want}
        if {pod: members.get(pod) for pod in want} != want or any(
            could.get(pod) != load for pod, load in extra.items()
        ):
            out.append(f"free index {pool}/{zone} = {members}, expected {want} (+ silent pods)")
    return out
