"""Thousands of malformed entries, mixed with real traffic, through two workers.

Contract guarantee 4: a bad message never stops a worker; it goes to
``tp:{NS}:dead`` with the reason and gets an ``invalid`` reply when its
request_id is usable. The junk comes from a seeded generator (so a failure
replays): random fields, wrong types, values up to ~100 KB, bytes that are
not UTF-8 (written with a bytes client, as a C or Go producer could), unknown
pod events and empty entries. Which entries are bad is judged by the
schemas themselves on the text a worker sees (invalid UTF-8 replaced), so the
generator never has to guess.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from tests.conftest import wait_for
from tests.procs import KEYS, WorkerPool, replies, send, settled
from tierpool.core.errors import InvalidMessage
from tierpool.workers.streams import stream_kinds

pytestmark = pytest.mark.anyio

SEED = 20240611
N_BAD = 2500
N_GOOD = 500
KINDS = stream_kinds(KEYS)
STREAMS = list(KINDS)
Raw = dict[bytes, bytes]


@pytest.fixture
def pool(redis_url: str, tmp_path: Path) -> Iterator[WorkerPool]:
    with WorkerPool(redis_url, tmp_path, env={"TIERPOOL_DEAD_MAXLEN": "100000"}) as p:
        yield p


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.printable) for _ in range(n))


def _junk_bytes(rng: random.Random, n: int) -> bytes:
    return bytes(rng.randrange(256) for _ in range(n)) + b"\xff\xfe"


def _bad_candidate(rng: random.Random, i: int) -> tuple[str, Raw]:
    """One entry meant to be bad, for a random stream; may have a usable request_id."""
    stream = rng.choice(STREAMS)
    rid = f"f{i}"
    f: dict[str | bytes, str | bytes] = {}
    if rng.random() < 0.6:
        f["request_id"] = rid
    shape = rng.randrange(8)
    if shape == 0:  # random unknown fields only
        for _ in range(rng.randint(1, 5)):
            f[f"x{rng.randrange(10**6)}"] = _text(rng, rng.randint(0, 40))
    elif shape == 1:  # the right fields with the wrong types or values
        stream = KEYS.request_stream("allocate")
        f["call_id"] = rng.choice(["has space", "x" * 129, "tab\there", f"ok{i}"])
        f[rng.choice(["min_capability", "chain", "zone", "tier_mode", "deadline_ms"])] = rng.choice(
            [
                "seven",
                "0",
                "6",
                "-1",
                "1.5",
                "not json",
                "[1, 2]",
                "{}",
                "moon",
                '["a", "a"]',
                "1e3",
            ]
        )
    elif shape == 2:  # huge values
        f["call_id" if rng.random() < 0.5 else "reason"] = "a" * rng.randint(17_000, 100_000)
        f["pod_id"] = "p0"
    elif shape == 3:  # bytes that are not UTF-8, in names and values
        f[_junk_bytes(rng, rng.randint(0, 8))] = _junk_bytes(rng, rng.randint(0, 30))
        f["call_id"] = _junk_bytes(rng, 4)
        f["pod_id"] = b"pod\xc3\x28"
        if rng.random() < 0.3:
            f["request_id"] = b"r\xe2\x82" + str(i).encode()
    elif shape == 4:  # pod events nobody knows
        stream = KEYS.pods_stream
        f["event"] = rng.choice(["explode", "REGISTER", "", "register ", "heartbeat\x00"])
        f["pod_id"] = "p0"
    elif shape == 5:  # empty entries (XADD needs one pair: an empty one)
        f = {b"": b""}
    elif shape == 6:  # configs that are not configs
        stream = KEYS.request_stream("config")
        f["config"] = rng.choice(
            ["not json", "[1]", '{"gold": {"type": "weird"}}', '{"gold": {"target": -3}}', "{" * 50]
        )
    else:  # a drain that is not a drain
        stream = KEYS.request_stream("drain")
        f["pod_id"] = rng.choice(["p0", "p 0", ""])
        f["action"] = rng.choice(["explode", "DRAIN", "undrain!"])
    raw = {
        (k if isinstance(k, bytes) else k.encode()): (v if isinstance(v, bytes) else v.encode())
        for k, v in f.items()
    }
    return stream, raw


def _as_seen(raw: Raw) -> dict[str, str]:
    """The entry as a worker's client decodes it (encoding_errors="replace")."""
    return {k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in raw.items()}


