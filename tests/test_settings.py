"""Settings: the anchor's defaults, our tunables, and a named failure for every bad value."""

from __future__ import annotations

import dataclasses

import pytest

from tierpool.core.errors import SettingsError
from tierpool.core.masking import mask_url
from tierpool.core.settings import (
    Settings,
    env_variables,
    unknown_tierpool_variables,
)
from tierpool.core.tierconfig import default_tier_config, parse_tier_config


def fails(env: dict[str, str]) -> SettingsError:
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env)
    return info.value


def test_defaults() -> None:
    s = Settings.from_env({})
    assert s == Settings()
    # The anchor's variables and defaults (contract).
    assert s.redis_url == "redis://localhost:6379"
    assert s.tier_config_raw == ""
    assert s.lease_ttl_s == 15 * 60
    assert s.draining_ttl_s == 6 * 60
    assert s.cleanup_interval_s == 30
    assert s.reconcile_interval_s == 60
    assert s.call_info_ttl_s == 3600
    assert s.metrics_port == 9090
    assert s.log_level == "info"
    assert s.log_format == "json"
    assert s.voice_agent_base_url == "wss://localhost:8081"
    assert s.namespace == "default"
    assert s.pod_ttl_s == 15
    assert s.reply_ttl_s == 60
    # The anchor's other variables, with its defaults (contract v1.1).
    assert (s.redis_max_retries, s.redis_dial_timeout_s, s.pod_name) == (3, 5, "")
    assert (s.http_port, s.http_read_timeout_s, s.http_write_timeout_s) == (8080, 5, 10)
    assert (s.http_idle_timeout_s, s.http_shutdown_timeout_s) == (60, 30)
    assert (s.kube_namespace, s.pod_label_selector) == ("default", "app=voice-agent")
    # Upstream config source.
    assert s.tier_config_url is None
    assert s.tier_config_ttl_s == 1800
    # Worker tunables.
    assert s.batch_size == 256
    assert s.block_ms == 1000
    assert s.claim_min_idle_ms == 15_000
    assert s.claim_interval_s == 5
    assert s.max_deliveries == 5
    assert s.leader_lease_ms == 2000
    assert s.leader_renew_s == 0.5
    assert s.config_resync_s == 30
    assert s.merchant_cache_ttl_s == 30
    assert s.stream_maxlen == 100_000
    assert s.events_maxlen == 100_000
    assert s.dead_maxlen == 10_000
    assert s.shutdown_grace_s == 10
    assert s.heartbeat_s == 5
    assert (s.pod_source, s.kube_namespace, s.pod_label_selector) == (
        "stream",
        "default",
        "app=voice-agent",
    )


def test_ms_properties_follow_their_seconds_field() -> None:
    s = Settings.from_env(
        {
            "LEASE_TTL": "1m30s",
            "REPLY_TTL": "1.5s",
            "POD_TTL": "20s",
            "DRAINING_TTL": "2m",
            "CALL_INFO_TTL": "2h",
        }
    )
    assert s.lease_ttl_ms == 90_000
    assert s.reply_ttl_ms == 1_500
    assert s.pod_ttl_ms == 20_000
    assert s.draining_ttl_ms == 120_000
    assert s.call_info_ttl_ms == 7_200_000


