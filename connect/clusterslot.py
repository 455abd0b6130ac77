"""Redis Cluster: every connection of a namespace goes to the node that serves its slot.

A namespace's keys (``tp:{NS}:...``) share one hash tag, so one slot and one
master hold all of them, and every script, transaction, pipeline, pub/sub
channel (``SSUBSCRIBE``) and blocking read of the namespace runs on that
one node. So rather than routing command by command (redis-py's
``RedisCluster``, whose pipelines cannot batch ``EVALSHA`` the lean way,
whose transactions reject the keyless ``TIME``, and whose connections a
``CLIENT UNBLOCK`` cannot name), a namespace's client is a plain client
whose connections, each time they (re)connect, ask the cluster which node
serves the slot — the same shape as a Sentinel-managed connection.

Following the cluster:

- ``MOVED`` (the slot moved, or a replica was promoted and the old master
  demoted), ``ASK`` and ``TRYAGAIN`` (the slot is being migrated) and
  ``CLUSTERDOWN`` mean the command was not run. The connection forgets the
  slot's node and drops itself; the error is raised as a connection error,
  which redis-py's retry and every loop of tierpool already treat as "Redis
  away for a moment": the command is sent again to the node that serves
  the slot then. A migration therefore pauses the namespace until it ends
  (a script touching keys on both sides of a migration cannot run anywhere
  in the meantime), and loses nothing.
- A dead master is still named by the other nodes until its replica is
  promoted (``cluster-node-timeout`` plus an election): connecting fails
  meanwhile, exactly like a Redis restart.

Cluster mode is detected from the server at the first connection (``HELLO``
names it, ``mode``; unlike ``INFO cluster`` it needs no ACL permission; in a
cluster, ``CLUSTER SLOTS`` must be allowed), or forced by
``TIERPOOL_REDIS_CLUSTER=yes|no``. Connections that must see the redirect
as an answer (the client's multiplexed writer: a refused ``XADD`` is
requeued, not resent blindly) pass ``redirects_raise=False``.
"""

from __future__ import annotations

import logging
from collections.abc import Coroutine
from typing import Any, Final

import anyio
from redis.asyncio.connection import AbstractConnection
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    AuthenticationError,
    ClusterDownError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tierpool.core.redistarget import ClusterMode

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S: Final = 1.0
REDIRECTS: Final = ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN")


def namespace_slot(namespace: str) -> int:
    """The slot of every key of ``namespace`` (its hash tag is the namespace)."""
    return key_slot(f"tp:{{{namespace}}}:".encode())


def is_redirect(exc: BaseException) -> bool:
    """Whether ``exc`` is a cluster's "not here, not now" (the command did not run)."""
    # redis-py parses these into their own classes, whose message drops the code
    if isinstance(exc, AskError | TryAgainError | ClusterDownError):  # MovedError is an AskError
        return True
    return isinstance(exc, ResponseError) and str(exc).split(" ", 1)[0] in REDIRECTS


