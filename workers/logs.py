"""Process logging: JSON lines for machines, a readable line for people.

``LOG_FORMAT=json`` (the default, what a log pipeline wants) writes one
JSON object per line with ``ts``, ``level``, ``logger``, ``msg`` and every
field passed with ``extra=`` (``request_id``, ``call_id``, ``pod_id``,
``pool``, ``worker_id``...); ``LOG_FORMAT=console`` writes the same facts as
``time LEVEL logger: msg key=value``. ``LOG_LEVEL`` sets the root level.
Both pass the finished line through :func:`~tierpool.core.masking.mask_text`,
so no URL password or token reaches a log, whoever logged it (redis-py and
urllib errors included).

Fields that hold for a whole process or task (the worker id, the request a
batch step is handling) are bound once with :func:`bind` or
:func:`log_fields` instead of being repeated at every call; they live in a
context variable, so each asyncio task sees its own.

:func:`setup_logging` is idempotent: calling it again replaces the handler it
installed (tests and ``tierpool run`` call it more than once) and leaves
handlers that others installed (pytest's capture) alone.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import time
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import IO, Any, Final

import msgspec

from tierpool.core.masking import mask_text
from tierpool.core.settings import Settings

_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRS: Final = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}

_bound: contextvars.ContextVar[Mapping[str, object]] = contextvars.ContextVar(
    "tierpool_log_fields", default=MappingProxyType({})
)


def bind(**fields: object) -> None:
    """Add ``fields`` to every record logged from this context on (and tasks it starts)."""
    _bound.set({**_bound.get(), **fields})


@contextlib.contextmanager
def log_fields(**fields: object) -> Iterator[None]:
    """Add ``fields`` to every record logged inside the ``with`` block."""
    token = _bound.set({**_bound.get(), **fields})
    try:
        yield
    finally:
        _bound.reset(token)


def record_fields(record: logging.LogRecord) -> dict[str, object]:
    """The bound fields and ``extra=`` fields of a record (extra wins)."""
    out: dict[str, object] = dict(getattr(record, "_bound", None) or {})
    for key, value in record.__dict__.items():
        if key not in _RECORD_ATTRS and not key.startswith("_"):
            out[key] = value
    return out


class _BindFilter(logging.Filter):
    """Copies the context's bound fields onto the record when it is created."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = _bound.get()
        if fields:
            record._bound = fields
        return True


def _timestamp(created: float) -> str:
    """ISO 8601 UTC with milliseconds: sorts as text, parses everywhere."""
    secs = int(created)
    ms = int((created - secs) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{ms:03d}Z"


def _default(value: object) -> str:
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg``, extras, ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record_fields(record).items():
            doc.setdefault(key, value)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return mask_text(msgspec.json.encode(doc, enc_hook=_default).decode())


class ConsoleFormatter(logging.Formatter):
    """``12:00:01.234 INFO  workers.worker: started key=value`` for a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        stamp += f".{int(record.msecs):03d}"
        line = f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()}"
        fields = record_fields(record)
        if fields:
            line += " " + " ".join(f"{k}={_console_value(v)}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return mask_text(line)


def _console_value(value: object) -> str:
    text = str(value)
    return repr(text) if (" " in text or not text) else text


class _TierpoolHandler(logging.StreamHandler[IO[str]]):
    """Marks the one handler :func:`setup_logging` owns, so a second call replaces it."""


def setup_logging(settings: Settings, *, stream: IO[str] | None = None) -> None:
    """Configure the root logger from ``LOG_FORMAT`` and ``LOG_LEVEL``. Idempotent.

    Logs go to ``stream`` (stderr by default), so a command's stdout stays
    free for its output (``tierpool status --json | jq``).
    """
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _TierpoolHandler)]:
        root.removeHandler(old)
        old.close()
    handler = _TierpoolHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else ConsoleFormatter())
    handler.addFilter(_BindFilter())
    root.addHandler(handler)
    root.setLevel(_LEVELS[settings.log_level])
    # Library chatter that says nothing an operator can act on at info level.
    for name in ("asyncio", "redis"):
        logging.getLogger(name).setLevel(max(_LEVELS[settings.log_level], logging.WARNING))
