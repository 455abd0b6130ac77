"""``tierpool bench``: throughput, latency, config propagation, failover and memory.

Starts its own redis-server (never port 6379) and worker processes, runs
each selected part in turn and prints one table (and JSON with ``--json``).
Not a test: nothing here asserts a performance figure; the table says which
target is met. Parts, in the order they run:

1. ``raw``: the allocate and release scripts called straight through
   ``PoolState.run`` (no streams, no workers) from 1 and more processes:
   the ceiling the stream path is compared with.
2. ``e2e``: allocate then release through the streams with
   ``tierpool.client.TierpoolClient``, closed loop, ``--workers`` workers.
3. ``latency``: open loop at fixed rates; p50/p99/p99.9 from scheduling the
   request to receiving its reply.
4. ``propagation``: from a config change's ``applied`` reply to the last
   worker serving the new version.
5. ``memory``: worker RSS and Redis memory once ``--requests`` requests went
   through (the parts above count towards it).
6. ``failover``: SIGKILL the leader; seconds until a new leader serves.
7. ``client`` (only when named in ``--only``): allocate round trips at low
   load of the client's read modes (CLIENT UNBLOCK, polling) against a bare
   redis-py producer (``bench/clientmodes.py``).
8. ``gateway``: ``tierpool gateway`` in front of the workers: HTTP
   allocations/s (closed loop), and the allocate latency it adds over a
   direct stream request at ``--gateway-rate`` (open loop, both ways).

CPU per allocation (Redis, workers, clients) is measured alongside each
throughput figure: on a small machine every process competes for the same
cores, and these figures say where the time goes whatever the load around.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import date
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import msgspec
import redis as syncredis

from tierpool.bench import clientmodes, e2e, raw, scenarios
from tierpool.bench import gateway as gateway_bench
from tierpool.bench.cluster import Cluster
from tierpool.bench.common import (
    TIER_MIXES,
    Quantiles,
    bench_settings,
    capacity,
    setup_namespace,
)
from tierpool.bench.meters import CpuMeter, Sampler, _proc_cpu_s
from tierpool.connect.redisconn import connect

DEFAULT_PARTS = ("raw", "e2e", "latency", "propagation", "memory", "failover", "gateway")
PARTS = (*DEFAULT_PARTS, "client")
RAW_NAMESPACE = "benchraw"
TARGETS = {
    "e2e_ratio": 0.5,
    "latency_p99_s_at_1000": 0.002,
    "propagation_p99_s": 0.050,
    "failover_s": 3.0,
    "worker_rss_mb": 80.0,
    "gateway_added_p50_s": 0.001,
}


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--pods", type=int, default=1000, help="registered pods (default 1000)")
    parser.add_argument(
        "--tiers",
        choices=TIER_MIXES,
        default="exclusive",
        help="tier mix: exclusive pools, one shared pool, or both",
    )
    parser.add_argument(
        "--duration", type=float, default=8.0, help="seconds per throughput measurement (default 8)"
    )
    parser.add_argument(
        "--latency-duration",
        type=float,
        default=None,
        help="seconds per latency rate (default: --duration)",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=1_000_000,
        help="requests (allocate + release) sent before memory is read (default 1000000)",
    )
    parser.add_argument(
        "--only",
        default=",".join(DEFAULT_PARTS),
        help=f"comma-separated parts to run, of {','.join(PARTS)} (default: all but client)",
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        default=None,
        help="also write the results as JSON to PATH ('-': print them)",
    )
    parser.add_argument(
        "--raw-procs", default="1,2", help="client process counts for the raw ceiling (default 1,2)"
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=256,
        help="calls per pipelined batch in the raw ceiling (default 256)",
    )
    parser.add_argument(
        "--concurrency",
        default="64,256",
        help="closed-loop concurrent requests to try (default 64,256)",
    )
    parser.add_argument(
        "--client-procs",
        type=int,
        default=1,
        help="client processes sharing the e2e load (default 1)",
    )
    parser.add_argument(
        "--rates",
        default="500,1000,2000",
        help="open-loop allocations/s (80%% of the e2e max is added)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=2,
        help="runs of each raw and e2e measurement; the best is kept "
        "(other processes on the machine make single runs noisy; default 2)",
    )
    parser.add_argument(
        "--profile",
        metavar="PATH",
        default=None,
        help="also run the raw loop in this process under cProfile for "
        "--duration s, write the stats to PATH and print the costliest "
        "functions",
    )
    parser.add_argument(
        "--gateway-concurrency",
        type=int,
        default=64,
        help="HTTP connections of the gateway's closed loop (default 64)",
    )
    parser.add_argument(
        "--gateway-rate",
        type=float,
        default=500,
        help="allocations/s of the gateway's added-latency comparison (default 500)",
    )
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="instead of the parts: aggregate allocations/s for one and three namespaces "
        "on a local Redis Cluster of three masters (raw and e2e; --duration, --repeat, "
        "--pods, --tiers, --batch and the first --concurrency level apply)",
    )
    parser.add_argument(
        "--changes",
        type=int,
        default=20,
        help="config changes for the propagation figure (default 20)",
    )


@dataclass
class Run:
    args: argparse.Namespace
    parts: tuple[str, ...]
    results: dict[str, Any] = field(default_factory=dict)
    requests_sent: int = 0


# --- parts ----------------------------------------------------------------------------
def run_raw(run: Run, cluster: Cluster, r: syncredis.Redis) -> None:
    a = run.args
    settings = bench_settings(cluster.url, RAW_NAMESPACE)

    async def setup() -> None:
        client = connect(cluster.url, namespace=RAW_NAMESPACE)
        try:
            await setup_namespace(client, settings, a.tiers, a.pods)
        finally:
            await client.aclose()

    anyio.run(setup)
    procs = [int(x) for x in a.raw_procs.split(",") if x.strip()]
    need = max(procs) * a.batch
    if need > capacity(a.tiers, a.pods):
        print(
            f"warning: raw needs {need} calls at once, the pools hold "
            f"{capacity(a.tiers, a.pods)}: some allocations will be rejected",
            file=sys.stderr,
        )
    rows = []
    for rep in range(a.repeat):
        for p in procs:
            load = os.getloadavg()[0]
            with CpuMeter(r, []) as cpu:
                res = raw.measure(
                    cluster.url, RAW_NAMESPACE, processes=p, batch=a.batch, duration_s=a.duration
                )
            rows.append(
                {
                    "processes": p,
                    "repeat": rep,
                    "allocations_per_s": res.rate,
                    "pairs": res.pairs,
                    "rejected": res.rejected,
                    "loadavg_1m_before": load,
                    **cpu.per_pair_us(res.all_pairs, res.cpu_s),
                }
            )
            _progress(f"raw, {p} process(es): {res.rate:,.0f} allocations/s")
    if a.profile:
        _profile_raw(cluster, a)
    best = max(rows, key=lambda x: x["allocations_per_s"])
    run.results["raw"] = {
        "batch": a.batch,
        "runs": rows,
        "ceiling": best["allocations_per_s"],
        "ceiling_processes": best["processes"],
        "best": best,
    }
    for key in r.scan_iter(match=f"tp:{{{RAW_NAMESPACE}}}:*", count=1000):
        r.unlink(key)


def _profile_raw(cluster: Cluster, a: argparse.Namespace) -> None:
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    pairs, elapsed = anyio.run(
        partial(
            raw.profile_in_process, cluster.url, RAW_NAMESPACE, batch=a.batch, duration_s=a.duration
        )
    )
    prof.disable()
    prof.dump_stats(a.profile)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(20)
    _progress(
        f"raw under cProfile: {pairs / elapsed:,.0f} allocations/s; stats in "
        f"{a.profile}\n{text.getvalue()}"
    )


def run_e2e(run: Run, cluster: Cluster, r: syncredis.Redis) -> None:
    a = run.args
    levels = [int(x) for x in a.concurrency.split(",") if x.strip()]
    cap = capacity(a.tiers, a.pods)
    for n in levels:
        if n > cap:
            print(
                f"warning: concurrency {n} above the pools' capacity {cap}: "
                "some allocations are rejected",
                file=sys.stderr,
            )
    rows = []
    for rep in range(a.repeat):
        for n in levels:
            load = os.getloadavg()[0]
            with CpuMeter(r, cluster.live_workers()) as cpu:
                res = e2e.closed_loop(
                    cluster.url,
                    cluster.namespace,
                    concurrency=n,
                    processes=a.client_procs,
                    duration_s=a.duration,
                    tag=f"c{n}r{rep}",
                )
            run.requests_sent += _requests_of(res)
            lat = Quantiles.of(res.alloc_latency_s)
            rows.append(
                {
                    "concurrency": n,
                    "repeat": rep,
                    "allocations_per_s": res.rate,
                    "pairs": res.pairs,
                    "rejected": res.rejected,
                    "errors": res.errors,
                    "loadavg_1m_before": load,
                    "alloc_p50_s": lat.p50,
                    "alloc_p99_s": lat.p99,
                    **cpu.per_pair_us(res.all_pairs, res.cpu_s),
                }
            )
            _progress(f"e2e, {n} concurrent: {res.rate:,.0f} allocations/s")
    best = max(rows, key=lambda x: x["allocations_per_s"])
    out: dict[str, Any] = {
        "workers": a.workers,
        "client_processes": a.client_procs,
        "runs": rows,
        "max": best["allocations_per_s"],
        "max_concurrency": best["concurrency"],
        "best": best,
    }
    ceiling = run.results.get("raw", {}).get("ceiling")
    if ceiling:
        out["ratio_to_raw"] = best["allocations_per_s"] / ceiling
    run.results["e2e"] = out


def run_latency(run: Run, cluster: Cluster, r: syncredis.Redis) -> None:
    a = run.args
    rates = [float(x) for x in a.rates.split(",") if x.strip()]
    e2e_max = run.results.get("e2e", {}).get("max")
    if e2e_max:
        rates.append(round(0.8 * e2e_max))
    duration = a.latency_duration or a.duration
    # The floor: one request at a time, nothing else in flight.
    one = e2e.closed_loop(
        cluster.url,
        cluster.namespace,
        concurrency=1,
        processes=1,
        duration_s=min(duration, 3.0),
        tag="solo",
    )
    run.requests_sent += _requests_of(one)
    solo = Quantiles.of(one.alloc_latency_s)
    _progress(f"latency, one at a time: p50 {_ms(solo.p50)} p99 {_ms(solo.p99)}")
    rows = []
    for rate in sorted(set(rates)):
        workers = cluster.live_workers()
        hist0 = anyio.run(scenarios.request_histogram, workers, "allocate")
        load = os.getloadavg()[0]
        with CpuMeter(r, workers) as cpu:
            res = e2e.open_loop(
                cluster.url,
                cluster.namespace,
                rate=rate,
                processes=a.client_procs,
                duration_s=duration,
                tag=f"o{int(rate)}",
            )
        hist1 = anyio.run(scenarios.request_histogram, workers, "allocate")
        run.requests_sent += _requests_of(res)
        q = Quantiles.of(res.alloc_latency_s)
        server = {
            f"server_{name}_le_s": scenarios.histogram_quantile(hist0, hist1, x)
            for name, x in (("p50", 0.5), ("p99", 0.99))
        }
        rows.append(
            {
                "rate": rate,
                "achieved_per_s": res.rate,
                "n": q.n,
                "p50_s": q.p50,
                "p99_s": q.p99,
                "p999_s": q.p999,
                "max_s": q.max,
                "generator_late_max_s": res.lateness_max_s,
                "rejected": res.rejected,
                "errors": res.errors,
                "of_max": rate / e2e_max if e2e_max else None,
                "loadavg_1m_before": load,
                **server,
                **cpu.per_pair_us(res.all_pairs, res.cpu_s),
            }
        )
        _progress(
            f"latency at {rate:,.0f}/s: p50 {_ms(q.p50)} p99 {_ms(q.p99)} p99.9 {_ms(q.p999)}"
        )
    run.results["latency"] = {
        "runs": rows,
        "one_at_a_time": {"n": solo.n, "p50_s": solo.p50, "p99_s": solo.p99, "p999_s": solo.p999},
    }


def run_client(run: Run, cluster: Cluster) -> None:
    async def go() -> dict[str, Quantiles]:
        async with connect(cluster.url) as r:
            return await clientmodes.measure(cluster.url, cluster.namespace, r)

    rows = anyio.run(go)
    for label, q in rows.items():
        _progress(f"client round trip, {label}: p50 {_ms(q.p50)} p99 {_ms(q.p99)}")
    run.results["client"] = {
        label: {"n": q.n, "p50_s": q.p50, "p99_s": q.p99} for label, q in rows.items()
    }


def run_propagation(run: Run, cluster: Cluster) -> None:
    a = run.args
    res = anyio.run(scenarios.propagation, cluster, a.tiers, a.pods, a.changes)
    run.results["propagation"] = res.summary()
    _progress(f"propagation: p99 {_ms(res.summary()['gauge_p99_s'])} (gauge)")


def run_memory(run: Run, cluster: Cluster, r: syncredis.Redis) -> None:
    a = run.args
    left = a.requests - run.requests_sent
    if left > 0:
        rate = run.results.get("e2e", {}).get("max") or 0.0
        conc = run.results.get("e2e", {}).get("max_concurrency") or 256
        _progress(
            f"memory: sending {left:,} more requests"
            + (f" (~{left / 2 / rate:,.0f} s)" if rate else "")
        )
        # Closed loop in chunks until the total is reached (2 requests per pair).
        with Sampler(cluster) as sampler:
            chunk = 0
            while left > 0:
                duration = min(30.0, max(1.0, left / 2 / rate)) if rate else 3.0
                res = e2e.closed_loop(
                    cluster.url,
                    cluster.namespace,
                    concurrency=conc,
                    processes=a.client_procs,
                    duration_s=duration,
                    tag=f"m{chunk}",
                )
                done = _requests_of(res)
                run.requests_sent += done
                left -= done
                rate = res.rate or rate
                chunk += 1
        run.results["memory_samples"] = sampler.samples

    async def read() -> dict[str, Any]:
        client = connect(cluster.url, namespace=cluster.namespace)
        try:
            return await scenarios.memory(client, cluster)
        finally:
            await client.aclose()

    out = anyio.run(read)
    out["requests"] = run.requests_sent
    samples = run.results.get("memory_samples") or []
    if samples:
        out["during_load_max"] = {k: max(x[k] for x in samples) for k in samples[0] if k != "t_s"}
    run.results["memory"] = out
    _progress(
        f"memory after {run.requests_sent:,} requests: worker RSS max "
        f"{out['worker_rss_max_mb']:.1f} MB, Redis {out['redis_used_memory_mb']:.1f} MB"
    )


def run_failover(run: Run, cluster: Cluster) -> None:
    async def go() -> scenarios.Failover:
        client = connect(cluster.url, namespace=cluster.namespace)
        try:
            return await scenarios.failover(client, cluster)
        finally:
            await client.aclose()

    res = anyio.run(go)
    run.results["failover"] = {
        "lease_s": res.lease_s,
        "serving_s": res.serving_s,
        "old_token": res.old_token,
        "new_token": res.new_token,
    }
    _progress(f"failover: new leader serving after {res.serving_s:.2f} s")


def run_gateway(run: Run, cluster: Cluster, r: syncredis.Redis) -> None:
    a = run.args
    duration = a.latency_duration or a.duration
    gw = gateway_bench.start_gateway(cluster.url, cluster.namespace, cluster.log_dir, cluster.env)
    try:
        gw_cpu0 = _proc_cpu_s(gw.proc.pid)
        with CpuMeter(r, cluster.live_workers()) as cpu:
            closed = anyio.run(
                partial(
                    gateway_bench.closed_loop,
                    gw.port,
                    concurrency=a.gateway_concurrency,
                    duration_s=a.duration,
                    tag="gwc",
                )
            )
        gateway_us = 1e6 * (_proc_cpu_s(gw.proc.pid) - gw_cpu0) / max(1, closed.all_pairs)
        run.requests_sent += _requests_of(closed)
        _progress(f"gateway, {a.gateway_concurrency} connections: {closed.rate:,.0f} allocations/s")
        # The hop's own cost: one request at a time, nothing queued behind it.
        solo_direct = e2e.closed_loop(
            cluster.url,
            cluster.namespace,
            concurrency=1,
            processes=1,
            duration_s=min(duration, 3.0),
            tag="gws",
        )
        solo_http = anyio.run(
            partial(
                gateway_bench.closed_loop,
                gw.port,
                concurrency=1,
                duration_s=min(duration, 3.0),
                tag="gwh",
            )
        )
        run.requests_sent += _requests_of(solo_direct) + _requests_of(solo_http)
        rate = a.gateway_rate
        direct = e2e.open_loop(
            cluster.url, cluster.namespace, rate=rate, processes=1, duration_s=duration, tag="gwd"
        )
        via = anyio.run(
            partial(gateway_bench.open_loop, gw.port, rate=rate, duration_s=duration, tag="gwo")
        )
        run.requests_sent += _requests_of(direct) + _requests_of(via)
    finally:
        gw.stop()
    qd, qh = Quantiles.of(direct.alloc_latency_s), Quantiles.of(via.alloc_latency_s)
    sd, sh = Quantiles.of(solo_direct.alloc_latency_s), Quantiles.of(solo_http.alloc_latency_s)
    _progress(
        f"gateway at {rate:,.0f}/s: p50 {_ms(qh.p50)} (direct {_ms(qd.p50)}), "
        f"p99 {_ms(qh.p99)} (direct {_ms(qd.p99)})"
    )
    run.results["gateway"] = {
        "concurrency": a.gateway_concurrency,
        "allocations_per_s": closed.rate,
        "closed_rejected": closed.rejected,
        "closed_errors": closed.errors,
        "closed_p50_s": Quantiles.of(closed.alloc_latency_s).p50,
        "closed_p99_s": Quantiles.of(closed.alloc_latency_s).p99,
        **cpu.per_pair_us(closed.all_pairs, closed.cpu_s),
        "gateway_us": gateway_us,
        "rate": rate,
        "direct": {"p50_s": qd.p50, "p99_s": qd.p99, "p999_s": qd.p999, "n": qd.n},
        "http": {
            "p50_s": qh.p50,
            "p99_s": qh.p99,
            "p999_s": qh.p999,
            "n": qh.n,
            "rejected": via.rejected,
            "errors": via.errors,
        },
        "solo": {
            "direct_p50_s": sd.p50,
            "direct_p99_s": sd.p99,
            "http_p50_s": sh.p50,
            "http_p99_s": sh.p99,
            "added_p50_s": sh.p50 - sd.p50,
            "added_p99_s": sh.p99 - sd.p99,
        },
        "added_p50_s": qh.p50 - qd.p50,
        "added_p99_s": qh.p99 - qd.p99,
    }


def _requests_of(res: e2e.LoadResult) -> int:
    return 2 * res.all_pairs + res.rejected + res.errors


# --- the command ----------------------------------------------------------------------
def main(args: argparse.Namespace) -> int:
    if getattr(args, "cluster", False):
        return _main_cluster(args)
    parts = tuple(p.strip() for p in args.only.split(",") if p.strip())
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        print(
            f"tierpool bench: unknown part(s) {', '.join(unknown)}; of {', '.join(PARTS)}",
            file=sys.stderr,
        )
        return 2
    if "failover" in parts and args.workers < 2:
        print("tierpool bench: failover needs --workers 2 or more", file=sys.stderr)
        return 2
    run = Run(args, parts)
    run.results["meta"] = {
        "date": date.today().isoformat(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "workers": args.workers,
        "pods": args.pods,
        "tiers": args.tiers,
        "duration_s": args.duration,
        "parts": list(parts),
        "loadavg_1m_at_start": os.getloadavg()[0],
    }
    t0 = time.monotonic()
    with Cluster() as cluster:
        r = syncredis.Redis.from_url(cluster.url, decode_responses=True)
        run.results["meta"]["redis"] = r.info("server")["redis_version"]
        try:
            if "raw" in parts:
                run_raw(run, cluster, r)
            needs_workers = [p for p in parts if p != "raw"]
            if needs_workers:
                _start_workers(run, cluster)
            if "e2e" in parts:
                run_e2e(run, cluster, r)
            if "latency" in parts:
                run_latency(run, cluster, r)
            if "propagation" in parts:
                run_propagation(run, cluster)
            if "memory" in parts:
                run_memory(run, cluster, r)
            if "client" in parts:
                run_client(run, cluster)
            if "failover" in parts:
                run_failover(run, cluster)
            if "gateway" in parts:
                run_gateway(run, cluster, r)
        finally:
            r.close()
    run.results["meta"]["wall_s"] = time.monotonic() - t0
    from tierpool.bench.report import render_table

    print(render_table(run.results, TARGETS))
    if args.json:
        text = msgspec.json.format(
            msgspec.json.encode(_finite(run.results), order="sorted"), indent=2
        ).decode()
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


def _main_cluster(args: argparse.Namespace) -> int:
    from tierpool.bench import clusterbench

    out = clusterbench.run(args)
    out["date"] = date.today().isoformat()
    print(clusterbench.render(out))
    if args.json:
        text = msgspec.json.format(
            msgspec.json.encode(_finite(out), order="sorted"), indent=2
        ).decode()
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


def _start_workers(run: Run, cluster: Cluster) -> None:
    a = run.args

    async def go() -> None:
        client = connect(cluster.url, namespace=cluster.namespace)
        try:
            await setup_namespace(
                client, bench_settings(cluster.url, cluster.namespace), a.tiers, a.pods
            )
            await cluster.start_workers(client, a.workers)
        finally:
            await client.aclose()

    anyio.run(go)


def _finite(value: Any) -> Any:
    """JSON has no NaN: missing figures become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _ms(seconds: float) -> str:
    return "-" if seconds is None or math.isnan(seconds) else f"{seconds * 1000:.2f} ms"


def _progress(text: str) -> None:
    print(f"  {text}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="tierpool bench")
    add_arguments(parser, "bench")
    sys.exit(main(parser.parse_args()))
