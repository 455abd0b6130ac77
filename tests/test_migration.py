"""Drop-in migration from smart-router (issue 15): each row of
``docs/migrating-from-smart-router.md`` that tierpool honours is proven here."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import msgspec
import pytest
from redis.asyncio import Redis

from tests.conftest import ROOT, wait_for
from tests.procs import WorkerPool, reply, send
from tests.statekit import KEYS, Ops, RedisSource, make_state
from tests.test_deploy import load_yaml
from tests.test_metrics import Samples, scrape, value
from tests.test_prometheus_rules import RULES, run_promtool
from tierpool.core.anchorenv import ANCHOR_VARIABLES, unused_variable_warnings
from tierpool.core.configcache import ConfigCache
from tierpool.core.errors import InvalidMessage, TierConfigError
from tierpool.core.keys import ANCHOR_CONFIG_KEY, Keys
from tierpool.core.placement import session_url_parts
from tierpool.core.settings import Settings, env_variables
from tierpool.core.state import PoolState
from tierpool.core.tierconfig import parse_tier_config, read_anchor_tier_config
from tierpool.schemas import AllocateRequest, ConfigRequest
from tierpool.schemas.messages import decode_reply, decode_request
from tierpool.workers import http, metrics
from tierpool.workers.context import WorkerContext
from tierpool.workers.worker import connect_metrics, warn_about_anchor_settings

pytestmark = pytest.mark.anyio

ANCHOR_PRODUCTION_ENV: dict[str, str] = {
    # seed 003: every variable of the anchor's reference, with its production
    # value where the seed gives one (configmap) and its default otherwise.
    "REDIS_URL": "redis://localhost:6379",
    "REDIS_POOL_SIZE": "10",
    "REDIS_MIN_IDLE_CONN": "5",
    "REDIS_MAX_RETRIES": "3",
    "REDIS_DIAL_TIMEOUT": "5s",
    "HTTP_PORT": "8080",
    "METRICS_PORT": "9090",
    "HTTP_READ_TIMEOUT": "5s",
    "HTTP_WRITE_TIMEOUT": "10s",
    "HTTP_IDLE_TIMEOUT": "60s",
    "HTTP_SHUTDOWN_TIMEOUT": "30s",
    "VOICE_AGENT_BASE_URL": "wss://clairvoyance.breezelabs.app",
    "NAMESPACE": "voice-system",
    "POD_LABEL_SELECTOR": "app=voice-agent",
    "POD_NAME": "smart-router-5d8f7b9c4-x7k2p",
    "CLEANUP_INTERVAL": "30s",
    "LEASE_TTL": "15m",
    "DRAINING_TTL": "6m",
    "RECONCILE_INTERVAL": "60s",
    "CALL_INFO_TTL": "1h",
    "TIER_CONFIG": (
        '{"gold":{"type":"exclusive","target":1},"standard":{"type":"exclusive","target":1},'
        '"basic":{"type":"shared","target":1,"max_concurrent":3}}'
    ),
    "LEADER_ELECTION_ENABLED": "true",
    "LEADER_ELECTION_NAMESPACE": "voice-system",
    "LEADER_ELECTION_LOCK_NAME": "smart-router-leader",
    "LEADER_ELECTION_DURATION": "15s",
    "LEADER_ELECTION_RENEW_DEADLINE": "10s",
    "LEADER_ELECTION_RETRY_PERIOD": "2s",
    "LOG_LEVEL": "info",
    "LOG_FORMAT": "json",
}
ANCHOR_ENV_NAMES = list(ANCHOR_PRODUCTION_ENV)


@pytest.fixture
async def ctx(redis_url: str) -> AsyncIterator[WorkerContext]:
    context = WorkerContext.create(Settings(redis_url=redis_url, namespace="t"))
    try:
        yield context
    finally:
        await context.redis.aclose()


async def test_anchor_probe_paths_are_aliases(ctx: WorkerContext) -> None:
    """The anchor's ``/health`` and ``/ready`` answer as ``/healthz`` and ``/readyz``.

    Guards the probes of an unchanged smart-router manifest: without the
    aliases they get 404 and Kubernetes restarts a healthy worker.
    """
    async with anyio.create_task_group() as tg:
        port = await tg.start(lambda task_status: http.serve(ctx, port=0, task_status=task_status))
        status, body = await http.get("127.0.0.1", port, "/health")
        assert status == 200 and msgspec.json.decode(body)["status"] == "ok"
        status, body = await http.get("127.0.0.1", port, "/ready")
        assert status == 503 and msgspec.json.decode(body)["missing"] == [
            "config_loaded",
            "group_joined",
        ]
        ctx.health.config_loaded = ctx.health.group_joined = True
        status, body = await http.get("127.0.0.1", port, "/ready")
        assert status == 200 and msgspec.json.decode(body)["status"] == "ready"
        assert (await http.get("127.0.0.1", port, "/readyz"))[0] == 200
        tg.cancel_scope.cancel()


# --- configuration -------------------------------------------------------------------

ANCHOR_PROD_TIER_CONFIG = ANCHOR_PRODUCTION_ENV["TIER_CONFIG"]
"""seed 003, ``k8s/configmap.yaml``: the anchor's production ``TIER_CONFIG``."""


