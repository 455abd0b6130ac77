"""Kill -9 workers at random moments under load; check exactly-once, Jepsen style.

Several client loops allocate and release calls without pause while a chaos
task kills a random ready worker with SIGKILL at least ``KILLS`` times,
starting a replacement each time (so 2-3 workers are alive). Every request
is recorded: its reply, or a timeout, which means "may have happened".
Afterwards, with every pending entry processed:

- every request has exactly one reply entry (reply streams are kept), but
  one that timed out while still queued in the client (RequestNotSent), which
  must have none: it never happened;
- the audit log, replayed in Redis's own order, shows no duplicate: no call
  allocated twice, no exclusive pod with two live calls, no shared pod above
  its max (counted apart from other errors);
- each acknowledged allocation is in the log on the pod its reply named;
  each timed-out request either happened exactly once or not at all, as the
  final state says;
- the pool invariants hold on the final state (load == calls listed,
  free-index invariant, counts).
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from redis.asyncio import Redis

from tests.conftest import wait_for
from tests.invariants import violations
from tests.procs import KEYS, NAMESPACE, WorkerPool, pending_total
from tierpool.client.client import RequestNotSent, TierpoolClient, new_request_id
from tierpool.client.podagent import PodAgent
from tierpool.core.errors import RequestTimeout
from tierpool.core.tierconfig import parse_tier_config

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

TIER_CONFIG = {
    "gold": {"type": "exclusive", "target": 6},
    "basic": {"type": "shared", "target": 4, "max_concurrent": 3},
}
PODS = 10  # 6 exclusive + 4 shared x 3 = 18 calls at most
LOOPS = 6
KILLS = 10
MAX_CALLS = 40_000  # a safety bound: the chaos task ends the load
REQUEST_TIMEOUT_S = 0.5
"""Below the claim idle time (600 ms): requests caught by a kill time out ("maybe")."""
ENV = {"TIER_CONFIG": msgspec.json.encode(TIER_CONFIG).decode(), "REPLY_TTL": "10m"}


@dataclass
class History:
    """Every request the load made, and what came of it."""

    requests: dict[str, tuple[str, str]] = field(default_factory=dict)  # rid -> (kind, call)
    replies: dict[str, Any] = field(default_factory=dict)  # rid -> Reply
    maybe: dict[str, tuple[str, str]] = field(default_factory=dict)  # rid -> (kind, call)
    unsent: set[str] = field(default_factory=set)  # timed out before being sent
    errors: list[str] = field(default_factory=list)
    allocated: dict[str, str] = field(default_factory=dict)  # call -> pod, acknowledged
    released: set[str] = field(default_factory=set)  # acknowledged
    maybe_allocated: set[str] = field(default_factory=set)
    maybe_released: set[str] = field(default_factory=set)

    async def send(self, c: TierpoolClient, kind: str, call: str) -> Any:
        rid = new_request_id()
        self.requests[rid] = (kind, call)
        try:
            if kind == "allocate":
                reply = await c.allocate(call, request_id=rid, timeout_s=REQUEST_TIMEOUT_S)
            else:
                reply = await c.release(call, request_id=rid, timeout_s=REQUEST_TIMEOUT_S)
        except RequestTimeout as exc:
            if isinstance(exc, RequestNotSent):
                self.unsent.add(rid)  # still queued when it timed out: it never happened
            self.maybe[rid] = (kind, call)
            return None
        except Exception as exc:
            self.errors.append(f"{kind} {call}: {exc!r}")
            return None
        self.replies[rid] = reply
        return reply


async def caller(
    c: TierpoolClient, h: History, loop: int, stop: anyio.Event, rng: random.Random
) -> None:
    n = 0
    while not stop.is_set() and len(h.allocated) + len(h.maybe_allocated) < MAX_CALLS:
        call = f"L{loop}-{n}"
        n += 1
        reply = await h.send(c, "allocate", call)
        if reply is None:  # timed out: ask again (same call id: idempotent)
            reply = await h.send(c, "allocate", call)
        if reply is None:
            h.maybe_allocated.add(call)
            continue
        if reply.status != "allocated":
            await anyio.sleep(0.002)  # all pods busy: let releases catch up
            continue
        h.allocated[call] = reply.pod_id
        await anyio.sleep(rng.uniform(0.001, 0.005))  # the call
        rel = await h.send(c, "release", call)
        if rel is None:
            h.maybe_released.add(call)
        elif rel.status == "released":
            h.released.add(call)
        else:
            h.errors.append(f"release {call}: {rel.status}")


async def chaos(pool: WorkerPool, r: Redis, stop: anyio.Event, rng: random.Random) -> int:
    kills = 0
    while kills < KILLS:
        await anyio.sleep(rng.uniform(0.1, 0.6))
        ready = [w for w in pool.procs if w.alive() and w.worker_id]
        victim = rng.choice(ready)
        victim.kill()
        await victim.wait_exit()
        kills += 1
        await pool.start(r)  # the replacement; 2 workers serve meanwhile
    stop.set()
    return kills


def replay(
    events: list[dict[str, str]], max_of: dict[str, int]
) -> tuple[list[str], Counter[str], Counter[str], dict]:
    """Replay the audit log in Redis's order: duplicates, and per-call event counts."""
    dups: list[str] = []
    live: dict[str, str] = {}
    on_pod: dict[str, set[str]] = defaultdict(set)
    allocs: Counter[str] = Counter()
    ends: Counter[str] = Counter()
    alloc_pod: dict[str, str] = {}
    for e in events:
        kind, call, pod = e.get("event"), e.get("call_id", ""), e.get("pod_id", "")
        if kind == "allocated":
            allocs[call] += 1
            alloc_pod[call] = pod
            if call in live:
                dups.append(f"{call} allocated on {pod} while live on {live[call]}")
            live[call] = pod
            on_pod[pod].add(call)
            if len(on_pod[pod]) > max_of[e["pool"]]:
                dups.append(f"pod {pod} ({e['pool']}) holds {sorted(on_pod[pod])}")
        elif kind in ("released", "lease_expired", "call_lost"):
            ends[call] += 1
            live.pop(call, None)
            on_pod[pod].discard(call)
    return dups, allocs, ends, alloc_pod


