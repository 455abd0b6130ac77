"""What every operator command shares: options, settings, exit codes, output.

Exit codes (``tierpool.workers.cli``): 0 ok, 1 the operation failed or was refused,
2 bad usage or settings, 3 Redis unreachable, 4 timed out waiting for a
reply. Results go to stdout (a table, or JSON with ``--json``); errors and
logs go to stderr, so ``tierpool status --json | jq`` always works.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tierpool.connect.redisconn import connect
from tierpool.core.errors import (
    InvalidMessage,
    RedisUnavailable,
    ReplyMismatch,
    RequestNotSent,
    RequestTimeout,
    SettingsError,
)
from tierpool.core.keys import Keys, valid_namespace
from tierpool.core.masking import mask_text, mask_url
from tierpool.core.settings import Settings
from tierpool.workers.cli import EXIT_FAILED, EXIT_OK, EXIT_REDIS, EXIT_TIMEOUT, EXIT_USAGE

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_REDIS",
    "EXIT_TIMEOUT",
    "EXIT_USAGE",
    "Ops",
    "add_common",
    "ago",
    "error",
    "run",
    "table",
    "when",
    "write",
    "write_json",
]

DEFAULT_TIMEOUT_S = 10.0


def add_common(parser: argparse.ArgumentParser, *, timeout: bool = False) -> None:
    """``--redis-url``, ``--namespace``, ``--json`` (and ``--timeout`` for requests)."""
    parser.add_argument(
        "--redis-url",
        default=None,
        metavar="URL",
        help="Redis to use (default: $REDIS_URL, else redis://localhost:6379)",
    )
    parser.add_argument(
        "--namespace",
        "-n",
        default=None,
        metavar="NS",
        help="tierpool namespace (default: $TIERPOOL_NAMESPACE, else default)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    if timeout:
        parser.add_argument(
            "--timeout",
            type=positive_seconds,
            default=DEFAULT_TIMEOUT_S,
            metavar="S",
            help=f"seconds to wait for the reply (default {DEFAULT_TIMEOUT_S:g}); exit 4 after",
        )


def positive_seconds(text: str) -> float:
    """``--timeout``: a number of seconds above 0 (0 would give up before sending)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text}")
    return value


class OptionError(Exception):
    """A command-line value that cannot work; the message names the option."""


def settings_for(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with ``--redis-url``/``--namespace`` on top."""
    changes: dict[str, Any] = {}
    if getattr(args, "redis_url", None):
        changes["redis_url"] = args.redis_url
    if getattr(args, "namespace", None):
        if not valid_namespace(args.namespace):
            # Checked here so the error names the option, not TIERPOOL_NAMESPACE.
            raise OptionError(
                f"--namespace {args.namespace!r}: must be 1-64 chars of [A-Za-z0-9._:-] "
                "(it goes inside a Redis hash tag)"
            )
        changes["namespace"] = args.namespace
    settings = Settings.from_env(os.environ)
    return dataclasses.replace(settings, **changes) if changes else settings


@dataclass
class Ops:
    """One command's run: its arguments, settings, keys and Redis client."""

    args: argparse.Namespace
    settings: Settings
    keys: Keys
    redis: Redis

    @property
    def json(self) -> bool:
        return bool(getattr(self.args, "json", False))


def run(args: argparse.Namespace, body: Callable[[Ops], Awaitable[int]]) -> int:
    """Run ``body`` with a connected :class:`Ops`; turn failures into exit codes."""
    command = getattr(args, "_command", "tierpool")
    try:
        settings = settings_for(args)
    except (SettingsError, OptionError) as exc:
        error(command, str(exc))
        return EXIT_USAGE

    async def main() -> int:
        redis = connect(
            settings.redis_target,
            client_name=f"tierpool-cli-{command}",
            namespace=settings.namespace,
        )
        try:
            await redis.ping()  # unreachable Redis is exit 3, not a request timeout
            return await body(Ops(args, settings, Keys(settings.namespace), redis))
        finally:
            await redis.aclose()

    try:
        return anyio.run(main)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        leaf = _leaf(exc)
        if isinstance(leaf, InvalidMessage):
            error(command, f"not sent: {leaf}")
            return EXIT_USAGE
        if isinstance(leaf, ReplyMismatch):
            error(command, f"the reply cannot be trusted: {leaf}")
            return EXIT_FAILED
        if isinstance(leaf, RequestTimeout | TimeoutError):
            if isinstance(leaf, RequestNotSent):
                note = "it was never sent, so it will not be applied"
            else:
                note = (
                    "the request stays queued and may still be applied once a worker "
                    "reads it (check with `tierpool events`)"
                )
            if getattr(args, "json", False):
                write_json(
                    {
                        "status": "timeout",
                        "request_id": getattr(leaf, "request_id", None),
                        "error": str(leaf),
                        "note": note,
                    }
                )
            error(command, f"timed out: {leaf}; {note}")
            return EXIT_TIMEOUT
        if isinstance(
            leaf, RedisConnectionError | RedisTimeoutError | ConnectionError | RedisUnavailable
        ):
            error(command, f"cannot reach Redis at {mask_url(settings.redis_url)}: {leaf}")
            return EXIT_REDIS
        raise


def _leaf(exc: BaseException) -> BaseException:
    """The first leaf of an exception group (task groups wrap what a task raised)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


# --- output -------------------------------------------------------------------


def write(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def write_json(doc: object) -> None:
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(doc), indent=2).decode() + "\n")
    sys.stdout.flush()


def error(command: str, text: str) -> None:
    """An error line on stderr, masked like a log line (it may quote a Redis or upstream error)."""
    sys.stderr.write(mask_text(f"tierpool {command}: {text}") + "\n")
    sys.stderr.flush()


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A plain aligned table; numbers right-aligned, everything else left."""
    cells = [[_cell(v) for v in row] for row in rows]
    numeric = [
        bool(cells) and all(_is_number(row[i]) for row in cells) for i in range(len(headers))
    ]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if numeric[i] else v.ljust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(list(headers)), *(line(row) for row in cells)])


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _is_number(text: str) -> bool:
    return text == "-" or text.lstrip("-").replace(".", "", 1).isdigit()


def ago(then_ms: int | None, now_ms: int) -> str:
    """``3.2s ago``, ``5m ago``... for a past epoch-ms instant; ``-`` when unknown."""
    if then_ms is None:
        return "-"
    s = max(0.0, (now_ms - then_ms) / 1000)
    if s < 60:
        return f"{s:.1f}s ago"
    if s < 3600:
        return f"{s / 60:.0f}m ago"
    if s < 86400:
        return f"{s / 3600:.1f}h ago"
    return f"{s / 86400:.1f}d ago"


def when(epoch_ms: int | str | None) -> str:
    """Local wall time with milliseconds, for event and dead-letter listings."""
    if epoch_ms is None or epoch_ms == "":
        return "-"
    ms = int(epoch_ms)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) + f".{ms % 1000:03d}"