def test_anchor_production_tier_config_reads_as_the_anchor_read_it() -> None:
    s = Settings.from_env({"TIER_CONFIG": ANCHOR_PROD_TIER_CONFIG})
    cfg = s.tier_config()
    assert cfg.default_chain == ("gold", "standard", "basic")
    assert cfg.tier("basic").max_concurrent == 3 and cfg.tier("basic").shared
    assert cfg.tier("gold").max_concurrent == 1
    assert s.tier_config_notes() == ()


def test_anchor_valid_tier_config_starts_with_one_note_per_difference() -> None:
    """Guards issue 15: each of these stopped the worker at start; the anchor ran them."""
    raw = (
        '{"tiers": {"gold": {"type": "exclusive", "target": 2, "max_concurrent": 4},'
        ' "basic": {"type": "shared", "target": 1, "max_concurent": 9}},'
        ' "default_chain": ["gold", "silver", "basic", "gold"], "comment": "prod"}'
    )
    s = Settings.from_env({"TIER_CONFIG": raw})
    cfg = s.tier_config()
    assert cfg.default_chain == ("gold", "basic")
    assert cfg.tier("gold").max_concurrent == 1
    assert cfg.tier("basic").max_concurrent == 5  # the typo'd key is ignored: the default
    notes = s.tier_config_notes()
    assert len(notes) == 5, notes
    joined = "\n".join(notes)
    for word in ("'comment'", "'max_concurent'", "max_concurrent 4 read as 1", "'silver'"):
        assert word in joined
    assert "repeats a tier" in joined


def test_chain_with_no_known_tier_is_built() -> None:
    cfg, notes = read_anchor_tier_config('{"tiers": {"b": 1, "a": 2}, "default_chain": ["x"]}')
    assert cfg.default_chain == ("a", "b")
    assert any("built from the tiers" in n for n in notes)


def test_operator_input_stays_strict() -> None:
    """``tierpool config set`` and the config stream still refuse a typo."""
    with pytest.raises(TierConfigError, match="max_concurent"):
        parse_tier_config('{"gold": {"target": 1, "max_concurent": 2}}')


def test_draining_ttl_zero_is_the_default_as_in_the_anchor() -> None:
    assert Settings.from_env({"DRAINING_TTL": "0"}).draining_ttl_s == 6 * 60
    assert Settings.from_env({"DRAINING_TTL": "0s"}).draining_ttl_s == 6 * 60
    assert Settings.from_env({"DRAINING_TTL": "2m"}).draining_ttl_s == 120


