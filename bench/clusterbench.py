"""``tierpool bench --cluster``: aggregate allocations/s on a local three-master Redis Cluster.

A cluster of three masters (``workers/redisfarm.py``) is started, three
namespaces are picked so that each lives on another master, and each is
set up as ``tierpool bench`` sets up its namespace (``--tiers``, ``--pods``).
Then, for one namespace and for all three at once:

- ``raw``: the allocate and release scripts straight through
  ``PoolState.run``, one client process per namespace (what the Redis
  masters can do, with the least Python in the way);
- ``e2e``: allocate then release through the streams with
  ``TierpoolClient``, ``--concurrency``'s first level per namespace, one
  client process per namespace, served by one ``tierpool worker`` with
  ``TIERPOOL_NAMESPACE`` listing the three (one child process each).

Every process runs on the same machine: with N cores, 3 masters + 3
workers + 3 clients compete for them, so the three-namespace figure shows
what this machine can do, not what three machines would.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio

from tierpool.bench import e2e, raw
from tierpool.bench.common import BENCH_ENV, bench_settings, setup_namespace
from tierpool.connect.redisconn import connect
from tierpool.core.keys import Keys
from tierpool.workers.redisfarm import ClusterSetup
from tierpool.workers.redisproc import free_port_range

READY_TIMEOUT_S = 60.0


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure; the results (also printed as they come)."""
    out: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "masters": 3,
        "tiers": args.tiers,
        "pods_per_namespace": args.pods,
        "duration_s": args.duration,
        "runs": [],
    }
    concurrency = int(args.concurrency.split(",")[0])
    with ClusterSetup(3, 0) as cluster:
        names = cluster.spread_namespaces(3, prefix="bench")
        out["namespaces"] = {
            n: cluster.master_of(_slot(n)) for n in names
        }  # namespace -> master port
        anyio.run(_setup, cluster.url, names, args.tiers, args.pods)
        masters = sorted(set(out["namespaces"].values()))
        for rep in range(args.repeat):
            for count in (1, 3):
                with _MasterCpu(masters) as cpu:
                    res = raw.measure(
                        cluster.url,
                        names[:count],
                        processes=1,
                        batch=args.batch,
                        duration_s=args.duration,
                    )
                _row(out, "raw", count, rep, res.rate, masters_busy=cpu.busy())
        worker, log_path = _start_worker(cluster.url, names)
        try:
            anyio.run(_wait_workers, cluster.url, names, worker, log_path)
            for rep in range(args.repeat):
                for count in (1, 3):
                    start_at = time.time() + 2.0 + e2e.WARMUP_S
                    jobs = [
                        e2e.LoadJob(
                            cluster.url,
                            n,
                            f"k{count}r{rep}{n}",
                            "closed",
                            start_at,
                            args.duration,
                            concurrency=concurrency,
                        )
                        for n in names[:count]
                    ]
                    with _MasterCpu(masters) as cpu:
                        loaded = e2e.run_load(jobs)
                    _row(
                        out,
                        "e2e",
                        count,
                        rep,
                        loaded.rate,
                        errors=loaded.errors,
                        masters_busy=cpu.busy(),
                    )
        finally:
            worker.terminate()
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
    for part in ("raw", "e2e"):
        best = {
            count: max(
                (
                    r["allocations_per_s"]
                    for r in out["runs"]
                    if (r["part"], r["namespaces"]) == (part, count)
                ),
                default=0.0,
            )
            for count in (1, 3)
        }
        out[part] = {"one_namespace": best[1], "three_namespaces": best[3]}
        for count, label in ((1, "one"), (3, "three")):
            run_ = next(
                (
                    r
                    for r in out["runs"]
                    if (r["part"], r["namespaces"], r["allocations_per_s"])
                    == (part, count, best[count])
                ),
                None,
            )
            if run_ is not None:
                out[part][f"{label}_masters_busy"] = run_.get("masters_busy", {})
        if best[1]:
            out[part]["speedup"] = best[3] / best[1]
    return out