def test_every_variable_is_read() -> None:
    env = {
        "REDIS_URL": "rediss://user:pw@redis.internal:6380/2",
        "REDIS_SENTINELS": "s1:26379,s2:26379",
        "REDIS_SENTINEL_MASTER": "pool",
        "TIERPOOL_REDIS_CLUSTER": "yes",
        "TIER_CONFIG": '{"gold": 2}',
        "LEASE_TTL": "20m",
        "DRAINING_TTL": "5m",
        "CLEANUP_INTERVAL": "45",
        "RECONCILE_INTERVAL": "2m",
        "CALL_INFO_TTL": "2h",
        "METRICS_PORT": "9191",
        "METRICS_HOST": "127.0.0.1",
        "LOG_LEVEL": "DEBUG",
        "LOG_FORMAT": "Console",
        "VOICE_AGENT_BASE_URL": "wss://agents.example.com/",
        "REDIS_MAX_RETRIES": "-1",
        "REDIS_DIAL_TIMEOUT": "2s",
        "POD_NAME": "smart-router-7c9f-x2",
        "HTTP_PORT": "8181",
        "HTTP_READ_TIMEOUT": "3s",
        "HTTP_WRITE_TIMEOUT": "7s",
        "HTTP_IDLE_TIMEOUT": "2m",
        "HTTP_SHUTDOWN_TIMEOUT": "0",
        "TWILIO_AUTH_TOKEN": "tw-secret",
        "PLIVO_AUTH_TOKEN": "pl-secret",
        "EXOTEL_BASIC_AUTH": "exo:pw",
        "GATEWAY_PUBLIC_URL": "https://voice.example.com/router/",
        "GATEWAY_TRUSTED_PROXIES": "10.0.0.0/8, 127.0.0.1",
        "GATEWAY_ALLOW_FROM": "203.0.113.0/24",
        "GATEWAY_SOURCE_RATE": "2.5",
        "GATEWAY_SOURCE_BURST": "5",
        "GATEWAY_MERCHANT_RATE": "10",
        "GATEWAY_MERCHANT_BURST": "20",
        "GATEWAY_MAX_BODY_BYTES": "4096",
        "TIERPOOL_NAMESPACE": "eu-west:1",
        "POD_TTL": "30s",
        "REPLY_TTL": "2m",
        "TIER_CONFIG_URL": "https://config.example.com/tiers?token=abc",
        "TIER_CONFIG_TTL_SECONDS": "600",
        "TIERPOOL_BATCH_SIZE": "64",
        "TIERPOOL_BLOCK": "250ms",
        "TIERPOOL_CLAIM_MIN_IDLE": "30s",
        "TIERPOOL_CLAIM_INTERVAL": "10s",
        "TIERPOOL_MAX_DELIVERIES": "3",
        "TIERPOOL_LEADER_LEASE": "5s",
        "TIERPOOL_LEADER_RENEW": "1s",
        "TIERPOOL_CONFIG_RESYNC": "1m",
        "TIERPOOL_MERCHANT_CACHE_TTL": "10s",
        "TIERPOOL_STREAM_MAXLEN": "5000",
        "TIERPOOL_EVENTS_MAXLEN": "6000",
        "TIERPOOL_DEAD_MAXLEN": "700",
        "TIERPOOL_SHUTDOWN_GRACE": "0",
        "TIERPOOL_HEARTBEAT": "2s",
        "POD_SOURCE": "Kubernetes",
        "NAMESPACE": "voice",
        "POD_LABEL_SELECTOR": "app=voice-agent,track!=canary",
        "TIERPOOL_POD_ENDPOINT": "ws://{name}.agents.{namespace}.svc:{port}",
        "TIERPOOL_POD_PORT": "8081",
    }
    assert set(env) == set(env_variables()), "the test must set every variable"
    s = Settings.from_env(env)
    assert s.redis_url == "rediss://user:pw@redis.internal:6380/2"
    assert (s.redis_sentinels, s.redis_sentinel_master) == (("s1:26379", "s2:26379"), "pool")
    assert s.redis_cluster == "yes"
    assert s.tier_config() == parse_tier_config('{"gold": 2}')
    assert (s.lease_ttl_s, s.draining_ttl_s, s.cleanup_interval_s) == (1200, 300, 45)
    assert (s.reconcile_interval_s, s.call_info_ttl_s, s.metrics_port) == (120, 7200, 9191)
    assert (s.log_level, s.log_format) == ("debug", "console")
    assert s.metrics_host == "127.0.0.1"
    assert s.voice_agent_base_url == "wss://agents.example.com"  # trailing slash dropped
    assert (s.http_port, s.http_read_timeout_s, s.http_write_timeout_s) == (8181, 3, 7)
    assert (s.http_idle_timeout_s, s.http_shutdown_timeout_s) == (120, 0)
    assert (s.twilio_auth_token, s.plivo_auth_token, s.exotel_basic_auth) == (
        "tw-secret",
        "pl-secret",
        "exo:pw",
    )
    assert s.gateway_public_url == "https://voice.example.com/router"
    assert s.gateway_trusted_proxies == ("10.0.0.0/8", "127.0.0.1/32")
    assert s.gateway_allow_from == ("203.0.113.0/24",)
    assert (s.gateway_source_rate, s.gateway_source_burst) == (2.5, 5)
    assert (s.gateway_merchant_rate, s.gateway_merchant_burst) == (10, 20)
    assert s.gateway_max_body_bytes == 4096
    shown = s.describe()
    for name in ("TWILIO_AUTH_TOKEN", "PLIVO_AUTH_TOKEN", "EXOTEL_BASIC_AUTH"):
        assert shown[name] == "***"
    assert "secret" not in repr(shown) and "exo:pw" not in repr(shown)
    assert (s.redis_max_retries, s.redis_dial_timeout_s) == (0, 2)  # -1: go-redis's "none"
    assert s.pod_name == "smart-router-7c9f-x2"
    assert (s.namespace, s.pod_ttl_s, s.reply_ttl_s) == ("eu-west:1", 30, 120)
    assert s.tier_config_url == "https://config.example.com/tiers?token=abc"
    assert s.tier_config_ttl_s == 600
    assert (s.batch_size, s.block_ms, s.claim_min_idle_ms) == (64, 250, 30_000)
    assert (s.claim_interval_s, s.max_deliveries) == (10, 3)
    assert (s.leader_lease_ms, s.leader_renew_s) == (5_000, 1)
    assert (s.config_resync_s, s.merchant_cache_ttl_s) == (60, 10)
    assert (s.stream_maxlen, s.events_maxlen, s.dead_maxlen) == (5000, 6000, 700)
    assert (s.shutdown_grace_s, s.heartbeat_s) == (0, 2)
    assert (s.pod_source, s.kube_namespace) == ("kubernetes", "voice")
    assert s.pod_label_selector == "app=voice-agent,track!=canary"
    assert s.pod_endpoint_template == "ws://{name}.agents.{namespace}.svc:{port}"
    assert s.pod_port == 8081


