"""``tierpool worker``: one worker process, every role in one anyio task group.

Start order (each with ``tg.start()``, so "started" means really serving):
the HTTP server first (liveness answers while Redis is still away), then the
tier config is loaded (retried until Redis answers), then the config listener
(subscribed before anything is decided with the config), the consumer (its
groups exist), the claimer, the leader candidate, the gauge exporter and the
worker heartbeat. Roles written elsewhere are started only when their module
exists. Then one line: ``worker ready``.

Stop (SIGTERM or SIGINT): stop reading and claiming, let the batch in hand
finish within ``shutdown_grace_s`` (shielded), then cancel every role. An
interrupted batch is not lost: its entries stay pending and another worker
claims them. A second signal cancels at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Mapping
from functools import partial
from typing import Any, Final

import anyio
from anyio.abc import TaskGroup, TaskStatus
from redis.exceptions import ResponseError

from tierpool.core.anchorenv import unused_variable_warnings
from tierpool.core.clock import now_ms
from tierpool.core.errors import SettingsError, find_in_group, write_refusal
from tierpool.core.keys import GROUP
from tierpool.core.settings import Settings, unknown_tierpool_variables
from tierpool.core.signals import stop_on_signals
from tierpool.workers import gauges, http, leader, metrics, multins
from tierpool.workers.claimer import Claimer, remove_consumers
from tierpool.workers.consumer import Consumer
from tierpool.workers.context import WorkerContext
from tierpool.workers.http import MetricsPortBusy
from tierpool.workers.logs import bind, setup_logging
from tierpool.workers.streams import BACKOFF_CAP_S, REDIS_DOWN, LoopControl, Outage

log = logging.getLogger(__name__)

BEAT_S: Final = 2.0
"""How often the worker refreshes its entry in ``tp:{NS}:workers`` (for ``status``)."""
BEAT_FORGET_MS: Final = 3_600_000
"""Entries of ``tp:{NS}:workers`` not refreshed for this long are removed."""
LEAVE_TIMEOUT_S: Final = 2.0

# name -> (module, function): started with ``fn(ctx, task_status=...)`` when present.
Role = Callable[..., Coroutine[Any, Any, Any]]

ROLES: Final[dict[str, Callable[[WorkerContext], Role]]] = {
    "http": lambda ctx: partial(http.serve, ctx),
    "leader": lambda ctx: partial(leader.run_leader, ctx),
    "gauges": lambda ctx: partial(gauges.run_exporter, ctx),
}
"""Roles that ``--without`` can leave out (besides the config listener)."""
ROLE_NAMES: Final = ("config-listener", *ROLES)


def connect_metrics(ctx: WorkerContext) -> None:
    """Hook the process's per-pool counters to the config cache, and
    export every counter at 0 before anything happens (contract v1.1)."""
    ctx.cache.on_change.append(lambda snap: metrics.config_version.set(snap.version))
    ctx.cache.on_change.append(lambda snap: metrics.export_pools(snap.config.pools))
    metrics.export_from_start()


class Worker:
    """Every role of one worker process, started and stopped together."""

    def __init__(self, ctx: WorkerContext, *, without: frozenset[str] = frozenset()) -> None:
        self.ctx = ctx
        self.without = without
        self.outage = Outage(ctx.health, ctx.epoch)
        self.consumer = Consumer(ctx, self.outage)
        self.claimer = Claimer(ctx, self.outage, self.consumer.processor)
        self.ready = anyio.Event()
        self._stop = anyio.Event()
        self._startup: anyio.CancelScope | None = None
        self._tg: TaskGroup | None = None
        self._loops: list[LoopControl] = []

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start every role, serve until :meth:`stop`, then shut down in two phases."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                with anyio.CancelScope() as startup:
                    self._startup = startup
                    if self._stop.is_set():
                        startup.cancel()
                    await self._start_roles(tg)
                    log.info(
                        "worker ready",
                        extra={
                            "worker_id": self.ctx.worker_id,
                            "namespace": self.ctx.keys.namespace,
                        },
                    )
                    self.ready.set()
                self._startup = None
                task_status.started()
                await self._stop.wait()
                await self._drain()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._leave()

    def stop(self) -> None:
        """Begin the two-phase shutdown. Safe to call twice, and before the start ends."""
        self._stop.set()
        if self._startup is not None:
            self._startup.cancel()

    def kill(self) -> None:
        """Cancel everything now, the batch in hand too (its entries stay pending)."""
        self.stop()
        for loop in (self.consumer.control, self.claimer.control):
            loop.kill()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    async def _start_roles(self, tg: TaskGroup) -> None:
        ctx = self.ctx
        if "http" not in self.without:
            await tg.start(ROLES["http"](ctx))
        # The cache reports its own readiness and keeps the version gauge current.
        ctx.cache.health = ctx.health
        connect_metrics(ctx)
        await self._load_config()
        if "config-listener" not in self.without:
            await tg.start(ctx.cache.run)
        await tg.start(self.consumer.run)
        self._loops.append(self.consumer.control)
        await tg.start(self.claimer.run)
        self._loops.append(self.claimer.control)
        for name in ("leader", "gauges"):
            if name not in self.without:
                await tg.start(ROLES[name](ctx))
        await tg.start(self._beat)

    async def _load_config(self) -> None:
        """The first config read: retried until Redis answers (a stop cancels it)."""
        complaint = ""
        while True:
            try:
                snap = await self.ctx.cache.refresh()
            except REDIS_DOWN as exc:
                await self.outage.backoff(exc, "loading the tier config")
                continue
            except Exception as exc:  # e.g. a stored config that does not parse
                if str(exc) != complaint:
                    complaint = str(exc)
                    log.error("cannot load the tier config from Redis (%s); retrying", exc)
                await anyio.sleep(BACKOFF_CAP_S)
                continue
            self.outage.ok()
            self.ctx.health.config_loaded = True
            metrics.config_version.set(snap.version)
            return

    async def _beat(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep this worker's entry in ``tp:{NS}:workers`` fresh; forget long-gone ones."""
        task_status.started()
        key = self.ctx.keys.workers
        while True:
            now = now_ms()
            try:
                async with self.ctx.redis.pipeline(transaction=False) as pipe:
                    pipe.zadd(key, {self.ctx.worker_id: now})
                    pipe.zremrangebyscore(key, "-inf", now - BEAT_FORGET_MS)
                    await pipe.execute()
            except REDIS_DOWN:
                pass  # the consumer reports the outage; the next beat tries again
            except ResponseError as exc:
                if write_refusal(exc) is None:  # refusals are the processor's to report
                    log.exception("worker heartbeat failed")
            except Exception:
                log.exception("worker heartbeat failed")
            await anyio.sleep(BEAT_S)

    async def _drain(self) -> None:
        """Phase one of the stop: no new reads, the batches in hand finish or time out."""
        grace = self.ctx.settings.shutdown_grace_s
        log.info("worker stopping", extra={"grace_s": grace})
        self.consumer.stop(grace)
        self.claimer.stop(grace)
        with anyio.move_on_after(grace + 1.0):
            for loop in self._loops:
                await loop.done.wait()

    async def _leave(self) -> None:
        """Say goodbye: leave the workers set and, when it owns nothing, the group."""
        ctx = self.ctx
        with anyio.move_on_after(LEAVE_TIMEOUT_S):
            try:
                await ctx.redis.zrem(ctx.keys.workers, ctx.worker_id)
                if all(loop.done.is_set() for loop in self._loops) and self._loops:
                    await self._leave_group()
            except Exception as exc:  # best effort: the claimer tidies up later
                log.info("could not leave cleanly: %s", exc)
        with anyio.move_on_after(LEAVE_TIMEOUT_S):
            await ctx.redis.aclose()

    async def _leave_group(self) -> None:
        ctx = self.ctx
        streams = ctx.keys.all_input_streams
        async with ctx.redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xpending(stream, GROUP)
            answers = await pipe.execute(raise_on_error=False)
        mine = []
        for stream, summary in zip(streams, answers, strict=True):
            if isinstance(summary, dict):
                owners = {c["name"]: c["pending"] for c in summary.get("consumers") or ()}
                if owners.get(ctx.worker_id, 0) == 0:
                    mine.append((stream, ctx.worker_id))
        await remove_consumers(ctx.redis, mine)


