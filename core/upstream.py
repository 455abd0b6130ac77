"""The upstream tier config source (``TIER_CONFIG_URL``), fetched by the leader.

The anchor's successor fetched the tier config from an HTTP service and
cached it for ``TIER_CONFIG_TTL_SECONDS`` (30 min). Here the leader fetches it
once per TTL and, when its content differs from the config in force, applies
it like any operator: a request on ``tp:{NS}:req:config`` with
``expected_version`` = the version it compared against. So an operator change
made in between wins (the request answers ``conflict``), and the upstream is
tried again next period. The fetch is never on a request's path.

The period is held in Redis (``upstream_lease``, ``SET NX PX``), not in the
process: a leadership change does not trigger a fetch, and a failed fetch is
retried after at most :data:`RETRY_AFTER_FAILURE_S`.

An unreachable upstream, a status other than 200 or a body that is not a
valid tier config (any of the three formats) changes nothing; the reason is
logged once per distinct problem. The URL is logged masked (it may carry a
token); credentials in it (``https://user:pass@host/...``) are sent as HTTP
basic authentication, never as part of the address.
"""

from __future__ import annotations

import base64
import http.client
import logging
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import anyio
from anyio.abc import TaskStatus
from redis.asyncio import Redis
from redis.exceptions import RedisError

from tierpool.core.errors import TierConfigError
from tierpool.core.keys import Keys
from tierpool.core.masking import mask_text, mask_url, split_userinfo
from tierpool.core.settings import Settings
from tierpool.core.snapshot import SnapshotSource
from tierpool.core.tierconfig import TierConfig, parse_tier_config, to_json
from tierpool.schemas import ConfigRequest, encode
from tierpool.schemas.fields import MAX_CONFIG_BYTES

log = logging.getLogger(__name__)

FETCH_TIMEOUT_S = 10.0
MAX_BODY_BYTES = MAX_CONFIG_BYTES
"""The largest upstream body read: what a config request may carry (README, Configuration)."""
RETRY_AFTER_FAILURE_S = 60.0
"""After a failed fetch, the next one comes after this (or the TTL, if shorter)."""
REPLY_TIMEOUT_S = 10.0
"""How long to wait for the config request's reply before logging it as sent."""
LEADER_POLL_S = 1.0

Fetch = Callable[[str, float], Awaitable[tuple[int, bytes]]]
"""``fetch(url, timeout_s) -> (HTTP status, body)``; raises OSError (or
``http.client.HTTPException``) when the upstream cannot be read."""

Outcome = Literal[
    "applied",
    "conflict",
    "rejected",
    "sent",
    "unchanged",
    "unreachable",
    "bad_status",
    "invalid",
    "not_leader",
]
FAILED: frozenset[Outcome] = frozenset({"unreachable", "bad_status", "invalid"})


@dataclass(frozen=True, slots=True)
class UpstreamCheck:
    """What one check of the upstream did.

    ``applied`` / ``conflict`` / ``rejected`` are the config request's reply;
    ``sent`` means no reply came in time (the request stays queued);
    ``unchanged`` means the upstream matches the config in force.
    """

    outcome: Outcome
    detail: str = ""
    request_id: str | None = None
    config_version: int | None = None


async def default_fetch(url: str, timeout_s: float) -> tuple[int, bytes]:
    """GET ``url`` with the standard library in a worker thread (no new dependency)."""
    return await anyio.to_thread.run_sync(_get, url, timeout_s, abandon_on_cancel=True)


