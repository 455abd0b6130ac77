"""What a benchmark run measures besides rates: CPU per allocation and memory over time.

CPU figures are what says where the time goes on a small machine, where every
process (Redis, workers, clients, and whatever else runs there) shares the
same cores: they vary far less from run to run than the rates do.
"""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path

import redis as syncredis

from tierpool.bench.cluster import Cluster, WorkerProcess


def _redis_cpu_s(r: syncredis.Redis) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _proc_cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """Redis and worker CPU seconds spent between ``__enter__`` and ``__exit__``."""

    def __init__(self, r: syncredis.Redis, workers: list[WorkerProcess]) -> None:
        self.r = r
        self.workers = workers
        self.redis_s = self.workers_s = 0.0

    def __enter__(self) -> CpuMeter:
        self._r0 = _redis_cpu_s(self.r)
        self._w0 = sum(_proc_cpu_s(w.pid) for w in self.workers)
        return self

    def __exit__(self, *exc: object) -> None:
        self.redis_s = _redis_cpu_s(self.r) - self._r0
        self.workers_s = sum(_proc_cpu_s(w.pid) for w in self.workers) - self._w0

    def per_pair_us(self, pairs: int, clients_s: float) -> dict[str, float]:
        """CPU µs per allocate+release, by process kind (``pairs`` counts the warm-up too)."""
        if pairs <= 0:
            return {"redis_us": math.nan, "workers_us": math.nan, "clients_us": math.nan}
        return {
            "redis_us": self.redis_s / pairs * 1e6,
            "workers_us": self.workers_s / pairs * 1e6,
            "clients_us": clients_s / pairs * 1e6,
        }


class Sampler:
    """Every ``SAMPLE_S`` while load runs: stream lengths, Redis memory, worker RSS."""

    SAMPLE_S = 2.0

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        # Its own connection: it runs in a thread.
        self.r = syncredis.Redis.from_url(cluster.url, decode_responses=True)
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._t0 = time.monotonic()

    def _run(self) -> None:
        k = self.cluster.keys
        while not self._stop.wait(self.SAMPLE_S):
            try:
                pipe = self.r.pipeline(transaction=False)
                pipe.xlen(k.request_stream("allocate"))
                pipe.xlen(k.request_stream("release"))
                pipe.xlen(k.events)
                pipe.info("memory")
                a, rel, ev, mem = pipe.execute()
            except syncredis.RedisError:
                continue
            rss = max((w.rss_kb() for w in self.cluster.live_workers()), default=0)
            self.samples.append(
                {
                    "t_s": time.monotonic() - self._t0,
                    "allocate_len": a,
                    "release_len": rel,
                    "events_len": ev,
                    "redis_used_memory_mb": int(mem["used_memory"]) / 2**20,
                    "worker_rss_max_mb": rss / 1024,
                }
            )

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.r.close()