def test_every_anchor_variable_is_honoured_or_warned_about() -> None:
    """Each anchor variable is either a setting some command reads, or warned about."""
    known = set(env_variables())
    for var in ANCHOR_VARIABLES:
        if var.use == "none":
            assert var.instead, var.name
        else:
            assert var.name in known, f"{var.name} is said to be used but no setting reads it"
    assert sorted(v.name for v in ANCHOR_VARIABLES) == sorted(ANCHOR_ENV_NAMES)


def test_worker_warns_once_per_variable_it_does_not_use() -> None:
    env = dict(ANCHOR_PRODUCTION_ENV)
    warnings = unused_variable_warnings("worker", env)
    named = [w.split()[2] for w in warnings]
    assert named == sorted(set(named), key=named.index), "one warning per variable"
    assert set(named) == {
        "REDIS_POOL_SIZE",
        "REDIS_MIN_IDLE_CONN",
        "HTTP_PORT",
        "HTTP_READ_TIMEOUT",
        "HTTP_WRITE_TIMEOUT",
        "HTTP_IDLE_TIMEOUT",
        "HTTP_SHUTDOWN_TIMEOUT",
        "NAMESPACE",
        "POD_LABEL_SELECTOR",
        "CALL_INFO_TTL",
        "LEADER_ELECTION_ENABLED",
        "LEADER_ELECTION_NAMESPACE",
        "LEADER_ELECTION_LOCK_NAME",
        "LEADER_ELECTION_DURATION",
        "LEADER_ELECTION_RENEW_DEADLINE",
        "LEADER_ELECTION_RETRY_PERIOD",
    }
    by_name = dict(zip(named, warnings, strict=True))
    assert "`tierpool gateway`" in by_name["HTTP_PORT"]
    assert "TIERPOOL_NAMESPACE" in by_name["NAMESPACE"]
    assert "TIERPOOL_LEADER_LEASE" in by_name["LEADER_ELECTION_DURATION"]
    # With the Kubernetes pod source the worker's leader uses them: no warning.
    kube = unused_variable_warnings("worker", {**env, "POD_SOURCE": "kubernetes"})
    assert not any(" NAMESPACE " in w or "POD_LABEL_SELECTOR" in w for w in kube)
    # The gateway uses the HTTP ones and warns about the worker's.
    gateway = unused_variable_warnings("gateway", env)
    assert not any(w.split()[2].startswith("HTTP_") for w in gateway)
    assert any("LEASE_TTL" in w and "`tierpool worker`" in w for w in gateway)
    assert {w.split()[2] for w in gateway} == {
        "REDIS_POOL_SIZE", "REDIS_MIN_IDLE_CONN", "METRICS_PORT", "VOICE_AGENT_BASE_URL",
        "NAMESPACE", "POD_LABEL_SELECTOR", "POD_NAME", "CLEANUP_INTERVAL", "LEASE_TTL",
        "DRAINING_TTL", "RECONCILE_INTERVAL", "CALL_INFO_TTL", "TIER_CONFIG",
        "LEADER_ELECTION_ENABLED", "LEADER_ELECTION_NAMESPACE", "LEADER_ELECTION_LOCK_NAME",
        "LEADER_ELECTION_DURATION", "LEADER_ELECTION_RENEW_DEADLINE",
        "LEADER_ELECTION_RETRY_PERIOD",
    }  # fmt: skip
    # Unset or empty: no warning.
    assert unused_variable_warnings("worker", {"HTTP_PORT": "", "REDIS_URL": "redis://x"}) == []


# --- bootstrap from the anchor's key ----------------------------------------------------


