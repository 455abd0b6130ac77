"""``tierpool drain|undrain|allocate|release``: one request through its stream.

These go through the client library like any producer (XADD, then wait for
the one reply), so they exercise the real path and obey the same rules:
``allocate`` is idempotent per call id, ``release`` of an unknown call is
``not_found``. Exit 0 when the reply is the success status of the command,
1 for any other reply (rejected, not_found, invalid, expired), 4 when no
reply came within ``--timeout``.
"""

from __future__ import annotations

import argparse
from typing import Any, Final

from tierpool.workers.ops.client import reply_doc, tierpool_client
from tierpool.workers.ops.common import (
    EXIT_FAILED,
    EXIT_OK,
    Ops,
    add_common,
    run,
    when,
    write,
    write_json,
)

SUCCESS: Final = {
    "drain": "drained",
    "undrain": "undrained",
    "allocate": "allocated",
    "release": "released",
}


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    add_common(parser, timeout=True)
    if name in ("drain", "undrain"):
        parser.add_argument("pod_id", metavar="POD_ID")
        if name == "drain":
            parser.add_argument("--reason", default=None, help="recorded in the audit log")
    elif name == "release":
        parser.add_argument("call_id", metavar="CALL_ID")
    elif name == "allocate":
        parser.add_argument("call_id", metavar="CALL_ID")
        parser.add_argument("--merchant", dest="merchant_id", metavar="MERCHANT_ID")
        parser.add_argument("--chain", help="comma-separated pool names to try in order")
        parser.add_argument("--zone", choices=("any", "restricted"))
        parser.add_argument("--min-capability", type=int, choices=range(1, 6), metavar="1-5")
        parser.add_argument("--tier-mode", choices=("strict", "flexible"))
        parser.add_argument("--provider")
        parser.add_argument("--flow")
        parser.add_argument("--template")


def main(args: argparse.Namespace) -> int:
    return run(args, _request)


async def _request(ops: Ops) -> int:
    args = ops.args
    command: str = args._command
    async with tierpool_client(ops) as client:
        if command == "drain":
            reply = await client.drain(args.pod_id, reason=args.reason)
        elif command == "undrain":
            reply = await client.undrain(args.pod_id)
        elif command == "release":
            reply = await client.release(args.call_id)
        else:
            options: dict[str, Any] = {
                k: getattr(args, k)
                for k in (
                    "merchant_id",
                    "zone",
                    "min_capability",
                    "tier_mode",
                    "provider",
                    "flow",
                    "template",
                )
                if getattr(args, k) is not None
            }
            if args.chain:
                options["chain"] = [p.strip() for p in args.chain.split(",") if p.strip()]
            reply = await client.allocate(args.call_id, **options)
    doc = reply_doc(reply)
    if ops.json:
        write_json(doc)
    else:
        write(describe(doc))
    return EXIT_OK if doc.get("status") == SUCCESS[command] else EXIT_FAILED


def describe(doc: dict[str, Any]) -> str:
    """One readable line (plus the reasons of a rejection)."""
    status = str(doc.get("status", "?"))
    if status == "allocated":
        text = f"allocated: pod {doc.get('pod_id')} (pool {doc.get('pool')})"
        if doc.get("existing"):
            text += ", already held by this call"
        if doc.get("session_url"):
            text += f"\n  session {doc['session_url']}"
        if doc.get("lease_expires_ms"):
            text += f"\n  lease until {when(doc['lease_expires_ms'])}"
        return text
    if status == "rejected":
        lines = ["rejected: no pod satisfies the request"]
        for r in doc.get("reasons") or []:
            lines.append(
                f"  - {r.get('filter')}: {r.get('detail')}"
                + (f" (try: {r['suggested_action']})" if r.get("suggested_action") else "")
            )
        return "\n".join(lines)
    rest = {k: v for k, v in doc.items() if k not in ("status", "request_id")}
    return status + ("" if not rest else ": " + " ".join(f"{k}={v}" for k, v in rest.items()))
