"""The leader role of a worker process: campaign, and while leading run the repairs.

Every worker runs :func:`run_leader`; one at a time wins the lease
(:class:`core.leader.Election`). During a term it runs, each in its own loop:

- reconcile (``core.reconcile.reconcile``) at takeover and every
  ``RECONCILE_INTERVAL``: assign unassigned pods, rebalance idle ones;
- reap (``core.reconcile.reap``) at takeover and every ``CLEANUP_INTERVAL``:
  expired leases, silent pods, lapsed drain marks;
- gauges (``core.reconcile.publish_gauges``) every ``GAUGES_INTERVAL_S``, so
  every replica's exporter copies the same figures;
- the replication-history check (``core.epoch``) every ``EPOCH_INTERVAL_S``:
  a failover no worker noticed still quarantines the pods;
- ``core.upstream.run_upstream`` (the upstream tier
  config source; it returns at once when ``TIER_CONFIG_URL`` is unset);
- the pod source, when ``POD_SOURCE`` names one (``tierpool.kube``): its
  writes are fenced by the term's token (``core.podsource.FencedPods``).

A loop that fails logs it and runs again at its next tick; a script that
answers ``fenced`` ends the term at once (the loops are cancelled, the process
keeps running and campaigns again). Cancellation is never swallowed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial

import anyio
from anyio.abc import TaskStatus

from tierpool.core.errors import LeadershipLost, find_in_group, write_refusal
from tierpool.core.leader import Election, Leadership
from tierpool.core.podsource import FencedPods
from tierpool.core.reconcile import publish_gauges, reap, reconcile
from tierpool.core.upstream import run_upstream
from tierpool.workers import metrics
from tierpool.workers.context import WorkerContext

log = logging.getLogger(__name__)

GAUGES_INTERVAL_S = 2.0
"""How often the leader recomputes the pool gauges in Redis."""
EPOCH_INTERVAL_S = 5.0
"""How often the leader compares Redis's replication id with the stored one
(one ``INFO`` and one small script): a failover that no worker noticed is
found within a pod heartbeat or so."""
UPSTREAM_RESTART_S = 5.0
"""Pause before restarting ``run_upstream`` after it failed."""
POD_SOURCE_RESTART_S = 2.0
"""Pause before restarting the pod source after it failed."""

Step = Callable[[], Awaitable[None]]
Upstream = Callable[..., Awaitable[None]]


async def run_leader(
    ctx: WorkerContext, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Campaign forever; lead while elected. Started once per worker process."""
    s = ctx.settings
    election = Election(ctx.redis, ctx.keys, ctx.worker_id, s.leader_lease_ms, s.leader_renew_s)
    await election.run(partial(lead, ctx), task_status=task_status)


async def lead(ctx: WorkerContext, term: Leadership) -> None:
    """One term: flags and metrics up, the loops running until the term ends."""
    s = ctx.settings
    ctx.is_leader = True
    ctx.leader_token = term.token
    metrics.leader.set(1)
    metrics.leader_changes_total.labels(change="gained").inc()
    log.info("leading as %s", term.token)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                _every, "reconcile", s.reconcile_interval_s, partial(reconcile_once, ctx, term)
            )
            tg.start_soon(_every, "reap", s.cleanup_interval_s, partial(reap_once, ctx, term))
            tg.start_soon(_every, "gauges", GAUGES_INTERVAL_S, partial(gauges_once, ctx, term))
            tg.start_soon(_every, "epoch", EPOCH_INTERVAL_S, partial(epoch_once, ctx))
            tg.start_soon(_supervise, run_upstream, ctx, term)
            if ctx.pod_source is not None:
                tg.start_soon(_run_pod_source, ctx, term)
    finally:
        ctx.is_leader = False
        ctx.leader_token = None
        metrics.leader.set(0)
        metrics.leader_changes_total.labels(change="lost").inc()


