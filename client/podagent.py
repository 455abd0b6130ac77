"""What a pod runs to be placed: register, heartbeat, drain itself, deregister.

A pod announces itself with ``register`` and is assigned a pool; it then
heartbeats every ``heartbeat_s``, listing the calls it serves so that their
leases are renewed. When Redis lost its data (a restart without
persistence) a heartbeat is answered ``unknown_pod`` and the agent registers
again at once, so pods come back without being restarted; the register lists
the calls the pod serves, so Redis restores them before the pod can be given
a new one (contract v1.1: the pod is the witness of its own calls).

Shutting down is two-phase, because the anchor's rollouts killed live calls
(digest §14.15): the agent first drains itself (no new calls), keeps
heartbeating while its calls finish, re-draining with each heartbeat so the
drain mark cannot lapse while it is terminating (§14.11), and deregisters
when its calls are over or the grace period has passed.

Many agents can share one :class:`~tierpool.client.client.TierpoolClient`: their
heartbeats then travel together over its two connections.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Final

import anyio
from anyio.abc import TaskStatus

from tierpool.client.client import TierpoolClient
from tierpool.client.mux import backoff_s
from tierpool.core.clock import monotonic_s
from tierpool.core.errors import RedisUnavailable, RequestTimeout
from tierpool.schemas import PodDeregister, PodHeartbeat, PodRegister, Reply
from tierpool.schemas.fields import PodZone

log = logging.getLogger(__name__)

STOP_REQUEST_S: Final = 1.0
"""Beyond the grace period, time for shutdown's deregister to be answered."""
MIN_STOP_REQUEST_S: Final = 0.2
"""Even past the budget, each shutdown request gets this long (it is sent, at least)."""


