"""What every task of a worker process shares: settings, clients, state, flags.

``workers.worker`` builds one ``WorkerContext`` and starts each role with it
(consumer, claimer, config listener, leader candidate, HTTP server). Roles
talk to each other only through this object, never by importing each other.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field

from redis.asyncio import Redis

from tierpool.connect.redisconn import connect
from tierpool.core.configcache import ConfigCache
from tierpool.core.epoch import Epoch
from tierpool.core.errors import SettingsError
from tierpool.core.keys import Keys
from tierpool.core.podsource import PodSource
from tierpool.core.settings import Settings
from tierpool.core.state import PoolState
from tierpool.workers import metrics


def make_worker_id(pod_name: str | None = None) -> str:
    """Unique per process, readable in XINFO CONSUMERS: host-pid-random.

    ``POD_NAME`` (the anchor's downward-API name) replaces the host name when
    set, so the leader and each consumer are named after their pod.
    """
    return f"{pod_name or socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class Health:
    """Readiness facts /readyz reports; each role sets its own."""

    redis_ok: bool = False
    config_loaded: bool = False
    group_joined: bool = False
    subscribed: bool = False
    writes_refused: str = ""
    """Why Redis refuses this worker's writes now (OOM, READONLY...); "" when it does not."""

    @property
    def ready(self) -> bool:
        return (
            self.redis_ok and self.config_loaded and self.group_joined and not self.writes_refused
        )


@dataclass
class WorkerContext:
    settings: Settings
    keys: Keys
    redis: Redis
    cache: ConfigCache
    state: PoolState
    worker_id: str = field(default_factory=make_worker_id)
    health: Health = field(default_factory=Health)
    is_leader: bool = False
    leader_token: str | None = None
    pod_source: PodSource | None = None
    """Run by the leader each term besides its own loops (``POD_SOURCE``)."""
    epoch: Epoch = field(init=False)
    """Checks Redis's replication history before writes when it may have changed."""

    def __post_init__(self) -> None:
        self.epoch = Epoch(self.state)

    @classmethod
    def create(cls, settings: Settings, worker_id: str | None = None) -> WorkerContext:
        keys = Keys(settings.namespace)
        wid = worker_id or make_worker_id(settings.pod_name or None)
        redis = connect(
            settings.redis_target,
            client_name=f"tierpool:{wid}",
            namespace=settings.namespace,
        )
        cache = ConfigCache(redis, keys, settings)
        state = PoolState(redis, keys, settings, cache)
        state.on_stale_retry = metrics.stale_retries_total.inc
        ctx = cls(settings, keys, redis, cache, state, wid)
        ctx.pod_source = make_pod_source(settings)
        return ctx


def make_pod_source(settings: Settings) -> PodSource | None:
    """The pod source ``POD_SOURCE`` names; None for ``stream`` (pods announce themselves).

    Imported here, on demand: ``tierpool.kube`` needs the ``kubernetes`` extra,
    and an install without it must still run every other role.
    """
    if settings.pod_source != "kubernetes":
        return None
    try:
        from tierpool.kube import KubePodSource
    except ImportError as exc:
        raise SettingsError(
            "POD_SOURCE",
            settings.pod_source,
            f"needs the kubernetes extra: pip install 'tierpool[kubernetes]' ({exc})",
        ) from exc
    return KubePodSource(settings)