def test_reads_os_environ_by_default(env_clean: pytest.MonkeyPatch) -> None:
    env_clean.setenv("TIERPOOL_BATCH_SIZE", "32")
    assert Settings.from_env().batch_size == 32


@pytest.mark.parametrize("value", ["", "   "])
def test_empty_variable_means_default(value: str) -> None:
    assert Settings.from_env({"LEASE_TTL": value, "METRICS_PORT": value}) == Settings()


@pytest.mark.parametrize("level", ["warn", "WARN", "warning", "Warning"])
def test_warn_is_warning(level: str) -> None:
    assert Settings.from_env({"LOG_LEVEL": level}).log_level == "warning"


def test_ms_fields_round_to_the_millisecond() -> None:
    assert Settings.from_env({"TIERPOOL_BLOCK": "1.4ms"}).block_ms == 1
    assert Settings.from_env({"TIERPOOL_BLOCK": "2"}).block_ms == 2000


def test_tier_config_default_is_the_builtin_one() -> None:
    assert Settings().tier_config() == default_tier_config()


# --- each bad value names its variable ------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        ("LEASE_TTL", "abc", "500ms, 30s, 15m or 1h30m"),
        ("LEASE_TTL", "0s", "must be longer than 0s"),
        ("DRAINING_TTL", "-6m", "must not be negative"),
        ("CLEANUP_INTERVAL", "30 seconds", "invalid duration"),
        ("RECONCILE_INTERVAL", "1.5", "whole number of seconds"),
        ("CALL_INFO_TTL", "0", "must be longer than 0s"),
        ("POD_TTL", "forever", "invalid duration"),
        ("REPLY_TTL", "0ms", "must be longer than 0s"),
        ("TIER_CONFIG_TTL_SECONDS", "-1", "must not be negative"),
        ("TIERPOOL_BLOCK", "0", "must be at least 1ms"),
        ("TIERPOOL_BLOCK", "100us", "must be at least 1ms"),
        ("TIERPOOL_CLAIM_MIN_IDLE", "soon", "invalid duration"),
        ("TIERPOOL_CLAIM_INTERVAL", "0s", "must be longer than 0s"),
        ("TIERPOOL_LEADER_LEASE", "x", "invalid duration"),
        ("TIERPOOL_LEADER_RENEW", "0", "must be longer than 0s"),
        ("TIERPOOL_CONFIG_RESYNC", "1d", "invalid duration"),
        ("TIERPOOL_MERCHANT_CACHE_TTL", "0", "must be longer than 0s"),
        ("TIERPOOL_SHUTDOWN_GRACE", "-1s", "must not be negative"),
        ("TIERPOOL_HEARTBEAT", "0", "must be longer than 0s"),
        ("POD_SOURCE", "k8s", "must be one of stream|kubernetes"),
        ("NAMESPACE", "Voice_Agents", "must be a Kubernetes namespace name"),
        ("POD_LABEL_SELECTOR", "app=a\nb", "must be a Kubernetes label selector"),
        ("TIERPOOL_POD_ENDPOINT", "http://pod:8080", "must name the pod by {ip} or {name}"),
        ("TIERPOOL_POD_ENDPOINT", "http://{ip}:{zone}", "may use only"),
        ("TIERPOOL_POD_PORT", "0", "must be from 1 to 65535"),
        ("METRICS_PORT", "0", "must be from 1 to 65535"),
        ("METRICS_PORT", "65536", "must be from 1 to 65535"),
        ("METRICS_PORT", ":9090", "must be a whole number"),
        ("TIERPOOL_BATCH_SIZE", "0", "must be from 1 to 10000"),
        ("TIERPOOL_BATCH_SIZE", "10001", "must be from 1 to 10000"),
        ("TIERPOOL_BATCH_SIZE", "1e3", "must be a whole number"),
        ("TIERPOOL_BATCH_SIZE", "1_000", "must be a whole number"),
        ("TIERPOOL_BATCH_SIZE", "-5", "must be a whole number"),
        ("TIERPOOL_MAX_DELIVERIES", "0", "must be from 1 to 1000"),
        ("TIERPOOL_STREAM_MAXLEN", "0", "must be from 1 to"),
        ("TIERPOOL_EVENTS_MAXLEN", "lots", "must be a whole number"),
        ("TIERPOOL_DEAD_MAXLEN", "0", "must be from 1 to"),
        ("LOG_LEVEL", "trace", "must be one of debug|info|warning|error|warn"),
        ("LOG_FORMAT", "text", "must be one of json|console"),
        ("TIERPOOL_NAMESPACE", "a{b}", "must be 1-64 chars of [A-Za-z0-9._:-]"),
        ("TIERPOOL_NAMESPACE", "x" * 65, "must be 1-64 chars"),
        ("REDIS_URL", "localhost:6379", "must be a URL starting with redis://"),
        ("REDIS_URL", "http://localhost", "must be a URL starting with redis://"),
        ("REDIS_URL", "redis://", "and a host"),
        ("REDIS_URL", "redis://h:port", "the port must be a number"),
        ("REDIS_URL", "redis://h/zero", "database number"),
        ("REDIS_URL", "unix://", "socket path"),
        ("VOICE_AGENT_BASE_URL", "localhost:8081", "must be a URL starting with ws://"),
        ("TIER_CONFIG_URL", "ftp://x/y", "must be a URL starting with http:// or https://"),
        ("TIER_CONFIG", "{bad", "not valid JSON"),
        ("TIER_CONFIG", '{"gold": -1}', "tier 'gold': target must be >= 0, got -1"),
        ("TIER_CONFIG", '{"g": {"type": "premium"}}', "unknown type 'premium'"),
        ("REDIS_MAX_RETRIES", "-2", "whole number"),
        ("REDIS_DIAL_TIMEOUT", "0", "longer than 0s"),
        ("POD_NAME", "a b", "chars of"),
    ],
)
def test_bad_value_names_its_variable(variable: str, value: str, problem: str) -> None:
    error = fails({variable: value})
    assert error.variable == variable
    assert problem in error.problem
    assert str(error).startswith(f"{variable}=")


