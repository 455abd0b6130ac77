"""The consumer loop: read the input streams as one group member, process batches.

One ``XREADGROUP`` reads all five input streams (four request streams and
the pods stream) at once. A batch is decoded at the edge (``schemas``);
entries that cannot be processed are dead-lettered (``invalid`` reply when
their request id is usable, dead-letter entry and XACK in one script), and
the rest go to :meth:`core.state.PoolState.run` in one pipelined round trip.
A bad entry never costs the batch: each one is judged on its own.

Nothing is acknowledged here: the scripts XACK as part of the state change,
so an entry whose batch is interrupted (a crash, a shutdown past its grace
period, Redis going away) simply stays pending and the claimer hands it to
a live worker, where the scripts' pending check makes a repeat harmless.
"""

from __future__ import annotations

import logging
from typing import Final

import anyio
from anyio.abc import TaskStatus
from redis.exceptions import ResponseError

from tierpool.core.errors import write_refusal
from tierpool.core.keys import GROUP
from tierpool.workers import metrics
from tierpool.workers.context import WorkerContext
from tierpool.workers.processor import Processor
from tierpool.workers.streams import (
    REDIS_DOWN,
    Delivery,
    LoopControl,
    Outage,
    ensure_groups,
    is_nogroup,
    parse_read,
)

log = logging.getLogger(__name__)

MAX_BLOCK_MS: Final = 25_000
"""Cap on XREADGROUP BLOCK: it must stay below the client's socket timeout (30 s)."""
WAIT_RETRY_MS: Final = 200
"""XREADGROUP BLOCK while allocations wait for a quarantined pod's heartbeat:
how often they are tried again when no new entry arrives."""


class Consumer:
    """The group member of this process: reads batches until stopped."""

    def __init__(self, ctx: WorkerContext, outage: Outage | None = None) -> None:
        self.ctx = ctx
        self.outage = outage or Outage(ctx.health, ctx.epoch)
        self.processor = Processor(ctx)
        self.control = LoopControl()
        self.streams = ctx.keys.all_input_streams
        self.batches = 0
        self.waiting: list[Delivery] = []
        """Allocations waiting for a quarantined pod's heartbeat (``allocate.lua``
        answered ``wait``): run again after each batch, still pending meanwhile."""

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Join the group (retrying until Redis answers), report started, consume."""
        try:
            await self.join()
            task_status.started()
            while not self.control.stopping:
                batch = await self._read()
                if batch or self.waiting:
                    await self._handle(batch)
        finally:
            self.control.done.set()

    def stop(self, grace_s: float | None = None) -> None:
        """Stop reading; the batch in hand gets ``grace_s`` (default: the setting)."""
        self.control.stop(self.ctx.settings.shutdown_grace_s if grace_s is None else grace_s)

    async def join(self) -> None:
        """Create the groups that are missing; retry until Redis answers (or a stop)."""
        while not self.control.stopping:
            with self.control.waiting():
                try:
                    await ensure_groups(self.ctx.redis, self.streams, self.ctx.keys)
                except (*REDIS_DOWN, ResponseError) as exc:
                    self.ctx.health.group_joined = False
                    await self.outage.backoff(exc, "creating consumer groups")
                    continue
                self.outage.ok()
                self.ctx.health.group_joined = True
                return

    async def _read(self) -> list[Delivery]:
        streams = dict.fromkeys(self.streams, ">")
        block = min(self.ctx.settings.block_ms, MAX_BLOCK_MS)
        if self.waiting:
            block = min(block, WAIT_RETRY_MS)
        lost_group = False
        with self.control.waiting():
            try:
                resp = await self.ctx.redis.xreadgroup(
                    GROUP,
                    self.ctx.worker_id,
                    streams,  # type: ignore[arg-type]
                    count=self.ctx.settings.batch_size,
                    block=block,
                )
            except ResponseError as exc:
                if not is_nogroup(exc):
                    reason = write_refusal(exc)
                    if reason is not None:  # a replica, a busy script: /readyz says so
                        self.processor.refusals.refused(reason, 0)
                    await self.outage.backoff(exc, "reading")
                    return []
                lost_group = True
            except REDIS_DOWN as exc:
                await self.outage.backoff(exc, "reading")
                return []
            except Exception as exc:  # a client-side failure: keep the loop alive
                log.exception("XREADGROUP failed")
                metrics.worker_errors_total.labels("consumer").inc()
                await self.outage.backoff(exc, "reading")
                return []
            else:
                self.outage.ok()
                return parse_read(resp)
        if lost_group:
            log.warning(
                "consumer group %r is gone (Redis lost its data?); creating it again", GROUP
            )
            self.ctx.health.group_joined = False
            await self.join()
        return []

    async def _handle(self, batch: list[Delivery]) -> None:
        """Process a batch; what Redis refuses is retried here, in place, until written.

        The allocations still waiting for a quarantined pod's heartbeat go
        after the new entries, so a heartbeat read now frees its pod first.
        """
        todo, self.waiting = [*batch, *self.waiting], []
        try:
            self.waiting = await self.processor.process_until_written(todo, self.control)
        except Exception:
            log.exception("a batch of %d failed; it stays pending and will be claimed", len(batch))
            metrics.worker_errors_total.labels("consumer").inc()
        self.batches += 1
