"""The tierpool client library: one method per request, each awaiting its reply.

Applications (and the pod agent, the CLI, the benchmark) talk to tierpool
through :class:`TierpoolClient`. Each method builds the contract's message,
checks it against the contract before sending (a bad call id fails here, not
one round trip later as an ``invalid`` reply), and hands it to
:class:`tierpool.client.mux.Mux`, which sends and awaits every concurrent request over
two shared connections.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from functools import partial
from types import TracebackType
from typing import Any, Literal, Self

import msgspec
from redis.asyncio import Redis

from tierpool.client.mux import Mux, MuxStats
from tierpool.connect.redisconn import connect
from tierpool.core.clock import now_ms
from tierpool.core.errors import ClientClosed, InvalidMessage, ReplyMismatch, RequestNotSent
from tierpool.core.keys import Keys
from tierpool.core.redistarget import RedisTarget
from tierpool.schemas import (
    AllocateRequest,
    ConfigRequest,
    DrainRequest,
    MerchantPolicy,
    PodDeregister,
    PodHeartbeat,
    PodRegister,
    ReleaseRequest,
    Reply,
    Request,
    RequestKind,
    decode_pod_event,
    decode_request,
    encode,
)

__all__ = [
    "ClientClosed",
    "ReplyMismatch",
    "RequestNotSent",
    "StreamKind",
    "TierpoolClient",
    "new_request_id",
]

StreamKind = RequestKind | Literal["pods"]
PodEventMsg = PodRegister | PodHeartbeat | PodDeregister


def new_request_id() -> str:
    """A fresh request id: 32 hex digits (uuid4), valid for the contract's charset."""
    return uuid.uuid4().hex


