"""``tierpool bench --only client``: allocate round trips of the client's read modes.

Low load, one request at a time per caller: a bare redis-py producer (its
own XADD + XREAD BLOCK + DEL) is the baseline, then the client with CLIENT
UNBLOCK and the client polling with short blocks. With a request
outstanding (nobody answers it) the reader is always blocked when a new one
starts: a short block then does not help, as Redis ends a blocking read only
at its next event-loop tick (hz 10: up to 100 ms) when nothing else wakes
it, while CLIENT UNBLOCK wakes it at once.

This was a test; it measures, so it lives here (nothing asserts a figure).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from functools import partial
from typing import Any

import anyio
from redis.asyncio import Redis

from tierpool.bench.common import Quantiles
from tierpool.client.client import TierpoolClient, new_request_id
from tierpool.core.errors import RequestTimeout
from tierpool.core.keys import Keys

CLIENT_MODES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("unblock, block 1000 ms", {"unblock": True}),
    ("poll, block 1 ms", {"unblock": False, "block_ms": 1}),
    ("poll, block 10 ms", {"unblock": False, "block_ms": 10}),
)
PATTERNS = (
    ("1 caller", 1, False),
    ("2 callers", 2, False),
    ("1 caller + 1 request outstanding", 1, True),
)
SAMPLES = 200


async def _raw_allocate(r: Redis, keys: Keys, call: str) -> float:
    """What a minimal producer does (XADD, XREAD BLOCK, DEL), timed; then release."""
    rid = new_request_id()
    t0 = time.perf_counter()
    await r.xadd(keys.request_stream("allocate"), {"request_id": rid, "call_id": call})
    got: Any = await r.xread({keys.reply(rid): "0-0"}, count=1, block=2000)
    took = time.perf_counter() - t0
    if not got or got[0][1][0][1]["status"] != "allocated":
        raise RuntimeError(f"allocate {call}: {got!r}")
    await r.delete(keys.reply(rid))
    await r.xadd(keys.request_stream("release"), {"request_id": rid + "r", "call_id": call})
    await r.xread({keys.reply(rid + "r"): "0-0"}, count=1, block=2000)
    await r.delete(keys.reply(rid + "r"))
    return took


async def _client_allocate(c: TierpoolClient, call: str) -> float:
    t0 = time.perf_counter()
    rep = await c.allocate(call)
    took = time.perf_counter() - t0
    if rep.status != "allocated":
        raise RuntimeError(f"allocate {call}: {rep!r}")
    await c.release(call)
    return took


async def _callers(
    n: int, one: Callable[[str], Awaitable[float]], tag: str, samples: int
) -> list[float]:
    """``n`` concurrent callers, each making ``samples`` sequential requests; the latencies."""
    lat: list[float] = []

    async def loop(i: int) -> None:
        for k in range(samples):
            lat.append(await one(f"{tag}-{i}-{k}"))

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(loop, i)
    return lat


async def _outstanding(c: TierpoolClient, keys: Keys) -> None:
    """A request nobody answers: the reader stays blocked on its reply key."""
    with suppress(RequestTimeout):
        await c.mux.submit("slow", keys.reply("sink"), {"x": "1"}, keys.reply("slow"), 60)


async def measure(
    url: str, namespace: str, r: Redis, samples: int = SAMPLES
) -> dict[str, Quantiles]:
    """Round-trip quantiles per (mode, pattern), with workers serving ``namespace``."""
    keys = Keys(namespace)
    rows: dict[str, Quantiles] = {}
    for p, (pattern, callers, outstanding) in enumerate(PATTERNS):
        if not outstanding:
            lat = await _callers(callers, partial(_raw_allocate, r, keys), f"raw{p}", samples)
            rows[f"redis-py producer, {pattern}"] = Quantiles.of(lat)
        for j, (mode, kw) in enumerate(CLIENT_MODES):
            async with (
                TierpoolClient.from_url(url, namespace=namespace, **kw) as c,
                anyio.create_task_group() as tg,
            ):
                if outstanding:
                    tg.start_soon(_outstanding, c, keys)
                # polling behind a blocked read takes up to Redis's 100 ms tick: fewer samples
                n = samples // 5 if outstanding and not c.mux.unblock else samples
                lat = await _callers(callers, partial(_client_allocate, c), f"c{p}{j}", n)
                tg.cancel_scope.cancel()
            rows[f"client {mode}, {pattern}"] = Quantiles.of(lat)
    return rows