def _get(url: str, timeout_s: float) -> tuple[int, bytes]:
    # urllib does not take credentials from the URL: it would read
    # "user:pass@host" as host "user" with port "pass@host" and quote the
    # password in its error. They go in an Authorization header instead.
    bare, user, password = split_userinfo(url)
    headers = {"Accept": "application/json", "User-Agent": "tierpool"}
    if user is not None or password is not None:
        token = base64.b64encode(f"{user or ''}:{password or ''}".encode()).decode("ascii")
        headers["Authorization"] = f"Basic {token}"
    request = urllib.request.Request(bare, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return int(response.status), response.read(MAX_BODY_BYTES + 1)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, b""


def same_content(a: TierConfig, b: TierConfig) -> bool:
    """Whether two configs describe the same pools, whatever their versions."""
    return to_json(a.with_version(0)) == to_json(b.with_version(0))


async def check_upstream(
    redis: Redis,
    keys: Keys,
    settings: Settings,
    cache: SnapshotSource,
    *,
    fetch: Fetch = default_fetch,
    is_leader: Callable[[], bool] = lambda: True,
    reply_timeout_s: float = REPLY_TIMEOUT_S,
) -> UpstreamCheck:
    """Fetch the upstream once and, if it differs from the config in force, request it.

    Raises only Redis errors; every upstream problem is an outcome.
    """
    url = settings.tier_config_url
    if url is None:
        raise ValueError("TIER_CONFIG_URL is not set")
    try:
        status, body = await fetch(url, FETCH_TIMEOUT_S)
    except (OSError, http.client.HTTPException) as exc:  # refused, timed out, cut short
        return UpstreamCheck("unreachable", mask_text(f"{type(exc).__name__}: {exc}"))
    if status != 200:
        return UpstreamCheck("bad_status", f"HTTP status {status}")
    if len(body) > MAX_BODY_BYTES:
        return UpstreamCheck("invalid", f"body larger than {MAX_BODY_BYTES} bytes")
    try:
        new = parse_tier_config(body, empty_is_default=False)
    except TierConfigError as exc:
        return UpstreamCheck("invalid", str(exc))

    try:
        snap = await cache.refresh()  # compare with what Redis holds now, not a cached view
    except (TierConfigError, ValueError):  # a stored config that does not parse
        snap = cache.current()  # the version guard answers conflict if it is not current
    if same_content(new, snap.config):
        return UpstreamCheck("unchanged", config_version=snap.version)
    if not is_leader():
        return UpstreamCheck("not_leader", "leadership lost during the fetch")

    text = to_json(new.with_version(0))
    if len(text.encode()) > MAX_CONFIG_BYTES:  # the config stream would refuse it
        return UpstreamCheck(
            "invalid", f"config larger than {MAX_CONFIG_BYTES} bytes once written canonically"
        )
    request_id = f"upstream-{await redis.incr(keys.upstream_seq)}"
    message = ConfigRequest(request_id=request_id, config=text, expected_version=snap.version)
    await redis.xadd(
        keys.request_stream("config"),
        encode(message),  # type: ignore[arg-type]
        maxlen=settings.stream_maxlen,
        approximate=True,
    )
    return await _await_reply(redis, keys, request_id, reply_timeout_s)


async def _await_reply(
    redis: Redis, keys: Keys, request_id: str, timeout_s: float
) -> UpstreamCheck:
    """Read the request's one reply entry, then delete it (as a client does)."""
    reply_key = keys.reply(request_id)
    found: Any = await redis.xread({reply_key: "0-0"}, count=1, block=max(1, int(timeout_s * 1000)))
    if not found:
        return UpstreamCheck("sent", f"no reply within {timeout_s:g}s", request_id)
    await redis.delete(reply_key)
    entries = found[reply_key] if isinstance(found, dict) else found[0][1]  # RESP3 / RESP2
    fields: dict[str, str] = dict(entries[0][1])
    status = fields.get("status", "")
    version = fields.get("config_version")
    outcome: Outcome = (
        "applied" if status == "applied" else "conflict" if status == "conflict" else "rejected"
    )
    detail = fields.get("error", "") if outcome != "applied" else ""
    if outcome == "rejected":
        detail = f"{status}: {detail}"
    return UpstreamCheck(
        outcome, detail, request_id, int(version) if version and version.isdigit() else None
    )


async def run_upstream(
    redis: Redis,
    keys: Keys,
    settings: Settings,
    cache: SnapshotSource,
    is_leader: Callable[[], bool],
    *,
    fetch: Fetch = default_fetch,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """While ``is_leader()``, check the upstream once per ``tier_config_ttl_s``.

    Returns at once when ``TIER_CONFIG_URL`` is not set. Survives Redis and
    upstream failures (logged once per distinct problem); exits on
    cancellation.
    """
    task_status.started()
    url = settings.tier_config_url
    if url is None:
        return
    ttl_ms = max(1, round(settings.tier_config_ttl_s * 1000))
    retry_ms = max(1, round(min(RETRY_AFTER_FAILURE_S, settings.tier_config_ttl_s) * 1000))
    poll_s = min(LEADER_POLL_S, settings.tier_config_ttl_s)
    last_problem: str | None = None
    while True:
        if is_leader():
            ran, problem = await _period(
                redis, keys, settings, cache, is_leader, fetch, ttl_ms, retry_ms
            )
            if ran:
                if problem is not None and problem != last_problem:
                    log.warning(
                        "upstream tier config %s not applied, keeping the current config: %s",
                        mask_url(url),
                        problem,
                    )
                last_problem = problem
        await anyio.sleep(poll_s)


async def _period(
    redis: Redis,
    keys: Keys,
    settings: Settings,
    cache: SnapshotSource,
    is_leader: Callable[[], bool],
    fetch: Fetch,
    ttl_ms: int,
    retry_ms: int,
) -> tuple[bool, str | None]:
    """One check when the period is due: (whether it ran, the problem if it failed)."""
    assert settings.tier_config_url is not None
    try:
        if not await redis.set(keys.upstream_lease, "1", nx=True, px=ttl_ms):
            return False, None
        result = await check_upstream(
            redis, keys, settings, cache, fetch=fetch, is_leader=is_leader
        )
        if result.outcome == "not_leader":
            await redis.delete(keys.upstream_lease)  # the next leader checks at once
        elif result.outcome in FAILED:
            await redis.pexpire(keys.upstream_lease, retry_ms)
            return True, f"{result.outcome}: {result.detail}"
        _log_result(settings.tier_config_url, result)
        return True, None
    except (RedisError, OSError) as exc:
        return True, f"Redis: {type(exc).__name__}: {exc}"


def _log_result(url: str, result: UpstreamCheck) -> None:
    where = mask_url(url)
    if result.outcome == "applied":
        log.info(
            "upstream tier config %s applied as version %s (%s)",
            where,
            result.config_version,
            result.request_id,
        )
    elif result.outcome == "unchanged":
        log.debug("upstream tier config %s unchanged (version %s)", where, result.config_version)
    else:
        log.warning(
            "upstream tier config %s: %s %s (%s); trying again next period",
            where,
            result.outcome,
            result.detail,
            result.request_id,
        )
