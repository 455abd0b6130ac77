"""Leader election and the leader loops, in-process, against real Redis.

Leases here are short (600 ms, renewed every 150 ms) so terms change within a
test; the rules are the defaults' rules. Each candidate has its own client,
as separate processes would.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from tests.conftest import wait_for
from tests.statekit import KEYS, Ops, make_state
from tests.test_reconcile import T0, dump
from tierpool.connect.redisconn import connect
from tierpool.core.configcache import ConfigCache
from tierpool.core.leader import Election, Leadership, parse_token
from tierpool.core.reconcile import publish_gauges, reap, reconcile
from tierpool.core.scripts import script
from tierpool.core.settings import Settings
from tierpool.core.state import PoolState
from tierpool.schemas import ConfigRequest
from tierpool.workers import metrics
from tierpool.workers.context import WorkerContext
from tierpool.workers.leader import gauges_once, reconcile_once, run_leader
from tierpool.workers.redisproc import RedisProcess

pytestmark = pytest.mark.anyio

LEASE_MS = 600
RENEW_S = 0.15
FAST_ENV = {
    "TIERPOOL_LEADER_LEASE": f"{LEASE_MS}ms",
    "TIERPOOL_LEADER_RENEW": f"{RENEW_S}s",
    "CLEANUP_INTERVAL": "200ms",
    "RECONCILE_INTERVAL": "200ms",
}


@pytest.fixture
async def clients(redis_url: str) -> AsyncIterator[Callable[[], Redis]]:
    """A factory of separate clients (one per candidate), all closed after the test."""
    made: list[Redis] = []

    def make() -> Redis:
        client = connect(redis_url)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.aclose()


def election(
    client: Redis,
    holder: str,
    lease_ms: int = LEASE_MS,
    renew_s: float = RENEW_S,
    retry_s: float = 0.1,
) -> Election:
    return Election(client, KEYS, holder, lease_ms, renew_s, retry_s=retry_s)


async def forever(term: Leadership) -> None:
    await anyio.sleep_forever()


def cond(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    """``check`` as the async predicate ``wait_for`` polls."""

    async def predicate() -> bool:
        return check()

    return predicate


def make_ctx(client: Redis, worker_id: str, tier_config: str, **env: str) -> WorkerContext:
    settings = Settings.from_env({**FAST_ENV, "TIER_CONFIG": tier_config, **env})
    cache = ConfigCache(client, KEYS, settings)
    return WorkerContext(
        settings, KEYS, client, cache, PoolState(client, KEYS, settings, cache), worker_id
    )


# --- election -----------------------------------------------------------------------
async def test_only_one_candidate_leads_at_a_time(clients: Callable[[], Redis]) -> None:
    active: list[str] = []
    overlap: list[list[str]] = []
    terms: list[str] = []

    def body(name: str) -> Callable[[Leadership], Any]:
        async def lead(term: Leadership) -> None:
            active.append(name)
            terms.append(term.token)
            if len(active) > 1:
                overlap.append(list(active))
            try:
                await anyio.sleep_forever()
            finally:
                active.remove(name)

        return lead

    cands = [election(clients(), f"c{i}") for i in range(3)]
    async with anyio.create_task_group() as tg:
        scopes = []
        for c in cands:
            scope = anyio.CancelScope()
            scopes.append(scope)

            async def run(c: Election = c, scope: anyio.CancelScope = scope) -> None:
                with scope:
                    await c.run(body(c.holder_id))

            tg.start_soon(run)
        for handover in range(3):  # stop the leader twice: each time exactly one other wins
            await wait_for(cond(lambda n=handover: len(terms) == n + 1), 3)
            assert sum(c.is_leader for c in cands) == 1
            if handover < 2:
                leader = next(i for i, c in enumerate(cands) if c.is_leader)
                scopes[leader].cancel()
        tg.cancel_scope.cancel()
    assert overlap == []
    assert [parse_token(t)[1] for t in terms] == [1, 2, 3]  # a new term number each time


async def test_renewal_keeps_the_lease_and_the_term(clients: Callable[[], Redis]) -> None:
    client = clients()
    e = election(client, "solo", lease_ms=300, renew_s=0.075)
    renewed = _count_calls(e, "renew")
    async with anyio.create_task_group() as tg:
        tg.start_soon(e.run, forever)
        await wait_for(cond(lambda: e.is_leader), 2)
        token = e.current.token if e.current else ""
        # Five leases' worth of renewals (four per lease), however slow the machine.
        await wait_for(cond(lambda: renewed[True] >= 20), 30)
        assert (e.terms, e.is_leader) == (1, True)
        assert await client.get(KEYS.leader) == token
        assert 0 < await client.pttl(KEYS.leader) <= 300
        assert await election(clients(), "rival").try_acquire() is None
        tg.cancel_scope.cancel()


async def test_paused_holder_is_fenced_before_and_after_a_new_leader(
    r: Redis, clients: Callable[[], Redis]
) -> None:
    """Guards fencing (Kleppmann 2016): a holder that stopped renewing can change nothing."""
    state = await make_state(r, {"gold": {"target": 2}}, env={"LEASE_TTL": "60s"})
    ops = Ops(state)
    await ops.register("p0", now_ms=T0)  # silent, with an expired lease: work to do
    await ops.allocate("c1", now_ms=T0)
    await ops.register("p1")  # alive
    await state.apply(ConfigRequest(request_id="cfg", config='{"silver": {"target": 2}}'))
    await state.source.refresh()  # p1 is now unassigned: a move to do too
    paused = await election(clients(), "paused").try_acquire()  # and then never renews
    assert paused is not None
    before = await dump(r)

    async def all_fenced(token: str) -> None:
        assert (await reap(state, token)).status == "fenced"
        assert (await reconcile(state, token)).status == "fenced"
        assert (await publish_gauges(state, token)).status == "fenced"
        assert await dump(r) == before
        assert not await r.exists(KEYS.gauges)

    await wait_for(lambda: _exists_not(r, KEYS.leader), 2 * LEASE_MS / 1000)
    await all_fenced(paused)  # no leader at all yet
    fresh = await election(clients(), "fresh").try_acquire()
    assert fresh is not None
    await all_fenced(paused)  # and with a new one
    assert (await reap(state, fresh)).pods == 1  # the current token is obeyed
    assert not await election(clients(), "paused").renew(paused)


def _count_calls(e: Election, method: str) -> Counter[object]:
    """Count ``e.<method>`` calls by result, so a test can wait for them."""
    seen: Counter[object] = Counter()
    real = getattr(e, method)

    async def counted(*args: Any) -> Any:
        result = await real(*args)
        seen[result if isinstance(result, bool) or result is None else "other"] += 1
        return result

    setattr(e, method, counted)
    return seen


async def _exists_not(r: Redis, key: str) -> bool:
    return not await r.exists(key)


async def test_clean_release_hands_over_without_waiting_for_the_lease(
    clients: Callable[[], Redis],
) -> None:
    first = election(clients(), "first", lease_ms=4000, renew_s=0.5)
    second = election(clients(), "second", lease_ms=4000, renew_s=0.5, retry_s=0.5)
    tried = _count_calls(second, "try_acquire")
    async with anyio.create_task_group() as tg:
        scope = anyio.CancelScope()

        async def run_first() -> None:
            with scope:
                await first.run(forever)

        tg.start_soon(run_first)
        await wait_for(cond(lambda: first.is_leader), 2)
        tg.start_soon(second.run, forever)
        await wait_for(cond(lambda: tried[None] >= 1), 5)  # it found the lease taken
        assert not second.is_leader
        started = anyio.current_time()
        scope.cancel()
        await wait_for(cond(lambda: second.is_leader), 3.5)
        handover = anyio.current_time() - started
        tg.cancel_scope.cancel()
    print(f"\nhandover after a clean release: {handover * 1000:.0f} ms (lease 4000 ms)")
    # One retry interval (0.5 s) plus scheduling on a loaded 2-core machine;
    # waiting out the lease would take 4 s.
    assert handover < 2.5


async def test_losing_the_lease_cancels_lead_and_campaigns_again(
    r: Redis, clients: Callable[[], Redis]
) -> None:
    started: list[str] = []
    cancelled: list[str] = []

    async def lead(term: Leadership) -> None:
        started.append(term.token)
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled.append(term.token)
            raise

    e = election(clients(), "me")
    async with anyio.create_task_group() as tg:
        tg.start_soon(e.run, lead)
        await wait_for(cond(lambda: len(started) == 1), 2)
        await r.set(KEYS.leader, "intruder:99", px=800)  # e.g. a flush and another winner
        lost_at = anyio.current_time()
        await wait_for(cond(lambda: len(cancelled) == 1), 1)
        print(
            f"\nlead cancelled {1000 * (anyio.current_time() - lost_at):.0f} ms after "
            "the lease was taken"
        )
        assert not e.is_leader
        await wait_for(cond(lambda: len(started) == 2), 3)  # the same task leads again
        assert parse_token(started[1]) == ("me", 2)
        tg.cancel_scope.cancel()


async def test_a_fenced_answer_ends_the_term(r: Redis, clients: Callable[[], Redis]) -> None:
    state = await make_state(r, {"old": {"target": 1}})
    await Ops(state).register("p0")
    cfg = '{"gold": {"target": 1}}'
    await state.apply(ConfigRequest(request_id="cfg", config=cfg))  # p0 is now unassigned
    ctx = make_ctx(clients(), "w", cfg)
    await ctx.cache.refresh()
    assert await election(clients(), "real").try_acquire() is not None
    for step in (gauges_once, reconcile_once):
        scope = anyio.CancelScope()
        term = Leadership("old-leader:1", 0.0, _scope=scope)
        with scope:
            await step(ctx, term)
            await anyio.sleep(5)  # cancelled by step_down long before this
        assert scope.cancel_called
        assert term.lost_reason is not None and "fenced" in term.lost_reason
    assert await r.hget(KEYS.pod_pool, "p0") == ""


# --- the leader role ------------------------------------------------------------------
async def test_run_leader_repairs_publishes_gauges_and_releases_on_stop(
    r: Redis, clients: Callable[[], Redis]
) -> None:
    state = await make_state(r, {"old": {"target": 5}})
    ops = Ops(state)
    for i in range(3):
        await ops.register(f"p{i}")
    cfg = '{"gold": {"target": 2}, "standard": {"target": 1}}'
    await state.apply(ConfigRequest(request_id="cfg", config=cfg))
    ctx = make_ctx(clients(), "w1", cfg)
    moves_before = _sample("tierpool_moves_total", {"reason": "assign"})
    upstream_errors = _sample("tierpool_worker_errors_total", {"loop": "leader_upstream"})
    async with anyio.create_task_group() as tg:
        await tg.start(run_leader, ctx)
        await wait_for(cond(lambda: ctx.is_leader), 2)
        assert ctx.leader_token and parse_token(ctx.leader_token)[0] == "w1"
        assert _sample("tierpool_leader") == 1
        await wait_for(lambda: _assigned(r), 3)
        assert sorted((await r.hgetall(KEYS.pod_pool)).values()) == ["gold", "gold", "standard"]
        await wait_for(lambda: _gold_pods(r, 2), 3)
        assert _sample("tierpool_moves_total", {"reason": "assign"}) - moves_before == 3
        tg.cancel_scope.cancel()
    assert (ctx.is_leader, ctx.leader_token) == (False, None)
    assert _sample("tierpool_leader") == 0
    assert await r.get(KEYS.leader) is None  # released on a clean stop
    # core.upstream ran (and returned: no TIER_CONFIG_URL) without failing
    assert _sample("tierpool_worker_errors_total", {"loop": "leader_upstream"}) == upstream_errors


def _sample(name: str, labels: dict[str, str] | None = None) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels or {}) or 0.0


async def _assigned(r: Redis) -> bool:
    return "" not in (await r.hgetall(KEYS.pod_pool)).values()


async def _hexists(r: Redis, key: str, name: str) -> bool:
    return bool(await r.hexists(key, name))


async def _gold_pods(r: Redis, n: int) -> bool:
    raw = await r.hget(KEYS.gauges, "json")
    return raw is not None and msgspec.json.decode(raw)["pools"].get("gold", {}).get("pods") == n


# --- faults ---------------------------------------------------------------------------
@dataclass
class Faults:
    """Faults injected into one client's pipelines (every command goes through one)."""

    rate: float = 0.0
    """Share of pipelines that raise ConnectionError instead of running."""
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    poison: set[str] = field(default_factory=set)
    """Keys whose reads answer with an error."""
    pipelines: int = 0
    raised: int = 0
    scripts: list[str] = field(default_factory=list)
    """SHA of every script sent."""

    def install(self, client: Redis) -> Redis:
        real = client.pipeline

        def pipeline(transaction: bool = True, shard_hint: Any = None) -> Any:
            pipe = real(transaction=transaction, shard_hint=shard_hint)
            real_execute = pipe.execute

            async def execute(raise_on_error: bool = True) -> list[Any]:
                self.pipelines += 1
                stack = [args for args, _ in pipe.command_stack]
                if self.rng.random() < self.rate:
                    self.raised += 1
                    await pipe.reset()
                    raise RedisConnectionError("injected: connection lost mid-cycle")
                self.scripts += [str(a[1]) for a in stack if a[0] == "EVALSHA"]
                results = await real_execute(raise_on_error=False)
                for i, args in enumerate(stack):
                    if len(args) > 1 and args[1] in self.poison:
                        self.raised += 1
                        results[i] = ResponseError(f"injected: cannot read {args[1]}")
                errors = [x for x in results if isinstance(x, Exception)]
                if raise_on_error and errors:
                    raise errors[0]
                return results

            pipe.execute = execute
            return pipe

        client.pipeline = pipeline  # type: ignore[method-assign]
        return client


