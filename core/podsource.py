"""The leader's pluggable pod source, and the fenced writer it uses.

Pods normally announce themselves on ``tp:{NS}:pods`` (the pod agent, the
simulator, a pod's own XADDs). A :class:`PodSource` is another witness the
leader runs during each term, e.g. ``tierpool.kube`` (``POD_SOURCE=kubernetes``),
which turns Kubernetes readiness into the same transitions.

A source never XADDs to the pods stream: it applies the transitions itself,
through :class:`FencedPods`, with the same Lua scripts the consumer runs
(``register``, ``heartbeat``, ``deregister``, ``drain``). Why not the stream:

- fencing: an entry on the stream would be applied by whichever worker reads
  it, whoever wrote it and whenever; a deposed leader's late XADD would still
  take effect. Here every batch runs in ``MULTI``/``EXEC`` under ``WATCH`` of
  the leader key, after checking that it still holds our token: a takeover,
  a renewal racing us or a lapse aborts the batch, and a stale leader writes
  nothing (the same guarantee the token gives the leader's own scripts);
- order: the source's transitions of one pod (register, then drain) run in
  the order it decided them, in one transaction; entries spread over
  consumers in parallel could be applied out of order;
- exactly-once needs nothing more: the transitions a source sends are
  level-triggered ("this pod is ready with this endpoint"), so applying one
  twice (a retried batch) is harmless, and there is no request to answer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import msgspec
from redis.asyncio import Redis
from redis.exceptions import WatchError

from tierpool.core.errors import LeadershipLost
from tierpool.core.keys import Keys
from tierpool.core.leader import Leadership
from tierpool.core.scripts import Call, _is_noscript
from tierpool.core.state import MAX_STEPS, Message, Outcome, PoolState, _outcome

log = logging.getLogger(__name__)

WATCH_RETRIES = 8
"""Attempts of one batch when the leader key changed under it (a renewal)."""
STALE_RETRIES = 3


class PodSource(Protocol):
    """Another witness of which pods exist, run by the leader during each term.

    ``lead`` runs while the term lasts and returns only by cancellation; it
    writes only through ``pods`` (fenced by the term's token). Raising
    :class:`~core.errors.LeadershipLost` ends the term; any other exception is
    logged and ``lead`` is started again after a pause.
    """

    name: str

    async def lead(self, pods: FencedPods, term: Leadership) -> None: ...


@dataclass(frozen=True, slots=True)
class PodRecord:
    """What Redis holds about one registered pod (the fields a source compares)."""

    pod_id: str
    pool: str
    endpoint: str
    zone: str
    capability: int
    labels: dict[str, str]
    draining_until_ms: int | None


class FencedPods:
    """Pod transitions and reads for a pod source, fenced by one term's token."""

    def __init__(self, state: PoolState, token: str) -> None:
        self.state = state
        self.redis: Redis = state.redis
        self.keys: Keys = state.keys
        self.token = token

    # --- reads (no fence needed: they change nothing) --------------------------
    async def read(self, pod_ids: Iterable[str]) -> dict[str, PodRecord]:
        """The registered pods among ``pod_ids`` (one round trip)."""
        ids = list(dict.fromkeys(pod_ids))
        if not ids:
            return {}
        k = self.keys
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in (k.pod_pool, k.pod_endpoint, k.pod_zone, k.pod_capability, k.pod_labels):
                pipe.hmget(key, ids)
            pipe.zmscore(k.pod_draining, ids)
            pools, endpoints, zones, caps, labels, draining = await pipe.execute()
        out: dict[str, PodRecord] = {}
        for i, pod in enumerate(ids):
            if pools[i] is None:
                continue
            try:
                parsed = msgspec.json.decode(labels[i] or "{}")
            except msgspec.DecodeError:
                parsed = {}
            out[pod] = PodRecord(
                pod_id=pod,
                pool=_text(pools[i]),
                endpoint=_text(endpoints[i]),
                zone=_text(zones[i]),
                capability=int(caps[i] or 1),
                labels={str(a): str(b) for a, b in parsed.items()}
                if isinstance(parsed, dict)
                else {},
                draining_until_ms=None if draining[i] is None else int(draining[i]),
            )
        return out

    async def labelled(self, key: str, value: str) -> dict[str, PodRecord]:
        """Every registered pod whose labels hold ``key=value`` (a source's own pods).

        One HSCAN of the labels hash: a few hundred bytes per pod, read at
        takeover and at each relist, not per event.
        """
        mine: list[str] = []
        async for pod, raw in self.redis.hscan_iter(self.keys.pod_labels, count=500):
            try:
                labels = msgspec.json.decode(raw)
            except msgspec.DecodeError:
                continue
            if isinstance(labels, dict) and labels.get(key) == value:
                mine.append(_text(pod))
        return await self.read(mine)

    # --- writes ----------------------------------------------------------------
    async def apply(self, msgs: Sequence[Message]) -> list[Outcome]:
        """Run the transitions of ``msgs`` in order, in one fenced transaction.

        Raises :class:`~core.errors.LeadershipLost` when the lease is not
        ours. A call a newer config made stale is prepared again from a
        refreshed snapshot and the batch resent (the transitions are
        level-triggered, so the parts that did apply may apply twice).
        """
        if not msgs:
            return []
        snap = self.state.source.current()
        outcomes: list[Outcome] = []
        for _attempt in range(STALE_RETRIES + 1):
            calls: list[Call] = []
            for msg in msgs:
                prepared = self.state.prepare(msg, snap)
                if isinstance(prepared, Outcome):
                    raise ValueError(f"pod source built an inapplicable message: {prepared}")
                calls.append(prepared)
            results = await self._fenced(calls)
            for _step in range(MAX_STEPS):  # a pod with many calls is removed in steps
                more = [
                    n for n, r in enumerate(results) if isinstance(r, list) and r[:1] == ["more"]
                ]
                if not more:
                    break
                again = await self._fenced([calls[n] for n in more])
                for n, r in zip(more, again, strict=True):
                    results[n] = r
            outcomes = [_outcome(r) for r in results]
            if not any(o.status == "stale" for o in outcomes):
                return outcomes
            snap = await self.state.source.refresh()
        return outcomes

    async def _fenced(self, calls: Sequence[Call]) -> list[object]:
        leader = self.keys.leader
        for _attempt in range(WATCH_RETRIES):
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(leader)
                    holder = await pipe.get(leader)
                    if _text(holder) != self.token:
                        raise LeadershipLost(self.token, None if holder is None else _text(holder))
                    pipe.multi()  # type: ignore[no-untyped-call]
                    for c in calls:
                        pipe.evalsha(c.script.sha, len(c.keys), *c.keys, *c.args)
                    results: list[object] = await pipe.execute(raise_on_error=False)
                except WatchError:
                    continue  # the lease was renewed (or taken) meanwhile: check again
            if any(_is_noscript(r) for r in results):
                async with self.redis.pipeline(transaction=False) as load:
                    for s in {c.script for c in calls}:
                        load.script_load(s.source)
                    await load.execute()
                continue
            return results
        raise LeadershipLost(self.token, "(the leader key kept changing)")


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)
