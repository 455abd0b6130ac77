"""Redis Cluster: namespaces on different masters, each served as on a single Redis.

The fixtures start a cluster of three masters from ``redis-server`` processes
(``redis-cli --cluster create``), with a replica each for the failover test.
Namespaces are picked so that their slots fall on three different masters.
One ``tierpool worker`` with ``TIERPOOL_NAMESPACE=a,b,c`` serves all three
(one child process each); the client, the CLI and the pod agent connect
through the cluster's first node, whichever master serves their namespace.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import msgspec
import pytest
import redis as syncredis
from redis.asyncio import Redis
from redis.exceptions import MovedError

from tests.conftest import wait_for
from tests.invariants import violations
from tests.loadharness import CallLoad
from tests.procs import WorkerPool
from tierpool.client.client import TierpoolClient
from tierpool.client.podagent import PodAgent
from tierpool.connect.clusterslot import namespace_slot
from tierpool.connect.redisconn import connect, is_cluster
from tierpool.core.keys import Keys
from tierpool.core.redistarget import RedisTarget
from tierpool.core.settings import Settings
from tierpool.core.tierconfig import parse_tier_config
from tierpool.schemas import PodDeregister, PodHeartbeat, PodRegister
from tierpool.workers.redisfarm import ClusterSetup
from tierpool.workers.redisproc import free_port_range

pytestmark = [pytest.mark.anyio]

CONFIG = {
    "gold": {"type": "exclusive", "target": 2},
    "basic": {"type": "shared", "target": 2, "max_concurrent": 3},
}
FAST_ENV = {
    "TIER_CONFIG": msgspec.json.encode(CONFIG).decode(),
    "TIERPOOL_BLOCK": "100ms",
    "TIERPOOL_CLAIM_MIN_IDLE": "600ms",
    "TIERPOOL_CLAIM_INTERVAL": "100ms",
    "TIERPOOL_SHUTDOWN_GRACE": "5s",
    "LOG_FORMAT": "console",
    "LOG_LEVEL": "info",
}


def spread_namespaces(cluster: ClusterSetup, count: int = 3) -> list[str]:
    return cluster.spread_namespaces(count)


@pytest.fixture(scope="module")
def cluster3() -> Iterator[ClusterSetup]:
    with ClusterSetup(3, 0) as cluster:
        yield cluster


def test_settings_force_or_detect_cluster_mode() -> None:
    assert Settings().redis_target.cluster == "auto"
    for raw, mode in (("yes", "yes"), ("off", "no"), ("AUTO", "auto")):
        assert Settings.from_env({"TIERPOOL_REDIS_CLUSTER": raw}).redis_cluster == mode
    with pytest.raises(Exception, match="TIERPOOL_REDIS_CLUSTER"):
        Settings.from_env({"TIERPOOL_REDIS_CLUSTER": "maybe"})


async def test_cluster_is_detected_and_each_namespace_reaches_its_master(
    cluster3: ClusterSetup, redis_url: str
) -> None:
    names = spread_namespaces(cluster3)
    ports = [cluster3.master_of(namespace_slot(n)) for n in names]
    for name in names:
        r = connect(cluster3.url, namespace=name)
        try:
            assert await is_cluster(r)
            await r.set(Keys(name).config_version, "7")
            port = (await r.info("server"))["tcp_port"]
            assert port == cluster3.master_of(namespace_slot(name))
            # a transaction with a keyless command and a script: one node, no redirect
            async with r.pipeline(transaction=True) as pipe:
                pipe.time()
                pipe.get(Keys(name).config_version)
                _time, got = await pipe.execute()
            assert got == "7"
            assert await r.eval("return redis.call('GET', KEYS[1])", 1, Keys(name).config_version)
        finally:
            await r.aclose()
    with pytest.raises(Exception, match="namespace"):
        r = connect(cluster3.url)
        try:
            await r.ping()
        finally:
            await r.aclose()
    standalone = connect(redis_url, namespace="x")  # the same code on a plain Redis
    try:
        assert not await is_cluster(standalone)
        assert await standalone.ping()
    finally:
        await standalone.aclose()
    elsewhere = next(n for n, p in zip(names, ports, strict=True) if p != cluster3.nodes[0].port)
    forced = connect(RedisTarget(cluster3.url, cluster="no"), namespace=elsewhere)
    try:  # forced standalone: the URL's node only, so a key of another master is MOVED
        with pytest.raises(MovedError):
            await forced.get(Keys(elsewhere).config_version)
    finally:
        await forced.aclose()


async def _serve_flows(url: str, namespace: str) -> None:
    """register, allocate, repeat, release, drain, config change, merchant policy."""
    keys = Keys(namespace)
    async with TierpoolClient.from_url(url, namespace=namespace) as c:
        for pod in ("p0", "p1"):
            reg = await c.send_pod_event(
                PodRegister(pod_id=pod, endpoint=f"http://{pod}:8080", zone="open", capability=1)
            )
            assert reg is not None and reg.status == "registered", reg
        a = await c.allocate("c1")
        assert (a.status, a.pool, a.existing) == ("allocated", "gold", False), a
        again = await c.allocate("c1")
        assert (again.status, again.pod_id, again.existing) == ("allocated", a.pod_id, True)
        assert (await c.release("c1")).status == "released"
        assert (await c.release("c1")).status == "not_found"
        assert (await c.drain("p0")).status == "drained"
        assert (await c.undrain("p0")).status == "undrained"
        hb = await c.send_pod_event(PodHeartbeat(pod_id="p0"))
        assert hb is not None and hb.status == "alive"
        applied = await c.change_config({"gold": 3, "basic": 1}, expected_version=1)
        assert (applied.status, applied.config_version) == ("applied", 2), applied
        assert (await c.set_merchant("m1", {"zone": "restricted"})).status == "applied"
        rej = await c.allocate("c2", merchant_id="m1")
        assert rej.status == "rejected", rej  # no restricted pod: the policy is in force
        assert (await c.set_merchant("m1", None)).status == "applied"
        ok = await c.allocate("c2", merchant_id="m1")
        assert ok.status == "allocated", ok
        gone = await c.send_pod_event(PodDeregister(pod_id="p1"))
        assert gone is not None and gone.status == "deregistered"
    r = connect(url, namespace=namespace)
    try:
        assert await r.hget(keys.calls, "c2")
        assert msgspec.json.decode(await r.get(keys.config) or "{}").get("version") == 2
    finally:
        await r.aclose()


async def test_acceptance_flows_in_three_namespaces_on_three_masters(
    cluster3: ClusterSetup, tmp_path: Path
) -> None:
    names = spread_namespaces(cluster3)
    masters = [cluster3.master_of(namespace_slot(n)) for n in names]
    assert len(set(masters)) == 3
    for port in masters:
        with syncredis.Redis(port=port) as node:
            node.flushall()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIERPOOL_", "REDIS"))}
    env.update(FAST_ENV)
    env.update(
        REDIS_URL=cluster3.url,
        TIERPOOL_NAMESPACE=",".join(names),
        METRICS_PORT=str(free_port_range(len(names))),
        PYTHONUNBUFFERED="1",
    )
    proc = _start_worker(env, tmp_path / "worker.log")
    try:
        for name in names:
            r = connect(cluster3.url, namespace=name)
            try:
                keys = Keys(name)
                await wait_for(lambda r=r, keys=keys: _has_worker(r, keys), timeout_s=30)
            finally:
                await r.aclose()
        async with anyio.create_task_group() as tg:
            for name in names:
                tg.start_soon(_serve_flows, cluster3.url, name)
        # every namespace's keys are on its own master and nowhere else
        for name, port in zip(names, masters, strict=True):
            for other in set(masters):
                with syncredis.Redis(port=other, decode_responses=True) as node:
                    held = node.keys(f"tp:{{{name}}}:*")
                assert bool(held) == (other == port), (name, other, held)
        # the CLI, through the first node, whichever master serves the namespace
        for name in names:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("TIERPOOL_", "REDIS"))}
            env.update(REDIS_URL=cluster3.url, TIERPOOL_NAMESPACE=name)
            cli = await anyio.to_thread.run_sync(
                lambda env=env: subprocess.run(
                    [sys.executable, "-m", "tierpool.workers.cli", "pods", "--json"],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
            )
            assert cli.returncode == 0, cli.stderr
            assert "p0" in cli.stdout and "p1" not in cli.stdout, cli.stdout
    finally:
        proc.terminate()
        try:
            rc = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        print((tmp_path / "worker.log").read_text(errors="replace")[-3000:])
    assert rc == 0  # SIGTERM reached every child, which stopped cleanly


def _start_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "tierpool.workers"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )


async def _has_worker(r: Redis, keys: Keys) -> bool:
    return bool(await r.zcard(keys.workers))


# --- failover under load --------------------------------------------------------------

LOOPS = 6
LONG_LOOPS = 2
TIMEOUT_S = 1.0
RECOVERY_LIMIT_S = 20.0


@pytest.mark.slow
async def test_master_failover_under_load(tmp_path: Path) -> None:
    """The master of a namespace is killed under load; its replica is promoted."""
    with ClusterSetup(3, 1, node_timeout_ms=1_000) as cluster:
        (name,) = spread_namespaces(cluster, 1)
        victim = cluster.master_of(namespace_slot(name))
        await _through(
            cluster,
            name,
            tmp_path,
            lambda: cluster.node(victim).stop(kill=True),
            f"cluster failover: master {victim} killed",
        )
        assert cluster.master_of(namespace_slot(name)) != victim


@pytest.mark.slow
async def test_slot_migration_under_load(tmp_path: Path) -> None:
    """The namespace's slot is resharded to another master under load (ASK, TRYAGAIN, MOVED)."""
    with ClusterSetup(3, 0) as cluster:
        (name,) = spread_namespaces(cluster, 1)
        slot = namespace_slot(name)
        source = cluster.master_of(slot)
        dest = next(p for p in set(cluster.slot_masters().values()) if p != source)
        moved: list[int] = []
        await _through(
            cluster,
            name,
            tmp_path,
            lambda: moved.append(cluster.migrate_slot(slot, dest, batch=3)),
            f"slot {slot} migrated from {source} to {dest}",
        )
        assert cluster.master_of(slot) == dest
        assert moved and moved[0] > 10


