"""The claimer: hand entries a silent consumer left pending to this worker.

Every ``claim_interval_s`` it ``XAUTOCLAIM``s, on each input stream, the
entries pending for longer than ``claim_min_idle_ms`` (a live worker answers
well within that: the setting must exceed ``block_ms``) and processes them
exactly as fresh ones; the scripts' pending check turns a repeat into a
harmless ``dup``. An entry delivered more than ``max_deliveries`` times is
dead-lettered instead, so a message that fails every time cannot circle
forever. The same tick keeps the streams trimmed and removes consumers that
are long gone and own nothing.

No lock is taken anywhere: every step is a single Redis command or a MULTI,
so a worker killed at any point leaves nothing behind that others wait for.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any, Final

import anyio
from anyio.abc import TaskStatus
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from tierpool.core.clock import now_ms
from tierpool.core.errors import write_refusal
from tierpool.core.keys import GROUP
from tierpool.core.scripts import Call, run_calls, script
from tierpool.workers import metrics
from tierpool.workers.context import WorkerContext
from tierpool.workers.processor import Processor
from tierpool.workers.streams import (
    REDIS_DOWN,
    Delivery,
    LoopControl,
    Outage,
    is_nogroup,
    stream_kinds,
    trim_streams,
)

log = logging.getLogger(__name__)

MAX_ROUNDS: Final = 8
"""XAUTOCLAIM calls per stream per tick (each claims up to ``batch_size`` entries)."""
"""Entries a removed consumer may have taken in the instant of its removal (see below)."""


def default_gc_idle_ms(claim_min_idle_ms: int) -> int:
    """How long a consumer must have been silent before it is removed.

    A live consumer touches the group at least every ``block_ms`` (which is
    below ``claim_min_idle_ms``), so ten times that, and at least a minute,
    only ever matches a process that is gone.
    """
    return max(10 * claim_min_idle_ms, 60_000)


async def remove_consumers(
    redis: Redis, victims: Sequence[tuple[str, str]]
) -> list[tuple[str, str]]:
    """Delete each (stream, consumer) that owns no pending entry; return those deleted.

    ``XGROUP DELCONSUMER`` drops the consumer's pending entries from the
    group, which would lose them, and WATCH does not see XREADGROUP; so the
    check and the delete are one script (``group_delconsumers.lua``): a
    consumer that read an entry in the meantime is simply kept.
    """
    if not victims:
        return []
    by_stream: dict[str, list[str]] = {}
    for stream, name in victims:
        by_stream.setdefault(stream, []).append(name)
    calls = [
        Call(script("group_delconsumers"), [stream] * len(names), [GROUP, *names])
        for stream, names in by_stream.items()
    ]
    removed: list[tuple[str, str]] = []
    for (stream, _), answer in zip(by_stream.items(), await run_calls(redis, calls), strict=True):
        if isinstance(answer, list):
            removed += [(stream, str(name)) for name in answer]
        else:
            log.warning("removing idle consumers of %s failed: %s", stream, answer)
    return removed


class Claimer:
    """Claims abandoned entries, dead-letters poison ones, trims, tidies the group."""

    def __init__(
        self,
        ctx: WorkerContext,
        outage: Outage | None = None,
        processor: Processor | None = None,
        *,
        consumer_gc_idle_ms: int | None = None,
    ) -> None:
        self.ctx = ctx
        self.outage = outage or Outage(ctx.health, ctx.epoch)
        self.processor = processor or Processor(ctx)
        self.control = LoopControl()
        self.streams = ctx.keys.all_input_streams
        self.kinds = stream_kinds(ctx.keys)
        self.cursors = dict.fromkeys(self.streams, "0-0")
        self.gc_idle_ms = consumer_gc_idle_ms or default_gc_idle_ms(ctx.settings.claim_min_idle_ms)
        self.ticks = 0

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Tick every ``claim_interval_s`` until stopped."""
        task_status.started()
        try:
            while not self.control.stopping:
                await self.tick()
                with self.control.waiting():
                    await anyio.sleep(self.ctx.settings.claim_interval_s)
        finally:
            self.control.done.set()

    def stop(self, grace_s: float | None = None) -> None:
        self.control.stop(self.ctx.settings.shutdown_grace_s if grace_s is None else grace_s)

    async def tick(self) -> None:
        """Claim, trim, tidy; a failure is logged and the next tick tries again."""
        failed: BaseException | None = None
        try:
            if not await self.writes_accepted():
                return
            await self.claim()
            await trim_streams(
                self.ctx.redis,
                self.streams,
                backlog_warn=self.ctx.settings.stream_maxlen,
                keys=self.ctx.keys,
            )
            await self.tidy_consumers()
        except REDIS_DOWN as exc:
            failed = exc
        except ResponseError as exc:
            reason = write_refusal(exc)
            if reason is None:
                log.exception("claimer tick failed")
                metrics.worker_errors_total.labels("claimer").inc()
            else:  # counted and logged, rate-limited; the next tick probes first
                self.processor.refusals.refused(reason, 0)
        except Exception:
            log.exception("claimer tick failed")
            metrics.worker_errors_total.labels("claimer").inc()
        else:
            self.outage.ok()
        self.ticks += 1
        if failed is not None:
            with self.control.waiting():
                await self.outage.backoff(failed, "claiming")

    async def writes_accepted(self) -> bool:
        """Whether to claim now: not while Redis refuses this worker's writes.

        A claim raises an entry's delivery count, and an entry claimed while
        Redis refuses writes would fail anyway; so while refusals last, the
        tick only probes with a write (this worker's heartbeat in
        ``tp:{NS}:workers``) and claims again once it is accepted.
        """
        refusals = self.processor.refusals
        if not refusals.reason:
            return True
        try:
            await self.ctx.redis.zadd(self.ctx.keys.workers, {self.ctx.worker_id: now_ms()})
        except ResponseError as exc:
            reason = write_refusal(exc)
            if reason is None:
                raise
            refusals.refused(reason, 0)
            return False
        refusals.accepted()
        return True

    async def claim(self) -> int:
        """Take over entries pending too long on every stream; the number claimed."""
        total = 0
        streams = list(self.streams)
        for _ in range(MAX_ROUNDS):
            if self.control.stopping or not streams:
                break
            claimed = await self._claim_round(streams)
            total += len(claimed)
            if claimed:
                with self.control.batch():
                    await self._process(claimed)
            # Go on only where the scan is not finished and found something.
            streams = [
                s
                for s in streams
                if self.cursors[s] != "0-0" and any(d.stream == s for d in claimed)
            ]
        return total

    async def _claim_round(self, streams: Sequence[str]) -> list[Delivery]:
        s = self.ctx.settings
        wid = self.ctx.worker_id
        async with self.ctx.redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xautoclaim(
                    stream,
                    GROUP,
                    wid,
                    s.claim_min_idle_ms,
                    start_id=self.cursors[stream],
                    count=s.batch_size,
                )
            answers = await pipe.execute(raise_on_error=False)
        claimed: dict[str, list[tuple[str, Any]]] = {}
        gone: dict[str, list[str]] = {}
        for stream, answer in zip(streams, answers, strict=True):
            if isinstance(answer, REDIS_DOWN):
                raise answer
            if isinstance(answer, BaseException):
                self.cursors[stream] = "0-0"
                reason = write_refusal(answer)
                if reason is not None:  # READONLY, BUSY...: reported once, claimed later
                    self.processor.refusals.refused(reason, 0)
                elif not is_nogroup(answer):  # NOGROUP: the consumer recreates the group
                    log.warning("XAUTOCLAIM %s failed: %s", stream, answer)
                continue
            self.cursors[stream] = str(answer[0])
            if answer[1]:
                claimed[stream] = [(str(e[0]), e[1]) for e in answer[1] if e and e[0]]
            if len(answer) > 2 and answer[2]:
                gone[stream] = [str(x) for x in answer[2]]
        if not claimed and not gone:
            return []
        counts = await self._deliveries(claimed, gone)
        out: list[Delivery] = []
        for stream, entries in claimed.items():
            kind = self.kinds.get(stream, stream)
            metrics.claimed_total.labels(kind).inc(len(entries))
            for entry_id, fields in entries:
                out.append(Delivery(stream, entry_id, fields, counts.get((stream, entry_id), 2)))
        return out

    async def _deliveries(
        self, claimed: dict[str, list[tuple[str, Any]]], gone: dict[str, list[str]]
    ) -> dict[tuple[str, str], int]:
        """Delivery counters of the claimed entries (one round trip, which also
        acknowledges entries deleted or trimmed while pending, so they leave
        the pending list)."""
        wid = self.ctx.worker_id
        spare = 5 * self.ctx.settings.batch_size
        async with self.ctx.redis.pipeline(transaction=False) as pipe:
            for stream, entries in claimed.items():
                ids = [e for e, _ in entries]
                pipe.xpending_range(
                    stream,
                    GROUP,
                    min(ids, key=_id_key),
                    max(ids, key=_id_key),
                    len(ids) + spare,
                    consumername=wid,
                )
            for stream, ids in gone.items():
                pipe.xack(stream, GROUP, *ids)
            answers = await pipe.execute(raise_on_error=False)
        counts: dict[tuple[str, str], int] = {}
        for stream, answer in zip(claimed, answers, strict=False):
            if isinstance(answer, REDIS_DOWN):
                raise answer
            if isinstance(answer, list):
                for p in answer:
                    counts[(stream, str(p["message_id"]))] = int(p["times_delivered"])
        return counts

    async def _process(self, batch: list[Delivery]) -> None:
        limit = self.ctx.settings.max_deliveries
        for d in batch:
            if d.deliveries <= limit:
                metrics.redeliveries_total.labels(self.kinds.get(d.stream, d.stream)).inc()
        try:
            waiting = await self.processor.process_until_written(
                batch, self.control, on_refused=self._uncount
            )
            if waiting:  # they wait for a pod's heartbeat: claimed again later, not counted
                with contextlib.suppress(*REDIS_DOWN, ResponseError):
                    await self._uncount(waiting)
        except Exception:
            log.exception("processing %d claimed entries failed; they stay pending", len(batch))
            metrics.worker_errors_total.labels("claimer").inc()

    async def _uncount(self, refused: Sequence[Delivery]) -> None:
        """Give refused entries back the delivery count they had before this claim.

        Redis refusing a write is not a failed delivery (guarantee 5): without
        this, an outage longer than ``claim_min_idle_ms`` x ``max_deliveries``
        would dead-letter valid entries. ``XCLAIM ... RETRYCOUNT`` is a write
        Redis accepts even out of memory (it is not ``denyoom``).
        """
        async with self.ctx.redis.pipeline(transaction=False) as pipe:
            for d in refused:
                pipe.xclaim(
                    d.stream,
                    GROUP,
                    self.ctx.worker_id,
                    0,
                    [d.entry_id],
                    retrycount=max(0, d.deliveries - 1),
                    justid=True,
                )
            await pipe.execute(raise_on_error=False)

    async def tidy_consumers(self) -> list[tuple[str, str]]:
        """Remove consumers silent for ``gc_idle_ms`` that own no pending entry."""
        async with self.ctx.redis.pipeline(transaction=False) as pipe:
            for stream in self.streams:
                pipe.xinfo_consumers(stream, GROUP)
            answers = await pipe.execute(raise_on_error=False)
        victims: list[tuple[str, str]] = []
        for stream, answer in zip(self.streams, answers, strict=True):
            if isinstance(answer, REDIS_DOWN):
                raise answer
            if not isinstance(answer, list):
                continue  # no stream or no group yet
            for c in answer:
                if (
                    c.get("name") != self.ctx.worker_id
                    and int(c.get("pending", 1)) == 0
                    and int(c.get("idle", 0)) >= self.gc_idle_ms
                ):
                    victims.append((stream, str(c["name"])))
        removed = await remove_consumers(self.ctx.redis, victims)
        if removed:
            log.info(
                "removed %d silent consumers",
                len(removed),
                extra={"consumers": sorted({name for _, name in removed})},
            )
        return removed


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return (int(ms) if ms.isdigit() else 0, int(seq) if seq.isdigit() else 0)
