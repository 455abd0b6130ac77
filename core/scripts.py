"""Load the Lua scripts of ``core/lua`` and call them by SHA, in pipelines.

Each script file is one state transition; ``_prelude.lua`` is prepended to
every script except the standalone ``leader_*`` and ``group_*`` ones. Scripts are loaded once
per connection pool and called with ``EVALSHA``; when Redis answers
``NOSCRIPT`` (it restarted or failed over and lost its script cache) the
batch's unanswered calls are loaded and sent again, so callers never see it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, ResponseError

from tierpool.core.keys import Keys
from tierpool.core.snapshot import dedicated_pools
from tierpool.core.tierconfig import TierConfig

LUA_DIR = Path(__file__).with_name("lua")


@dataclass(frozen=True)
class Script:
    name: str
    source: str
    sha: str


@cache
def script(name: str) -> Script:
    """The script ``core/lua/{name}.lua``, with the prelude unless standalone."""
    body = (LUA_DIR / f"{name}.lua").read_text()
    if not name.startswith(("leader_", "group_")):
        body = (LUA_DIR / "_prelude.lua").read_text() + "\n" + body
    return Script(name, body, hashlib.sha1(body.encode()).hexdigest())


BATCHED: frozenset[str] = frozenset({"allocate", "release"})
"""Scripts whose consecutive calls in one pipeline go as one batch call (``_batch.lua``)."""
BATCH_MAX = 64
"""Entries per batch call: ~64 x 50 us, so one script holds Redis ~3 ms
(rejections that count restricted pods cost more)."""


@cache
def batch_script(name: str) -> Script:
    """``core/lua/{name}.lua`` run once per entry of a batch (see ``_batch.lua``).

    The prelude, then the script's body as ``local function one(A)`` whose
    ``ARGV[...]`` read the entry's arguments ``A[...]``, then the driver.
    """
    body = (LUA_DIR / f"{name}.lua").read_text().replace("ARGV[", "A[")
    source = "\n".join(
        (
            (LUA_DIR / "_prelude.lua").read_text(),
            "local function one(A)",
            body,
            "end",
            (LUA_DIR / "_batch.lua").read_text(),
        )
    )
    return Script(f"{name}[batch]", source, hashlib.sha1(source.encode()).hexdigest())


_EVENT_KIND = re.compile(r"""(?:\bevent\(|\bkind\s*=\s*)'([a-z_]+)'""")


@cache
def event_types() -> frozenset[str]:
    """Every audit event type a script can append, read from the scripts themselves.

    The scripts are the one place event types are defined; the CLI checks
    ``--type`` against this so a typo is an error instead of an empty listing.
    A script names its type as a literal, ``event('x', ...)``, or through a
    local ``kind = 'x'`` (tests/test_ops_streams.py keeps that rule).
    """
    found: set[str] = set()
    for path in LUA_DIR.glob("*.lua"):
        found.update(_EVENT_KIND.findall(path.read_text()))
    return frozenset(found)


@dataclass(frozen=True, slots=True)
class Call:
    """One script invocation, ready to be sent."""

    script: Script
    keys: Sequence[str]
    args: Sequence[str | int]


# --- the calling convention of every prelude script ----------------------------
# The one Python home of the KEYS/ARGV header that ``_prelude.lua`` reads;
# tests/test_scripts.py checks these names and positions against the prelude.

PRELUDE_KEYS: tuple[tuple[str, str], ...] = (
    ("stream", ""),
    ("reply", ""),
    ("events", "events"),
    ("cfgv", "config_version"),
    ("mv", "merchants_version"),
    ("pool", "pod_pool"),
    ("endpoint", "pod_endpoint"),
    ("zone", "pod_zone"),
    ("cap", "pod_capability"),
    ("labels", "pod_labels"),
    ("load", "pod_load"),
    ("pcalls", "pod_calls"),
    ("seen", "pod_seen"),
    ("draining", "pod_draining"),
    ("count", "pool_count"),
    ("calls", "calls"),
    ("leases", "leases"),
    ("leader", "leader"),
    ("dead", "dead"),
    ("done", "processed"),
    ("unwit", "pod_unwitnessed"),
)
"""KEYS[1..]: (the prelude's ``K`` field, the :class:`Keys` attribute it holds).
The first two vary per call (the source stream and the reply stream)."""

PRELUDE_ARGS = (
    "now",
    "entry",
    "rid",
    "deadline",
    "reply_ttl",
    "events_max",
    "want_cfgv",
    "want_mv",
    "pod_ttl",
    "lease_ttl",
    "draining_ttl",
    "dead_max",
    "kind",
    "echo_field",
    "echo_value",
)
"""ARGV[1..]: the prelude's ``H`` fields, in order; the pool table follows."""

POOL_ARGS = ("name", "max", "zone", "cap", "dedicated")
"""Per pool, after the pool count: its ARGV fields, in order."""
POOL_KEYS = ("open", "restricted")
"""Per pool, after the header keys: its free-index KEYS, in order."""


@dataclass(frozen=True, slots=True)
class PoolTable:
    """The pool table part of a call: free-index KEYS, and ARGV from the count on."""

    keys: tuple[str, ...]
    args: tuple[str, ...]

    @classmethod
    def of(cls, keys: Keys, cfg: TierConfig | None) -> PoolTable:
        """``cfg``'s pools in ``cfg.pools`` order; ``None`` gives an empty table."""
        if cfg is None:
            return cls((), ("0",))
        ks: list[str] = []
        args: list[str] = [str(len(cfg.pools))]
        dedicated = dedicated_pools(cfg)
        for name in cfg.pools:
            tier = cfg.tier(name)
            ks += [keys.pool_free(name, zone) for zone in POOL_KEYS]
            args += [
                name,
                str(tier.max_concurrent),
                tier.zone,
                str(tier.capability),
                "1" if name in dedicated else "0",
            ]
        return cls(tuple(ks), tuple(args))


class CallBuilder:
    """Builds prelude script calls for one namespace: header, pool table, script's own part."""

    def __init__(
        self,
        keys: Keys,
        *,
        reply_ttl_ms: int,
        events_maxlen: int,
        pod_ttl_ms: int,
        lease_ttl_ms: int,
        draining_ttl_ms: int,
        dead_maxlen: int,
    ) -> None:
        self.keys = keys
        self._fixed_keys = tuple(getattr(keys, attr) for _, attr in PRELUDE_KEYS[2:])
        self._limits = (str(reply_ttl_ms), str(events_maxlen))
        self._ttls = (
            str(pod_ttl_ms),
            str(lease_ttl_ms),
            str(draining_ttl_ms),
            str(dead_maxlen),
        )

    def call(
        self,
        name: str,
        table: PoolTable,
        args: Sequence[str],
        *,
        stream: str | None = None,
        entry_id: str | None = None,
        request_id: str | None = None,
        now_ms: int | None = None,
        deadline_ms: int | None = None,
        want_cfgv: int | None = None,
        want_mv: int | None = None,
        kind: str = "",
        echo: tuple[str, str] = ("", ""),
        extra_keys: Sequence[str] = (),
    ) -> Call:
        """One call of ``core/lua/{name}.lua``.

        ``stream``: the entry's stream (default: the events stream, which no
        entry is checked in); ``None`` for ``entry_id``, ``request_id``,
        ``now_ms`` (Redis TIME), ``deadline_ms`` or a version guard means "none"
        (``deadline_ms=0`` is a deadline long past, contract v1.1). ``kind`` and
        ``echo`` (a field name and value, ``call_id`` or ``pod_id``) go into
        the reply, so a requester can check a reply is its own (v1.1).
        Script keys follow the pool table's keys; script args follow its args.
        """
        keys = (
            stream or self.keys.events,
            self.keys.reply(request_id or "-"),
            *self._fixed_keys,
            *table.keys,
            *extra_keys,
        )
        header = (
            "" if now_ms is None else str(now_ms),
            entry_id or "",
            request_id or "",
            "" if deadline_ms is None else str(deadline_ms),
            *self._limits,
            "" if want_cfgv is None else str(want_cfgv),
            "" if want_mv is None else str(want_mv),
            *self._ttls,
            kind,
            *echo,
        )
        return Call(script(name), keys, (*header, *table.args, *args))


def _is_noscript(result: object) -> bool:
    return isinstance(result, NoScriptError) or (
        isinstance(result, ResponseError) and str(result).startswith("NOSCRIPT")
    )


_HEADER = len(PRELUDE_ARGS)
_FIXED_KEYS = len(PRELUDE_KEYS)
_PER_ENTRY_ARGS = (1, 2, 3, 14)
"""Header fields that differ per entry (entry, rid, deadline, echo value); 0-based."""


def _shape(c: Call) -> tuple[object, ...] | None:
    """What the calls of one batch share, or None when ``c`` is not batched."""
    name = c.script.name
    if name not in BATCHED or len(c.args) <= _HEADER:
        return None
    table_end = _HEADER + 1 + 5 * int(c.args[_HEADER])
    return (name, c.args[0], *c.args[4:14], *c.args[_HEADER:table_end], *c.keys[2:])


def _batch_call(group: Sequence[Call]) -> Call:
    """One call of ``_batch.lua`` running every call of ``group`` (same shape)."""
    first = group[0]
    table_end = _HEADER + 1 + 5 * int(first.args[_HEADER])
    npools = (table_end - _HEADER - 1) // 5
    own_keys = len(first.keys) - _FIXED_KEYS - 2 * npools
    keys: list[str] = list(first.keys)
    args: list[str | int] = [
        first.args[0],
        "",
        "",
        "",
        *first.args[4:14],
        "",
        *first.args[_HEADER:table_end],
    ]
    args += [str(own_keys), str(len(group))]
    for c in group:
        keys += (c.keys[0], c.keys[1])
        own = c.args[table_end:]
        args += (c.args[1], c.args[2], c.args[3], c.args[14], str(len(own)), *own)
    return Call(batch_script(first.script.name), keys, args)


def _batched(calls: Sequence[Call]) -> tuple[list[Call], list[tuple[int, int, bool]]]:
    """The calls to send, and for each (first call, calls covered, batched?).

    Runs of consecutive calls of a batched script with the same shape become
    one call (order is kept: a batch never reorders entries); a run of one
    goes as it is.
    """
    sent: list[Call] = []
    spans: list[tuple[int, int, bool]] = []
    i = 0
    while i < len(calls):
        shape = _shape(calls[i])
        j = i + 1
        if shape is not None:
            while j < len(calls) and j - i < BATCH_MAX and _shape(calls[j]) == shape:
                j += 1
        if j - i > 1:
            sent.append(_batch_call(calls[i:j]))
            spans.append((i, j - i, True))
        else:
            sent.append(calls[i])
            spans.append((i, 1, False))
        i = j
    return sent, spans


async def run_calls(redis: Redis, calls: Sequence[Call]) -> list[object]:
    """Send every call in one pipelined round trip; results in order.

    A result is the script's return value or the exception Redis raised for
    that call (a bad call never hides the others' results). NOSCRIPT is
    handled here: the missing scripts are loaded and those calls resent.
    Consecutive allocate (or release) calls go as one batch call
    (``_batch.lua``), which runs each entry exactly as its own call would.
    """
    sent, spans = _batched(calls)
    answers = await _run_calls(redis, sent)
    if len(sent) == len(calls):
        return answers
    results: list[object] = [None] * len(calls)
    for (start, count, batched), answer in zip(spans, answers, strict=True):
        if not batched:
            results[start] = answer
        elif isinstance(answer, list) and len(answer) == count:
            results[start : start + count] = answer
        elif isinstance(answer, BaseException):
            results[start : start + count] = [answer] * count
        else:
            bad = ResponseError(f"unexpected batch result {answer!r}"[:300])
            results[start : start + count] = [bad] * count
    return results


async def _run_calls(redis: Redis, calls: Sequence[Call]) -> list[object]:
    """``run_calls`` without batching."""
    results: list[object] = [None] * len(calls)
    todo = list(range(len(calls)))
    for attempt in range(3):
        async with redis.pipeline(transaction=False) as pipe:
            for i in todo:
                c = calls[i]
                pipe.evalsha(c.script.sha, len(c.keys), *c.keys, *c.args)
            answers = await pipe.execute(raise_on_error=False)
        missing: list[int] = []
        for i, answer in zip(todo, answers, strict=True):
            if _is_noscript(answer) and attempt < 2:
                missing.append(i)
            else:
                results[i] = answer
        if not missing:
            break
        async with redis.pipeline(transaction=False) as pipe:
            for s in {calls[i].script for i in missing}:
                pipe.script_load(s.source)
            await pipe.execute()
        todo = missing
    return results


async def run_one(redis: Redis, call: Call) -> object:
    """One call; raises what Redis raised."""
    (result,) = await run_calls(redis, [call])
    if isinstance(result, BaseException):
        raise result
    return result
