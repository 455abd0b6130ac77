"""``tierpool pods``: every registered pod with its pool, state, load and calls.

Reads the pod hashes in one pipelined round trip and classifies each pod the
way ``gauges.lua`` does (draining, silent, full, busy, free; plus unassigned),
so this listing and the ``tierpool_pods`` gauge agree.
"""

from __future__ import annotations

import argparse
from typing import Any, Final

import msgspec

from tierpool.core.errors import TierConfigError
from tierpool.core.tierconfig import TierConfig, parse_tier_config
from tierpool.workers.ops.common import (
    EXIT_OK,
    Ops,
    add_common,
    ago,
    run,
    table,
    when,
    write,
    write_json,
)

STATES: Final = ("free", "busy", "full", "draining", "silent", "unassigned")


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    add_common(parser)
    parser.add_argument("--pool", help="only pods of this pool ('' = unassigned)")
    parser.add_argument("--state", choices=STATES, help="only pods in this state")
    parser.add_argument("--calls", action="store_true", help="list each pod's call ids")


def main(args: argparse.Namespace) -> int:
    return run(args, _pods)


async def read_pods(ops: Ops) -> tuple[list[dict[str, Any]], int]:
    """Every pod as a dict (sorted by pool, then pod id), and Redis's now in ms."""
    k = ops.keys
    async with ops.redis.pipeline(transaction=False) as pipe:
        pipe.time()
        for key in (
            k.pod_pool,
            k.pod_endpoint,
            k.pod_zone,
            k.pod_capability,
            k.pod_load,
            k.pod_labels,
        ):
            pipe.hgetall(key)
        pipe.zrange(k.pod_calls, 0, -1)
        pipe.zrange(k.pod_seen, 0, -1, withscores=True)
        pipe.zrange(k.pod_draining, 0, -1, withscores=True)
        pipe.get(k.config)
        pipe.get(k.config_version)
        (
            (secs, micros),
            pool,
            endpoint,
            zone,
            cap,
            load,
            labels,
            members,
            seen,
            draining,
            cfg_raw,
            cfg_version,
        ) = await pipe.execute()
    now_ms = int(secs) * 1000 + int(micros) // 1000
    calls: dict[str, list[str]] = {}
    for m in members:
        pod_id, _, call_id = m.partition(" ")
        calls.setdefault(pod_id, []).append(call_id)
    config = _config(cfg_raw, cfg_version)
    seen_ms = {p: int(s) for p, s in seen}
    drain_ms = {p: int(s) for p, s in draining}
    pod_ttl_ms = ops.settings.pod_ttl_ms
    out: list[dict[str, Any]] = []
    for pod, pool_name in pool.items():
        pod_load = int(load.get(pod) or 0)
        tier = config.get(pool_name) if config and pool_name else None
        max_concurrent = tier.max_concurrent if tier else None
        last = seen_ms.get(pod)
        if not pool_name:
            state = "unassigned"
        elif pod in drain_ms:
            state = "draining"
        elif last is None or last + pod_ttl_ms < now_ms:
            state = "silent"
        elif max_concurrent is not None and pod_load >= max_concurrent:
            state = "full"
        else:
            state = "free" if pod_load == 0 else "busy"
        out.append(
            {
                "pod_id": pod,
                "pool": pool_name or None,
                "state": state,
                "zone": zone.get(pod),
                "capability": int(cap[pod]) if cap.get(pod) else None,
                "load": pod_load,
                "max_concurrent": max_concurrent,
                "calls": calls.get(pod, []),
                "last_seen_ms": last,
                "draining_until_ms": drain_ms.get(pod),
                "endpoint": endpoint.get(pod),
                "labels": msgspec.json.decode(labels[pod]) if labels.get(pod) else {},
            }
        )
    out.sort(key=lambda p: (p["pool"] is None, p["pool"] or "", p["pod_id"]))
    return out, now_ms


def _config(raw: str | None, version: str | None) -> TierConfig | None:
    if not raw:
        return None
    try:
        return parse_tier_config(raw, version=int(version or 0), strict=False)
    except TierConfigError:
        return None


async def _pods(ops: Ops) -> int:
    pods, now_ms = await read_pods(ops)
    args = ops.args
    if args.pool is not None:
        pods = [p for p in pods if (p["pool"] or "") == args.pool]
    if args.state:
        pods = [p for p in pods if p["state"] == args.state]
    if ops.json:
        write_json(pods)
        return EXIT_OK
    if not pods:
        write("no pods")
        return EXIT_OK
    rows = []
    for p in pods:
        load = f"{p['load']}/{p['max_concurrent']}" if p["max_concurrent"] else str(p["load"])
        row = [
            p["pod_id"],
            p["pool"] or "-",
            p["state"],
            p["zone"],
            p["capability"],
            load,
            ago(p["last_seen_ms"], now_ms),
            when(p["draining_until_ms"]) if p["draining_until_ms"] else None,
            p["endpoint"],
        ]
        if args.calls:
            row.append(" ".join(p["calls"]) or None)
        rows.append(row)
    headers = ["POD", "POOL", "STATE", "ZONE", "CAP", "CALLS", "SEEN", "DRAINING UNTIL", "ENDPOINT"]
    if args.calls:
        headers.append("CALL IDS")
    write(table(headers, rows))
    counts = {s: sum(1 for p in pods if p["state"] == s) for s in STATES}
    write("\n" + "   ".join(f"{s} {n}" for s, n in counts.items() if n) + f"   total {len(pods)}")
    return EXIT_OK
