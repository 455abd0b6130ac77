"""What the consumer and the claimer loops share, and keeping streams bounded.

- The consumer group ``tierpool`` is created on every input stream from the
  stream's processed-up-to mark (``tp:{NS}:processed:mark``), or from id
  ``0`` when there is none -- never ``$``: entries a producer added before the
  first worker ever started, or while the group was gone, must be served,
  not skipped. Entries after the mark that were processed before the group
  was lost are in ``tp:{NS}:processed`` and the scripts answer ``dup`` for
  them, so a lost group never replays (guarantee 6). The claimer's trim tick
  moves the mark up and trims that set below it.
- Redis errors are sorted here into the three cases a loop handles
  differently: Redis unreachable (back off and retry, logged once per
  outage), ``NOGROUP`` (Redis lost the group: create it again and go on —
  never stop, as FastStream #2611 does) and anything else.
- Request streams are trimmed with ``XTRIM MINID ~`` at the group's oldest
  unacknowledged entry (or its last delivered one when nothing is pending),
  so trimming can never remove an entry that is still to be processed. A
  ``MAXLEN`` bound on top would only ever cut such entries (everything older
  than the trim point is already gone), so ``stream_maxlen`` is never used to
  trim: a backlog larger than it is logged instead.
- :class:`Delivery` is an entry as delivered to this worker, and
  :class:`LoopControl` the two-phase stop both loops use.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final

import anyio
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tierpool.core.clock import monotonic_s
from tierpool.core.epoch import Epoch
from tierpool.core.keys import GROUP, Keys
from tierpool.schemas import REQUEST_KINDS
from tierpool.workers.context import Health

log = logging.getLogger(__name__)

REDIS_DOWN: Final = (RedisConnectionError, RedisTimeoutError, OSError)
"""Errors that mean "Redis is not answering now" (BusyLoadingError is one too)."""

BACKLOG_WARN_EVERY_S: Final = 60.0
BACKOFF_FIRST_S: Final = 0.05
BACKOFF_CAP_S: Final = 1.0
"""A retrying loop waits at most this long, so a restarted Redis is used within ~1 s."""


def is_nogroup(exc: BaseException) -> bool:
    """Whether Redis says the stream or its consumer group does not exist."""
    return isinstance(exc, ResponseError) and str(exc).startswith("NOGROUP")


def stream_kinds(keys: Keys) -> dict[str, str]:
    """Input stream key -> short kind (``allocate``... and ``pods``), for decoding and labels."""
    kinds: dict[str, str] = {keys.request_stream(kind): kind for kind in REQUEST_KINDS}
    kinds[keys.pods_stream] = "pods"
    return kinds


def entry_ms(entry_id: str) -> int:
    """The milliseconds part of a stream id: when the entry was added (0 if unreadable)."""
    head = entry_id.partition("-")[0]
    return int(head) if head.isdigit() else 0


def stream_kind(stream: str) -> str:
    """The last part of a stream key (``allocate``, ``pods``): its name in the processed set."""
    return stream.rpartition(":")[2]


def id_before(entry_id: str) -> str:
    """The greatest stream id below ``entry_id`` ("0-0" for the first)."""
    ms, _, seq = entry_id.partition("-")
    m, n = int(ms or 0), int(seq or 0)
    if n > 0:
        return f"{m}-{n - 1}"
    return f"{m - 1}-18446744073709551615" if m > 0 else "0-0"


def _processed_floor(entry_id: str) -> str:
    """The processed-set member prefix of ``entry_id``'s millisecond (see _prelude.lua)."""
    return entry_id.partition("-")[0].rjust(16, "0")


async def ensure_groups(redis: Redis, streams: Sequence[str], keys: Keys | None = None) -> int:
    """Create group ``tierpool`` on each stream that lacks it; the number created.

    At the stream's processed-up-to mark when ``keys`` is given and a mark is
    stored, else at ``0``. ``MKSTREAM`` so a worker may start before any
    producer. ``BUSYGROUP`` (the group exists) is the normal case; any other
    error is raised.
    """
    marks: list[str | None] = [None] * len(streams)
    if keys is not None:
        stored = await redis.hmget(keys.processed_mark, [stream_kind(s) for s in streams])
        marks = [m.decode() if isinstance(m, bytes) else m for m in stored]
    async with redis.pipeline(transaction=False) as pipe:
        for stream, mark in zip(streams, marks, strict=True):
            pipe.xgroup_create(stream, GROUP, id=mark or "0", mkstream=True)
        answers = await pipe.execute(raise_on_error=False)
    created = 0
    for stream, answer in zip(streams, answers, strict=True):
        if isinstance(answer, ResponseError) and str(answer).startswith("BUSYGROUP"):
            continue
        if isinstance(answer, BaseException):
            raise answer
        created += 1
        log.info("consumer group created", extra={"stream": stream, "group": GROUP})
    return created


