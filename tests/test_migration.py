"""Drop-in migration from smart-router (issue 15): each row of
``docs/migrating-from-smart-router.md`` that tierpool honours is proven here."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import anyio
import orjson
import pytest
from redis.asyncio import Redis

from tests.statekit import KEYS, Ops, RedisSource, make_state
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
from tierpool.workers.worker import connect_metrics

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
        assert status == 200 and orjson.loads(body)["status"] == "ok"
        status, body = await http.get("127.0.0.1", port, "/ready")
        assert status == 503 and orjson.loads(body)["missing"] == ["config_loaded", "group_joined"]
        ctx.health.config_loaded = ctx.health.group_joined = True
        status, body = await http.get("127.0.0.1", port, "/ready")
        assert status == 200 and orjson.loads(body)["status"] == "ready"
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
    assert not any("HTTP_" in w for w in gateway)
    assert any("LEASE_TTL" in w and "`tierpool worker`" in w for w in gateway)
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