def test_every_tier_config_problem_is_in_the_error() -> None:
    error = fails({"TIER_CONFIG": '{"gold": -1, "x": {"type": "premium"}}'})
    assert "tier 'gold'" in error.problem
    assert "tier 'x'" in error.problem


def test_errors_never_show_a_password() -> None:
    for variable, value in [
        ("REDIS_URL", "redis://:hunter2@host:nope"),
        ("REDIS_URL", "http://admin:hunter2@host"),
        ("TIER_CONFIG_URL", "ftp://user:hunter2@host/x"),
        ("TIER_CONFIG_URL", "https://host:bad/x?token=hunter2"),
    ]:
        error = fails({variable: value})
        assert error.variable == variable
        assert "hunter2" not in str(error)
        assert "***" in error.value


# --- cross-field rules ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "variable", "mentions"),
    [
        ({"TIERPOOL_LEADER_RENEW": "1.5s"}, "TIERPOOL_LEADER_RENEW", "TIERPOOL_LEADER_LEASE"),
        ({"TIERPOOL_LEADER_LEASE": "800ms"}, "TIERPOOL_LEADER_RENEW", "TIERPOOL_LEADER_LEASE"),
        ({"TIERPOOL_BLOCK": "15s"}, "TIERPOOL_CLAIM_MIN_IDLE", "TIERPOOL_BLOCK"),
        ({"TIERPOOL_CLAIM_MIN_IDLE": "500ms"}, "TIERPOOL_CLAIM_MIN_IDLE", "TIERPOOL_BLOCK"),
        ({"TIERPOOL_HEARTBEAT": "10s"}, "TIERPOOL_HEARTBEAT", "POD_TTL"),
        ({"POD_TTL": "9s"}, "TIERPOOL_HEARTBEAT", "POD_TTL"),
        ({"LEASE_TTL": "15s"}, "LEASE_TTL", "POD_TTL"),
        ({"TIERPOOL_STREAM_MAXLEN": "100"}, "TIERPOOL_STREAM_MAXLEN", "TIERPOOL_BATCH_SIZE"),
    ],
)
def test_cross_field_rules(env: dict[str, str], variable: str, mentions: str) -> None:
    error = fails(env)
    assert error.variable == variable
    assert mentions in error.problem


