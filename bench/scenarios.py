"""Config propagation, leader failover and memory: what a benchmark run observes.

- **propagation**: a config change is sent through the client; from the
  ``applied`` reply, each worker is polled until it serves the new version.
  Two observations per worker: its ``tierpool_config_version`` gauge on
  ``/metrics`` (the contract's view, what Prometheus sees) and the time its
  config cache logged ``serving config version N`` (when the snapshot was
  installed; JSON logs carry milliseconds). Each change's figure is its last
  worker's.
- **failover**: the worker holding ``tp:{NS}:leader`` is killed with
  SIGKILL; the new leader is serving once the key holds another token *and*
  the gauges hash was written under it (the leader's loops run).
- **memory**: each worker's VmRSS and Redis ``used_memory`` once the run has
  sent ``--requests`` requests, with the stream lengths that show they stay
  bounded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import anyio
import msgspec
from redis.asyncio import Redis

from tierpool.bench.cluster import BenchError, Cluster, WorkerProcess
from tierpool.bench.common import Quantiles, tier_config
from tierpool.client.client import TierpoolClient

POLL_S = 0.002
PROPAGATION_TIMEOUT_S = 10.0
FAILOVER_TIMEOUT_S = 30.0


# --- propagation --------------------------------------------------------------------
@dataclass(slots=True)
class Propagation:
    gauge_s: list[float] = field(default_factory=list)
    installed_s: list[float] = field(default_factory=list)
    timeouts: int = 0

    def summary(self) -> dict[str, Any]:
        g, i = Quantiles.of(self.gauge_s), Quantiles.of(self.installed_s)
        return {
            "changes": len(self.gauge_s),
            "timeouts": self.timeouts,
            "gauge_p50_s": g.p50,
            "gauge_p99_s": g.p99,
            "gauge_max_s": g.max,
            "installed_p50_s": i.p50,
            "installed_p99_s": i.p99,
            "installed_max_s": i.max,
        }


async def _gauge_version(w: WorkerProcess) -> int:
    try:
        m = await w.metrics()
    except (OSError, TimeoutError):
        return -1
    return int(m.get("tierpool_config_version", -1))


def _installed_at(w: WorkerProcess, version: int) -> float | None:
    """Epoch seconds at which the worker logged serving ``version`` (JSON logs), or None."""
    needle = f"serving config version {version} "
    try:
        text = w.log_path.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if needle in line and line.startswith("{"):
            try:
                doc = msgspec.json.decode(line)
                ts = str(doc["ts"]).replace("Z", "+00:00")
                return datetime.fromisoformat(ts).timestamp()
            except (msgspec.DecodeError, KeyError, ValueError):
                return None
    return None


async def propagation(cluster: Cluster, mix: str, pods: int, changes: int) -> Propagation:
    out = Propagation()
    workers = cluster.live_workers()
    base = tier_config(mix, pods)
    first_pool = next(iter(base["tiers"]))
    async with TierpoolClient.from_url(cluster.url, namespace=cluster.namespace) as client:
        for n in range(changes):
            cfg = msgspec.json.decode(msgspec.json.encode(base))
            cfg["tiers"][first_pool]["target"] += 1 + n % 2  # a real change every time
            reply = await client.change_config(cfg, timeout_s=10)
            t_applied = time.perf_counter()
            t_applied_wall = time.time()
            if reply.status != "applied" or reply.config_version is None:
                raise BenchError(f"config change not applied: {reply}")
            version = reply.config_version
            pending = set(range(len(workers)))
            seen_at: dict[int, float] = {}
            with anyio.move_on_after(PROPAGATION_TIMEOUT_S):
                while pending:
                    versions = [await _gauge_version(workers[i]) for i in sorted(pending)]
                    now = time.perf_counter()
                    for i, v in zip(sorted(pending), versions, strict=True):
                        if v >= version:
                            seen_at[i] = now
                            pending.discard(i)
                    if pending:
                        await anyio.sleep(POLL_S)
            if pending:
                out.timeouts += 1
                continue
            out.gauge_s.append(max(0.0, max(seen_at.values()) - t_applied))
            installed = [_installed_at(w, version) for w in workers]
            if all(t is not None for t in installed):
                last = max(t for t in installed if t is not None)
                out.installed_s.append(max(0.0, last - t_applied_wall))
            await anyio.sleep(0.05)
    return out


# --- server-side latency -------------------------------------------------------------
async def request_histogram(workers: list[WorkerProcess], kind: str) -> dict[float, float]:
    """Cumulative ``tierpool_request_duration_seconds`` buckets of ``kind``, summed over
    workers and outcomes: {upper bound s: count}. Workers that do not answer count 0."""
    out: dict[float, float] = {}
    prefix = "tierpool_request_duration_seconds_bucket{"
    for w in workers:
        try:
            series = await w.metrics()
        except (OSError, TimeoutError):
            continue
        for name, value in series.items():
            if name.startswith(prefix) and f'kind="{kind}"' in name:
                le = name.split('le="', 1)[1].split('"', 1)[0]
                bound = float("inf") if le == "+Inf" else float(le)
                out[bound] = out.get(bound, 0.0) + value
    return out


def histogram_quantile(
    before: dict[float, float], after: dict[float, float], q: float
) -> float | None:
    """The upper bound of the bucket holding quantile ``q`` of what happened in between."""
    bounds = sorted(after)
    if not bounds:
        return None
    total = after[bounds[-1]] - before.get(bounds[-1], 0.0)
    if total <= 0:
        return None
    for b in bounds:
        if after[b] - before.get(b, 0.0) >= q * total:
            return b
    return bounds[-1]


# --- failover -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Failover:
    old_token: str
    new_token: str
    lease_s: float  # kill -> leader key holds a new token
    serving_s: float  # kill -> the new leader wrote the gauges under its token


async def _leader(redis: Redis, cluster: Cluster) -> str | None:
    value = await redis.get(cluster.keys.leader)
    return None if value is None else str(value)


async def failover(redis: Redis, cluster: Cluster) -> Failover:
    with anyio.fail_after(FAILOVER_TIMEOUT_S):
        while (token := await _leader(redis, cluster)) is None:  # noqa: ASYNC110 - polling Redis
            await anyio.sleep(0.05)
        # The gauges hash written by this term: the old leader is serving.
        while await redis.hget(cluster.keys.gauges, "token") != token:  # noqa: ASYNC110
            await anyio.sleep(0.05)
    holder = token.rpartition(":")[0]
    victim = cluster.by_worker_id(holder)
    if victim is None:
        raise BenchError(f"leader {holder!r} is not one of the benchmark's workers")
    if len(cluster.live_workers()) < 2:
        raise BenchError("failover needs at least 2 workers")
    t0 = time.perf_counter()
    victim.kill9()
    lease_s = serving_s = float("nan")
    new = token
    with anyio.fail_after(FAILOVER_TIMEOUT_S):
        while True:
            cur = await _leader(redis, cluster)
            now = time.perf_counter()
            if cur is not None and cur != token:
                if new == token:
                    new, lease_s = cur, now - t0
                if await redis.hget(cluster.keys.gauges, "token") == cur:
                    serving_s = now - t0
                    break
            await anyio.sleep(0.01)
    return Failover(token, new, lease_s, serving_s)


# --- memory ---------------------------------------------------------------------------
async def memory(redis: Redis, cluster: Cluster) -> dict[str, Any]:
    info = await redis.info("memory")
    keys = cluster.keys
    streams = {name: keys.request_stream(name) for name in ("allocate", "release")}
    streams["events"] = keys.events
    streams["dead"] = keys.dead
    lengths = {}
    for name, key in streams.items():
        lengths[name] = int(await redis.xlen(key))
    replies = 0
    async for _ in redis.scan_iter(match=f"{keys.reply_prefix}*", count=1000):
        replies += 1
    workers = {str(w.pid): w.rss_kb() for w in cluster.live_workers()}
    return {
        "worker_rss_kb": workers,
        "worker_rss_max_mb": max(workers.values(), default=0) / 1024,
        "redis_used_memory_mb": int(info["used_memory"]) / 2**20,
        "redis_used_memory_peak_mb": int(info["used_memory_peak"]) / 2**20,
        "redis_keys": int(await redis.dbsize()),
        "reply_streams_left": replies,
        "stream_lengths": lengths,
    }
