"""What every benchmark part shares: tier mixes, settings, pods, percentiles.

The benchmark registers its pods once and never heartbeats them: the pool
state, not the pods, is what is measured. So every process of a run (the
benchmark's own and the workers) uses a long ``POD_TTL`` (and a longer
``LEASE_TTL``, which must exceed it), so pods stay alive however long the run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from redis.asyncio import Redis

from tierpool.core.keys import Keys
from tierpool.core.settings import Settings
from tierpool.core.snapshot import ConfigSnapshot, read_snapshot
from tierpool.core.state import PoolState
from tierpool.core.tierconfig import default_tier_config, parse_tier_config, to_json
from tierpool.schemas import PodRegister
from tierpool.workers.metrics import percentile

TIER_MIXES: Final = ("exclusive", "shared", "mixed")
SHARED_MAX_CONCURRENT: Final = 4

BENCH_ENV: Final[Mapping[str, str]] = {
    "POD_TTL": "1h",
    "LEASE_TTL": "2h",
    "CALL_INFO_TTL": "2h",
    "LOG_LEVEL": "info",
    "LOG_FORMAT": "json",
}
"""Settings of every process of a run: pods registered once stay alive."""

REGISTER_BATCH: Final = 500


def tier_config(mix: str, pods: int) -> dict[str, Any]:
    """A structured tier config for ``mix`` whose targets add up to ``pods``.

    - ``exclusive``: gold / standard / overflow, all exclusive (the default's shape);
    - ``shared``: one shared pool of ``SHARED_MAX_CONCURRENT`` calls per pod;
    - ``mixed``: an exclusive pool first in the chain, then a shared one, so
      allocations cross from one to the other once the first is full.
    """
    if mix == "exclusive":
        gold, standard = pods // 4, pods // 2
        tiers: dict[str, Any] = {
            "gold": {"type": "exclusive", "target": gold},
            "standard": {"type": "exclusive", "target": standard},
            "overflow": {"type": "exclusive", "target": pods - gold - standard},
        }
        chain = ["gold", "standard", "overflow"]
    elif mix == "shared":
        tiers = {
            "basic": {"type": "shared", "target": pods, "max_concurrent": SHARED_MAX_CONCURRENT}
        }
        chain = ["basic"]
    elif mix == "mixed":
        half = pods // 2
        tiers = {
            "gold": {"type": "exclusive", "target": half},
            "basic": {
                "type": "shared",
                "target": pods - half,
                "max_concurrent": SHARED_MAX_CONCURRENT,
            },
        }
        chain = ["gold", "basic"]
    else:
        raise ValueError(f"unknown tier mix {mix!r}: one of {', '.join(TIER_MIXES)}")
    return {"tiers": tiers, "default_chain": chain}


def capacity(mix: str, pods: int) -> int:
    """Calls the pools of ``mix`` hold at once: the most a closed loop may keep live."""
    cfg = tier_config(mix, pods)
    total = 0
    for spec in cfg["tiers"].values():
        per_pod = spec.get("max_concurrent", 1) if spec["type"] == "shared" else 1
        total += spec["target"] * per_pod
    return int(total)


def bench_settings(url: str, namespace: str, **env: str) -> Settings:
    return Settings.from_env(
        {**BENCH_ENV, "REDIS_URL": url, "TIERPOOL_NAMESPACE": namespace, **env}
    )


class RedisSnapshot:
    """A snapshot source that reads Redis on every refresh (no pub/sub needed)."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._snap: ConfigSnapshot | None = None

    def current(self) -> ConfigSnapshot:
        if self._snap is None:
            raise RuntimeError("refresh() first")
        return self._snap

    async def refresh(self) -> ConfigSnapshot:
        snap = await read_snapshot(self.redis, self.keys, default_tier_config())
        if snap is None:
            raise RuntimeError("no tier config stored")
        self._snap = snap
        return snap


async def write_config(redis: Redis, keys: Keys, config: Mapping[str, Any]) -> int:
    """Store ``config`` as the namespace's config, one version above what is there."""
    version = int(await redis.get(keys.config_version) or 0) + 1
    cfg = parse_tier_config(_dumps(config), version=version)
    await redis.mset({keys.config: to_json(cfg), keys.config_version: str(version)})
    return version


async def make_state(redis: Redis, settings: Settings) -> PoolState:
    keys = Keys(settings.namespace)
    source = RedisSnapshot(redis, keys)
    await source.refresh()
    return PoolState(redis, keys, settings, source)


async def register_pods(state: PoolState, pods: int, prefix: str = "pod") -> None:
    """Register ``pods`` pods straight through the state API (they fill the chain)."""
    for start in range(0, pods, REGISTER_BATCH):
        batch = [
            (PodRegister(pod_id=f"{prefix}-{i}", endpoint=f"http://{prefix}-{i}:8080"), None)
            for i in range(start, min(pods, start + REGISTER_BATCH))
        ]
        outcomes = await state.run(batch)
        bad = [o for o in outcomes if o.status != "registered"]
        if bad:
            raise RuntimeError(f"registering pods failed: {bad[0]}")


async def setup_namespace(redis: Redis, settings: Settings, mix: str, pods: int) -> PoolState:
    """A fresh namespace: config for ``mix`` stored, ``pods`` pods registered."""
    await write_config(redis, Keys(settings.namespace), tier_config(mix, pods))
    state = await make_state(redis, settings)
    await register_pods(state, pods)
    return state


@dataclass(frozen=True, slots=True)
class Quantiles:
    n: int
    p50: float
    p99: float
    p999: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Quantiles:
        def q(x: float) -> float:
            value = percentile(values, x)
            return math.nan if value is None else value

        return cls(len(values), q(0.5), q(0.99), q(0.999), max(values, default=math.nan))


def _dumps(value: Mapping[str, Any]) -> str:
    import msgspec

    return msgspec.json.encode(dict(value)).decode()
