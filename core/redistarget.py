"""Where a process finds Redis, as settings describe it; and the one question the
core asks of a connected client (is its server a Redis Cluster?).

Pure data and a duck-typed check: the connection code itself
(:mod:`tierpool.connect`: standalone, Sentinel and Cluster) is an edge the
core never imports. Clients made by ``tierpool.connect.redisconn.connect``
carry a slot owner in their connection settings; :func:`on_cluster` asks it
through :class:`SlotOwnerLike`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from redis.asyncio import Redis

ClusterMode = Literal["auto", "yes", "no"]


class SlotOwnerLike(Protocol):
    """What a cluster-aware connection exposes to the core."""

    async def is_cluster(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Where a process finds Redis: ``url``, and the Sentinels to ask for its master.

    With ``sentinels`` (``host:port`` strings), ``url`` still supplies the
    scheme (``rediss`` for TLS), user, password, database and TLS query
    options (``ssl_ca_certs``...), but not the host: the Sentinels name the
    master. The Sentinels are reached with the URL's TLS options and without
    its credentials.
    """

    url: str
    sentinels: Sequence[str] = ()
    sentinel_master: str = "mymaster"
    cluster: ClusterMode = "auto"
    """Redis Cluster: ``auto`` asks the server (``HELLO``), ``yes``/``no`` force it."""
    retries: int = 3
    """The anchor's ``REDIS_MAX_RETRIES``: retries of a command whose connection failed."""
    connect_timeout_s: float = 5.0
    """The anchor's ``REDIS_DIAL_TIMEOUT``."""

    def sentinel_addresses(self) -> list[tuple[str, int]]:
        out = []
        for item in self.sentinels:
            host, _, port = item.strip().rpartition(":")
            out.append((host.strip("[]"), int(port)))
        return out


async def on_cluster(redis: Redis) -> bool:
    """Whether ``redis`` talks to a Redis Cluster (its slot owner says so).

    A client that was not made by tierpool's connection code carries no slot
    owner: it is taken as standalone.
    """
    owner: SlotOwnerLike | None = redis.connection_pool.connection_kwargs.get("slot_owner")
    return owner is not None and await owner.is_cluster()