async def _storm_state(r: Redis) -> PoolState:
    """A fixed point with traps: every pod a faulty read could make look movable or dead."""
    state = await make_state(
        r,
        {
            "tiers": {"gold": {"target": 3}, "standard": {"target": 0}},
            "default_chain": ["gold", "standard"],
        },
    )
    ops = Ops(state)
    await ops.register("g0")
    await state.apply(
        ConfigRequest(
            request_id="c",
            config=(
                '{"tiers": {"gold": {"target": 0}, "standard": {"target": 3}},'
                ' "default_chain": ["gold", "standard"]}'
            ),
        )
    )
    await state.source.refresh()
    await ops.register("busy")
    await ops.register("draining")
    await ops.allocate("c1", chain=("standard",))
    await ops.drain("draining")
    await state.apply(
        ConfigRequest(
            request_id="d",
            config=(
                '{"tiers": {"gold": {"target": 3}, "standard": {"target": 0}},'
                ' "default_chain": ["gold", "standard"]}'
            ),
        )
    )
    await state.source.refresh()
    assert await r.hgetall(KEYS.pod_pool) == {
        "g0": "gold",
        "busy": "standard",
        "draining": "standard",
    }
    return state


async def test_failed_reads_are_never_taken_for_missing(
    r: Redis, clients: Callable[[], Redis]
) -> None:
    """Guards the anchor's zombie storm (§9, C2): a read error must not read as "missing".

    With loads, liveness and drain marks unreadable, a planner that took the
    error for "empty" would see the busy and draining pods as idle and move
    them, or see every pod as dead. Nothing may be sent, nothing may change.
    """
    state = await _storm_state(r)
    faults = Faults()
    client = faults.install(clients())
    flaky = PoolState(client, KEYS, state.settings, state.source)
    token = await election(clients(), "leader", lease_ms=60_000).try_acquire()
    assert token is not None
    before = await dump(r)
    for poison in ({KEYS.pod_load, KEYS.pod_draining}, {KEYS.pod_seen}, {KEYS.pod_pool}):
        faults.poison = poison
        with pytest.raises(ResponseError, match="injected"):
            await reconcile(flaky, token)
    assert faults.scripts == []  # no move was even sent
    faults.poison = set()
    faults.rate = 1.0
    for op in (reconcile, reap, publish_gauges):
        with pytest.raises(RedisConnectionError):
            await op(flaky, token)  # type: ignore[operator]
    assert await dump(r) == before
    assert not await r.exists(KEYS.gauges)
    res = await reconcile(state, token)  # with working reads: the traps stay where they are
    assert (res.status, res.planned) == ("ok", [])