def processed_mark(info: StreamInfo) -> str | None:
    """The id up to which every entry of the stream is processed, from its group.

    Entries before the oldest pending one were delivered and acknowledged;
    with nothing pending, every entry up to the last delivered one was.
    """
    if not info.has_group:
        return None
    if info.oldest_pending:
        return id_before(info.oldest_pending)
    return info.last_delivered or None


async def keep_marks(redis: Redis, keys: Keys, infos: Sequence[StreamInfo]) -> None:
    """Store each stream's processed-up-to mark and trim the processed set below it.

    One MULTI, so the set never lacks an entry after a stored mark. Entries
    of the mark's own millisecond stay in the set (the set is ordered by
    millisecond only).
    """
    marks = [(info, processed_mark(info)) for info in infos]
    marks = [(info, m) for info, m in marks if m and m != "0-0"]
    if not marks:
        return
    async with redis.pipeline(transaction=True) as pipe:
        for info, mark in marks:
            assert mark is not None
            kind = stream_kind(info.stream)
            pipe.hset(keys.processed_mark, kind, mark)
            pipe.zremrangebylex(keys.processed, f"[{kind}|", f"({kind}|{_processed_floor(mark)}")
        await pipe.execute()


class Outage:
    """Backoff and logging for Redis outages, and the ``redis_ok`` health flag.

    Logs one warning when an outage starts and one line when Redis answers
    again (with how long it was gone), never one per attempt. Shared by the
    loops of a process so that an outage is reported once, not per loop.
    """

    def __init__(self, health: Health | None = None, epoch: Epoch | None = None) -> None:
        self.health = health
        self.epoch = epoch
        self.since: float | None = None
        self._delay = BACKOFF_FIRST_S

    async def backoff(self, exc: BaseException, where: str) -> None:
        """Record a failure and wait before the next attempt (exponential, capped)."""
        if self.since is None:
            self.since = monotonic_s()
            self._delay = BACKOFF_FIRST_S
            log.warning(
                "Redis unavailable (%s: %s: %s); retrying until it answers",
                where,
                type(exc).__name__,
                exc,
            )
        if self.health is not None:
            self.health.redis_ok = False
        if self.epoch is not None:  # the server that answers next may be another one
            self.epoch.mark()
        delay, self._delay = self._delay, min(self._delay * 2, BACKOFF_CAP_S)
        await anyio.sleep(delay)

    def ok(self) -> None:
        """Redis answered: close the outage, if there was one."""
        if self.health is not None:
            self.health.redis_ok = True
        if self.since is not None:
            log.info("Redis available again after %.2fs", monotonic_s() - self.since)
            self.since = None
            self._delay = BACKOFF_FIRST_S


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """What the group knows about one stream, read in one pipelined round trip."""

    stream: str
    length: int
    has_group: bool
    lag: int | None
    pending: int
    last_delivered: str
    oldest_pending: str | None

    @property
    def trim_point(self) -> str | None:
        """The id before which every entry is acknowledged, or None (nothing to trim).

        Entries older than the oldest pending one are acknowledged, and
        entries after the last delivered one are not yet read; the group's
        oldest pending id is never after its last delivered id, so this is
        the oldest pending id when there is one.
        """
        if not self.has_group:
            return None
        point = self.oldest_pending or self.last_delivered
        return None if point in ("", "0-0") else point


def _group_of(groups: object) -> Mapping[str, Any] | None:
    if isinstance(groups, list):
        for g in groups:
            if isinstance(g, Mapping) and g.get("name") == GROUP:
                return g
    return None


async def read_infos(redis: Redis, streams: Sequence[str]) -> list[StreamInfo]:
    """XLEN, XINFO GROUPS and the XPENDING summary of every stream, in one round trip."""
    async with redis.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xlen(stream)
            pipe.xinfo_groups(stream)
            pipe.xpending(stream, GROUP)
        answers = await pipe.execute(raise_on_error=False)
    infos: list[StreamInfo] = []
    for i, stream in enumerate(streams):
        length, groups, summary = answers[3 * i : 3 * i + 3]
        if isinstance(length, REDIS_DOWN):
            raise length
        group = _group_of(groups)
        pending_ok = isinstance(summary, Mapping)
        lag = group.get("lag") if group is not None else None
        infos.append(
            StreamInfo(
                stream=stream,
                length=length if isinstance(length, int) else 0,
                has_group=group is not None and pending_ok,
                lag=lag if isinstance(lag, int) else None,
                pending=int(summary["pending"]) if pending_ok else 0,
                last_delivered=str(group.get("last-delivered-id") or "") if group else "",
                oldest_pending=(str(summary["min"]) if pending_ok and summary.get("min") else None),
            )
        )
    return infos