class TierpoolClient:
    """An asyncio client of one tierpool namespace.

    Use it as an async context manager (``async with TierpoolClient(...) as c``),
    entered once: its reply reader and request writer run in a task group
    that lives as long as the block. Share one client
    between all the tasks of a process: concurrent requests are batched over
    two connections of its own (``redis`` only lends its settings).

    Every request method returns the decoded :class:`~schemas.Reply`, whatever
    its ``status`` (``rejected``, ``not_found`` and ``conflict`` are answers,
    not errors), and raises:

    - :class:`~core.errors.InvalidMessage` before sending, when the message
      breaks the contract (a call id with a space, a capability of 9...);
    - :class:`~core.errors.RequestTimeout` when no reply came within
      ``timeout_s`` (default ``default_timeout_s``). The request may still
      have happened: allocate is idempotent per ``call_id``, so retrying it
      with a new request id is safe. Its subclass :class:`RequestNotSent`
      says the request was still queued, so it certainly did not happen;
    - :class:`~core.errors.RedisUnavailable` when Redis refused the ``XADD``;
    - :class:`ClientClosed` when the client closes while the request waits.

    ``block_ms`` bounds one blocking read of the replies; ``unblock`` lets a
    newly awaited reply interrupt it (``CLIENT UNBLOCK``); with
    ``unblock=False``, keep ``block_ms`` small. ``delete_replies=False``
    leaves each reply stream to its TTL (audits and tests count replies so).

    ``allocate_deadline``: an allocate sent without ``deadline_ms`` gets one
    at the end of its timeout (in Redis's clock, measured with ``TIME``). An
    allocation the caller stopped waiting for then never happens later: the
    crash test caught a timed-out allocate, claimed after its retry had been
    answered and released, placing the released call again and holding a pod
    nobody used until the lease expired.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        namespace: str = "default",
        default_timeout_s: float = 5.0,
        block_ms: int = 1_000,
        unblock: bool = True,
        delete_replies: bool = True,
        client_name: str = "tierpool-client",
        allocate_deadline: bool = True,
    ) -> None:
        self.redis = redis
        self.allocate_deadline = allocate_deadline
        self.keys = Keys(namespace)
        self.default_timeout_s = default_timeout_s
        self.mux = Mux(
            redis,
            block_ms=block_ms,
            unblock=unblock,
            delete_replies=delete_replies,
            client_name=client_name,
        )
        self._owns_redis = False

    @classmethod
    def from_url(
        cls, url: str | RedisTarget, *, namespace: str = "default", **kwargs: Any
    ) -> TierpoolClient:
        """A client with its own Redis settings from ``url``; leaving ``async with`` closes them.

        ``url`` may be a :class:`~tierpool.connect.redisconn.RedisTarget`
        (``Settings.from_env().redis_target``) to reach Redis through Sentinels.
        """
        redis = connect(url, client_name="tierpool-client", namespace=namespace)
        client = cls(redis, namespace=namespace, **kwargs)
        client._owns_redis = True
        return client

    @property
    def stats(self) -> MuxStats:
        """Batches, reads, unblocks and reconnects so far (tests, benchmarks)."""
        return self.mux.stats

    # --- lifecycle ---------------------------------------------------------------
    # Only ``async with client:``: the reader and writer run in a task group
    # that must be entered and left by the same task, which a context manager
    # guarantees and separate start/close calls did not.
    async def __aenter__(self) -> Self:
        """Start the reply reader and the request writer."""
        try:
            await self.mux.__aenter__()
        except BaseException:
            await self._close_redis()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the reader and writer, fail requests still waiting (ClientClosed),
        and close what the client opened."""
        try:
            await self.mux.__aexit__(exc_type, exc, tb)
        finally:
            await self._close_redis()

    async def _close_redis(self) -> None:
        if self._owns_redis:
            self._owns_redis = False
            await self.redis.aclose()

    # --- requests ------------------------------------------------------------------
    async def allocate(
        self,
        call_id: str,
        *,
        merchant_id: str | None = None,
        chain: Sequence[str] | None = None,
        zone: Literal["restricted", "any"] = "any",
        min_capability: int | None = None,
        tier_mode: Literal["strict", "flexible"] = "strict",
        provider: str | None = None,
        flow: str | None = None,
        template: str | None = None,
        deadline_ms: int | None = None,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> Reply:
        """Place ``call_id`` on a pod: ``allocated`` (with ``pod_id``, ``session_url``...)
        or ``rejected`` (with ``reasons``). Asking again for a placed call
        returns the same pod with ``existing=True``. Without ``deadline_ms``
        it expires when the caller stops waiting (see ``allocate_deadline``)."""
        if deadline_ms is None and self.allocate_deadline:
            deadline_ms = self.deadline_ms(self._timeout(timeout_s))
        msg = AllocateRequest(
            request_id=request_id or new_request_id(),
            deadline_ms=deadline_ms,
            call_id=call_id,
            merchant_id=merchant_id,
            chain=None if chain is None else tuple(chain),
            zone=zone,
            min_capability=min_capability,
            tier_mode=tier_mode,
            provider=provider,
            flow=flow,
            template=template,
        )
        return await self.request("allocate", msg, timeout_s)

    async def release(
        self,
        call_id: str,
        *,
        reason: str | None = None,
        deadline_ms: int | None = None,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> Reply:
        """Free the capacity ``call_id`` holds: ``released`` or ``not_found``."""
        msg = ReleaseRequest(
            request_id=request_id or new_request_id(),
            deadline_ms=deadline_ms,
            call_id=call_id,
            reason=reason,
        )
        return await self.request("release", msg, timeout_s)

    async def drain(
        self,
        pod_id: str,
        *,
        reason: str | None = None,
        deadline_ms: int | None = None,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> Reply:
        """Give ``pod_id`` no new calls (its live ones go on): ``drained`` or ``not_found``."""
        msg = DrainRequest(
            request_id=request_id or new_request_id(),
            deadline_ms=deadline_ms,
            pod_id=pod_id,
            action="drain",
            reason=reason,
        )
        return await self.request("drain", msg, timeout_s)

    async def undrain(
        self,
        pod_id: str,
        *,
        reason: str | None = None,
        deadline_ms: int | None = None,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> Reply:
        """Return a drained pod to service: ``undrained`` or ``not_found``."""
        msg = DrainRequest(
            request_id=request_id or new_request_id(),
            deadline_ms=deadline_ms,
            pod_id=pod_id,
            action="undrain",
            reason=reason,
        )
        return await self.request("drain", msg, timeout_s)

    async def change_config(
        self,
        config: str | Mapping[str, Any],
        *,
        expected_version: int | None = None,
        deadline_ms: int | None = None,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> Reply:
        """Replace the tier config (text or a mapping, any of the three formats):
        ``applied`` with the new ``config_version``, ``conflict`` when
        ``expected_version`` is not the current one, ``invalid`` with ``error``."""
        text = config if isinstance(config, str) else msgspec.json.encode(dict(config)).decode()
        msg = ConfigRequest(
            request_id=request_id or new_request_id(),
            deadline_ms=deadline_ms,
            config=text,
            expected_version=expected_version,
        )
        return await self.request("config", msg, timeout_s)

    async def set_merchant(
        self,
        merchant_id: str,
        policy: MerchantPolicy | Mapping[str, Any] | None,
        *,
        deadline_ms: int | None = None,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> Reply:
        """Set a merchant's policy (``pool``, ``fallback``, ``zone``,
        ``min_capability``), or remove it with ``policy=None``. Unknown keys
        are refused before sending, so no secret pasted in reaches Redis."""
        if policy is not None and not isinstance(policy, MerchantPolicy):
            try:
                policy = msgspec.convert(dict(policy), MerchantPolicy)
            except msgspec.ValidationError as exc:
                raise InvalidMessage(f"merchant: {exc}") from None
        msg = ConfigRequest(
            request_id=request_id or new_request_id(),
            deadline_ms=deadline_ms,
            merchant_id=merchant_id,
            merchant=policy,
            remove_merchant=policy is None,
        )
        return await self.request("config", msg, timeout_s)

    async def send_pod_event(
        self, event: PodEventMsg, *, wait: bool = True, timeout_s: float | None = None
    ) -> Reply | None:
        """Send a pod lifecycle event (what :class:`tierpool.client.PodAgent` does).

        With ``wait`` (the default) the event gets a request id when it has
        none, and its reply is returned: ``registered`` (with ``pool``),
        ``alive``, ``unknown_pod`` (register again) or ``deregistered``.
        Without, it returns None once the event is in the stream.
        """
        if wait:
            if event.request_id is None:
                event = msgspec.structs.replace(event, request_id=new_request_id())
            return await self.request("pods", event, timeout_s)
        fields = encode(event)
        _validate("pods", fields)
        await self.mux.submit(
            event.request_id or "-", self.keys.pods_stream, fields, None, self._timeout(timeout_s)
        )
        return None

    async def request(
        self, kind: StreamKind, msg: Request | PodEventMsg, timeout_s: float | None = None
    ) -> Reply:
        """The generic path: validate ``msg``, XADD it to the ``kind`` stream
        (``pods`` for pod events), await its reply."""
        if msg.request_id is None:
            raise InvalidMessage("request_id: required to wait for a reply")
        fields = encode(msg)
        _validate(kind, fields)
        stream = self.keys.pods_stream if kind == "pods" else self.keys.request_stream(kind)
        reply = await self.mux.submit(
            msg.request_id,
            stream,
            fields,
            self.keys.reply(msg.request_id),
            self._timeout(timeout_s),
            partial(_reply_problem, kind, msg),
        )
        assert reply is not None
        return reply

    def deadline_ms(self, within_s: float) -> int:
        """A ``deadline_ms`` ``within_s`` from now, in Redis's clock."""
        return now_ms() + self.mux.clock_offset_ms + math.ceil(within_s * 1000)

    def _timeout(self, timeout_s: float | None) -> float:
        return self.default_timeout_s if timeout_s is None else timeout_s


def _reply_problem(kind: StreamKind, msg: Request | PodEventMsg, reply: Reply) -> str | None:
    """What makes ``reply`` not the answer to ``msg``, or None (contract v1.1:
    every reply carries ``kind`` and echoes the request's ``call_id`` / ``pod_id``).

    A reused request id makes a request read another one's reply; a producer
    with write access to reply keys could forge one. Either way the caller
    must not act on it (e.g. send a call to a pod it was never given).
    """
    expected = "pod" if kind == "pods" else kind
    problems: list[str] = []
    if reply.request_id != msg.request_id:
        problems.append(f"request_id {reply.request_id!r}")
    if reply.kind != expected:
        problems.append(f"kind {reply.kind!r}, expected {expected!r}")
    if isinstance(msg, AllocateRequest | ReleaseRequest) and reply.call_id != msg.call_id:
        problems.append(f"call_id {reply.call_id!r}, expected {msg.call_id!r}")
    subject = msg if isinstance(msg, DrainRequest | PodEventMsg) else None
    if subject is not None and reply.pod_id != subject.pod_id:
        problems.append(f"pod_id {reply.pod_id!r}, expected {subject.pod_id!r}")
    return "; ".join(problems) or None


def _validate(kind: StreamKind, fields: Mapping[str, str]) -> None:
    """Refuse a message that breaks the contract before it costs a round trip."""
    if kind == "pods":
        decode_pod_event(fields)
    else:
        decode_request(kind, fields)
