"""``tierpool status``: pools, targets, capacity, leader, config version, workers, streams.

One pipelined read (:func:`workers.gauges.read_view`): the pool figures are
the ones the leader last computed with ``gauges.lua``, so they are what every
worker's ``/metrics`` exports. Exit 0 whenever Redis answered, whatever the
state; a script that needs "healthy" reads ``--json``.
"""

from __future__ import annotations

import argparse
from typing import Any

from tierpool.core.errors import TierConfigError
from tierpool.core.tierconfig import TierConfig, parse_tier_config
from tierpool.workers.gauges import POD_STATES, ClusterView, PoolGauges, read_view
from tierpool.workers.ops.common import EXIT_OK, Ops, add_common, ago, run, table, write, write_json


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    add_common(parser)


def main(args: argparse.Namespace) -> int:
    return run(args, _status)


async def _status(ops: Ops) -> int:
    view = await read_view(ops.redis, ops.keys, with_config=True)
    config = _config(view)
    doc = status_doc(view, config, alive_within_ms=ops.settings.claim_min_idle_ms)
    doc["namespace"] = ops.settings.namespace
    if ops.json:
        write_json(doc)
    else:
        write(render(doc, view))
    return EXIT_OK


def _config(view: ClusterView) -> TierConfig | None:
    if not view.config_raw:
        return None
    try:
        return parse_tier_config(view.config_raw, version=view.config_version, strict=False)
    except TierConfigError:
        return None


def status_doc(
    view: ClusterView, config: TierConfig | None, *, alive_within_ms: int
) -> dict[str, Any]:
    """The status as plain data (what ``--json`` prints)."""
    names = list(config.pools) if config else []
    names += [p for p in view.pools if p not in names]
    pools: list[dict[str, Any]] = []
    for name in names:
        tier = config.get(name) if config else None
        g = view.pools.get(name, PoolGauges())
        pools.append(
            {
                "pool": name,
                "type": tier.type if tier else None,
                "target": tier.target if tier else None,
                "max_concurrent": tier.max_concurrent if tier else g.max_concurrent,
                "configured": tier is not None,
                "pods": g.pods,
                **{state: getattr(g, state) for state in POD_STATES},
                "free_capacity": g.free_capacity,
                "calls": g.calls,
            }
        )
    alive = view.workers_alive(alive_within_ms)
    holder = view.leader_holder
    return {
        "config_version": view.config_version if view.config_raw else None,
        "default_chain": list(config.default_chain) if config else [],
        "leader": holder,
        "leader_term": int(view.leader.rsplit(":", 1)[1]) if view.leader else None,
        "workers_alive": len(alive),
        "workers": [
            {"worker_id": w, "last_seen_ms": seen, "alive": w in alive, "leader": w == holder}
            for w, seen in view.workers
        ],
        "gauges_at_ms": view.gauges_at_ms,
        "gauges_age_s": None
        if view.gauges_at_ms is None
        else round(max(0, view.now_ms - view.gauges_at_ms) / 1000, 3),
        "pools": pools,
        "unassigned_pods": view.unassigned,
        "active_calls": view.active_calls,
        "streams": [
            {
                "stream": s.label,
                "length": s.length,
                "consumed": s.consumed,
                "lag": s.lag,
                "pending": s.pending,
                "consumers": s.consumers,
            }
            for s in view.streams
        ],
    }


def render(doc: dict[str, Any], view: ClusterView) -> str:
    """The human-readable status: a header, the pools table, the streams table."""
    version = doc["config_version"]
    leader = doc["leader"] or "none"
    if doc["leader_term"] is not None:
        leader += f" (term {doc['leader_term']})"
    lines = [
        f"namespace {doc['namespace']}   config "
        + (f"v{version}" if version is not None else "not stored yet")
        + f"   leader {leader}   workers alive {doc['workers_alive']}/{len(doc['workers'])}",
    ]
    if doc["gauges_at_ms"] is None:
        lines.append("pool figures: none yet (no leader has computed them)")
    else:
        lines.append(f"pool figures computed {ago(doc['gauges_at_ms'], view.now_ms)}")
    if doc["default_chain"]:
        lines.append("default chain: " + " > ".join(doc["default_chain"]))
    lines.append("")
    rows = [
        [
            p["pool"] + ("" if p["configured"] else " (removed)"),
            p["type"],
            p["target"],
            p["pods"],
            p["free"],
            p["busy"],
            p["full"],
            p["draining"],
            p["silent"],
            p["free_capacity"],
            p["calls"],
        ]
        for p in doc["pools"]
    ]
    lines.append(
        table(
            [
                "POOL",
                "TYPE",
                "TARGET",
                "PODS",
                "FREE",
                "BUSY",
                "FULL",
                "DRAINING",
                "SILENT",
                "FREE CAP",
                "CALLS",
            ],
            rows,
        )
    )
    lines.append("")
    lines.append(f"unassigned pods {doc['unassigned_pods']}   active calls {doc['active_calls']}")
    lines.append("")
    lines.append(
        table(
            ["STREAM", "LENGTH", "LAG", "PENDING", "CONSUMERS"],
            [
                [
                    s["stream"],
                    s["length"],
                    (s["lag"] if s["lag"] is not None else "?") if s["consumed"] else None,
                    s["pending"] if s["consumed"] else None,
                    s["consumers"] if s["consumed"] else None,
                ]
                for s in doc["streams"]
            ],
        )
    )
    return "\n".join(lines)
