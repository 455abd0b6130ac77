"""Every environment variable of smart-router (the anchor), and what tierpool does with it.

One table, so that the start-up warnings, the migration guide
(``docs/migrating-from-smart-router.md``) and its test cannot disagree. A
variable is either honoured with the anchor's meaning by some command, or
a deliberate difference whose warning says what to use instead. None is
ignored in silence (contract v1.1, Configuration).

A command warns about a variable that is set (not empty) only when that
command does not use it: ``tierpool worker`` says ``HTTP_PORT`` belongs to
``tierpool gateway``, which uses it without a word.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

Command = Literal["worker", "gateway"]
Use = Literal["all", "worker", "gateway", "kubernetes", "none"]


@dataclass(frozen=True, slots=True)
class AnchorVariable:
    """One anchor variable: who honours it (``use``) and, when that is not every
    command, what to tell an operator who sets it where it has no effect."""

    name: str
    use: Use
    instead: str = ""


ANCHOR_VARIABLES: Final[tuple[AnchorVariable, ...]] = (
    AnchorVariable("REDIS_URL", "all"),
    AnchorVariable(
        "REDIS_POOL_SIZE",
        "none",
        "tierpool opens a fixed few connections per process (one per role), not a pool sized "
        "for request concurrency; scale with worker processes",
    ),
    AnchorVariable(
        "REDIS_MIN_IDLE_CONN",
        "none",
        "each role keeps its own connection open; there are no idle pool connections to keep",
    ),
    AnchorVariable("REDIS_MAX_RETRIES", "all"),
    AnchorVariable("REDIS_DIAL_TIMEOUT", "all"),
    AnchorVariable("HTTP_PORT", "gateway", "the worker serves only METRICS_PORT"),
    AnchorVariable("HTTP_READ_TIMEOUT", "gateway", "the worker's own listener has fixed timeouts"),
    AnchorVariable("HTTP_WRITE_TIMEOUT", "gateway", "the worker's own listener has fixed timeouts"),
    AnchorVariable("HTTP_IDLE_TIMEOUT", "gateway", "the worker's own listener has fixed timeouts"),
    AnchorVariable(
        "HTTP_SHUTDOWN_TIMEOUT",
        "gateway",
        "a worker's stop grace is TIERPOOL_SHUTDOWN_GRACE",
    ),
    AnchorVariable(
        "METRICS_PORT",
        "worker",
        "the gateway serves its metrics on HTTP_PORT at /api/v1/metrics",
    ),
    AnchorVariable("VOICE_AGENT_BASE_URL", "worker"),
    AnchorVariable(
        "NAMESPACE",
        "kubernetes",
        "it is the Kubernetes namespace to watch; tierpool's Redis namespace is TIERPOOL_NAMESPACE",
    ),
    AnchorVariable("POD_LABEL_SELECTOR", "kubernetes"),
    AnchorVariable("POD_NAME", "worker", "the gateway never leads, so it needs no identity"),
    AnchorVariable("CLEANUP_INTERVAL", "worker"),
    AnchorVariable("LEASE_TTL", "worker"),
    AnchorVariable("DRAINING_TTL", "worker"),
    AnchorVariable("RECONCILE_INTERVAL", "worker"),
    AnchorVariable(
        "CALL_INFO_TTL",
        "none",
        "a call's record lives exactly as long as its lease (LEASE_TTL, renewed by the pod's "
        "heartbeats), so no separate safety-net TTL is needed",
    ),
    AnchorVariable("TIER_CONFIG", "worker"),
    AnchorVariable(
        "LEADER_ELECTION_ENABLED",
        "none",
        "workers always elect one leader through a Redis lease (no Kubernetes Lease, no RBAC); "
        "a worker that must never lead runs with --without leader",
    ),
    AnchorVariable(
        "LEADER_ELECTION_NAMESPACE",
        "none",
        "the leader lease is the Redis key tp:{NS}:leader, not a Kubernetes Lease",
    ),
    AnchorVariable(
        "LEADER_ELECTION_LOCK_NAME",
        "none",
        "the leader lease is the Redis key tp:{NS}:leader, not a Kubernetes Lease",
    ),
    AnchorVariable(
        "LEADER_ELECTION_DURATION",
        "none",
        "use TIERPOOL_LEADER_LEASE (default 2s: the anchor's 15s is a 15s leaderless gap)",
    ),
    AnchorVariable(
        "LEADER_ELECTION_RENEW_DEADLINE",
        "none",
        "use TIERPOOL_LEADER_RENEW (default 0.5s, at most half of TIERPOOL_LEADER_LEASE)",
    ),
    AnchorVariable(
        "LEADER_ELECTION_RETRY_PERIOD",
        "none",
        "followers retry every TIERPOOL_LEADER_RENEW",
    ),
    AnchorVariable("LOG_LEVEL", "all"),
    AnchorVariable("LOG_FORMAT", "all"),
)
"""In the order of the anchor's variable reference (seed 003)."""

_BY_NAME: Final = {v.name: v for v in ANCHOR_VARIABLES}


def _pod_source_is_kubernetes(env: Mapping[str, str]) -> bool:
    return env.get("POD_SOURCE", "").strip().lower() == "kubernetes"


def unused_variable_warnings(command: Command, env: Mapping[str, str] = os.environ) -> list[str]:
    """One warning per anchor variable set in ``env`` that ``command`` does not use.

    Each names the variable, says which command (if any) uses it and what
    to use instead. Unknown ``LEADER_ELECTION_*`` names are included: the
    anchor's prefix is a family, and none of it has an effect here.
    """
    names = [v.name for v in ANCHOR_VARIABLES]
    names += sorted(n for n in env if n.startswith("LEADER_ELECTION_") and n not in _BY_NAME)
    out: list[str] = []
    for name in names:
        if not env.get(name, "").strip():
            continue
        var = _BY_NAME.get(name) or AnchorVariable(name, "none", "no LEADER_ELECTION_* applies")
        if var.use in ("all", command):
            continue
        if var.use == "kubernetes":
            if command == "worker" and _pod_source_is_kubernetes(env):
                continue
            where = "read only with POD_SOURCE=kubernetes (the leader watches Kubernetes pods)"
        elif var.use in ("worker", "gateway"):
            where = f"read by `tierpool {var.use}`, not by `tierpool {command}`"
        else:
            where = "has no effect in tierpool"
        tail = f": {var.instead}" if var.instead else ""
        out.append(f"smart-router variable {name} {where}{tail}")
    return out
