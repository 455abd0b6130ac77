"""End to end through the streams: clients XADD, workers serve, clients await replies.

Every request goes through :class:`tierpool.client.TierpoolClient`, as a producer's
would: one allocate, then the release of the same call. Two ways to load:

- **closed loop** (throughput): ``concurrency`` tasks, each sending its next
  allocation as soon as its last release was answered;
- **open loop** (latency): allocations started at a fixed rate whatever the
  replies do, so a slow reply cannot slow the load down (no coordinated
  omission). The latency of a request is measured from the moment it was
  *scheduled* to the moment its reply was received, so a late generator
  counts against the figure, never for it.

Both can run in several client processes (``spawn``) started at the same
instant, the load split between them, when one Python process cannot keep up.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskGroup

from tierpool.client.client import TierpoolClient
from tierpool.core.errors import TierpoolError

WARMUP_S = 1.0
REQUEST_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class LoadJob:
    url: str
    namespace: str
    tag: str
    mode: str  # "closed" | "open"
    start_at: float  # epoch seconds: every process starts measuring together
    duration_s: float
    concurrency: int = 0  # closed loop
    rate: float = 0.0  # open loop, allocations/s of this process


@dataclass(slots=True)
class LoadResult:
    pairs: int = 0  # measured: begun inside the window
    all_pairs: int = 0  # warm-up included: what the CPU figures are divided by
    rejected: int = 0
    errors: int = 0
    elapsed_s: float = 0.0
    alloc_latency_s: list[float] = field(default_factory=list)
    release_latency_s: list[float] = field(default_factory=list)
    lateness_max_s: float = 0.0
    cpu_s: float = 0.0  # CPU time of the client process(es)

    def merge(self, other: LoadResult) -> None:
        self.pairs += other.pairs
        self.all_pairs += other.all_pairs
        self.rejected += other.rejected
        self.errors += other.errors
        self.elapsed_s = max(self.elapsed_s, other.elapsed_s)
        self.alloc_latency_s += other.alloc_latency_s
        self.release_latency_s += other.release_latency_s
        self.lateness_max_s = max(self.lateness_max_s, other.lateness_max_s)
        self.cpu_s += other.cpu_s

    @property
    def rate(self) -> float:
        return self.pairs / self.elapsed_s if self.elapsed_s > 0 else 0.0


async def _pair(
    client: TierpoolClient, call_id: str, res: LoadResult, t_sched: float, record: bool
) -> None:
    """One allocate and its release; latencies from ``t_sched`` (perf_counter)."""
    try:
        reply = await client.allocate(call_id, timeout_s=REQUEST_TIMEOUT_S)
        t_alloc = time.perf_counter()
        if reply.status != "allocated":
            res.rejected += 1
            return
        t_rel0 = time.perf_counter()
        await client.release(call_id, timeout_s=REQUEST_TIMEOUT_S)
        t_rel = time.perf_counter()
    except TierpoolError:
        res.errors += 1
        return
    res.all_pairs += 1
    if record:
        res.pairs += 1
        res.alloc_latency_s.append(t_alloc - t_sched)
        res.release_latency_s.append(t_rel - t_rel0)


async def _closed(client: TierpoolClient, job: LoadJob, res: LoadResult) -> None:
    start = time.perf_counter() + max(0.0, job.start_at - time.time())
    end = start + job.duration_s

    async def loop(k: int) -> None:
        n = 0
        while True:
            now = time.perf_counter()
            if now >= end:
                return
            await _pair(client, f"{job.tag}-{k}-{n}", res, now, now >= start)
            n += 1

    # Warm-up runs until ``start``; only pairs begun after it count.
    async with anyio.create_task_group() as tg:
        for k in range(job.concurrency):
            tg.start_soon(loop, k)
    res.elapsed_s = job.duration_s


async def _open(client: TierpoolClient, job: LoadJob, res: LoadResult) -> None:
    await anyio.sleep(max(0.0, job.start_at - time.time()))

    def launch(tg: TaskGroup, i: int, t_sched: float) -> None:
        tg.start_soon(_pair, client, f"{job.tag}-{i}", res, t_sched, True)

    await at_fixed_rate(job.rate, job.duration_s, res, launch)


async def at_fixed_rate(
    rate: float,
    duration_s: float,
    res: LoadResult,
    launch: Callable[[TaskGroup, int, float], None],
) -> None:
    """Open loop: ``launch(tg, i, t_sched)`` request ``i`` at ``start + i / rate``,
    whether or not earlier ones were answered (no coordinated omission); the
    generator's own lateness goes into ``res``. Returns when all are answered."""
    start = time.perf_counter()
    interval = 1.0 / rate
    total = int(duration_s * rate)
    async with anyio.create_task_group() as tg:
        i = 0
        while i < total:
            now = time.perf_counter()
            due = start + i * interval
            if due > now:
                await anyio.sleep(due - now)
                continue
            # Start every request already due (the loop may wake late).
            while i < total and start + i * interval <= now:
                t_sched = start + i * interval
                res.lateness_max_s = max(res.lateness_max_s, now - t_sched)
                launch(tg, i, t_sched)
                i += 1
    res.elapsed_s = time.perf_counter() - start


async def run_job(job: LoadJob) -> LoadResult:
    res = LoadResult()
    cpu0 = time.process_time()
    async with TierpoolClient.from_url(
        job.url, namespace=job.namespace, client_name=f"bench-{job.tag}"
    ) as client:
        if job.mode == "open":
            # Open the connections and warm up before the clock starts.
            for i in range(20):
                await _pair(client, f"{job.tag}-w{i}", res, time.perf_counter(), False)
            await _open(client, job, res)
        else:
            await _closed(client, job, res)
    res.cpu_s = time.process_time() - cpu0  # includes the warm-up: an upper bound
    return res


def _process_main(job: LoadJob) -> LoadResult:
    return anyio.run(run_job, job)


def run_load(jobs: list[LoadJob]) -> LoadResult:
    """Run each job in its own process; the merged result."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(len(jobs)) as pool:
        results = pool.map(_process_main, jobs)
    total = LoadResult()
    for r in results:
        total.merge(r)
    return total


def closed_loop(
    url: str, namespace: str, *, concurrency: int, processes: int, duration_s: float, tag: str
) -> LoadResult:
    start_at = time.time() + 1.5 + 0.3 * processes + WARMUP_S
    per = [
        concurrency // processes + (1 if i < concurrency % processes else 0)
        for i in range(processes)
    ]
    jobs = [
        LoadJob(url, namespace, f"{tag}p{i}", "closed", start_at, duration_s, concurrency=c)
        for i, c in enumerate(per)
        if c > 0
    ]
    return run_load(jobs)


def open_loop(
    url: str, namespace: str, *, rate: float, processes: int, duration_s: float, tag: str
) -> LoadResult:
    start_at = time.time() + 1.5 + 0.3 * processes + WARMUP_S
    jobs = [
        LoadJob(url, namespace, f"{tag}p{i}", "open", start_at, duration_s, rate=rate / processes)
        for i in range(processes)
    ]
    return run_load(jobs)
