"""The worker's in-memory tier config and merchant policies (minimal version).

Bootstrap as the anchor: the ``TIER_CONFIG`` env value is written to
``tp:{NS}:config`` only when absent; when present, Redis wins. ``current()``
never touches Redis; ``refresh()`` re-reads. Pub/sub invalidation and the
safety re-read are added on top of this (issue 5).
"""

from __future__ import annotations

import logging

from redis.asyncio import Redis

from core.keys import Keys
from core.settings import Settings
from core.snapshot import ConfigSnapshot, read_snapshot
from core.tierconfig import TierConfig, parse_tier_config, to_json

log = logging.getLogger(__name__)


def env_config(settings: Settings) -> TierConfig:
    """The ``TIER_CONFIG`` of the environment (the default one when empty)."""
    return parse_tier_config(settings.tier_config or "", version=1)


async def bootstrap(redis: Redis, keys: Keys, config: TierConfig, after_version: int = 0) -> bool:
    """Store ``config`` when Redis has none (config and version together). True if stored.

    ``after_version`` lets a worker that knew version N before Redis lost its
    data store N+1, so no worker mistakes the new config for its old N.
    """
    version = max(config.version, after_version + 1, 1)
    stored = config.with_version(version)
    return bool(await redis.msetnx({keys.config: to_json(stored), keys.config_version: version}))


class ConfigCache:
    """A snapshot source for :class:`core.state.PoolState`."""

    def __init__(self, redis: Redis, keys: Keys, settings: Settings) -> None:
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self._env = env_config(settings)
        self._snap = ConfigSnapshot(self._env)

    def current(self) -> ConfigSnapshot:
        return self._snap

    async def refresh(self) -> ConfigSnapshot:
        """Re-read Redis; bootstrap when it holds no config (first start, data loss)."""
        snap = await read_snapshot(self.redis, self.keys, self._env)
        if snap is None:
            if await bootstrap(self.redis, self.keys, self._env, self._snap.version):
                log.info("tier config bootstrapped from TIER_CONFIG")
            snap = await read_snapshot(self.redis, self.keys, self._env)
            if snap is None:  # pragma: no cover - flushed again in between
                return self._snap
        self._snap = snap
        return snap
