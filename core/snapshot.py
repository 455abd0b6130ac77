"""One consistent view of the tier config and merchant policies.

Every decision (which pools a call may use, which pool a pod joins) is made
from one ``ConfigSnapshot`` and sent to a script together with the snapshot's
versions; the script refuses (``stale``) when Redis holds newer ones. So a
worker never acts on an old config, however late its invalidation arrives.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol, TypeVar

import msgspec
from redis.asyncio import Redis

from tierpool.core.keys import Keys
from tierpool.core.tierconfig import TierConfig, parse_tier_config
from tierpool.schemas import MerchantPolicy

_policy_decoder = msgspec.json.Decoder(MerchantPolicy)


@dataclass(frozen=True)
class ConfigSnapshot:
    """Tier config + merchant policies, each with the version it was read at."""

    config: TierConfig
    merchants: Mapping[str, MerchantPolicy] = field(default_factory=lambda: MappingProxyType({}))
    merchants_version: int = 0

    @property
    def version(self) -> int:
        return self.config.version

    def owner_of(self, pool: str) -> str | None:
        """The merchant whose dedicated pool this is, if any."""
        return self.pool_owners.get(pool)

    @property
    def pool_owners(self) -> Mapping[str, str]:
        cached: Mapping[str, str] | None = self.__dict__.get("_owners")
        if cached is None:
            dedicated = dedicated_pools(self.config)
            cached = {
                p.pool: m
                for m, p in sorted(self.merchants.items())
                if p.pool is not None and p.pool in dedicated
            }
            object.__setattr__(self, "_owners", cached)
        return cached


def dedicated_pools(config: TierConfig) -> frozenset[str]:
    """Pools outside the default chain: reserved for the merchant that names them.

    The anchor counted only exclusive tiers here (digest §14.26: "merchant
    pools are exclusive only"); any tier outside the chain is dedicated here,
    shared ones included.
    """
    chain = set(config.default_chain)
    return frozenset(name for name in config.pools if name not in chain)


def decode_policy(raw: str | bytes) -> MerchantPolicy:
    return _policy_decoder.decode(raw)


async def read_snapshot(redis: Redis, keys: Keys, fallback: TierConfig) -> ConfigSnapshot | None:
    """Read config and merchants in one round trip; None when no config is stored.

    A stored config that does not parse is an error (raised), not "missing":
    the caller keeps its current snapshot and logs why.
    """
    async with redis.pipeline(transaction=True) as pipe:
        pipe.get(keys.config)
        pipe.get(keys.config_version)
        pipe.hgetall(keys.merchants)
        pipe.get(keys.merchants_version)
        raw, version, merchants_raw, mv = await pipe.execute()
    if raw is None:
        return None
    config = parse_tier_config(raw, version=int(version or 0), strict=False)
    merchants = {m: decode_policy(p) for m, p in (merchants_raw or {}).items()}
    return ConfigSnapshot(config, MappingProxyType(merchants), int(mv or 0))


class SnapshotSource(Protocol):
    """Where the state API gets its snapshot (the config cache, or a test's)."""

    def current(self) -> ConfigSnapshot: ...

    async def refresh(self) -> ConfigSnapshot: ...


STALE_TRIES = 4
"""Attempts at one decision while scripts answer ``stale`` (Redis holds a newer
config or policy set): the first, then one after each refresh. Past that the
caller reports ``stale`` and tries again later (an entry stays pending)."""

T = TypeVar("T")


async def retry_stale(
    source: SnapshotSource,
    attempt: Callable[[ConfigSnapshot], Awaitable[T]],
    is_stale: Callable[[T], bool],
    on_retry: Callable[[T], object] | None = None,
) -> T:
    """Run ``attempt`` with the current snapshot, and again with a refreshed one
    while its result ``is_stale``, at most :data:`STALE_TRIES` times; the last
    result either way. ``on_retry`` sees each stale result that is retried.
    The one retry rule of every script caller."""
    snap = source.current()
    for n in range(1, STALE_TRIES + 1):
        result = await attempt(snap)
        if n == STALE_TRIES or not is_stale(result):
            break
        if on_retry is not None:
            on_retry(result)
        snap = await source.refresh()
    return result