class SlotOwner:
    """Which node serves one slot; found by asking the nodes, forgotten on a redirect.

    Shared by every connection of a client. ``seeds`` are the URL's host;
    every node seen in a ``CLUSTER SLOTS`` answer is asked too later, so a
    dead seed does not blind the client.
    """

    def __init__(
        self,
        seed: tuple[str, int],
        slot: int | None,
        mode: ClusterMode,
        probe_class: type[AbstractConnection],
        probe_kwargs: dict[str, Any],
    ) -> None:
        self.seed = seed
        self.slot = slot
        self.cluster: bool | None = {"auto": None, "yes": True, "no": False}[mode]
        self._probe_class = probe_class
        self._probe_kwargs = probe_kwargs
        self._known: list[tuple[str, int]] = []
        self._address: tuple[str, int] | None = None
        self._lock = anyio.Lock()
        self.lookups = 0

    def forget(self) -> None:
        """Ask the cluster again at the next connection."""
        self._address = None

    async def is_cluster(self) -> bool:
        """Whether the server is a cluster (asked once when the mode is ``auto``)."""
        if self.cluster is None:
            await self.address()
        return bool(self.cluster)

    async def address(self) -> tuple[str, int]:
        """The node to connect to now: the slot's master, or the seed when not a cluster."""
        address = self._address
        if address is not None:
            return address
        async with self._lock:
            if self._address is None:
                self._address = await self._find()
            return self._address

    async def _find(self) -> tuple[str, int]:
        if self.cluster is False:
            return self.seed
        problems: list[str] = []
        for node in dict.fromkeys([*self._known, self.seed]):  # known nodes first, in order
            conn = self._probe_class(  # type: ignore[call-arg]
                host=node[0],
                port=node[1],
                **self._probe_kwargs,
                socket_timeout=PROBE_TIMEOUT_S,
                socket_connect_timeout=PROBE_TIMEOUT_S,
            )
            try:
                try:
                    await conn.connect_check_health(retry_socket_connect=False)
                except (AuthenticationError, ResponseError):
                    if self.cluster is None:
                        # refused at the handshake (credentials): the caller's own
                        # connection to the URL's host then says why, as without us
                        return self.seed
                    raise
                if self.cluster is None:
                    # HELLO (no arguments: the protocol stays) names the mode and, unlike
                    # INFO, needs no ACL permission.
                    await conn.send_command("HELLO")
                    try:
                        self.cluster = _mode(await conn.read_response()) == "cluster"
                    except (ResponseError, AuthenticationError):
                        # refused (a stand-in without HELLO, or no credentials): connect
                        # as to a single Redis, which then answers with the real error
                        self.cluster = False
                    if not self.cluster:
                        return self.seed
                owner = await self._ask(conn, node)
            except (RedisConnectionError, RedisTimeoutError, OSError, ResponseError) as exc:
                if self.cluster is None:
                    raise  # not even known to be a cluster: the plain error says it best
                problems.append(f"{node[0]}:{node[1]}: {exc}")
                continue
            finally:
                await conn.disconnect()
            if owner is not None:
                self.lookups += 1
                return owner
            problems.append(f"{node[0]}:{node[1]}: serves no node for slot {self.slot}")
        raise RedisConnectionError(
            f"no cluster node named the master of slot {self.slot}: {'; '.join(problems)}"
        )

    async def _ask(self, conn: AbstractConnection, via: tuple[str, int]) -> tuple[str, int] | None:
        """The master of ``self.slot`` per ``CLUSTER SLOTS`` on ``conn``; learns every node."""
        if self.slot is None:
            raise RedisConnectionError(
                "Redis is a cluster: the client needs the namespace whose slot it serves"
            )
        await conn.send_command("CLUSTER", "SLOTS")
        ranges: Any = await conn.read_response()
        owner: tuple[str, int] | None = None
        known: list[tuple[str, int]] = []
        for entry in ranges or ():
            start, end, *nodes = entry
            for i, node in enumerate(nodes):
                host = str(node[0]) or via[0]
                address = (host, int(node[1]))
                known.append(address)
                if i == 0 and int(start) <= self.slot <= int(end):
                    owner = address
        self._known = list(dict.fromkeys(known))
        return owner


class SlotPinned(AbstractConnection):
    """A connection to whichever node serves its client's slot (see the module doc)."""

    def __init__(self, **kwargs: Any) -> None:
        self.slot_owner: SlotOwner = kwargs.pop("slot_owner")
        self.redirects_raise: bool = kwargs.pop("redirects_raise", True)
        super().__init__(**kwargs)

    async def _connect(self) -> None:
        self.host, self.port = await self.slot_owner.address()
        try:
            await super()._connect()  # type: ignore[safe-super,no-untyped-call]
        except (OSError, RedisConnectionError, RedisTimeoutError, TimeoutError):
            self.slot_owner.forget()  # a dead master: ask which node serves the slot now
            raise

    def read_response(
        self,
        disable_decoding: bool = False,
        timeout: float | None = None,
        *,
        disconnect_on_error: bool = True,
        push_request: bool | None = False,
    ) -> Coroutine[Any, Any, Any]:
        """On a standalone Redis, redis-py's own read (no extra frame on the hot path)."""
        read = super().read_response(
            disable_decoding=disable_decoding,
            timeout=timeout,
            disconnect_on_error=disconnect_on_error,
            push_request=push_request,
        )
        if self.slot_owner.cluster is False:
            return read
        return self._following(read)

    async def _following(self, read: Coroutine[Any, Any, Any]) -> Any:
        try:
            return await read
        except ResponseError as exc:
            if not is_redirect(exc):
                raise
            self.slot_owner.forget()
            if not self.redirects_raise:
                raise
            await self.disconnect()
            raise RedisConnectionError(f"cluster redirect ({exc}): reconnecting") from exc


def _mode(hello: Any) -> str:
    """``mode`` of a ``HELLO`` answer (a RESP3 map, or RESP2's flat list)."""
    if isinstance(hello, dict):
        return str(hello.get("mode", ""))
    items = list(hello or ())
    return next((str(v) for k, v in zip(items[::2], items[1::2], strict=False) if k == "mode"), "")


_PINNED: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def slot_pinned(cls: type[AbstractConnection]) -> type[AbstractConnection]:
    """``cls`` (plain or TLS connection) following its slot's node; made once per class."""
    pinned = _PINNED.get(cls)
    if pinned is None:
        pinned = _PINNED[cls] = type(f"SlotPinned{cls.__name__}", (SlotPinned, cls), {})
    return pinned