async def test_bootstrap_adopts_the_anchor_config_key(
    r: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A namespace with no config starts from ``voice:tier:config``, as the anchor let it
    win over ``TIER_CONFIG``; tierpool's own config, once there, wins over both."""
    await r.set(
        ANCHOR_CONFIG_KEY,
        '{"tiers":{"gold":{"type":"exclusive","target":2,"max_concurrent":2},'
        '"basic":{"type":"shared","target":1,"max_concurrent":3}},'
        '"default_chain":["gold","basic","gone"]}',
    )
    settings = Settings(redis_url="redis://unused", namespace="m", tier_config_raw='{"x": 1}')
    cache = ConfigCache(r, Keys("m"), settings)
    with caplog.at_level(logging.WARNING):
        snap = await cache.refresh()
    assert snap.config.default_chain == ("gold", "basic")
    assert snap.config.tier("gold").target == 2 and snap.config.tier("gold").max_concurrent == 1
    assert snap.version == 1
    warned = [rec.getMessage() for rec in caplog.records]
    assert any("'gone'" in w for w in warned) and any("read as 1" in w for w in warned)
    assert await r.get(ANCHOR_CONFIG_KEY) is not None  # never written nor deleted

    # The anchor key changing later does not move tierpool's config.
    await r.set(ANCHOR_CONFIG_KEY, '{"other": 1}')
    again = await ConfigCache(r, Keys("m"), settings).refresh()
    assert again.config == snap.config


async def test_unreadable_anchor_key_falls_back_to_tier_config(r: Redis) -> None:
    await r.set(ANCHOR_CONFIG_KEY, "{not json")
    settings = Settings(redis_url="redis://unused", namespace="m2", tier_config_raw='{"x": 1}')
    snap = await ConfigCache(r, Keys("m2"), settings).refresh()
    assert snap.config.pools == ("x",)


async def test_no_anchor_key_bootstraps_tier_config(r: Redis) -> None:
    settings = Settings(redis_url="redis://unused", namespace="m3", tier_config_raw='{"y": 2}')
    snap = await ConfigCache(r, Keys("m3"), settings).refresh()
    assert snap.config.pools == ("y",)


# --- messages and replies ---------------------------------------------------------


def test_reseller_id_is_an_alias_of_merchant_id() -> None:
    """Guards issue 15: a smart-router producer's ``reseller_id`` was dropped as unknown."""
    base = {"request_id": "a1", "call_id": "c1"}
    msg = decode_request("allocate", {**base, "reseller_id": "acme"})
    assert isinstance(msg, AllocateRequest) and msg.merchant_id == "acme"
    same = decode_request("allocate", {**base, "reseller_id": "acme", "merchant_id": "acme"})
    assert isinstance(same, AllocateRequest) and same.merchant_id == "acme"
    empty = decode_request("allocate", {**base, "reseller_id": ""})
    assert isinstance(empty, AllocateRequest) and empty.merchant_id is None
    with pytest.raises(InvalidMessage, match="differ"):
        decode_request("allocate", {**base, "reseller_id": "acme", "merchant_id": "other"})


def test_exotel_default_template_is_kept() -> None:
    """The anchor's Exotel URLs end in ``/callback/template``; other providers'
    in ``/callback/order-confirmation``."""
    prefix, suffix = session_url_parts("wss://agents.example", "exotel", None, None)
    assert prefix + "p0" + suffix == (
        "wss://agents.example/ws/pod/p0/agent/voice/breeze-buddy/exotel/callback/template/v2"
    )
    assert session_url_parts("wss://b", "twilio", "v1", None)[1] == (
        "/agent/voice/breeze-buddy/twilio/callback/order-confirmation"
    )
    assert session_url_parts("wss://b", "exotel", None, "kyc")[1].endswith("/callback/kyc/v2")


async def test_release_reply_says_was_draining(r: Redis) -> None:
    ops = Ops(await make_state(r, {"gold": 2}))
    await ops.register("p0")
    await ops.register("p1")
    first = await ops.allocate("c1")
    second = await ops.allocate("c2")
    drained_pod = first.fields["pod_id"]
    assert (await ops.drain(drained_pod)).status == "drained"
    out = await ops.release("c1")
    assert (out.status, out.fields["was_draining"]) == ("released", "1")
    out = await ops.release("c2")
    assert (out.status, out.fields["was_draining"], out.fields["pod_id"]) == (
        "released",
        "0",
        second.fields["pod_id"],
    )
    reply = decode_reply({"request_id": "x", "status": "released", "was_draining": "1"})
    assert reply.was_draining is True


async def test_stale_retries_are_counted(redis_url: str, r: Redis) -> None:
    """Guards issue 15: ``tierpool_stale_retries_total`` existed but was never incremented."""
    ctx = WorkerContext.create(
        Settings(redis_url=redis_url, namespace="t", tier_config_raw='{"gold": 1}')
    )
    try:
        connect_metrics(ctx)
        await ctx.cache.refresh()
        # another worker changes the config; this one has not heard of it yet
        other = PoolState(r, KEYS, ctx.settings, RedisSource(r, KEYS))
        await other.source.refresh()
        applied = await other.apply(ConfigRequest(request_id="cfg", config='{"silver": 1}'))
        assert applied.status == "applied"
        before = metrics.REGISTRY.get_sample_value("tierpool_stale_retries_total") or 0.0
        out = await ctx.state.apply(AllocateRequest(request_id="a", call_id="c1"))
        assert out.status == "rejected"  # no pods, decided on the new config
        after = metrics.REGISTRY.get_sample_value("tierpool_stale_retries_total")
        assert after == before + 1
    finally:
        await ctx.redis.aclose()


# --- the whole switch: a real worker on the anchor's production environment --------------

ANCHOR_STORED_CONFIG = (
    '{"tiers":{"gold":{"type":"exclusive","target":1},'
    '"standard":{"type":"exclusive","target":1,"max_concurrent":2},'
    '"basic":{"type":"shared","target":1,"max_concurrent":3},'
    '"vip":{"type":"exclusive","target":1}},'
    '"default_chain":["gold","standard","basic"]}'
)
"""Anchor format, as an operator changed it at runtime (seed 003), with a merchant
tier (vip: exclusive, outside the chain) and one thing tierpool reads differently."""


def _sample_series(samples: Samples, names: set[str]) -> list[dict[str, str]]:
    """promtool input series for every scraped sample of ``names``, as one worker
    scraped by Prometheus (``job``, ``instance``) with the same value twice."""
    out = []
    for (name, labels), got in sorted(samples.items(), key=lambda kv: (kv[0][0], sorted(kv[0][1]))):
        if name not in names:
            continue
        ls = {**dict(labels), "job": "tierpool", "instance": "w0"}
        body = ",".join(f'{k}="{v}"' for k, v in sorted(ls.items()))
        out.append({"series": f"{name}{{{body}}}", "values": f"{got:g} {got:g}"})
    return out


def _expect(name: str, rows: list[tuple[dict[str, str], float]]) -> dict[str, object]:
    samples = []
    for labels, expected in rows:
        body = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        samples.append({"labels": f"{name}{{{body}}}", "value": expected})
    return {"expr": name, "eval_time": "1m", "exp_samples": samples}


async def test_worker_starts_on_the_anchor_production_environment(
    redis_url: str, r: Redis, tmp_path: Path
) -> None:
    """Issue 15, done when: a worker with smart-router's production configmap values
    and its config in ``voice:tier:config`` serves, warns once per variable it does not
    use, and the recording rules turn its metrics into the anchor's after traffic."""
    await r.set(ANCHOR_CONFIG_KEY, ANCHOR_STORED_CONFIG)
    env = {k: v for k, v in ANCHOR_PRODUCTION_ENV.items() if k not in ("REDIS_URL", "METRICS_PORT")}
    env["POD_TTL"] = "5m"  # tierpool's own: no heartbeats needed while the test runs
    with WorkerPool(redis_url, tmp_path, namespace="t", env=env) as pool:
        (worker,) = await pool.start(r)
        assert worker.worker_id is not None
        assert worker.worker_id.startswith(ANCHOR_PRODUCTION_ENV["POD_NAME"] + "-")
        port = worker.metrics_port

        # Probes at the anchor's paths.
        assert (await http.get("127.0.0.1", port, "/health"))[0] == 200
        assert (await http.get("127.0.0.1", port, "/ready"))[0] == 200

        # The anchor's stored config was adopted (TIER_CONFIG has no vip).
        stored = parse_tier_config(await r.get(KEYS.config) or "", strict=False)
        assert stored.pools == ("gold", "standard", "basic", "vip")
        assert stored.tier("standard").max_concurrent == 1

        # Four pods; the leader fills each pool to its target.
        pods: dict[str, str] = {}
        for i in range(4):
            await send(r, KEYS.pods_stream, {
                "event": "register", "request_id": f"reg{i}", "pod_id": f"pod{i}",
                "endpoint": f"http://10.0.0.{i}:8080",
            })  # fmt: skip
        for i in range(4):
            got = await reply(r, f"reg{i}")
            pods[f"pod{i}"] = got.get("pool", "")

        async def pools_filled() -> bool:
            assigned = await r.hgetall(KEYS.pod_pool)
            return sorted(assigned.values()) == ["basic", "gold", "standard", "vip"]

        await wait_for(pools_filled, timeout_s=30)
        by_pool = {v: k for k, v in (await r.hgetall(KEYS.pod_pool)).items()}
        cfg = await send(r, KEYS.request_stream("config"), {
            "request_id": "m1", "merchant_id": "acme", "merchant": '{"pool": "vip"}',
        })  # fmt: skip
        assert cfg and (await reply(r, "m1"))["status"] == "applied"

        async def allocate(rid: str, **extra: str) -> dict[str, str]:
            await send(r, KEYS.request_stream("allocate"), {
                "request_id": rid, "call_id": f"call-{rid}", **extra,
            })  # fmt: skip
            return await reply(r, rid)

        got = {
            "a1": await allocate("a1"),
            "a2": await allocate("a2", provider="exotel"),
            "a3": await allocate("a3"),
            "a4": await allocate("a4", reseller_id="acme"),
            "a5": await allocate("a5"),
            "a6": await allocate("a6"),
            "a7": await allocate("a7"),
        }
        placed = {rid: g.get("pool") for rid, g in got.items()}
        assert placed == {
            "a1": "gold", "a2": "standard", "a3": "basic", "a4": "vip",
            "a5": "basic", "a6": "basic", "a7": None,
        }  # fmt: skip
        assert got["a7"]["status"] == "rejected"
        assert got["a4"]["pod_id"] == by_pool["vip"]  # reseller_id reached acme's policy
        assert got["a2"]["session_url"] == (
            f"wss://clairvoyance.breezelabs.app/ws/pod/{by_pool['standard']}"
            "/agent/voice/breeze-buddy/exotel/callback/template/v2"
        )

        await send(
            r, KEYS.request_stream("drain"), {"request_id": "d1", "pod_id": by_pool["standard"]}
        )
        assert (await reply(r, "d1"))["status"] == "drained"
        released = {}
        for rid, call in (("r1", "call-a1"), ("r2", "call-a2"), ("r3", "call-a4")):
            await send(r, KEYS.request_stream("release"), {"request_id": rid, "call_id": call})
            released[rid] = await reply(r, rid)
        assert [released[k]["was_draining"] for k in ("r1", "r2", "r3")] == ["0", "1", "0"]

        # The leader's pool gauges catch up with the traffic.
        async def settled() -> bool:
            s = await scrape(port)
            return (
                s.get(("tierpool_active_calls", frozenset()), -1) == 3
                and s.get(
                    ("tierpool_pods", frozenset({("pool", "standard"), ("state", "draining")}))
                )
                == 1
            )

        await wait_for(settled, timeout_s=30)
        samples = await scrape(port)
        log = worker.log_text()

    # One warning per anchor variable the worker does not use, and per config difference.
    for name in (
        "REDIS_POOL_SIZE", "REDIS_MIN_IDLE_CONN", "HTTP_PORT", "HTTP_READ_TIMEOUT",
        "HTTP_WRITE_TIMEOUT", "HTTP_IDLE_TIMEOUT", "HTTP_SHUTDOWN_TIMEOUT", "NAMESPACE",
        "POD_LABEL_SELECTOR", "CALL_INFO_TTL", "LEADER_ELECTION_ENABLED",
        "LEADER_ELECTION_NAMESPACE", "LEADER_ELECTION_LOCK_NAME", "LEADER_ELECTION_DURATION",
        "LEADER_ELECTION_RENEW_DEADLINE", "LEADER_ELECTION_RETRY_PERIOD",
    ):  # fmt: skip
        assert log.count(f"smart-router variable {name} ") == 1, name
    assert log.count("smart-router variable ") == 16
    assert log.count("max_concurrent 2 read as 1") == 1
    assert "bootstrapped from smart-router's voice:tier:config" in log

    # Every counter was there from the start, and the per-pool ones count.
    assert ("tierpool_stale_retries_total", frozenset()) in samples
    assert ("tierpool_releases_total", frozenset({("pool", "basic")})) in samples
    assert value(samples, "tierpool_allocations_total", pool="basic", status="allocated") == 3

    # The recording rules, run by promtool on what the worker exported.
    rules = load_yaml(RULES.read_text())["groups"][0]["rules"]
    inputs = {n for rule in rules for n in re.findall(r"\btierpool_[a-z0-9_]+", rule["expr"])}
    w0 = {"job": "tierpool", "instance": "w0"}
    job = {"job": "tierpool"}
    tests = [
        _expect("smart_router_allocations_total", [
            ({**w0, "pool": "pool:gold", "status": "success"}, 1),
            ({**w0, "pool": "pool:standard", "status": "success"}, 1),
            ({**w0, "pool": "pool:basic", "status": "success"}, 3),
            ({**w0, "pool": "pool:vip", "status": "success"}, 1),
            ({**w0, "pool": "", "status": "no_pods"}, 1),
        ]),
        _expect("smart_router_releases_total", [
            ({**w0, "pool": f"pool:{p}", "status": "success"}, n)
            for p, n in (("gold", 1), ("standard", 1), ("basic", 0), ("vip", 1))
        ]),
        _expect("smart_router_active_calls", [(job, 3)]),
        _expect("smart_router_pool_available_pods", [
            ({**job, "tier": t}, n)
            for t, n in (("gold", 1), ("standard", 0), ("basic", 0), ("vip", 1))
        ]),
        _expect("smart_router_pool_assigned_pods", [
            ({**job, "tier": t}, 1) for t in ("gold", "standard", "basic", "vip")
        ]),
        _expect("smart_router_leader_status", [(w0, 1)]),
        _expect("smart_router_drains_total", [(w0, 1)]),
        _expect("smart_router_panics_recovered_total", [(w0, 0)]),
        _expect("smart_router_zombies_recovered_total", [(w0, 0)]),
    ]  # fmt: skip
    doc = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": _sample_series(samples, inputs),
                   "promql_expr_test": tests}],
    }  # fmt: skip
    (tmp_path / "scraped.test.yml").write_text(json.dumps(doc, indent=1))
    run_promtool("test", "rules", "scraped.test.yml", cwd=tmp_path)