async def test_kill_9_workers_under_load_keeps_exactly_once(
    redis_url: str, r: Redis, tmp_path: Path
) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"\n[crash] seed {seed}")
    config = parse_tier_config(msgspec.json.encode(TIER_CONFIG).decode(), version=1)
    h = History()
    with WorkerPool(redis_url, tmp_path, env=ENV) as pool:
        await pool.start(r, 3)
        async with (
            TierpoolClient.from_url(redis_url, namespace=NAMESPACE, delete_replies=False) as c,
            TierpoolClient.from_url(redis_url, namespace=NAMESPACE) as pods_client,
            anyio.create_task_group() as tg,
        ):
            agents = [
                PodAgent(
                    pods_client,
                    f"pod{i}",
                    f"http://pod{i}:8080",
                    heartbeat_s=1.0,
                    report_calls=False,
                )
                for i in range(PODS)
            ]
            for agent in agents:
                await tg.start(agent.run)
            stop = anyio.Event()
            t0 = anyio.current_time()
            async with anyio.create_task_group() as load:
                for i in range(LOOPS):
                    load.start_soon(caller, c, h, i, stop, random.Random(rng.random()))
                kills = await chaos(pool, r, stop, rng)
            took = anyio.current_time() - t0

            async def settled() -> bool:
                return await pending_total(r) == 0

            await wait_for(settled, timeout_s=15)
            tg.cancel_scope.cancel()

        # exactly one reply per request sent; none for a request that timed out unsent
        async with r.pipeline(transaction=False) as pipe:
            for rid in h.requests:
                pipe.xlen(KEYS.reply(rid))
            lengths = dict(zip(h.requests, await pipe.execute(), strict=True))
        no_reply = [rid for rid, n in lengths.items() if n == 0 and rid not in h.unsent]
        unsent_replied = [rid for rid in h.unsent if lengths[rid]]
        extra_replies = [rid for rid, n in lengths.items() if n > 1]

        events = [f for _, f in await r.xrange(KEYS.events)]
        max_of = {p: config.tier(p).max_concurrent for p in config.pools}
        dups, allocs, ends, alloc_pod = replay(events, max_of)
        final_calls = set(await r.hkeys(KEYS.calls))
        errors = list(h.errors)
        for call, pod in h.allocated.items():
            if allocs[call] != 1 or alloc_pod.get(call) != pod:
                errors.append(
                    f"acknowledged {call} on {pod}: log has {allocs[call]} "
                    f"allocations, on {alloc_pod.get(call)}"
                )
        for call in h.released:
            if ends[call] != 1 or call in final_calls:
                errors.append(f"acknowledged release of {call}: {ends[call]} ends in the log")
        maybe_happened = maybe_not = 0
        for call in h.maybe_allocated:  # never released by the load
            if allocs[call] == 1 and call in final_calls:
                maybe_happened += 1
            elif allocs[call] == 0 and call not in final_calls:
                maybe_not += 1
            else:
                errors.append(
                    f"timed-out allocate {call}: {allocs[call]} allocations, "
                    f"live={call in final_calls}"
                )
        for call in h.maybe_released:
            if ends[call] == 1 and call not in final_calls:
                maybe_happened += 1
            elif ends[call] == 0 and call in final_calls:
                maybe_not += 1
            else:
                errors.append(
                    f"timed-out release {call}: {ends[call]} ends, live={call in final_calls}"
                )
        now_ms = int((await r.time())[0]) * 1000
        broken = await violations(r, KEYS, config, now_ms=now_ms, pod_ttl_ms=15_000)
        dup_state = [v for v in broken if "listed by pods" in v or "> max" in v]
        broken = [v for v in broken if v not in dup_state]
        statuses = Counter(rep.status for rep in h.replies.values())

    print(
        f"[crash] {kills} kills in {took:.1f}s; {len(h.requests)} requests "
        f"({dict(statuses)}); {len(h.maybe)} timed out, {len(h.unsent)} of them unsent; "
        f"calls left unresolved by a timeout: {maybe_happened} happened, {maybe_not} did not; "
        f"{len(h.allocated)} acknowledged allocations, {len(h.released)} releases; "
        f"duplicates: {len(dups) + len(dup_state)}; missing replies: {len(no_reply)}, "
        f"extra replies: {len(extra_replies)}; errors: {len(errors)}; "
        f"invariant violations: {len(broken)}"
    )
    assert kills >= 10
    assert len(h.allocated) > 100, "the load did not run"
    assert dups == [] and dup_state == [], (dups, dup_state)
    assert no_reply == [] and extra_replies == [], (no_reply[:5], extra_replies[:5])
    assert unsent_replied == [], unsent_replied
    assert errors == [], errors[:10]
    assert broken == [], broken
