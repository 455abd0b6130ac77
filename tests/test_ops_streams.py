"""``tierpool events`` (with ``--follow``) and ``tierpool dead`` (list, requeue), live."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import msgspec
import pytest
from redis.asyncio import Redis

from tests.conftest import ROOT, wait_for
from tests.procs import WorkerPool, reply, send
from tierpool.client.client import TierpoolClient
from tierpool.core.keys import Keys
from tierpool.schemas import PodRegister
from tierpool.workers.cli import main as cli_main

pytestmark = pytest.mark.anyio

NS = "t"
KEYS = Keys(NS)


@pytest.fixture
async def client(
    r: Redis, redis_url: str, tmp_path: Path, env_clean: pytest.MonkeyPatch
) -> AsyncIterator[TierpoolClient]:
    with WorkerPool(redis_url, tmp_path, env={"POD_TTL": "60s"}) as pool:
        await pool.start(r, 1)
        async with TierpoolClient.from_url(redis_url, namespace=NS) as c:
            for i in range(2):
                got = await c.send_pod_event(
                    PodRegister(pod_id=f"pod-{i}", endpoint=f"http://10.2.0.{i}:8080")
                )
                assert got is not None and got.status == "registered"
            yield c


async def tp(capsys: pytest.CaptureFixture[str], url: str, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = await anyio.to_thread.run_sync(cli_main, [*argv, "--redis-url", url, "--namespace", NS])
    out, err = capsys.readouterr()
    return code, out, err


async def test_events_lists_and_filters(
    client: TierpoolClient, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (await client.allocate("call-e")).status == "allocated"
    assert (await client.release("call-e")).status == "released"
    code, out, _ = await tp(capsys, redis_url, "events", "--json")
    assert code == 0
    events = msgspec.json.decode(out)
    kinds = [e["event"] for e in events]
    assert kinds.index("allocated") < kinds.index("released")  # oldest first
    assert all("id" in e and "at_ms" in e for e in events)

    code, out, _ = await tp(capsys, redis_url, "events", "--json", "--call", "call-e")
    assert [e["event"] for e in msgspec.json.decode(out)] == ["allocated", "released"]
    code, out, _ = await tp(capsys, redis_url, "events", "--type", "released")
    (line,) = out.splitlines()
    assert "released" in line and "call_id=call-e" in line
    code, out, _ = await tp(capsys, redis_url, "events", "--count", "1", "--json")
    assert len(msgspec.json.decode(out)) == 1


async def test_events_filter_before_count_and_unknown_type(
    client: TierpoolClient, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression (issue 14.6): ``--type X -c N`` applied the count before the
    filter (an older match never showed), and an unknown ``--type`` printed
    nothing with exit 0."""
    assert (await client.allocate("call-old")).status == "allocated"
    assert (await client.release("call-old")).status == "released"
    for i in range(12):
        assert (await client.allocate(f"call-{i}")).status == "allocated"
        assert (await client.release(f"call-{i}")).status == "released"
    code, out, _ = await tp(capsys, redis_url, "events", "--json", "--type", "released", "-c", "13")
    assert code == 0
    got = [e["call_id"] for e in msgspec.json.decode(out)]
    assert got == ["call-old", *(f"call-{i}" for i in range(12))]
    code, out, _ = await tp(capsys, redis_url, "events", "--json", "--call", "call-old", "-c", "1")
    assert [e["event"] for e in msgspec.json.decode(out)] == ["released"]

    code, out, err = await tp(capsys, redis_url, "events", "--type", "relased")
    assert code == 2 and out == ""
    assert "unknown event type 'relased'" in err and "released" in err


def test_every_event_type_is_declared_where_the_cli_finds_it() -> None:
    """The CLI learns event types from the scripts (``scripts.event_types``):
    each ``event(...)`` call names its type as a literal or through ``kind``."""
    import re

    from tierpool.core.scripts import LUA_DIR, event_types

    for path in LUA_DIR.glob("*.lua"):
        for arg in re.findall(r"\bevent\(([^,]+),", path.read_text()):
            assert arg.startswith("'") or arg == "kind", f"{path.name}: event({arg}, ...)"
    assert {"allocated", "released", "pod_registered", "merchant_removed"} <= event_types()