def test_redis_retries_and_dial_timeout_reach_the_connection() -> None:
    """``REDIS_MAX_RETRIES`` and ``REDIS_DIAL_TIMEOUT`` keep the anchor's meaning."""
    settings = Settings.from_env(
        {"REDIS_URL": "redis://127.0.0.1:1", "REDIS_MAX_RETRIES": "7", "REDIS_DIAL_TIMEOUT": "2s"}
    )
    ctx = WorkerContext.create(settings)
    kwargs = ctx.redis.connection_pool.connection_kwargs
    assert kwargs["socket_connect_timeout"] == 2
    assert kwargs["retry"].get_retries() == 7
    assert (
        WorkerContext.create(Settings())
        .redis.connection_pool.connection_kwargs["retry"]
        .get_retries()
        == 3
    )
    # Every other component connects from Settings.redis_target too: the client
    # library (pod agent, pod-sim, gateway) and the CLI honour them the same way.
    from tierpool.client import TierpoolClient
    from tierpool.connect.redisconn import connect

    client = TierpoolClient.from_url(settings.redis_target, namespace="m")
    kwargs = client.redis.connection_pool.connection_kwargs
    assert kwargs["socket_connect_timeout"] == 2 and kwargs["retry"].get_retries() == 7
    cli = connect(settings.redis_target, client_name="tierpool-cli-status")
    kwargs = cli.connection_pool.connection_kwargs
    assert kwargs["socket_connect_timeout"] == 2 and kwargs["retry"].get_retries() == 7


