"""Process logging: JSON lines with extras, the console format, idempotent setup."""

from __future__ import annotations

import dataclasses
import io
import logging
from collections.abc import Iterator

import anyio
import anyio.lowlevel
import msgspec
import pytest

from tierpool.core.settings import Settings
from tierpool.workers.logs import bind, log_fields, setup_logging


@pytest.fixture(autouse=True)
def restore_root() -> Iterator[None]:
    """Leave the root logger as pytest configured it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [msgspec.json.decode(line) for line in stream.getvalue().splitlines() if line]


def test_json_lines_carry_extras_and_bound_fields() -> None:
    out = io.StringIO()
    setup_logging(Settings(log_format="json", log_level="info"), stream=out)
    log = logging.getLogger("tierpool.test")
    with log_fields(worker_id="w-1"):
        log.info(
            "allocated %s",
            "c1",
            extra={"call_id": "c1", "pod_id": "p1", "pool": "gold", "request_id": "r1"},
        )
    log.debug("not shown at info")
    (doc,) = _lines(out)
    assert doc["msg"] == "allocated c1"
    assert doc["level"] == "info"
    assert doc["logger"] == "tierpool.test"
    assert str(doc["ts"]).endswith("Z") and "T" in str(doc["ts"])
    for key, value in {
        "call_id": "c1",
        "pod_id": "p1",
        "pool": "gold",
        "request_id": "r1",
        "worker_id": "w-1",
    }.items():
        assert doc[key] == value


def test_json_exception_and_odd_values() -> None:
    out = io.StringIO()
    setup_logging(Settings(log_format="json"), stream=out)
    log = logging.getLogger("tierpool.test")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed", extra={"thing": 1 + 2j})
    (doc,) = _lines(out)
    assert "ValueError: boom" in str(doc["exc"])
    assert doc["level"] == "error"
    assert doc["thing"] == "(1+2j)"  # not JSON-serialisable: written as text, never dropped


def test_console_format_is_readable() -> None:
    out = io.StringIO()
    setup_logging(Settings(log_format="console", log_level="debug"), stream=out)
    logging.getLogger("tierpool.test").debug(
        "draining", extra={"pod_id": "p1", "reason": "deploy 42"}
    )
    line = out.getvalue().strip()
    assert "DEBUG" in line and "tierpool.test: draining" in line
    assert "pod_id=p1" in line and "reason='deploy 42'" in line
    with pytest.raises(msgspec.DecodeError):
        msgspec.json.decode(line)


def test_setup_is_idempotent_and_follows_the_level() -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging(Settings(), stream=first)
    setup_logging(dataclasses.replace(Settings(), log_level="warning"), stream=second)
    root = logging.getLogger()
    ours = [h for h in root.handlers if type(h).__name__ == "_TierpoolHandler"]
    assert len(ours) == 1
    log = logging.getLogger("tierpool.test")
    log.info("hidden")
    log.warning("shown")
    assert first.getvalue() == ""
    assert [d["msg"] for d in _lines(second)] == ["shown"]


@pytest.mark.anyio
async def test_bound_fields_follow_each_task() -> None:
    """``bind`` in one task does not leak into a sibling task (context variables)."""
    out = io.StringIO()
    setup_logging(Settings(), stream=out)
    log = logging.getLogger("tierpool.test")

    async def task(name: str) -> None:
        bind(request_id=name)
        await anyio.lowlevel.checkpoint()
        log.info("step")

    async with anyio.create_task_group() as tg:
        tg.start_soon(task, "a")
        tg.start_soon(task, "b")
    assert sorted(str(d["request_id"]) for d in _lines(out)) == ["a", "b"]
