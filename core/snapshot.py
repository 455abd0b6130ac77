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
    unreadable: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    """Merchant -> why its stored policy cannot be read (an unknown key written
    by hand or by a newer release). Only that merchant's requests are
    rejected, with the reason (contract v1.1); everyone else is served."""
    reserved: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    """Merchant -> the pool an unreadable policy names, when that much can be
    read: the pool stays the merchant's, so no other tenant is placed in it."""

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
                pool: m
                for m, pool in sorted(self.reserved.items())
                if pool in dedicated and m not in self.merchants
            }
            cached.update(
                {
                    p.pool: m
                    for m, p in sorted(self.merchants.items())
                    if p.pool is not None and p.pool in dedicated
                }
            )
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


def _named_pool(raw: str | bytes) -> str | None:
    """The ``pool`` an unreadable policy names, when it is a JSON object with a string there."""
    try:
        doc = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return None
    pool = doc.get("pool") if isinstance(doc, dict) else None
    return pool if isinstance(pool, str) else None


def decode_policies(
    stored: Mapping[str, str | bytes],
) -> tuple[dict[str, MerchantPolicy], dict[str, str], dict[str, str]]:
    """Policies that can be read; why the others cannot; the pools those still name.

    One bad policy must not stop the namespace (issue: a policy with an
    unknown key plus a version bump stopped every allocation): it affects
    only its merchant.
    """
    good: dict[str, MerchantPolicy] = {}
    bad: dict[str, str] = {}
    reserved: dict[str, str] = {}
    for merchant, raw in stored.items():
        try:
            good[merchant] = decode_policy(raw)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            bad[merchant] = str(exc)[:200]
            pool = _named_pool(raw)
            if pool is not None:
                reserved[merchant] = pool
    return good, bad, reserved


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
    merchants, unreadable, reserved = decode_policies(merchants_raw or {})
    return ConfigSnapshot(
        config,
        MappingProxyType(merchants),
        int(mv or 0),
        MappingProxyType(unreadable),
        MappingProxyType(reserved),
    )


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
