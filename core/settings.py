"""Process settings, read once from the environment at start.

Every setting is one field of :class:`Settings`: its unit is in its name
(``lease_ttl_s``, ``block_ms``), its default is the field's default (defined
here and nowhere else), and the environment variable that sets it is in the
field's metadata. The anchor's variable names and defaults are kept
(``LEASE_TTL=15m``...) so an existing deployment's settings carry over; our
own knobs are prefixed ``TIERPOOL_``.

A bad value stops the process at start with a
:class:`~core.errors.SettingsError` naming the variable, rather than failing
an hour later in a loop that happens to use it. An empty variable counts as
unset (Kubernetes manifests often set ``VAR: ""`` to mean "default").

Units: a duration handed straight to a Redis command that takes
milliseconds (``BLOCK``, ``XAUTOCLAIM`` min-idle, ``SET PX``) is an ``int``
``_ms`` field; every other duration is a ``float`` ``_s`` field, with ``_ms``
properties for the TTLs the Lua scripts take as ``ARGV``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from tierpool.core.durations import format_duration, parse_duration_ns
from tierpool.core.errors import SettingsError, TierConfigError
from tierpool.core.keys import valid_namespace
from tierpool.core.masking import mask_url as mask_url  # re-exported for older imports
from tierpool.core.redistarget import RedisTarget
from tierpool.core.tierconfig import TierConfig, read_anchor_tier_config

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["json", "console"]
PodSourceName = Literal["stream", "kubernetes"]

_NS_PER_MS: Final = 1_000_000
_NS_PER_S: Final = 1_000_000_000
_DIGITS: Final = re.compile(r"[0-9]+")


def _url_problem(text: str, schemes: tuple[str, ...]) -> str | None:
    """Why ``text`` is not a usable URL with one of ``schemes``, or ``None``."""
    expected = f"must be a URL starting with {' or '.join(s + '://' for s in schemes)}"
    try:
        parts = urlsplit(text)
    except ValueError as exc:  # e.g. an unbalanced "[" in the host
        return f"{expected} ({exc})"
    if parts.scheme not in schemes:
        return expected
    try:
        parts.port  # noqa: B018  # raises on a port that is not a number or out of range
    except ValueError:
        return "the port must be a number from 0 to 65535"
    if parts.scheme == "unix":
        return None if parts.path else f"{expected} (unix:// needs a socket path)"
    if not parts.hostname:
        return f"{expected} and a host"
    if parts.scheme in ("redis", "rediss"):
        db = parts.path.lstrip("/")
        if db and not _DIGITS.fullmatch(db):
            return f"the path must be a database number such as /0, got {parts.path!r}"
    return None


@dataclass(frozen=True, slots=True)
class _Var:
    """How one field is read from the environment, checked and shown.

    ``parse`` turns the text into a value or raises ``ValueError`` with the
    problem; ``check`` returns a problem or ``None`` (it also runs on values
    given to the constructor directly); ``show`` renders a value for logs
    and ``redact`` the raw text for an error message: neither may reveal a
    secret.
    """

    env: str
    parse: Callable[[str], Any]
    check: Callable[[Any], str | None]
    show: Callable[[Any], str]
    redact: Callable[[str], str] = str


def _duration_s(
    env: str, *, allow_zero: bool = False, zero_means: float | None = None
) -> dict[str, _Var]:
    """A duration in seconds; ``zero_means`` reads a ``0`` from the environment as that value
    (the anchor read ``DRAINING_TTL=0`` as its default, so a deployment may carry it)."""

    def parse(text: str) -> float:
        seconds = parse_duration_ns(text) / _NS_PER_S
        return zero_means if zero_means is not None and seconds == 0 else seconds

    def check(value: float) -> str | None:
        if value < 0 or (value == 0 and not allow_zero):
            return "must be at least 0s" if allow_zero else "must be longer than 0s"
        return None

    return {"var": _Var(env, parse, check, format_duration)}


def _duration_ms(env: str) -> dict[str, _Var]:
    def parse(text: str) -> int:
        # Nearest millisecond: Redis has no finer unit for these commands.
        return (parse_duration_ns(text) + _NS_PER_MS // 2) // _NS_PER_MS

    def check(value: int) -> str | None:
        return None if value >= 1 else "must be at least 1ms"

    def show(value: int) -> str:
        return format_duration(value / 1000)

    return {"var": _Var(env, parse, check, show)}


def _integer(env: str, low: int, high: int) -> dict[str, _Var]:
    def parse(text: str) -> int:
        # int() would also take "1_000", " +5" and non-ASCII digits.
        if not _DIGITS.fullmatch(text):
            raise ValueError(f"must be a whole number from {low} to {high}")
        return int(text)

    def check(value: int) -> str | None:
        return None if low <= value <= high else f"must be from {low} to {high}"

    return {"var": _Var(env, parse, check, str)}


def _retries(env: str, high: int) -> dict[str, _Var]:
    """A retry count; ``-1`` is 0, as go-redis read it (the anchor's "no retries")."""
    whole = _integer(env, 0, high)["var"]

    def parse(text: str) -> int:
        return 0 if text == "-1" else int(whole.parse(text))

    return {"var": _Var(env, parse, whole.check, str)}


def _choice(env: str, choices: tuple[str, ...], aliases: Mapping[str, str]) -> dict[str, _Var]:
    spelled = "|".join((*choices, *aliases))

    def parse(text: str) -> str:
        value = text.lower()
        value = aliases.get(value, value)
        if value not in choices:
            raise ValueError(f"must be one of {spelled}")
        return value

    def check(value: str) -> str | None:
        return None if value in choices else f"must be one of {spelled}"

    return {"var": _Var(env, parse, check, str)}


def _url(
    env: str, schemes: tuple[str, ...], *, optional: bool = False, base: bool = False
) -> dict[str, _Var]:
    """A URL; ``base=True`` drops trailing slashes so ``base + "/path"`` has no ``//``."""

    def parse(text: str) -> str:
        problem = _url_problem(text, schemes)
        if problem:
            raise ValueError(problem)
        return text.rstrip("/") if base else text

    def check(value: str | None) -> str | None:
        if value is None:
            return None if optional else "must be set"
        return _url_problem(value, schemes)

    def show(value: str | None) -> str:
        return "" if value is None else mask_url(value)

    return {"var": _Var(env, parse, check, show, redact=mask_url)}


_HOST: Final = re.compile(r"[A-Za-z0-9.-]{1,253}|[0-9A-Fa-f:.]{2,45}")


def _host(env: str) -> dict[str, _Var]:
    """A host name or an IP address literal (IPv6 without brackets) to bind."""

    def check(value: str) -> str | None:
        if _HOST.fullmatch(value):
            return None
        return "must be a host name or an IP address such as 0.0.0.0, 127.0.0.1 or ::"

    def parse(text: str) -> str:
        problem = check(text)
        if problem:
            raise ValueError(problem)
        return text

    return {"var": _Var(env, parse, check, str)}


def _host_port_problem(item: str) -> str | None:
    host, colon, port = item.rpartition(":")
    if not colon or not host or not _DIGITS.fullmatch(port) or not 0 < int(port) < 65536:
        return f"{item!r} is not host:port"
    return None


def _host_ports(env: str) -> dict[str, _Var]:
    """A comma-separated ``host:port`` list (IPv6 as ``[::1]:26379``); empty means none."""

    def parse(text: str) -> tuple[str, ...]:
        items = tuple(part.strip() for part in text.split(",") if part.strip())
        problem = check(items)
        if problem:
            raise ValueError(problem)
        return items

    def check(value: tuple[str, ...]) -> str | None:
        for item in value:
            problem = _host_port_problem(item)
            if problem:
                return f"must be a comma-separated list of host:port ({problem})"
        return None

    return {"var": _Var(env, parse, check, ",".join)}


def _name(env: str) -> dict[str, _Var]:
    def check(value: str) -> str | None:
        return None if value and value.isprintable() and " " not in value else "must be a name"

    def parse(text: str) -> str:
        problem = check(text)
        if problem:
            raise ValueError(problem)
        return text

    return {"var": _Var(env, parse, check, str)}


def _secret(env: str) -> dict[str, _Var]:
    """A secret (an auth token, a password): never shown, in logs or in errors."""

    def show(value: str) -> str:
        return "***" if value else ""

    return {"var": _Var(env, str, lambda _value: None, show, redact=lambda _text: "***")}


def _basic_auth(env: str) -> dict[str, _Var]:
    """``user:password`` (a secret): both parts needed."""

    def check(value: str) -> str | None:
        if not value:
            return None
        user, colon, password = value.partition(":")
        return None if user and colon and password else "must be user:password"

    def parse(text: str) -> str:
        problem = check(text)
        if problem:
            raise ValueError(problem)
        return text

    def show(value: str) -> str:
        return "***" if value else ""

    return {"var": _Var(env, parse, check, show, redact=lambda _text: "***")}


def _networks(env: str) -> dict[str, _Var]:
    """A comma-separated list of addresses or CIDR blocks (``10.0.0.0/8, ::1``)."""

    def problem_of(items: tuple[str, ...]) -> str | None:
        for item in items:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                return f"{item!r} is not an IP address or CIDR block"
        return None

    def parse(text: str) -> tuple[str, ...]:
        items = tuple(x.strip() for x in text.split(",") if x.strip())
        problem = problem_of(items)
        if problem:
            raise ValueError(problem)
        return tuple(str(ipaddress.ip_network(x, strict=False)) for x in items)

    return {"var": _Var(env, parse, problem_of, ",".join)}


def _rate(env: str) -> dict[str, _Var]:
    """A non-negative number per second; 0 turns the limit off."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError("must be a number of requests per second (0: no limit)") from None
        return value

    def check(value: float) -> str | None:
        return None if 0 <= value < float("inf") else "must be 0 or more (0: no limit)"

    return {"var": _Var(env, parse, check, lambda v: f"{v:g}")}


def _namespace(env: str) -> dict[str, _Var]:
    def check(value: str) -> str | None:
        if valid_namespace(value):
            return None
        return "must be 1-64 chars of [A-Za-z0-9._:-] (it goes inside a Redis hash tag)"

    def parse(text: str) -> str:
        problem = check(text)
        if problem:
            raise ValueError(problem)
        return text

    return {"var": _Var(env, parse, check, str)}


def _text(env: str, check: Callable[[str], str | None]) -> dict[str, _Var]:
    """Free text that ``check`` accepts (``None``) or explains (the problem)."""

    def parse(text: str) -> str:
        problem = check(text)
        if problem:
            raise ValueError(problem)
        return text

    return {"var": _Var(env, parse, check, str)}


_POD_NAME: Final = re.compile(r"[A-Za-z0-9._-]{0,200}")


def _pod_name_problem(value: str) -> str | None:
    """It goes into the worker id: a consumer and client name, so no spaces."""
    return None if _POD_NAME.fullmatch(value) else "must be 1-200 chars of [A-Za-z0-9._-]"


_K8S_NAME: Final = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def _k8s_namespace_problem(value: str) -> str | None:
    if _K8S_NAME.fullmatch(value):
        return None
    return "must be a Kubernetes namespace name (1-63 chars of [a-z0-9-], alphanumeric ends)"


def _selector_problem(value: str) -> str | None:
    # The full grammar is checked where it is used (tierpool.kube.selector);
    # here only what no selector may hold.
    if not value.strip() or any(c in value for c in "\n\r\t"):
        return "must be a Kubernetes label selector such as app=voice-agent"
    return None


def _endpoint_template_problem(value: str) -> str | None:
    if "{ip}" not in value and "{name}" not in value:
        return "must name the pod by {ip} or {name}, e.g. http://{ip}:{port}"
    try:
        value.format(ip="10.0.0.1", port=8080, name="pod", namespace="ns")
    except (KeyError, IndexError, ValueError) as exc:
        return f"may use only {{ip}}, {{port}}, {{name}} and {{namespace}} ({exc!r})"
    return None


def _tier_config(env: str) -> dict[str, _Var]:
    def check(value: str) -> str | None:
        try:
            read_anchor_tier_config(value)
        except TierConfigError as exc:
            return "; ".join(exc.problems)
        return None

    def parse(text: str) -> str:
        problem = check(text)
        if problem:
            raise ValueError(problem)
        return text

    return {"var": _Var(env, parse, check, str)}


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything a tierpool process is configured with. Immutable; build with :meth:`from_env`.

    ``Settings()`` is the defaults; the constructor checks every field and
    the cross-field rules, so a ``dataclasses.replace`` in a test cannot
    build an inconsistent value either.
    """

    # --- the anchor's variables (contract) ---------------------------------
    redis_url: str = field(
        default="redis://localhost:6379",
        metadata=_url("REDIS_URL", ("redis", "rediss", "unix")),
    )
    redis_sentinels: tuple[str, ...] = field(default=(), metadata=_host_ports("REDIS_SENTINELS"))
    """Sentinels (``host:port``) to ask for the master; empty: ``REDIS_URL``'s host is Redis.

    With sentinels, ``REDIS_URL`` still gives the scheme (``rediss`` for
    TLS), credentials, database and TLS options; its host and port are not used.
    """
    redis_sentinel_master: str = field(default="mymaster", metadata=_name("REDIS_SENTINEL_MASTER"))
    redis_cluster: Literal["auto", "yes", "no"] = field(
        default="auto",
        metadata=_choice(
            "TIERPOOL_REDIS_CLUSTER",
            ("auto", "yes", "no"),
            {"true": "yes", "on": "yes", "1": "yes", "false": "no", "off": "no", "0": "no"},
        ),
    )
    """Redis Cluster: ``auto`` asks the server at the first connection (``HELLO``)."""
    tier_config_raw: str = field(default="", metadata=_tier_config("TIER_CONFIG"))
    """The env tier config as given; empty means the built-in default."""
    lease_ttl_s: float = field(default=15 * 60, metadata=_duration_s("LEASE_TTL"))
    draining_ttl_s: float = field(
        default=6 * 60, metadata=_duration_s("DRAINING_TTL", zero_means=6 * 60)
    )
    """``DRAINING_TTL=0`` is this default, as the anchor read it."""
    cleanup_interval_s: float = field(default=30, metadata=_duration_s("CLEANUP_INTERVAL"))
    reconcile_interval_s: float = field(default=60, metadata=_duration_s("RECONCILE_INTERVAL"))
    call_info_ttl_s: float = field(default=60 * 60, metadata=_duration_s("CALL_INFO_TTL"))
    metrics_port: int = field(default=9090, metadata=_integer("METRICS_PORT", 1, 65535))
    metrics_host: str = field(default="0.0.0.0", metadata=_host("METRICS_HOST"))
    """Address the metrics/health listener binds. All interfaces by default:
    probes and Prometheus reach a worker on its pod address (see ``workers/http.py``)."""
    log_level: LogLevel = field(
        default="info",
        metadata=_choice("LOG_LEVEL", ("debug", "info", "warning", "error"), {"warn": "warning"}),
    )
    log_format: LogFormat = field(
        default="json", metadata=_choice("LOG_FORMAT", ("json", "console"), {})
    )
    voice_agent_base_url: str = field(
        default="wss://localhost:8081",
        metadata=_url("VOICE_AGENT_BASE_URL", ("ws", "wss", "http", "https"), base=True),
    )
    """Base of every reply's ``session_url``."""
    redis_max_retries: int = field(default=3, metadata=_retries("REDIS_MAX_RETRIES", 100))
    """Retries of a command whose connection failed, before the caller sees the error."""
    redis_dial_timeout_s: float = field(default=5, metadata=_duration_s("REDIS_DIAL_TIMEOUT"))
    """How long opening a Redis connection may take."""
    pod_name: str = field(default="", metadata=_text("POD_NAME", _pod_name_problem))
    """Kubernetes' downward-API pod name: starts the worker id (the leader's identity,
    the consumer name) instead of the host name; empty means the host name."""

    # --- the anchor's HTTP server: ``tierpool gateway`` (contract v1.1) --------
    http_port: int = field(default=8080, metadata=_integer("HTTP_PORT", 1, 65535))
    """Where ``tierpool gateway`` serves the anchor's HTTP API (all interfaces)."""
    http_read_timeout_s: float = field(default=5, metadata=_duration_s("HTTP_READ_TIMEOUT"))
    """Gateway: how long a request's body may take to arrive."""
    http_write_timeout_s: float = field(default=10, metadata=_duration_s("HTTP_WRITE_TIMEOUT"))
    """Gateway: the whole answer must be written within this; the wait for a reply ends before."""
    http_idle_timeout_s: float = field(default=60, metadata=_duration_s("HTTP_IDLE_TIMEOUT"))
    """Gateway: a kept-alive connection with no request for this long is closed."""
    http_shutdown_timeout_s: float = field(
        default=30, metadata=_duration_s("HTTP_SHUTDOWN_TIMEOUT", allow_zero=True)
    )
    """Gateway: on SIGTERM, how long requests in flight may take to finish."""

    # --- the gateway on the internet (webhooks) ------------------------------
    twilio_auth_token: str = field(default="", metadata=_secret("TWILIO_AUTH_TOKEN"))
    """Gateway: when set, the Twilio webhook needs a valid ``X-Twilio-Signature``."""
    plivo_auth_token: str = field(default="", metadata=_secret("PLIVO_AUTH_TOKEN"))
    """Gateway: when set, the Plivo webhook needs a valid ``X-Plivo-Signature-V3``."""
    exotel_basic_auth: str = field(default="", metadata=_basic_auth("EXOTEL_BASIC_AUTH"))
    """Gateway: ``user:password`` the Exotel webhook must present (HTTP basic auth)."""
    gateway_public_url: str | None = field(
        default=None,
        metadata=_url("GATEWAY_PUBLIC_URL", ("http", "https"), optional=True, base=True),
    )
    """Gateway: scheme, host and prefix as providers call it: the URL they sign."""
    gateway_trusted_proxies: tuple[str, ...] = field(
        default=(), metadata=_networks("GATEWAY_TRUSTED_PROXIES")
    )
    """Gateway: peers whose ``X-Forwarded-For/-Proto/-Host`` headers are believed."""
    gateway_allow_from: tuple[str, ...] = field(
        default=(), metadata=_networks("GATEWAY_ALLOW_FROM")
    )
    """Gateway: when set, webhooks are served only to sources in these networks."""
    gateway_source_rate: float = field(default=20, metadata=_rate("GATEWAY_SOURCE_RATE"))
    """Gateway: webhook requests per second one source address may send (0: no limit)."""
    gateway_source_burst: int = field(
        default=40, metadata=_integer("GATEWAY_SOURCE_BURST", 1, 10**6)
    )
    gateway_merchant_rate: float = field(default=0, metadata=_rate("GATEWAY_MERCHANT_RATE"))
    """Gateway: webhook allocations per second for one merchant (0: no limit)."""
    gateway_merchant_burst: int = field(
        default=40, metadata=_integer("GATEWAY_MERCHANT_BURST", 1, 10**6)
    )
    gateway_max_body_bytes: int = field(
        default=16_384, metadata=_integer("GATEWAY_MAX_BODY_BYTES", 256, 1 << 20)
    )
    """Gateway: larger bodies are refused before anything parses them."""

    # --- new in the contract -------------------------------------------------
    namespace: str = field(default="default", metadata=_namespace("TIERPOOL_NAMESPACE"))
    pod_ttl_s: float = field(default=15, metadata=_duration_s("POD_TTL"))
    reply_ttl_s: float = field(default=60, metadata=_duration_s("REPLY_TTL"))

    # --- upstream tier config source ---------------------------------------
    tier_config_url: str | None = field(
        default=None, metadata=_url("TIER_CONFIG_URL", ("http", "https"), optional=True)
    )
    tier_config_ttl_s: float = field(
        default=30 * 60, metadata=_duration_s("TIER_CONFIG_TTL_SECONDS")
    )

    # --- worker tunables -----------------------------------------------------
    batch_size: int = field(default=256, metadata=_integer("TIERPOOL_BATCH_SIZE", 1, 10_000))
    """Entries read per XREADGROUP and run per pipelined round trip."""
    block_ms: int = field(default=1_000, metadata=_duration_ms("TIERPOOL_BLOCK"))
    """XREADGROUP BLOCK: how long a read waits for new entries."""
    claim_min_idle_ms: int = field(default=15_000, metadata=_duration_ms("TIERPOOL_CLAIM_MIN_IDLE"))
    """XAUTOCLAIM min-idle: an entry pending this long belongs to a dead consumer."""
    claim_interval_s: float = field(default=5, metadata=_duration_s("TIERPOOL_CLAIM_INTERVAL"))
    max_deliveries: int = field(default=5, metadata=_integer("TIERPOOL_MAX_DELIVERIES", 1, 1_000))
    """Deliveries after which an entry is dead-lettered instead of retried."""
    leader_lease_ms: int = field(default=2_000, metadata=_duration_ms("TIERPOOL_LEADER_LEASE"))
    leader_renew_s: float = field(default=0.5, metadata=_duration_s("TIERPOOL_LEADER_RENEW"))
    config_resync_s: float = field(default=30, metadata=_duration_s("TIERPOOL_CONFIG_RESYNC"))
    """Safety-net re-read of the config, in case a pub/sub notice was missed."""
    merchant_cache_ttl_s: float = field(
        default=30, metadata=_duration_s("TIERPOOL_MERCHANT_CACHE_TTL")
    )
    stream_maxlen: int = field(
        default=100_000, metadata=_integer("TIERPOOL_STREAM_MAXLEN", 1, 10**9)
    )
    """Approximate cap of each request stream (``MAXLEN ~``)."""
    events_maxlen: int = field(
        default=100_000, metadata=_integer("TIERPOOL_EVENTS_MAXLEN", 1, 10**9)
    )
    dead_maxlen: int = field(default=10_000, metadata=_integer("TIERPOOL_DEAD_MAXLEN", 1, 10**9))
    shutdown_grace_s: float = field(
        default=10, metadata=_duration_s("TIERPOOL_SHUTDOWN_GRACE", allow_zero=True)
    )
    """How long a stopping worker lets the batch in hand finish before cancelling it."""
    heartbeat_s: float = field(default=5, metadata=_duration_s("TIERPOOL_HEARTBEAT"))
    """Pod agent heartbeat interval."""

    # --- pod source (contract v1.1: POD_SOURCE=kubernetes) ---------------------
    pod_source: PodSourceName = field(
        default="stream", metadata=_choice("POD_SOURCE", ("stream", "kubernetes"), {})
    )
    """``stream``: pods announce themselves on ``tp:{NS}:pods`` only (agent,
    simulator, own XADDs). ``kubernetes``: the leader also watches pods."""
    kube_namespace: str = field(
        default="default", metadata=_text("NAMESPACE", _k8s_namespace_problem)
    )
    """The Kubernetes namespace whose pods are watched (the anchor's ``NAMESPACE``)."""
    pod_label_selector: str = field(
        default="app=voice-agent", metadata=_text("POD_LABEL_SELECTOR", _selector_problem)
    )
    pod_endpoint_template: str = field(
        default="http://{ip}:{port}",
        metadata=_text("TIERPOOL_POD_ENDPOINT", _endpoint_template_problem),
    )
    """A watched pod's ``endpoint``: ``{ip}``, ``{port}``, ``{name}``, ``{namespace}``."""
    pod_port: int = field(default=8080, metadata=_integer("TIERPOOL_POD_PORT", 1, 65535))
    """``{port}`` of the endpoint template, unless the pod's ``tierpool.io/port`` says otherwise."""

    def __post_init__(self) -> None:
        for f in fields(self):
            var: _Var = f.metadata["var"]
            value = getattr(self, f.name)
            problem = var.check(value)
            if problem:
                raise SettingsError(var.env, var.show(value), problem)
        self._check_together()

    def _check_together(self) -> None:
        """Rules between fields: each would otherwise fail later, quietly."""
        if self.leader_renew_s * 2 > self.leader_lease_ms / 1000:
            self._fail(
                "leader_renew_s",
                f"must be at most half of TIERPOOL_LEADER_LEASE "
                f"({format_duration(self.leader_lease_ms / 1000)}), so that one late "
                "renewal does not lose the leadership",
            )
        if self.claim_min_idle_ms <= self.block_ms:
            self._fail(
                "claim_min_idle_ms",
                f"must be longer than TIERPOOL_BLOCK ({format_duration(self.block_ms / 1000)}), "
                "or entries a live worker is still processing would be claimed from it",
            )
        if self.heartbeat_s * 2 > self.pod_ttl_s:
            self._fail(
                "heartbeat_s",
                f"must be at most half of POD_TTL ({format_duration(self.pod_ttl_s)}), "
                "so that one lost heartbeat does not declare a live pod gone",
            )
        if self.lease_ttl_s <= self.pod_ttl_s:
            self._fail(
                "lease_ttl_s",
                f"must be longer than POD_TTL ({format_duration(self.pod_ttl_s)}): heartbeats "
                "renew call leases, so a live pod's calls must outlast a missed heartbeat",
            )
        if self.stream_maxlen < self.batch_size:
            self._fail(
                "stream_maxlen",
                f"must be at least TIERPOOL_BATCH_SIZE ({self.batch_size}), or a request "
                "stream could be trimmed below one batch of unread entries",
            )

    def _fail(self, name: str, problem: str) -> None:
        var = _var(name)
        raise SettingsError(var.env, var.show(getattr(self, name)), problem)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        """Read every setting from ``env``; unset or empty variables keep their defaults.

        Raises :class:`~core.errors.SettingsError` naming the first bad
        variable (in field order). Values that may hold a password are
        masked in the error, since it goes to logs.
        """
        values: dict[str, Any] = {}
        for f in fields(cls):
            var: _Var = f.metadata["var"]
            raw = env.get(var.env)
            if raw is None or not raw.strip():
                continue
            text = raw.strip()
            try:
                value = var.parse(text)
            except ValueError as exc:
                raise SettingsError(var.env, var.redact(text), str(exc)) from None
            problem = var.check(value)
            if problem:
                raise SettingsError(var.env, var.redact(text), problem)
            values[f.name] = value
        return cls(**values)

    def describe(self) -> dict[str, str]:
        """Every setting by environment variable name, as text for the CLI and logs.

        Passwords in URLs are masked (``redis://***@host:6379``).
        """
        return {_var(f.name).env: _var(f.name).show(getattr(self, f.name)) for f in fields(self)}

    @property
    def redis_target(self) -> RedisTarget:
        """Where Redis is, and the anchor's retry and dial settings: what
        ``tierpool.connect.redisconn.connect`` takes, so every command that
        connects from its settings honours ``REDIS_MAX_RETRIES`` and
        ``REDIS_DIAL_TIMEOUT``."""
        return RedisTarget(
            self.redis_url,
            self.redis_sentinels,
            self.redis_sentinel_master,
            self.redis_cluster,
            retries=self.redis_max_retries,
            connect_timeout_s=self.redis_dial_timeout_s,
        )

    def tier_config(self) -> TierConfig:
        """The tier config ``TIER_CONFIG`` gives (the built-in default when empty), version 0.

        Only a starting point: the config in Redis, when present, wins.
        """
        return read_anchor_tier_config(self.tier_config_raw)[0]

    def tier_config_notes(self) -> tuple[str, ...]:
        """What tierpool reads differently in ``TIER_CONFIG`` than the anchor did (warnings)."""
        return read_anchor_tier_config(self.tier_config_raw)[1]

    # Lua scripts take milliseconds; derive them here rather than at every call.
    @property
    def lease_ttl_ms(self) -> int:
        return _to_ms(self.lease_ttl_s)

    @property
    def draining_ttl_ms(self) -> int:
        return _to_ms(self.draining_ttl_s)

    @property
    def call_info_ttl_ms(self) -> int:
        return _to_ms(self.call_info_ttl_s)

    @property
    def pod_ttl_ms(self) -> int:
        return _to_ms(self.pod_ttl_s)

    @property
    def reply_ttl_ms(self) -> int:
        return _to_ms(self.reply_ttl_s)


def env_variables() -> tuple[str, ...]:
    """Every environment variable :class:`Settings` reads, in field order."""
    return tuple(_var(f.name).env for f in fields(Settings))


def unknown_tierpool_variables(env: Mapping[str, str] = os.environ) -> list[str]:
    """``TIERPOOL_*`` variables in ``env`` that no setting reads: likely typos.

    Not an error (other tools may share the prefix), but worth a warning at
    start: ``TIERPOOL_BATCHSIZE=64`` would otherwise be ignored in silence.
    """
    known = set(env_variables())
    return sorted(name for name in env if name.startswith("TIERPOOL_") and name not in known)


def _to_ms(seconds: float) -> int:
    return round(seconds * 1000)


def _var(name: str) -> _Var:
    """The variable of the field ``name`` (a module-level lookup: slots leave no class dict)."""
    return _VARS[name]


_VARS: Final[dict[str, _Var]] = {f.name: f.metadata["var"] for f in fields(Settings)}
