"""The leader's repairs: assignment and rebalancing, zombie cleanup, gauges.

Redis is the truth here (the anchor listed Kubernetes pods, §4): pods come
from registration and heartbeats, so reconciling means giving unassigned
pods a pool and moving idle pods toward the targets. Planning is pure Python
over one consistent read (a MULTI of HGETALLs); every change is one fenced
``move.lua`` call that re-checks the pod atomically (still in that pool, no
call, no drain mark), and all moves of a cycle go in one pipelined round trip.
A read that fails raises: nothing is planned from a partial view, so a Redis
error is never mistaken for "missing" (the anchor's zombie storm, §9).

Every function here takes the leader's fencing token and reports ``fenced``
when a script refused it; the caller must then stop leading. A ``stale``
answer (Redis holds a newer config) refreshes the snapshot and retries.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
from redis.asyncio import Redis

from tierpool.core.clock import redis_time_ms
from tierpool.core.keys import Keys
from tierpool.core.placement import join_candidates
from tierpool.core.scripts import run_calls, run_one
from tierpool.core.snapshot import ConfigSnapshot, dedicated_pools, retry_stale
from tierpool.core.state import PoolState
from tierpool.core.tierconfig import Zone, pod_may_join

log = logging.getLogger(__name__)

REAP_BATCH = 500
"""Items of each kind one reap call handles: bounds how long the script blocks Redis."""
MAX_REAP_BATCHES = 100

Status = Literal["ok", "fenced", "stale"]


# --- reading -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PodView:
    pod: str
    pool: str
    load: int
    zone: Zone
    capability: int
    draining: bool
    alive: bool

    @property
    def idle(self) -> bool:
        """May leave its pool: no call, no drain mark, heard from within POD_TTL."""
        return self.load == 0 and not self.draining and self.alive


@dataclass(frozen=True, slots=True)
class PoolView:
    """Every registered pod, read in one atomic round trip."""

    pods: dict[str, PodView]
    counts: dict[str, int]
    """``pool:count`` as stored (the scripts' counts; checked against ``pods``)."""
    now_ms: int


async def read_view(
    redis: Redis, keys: Keys, pod_ttl_ms: int, now_ms: int | None = None
) -> PoolView:
    """Read pod state in one MULTI (consistent). Raises on any Redis error."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.time()
        pipe.hgetall(keys.pod_pool)
        pipe.hgetall(keys.pod_load)
        pipe.hgetall(keys.pod_zone)
        pipe.hgetall(keys.pod_capability)
        pipe.zrange(keys.pod_draining, 0, -1)
        pipe.zrange(keys.pod_seen, 0, -1, withscores=True)
        pipe.hgetall(keys.pool_count)
        server_time, pools, loads, zones, caps, draining, seen, counts = await pipe.execute()
    if now_ms is None:
        now_ms = redis_time_ms(server_time)
    marked = set(draining)
    last_seen = {pod: int(score) for pod, score in seen}
    pods = {
        pod: PodView(
            pod=pod,
            pool=pool,
            load=int(loads.get(pod) or 0),
            zone="restricted" if zones.get(pod) == "restricted" else "open",
            capability=int(caps.get(pod) or 1),
            draining=pod in marked,
            alive=last_seen.get(pod, -pod_ttl_ms - 1) + pod_ttl_ms >= now_ms,
        )
        for pod, pool in pools.items()
    }
    return PoolView(pods, {p: int(n) for p, n in counts.items()}, now_ms)


# --- planning ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Move:
    pod: str
    source: str
    """The pod's pool when read ("" = unassigned); move.lua refuses if it changed."""
    dest: str
    reason: Literal["assign", "rebalance"]


def plan(view: PoolView, snap: ConfigSnapshot) -> list[Move]:
    """Assignments, then rebalancing moves, from one view (anchor §5, §6).

    Assignment: dedicated pools below target first, then the default chain in
    order, among the pools the pod may join (zone, capability); when all are
    full, the last chain pool it may join. Rebalancing moves only idle pods
    (no call, no drain mark, alive) to pools they may join: pass 1 from
    over-target chain pools (in chain order) to the first under-target chain
    pool; pass 2 from over-target dedicated pools to under-target dedicated
    then chain pools, and from over-target chain pools to under-target
    dedicated pools. Counts include busy and draining pods, as the anchor's.
    """
    cfg = snap.config
    counts: Counter[str] = Counter(p.pool for p in view.pods.values() if p.pool in cfg)
    moves: list[Move] = []

    unassigned = [p for p in view.pods.values() if p.pool not in cfg and p.alive]
    for pod in sorted(unassigned, key=_by_id):
        cands, fallback = join_candidates(snap, pod.zone, pod.capability)
        dest = next((name for name, target in cands if counts[name] < target), fallback)
        if dest:
            moves.append(Move(pod.pod, pod.pool, dest, "assign"))
            counts[dest] += 1

    chain = list(cfg.default_chain)
    dedicated = [p for p in cfg.pools if p in dedicated_pools(cfg)]
    delta = {p: counts[p] - cfg.tier(p).target for p in cfg.pools}
    idle: dict[str, list[PodView]] = {p: [] for p in cfg.pools}
    for pod in sorted(view.pods.values(), key=_by_id):
        if pod.pool in idle and pod.idle:
            idle[pod.pool].append(pod)

    def shift(sources: Iterable[str], dests: Sequence[str]) -> None:
        for src in sources:
            movable = idle[src]
            while delta[src] > 0 and movable:
                pod = movable.pop(0)
                dest = next(
                    (
                        d
                        for d in dests
                        if delta[d] < 0 and pod_may_join(cfg.tier(d), pod.zone, pod.capability)
                    ),
                    None,
                )
                if dest is None:
                    continue  # this pod fits no pool in need; another one may
                moves.append(Move(pod.pod, src, dest, "rebalance"))
                delta[src] -= 1
                delta[dest] += 1

    if any(delta[p] > 0 for p in chain) and any(delta[p] < 0 for p in chain):
        shift(chain, chain)
    shift(dedicated, [*dedicated, *chain])
    shift(chain, dedicated)
    return moves


def _by_id(pod: PodView) -> str:
    return pod.pod


# --- applying ------------------------------------------------------------------
@dataclass(slots=True)
class ReconcileResult:
    status: Status = "ok"
    planned: list[Move] = field(default_factory=list)
    moved: list[Move] = field(default_factory=list)
    skipped: list[tuple[Move, str]] = field(default_factory=list)
    errors: list[tuple[Move, str]] = field(default_factory=list)
    count_drift: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Pools whose stored count differs from their pods: pool -> (stored, counted)."""


async def apply_moves(
    state: PoolState,
    snap: ConfigSnapshot,
    token: str,
    moves: Sequence[Move],
    now_ms: int | None = None,
) -> ReconcileResult:
    """Send every move as one fenced ``move.lua`` call, all in one pipeline."""
    result = ReconcileResult(planned=list(moves))
    if not moves:
        return result
    calls = [
        state.leader_call("move", snap, (token, m.pod, m.source, m.dest, m.reason), now_ms=now_ms)
        for m in moves
    ]
    for move, answer in zip(moves, await run_calls(state.redis, calls), strict=True):
        if isinstance(answer, BaseException) or not isinstance(answer, list) or not answer:
            result.errors.append((move, str(answer)))
            continue
        status = str(answer[0])
        if status == "moved":
            result.moved.append(move)
        elif status == "skipped":
            result.skipped.append((move, str(answer[1])))
        elif status == "fenced":
            result.status = "fenced"
        elif status == "stale":
            if result.status != "fenced":
                result.status = "stale"
        else:
            result.errors.append((move, f"unexpected answer {answer!r}"))
    return result


async def reconcile(state: PoolState, token: str, now_ms: int | None = None) -> ReconcileResult:
    """One reconcile cycle: read, plan, move. Retries on a stale config."""

    async def attempt(snap: ConfigSnapshot) -> ReconcileResult:
        view = await read_view(state.redis, state.keys, state.settings.pod_ttl_ms, now_ms)
        result = await apply_moves(state, snap, token, plan(view, snap), now_ms)
        counted = Counter(p.pool for p in view.pods.values() if p.pool)
        result.count_drift = {
            p: (view.counts.get(p, 0), counted.get(p, 0))
            for p in {*view.counts, *counted}
            if view.counts.get(p, 0) != counted.get(p, 0)
        }
        return result

    return await retry_stale(state.source, attempt, lambda r: r.status == "stale")


# --- zombie cleanup --------------------------------------------------------------
@dataclass(slots=True)
class ReapResult:
    status: Status = "ok"
    leases: int = 0
    """Expired leases ended (``lease_expired`` events)."""
    pods: int = 0
    """Silent pods removed (``pod_lost``; their calls ``call_lost``)."""
    drains: int = 0
    """Lapsed drain marks (``drain_lapsed``): live pods back in their free index."""
    batches: int = 0


async def reap(
    state: PoolState, token: str, *, batch: int = REAP_BATCH, now_ms: int | None = None
) -> ReapResult:
    """Run ``reap.lua`` in batches until one comes back short.

    Each batch is one atomic, fenced script reading the lease, liveness and
    drain indexes (no SCAN). A Redis error raises: what was not reaped now
    is reaped next cycle, and nothing is ever concluded from a failed read.
    """
    result = ReapResult()

    async def one_batch(snap: ConfigSnapshot) -> list[Any]:
        call = state.leader_call("reap", snap, (token, str(batch)), now_ms=now_ms)
        answer = await run_one(state.redis, call)
        assert isinstance(answer, list)
        return answer

    while result.batches < MAX_REAP_BATCHES:
        answer = await retry_stale(state.source, one_batch, _stale_answer)
        status = str(answer[0])
        if status in ("fenced", "stale"):
            result.status = "fenced" if status == "fenced" else "stale"
            return result
        leases, pods, drains = (int(x) for x in answer[1:4])
        more = len(answer) > 4 and str(answer[4]) == "1"  # cut short by its call budget
        result.leases += leases
        result.pods += pods
        result.drains += drains
        result.batches += 1
        if max(leases, pods, drains) < batch and not more:
            break
    return result


def _stale_answer(answer: list[Any]) -> bool:
    return str(answer[0]) == "stale"


# --- gauges ----------------------------------------------------------------------
@dataclass(slots=True)
class GaugesResult:
    status: Status = "ok"
    gauges: dict[str, object] = field(default_factory=dict)


async def publish_gauges(state: PoolState, token: str, now_ms: int | None = None) -> GaugesResult:
    """Compute the pool gauges in Redis (``gauges.lua``) into ``tp:{NS}:gauges``.

    Pool targets are not stored: they are config, which every replica's
    exporter already holds at the same version.
    """

    async def attempt(snap: ConfigSnapshot) -> list[Any]:
        call = state.leader_call(
            "gauges", snap, (token,), extra_keys=(state.keys.gauges,), now_ms=now_ms
        )
        answer = await run_one(state.redis, call)
        assert isinstance(answer, list)
        return answer

    answer = await retry_stale(state.source, attempt, _stale_answer)
    status = str(answer[0])
    if status == "fenced":
        return GaugesResult("fenced")
    if status == "ok":
        return GaugesResult("ok", msgspec.json.decode(answer[1]))
    return GaugesResult("stale")