class PodAgent:
    """The lifecycle of one pod, driven through a shared client.

    ``calls`` is the set of call ids the pod serves: the application keeps
    it current with :meth:`call_started` and :meth:`call_ended`, and every
    heartbeat carries it (``report_calls=False`` sends heartbeats without
    ``calls``: leases are then not renewed and calls end by release or lease
    expiry). ``pool`` is the pool of the last registration.
    """

    def __init__(
        self,
        client: TierpoolClient,
        pod_id: str,
        endpoint: str,
        *,
        zone: PodZone = "open",
        capability: int = 1,
        labels: Mapping[str, str] | None = None,
        heartbeat_s: float = 5.0,
        report_calls: bool = True,
    ) -> None:
        self.client = client
        self.pod_id = pod_id
        self.endpoint = endpoint
        self.zone: PodZone = zone
        self.capability = capability
        self.labels = dict(labels or {})
        self.heartbeat_s = heartbeat_s
        self.report_calls = report_calls
        self.calls: set[str] = set()
        self.pool: str | None = None
        self.registrations = 0
        """How many times the pod registered (more than 1: Redis forgot it)."""
        self.draining = False
        self._stopping = False
        self._started = False
        self._running = False
        self._wake = anyio.Event()  # set once, when the heartbeat loop must stop
        self._calls_changed = anyio.Event()
        self._done = anyio.Event()
        self._stop_by: float | None = None
        """Monotonic time by which shutdown's own requests must be answered or given up."""

    # --- the application's side ----------------------------------------------------
    def call_started(self, call_id: str) -> None:
        """The pod took ``call_id``: heartbeats renew its lease from now on."""
        self.calls.add(call_id)

    def call_ended(self, call_id: str) -> None:
        """``call_id`` is over (the application still releases it)."""
        self.calls.discard(call_id)
        self._calls_changed.set()

    # --- lifecycle -----------------------------------------------------------------------
    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Register (retrying until it is), signal started, heartbeat until
        :meth:`shutdown` stops it, then deregister and return."""
        if self._started:
            raise RuntimeError(f"pod agent {self.pod_id} already ran")
        self._started = self._running = True
        try:
            await self._register()
            task_status.started()
            next_at = monotonic_s() + self.heartbeat_s
            while not self._stopping:
                with anyio.move_on_after(max(0.0, next_at - monotonic_s())):
                    await self._wake.wait()
                if self._stopping:
                    break
                next_at = max(next_at + self.heartbeat_s, monotonic_s())
                await self._beat()
            await self._deregister()
        finally:
            self._running = False
            self._done.set()

    async def shutdown(self, grace_s: float) -> None:
        """Drain, wait up to ``grace_s`` for the calls to end, deregister.

        Heartbeats go on meanwhile (re-draining each time). Returns when the
        pod has deregistered, or gave up on it: the drain and deregister
        requests share the grace period (plus :data:`STOP_REQUEST_S`) instead
        of each waiting out the client's timeout, so a pod whose Redis is
        already gone stops within its grace (a supervisor such as honcho
        kills what outlives its own few seconds). Safe to call twice.
        """
        if self.draining:
            await self._done.wait()
            return
        self._stop_by = monotonic_s() + grace_s + STOP_REQUEST_S
        self.draining = True
        if self._running and self.pool is not None:
            await self._drain()
        with anyio.move_on_after(grace_s):
            while self.calls:
                self._calls_changed = anyio.Event()
                await self._calls_changed.wait()
        if self.calls:
            log.warning(
                "pod %s deregisters with %d calls still live after %.3gs grace",
                self.pod_id,
                len(self.calls),
                grace_s,
            )
        self._stopping = True
        self._wake.set()
        if self._started:
            await self._done.wait()
        else:
            self._started = True  # never run it after this
            await self._deregister()
            self._done.set()

    # --- steps ---------------------------------------------------------------------------
    async def _register(self) -> None:
        """Register, retrying with backoff until it is done or the agent stops."""
        failures = 0
        while not self._stopping:
            reply = await self._send(
                PodRegister(
                    pod_id=self.pod_id,
                    endpoint=self.endpoint,
                    zone=self.zone,
                    capability=self.capability,
                    labels=self.labels,
                    calls=tuple(sorted(self.calls)) if self.report_calls else None,
                )
            )
            if reply is not None and reply.status == "registered":
                self.pool = reply.pool
                self.registrations += 1
                log.info("pod %s registered in pool %r", self.pod_id, reply.pool or "")
                if self.draining:
                    await self._drain(again=False)
                return
            if reply is not None:
                log.warning("pod %s: register answered %s", self.pod_id, reply.status)
            failures += 1
            with anyio.move_on_after(backoff_s(failures)):
                await self._wake.wait()

    async def _beat(self) -> None:
        if self.draining:
            # Before the heartbeat: it must never find a lapsed mark and re-index the pod.
            await self._drain()
        calls = tuple(sorted(self.calls)) if self.report_calls else None
        reply = await self._send(
            PodHeartbeat(pod_id=self.pod_id, calls=calls), timeout_s=self.heartbeat_s
        )
        if reply is not None and reply.status == "unknown_pod" and not self._stopping:
            log.warning(
                "pod %s is unknown to tierpool (Redis lost its data?): registering", self.pod_id
            )
            await self._register()

    def _stop_timeout(self) -> float | None:
        """While stopping, what is left of the shutdown's budget; else the client's default."""
        if self._stop_by is None:
            return None
        return max(MIN_STOP_REQUEST_S, self._stop_by - monotonic_s())

    async def _drain(self, *, again: bool = True) -> None:
        try:
            reply = await self.client.drain(
                self.pod_id, reason="pod shutting down", timeout_s=self._stop_timeout()
            )
        except (RequestTimeout, RedisUnavailable) as exc:
            log.warning("pod %s: drain %s", self.pod_id, exc)
            return
        if reply.status == "not_found" and again and not self._stopping:
            await self._register()  # Redis forgot the pod; it drains again once registered

    async def _deregister(self) -> None:
        reply = await self._send(PodDeregister(pod_id=self.pod_id), timeout_s=self._stop_timeout())
        if reply is not None:
            log.info("pod %s deregistered (%s)", self.pod_id, reply.status)
        self.pool = None

    async def _send(
        self, event: PodRegister | PodHeartbeat | PodDeregister, timeout_s: float | None = None
    ) -> Reply | None:
        """The reply, or None when Redis or the workers did not answer (logged)."""
        try:
            return await self.client.send_pod_event(event, timeout_s=timeout_s)
        except (RequestTimeout, RedisUnavailable) as exc:
            log.warning("pod %s: %s %s", self.pod_id, type(event).__name__, exc)
            return None