async def test_leader_loops_under_connection_errors_change_nothing_wrongly(
    r: Redis, clients: Callable[[], Redis]
) -> None:
    """A third of the leader's round trips fail for seconds: no pod, lease or mark is lost."""
    await _storm_state(r)
    before = await dump(r)
    faults = Faults(rate=1 / 3)
    cfg = '{"tiers": {"gold": {"target": 3}, "standard": {"target": 0}}}'
    ctx = make_ctx(faults.install(clients()), "flaky", cfg, POD_TTL="120s")
    reap_sha = script("reap").sha

    def errors(loop: str) -> float:
        return _sample("tierpool_worker_errors_total", {"loop": f"leader_{loop}"})

    errors_before = errors("reconcile") + errors("reap")
    async with anyio.create_task_group() as tg:
        await tg.start(run_leader, ctx)
        await wait_for(
            cond(
                lambda: (
                    faults.scripts.count(reap_sha) >= 5
                    and errors("reconcile") + errors("reap") - errors_before >= 4
                )
            ),
            15,
        )
        tg.cancel_scope.cancel()
    assert await dump(r) == before
    print(
        f"\n{faults.raised} injected errors over {faults.pipelines} round trips, "
        f"{faults.scripts.count(reap_sha)} reaps run: state unchanged"
    )


