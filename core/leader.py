"""Leader election over one Redis key, with a fencing token.

``leader`` holds ``{holder}:{term}`` with a PX lease; ``leader_acquire.lua``
takes it after bumping ``leader:term``, ``leader_renew.lua`` extends or
releases it only while it still holds our token. The token is handed to every
leader-only script, which does nothing unless it is current: a paused or
partitioned old leader changes nothing once its lease lapsed (Kleppmann 2016:
a lock is safe only with a fencing token the resource checks).

:meth:`Election.run` campaigns forever. While it holds the lease it runs the
caller's ``lead`` coroutine inside a cancel scope and renews every
``renew_s``. Leadership is lost *at once* when a renewal is refused, when the
lease lapses on our clock without a successful renewal (Redis down, slow or
partitioned), or when ``lead`` calls :meth:`Leadership.step_down` (a script
answered ``fenced``): the scope is cancelled, the process keeps running and
campaigns again. The anchor SIGTERMed itself instead (digest §2).

Our clock is conservative: a lease acquired or renewed by a command *sent* at
``t`` expires in Redis no earlier than ``t + lease``, so we stop leading at
``t + lease`` by our monotonic clock, before anyone else can take over.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio
from anyio import CancelScope
from anyio.abc import TaskStatus
from redis.asyncio import Redis
from redis.exceptions import RedisError

from tierpool.core.clock import monotonic_s
from tierpool.core.keys import Keys
from tierpool.core.scripts import Call, run_one, script

log = logging.getLogger(__name__)

RELEASE_TIMEOUT_S = 1.0
"""How long a stopping leader tries to release its lease before giving up."""


@dataclass(eq=False)
class Leadership:
    """One term of leadership, as seen by the ``lead`` coroutine.

    ``token`` goes to every leader-only script. ``step_down`` ends the term
    (cancels ``lead``) when a script says the token is no longer current.
    """

    token: str
    acquired_at_s: float
    lost_reason: str | None = None
    _scope: CancelScope | None = field(default=None, repr=False)

    @property
    def lost(self) -> bool:
        return self.lost_reason is not None

    def step_down(self, reason: str) -> None:
        """End this term now: ``lead`` is cancelled; the election campaigns again."""
        if self.lost_reason is None:
            self.lost_reason = reason
        if self._scope is not None:
            self._scope.cancel()


Lead = Callable[[Leadership], Awaitable[None]]


def parse_token(token: str) -> tuple[str, int]:
    """``(holder, term)`` of a ``{holder}:{term}`` token (holders may contain ``:``)."""
    holder, _, term = token.rpartition(":")
    return holder, int(term)


class Election:
    """Campaign for, hold and give up the leader lease of one namespace.

    ``retry_s`` is how often a candidate tries to take a free lease (default
    a quarter of the lease), so failover after a leader dies takes at most
    ``lease + retry`` (2.5 s with the defaults).
    """

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        holder_id: str,
        lease_ms: int,
        renew_s: float,
        *,
        retry_s: float | None = None,
    ) -> None:
        if renew_s * 1000 >= lease_ms:
            raise ValueError(f"renew_s={renew_s} must be well below lease_ms={lease_ms}")
        self.redis = redis
        self.keys = keys
        self.holder_id = holder_id
        self.lease_ms = lease_ms
        self.lease_s = lease_ms / 1000
        self.renew_s = renew_s
        self.retry_s = retry_s if retry_s is not None else self.lease_s / 4
        self.current: Leadership | None = None
        """The term being held, or None while campaigning."""
        self.terms = 0
        """Terms won by this object (tests, logs)."""

    @property
    def is_leader(self) -> bool:
        return self.current is not None and not self.current.lost

    # --- one step each (tests call these directly) -------------------------------
    async def try_acquire(self) -> str | None:
        """Take the lease if it is free: our new token, or None (someone holds it)."""
        call = Call(
            script("leader_acquire"),
            (self.keys.leader, self.keys.leader_term),
            (self.holder_id, self.lease_ms),
        )
        result = await run_one(self.redis, call)
        assert isinstance(result, list)
        return str(result[1]) if int(result[0]) == 1 else None

    async def renew(self, token: str) -> bool:
        """Extend the lease; False when it is no longer ours (lapsed, taken, flushed)."""
        call = Call(script("leader_renew"), (self.keys.leader,), (token, self.lease_ms, ""))
        return await run_one(self.redis, call) == 1

    async def release(self, token: str) -> bool:
        """Give the lease up if it is still ours, so the next leader need not wait."""
        call = Call(script("leader_renew"), (self.keys.leader,), (token, self.lease_ms, "release"))
        return await run_one(self.redis, call) == 1

    # --- the loop -----------------------------------------------------------------
    async def run(
        self, lead: Lead, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Campaign forever; run ``lead`` during every term won. Returns only by cancellation."""
        task_status.started()
        while True:
            term = await self._campaign()
            await self._hold(term, lead)

    async def _campaign(self) -> Leadership:
        failing = False
        while True:
            sent = monotonic_s()
            try:
                token = await self.try_acquire()
            except Exception as exc:  # Redis down: a candidate only waits and tries again
                if not failing:
                    log.warning("leader campaign: Redis error, retrying: %s", exc)
                failing = True
                token = None
            else:
                if failing:
                    log.info("leader campaign: Redis reachable again")
                failing = False
            if token is not None:
                self.terms += 1
                return Leadership(token, sent)
            # a little jitter so candidates that started together do not stay in step
            await anyio.sleep(self.retry_s * random.uniform(0.8, 1.0))

    async def _hold(self, term: Leadership, lead: Lead) -> None:
        log.info("leader: won term %s", term.token)
        self.current = term
        try:
            async with anyio.create_task_group() as tg:
                term._scope = tg.cancel_scope
                tg.start_soon(self._keep, term)
                tg.start_soon(self._lead, term, lead)
        finally:
            self.current = None
            if term.lost_reason is None:
                term.lost_reason = "stopped"
            log.info("leader: term %s over: %s", term.token, term.lost_reason)
            # Whatever ended the term: if the lease is still ours (we stopped, or
            # gave up on a slow Redis), free it now; the script ignores any other.
            await self._release_quietly(term.token)
        if term.lost_reason == "lead failed":
            await anyio.sleep(self.retry_s)  # let another candidate try a healthier process

    async def _lead(self, term: Leadership, lead: Lead) -> None:
        try:
            await lead(term)
        except Exception:
            log.exception("leader: lead failed; stepping down")
            term.step_down("lead failed")
        else:
            term.step_down("lead returned")

    async def _keep(self, term: Leadership) -> None:
        """Renew until refused or until the lease lapses on our clock; then step down."""
        deadline = term.acquired_at_s + self.lease_s
        while True:
            await anyio.sleep(max(0.0, min(self.renew_s, deadline - monotonic_s())))
            sent = monotonic_s()
            if sent >= deadline:
                term.step_down("lease lapsed without a successful renewal")
                return
            try:
                with anyio.fail_after(deadline - sent):
                    ours = await self.renew(term.token)
            except TimeoutError:
                term.step_down("lease lapsed while a renewal was in flight")
                return
            except Exception as exc:  # Redis down or slow: retry until the deadline
                log.warning(
                    "leader: renewal failed (%.2fs of lease left): %s",
                    deadline - monotonic_s(),
                    exc,
                )
                continue
            if not ours:
                term.step_down("lease is no longer ours")
                return
            deadline = sent + self.lease_s

    async def _release_quietly(self, token: str) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(RELEASE_TIMEOUT_S):
            try:
                if await self.release(token):
                    log.info("leader: released the lease")
            except (RedisError, OSError) as exc:
                log.warning("leader: could not release the lease (it will lapse): %s", exc)