async def reconcile_once(ctx: WorkerContext, term: Leadership) -> None:
    res = await reconcile(ctx.state, term.token)
    for move in res.moved:
        metrics.moves_total.labels(reason=move.reason).inc()
    if res.moved:
        log.info(
            "reconcile: %d pods moved: %s",
            len(res.moved),
            ", ".join(f"{m.pod} {m.source or '-'}->{m.dest}" for m in res.moved),
        )
    for move, why in res.skipped:
        log.info("reconcile: %s not moved to %s: %s", move.pod, move.dest, why)
    for move, error in res.errors:
        log.warning("reconcile: moving %s to %s failed: %s", move.pod, move.dest, error)
    if res.count_drift:
        log.warning(
            "reconcile: pool counts differ from pods (stored, counted): %s", res.count_drift
        )
    if res.status == "fenced":
        term.step_down("a move was fenced")
    elif res.status == "stale":
        log.warning("reconcile: config kept changing; retrying next cycle")


async def reap_once(ctx: WorkerContext, term: Leadership) -> None:
    res = await reap(ctx.state, term.token)
    for what, n in (("lease", res.leases), ("pod", res.pods), ("drain", res.drains)):
        if n:
            metrics.reaped_total.labels(what=what).inc(n)
    if res.leases or res.pods or res.drains:
        log.info(
            "reap: %d leases expired, %d silent pods removed, %d drain marks lapsed",
            res.leases,
            res.pods,
            res.drains,
        )
    if res.status == "fenced":
        term.step_down("reap was fenced")
    elif res.status == "stale":
        log.warning("reap: config kept changing; retrying next cycle")


async def epoch_once(ctx: WorkerContext) -> None:
    """Look at Redis's replication history even while no message arrives.

    Workers check before their next write after an outage or refusal; this
    tick also catches a failover that none of them noticed (an idle worker
    whose connection moved quietly). One ``INFO`` per tick (core/epoch.py).
    """
    ctx.epoch.mark()
    await ctx.epoch.ensure()


async def gauges_once(ctx: WorkerContext, term: Leadership) -> None:
    res = await publish_gauges(ctx.state, term.token)
    if res.status == "fenced":
        term.step_down("gauges were fenced")
    elif res.status == "stale":
        log.warning("gauges: config kept changing; retrying next cycle")


async def _every(name: str, interval_s: float, step: Step) -> None:
    """Run ``step`` now and then every ``interval_s``; a failure is logged, not fatal."""
    while True:
        try:
            await step()
        except Exception as exc:
            metrics.worker_errors_total.labels(loop=f"leader_{name}").inc()
            refusal = write_refusal(exc)
            if refusal is not None:  # Redis's state, not a bug: one line, no traceback
                log.warning(
                    "leader %s: Redis refused (%s); next try in %.1fs", name, refusal, interval_s
                )
            else:
                log.exception("leader %s failed; next try in %.1fs", name, interval_s)
        await anyio.sleep(interval_s)


async def _supervise(fn: Upstream, ctx: WorkerContext, term: Leadership) -> None:
    def leading() -> bool:
        return ctx.is_leader and not term.lost

    while True:
        try:
            await fn(ctx.redis, ctx.keys, ctx.settings, ctx.cache, leading)
        except Exception:
            metrics.worker_errors_total.labels(loop="leader_upstream").inc()
            log.exception("upstream failed; restarting in %.0fs", UPSTREAM_RESTART_S)
        else:
            return
        await anyio.sleep(UPSTREAM_RESTART_S)


async def _run_pod_source(ctx: WorkerContext, term: Leadership) -> None:
    """Run the pod source for this term; a fenced write ends the term."""
    source = ctx.pod_source
    assert source is not None
    pods = FencedPods(ctx.state, term.token)
    while True:
        try:
            await source.lead(pods, term)
        except Exception as exc:
            lost = find_in_group(exc, LeadershipLost)  # a source's task group wraps it
            if lost is not None:
                log.warning("pod source %s: %s", source.name, lost)
                term.step_down("the pod source was fenced")
                return
            metrics.worker_errors_total.labels(loop="leader_pod_source").inc()
            log.exception(
                "pod source %s failed; restarting in %.0fs", source.name, POD_SOURCE_RESTART_S
            )
        await anyio.sleep(POD_SOURCE_RESTART_S)