async def _through(
    cluster: ClusterSetup, name: str, tmp_path: Path, disrupt: Callable[[], object], what: str
) -> None:
    """Load on ``name`` while ``disrupt`` runs (in a thread); every request answered.

    Each load loop retries an allocate with the same ``call_id`` until it is
    answered (allocate is idempotent per call) and a release until it is
    answered, as a careful caller does: so no request is lost unless one
    never gets an answer. An exclusive pod must never serve two live calls.
    """
    keys = Keys(name)
    # POD_TTL longer than a failover (as the 15 s default is): pods silent while
    # Redis was away are not declared gone, which would only add rejections
    env = {**FAST_ENV, "POD_TTL": "10s", "TIERPOOL_HEARTBEAT": "250ms"}
    with WorkerPool(cluster.url, tmp_path, namespace=name, env=env) as pool:
        sr = connect(cluster.url, namespace=name)
        try:
            workers = await pool.start(sr, 2)
            async with (
                TierpoolClient.from_url(cluster.url, namespace=name) as c,
                anyio.create_task_group() as tg,
            ):
                agents = {
                    f"pod{i}": PodAgent(c, f"pod{i}", f"http://pod{i}:8080", heartbeat_s=0.25)
                    for i in range(5)
                }
                for agent in agents.values():
                    await tg.start(agent.run)
                load = CallLoad(
                    c,
                    agents,
                    give_up_s=RECOVERY_LIMIT_S + 10,
                    short_holds_s=(0.002, 0.01, 0.05),
                    long_hold_s=6.0,
                )
                d = await load.through(
                    disrupt,
                    sr,
                    keys,
                    loops=LOOPS,
                    long_loops=LONG_LOOPS,
                    recovery_limit_s=RECOVERY_LIMIT_S,
                )
                for agent in agents.values():
                    tg.start_soon(agent.shutdown, 2.0)
            assert all(w.alive() for w in workers), "a worker died instead of following"
            now_ms = int((await sr.time())[0]) * 1000
            config = parse_tier_config(msgspec.json.encode(CONFIG).decode(), version=1)
            broken = await violations(sr, keys, config, now_ms=now_ms, pod_ttl_ms=10_000)
        finally:
            await sr.aclose()
    after = sorted(t for t in load.ok_at if t > d.t_kill - 1.0)
    gap, gap_at = max(
        ((b - a, a - d.t_kill) for a, b in itertools.pairwise(after)), default=(0.0, 0.0)
    )
    print(
        f"\n[{what}] namespace {name} under load; disruption took {d.t_done - d.t_kill:.2f}s; "
        f"first allocation {d.recovery_s:.2f}s after it began; longest pause between "
        f"allocations {gap:.2f}s ({gap_at:+.2f}s from the start); "
        f"{load.timeouts} request timeouts retried; "
        f"{len(load.unanswered)} never answered; {len(d.held_at_kill)} calls live when it began, "
        f"{len(d.holding)} still held after, {len(d.forgotten)} unknown to Redis; client "
        f"redirects {c.stats.redirects}, reconnects {c.stats.reconnects}; "
        f"double-booked {len(load.double_booked)}"
    )
    assert d.recovery_s < RECOVERY_LIMIT_S
    assert load.unanswered == [], load.unanswered
    assert load.double_booked == [], load.double_booked
    assert d.forgotten == [], d.forgotten
    assert broken == [], broken