async def test_events_follow_prints_new_events_until_sigint(
    client: TierpoolClient, redis_url: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERPOOL_")}
    proc = await anyio.open_process(
        [
            sys.executable,
            "-m",
            "tierpool",
            "events",
            "--follow",
            "--count",
            "0",
            "--type",
            "allocated",
            "--redis-url",
            redis_url,
            "--namespace",
            NS,
        ],
        cwd=ROOT,
        env=env,
    )
    assert proc.stdout is not None
    seen = b""
    try:
        n = 0
        with anyio.fail_after(30):
            while b"call_id=follow-" not in seen:
                n += 1  # keep allocating until the follower, once started, sees one
                assert (await client.allocate(f"follow-{n}")).status == "allocated"
                assert (await client.release(f"follow-{n}")).status == "released"
                with anyio.move_on_after(0.5):
                    seen += await proc.stdout.receive()
        proc.send_signal(signal.SIGINT)
        with anyio.fail_after(10):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await proc.aclose()


async def _dead_ids(r: Redis) -> list[str]:
    return [str(entry_id) for entry_id, _ in await r.xrange(KEYS.dead) or []]


async def test_dead_list_and_requeue(
    client: TierpoolClient, r: Redis, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # A bad message: the worker answers invalid and dead-letters it.
    await send(r, KEYS.request_stream("allocate"), {"request_id": "bad-1"})
    assert (await reply(r, "bad-1"))["status"] == "invalid"
    await wait_for(lambda: _count_is(r, 1))
    (bad_id,) = await _dead_ids(r)

    code, out, _ = await tp(capsys, redis_url, "dead", "--json")
    (doc,) = msgspec.json.decode(out)
    assert code == 0
    assert doc["id"] == bad_id and doc["stream"] == "allocate"
    assert doc["request_id"] == "bad-1" and "call_id" in doc["error"]
    assert doc["fields"] == {"request_id": "bad-1"}
    code, out, _ = await tp(capsys, redis_url, "dead", "list")
    assert code == 0 and bad_id in out and "bad-1" in out and "ERROR" in out

    # A letter that is fine now (as after fixing what rejected it): requeue serves it.
    good_id = str(
        await r.xadd(
            KEYS.dead,
            {
                "stream": KEYS.request_stream("allocate"),
                "entry_id": "1-0",
                "request_id": "req-ok",
                "error": "test",
                "deliveries": "6",
                "at_ms": "0",
                "fields": msgspec.json.encode(
                    {"request_id": "req-ok", "call_id": "c-requeued"}
                ).decode(),
            },
        )
    )
    # Its old `invalid` reply is still unread (within REPLY_TTL): requeueing
    # clears it, so the reply read is the requeued request's (issue 14.9).
    await r.xadd(KEYS.reply("req-ok"), {"request_id": "req-ok", "status": "invalid"})
    code, out, _ = await tp(capsys, redis_url, "dead", "requeue", good_id)
    assert code == 0 and f"{good_id}: requeued to allocate as " in out
    assert (await reply(r, "req-ok"))["status"] == "allocated"
    assert good_id not in await _dead_ids(r)

    # Requeueing the bad one again sends it back to the dead letters, under a new id.
    code, out, _ = await tp(capsys, redis_url, "dead", "requeue", bad_id)
    assert code == 0

    async def back_again() -> bool:
        ids = await _dead_ids(r)
        return bad_id not in ids and len(ids) == 1

    await wait_for(back_again)

    # Refused: an unknown id; a letter naming a stream outside the namespace.
    foreign = str(await r.xadd(KEYS.dead, {"stream": "elsewhere", "fields": '{"a": "1"}'}))
    code, out, _ = await tp(capsys, redis_url, "dead", "requeue", "0-1", foreign)
    assert code == 1
    assert "0-1: not requeued: no such dead letter" in out
    assert f"{foreign}: not requeued: stream 'elsewhere'" in out
    assert foreign in await _dead_ids(r)
    assert await r.xlen("elsewhere") == 0

    assert (await tp(capsys, redis_url, "dead", "requeue"))[0] == 2
    assert (await tp(capsys, redis_url, "dead", "list", "1-0"))[0] == 2


async def _count_is(r: Redis, n: int) -> bool:
    return int(await r.xlen(KEYS.dead)) == n


async def test_requeue_all(
    client: TierpoolClient, r: Redis, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for i in range(3):
        await r.xadd(
            KEYS.dead,
            {
                "stream": KEYS.request_stream("release"),
                "request_id": f"rq-{i}",
                "fields": msgspec.json.encode(
                    {"request_id": f"rq-{i}", "call_id": f"none-{i}"}
                ).decode(),
            },
        )
    code, out, _ = await tp(capsys, redis_url, "dead", "requeue", "--all", "--json")
    assert code == 0
    assert [d["request_id"] for d in msgspec.json.decode(out)] == ["rq-0", "rq-1", "rq-2"]
    for i in range(3):
        assert (await reply(r, f"rq-{i}"))["status"] == "not_found"
    assert await r.xlen(KEYS.dead) == 0
