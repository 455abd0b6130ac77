"""Where a request's cost goes: Redis CPU per transition, worker CPU per function.

``python -m tierpool.bench.breakdown`` starts its own ``redis-server``,
registers pods, then for each transition (allocate, then release of the
same calls) writes a backlog of request entries and has the worker's own
code (:class:`tierpool.workers.processor.Processor`, batches read with
``XREADGROUP`` as the consumer does) process it in this process. Around each
backlog it reads ``INFO commandstats`` (the ``evalsha`` line is the script,
inclusive; the commands it calls are listed under their own names) and
``INFO cpu``. Nothing else runs against that Redis (no leader, no gauges),
so the figures are the transition's alone and hardly move with the
machine's load, unlike wall-clock throughput.

``--profile`` runs the worker side under cProfile and prints the functions
that take its time; py-spy can attach to this process instead
(``py-spy record --pid``), it runs the same code as a worker.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from collections.abc import Sequence
from typing import Any

import anyio
import redis as syncredis

from tierpool.bench.common import bench_settings, setup_namespace
from tierpool.connect.redisconn import connect
from tierpool.core.keys import GROUP
from tierpool.schemas import AllocateRequest, ReleaseRequest, encode
from tierpool.workers.context import WorkerContext
from tierpool.workers.processor import Processor
from tierpool.workers.redisproc import RedisProcess
from tierpool.workers.streams import ensure_groups, parse_read

NAMESPACE = "bd"


def _cpu(r: syncredis.Redis) -> float:
    info: dict[str, Any] = r.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def _stats(r: syncredis.Redis) -> dict[str, tuple[int, float]]:
    """command -> (calls, usec)."""
    out: dict[str, tuple[int, float]] = {}
    info: dict[str, Any] = r.info("commandstats")
    for name, v in info.items():
        out[name.removeprefix("cmdstat_")] = (int(v["calls"]), float(v["usec"]))
    return out


async def _phase(
    ctx: WorkerContext,
    proc: Processor,
    r: syncredis.Redis,
    msgs: Sequence[AllocateRequest | ReleaseRequest],
    kind: str,
    profile: cProfile.Profile | None,
) -> dict[str, Any]:
    stream = ctx.keys.request_stream(kind)
    pipe = r.pipeline(transaction=False)
    for m in msgs:
        pipe.xadd(stream, encode(m))  # type: ignore[arg-type]
    pipe.execute()
    r.config_resetstat()
    cpu0 = _cpu(r)
    t_cpu0 = time.process_time()
    t0 = time.perf_counter()
    done = 0
    statuses: dict[str, int] = {}
    while done < len(msgs):
        resp = await ctx.redis.xreadgroup(GROUP, "bd", {stream: ">"}, count=ctx.settings.batch_size)
        batch = parse_read(resp)
        if not batch:
            break
        if profile is not None:
            profile.enable()
        out = await proc.process(batch)
        if profile is not None:
            profile.disable()
        for s in out:
            statuses[s] = statuses.get(s, 0) + 1
        done += len(batch)
    elapsed = time.perf_counter() - t0
    worker_cpu = time.process_time() - t_cpu0
    redis_cpu = _cpu(r) - cpu0
    stats = _stats(r)
    n = max(done, 1)
    return {
        "kind": kind,
        "n": done,
        "statuses": statuses,
        "elapsed_s": elapsed,
        "redis_cpu_us": redis_cpu / n * 1e6,
        "worker_cpu_us": worker_cpu / n * 1e6,
        "commands": {name: (calls / n, usec / n) for name, (calls, usec) in sorted(stats.items())},
    }


async def _main(a: argparse.Namespace) -> list[dict[str, Any]]:
    rp = RedisProcess()
    rp.start()
    try:
        url = rp.url
        settings = bench_settings(url, NAMESPACE)
        r = syncredis.Redis.from_url(url, decode_responses=True)
        setup_redis = connect(url, client_name="bd-setup")
        await setup_namespace(setup_redis, settings, a.tiers, a.pods)
        await setup_redis.aclose()
        ctx = WorkerContext.create(settings, "bd")
        await ctx.cache.refresh()
        await ensure_groups(ctx.redis, ctx.keys.all_input_streams, ctx.keys)
        proc = Processor(ctx)
        profile = cProfile.Profile() if a.profile else None
        out = []
        n = min(a.requests, a.pods)  # every allocation finds a pod
        for rnd in range(a.rounds):
            allocs = [
                AllocateRequest(request_id=f"a{rnd}-{i}", call_id=f"c{rnd}-{i}") for i in range(n)
            ]
            out.append(await _phase(ctx, proc, r, allocs, "allocate", profile))
            rels = [
                ReleaseRequest(request_id=f"r{rnd}-{i}", call_id=f"c{rnd}-{i}") for i in range(n)
            ]
            out.append(await _phase(ctx, proc, r, rels, "release", profile))
            r.unlink(*[ctx.keys.reply(f"{p}{rnd}-{i}") for p in "ar" for i in range(n)])
        await ctx.redis.aclose()
        if profile is not None:
            s = io.StringIO()
            pstats.Stats(profile, stream=s).sort_stats("tottime").print_stats(a.profile)
            print(s.getvalue())
        return out
    finally:
        rp.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tierpool.bench.breakdown", description=__doc__)
    p.add_argument("--pods", type=int, default=1000)
    p.add_argument("--requests", type=int, default=1000, help="per backlog (at most --pods)")
    p.add_argument("--rounds", type=int, default=3, help="allocate+release backlogs in a row")
    p.add_argument("--tiers", default="exclusive")
    p.add_argument("--profile", type=int, default=0, help="print the N costliest functions")
    a = p.parse_args(argv)
    results = anyio.run(_main, a)
    for res in results:
        print(
            f"{res['kind']:9} n={res['n']} {res['statuses']} "
            f"Redis CPU {res['redis_cpu_us']:.1f} us/msg, "
            f"worker CPU {res['worker_cpu_us']:.1f} us/msg, "
            f"{res['n'] / res['elapsed_s']:.0f} msg/s"
        )
        for name, (calls, usec) in res["commands"].items():
            if usec >= 0.05:
                print(f"    {name:22} {calls:5.2f} calls  {usec:6.2f} us  per msg")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