def render(out: dict[str, Any]) -> str:
    lines = [
        f"tierpool bench --cluster: 3 masters, {out['cpus']} CPUs, "
        f"{out['pods_per_namespace']} pods per namespace ({out['tiers']}), "
        f"{out['duration_s']:g}s per run",
        "| part | 1 namespace | 3 namespaces (3 masters) | ratio |",
        "|---|---|---|---|",
    ]
    for part in ("raw", "e2e"):
        r = out.get(part, {})

        def busy(label: str, r: dict[str, Any] = r) -> str:
            shares = list(r.get(f"{label}_masters_busy", {}).values())
            return " (masters busy " + "/".join(f"{x:.0%}" for x in shares) + ")" if shares else ""

        lines.append(
            f"| {part} | {r.get('one_namespace', 0):,.0f}/s{busy('one')} | "
            f"{r.get('three_namespaces', 0):,.0f}/s{busy('three')} | "
            f"{r.get('speedup', 0):.2f}x |"
        )
    return "\n".join(lines)


class _MasterCpu:
    """CPU each master used (``INFO cpu``) over a block, as a share of its wall time.

    Includes the clients' start-up and warm-up around the measured window,
    so it is an average over the whole run, not the window alone.
    """

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports

    def _read(self) -> dict[int, float]:
        import redis as syncredis

        out = {}
        for port in self.ports:
            with syncredis.Redis(port=port) as r:
                info = r.info("cpu")
            out[port] = float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
        return out

    def __enter__(self) -> _MasterCpu:
        self._t0, self._cpu0 = time.monotonic(), self._read()
        return self

    def __exit__(self, *exc: object) -> None:
        self._elapsed = time.monotonic() - self._t0
        self._cpu1 = self._read()

    def busy(self) -> dict[str, float]:
        return {
            str(p): round((self._cpu1[p] - self._cpu0[p]) / self._elapsed, 3) for p in self.ports
        }


def _slot(name: str) -> int:
    from tierpool.connect.clusterslot import namespace_slot

    return namespace_slot(name)


def _row(out: dict[str, Any], part: str, count: int, rep: int, rate: float, **extra: Any) -> None:
    out["runs"].append(
        {
            "part": part,
            "namespaces": count,
            "repeat": rep,
            "allocations_per_s": rate,
            "loadavg_1m": os.getloadavg()[0],
            **extra,
        }
    )
    busy = extra.get("masters_busy", {})
    shown = ", ".join(f"{v:.0%}" for v in busy.values())
    print(
        f"cluster {part}, {count} namespace(s): {rate:,.0f} allocations/s; "
        f"masters busy {shown}; load average {os.getloadavg()[0]:.1f}",
        file=sys.stderr,
    )


async def _setup(url: str, names: list[str], tiers: str, pods: int) -> None:
    for name in names:
        redis = connect(url, namespace=name)
        try:
            await setup_namespace(redis, bench_settings(url, name), tiers, pods)
        finally:
            await redis.aclose()


def _start_worker(url: str, names: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
    """One ``tierpool worker`` serving every namespace (a child process each)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIERPOOL_", "REDIS_"))}
    env.update(BENCH_ENV)
    env.update(
        REDIS_URL=url,
        TIERPOOL_NAMESPACE=",".join(names),
        METRICS_PORT=str(free_port_range(len(names))),
        LOG_LEVEL="warning",
    )
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"tierpool-bench-cluster-{os.getpid()}.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tierpool.workers"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    return proc, log_path


async def _wait_workers(
    url: str, names: list[str], proc: subprocess.Popen[bytes], log_path: Path
) -> None:
    with anyio.fail_after(READY_TIMEOUT_S):
        for name in names:
            redis = connect(url, namespace=name)
            try:
                while not await redis.zcard(Keys(name).workers):
                    if proc.poll() is not None:
                        raise RuntimeError(f"worker exited with {proc.returncode}: see {log_path}")
                    await anyio.sleep(0.05)
            finally:
                await redis.aclose()
