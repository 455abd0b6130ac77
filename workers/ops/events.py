"""``tierpool events``: the audit log (``tp:{NS}:events``), optionally followed live.

Every state change a script makes appends one event (``event``, ``at_ms``,
``request_id`` and the change's fields). ``--follow`` prints new events as
they come, until Ctrl-C or SIGTERM, and then exits 0.
"""

from __future__ import annotations

import argparse
import signal
from collections.abc import Iterable
from typing import Any, cast

import anyio
import msgspec

from tierpool.workers.ops.common import (
    EXIT_OK,
    EXIT_USAGE,
    Ops,
    add_common,
    error,
    run,
    when,
    write,
    write_json,
)

FOLLOW_BLOCK_MS = 1000


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    add_common(parser)
    parser.add_argument(
        "--count",
        "-c",
        type=int,
        default=20,
        metavar="N",
        help="how many of the latest events to show first (default 20)",
    )
    parser.add_argument(
        "--follow", "-f", action="store_true", help="keep printing new events until Ctrl-C"
    )
    parser.add_argument(
        "--type",
        dest="event_type",
        metavar="EVENT",
        help="only events of this type (allocated, released, drained...)",
    )
    parser.add_argument("--pod", metavar="POD_ID", help="only events about this pod")
    parser.add_argument("--call", metavar="CALL_ID", help="only events about this call")
    parser.add_argument("--pool", metavar="POOL", help="only events about this pool")


def main(args: argparse.Namespace) -> int:
    if args.event_type is not None:
        from tierpool.core.scripts import event_types

        known = event_types()
        if args.event_type not in known:
            error(
                "events",
                f"unknown event type {args.event_type!r}; known: {', '.join(sorted(known))}",
            )
            return EXIT_USAGE
    if args.count < 0:
        error("events", f"--count must be 0 or more, not {args.count}")
        return EXIT_USAGE
    return run(args, _events)


def matches(fields: dict[str, str], args: argparse.Namespace) -> bool:
    wanted = (
        ("event", args.event_type),
        ("pod_id", args.pod),
        ("call_id", args.call),
        ("pool", args.pool),
    )
    return all(value is None or fields.get(key) == value for key, value in wanted)


def format_event(entry_id: str, fields: dict[str, str]) -> str:
    """``2024-05-01 12:00:00.123  allocated  call_id=c1 pod_id=p1 ...  [entry id]``."""
    rest = " ".join(
        f"{k}={v}" for k, v in fields.items() if k not in ("event", "at_ms") and v != ""
    )
    stamp = when(fields.get("at_ms") or entry_id.split("-", 1)[0])
    return f"{stamp}  {fields.get('event', '?'):<14} {rest}  [{entry_id}]"


def entries_of(raw: object) -> list[tuple[str, dict[str, str]]]:
    """Stream entries as redis-py returns them (decoded), typed; deleted ones dropped."""
    out: list[tuple[str, dict[str, str]]] = []
    for entry_id, fields in cast("list[tuple[str, dict[str, str] | None]]", raw or []):
        if fields is not None:
            out.append((entry_id, fields))
    return out


def _emit(ops: Ops, entries: Iterable[tuple[str, dict[str, str]]]) -> None:
    for entry_id, fields in entries:
        if not matches(fields, ops.args):
            continue
        if ops.json:  # one object per line while following: a stream, not a document
            doc: dict[str, Any] = {"id": entry_id, **fields}
            write(msgspec.json.encode(doc).decode())
        else:
            write(format_event(entry_id, fields))


async def latest_matching(ops: Ops, count: int) -> tuple[list[tuple[str, dict[str, str]]], str]:
    """The ``count`` latest events that pass the filters, oldest first, and the
    stream's newest id (where ``--follow`` goes on from).

    The filters apply before the count (regression, issue 14.6: ``--type X -c
    5`` showed the X events among the 5 latest, often none): the log is read
    backwards page by page until ``count`` matches are found or it ends. The
    events stream is capped, so the walk is bounded.
    """
    found: list[tuple[str, dict[str, str]]] = []
    newest = "0-0"
    upper = "+"
    page = max(count * 4, 256)
    while len(found) < count:
        raw = await ops.redis.xrevrange(ops.keys.events, max=upper, count=page)
        entries = entries_of(raw)
        if not entries:
            break
        if newest == "0-0":
            newest = entries[0][0]
        found.extend(e for e in entries if matches(e[1], ops.args))
        if len(cast("list[object]", raw)) < page:
            break
        upper = "(" + entries[-1][0]
    if newest == "0-0":
        last = entries_of(await ops.redis.xrevrange(ops.keys.events, count=1))
        newest = last[0][0] if last else "0-0"
    return list(reversed(found[:count])), newest


async def _events(ops: Ops) -> int:
    args = ops.args
    backlog, last_id = await latest_matching(ops, args.count)
    if ops.json and not args.follow:
        write_json([{"id": i, **f} for i, f in backlog])
        return EXIT_OK
    _emit(ops, backlog)
    if not args.follow:
        if not backlog and not ops.json:
            write("no events")
        return EXIT_OK

    async with anyio.create_task_group() as tg:

        async def stop_on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(stop_on_signal)
        while True:
            answer = await ops.redis.xread({ops.keys.events: last_id}, block=FOLLOW_BLOCK_MS)
            for _stream, raw in cast("list[tuple[str, Any]]", answer or []):
                entries = entries_of(raw)
                _emit(ops, entries)
                if entries:
                    last_id = entries[-1][0]
    return EXIT_OK