# --- the command -------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument(
        "--without",
        action="append",
        default=[],
        choices=ROLE_NAMES,
        metavar="ROLE",
        help=f"do not start this role (repeatable; one of {', '.join(ROLE_NAMES)}). "
        "The consumer and the claimer always run.",
    )


def _bind_log_fields(ctx: WorkerContext) -> None:
    bind(worker_id=ctx.worker_id, namespace=ctx.keys.namespace)


async def _watch_signals(worker: Worker) -> None:
    await stop_on_signals(worker, log, "stopping")


async def serve(settings: Settings, without: frozenset[str] = frozenset()) -> None:
    """Run one worker until a signal stops it."""
    ctx = WorkerContext.create(settings)
    _bind_log_fields(ctx)
    worker = Worker(ctx, without=without)
    async with anyio.create_task_group() as tg:
        tg.start_soon(_watch_signals, worker)
        await worker.run()
        tg.cancel_scope.cancel()
    log.info("worker stopped")


def warn_about_anchor_settings(settings: Settings, env: Mapping[str, str] = os.environ) -> None:
    """One warning per smart-router variable the worker does not use, and per
    thing in ``TIER_CONFIG`` it reads differently: a migrated deployment starts,
    and its operator learns what to change (docs/migrating-from-smart-router.md)."""
    for text in unused_variable_warnings("worker", env):
        log.warning(text)
    for note in settings.tier_config_notes():
        log.warning("TIER_CONFIG: %s", note)


def main(args: argparse.Namespace) -> int:
    names = multins.namespaces_of(os.environ.get("TIERPOOL_NAMESPACE"))
    env = dict(os.environ)
    if len(names) > 1:  # one child process per namespace (workers/multins.py)
        why = multins.problem(names)
        if why:
            sys.stderr.write(f"tierpool worker: TIERPOOL_NAMESPACE: {why}\n")
            return 2
        env["TIERPOOL_NAMESPACE"] = names[0]  # the other settings are checked here, once
    try:
        settings = Settings.from_env(env)
    except SettingsError as exc:
        sys.stderr.write(f"tierpool worker: {exc}\n")
        return 2
    setup_logging(settings)
    if len(names) > 1:
        argv = [arg for role in getattr(args, "without", None) or () for arg in ("--without", role)]
        return multins.run(names, settings.metrics_port, argv)
    for name in unknown_tierpool_variables():
        log.warning("unknown variable %s ignored (a typo?)", name)
    warn_about_anchor_settings(settings)
    try:
        anyio.run(serve, settings, frozenset(getattr(args, "without", None) or ()))
    except Exception as exc:
        busy = find_in_group(exc, MetricsPortBusy)
        if busy is not None:  # a setting that cannot work: one line, like a settings error
            sys.stderr.write(f"tierpool worker: {busy}\n")
            return 2
        log.exception("worker failed")
        return 1
    return 0