_backlog_warned: dict[str, float] = {}


async def trim_streams(
    redis: Redis, streams: Sequence[str], *, backlog_warn: int, keys: Keys | None = None
) -> dict[str, int]:
    """Trim each stream up to its safe point; entries removed per stream.

    With ``keys``, also moves each stream's processed-up-to mark (see
    :func:`keep_marks`). Warns when a stream holds more than ``backlog_warn``
    entries that may not be trimmed. Two or three round trips in all. (The
    stream length, lag and pending gauges are ``workers.gauges``'s, which
    reads the same figures.)
    """
    infos = await read_infos(redis, streams)
    if keys is not None:
        await keep_marks(redis, keys, infos)
    points = [(info, info.trim_point) for info in infos if info.trim_point is not None]
    if not points:
        return {}
    async with redis.pipeline(transaction=False) as pipe:
        for info, point in points:
            pipe.xtrim(info.stream, minid=point, approximate=True)
        answers = await pipe.execute(raise_on_error=False)
    removed: dict[str, int] = {}
    for (info, _point), answer in zip(points, answers, strict=True):
        if isinstance(answer, BaseException):
            raise answer
        removed[info.stream] = int(answer)
        now = monotonic_s()
        if (
            info.length - int(answer) > backlog_warn
            and now - _backlog_warned.get(info.stream, -BACKLOG_WARN_EVERY_S)
            >= BACKLOG_WARN_EVERY_S
        ):
            _backlog_warned[info.stream] = now
            log.warning(
                "stream %s holds %d entries still to be processed (more than "
                "TIERPOOL_STREAM_MAXLEN=%d); not trimmed: they would be lost",
                info.stream,
                info.length - int(answer),
                backlog_warn,
            )
    return removed


@dataclass(frozen=True, slots=True)
class Delivery:
    """One stream entry as delivered to this worker; ``fields`` None = deleted meanwhile."""

    stream: str
    entry_id: str
    fields: Mapping[str, str] | None
    deliveries: int = 1


def parse_read(resp: object) -> list[Delivery]:
    """The entries of an XREADGROUP reply, in either of redis-py's shapes."""
    if not resp:
        return []
    pairs: Any = resp.items() if isinstance(resp, Mapping) else resp
    out: list[Delivery] = []
    for stream, entries in pairs:
        for entry in entries or ():
            entry_id, fields = entry[0], entry[1]
            if entry_id is not None:
                out.append(Delivery(str(stream), str(entry_id), fields))
    return out


class LoopControl:
    """Two-phase stop for a loop that waits, then handles a batch.

    ``stop(grace_s)`` cancels the wait at once (a blocking read, a sleep) and
    gives the batch in hand until ``grace_s`` from now to finish: the batch
    runs shielded from the task group's cancellation, under that deadline.
    Safe to call twice (the first deadline holds); ``kill()`` cancels now.
    """

    def __init__(self) -> None:
        self.stopping = False
        self.done = anyio.Event()
        self._deadline = math.inf
        self._wait: anyio.CancelScope | None = None
        self._batch: anyio.CancelScope | None = None

    @contextmanager
    def waiting(self) -> Iterator[anyio.CancelScope]:
        """The scope of an interruptible wait: stop() cancels it."""
        with anyio.CancelScope() as scope:
            if self.stopping:
                scope.cancel()
            self._wait = scope
            try:
                yield scope
            finally:
                self._wait = None

    @contextmanager
    def batch(self) -> Iterator[anyio.CancelScope]:
        """The scope of a batch: shielded, cut off ``grace_s`` after a stop."""
        with anyio.CancelScope(shield=True, deadline=self._deadline) as scope:
            self._batch = scope
            try:
                yield scope
            finally:
                self._batch = None

    def stop(self, grace_s: float) -> None:
        if not self.stopping:
            self.stopping = True
            self._deadline = anyio.current_time() + max(0.0, grace_s)
        if self._wait is not None:
            self._wait.cancel()
        if self._batch is not None:
            self._batch.deadline = min(self._batch.deadline, self._deadline)

    def kill(self) -> None:
        self.stop(0)
        if self._batch is not None:
            self._batch.cancel()
