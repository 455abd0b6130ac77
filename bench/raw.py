"""The raw ceiling: allocate and release scripts called straight through ``PoolState.run``.

No streams, no workers: each loop prepares a batch of allocations, sends it
in one pipelined round trip, then releases the same calls the same way, and
deletes the batch's reply streams (as the client library does). The scripts
do exactly the work they do for a worker (reply, audit event, state change)
except the stream checks (``XPENDING``/``XACK``: there is no entry).

One Python process cannot keep Redis busy (it prepares a batch while Redis
waits, then waits while Redis runs it), so the ceiling is also measured with
several processes started at the same instant (``spawn``), each on its own
calls. :func:`profile_in_process` runs the same loop in the calling process,
for cProfile (``tierpool bench --profile``) or py-spy.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import anyio

from tierpool.bench.common import bench_settings, make_state
from tierpool.connect.redisconn import connect
from tierpool.core.state import PoolState
from tierpool.schemas import AllocateRequest, ReleaseRequest


@dataclass(frozen=True, slots=True)
class RawResult:
    processes: int
    pairs: int
    elapsed_s: float
    rejected: int
    all_pairs: int  # warm-up included: what the CPU figures are divided by
    cpu_s: float  # CPU time of the client processes

    @property
    def rate(self) -> float:
        """Allocate+release pairs per second (= allocations/s)."""
        return self.pairs / self.elapsed_s if self.elapsed_s > 0 else 0.0


async def run_pairs(
    state: PoolState, tag: str, batch: int, until: Callable[[int], bool]
) -> tuple[int, int]:
    """Allocate ``batch`` calls, release them, repeat until ``until(pairs)``.

    Returns (pairs done, allocations rejected). Request and call ids are
    unique per ``tag``, so concurrent loops never share a call.
    """
    keys = state.keys
    pairs = rejected = n = 0
    while not until(pairs):
        allocs = [
            (AllocateRequest(request_id=f"{tag}a{n + i}", call_id=f"{tag}c{n + i}"), None)
            for i in range(batch)
        ]
        outcomes = await state.run(allocs)
        placed = [i for i, o in enumerate(outcomes) if o.status == "allocated"]
        rejected += batch - len(placed)
        releases = [
            (ReleaseRequest(request_id=f"{tag}r{n + i}", call_id=f"{tag}c{n + i}"), None)
            for i in placed
        ]
        if releases:
            await state.run(releases)
        replies = [keys.reply(f"{tag}a{n + i}") for i in range(batch)]
        replies += [keys.reply(f"{tag}r{n + i}") for i in placed]
        await state.redis.unlink(*replies)
        pairs += len(placed)
        n += batch
    return pairs, rejected


@dataclass(frozen=True, slots=True)
class _Loop:
    pairs: int
    rejected: int
    elapsed_s: float
    warmup_pairs: int
    cpu_s: float


async def _timed_loop(
    url: str, namespace: str, tag: str, batch: int, start_at: float, duration_s: float
) -> _Loop:
    cpu0 = time.process_time()
    redis = connect(url, client_name=f"bench-raw-{tag}", namespace=namespace)
    try:
        state = await make_state(redis, bench_settings(url, namespace))
        # Warm up: load the scripts, open the connection.
        warm, _ = await run_pairs(state, f"{tag}w", batch, lambda p: p > 0)
        await anyio.sleep(max(0.0, start_at - time.time()))
        t0 = time.perf_counter()
        end = t0 + duration_s
        pairs, rejected = await run_pairs(state, tag, batch, lambda _p: time.perf_counter() >= end)
        elapsed = time.perf_counter() - t0
    finally:
        await redis.aclose()
    return _Loop(pairs, rejected, elapsed, warm, time.process_time() - cpu0)


def _process_main(args: tuple[str, str, str, int, float, float]) -> _Loop:
    url, namespace, tag, batch, start_at, duration_s = args
    return anyio.run(_timed_loop, url, namespace, tag, batch, start_at, duration_s)


def measure(
    url: str,
    namespace: str | Sequence[str],
    *,
    processes: int,
    batch: int,
    duration_s: float,
) -> RawResult:
    """Run ``processes`` loops at once for ``duration_s``; the summed rate.

    ``processes=1`` runs in a child process too, so every figure pays the
    same start-up and none shares the caller's event loop. With several
    namespaces (``tierpool bench --cluster``), ``processes`` loops run on
    each of them, all at once.
    """
    names = [namespace] if isinstance(namespace, str) else list(namespace)
    processes *= len(names)
    start_at = time.time() + 1.5 + 0.3 * processes  # after every child imported and warmed up
    jobs = [
        (url, names[i % len(names)], f"p{i}x", batch, start_at, duration_s)
        for i in range(processes)
    ]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes) as pool:
        results = pool.map(_process_main, jobs)
    pairs = sum(r.pairs for r in results)
    return RawResult(
        processes,
        pairs,
        max(r.elapsed_s for r in results),
        sum(r.rejected for r in results),
        pairs + sum(r.warmup_pairs for r in results),
        sum(r.cpu_s for r in results),
    )


async def profile_in_process(
    url: str, namespace: str, *, batch: int, duration_s: float
) -> tuple[int, float]:
    """The raw loop in this process (for cProfile/py-spy); (pairs, elapsed)."""
    redis = connect(url, client_name="bench-raw-profile")
    try:
        state = await make_state(redis, bench_settings(url, namespace))
        await run_pairs(state, "prw", batch, lambda p: p > 0)
        t0 = time.perf_counter()
        end = t0 + duration_s
        pairs, _ = await run_pairs(state, "pr", batch, lambda _p: time.perf_counter() >= end)
        return pairs, time.perf_counter() - t0
    finally:
        await redis.aclose()
