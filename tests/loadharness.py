"""Client load that goes on through a Redis disruption, and what it must not break.

Shared by the Sentinel failover test and the Cluster failover and slot-migration
tests: load loops allocate and release calls on pods run by real pod agents,
as careful callers do (an allocate or release is resent with the same call id
until it is answered: allocate is idempotent per call), while something kills
or moves Redis under them. The harness records when allocations succeed,
which exclusive pod held which call (a second live call is a double booking),
and, after the disruption, which calls held since before it Redis no longer
knows (forgotten: the pods' heartbeats must have restored them).
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import anyio
from redis.asyncio import Redis

from tests.conftest import wait_for
from tierpool.client.client import TierpoolClient
from tierpool.client.podagent import PodAgent
from tierpool.core.clock import monotonic_s
from tierpool.core.errors import RedisUnavailable, RequestTimeout
from tierpool.core.keys import Keys
from tierpool.schemas import Reply

TIMEOUT_S = 1.0
"""Each attempt's wait for a reply; a timed-out request is resent."""


@dataclass
class Disrupted:
    """What :meth:`CallLoad.through` saw around the disruption."""

    t_kill: float
    t_done: float
    t_first: float
    """The first successful allocation after the disruption began."""
    held_at_kill: dict[str, str]
    holding: list[str]
    """Calls live at the disruption and still held (not being released) a second
    after allocations resumed."""
    forgotten: list[str]
    """Of those, the calls Redis does not know: each is a lost live call."""

    @property
    def recovery_s(self) -> float:
        return self.t_first - self.t_kill


@dataclass
class CallLoad:
    """Load loops on ``client``; calls of ``exclusive_pool`` checked for double booking."""

    client: TierpoolClient
    agents: Mapping[str, PodAgent]
    give_up_s: float
    """How long a request is resent before it counts as never answered."""
    exclusive_pool: str = "gold"
    short_holds_s: tuple[float, ...] = (0.002, 0.005, 0.02, 0.3)
    long_hold_s: float = 8.0
    ok_at: list[float] = field(default_factory=list)
    timeouts: int = 0
    unanswered: list[str] = field(default_factory=list)
    double_booked: list[str] = field(default_factory=list)
    live: dict[str, str] = field(default_factory=dict)  # call -> pod, allocated and not released
    _holders: dict[str, set[str]] = field(default_factory=dict)
    _releasing: set[str] = field(default_factory=set)
    _seq: int = 0

    async def _answered(
        self, op: str, call: str, send: Callable[[], Awaitable[Reply]]
    ) -> Reply | None:
        deadline = monotonic_s() + self.give_up_s
        while monotonic_s() < deadline:
            try:
                return await send()
            except (RequestTimeout, RedisUnavailable):
                self.timeouts += 1
                await anyio.sleep(0.05)
        self.unanswered.append(f"{op} {call}")
        return None

    async def loop(self, index: int, stop: anyio.Event, *, long: bool = False) -> None:
        """Allocate, hold (briefly, or ``long_hold_s`` to outlive the disruption), release."""
        rng = random.Random(index)
        c = self.client
        while not stop.is_set():
            self._seq += 1
            call = f"L{index}-{self._seq}"
            reply = await self._answered(
                "allocate", call, lambda call=call: c.allocate(call, timeout_s=TIMEOUT_S)
            )
            if reply is None or reply.status != "allocated" or reply.pod_id is None:
                await anyio.sleep(0.02)
                continue
            pod = reply.pod_id
            if reply.pool == self.exclusive_pool:
                if self._holders.get(pod):
                    self.double_booked.append(f"{pod}: {call} while {sorted(self._holders[pod])}")
                self._holders.setdefault(pod, set()).add(call)
            self.live[call] = pod
            self.agents[pod].call_started(call)
            self.ok_at.append(monotonic_s())
            await anyio.sleep(self.long_hold_s if long else rng.choice(self.short_holds_s))
            self._releasing.add(call)
            self._holders.get(pod, set()).discard(call)
            await self._answered(
                "release", call, lambda call=call: c.release(call, timeout_s=TIMEOUT_S)
            )
            del self.live[call]
            self._releasing.discard(call)
            self.agents[pod].call_ended(call)

    def _count_after(self, n: int, after: float = 0.0) -> Callable[[], Awaitable[bool]]:
        async def enough() -> bool:
            return sum(1 for t in self.ok_at if t > after) >= n

        return enough

    async def through(
        self,
        disrupt: Callable[[], object],
        redis: Redis,
        keys: Keys,
        *,
        loops: int,
        long_loops: int,
        recovery_limit_s: float,
    ) -> Disrupted:
        """Run the loops, ``disrupt`` (in a thread) once 100 calls went through, wait for
        allocations to resume and 100 more, then stop and let every call be released."""
        async with anyio.create_task_group() as tg:
            stop = anyio.Event()
            for i in range(loops + long_loops):
                tg.start_soon(lambda i=i: self.loop(i, stop, long=i >= loops))
            await wait_for(self._count_after(100), timeout_s=30)
            held_at_kill = dict(self.live)
            t_kill = monotonic_s()
            await anyio.to_thread.run_sync(disrupt)
            t_done = monotonic_s()
            await wait_for(
                self._count_after(1, t_kill + 0.05),
                timeout_s=recovery_limit_s + 10,
                interval_s=0.05,
            )
            t_first = min(t for t in self.ok_at if t > t_kill + 0.05)
            await anyio.sleep(1.0)  # every pod has heartbeated its calls a few times
            holding = [x for x in held_at_kill if x in self.live and x not in self._releasing]
            known = await redis.hgetall(keys.calls)
            forgotten = [x for x in holding if x not in known]
            await wait_for(self._count_after(100, t_first), timeout_s=30)
            stop.set()

            async def released() -> bool:
                return not self.live

            await wait_for(released, timeout_s=30)
        return Disrupted(t_kill, t_done, t_first, held_at_kill, holding, forgotten)