# --- the migration guide ------------------------------------------------------------

GUIDE = ROOT / "docs" / "migrating-from-smart-router.md"


def _guide_rows() -> list[list[str]]:
    rows = []
    for line in GUIDE.read_text().splitlines():
        if not line.startswith("| ") or line.startswith("| smart-router |"):
            continue
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def test_guide_rows_are_backed() -> None:
    """Every row of the guide names tests that exist; a difference says why."""
    rows = _guide_rows()
    assert len(rows) > 50
    for row in rows:
        assert len(row) == 3, row
        refs = re.findall(r"(tests/[a-z_]+\.py)::([a-z0-9_]+)", row[2])
        assert refs, f"row without a test: {row[0]}"
        for path, name in refs:
            source = (ROOT / path).read_text()
            assert re.search(rf"^(async )?def {name}\(", source, re.M), f"{path}::{name} missing"
        if "**Differs**" in row[1]:
            assert re.search(r"\*\*Differs\*\*[^:]*: \S", row[1]), f"no reason given: {row[0]}"


def test_guide_covers_every_variable_metric_and_endpoint() -> None:
    text = GUIDE.read_text()
    first_cells = " ".join(row[0] for row in _guide_rows())
    for var in ANCHOR_VARIABLES:
        assert f"`{var.name}`" in first_cells, var.name
    for metric in (
        "smart_router_allocations_total", "smart_router_releases_total",
        "smart_router_active_calls", "smart_router_pool_available_pods",
        "smart_router_pool_assigned_pods", "smart_router_leader_status",
        "smart_router_panics_recovered_total", "smart_router_drains_total",
        "smart_router_zombies_recovered_total", "http_requests_total",
        "http_request_duration_seconds",
    ):  # fmt: skip
        assert f"`{metric}" in first_cells, metric
    for endpoint in (
        "/health", "/ready", "/api/v1/allocate", "/release", "/drain", "/api/v1/pod/{name}",
        "/status", "/twilio/allocate", "/plivo/allocate", "/exotel/allocate", "`voice:tier:config`",
    ):  # fmt: skip
        assert endpoint in first_cells, endpoint
    assert "Side by side on one Redis" in text


def test_worker_logs_each_tier_config_difference(caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings.from_env(
        {"TIER_CONFIG": '{"gold": {"type": "exclusive", "target": 1, "max_concurrent": 3}}'}
    )
    with caplog.at_level(logging.WARNING):
        warn_about_anchor_settings(settings, {"TIER_CONFIG": "x", "REDIS_POOL_SIZE": "10"})
    lines = [rec.getMessage() for rec in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("smart-router variable REDIS_POOL_SIZE ")
    assert lines[1].startswith("TIER_CONFIG: tier 'gold': max_concurrent 3 read as 1")
