"""``tierpool dead``: list dead letters, or requeue them to their stream.

A dead letter (``tp:{NS}:dead``, written by ``reject.lua``) keeps the stream
the message came from, its entry id, request id, the reason, the delivery
count and the original fields as JSON. ``requeue`` puts those fields back on
their stream as a new entry, deletes the dead letter and the letter's old
``invalid`` reply (so the requeued request's own reply is the one read), in one MULTI,
so a message is never lost nor requeued twice. Only the namespace's request
and pod streams are accepted as targets: a dead letter is data, and its
``stream`` field must not make us write to an arbitrary key.
"""

from __future__ import annotations

import argparse
from typing import Any

import msgspec
from redis.exceptions import WatchError

from tierpool.workers.gauges import stream_label
from tierpool.workers.ops.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    Ops,
    add_common,
    error,
    run,
    table,
    when,
    write,
    write_json,
)
from tierpool.workers.ops.events import entries_of

REQUEUE_ATTEMPTS = 10


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    add_common(parser)
    parser.add_argument(
        "action",
        nargs="?",
        choices=("list", "requeue"),
        default="list",
        help="list (default) or requeue",
    )
    parser.add_argument("ids", nargs="*", metavar="ID", help="dead-letter ids to requeue")
    parser.add_argument("--all", action="store_true", help="requeue every dead letter")
    parser.add_argument(
        "--count",
        "-c",
        type=int,
        default=50,
        metavar="N",
        help="list at most N, newest last (default 50)",
    )


def main(args: argparse.Namespace) -> int:
    if args.action == "list" and (args.ids or args.all):
        parser_error = "ids and --all go with 'requeue'"
        error("dead", parser_error)
        return EXIT_USAGE
    if args.action == "requeue" and not (args.ids or args.all):
        error("dead", "requeue needs dead-letter ids or --all")
        return EXIT_USAGE
    return run(args, _list if args.action == "list" else _requeue)


def dead_doc(ops: Ops, entry_id: str, fields: dict[str, str]) -> dict[str, Any]:
    try:
        original = msgspec.json.decode(fields.get("fields") or "{}")
    except msgspec.DecodeError:
        original = None
    stream = fields.get("stream", "")
    return {
        "id": entry_id,
        "stream": stream_label(ops.keys, stream) if stream else None,
        "stream_key": stream or None,
        "entry_id": fields.get("entry_id") or None,
        "request_id": fields.get("request_id") or None,
        "error": fields.get("error"),
        "deliveries": int(fields["deliveries"]) if fields.get("deliveries") else None,
        "at_ms": int(fields["at_ms"]) if fields.get("at_ms") else None,
        "fields": original,
    }


async def _list(ops: Ops) -> int:
    count = max(ops.args.count, 1)
    entries = list(reversed(entries_of(await ops.redis.xrevrange(ops.keys.dead, count=count))))
    docs = [dead_doc(ops, i, f) for i, f in entries]
    if ops.json:
        write_json(docs)
        return EXIT_OK
    if not docs:
        write("no dead letters")
        return EXIT_OK
    write(
        table(
            ["ID", "WHEN", "STREAM", "REQUEST ID", "DELIVERIES", "ERROR"],
            [
                [
                    d["id"],
                    when(d["at_ms"]),
                    d["stream"],
                    d["request_id"],
                    d["deliveries"],
                    d["error"],
                ]
                for d in docs
            ],
        )
    )
    total = await ops.redis.xlen(ops.keys.dead)
    if total > len(docs):
        write(f"\n{len(docs)} of {total} shown (--count)")
    return EXIT_OK


async def _requeue(ops: Ops) -> int:
    if ops.args.all:
        ids = [i for i, _ in entries_of(await ops.redis.xrange(ops.keys.dead))]
    else:
        ids = list(ops.args.ids)
    results = [await requeue_one(ops, entry_id) for entry_id in ids]
    if ops.json:
        write_json(results)
    else:
        for r in results:
            if "error" in r:
                write(f"{r['id']}: not requeued: {r['error']}")
            else:
                write(
                    f"{r['id']}: requeued to {r['stream']} as {r['new_id']}"
                    + (f" (request {r['request_id']})" if r["request_id"] else "")
                )
        if not results:
            write("no dead letters")
    return EXIT_FAILED if any("error" in r for r in results) else EXIT_OK


async def requeue_one(ops: Ops, entry_id: str) -> dict[str, Any]:
    """Move one dead letter back to its stream: XADD + XDEL under WATCH.

    WATCH makes two operators requeueing the same letter at once safe: the
    second one's transaction fails, and on retry the letter is gone.
    """
    dead = ops.keys.dead
    allowed = set(ops.keys.all_input_streams)
    async with ops.redis.pipeline(transaction=True) as pipe:
        for _attempt in range(REQUEUE_ATTEMPTS):
            await pipe.watch(dead)
            found = entries_of(await pipe.xrange(dead, entry_id, entry_id))
            if not found:
                return {"id": entry_id, "error": "no such dead letter"}
            doc = dead_doc(ops, entry_id, found[0][1])
            if doc["stream_key"] not in allowed:
                return {
                    "id": entry_id,
                    "error": f"stream {doc['stream_key']!r} is not a request or pod stream",
                }
            if not isinstance(doc["fields"], dict) or not doc["fields"]:
                return {
                    "id": entry_id,
                    "error": "the original fields are missing or not a JSON object",
                }
            original = {str(k): _text(v) for k, v in doc["fields"].items()}
            pipe.multi()  # type: ignore[no-untyped-call]
            pipe.xadd(
                doc["stream_key"],
                original,  # type: ignore[arg-type]
                maxlen=ops.settings.stream_maxlen,
                approximate=True,
            )
            pipe.xdel(dead, entry_id)
            rid = doc["request_id"]
            if rid:
                # The letter's `invalid` reply may still be unread (REPLY_TTL):
                # left there, a waiter would read it instead of the requeued
                # request's outcome, and the request_id would count as in use.
                pipe.delete(ops.keys.reply(rid))
            try:
                new_id, _deleted, *_cleared = await pipe.execute()
            except WatchError:
                continue  # the dead stream changed meanwhile: look again
            return {
                "id": entry_id,
                "stream": doc["stream"],
                "new_id": new_id,
                "request_id": doc["request_id"],
            }
    return {"id": entry_id, "error": "the dead stream kept changing; try again"}


def _text(value: object) -> str:
    """A field value back as the flat string it was (JSON-encoded lists and maps stay JSON)."""
    if isinstance(value, str):
        return value
    return msgspec.json.encode(value).decode()