async def test_leader_survives_redis_losing_its_data(
    redis_server: RedisProcess, redis_url: str, clients: Callable[[], Redis]
) -> None:
    """Redis down past the lease: the term ends at once; after a restart without
    persistence (term counter gone) the same process wins term 1 and repairs again."""
    cfg = '{"gold": {"target": 1}}'
    ctx = make_ctx(clients(), "survivor", cfg)
    check = clients()
    async with anyio.create_task_group() as tg:
        await tg.start(run_leader, ctx)
        await wait_for(cond(lambda: ctx.is_leader), 2)
        await wait_for(lambda: _hexists(check, KEYS.gauges, "json"), 3)
        await anyio.to_thread.run_sync(redis_server.stop)
        down_at = anyio.current_time()
        try:
            await wait_for(cond(lambda: not ctx.is_leader), 2 * LEASE_MS / 1000)
            lost_after = anyio.current_time() - down_at
        finally:
            up_at = anyio.current_time()
            await anyio.to_thread.run_sync(redis_server.start)
        await wait_for(cond(lambda: ctx.is_leader), 5)
        back_after = anyio.current_time() - up_at
        assert ctx.leader_token == "survivor:1"
        await Ops(PoolState(check, KEYS, ctx.settings, ctx.cache)).register("p0")
        await wait_for(lambda: _gold_pods(check, 1), 4)
        tg.cancel_scope.cancel()
    print(
        f"\nRedis down: leadership dropped after {lost_after * 1000:.0f} ms "
        f"(lease {LEASE_MS} ms); leading again {back_after * 1000:.0f} ms after the restart "
        "began"
    )
    assert lost_after <= LEASE_MS / 1000 + 0.1