def _judge(stream: str, raw: Raw) -> tuple[bool, str | None]:
    """(whether the schemas refuse it, the request_id its invalid reply goes to)."""
    from tierpool.schemas import decode_pod_event, decode_request

    fields = _as_seen(raw)
    kind = KINDS[stream]
    try:
        msg = decode_pod_event(fields) if kind == "pods" else decode_request(kind, fields)
    except InvalidMessage as exc:
        return True, exc.request_id
    if kind == "config" and getattr(msg, "config", None):
        return True, msg.request_id  # decodes, but the tier config itself is refused
    return False, None


@pytest.mark.slow
async def test_malformed_entries_are_dead_lettered_and_valid_traffic_is_served(
    r: Redis, redis_url: str, pool: WorkerPool
) -> None:
    workers = await pool.start(r, 2)
    for p in range(4):
        await send(
            r,
            KEYS.pods_stream,
            {
                "request_id": f"reg{p}",
                "event": "register",
                "pod_id": f"p{p}",
                "endpoint": f"http://p{p}:80",
            },
        )
    await replies(r, [f"reg{p}" for p in range(4)])
    rng = random.Random(SEED)
    raw_client = Redis.from_url(redis_url, decode_responses=False)
    bad: dict[tuple[str, str], str | None] = {}  # (stream, entry id) -> reply id
    good: list[str] = []
    plan: list[tuple[str, Raw, str | None]] = []
    made = 0
    while len(plan) < N_BAD:
        stream, raw = _bad_candidate(rng, made)
        made += 1
        refused, rid = _judge(stream, raw)
        if refused:
            plan.append((stream, raw, rid))
    for i in range(N_GOOD):
        call = f"g{i // 2}"
        stream = KEYS.request_stream("release" if i % 2 else "allocate")
        at = rng.randrange(len(plan) + 1)
        plan.insert(
            at, (stream, {b"request_id": f"g{i}".encode(), b"call_id": call.encode()}, "GOOD")
        )
        good.append(f"g{i}")
    try:
        for start in range(0, len(plan), 200):
            chunk = plan[start : start + 200]
            async with raw_client.pipeline(transaction=False) as pipe:
                for stream, raw, _ in chunk:
                    pipe.xadd(stream, raw)  # type: ignore[arg-type]
                ids = await pipe.execute()
            for (stream, _, rid), entry_id in zip(chunk, ids, strict=True):
                if rid != "GOOD":
                    bad[(stream, entry_id.decode())] = rid
    finally:
        await raw_client.aclose()

    answered = [rid for rid in bad.values() if rid is not None]
    got = await replies(r, good + answered, timeout_s=60)
    await wait_for(lambda: settled(r), timeout_s=30)
    assert all(w.alive() for w in workers)

    served = {rid: entries[0]["status"] for rid, entries in got.items() if rid in good}
    assert [rid for rid, status in served.items() if status == "invalid"] == []
    for rid in answered:
        [only] = got[rid]
        assert only["status"] == "invalid" and only["error"], (rid, only)

    dead = {(d["stream"], d["entry_id"]): d for _, d in await r.xrange(KEYS.dead)}
    assert set(dead) == set(bad)
    for key, rid in bad.items():
        assert dead[key]["error"], key
        assert dead[key]["request_id"] == (rid or "")
    print(
        f"{len(bad)} bad entries dead-lettered ({len(answered)} answered), "
        f"{len(good)} valid requests served, from {made} candidates"
    )