def test_cross_field_boundaries_are_allowed() -> None:
    s = Settings.from_env(
        {
            "TIERPOOL_LEADER_LEASE": "2s",
            "TIERPOOL_LEADER_RENEW": "1s",  # exactly half
            "TIERPOOL_BLOCK": "1s",
            "TIERPOOL_CLAIM_MIN_IDLE": "1001ms",
            "POD_TTL": "10s",
            "TIERPOOL_HEARTBEAT": "5s",  # exactly half
            "LEASE_TTL": "11s",
            "TIERPOOL_STREAM_MAXLEN": "256",  # exactly one batch
        }
    )
    assert s.leader_renew_s == 1


def test_constructor_checks_too() -> None:
    """Guards against a ``dataclasses.replace`` in code or tests building a broken value."""
    with pytest.raises(SettingsError) as info:
        dataclasses.replace(Settings(), block_ms=0)
    assert info.value.variable == "TIERPOOL_BLOCK"
    with pytest.raises(SettingsError) as info:
        Settings(log_level="loud")  # type: ignore[arg-type]
    assert info.value.variable == "LOG_LEVEL"
    with pytest.raises(SettingsError) as info:
        Settings(leader_renew_s=5)
    assert info.value.variable == "TIERPOOL_LEADER_RENEW"


def test_settings_are_immutable() -> None:
    s = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.batch_size = 5  # type: ignore[misc]


# --- describe and secrets ---------------------------------------------------------------


def test_describe_lists_every_variable_readably() -> None:
    shown = Settings().describe()
    assert list(shown) == list(env_variables())
    assert shown["LEASE_TTL"] == "15m"
    assert shown["TIERPOOL_BLOCK"] == "1s"
    assert shown["TIERPOOL_LEADER_RENEW"] == "500ms"
    assert shown["RECONCILE_INTERVAL"] == "1m"
    assert shown["TIER_CONFIG_TTL_SECONDS"] == "30m"
    assert shown["TIERPOOL_BATCH_SIZE"] == "256"
    assert shown["REDIS_URL"] == "redis://localhost:6379"
    assert shown["TIER_CONFIG_URL"] == ""
    assert all(isinstance(v, str) for v in shown.values())


def test_describe_never_prints_secrets() -> None:
    s = Settings.from_env(
        {
            "REDIS_URL": "redis://default:hunter2@redis:6379/0?password=hunter2&db=1",
            "TIER_CONFIG_URL": "https://cfg.example.com/t?api_key=hunter2&sig=hunter2",
        }
    )
    shown = s.describe()
    assert "hunter2" not in repr(shown)
    assert shown["REDIS_URL"] == "redis://***@redis:6379/0?password=***&db=1"
    assert shown["TIER_CONFIG_URL"] == "https://cfg.example.com/t?api_key=***&sig=***"
    assert s.redis_url.count("hunter2") == 2  # the value itself is intact


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://localhost:6379", "redis://localhost:6379"),
        ("redis://:pw@h:1/0", "redis://***@h:1/0"),
        ("redis://user:pw@h", "redis://***@h"),
        ("redis://pw@h", "redis://***@h"),  # a lone user info is often a misplaced password
        ("rediss://u:p@ss@h", "rediss://***@h"),
        ("unix:///tmp/redis.sock", "unix:///tmp/redis.sock"),
        ("unix://:pw@/tmp/redis.sock?db=2", "unix://***@/tmp/redis.sock?db=2"),
        ("https://h/p?db=2&token=t#frag", "https://h/p?db=2&token=***#***"),
    ],
)
def test_mask_url(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def test_unknown_tierpool_variables_are_reported_for_a_warning() -> None:
    env = {"TIERPOOL_BATCHSIZE": "64", "TIERPOOL_BLOCK": "1s", "PATH": "/bin", "LEASE_TTL": "1m"}
    assert unknown_tierpool_variables(env) == ["TIERPOOL_BATCHSIZE"]
    Settings.from_env(env)  # not an error
