"""Notice that Redis's replication history changed, and quarantine the pods.

Pods are the witnesses of their calls (contract v1.1): a heartbeat or
register lists them and ``witness()`` restores those Redis lost. A restart
without persistence loses the pods too, so they must register (listing
their calls) before they take a call. A failover to a replica that missed
the last writes (or a restore of an older RDB) is different: the pods are
still registered and in their free indexes, so one could be given a new call
before its next heartbeat restores the call Redis lost -- an exclusive pod
would serve two calls.

Redis's ``master_replid`` changes exactly when its history may have forked
(a replica promoted, a restart). ``tp:{NS}:replid`` keeps the one the
namespace's state was written under; a process that finds another one runs
``quarantine.lua``, which marks every registered pod unwitnessed (out of its
free index until its next register or heartbeat) and stores the new replid
(the compare-and-set: one process does it). One ``INFO replication`` per
check, never per message: workers check at start, after each Redis outage or
refusal, and the leader once per reconcile tick (:class:`Epoch`).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import anyio
from redis.asyncio import Redis
from redis.exceptions import NoPermissionError, ResponseError

from tierpool.core.scripts import run_one
from tierpool.core.snapshot import ConfigSnapshot, retry_stale
from tierpool.core.state import PoolState

log = logging.getLogger(__name__)

_noperm_said = False
"""Whether the one warning about a user without ``INFO`` was logged."""

Verdict = Literal["same", "adopted", "fresh", "quarantined", "unknown", "replica", "stale"]
"""``check_epoch``'s answer: the script's status, ``unknown`` when the server
cannot tell (no ``INFO``: fakeredis), ``replica`` when it is not a master
(its writes are refused anyway; check again later)."""


async def server_replid(redis: Redis) -> str | Literal["unknown", "replica"]:
    """The server's ``master_replid`` when it is a master.

    ``unknown`` when it cannot tell (fakeredis has no ``INFO replication``):
    treated as no change. Connection errors are raised: nothing is concluded
    from a failed read. On a Redis Cluster the client's connections go to the
    node serving the namespace's slot (``core.clusterslot``), so this is that
    node's history.
    """
    try:
        info: dict[str, Any] = await redis.info("replication")
    except NoPermissionError:
        global _noperm_said
        if not _noperm_said:
            _noperm_said = True
            log.warning(
                "Redis refuses INFO to this user: a failover to a replica that lost the last "
                "writes cannot be noticed (grant +info; `tierpool acl` does)"
            )
        return "unknown"
    except ResponseError:
        return "unknown"
    role = info.get("role")
    replid = info.get("master_replid")
    if role is None or not replid:
        return "unknown"
    if role != "master":
        return "replica"
    return str(replid)


async def check_epoch(state: PoolState) -> tuple[Verdict, int]:
    """Compare the server's replid with the stored one; quarantine on a change.

    Returns the verdict and, when ``quarantined``, how many pods were marked.
    """
    replid = await server_replid(state.redis)
    if replid in ("unknown", "replica"):
        return replid, 0

    async def attempt(snap: ConfigSnapshot) -> list[Any]:
        call = state.leader_call("quarantine", snap, (replid,), extra_keys=(state.keys.replid,))
        answer = await run_one(state.redis, call)
        assert isinstance(answer, list)
        return answer

    answer = await retry_stale(state.source, attempt, lambda a: str(a[0]) == "stale")
    status = str(answer[0])
    if status == "quarantined":
        n = int(answer[1])
        log.warning(
            "Redis has a new replication history (master_replid %s): it may have lost "
            "the last writes; %d pods take no new call until their next heartbeat "
            "lists their calls",
            replid,
            n,
        )
        return "quarantined", n
    if status == "adopted":
        log.info("stored the replication id %s (state written before it was kept)", replid)
    if status in ("same", "adopted", "fresh", "stale"):
        return status, 0  # type: ignore[return-value]
    raise RuntimeError(f"quarantine.lua answered {answer!r}")


class Epoch:
    """Whether this process must check Redis's history before its next write.

    Dirty at start and after every sign that the server may have changed
    (:meth:`mark`: an outage, a refused write); :meth:`ensure` checks once
    and is free while clean, so the message path pays nothing in steady
    state. A check that cannot reach Redis raises and leaves it dirty.
    """

    def __init__(self, state: PoolState) -> None:
        self.state = state
        self.last: Verdict | None = None
        self._marks = 1  # marks so far; the check at start is owed
        self._checked = 0  # marks covered by the last completed check
        self._lock = anyio.Lock()

    @property
    def dirty(self) -> bool:
        return self._marks != self._checked

    def mark(self) -> None:
        """Redis may have changed under us: check before the next write."""
        self._marks += 1

    async def ensure(self) -> None:
        """Check now when marked; concurrent callers wait for the one check."""
        if not self.dirty:
            return
        async with self._lock:
            marks = self._marks
            if marks == self._checked:
                return
            self.last, _ = await check_epoch(self.state)  # raises: still dirty
            if self.last not in ("replica", "stale"):  # else writes are refused: look again
                self._checked = marks
