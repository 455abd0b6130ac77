"""``POD_SOURCE=kubernetes``: the leader keeps the pool in step with the cluster.

During each term the leader runs :meth:`KubePodSource.lead`:

1. **List** the pods of ``NAMESPACE`` that match ``POD_LABEL_SELECTOR`` and
   bring Redis in line with them (at takeover, after a ``410 Gone``, and
   every ``RECONCILE_INTERVAL`` as a safety net). The list's
   ``resourceVersion`` is kept.
2. **Watch** from that version. Each event updates the view and syncs that
   pod. A dropped stream reopens from the last version seen, with backoff
   (0.5 s doubling to 30 s, reset by the next event), so no event between
   the drop and the reopen is missed; ``410 Gone`` (the version was
   compacted away) relists instead, because a watch started without a
   version replays the pods that exist but never the deletions in the gap
   (the anchor's watcher did that, digest §3).
3. **Every ``TIERPOOL_HEARTBEAT``** sync every pod in the view: the
   heartbeat keeps the pods Kubernetes says exist alive (they need not run
   the agent), and a sync that failed (Redis down) is retried.

Syncing one pod compares what Kubernetes says with what Redis holds and
sends only the difference, as the contract's pod transitions (through
:class:`core.podsource.FencedPods`: same scripts as the consumer, fenced by
the term's token):

- ready with an IP -> ``register`` (endpoint, zone, capability; labels
  ``tierpool.io/source=kubernetes``, ``tierpool.io/ready=true``), and
  ``undrain`` if the source had drained it;
- registered but not ready (probe failing, terminating, bad values) ->
  ``register`` with ``tierpool.io/ready=false`` (so a later leader knows
  the drain mark is the source's) and ``drain``: no new calls, live calls go
  on; the mark is refreshed before ``DRAINING_TTL`` lapses;
- deleted -> ``deregister`` (its calls end with ``call_lost`` events). At a
  relist, a pod labelled ``tierpool.io/source=kubernetes`` that is no longer
  listed is deregistered too; pods that announced themselves (the agent) and
  are not in the selection are left alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx2
from lightkube import AsyncClient, KubeConfig
from lightkube.core.exceptions import ApiError, ConfigError, NotReadyError
from lightkube.resources.core_v1 import Pod
from redis.exceptions import RedisError

from tierpool.core.clock import now_ms
from tierpool.core.errors import LeadershipLost, SettingsError
from tierpool.core.leader import Leadership
from tierpool.core.podsource import FencedPods, PodRecord
from tierpool.core.settings import Settings
from tierpool.core.state import Message
from tierpool.kube.pods import (
    READY_LABEL,
    SOURCE_LABEL,
    SOURCE_VALUE,
    Observed,
    Placement,
    observe,
    register_message,
)
from tierpool.kube.selector import Selector, parse_selector
from tierpool.schemas import DrainRequest, PodDeregister, PodHeartbeat
from tierpool.workers import metrics

log = logging.getLogger(__name__)

LIST_CHUNK = 500
"""Pods per LIST page (``limit``/``continue``), so a large namespace is read in pieces."""
WATCH_SERVER_TIMEOUT_S = 300
"""``timeoutSeconds`` of a watch: the server ends it cleanly; it reopens from the last version."""
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
APPLY_CHUNK = 256
"""Transitions per fenced transaction."""
DRAIN_REASON = "kubernetes: pod not ready"

ClientFactory = Callable[[], AsyncClient]


def load_config(service_account: Path | None = None) -> KubeConfig:
    """In-cluster service account when present, else ``KUBECONFIG`` (or ``~/.kube/config``).

    Raises SettingsError when there is neither, so the worker stops at start.
    """
    try:
        if service_account is not None:  # tests: another mount point
            return KubeConfig.from_env(service_account=service_account)
        return KubeConfig.from_env()
    except (ConfigError, OSError, KeyError) as exc:
        raise SettingsError(
            "POD_SOURCE",
            "kubernetes",
            f"no Kubernetes config: no in-cluster service account, and KUBECONFIG "
            f"(or ~/.kube/config) cannot be read ({exc})",
        ) from exc


class KubePodSource:
    """The Kubernetes pod source; one per worker process, run by the leader each term."""

    name = "kubernetes"

    def __init__(self, settings: Settings, *, client_factory: ClientFactory | None = None) -> None:
        self.settings = settings
        self.selector: Selector = parse_selector(settings.pod_label_selector)
        if client_factory is None:
            config = load_config()  # fails at start, not at the first term, when missing
            namespace = settings.kube_namespace

            def client_factory() -> AsyncClient:
                return AsyncClient(config, namespace=namespace, timeout=httpx2.Timeout(10.0))

        self._client_factory = client_factory
        self.relists = 0
        """Completed relists (tests, logs)."""

    async def lead(self, pods: FencedPods, term: Leadership) -> None:
        client = self._client_factory()
        try:
            sync = _Sync(self, pods, client)
            async with anyio.create_task_group() as tg:
                tg.start_soon(sync.heartbeats)
                await sync.list_and_watch()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                await client.close()


@dataclass
class _Backoff:
    delay_s: float = BACKOFF_FIRST_S

    async def sleep(self) -> None:
        await anyio.sleep(self.delay_s)
        self.delay_s = min(self.delay_s * 2, BACKOFF_MAX_S)

    def reset(self) -> None:
        self.delay_s = BACKOFF_FIRST_S


@dataclass
class _Sync:
    """One term's view of the cluster and the writes that follow from it."""

    source: KubePodSource
    pods: FencedPods
    client: AsyncClient
    view: dict[str, Observed] = field(default_factory=dict)
    """Every pod the selection holds now, as last reported."""
    deleted: set[str] = field(default_factory=set)
    """Pods reported deleted whose deregistration has not been confirmed yet."""
    drained: set[str] = field(default_factory=set)
    """Pods this term drained because Kubernetes said not ready."""
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    backoff: _Backoff = field(default_factory=_Backoff)

    @property
    def settings(self) -> Settings:
        return self.source.settings

    # --- list and watch -------------------------------------------------------
    async def list_and_watch(self) -> None:
        reason = "takeover"
        while True:
            metrics.pod_source_relists_total.labels(reason).inc()
            try:
                version = await self.relist()
            except (LeadershipLost, anyio.get_cancelled_exc_class()):
                raise
            except Exception as exc:
                metrics.pod_source_errors_total.labels("list").inc()
                log.warning(
                    "kubernetes: listing pods failed; retrying in %.1fs: %s",
                    self.backoff.delay_s,
                    exc,
                )
                reason = "retry"
                await self.backoff.sleep()
                continue
            # The periodic relist is the safety net for a watch that went quiet
            # without an error (a half-open connection).
            reason = "interval"
            with anyio.move_on_after(self.settings.reconcile_interval_s):
                await self.watch(version)
                reason = "expired"

    async def relist(self) -> str:
        pods = self.client.list(
            Pod,
            namespace=self.settings.kube_namespace,
            labels=self.source.selector,
            chunk_size=LIST_CHUNK,
        )
        view = {}
        async for pod in pods:
            seen = observe(pod, self.settings)
            if seen.name:
                view[seen.name] = seen
        try:
            version = pods.resourceVersion
        except NotReadyError:  # no page carried one: watch from "now" (replays as ADDED)
            version = ""
        async with self.lock:
            self.view = view
            mine = await self.pods.labelled(SOURCE_LABEL, SOURCE_VALUE)
            gone = [name for name in mine if name not in view]
            # Deletions still unconfirmed (Redis was down) stay, unless the pod is back.
            self.deleted = {n for n in self.deleted if n not in view} | set(gone)
            await self._sync_locked([*view, *self.deleted], heartbeat=False)
        self.source.relists += 1
        log.info(
            "kubernetes: listed %d pods (%d ready) at version %s; %d no longer listed",
            len(view),
            sum(o.placeable for o in view.values()),
            version,
            len(gone),
        )
        return version

    async def watch(self, version: str) -> None:
        """Follow events from ``version`` until a 410 Gone asks for a relist."""
        while True:
            try:
                stream = self.client.watch(
                    Pod,
                    namespace=self.settings.kube_namespace,
                    labels=self.source.selector,
                    resource_version=version or None,
                    server_timeout=WATCH_SERVER_TIMEOUT_S,
                )
                async for kind, pod in stream:
                    if pod.metadata and pod.metadata.resourceVersion:
                        version = pod.metadata.resourceVersion
                    if kind in ("ADDED", "MODIFIED", "DELETED"):
                        metrics.pod_source_events_total.labels(kind.lower()).inc()
                        await self.event(kind, pod)
                    self.backoff.reset()
            except ApiError as exc:
                if exc.status.code == 410:
                    log.info("kubernetes: watch version %s expired (410 Gone); relisting", version)
                    return
                metrics.pod_source_errors_total.labels("watch").inc()
                log.warning(
                    "kubernetes: watch refused (%s); reopening in %.1fs", exc, self.backoff.delay_s
                )
            except (httpx2.HTTPError, OSError, ValueError) as exc:
                metrics.pod_source_errors_total.labels("watch").inc()
                log.warning(
                    "kubernetes: watch dropped (%r); reopening from version %s in %.1fs",
                    exc,
                    version,
                    self.backoff.delay_s,
                )
            await self.backoff.sleep()

    async def event(self, kind: str, pod: Pod) -> None:
        seen = observe(pod, self.settings)
        if not seen.name:
            return
        if seen.problem:
            log.warning("kubernetes: pod %s is not placed: %s", seen.name, seen.problem)
        async with self.lock:
            if kind == "DELETED":
                self.view.pop(seen.name, None)
                self.deleted.add(seen.name)
            else:
                self.view[seen.name] = seen
                self.deleted.discard(seen.name)
            try:
                await self._sync_locked([seen.name], heartbeat=False)
            except RedisError as exc:  # the next heartbeat round syncs it again
                metrics.pod_source_errors_total.labels("sync").inc()
                log.warning("kubernetes: syncing pod %s failed (will retry): %s", seen.name, exc)

    # --- heartbeats -----------------------------------------------------------
    async def heartbeats(self) -> None:
        interval = self.settings.heartbeat_s
        while True:
            await anyio.sleep(interval)
            async with self.lock:
                try:
                    await self._sync_locked([*self.view, *self.deleted], heartbeat=True)
                except RedisError as exc:
                    metrics.pod_source_errors_total.labels("sync").inc()
                    log.warning("kubernetes: heartbeat round failed: %s", exc)

    # --- the one decision -----------------------------------------------------
    async def _sync_locked(self, names: Iterable[str], *, heartbeat: bool) -> None:
        names = list(dict.fromkeys(names))
        records = await self.pods.read(names)
        msgs: list[Message] = []
        for name in names:
            msgs += self._decide(name, records.get(name), heartbeat=heartbeat)
        for i in range(0, len(msgs), APPLY_CHUNK):
            await self._apply(msgs[i : i + APPLY_CHUNK])
        for name in names:
            if name in self.deleted and name not in self.view:
                self.deleted.discard(name)

    def _decide(self, name: str, rec: PodRecord | None, *, heartbeat: bool) -> list[Message]:
        seen = self.view.get(name)
        if seen is None:
            self.drained.discard(name)
            return [PodDeregister(pod_id=name)] if rec is not None else []
        if seen.placeable:
            assert seen.placement is not None
            return self._ready(name, seen.placement, rec, heartbeat=heartbeat)
        return self._unready(name, rec, heartbeat=heartbeat)

    def _ready(
        self, name: str, where: Placement, rec: PodRecord | None, *, heartbeat: bool
    ) -> list[Message]:
        msgs: list[Message] = []
        ours = rec is not None and rec.labels.get(SOURCE_LABEL) == SOURCE_VALUE
        if (
            rec is None
            or not ours
            or rec.labels.get(READY_LABEL) != "true"
            or (rec.endpoint, rec.zone, rec.capability)
            != (where.endpoint, where.zone, where.capability)
        ):
            msgs.append(register_message(name, where, ready=True))
        elif heartbeat:
            msgs.append(PodHeartbeat(pod_id=name))
        source_drained = name in self.drained or (
            ours and rec is not None and rec.labels.get(READY_LABEL) == "false"
        )
        if rec is not None and rec.draining_until_ms is not None and source_drained:
            msgs.append(_drain(name, "undrain"))
        self.drained.discard(name)
        return msgs

    def _unready(self, name: str, rec: PodRecord | None, *, heartbeat: bool) -> list[Message]:
        if rec is None:
            return []  # never placed, nothing to hold back
        msgs: list[Message] = []
        if rec.labels.get(SOURCE_LABEL) != SOURCE_VALUE or rec.labels.get(READY_LABEL) != "false":
            where = Placement(rec.endpoint, rec.zone, rec.capability)
            msgs.append(register_message(name, where, ready=False, labels=rec.labels))
        elif heartbeat:
            msgs.append(PodHeartbeat(pod_id=name))
        s = self.settings
        margin_ms = max(s.draining_ttl_s / 2, 2 * s.heartbeat_s) * 1000
        if rec.draining_until_ms is None or rec.draining_until_ms - now_ms() < margin_ms:
            msgs.append(_drain(name, "drain"))
        self.drained.add(name)
        return msgs

    async def _apply(self, msgs: Sequence[Message]) -> None:
        outcomes = await self.pods.apply(msgs)
        for msg, outcome in zip(msgs, outcomes, strict=True):
            if outcome.status in ("registered", "deregistered", "drained", "undrained"):
                log.info(
                    "kubernetes: %s %s %s",
                    outcome.status,
                    getattr(msg, "pod_id", "?"),
                    " ".join(f"{k}={v}" for k, v in outcome.fields.items() if k != "pod_id"),
                )
            elif outcome.status not in ("alive", "unknown_pod", "not_found"):
                log.warning("kubernetes: %s for %r: %s", outcome.status, msg, outcome.fields)


def _drain(name: str, action: Any) -> DrainRequest:
    # request_id "" = no reply stream: the leader reads the script's result itself.
    return DrainRequest(request_id="", pod_id=name, action=action, reason=DRAIN_REASON)
