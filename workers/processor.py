"""The processor: turns a batch of deliveries into state changes, replies and dead letters.

A batch is decoded at the edge (``schemas``); entries that cannot be
processed are dead-lettered (``invalid`` reply when their request id is
usable, dead-letter entry and XACK in one script), and the rest go to
:meth:`tierpool.core.state.PoolState.run` in one pipelined round trip. A bad
entry never costs the batch: each one is judged on its own.

Used by both the consumer (fresh entries) and the claimer (entries taken over
from a silent consumer), so neither imports the other.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

import anyio
from redis.exceptions import ResponseError

from tierpool.core.clock import monotonic_s, now_ms
from tierpool.core.errors import InvalidMessage, write_refusal
from tierpool.core.keys import GROUP
from tierpool.core.logutil import LogLimit
from tierpool.core.scripts import run_calls
from tierpool.core.state import REQUEST_ID_IN_USE, Entry, Message, Outcome
from tierpool.schemas import REQUEST_KINDS, decode_pod_event, decode_request
from tierpool.schemas.explain import usable_request_id
from tierpool.schemas.fields import MAX_MESSAGE_BYTES, MAX_VALUE_BYTES
from tierpool.workers import metrics
from tierpool.workers.context import Health, WorkerContext
from tierpool.workers.streams import (
    BACKOFF_CAP_S,
    BACKOFF_FIRST_S,
    REDIS_DOWN,
    Delivery,
    LoopControl,
    entry_ms,
    stream_kinds,
)

log = logging.getLogger(__name__)

REFUSAL_LOG_EVERY_S: Final = 10.0
"""While Redis refuses writes, one log line per this interval, with counts."""

DEAD_VALUE_CHARS: Final = 1024
"""An oversized entry is kept in the dead-letter stream with values cut to this length."""


def dead_fields(fields: Mapping[str, str]) -> dict[str, str]:
    """The fields to keep in a dead letter: as sent, unless the entry is oversized.

    An entry over the message limits was refused for its size, so keeping it
    whole would only let a producer fill Redis with copies of it (the dead
    stream holds ``dead_maxlen`` entries): its values are cut instead.
    """
    sizes = [len(k) + len(v) for k, v in fields.items()]
    if sum(sizes) <= MAX_MESSAGE_BYTES and all(len(v) <= MAX_VALUE_BYTES for v in fields.values()):
        return dict(fields)
    out: dict[str, str] = {}
    for key, value in list(fields.items())[:64]:
        cut = (
            value
            if len(value) <= DEAD_VALUE_CHARS
            else (f"{value[:DEAD_VALUE_CHARS]}...[{len(value) - DEAD_VALUE_CHARS} more chars]")
        )
        out[key[:DEAD_VALUE_CHARS]] = cut
    out["_truncated"] = f"{len(fields)} fields, {sum(sizes)} chars"
    return out


@dataclass(frozen=True, slots=True)
class _Bad:
    index: int
    error: str
    request_id: str | None
    reason: str  # metric label: invalid | too_many_deliveries | internal_error


class Refusals:
    """Redis refusing writes (OOM, READONLY, MISCONF, BUSY...): readiness and one log line.

    Shared by the loops of a worker. While refusals go on, ``health``
    carries the reason (``/readyz`` answers 503 with it) and the log gets
    one line per :data:`REFUSAL_LOG_EVERY_S` with counts, not one per
    attempt (the anchor's workers wrote ~23,000 lines in 90 s); a line says
    when writes succeed again.
    """

    def __init__(self, health: Health | None = None) -> None:
        self.health = health
        self.reason = ""
        self.since: float | None = None
        self._logged_at = -REFUSAL_LOG_EVERY_S
        self._attempts = 0  # refused entry attempts since the last line
        self.total = 0  # refused entry attempts since start (tests)

    def refused(self, reason: str, entries: int) -> None:
        now = monotonic_s()
        if self.since is None:
            self.since = now
        self.reason = reason
        self._attempts += entries
        self.total += entries
        if self.health is not None:
            self.health.writes_refused = reason
        if now - self._logged_at >= REFUSAL_LOG_EVERY_S:
            log.warning(
                "Redis refuses writes (%s) for %.1fs: %d entries kept pending (%d attempts "
                "refused since the last report); retrying with backoff, nothing is dead-lettered",
                reason,
                now - self.since,
                entries,
                self._attempts,
            )
            self._logged_at, self._attempts = now, 0

    def accepted(self) -> None:
        """A write succeeded: refusals are over, if there were any."""
        if self.since is not None:
            log.info(
                "Redis accepts writes again after %.1fs of refusals (%s)",
                monotonic_s() - self.since,
                self.reason,
            )
            self.since, self.reason, self._attempts = None, "", 0
            self._logged_at = -REFUSAL_LOG_EVERY_S
        if self.health is not None:
            self.health.writes_refused = ""


class Processor:
    """Turns a batch of deliveries into state changes, replies and dead letters.

    Shared by the consumer (fresh entries) and the claimer (entries taken
    over from a silent consumer): a claimed entry is processed exactly like
    a fresh one.
    """

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self.kinds = stream_kinds(ctx.keys)
        self.refusals = Refusals(ctx.health)
        self._refusal_reason = "refused"
        self._log_limit = LogLimit(log, "dead letters")
        self._decoders: dict[str, Callable[[Mapping[str, str]], Any]] = {
            ctx.keys.pods_stream: decode_pod_event
        }
        for kind in REQUEST_KINDS:
            self._decoders[ctx.keys.request_stream(kind)] = partial(decode_request, kind)
        self._requests = metrics.Children(metrics.requests_total)
        self._allocations = metrics.Children(metrics.allocations_total)
        self._releases = metrics.Children(metrics.releases_total)
        self._durations = metrics.Children(metrics.request_duration)

    def decode(self, d: Delivery) -> Message:
        """The message of an entry; raises InvalidMessage for a bad one."""
        assert d.fields is not None
        msg: Message = self._decoders[d.stream](d.fields)
        return msg

    async def process(self, batch: Sequence[Delivery]) -> list[str]:
        """Process a batch; the outcome status of each entry, in order.

        Statuses besides reply statuses: ``dup`` (already processed by
        another delivery), ``stale``/``error`` (left pending, claimed and
        retried later), ``refused`` (Redis refused the write: see
        :meth:`process_until_written`), ``deleted`` (the entry no longer
        exists). Raises the Redis errors that mean Redis is down; the batch
        then stays pending.
        """
        statuses = ["error"] * len(batch)
        pools = [""] * len(batch)
        bad: list[_Bad] = []
        good: list[int] = []
        items: list[tuple[Message, Entry | None]] = []
        limit = self.ctx.settings.max_deliveries
        gone: list[Delivery] = []
        for i, d in enumerate(batch):
            if d.fields is None:
                gone.append(d)
                statuses[i] = "deleted"
            elif d.deliveries > limit:
                bad.append(
                    _Bad(
                        i,
                        f"too many deliveries ({d.deliveries})",
                        usable_request_id(d.fields),
                        "too_many_deliveries",
                    )
                )
            else:
                try:
                    msg = self.decode(d)
                except InvalidMessage as exc:
                    bad.append(_Bad(i, exc.error, exc.request_id, "invalid"))
                except Exception as exc:  # a decoder bug must not cost the batch
                    log.exception("decoding %s %s failed", d.stream, d.entry_id)
                    bad.append(
                        _Bad(
                            i,
                            f"internal error while decoding: {type(exc).__name__}",
                            usable_request_id(d.fields),
                            "internal_error",
                        )
                    )
                else:
                    good.append(i)
                    items.append((msg, Entry(d.stream, d.entry_id)))
        if items:
            outcomes = await self._run(batch, good, items, bad)
            for j, (i, outcome) in enumerate(zip(good, outcomes, strict=True)):
                statuses[i] = outcome.status
                pools[i] = outcome.fields.get("pool", "")
                if outcome.status == "refused":
                    self._refusal_reason = outcome.fields.get("error", "refused")
                if outcome.status == "invalid":
                    # Well-formed but inapplicable (a config that fails
                    # validation, a request_id in use): PoolState.run already
                    # dead-lettered and acked it in one script; count it here.
                    kind = self.kinds.get(batch[i].stream, batch[i].stream)
                    in_use = outcome.fields.get("error") == REQUEST_ID_IN_USE
                    reason = "request_id_in_use" if in_use else "invalid"
                    metrics.dead_letters_total.labels(kind, reason).inc()
                    if in_use and self._log_limit.allow():
                        log.warning(
                            "dead-lettered %s entry %s: its request_id has an unread "
                            "reply (another request's), which stands",
                            kind,
                            batch[i].entry_id,
                            extra={"request_id": items[j][0].request_id or ""},
                        )
        if bad:
            await self._reject(batch, bad, statuses)
        if gone:
            async with self.ctx.redis.pipeline(transaction=False) as pipe:
                for d in gone:
                    pipe.xack(d.stream, GROUP, d.entry_id)
                await pipe.execute()
        refused = statuses.count("refused")
        if refused:
            self.refusals.refused(self._refusal_reason, refused)
        elif len(statuses) > statuses.count("error"):
            self.refusals.accepted()
        self._observe(batch, statuses, pools)
        return statuses

    async def process_until_written(
        self,
        batch: Sequence[Delivery],
        control: LoopControl,
        on_refused: Callable[[Sequence[Delivery]], Any] | None = None,
    ) -> list[Delivery]:
        """Process ``batch``; retry what Redis refused, in place, until it is written.

        An entry Redis refused (OOM, READONLY, MISCONF, BUSY) or could not
        take (connection lost) stays pending and is tried again here with
        backoff, without a new delivery: its delivery count does not grow,
        so it is never dead-lettered as "too many deliveries" for Redis's
        state (guarantee 5). Entries that failed otherwise are left to the
        claimer, as before. Returns when nothing refused is left, or on stop
        (what is left stays pending). ``on_refused`` sees each refused part
        (the claimer restores the delivery counts its claim raised).

        Returns the allocations that wait for a quarantined pod's heartbeat
        (status ``wait``, see ``allocate.lua``): still pending, unanswered;
        the consumer runs them again after its next batch, which may hold
        that heartbeat (retrying here would hold it back).
        """
        todo = list(batch)
        waiting: list[Delivery] = []
        delay = BACKOFF_FIRST_S
        epoch = self.ctx.epoch
        while todo:
            with control.batch():
                try:
                    # Free unless Redis may have changed since the last check
                    # (start, an outage, a refusal): core/epoch.py.
                    await epoch.ensure()
                    statuses = await self.process(todo)
                except REDIS_DOWN as exc:
                    statuses = ["refused"] * len(todo)
                    self.refusals.refused(
                        f"Redis unreachable: {exc or type(exc).__name__}", len(todo)
                    )
                except ResponseError as exc:  # the epoch check refused (OOM, READONLY...)
                    reason = write_refusal(exc)
                    if reason is None:
                        raise
                    statuses = ["refused"] * len(todo)
                    self.refusals.refused(reason, len(todo))
            waiting += (d for d, st in zip(todo, statuses, strict=True) if st == "wait")
            todo = [d for d, st in zip(todo, statuses, strict=True) if st == "refused"]
            if todo:
                epoch.mark()  # a failover shows as refusals or a lost connection
            if not todo or control.stopping:
                return waiting
            if on_refused is not None:
                with control.batch(), contextlib.suppress(*REDIS_DOWN, ResponseError):
                    await on_refused(todo)
            with control.waiting():
                await anyio.sleep(delay)
            delay = min(delay * 2, BACKOFF_CAP_S)
        return waiting

    async def _run(
        self,
        batch: Sequence[Delivery],
        good: list[int],
        items: list[tuple[Message, Entry | None]],
        bad: list[_Bad],
    ) -> list[Outcome]:
        """``state.run`` for the good entries; isolates an entry that makes it raise."""
        state = self.ctx.state
        try:
            return await state.run(items)
        except REDIS_DOWN:
            raise
        except Exception:
            log.exception("running a batch of %d failed; checking entries one by one", len(items))
            metrics.worker_errors_total.labels("batch").inc()
        # Find the entries that cannot even be prepared (a bug meeting one
        # message) and dead-letter them; run the others. A failure that is
        # not any one entry's (nothing to isolate) leaves the batch pending.
        snap = self.ctx.cache.current()
        keep: list[int] = []
        for pos, (msg, entry) in enumerate(items):
            try:
                state.prepare(msg, snap, entry)
            except Exception as exc:
                d = batch[good[pos]]
                bad.append(
                    _Bad(
                        good[pos],
                        f"internal error: {type(exc).__name__}: {exc}"[:500],
                        usable_request_id(d.fields or {}),
                        "internal_error",
                    )
                )
            else:
                keep.append(pos)
        out = [Outcome("error") for _ in items]
        if len(keep) == len(items):
            return out
        try:
            done = await state.run([items[pos] for pos in keep])
        except REDIS_DOWN:
            raise
        except Exception:
            log.exception("the rest of the batch failed again; it stays pending")
            return out
        for pos, outcome in zip(keep, done, strict=True):
            out[pos] = outcome
        return out  # the entries left out are dead-lettered by the caller

    async def _reject(
        self, batch: Sequence[Delivery], bad: list[_Bad], statuses: list[str]
    ) -> None:
        """Dead-letter every bad entry: one pipelined round trip."""
        calls = []
        for b in bad:
            d = batch[b.index]
            calls.append(
                self.ctx.state.reject_call(
                    entry=Entry(d.stream, d.entry_id),
                    request_id=b.request_id,
                    error=b.error,
                    fields=dead_fields(d.fields or {}),
                    deliveries=d.deliveries,
                )
            )
        results = await run_calls(self.ctx.redis, calls)
        for b, result in zip(bad, results, strict=True):
            d = batch[b.index]
            kind = self.kinds.get(d.stream, d.stream)
            if isinstance(result, BaseException):
                refusal = write_refusal(result)
                if refusal is not None:
                    statuses[b.index] = "refused"
                    self._refusal_reason = refusal
                    continue
                statuses[b.index] = "error"
                log.warning("dead-lettering %s %s failed: %s", d.stream, d.entry_id, result)
                continue
            status = str(result[0]) if isinstance(result, list) and result else "error"
            statuses[b.index] = status
            if status == "invalid":
                metrics.dead_letters_total.labels(kind, b.reason).inc()
                if self._log_limit.allow():
                    log.warning(
                        "dead-lettered %s entry %s: %s",
                        kind,
                        d.entry_id,
                        b.error[:300],
                        extra={"request_id": b.request_id or "", "entry_id": d.entry_id},
                    )

    def _observe(
        self, batch: Sequence[Delivery], statuses: Sequence[str], pools: Sequence[str]
    ) -> None:
        """Metrics of a batch; a refused entry is counted once it is processed.

        One increment per distinct (kind, status, pool), one duration per
        entry, every metric child looked up once per process.
        """
        now = now_ms()
        metrics.batch_size.observe(len(batch))
        counts: dict[tuple[str, str, str], int] = {}
        kinds = self.kinds
        durations = self._durations
        for d, status, pool in zip(batch, statuses, pools, strict=True):
            if status in ("refused", "wait"):  # counted once answered
                continue
            kind = kinds.get(d.stream, d.stream)
            key = (kind, status, pool)
            counts[key] = counts.get(key, 0) + 1
            durations(kind, status).observe(max(0, now - entry_ms(d.entry_id)) / 1000)
        for (kind, status, pool), n in counts.items():
            self._requests(kind, status).inc(n)
            # Per pool, as the anchor counted (its dashboards' allocation rate
            # by pool); only answered requests, and a pool only where placed.
            if kind == "allocate" and status in metrics.REPLY_STATUSES["allocate"]:
                self._allocations(pool if status == "allocated" else "", status).inc(n)
            elif kind == "release" and status == "released":
                self._releases(pool).inc(n)