async def test_unblock_goes_only_to_the_readers_node(redis_url: str) -> None:
    """``CLIENT UNBLOCK`` names a client of one server: the writer sends it only over a
    connection to the node where the reader got its id (after a failover or a migration
    the two may briefly be on different nodes, where the id is some other client's)."""
    from tierpool.client.mux import Mux

    keys = Keys("u")
    stream = keys.request_stream("release")

    async with Mux(connect(redis_url, namespace="u"), block_ms=800) as mux:

        async def send(rid: str) -> None:
            with contextlib.suppress(Exception):  # nobody answers: only the kicks count
                await mux.submit(rid, stream, {"x": rid}, keys.reply(rid), 3)

        async def blocked() -> bool:
            return mux._blocked_gen is not None

        async with anyio.create_task_group() as tg:
            tg.start_soon(send, "r1")
            await wait_for(blocked, timeout_s=5)
            kicks = mux.stats.kicks
            tg.start_soon(send, "r2")  # same node: the blocked read is interrupted
            await wait_for(lambda: _true(mux.stats.kicks > kicks), timeout_s=5)
            await wait_for(blocked, timeout_s=5)
            mux._reader_node = ("10.255.0.1", 7000)  # as if the reader were on another node
            kicks = mux.stats.kicks
            tg.start_soon(send, "r3")
            await anyio.sleep(0.5)
            assert mux.stats.kicks == kicks  # no CLIENT UNBLOCK sent to the writer's node
            assert mux.stats.sent >= 3  # the request itself went out
            tg.cancel_scope.cancel()


async def _true(value: bool) -> bool:
    return value


@pytest.mark.parametrize(
    ("raw", "why"), [("a,a", "listed twice"), ("a,b c", "'b c'"), ("a,{b}", "'{b}'")]
)
def test_a_bad_namespace_list_stops_the_worker_at_start(raw: str, why: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIERPOOL_", "REDIS"))}
    env.update(TIERPOOL_NAMESPACE=raw, REDIS_URL="redis://127.0.0.1:1/0")
    done = subprocess.run(
        [sys.executable, "-m", "tierpool.workers"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "TIERPOOL_NAMESPACE" in done.stderr and why in done.stderr
