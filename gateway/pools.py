"""What the gateway reads from pool state: pod lookup, status, and pool kinds.

Reads only (one pipelined round trip each): the gateway changes state
through requests on the streams, never directly. The tier config is kept in
hand and re-read every few seconds, for the one fact the allocate answer
needs from it: whether a pool is a merchant's (``source_pool`` is
``merchant:<pool>``) or a chain tier (``pool:<tier>``), as the anchor wrote it.
"""

from __future__ import annotations

import logging
from typing import Any, Final

import anyio
from anyio.abc import TaskStatus
from redis.asyncio import Redis

from tierpool.core.clock import now_ms
from tierpool.core.keys import Keys
from tierpool.core.snapshot import dedicated_pools
from tierpool.core.tierconfig import TierConfig, parse_tier_config

log = logging.getLogger(__name__)

CONFIG_REFRESH_S: Final = 5.0
ZONES: Final = ("open", "restricted")


class PoolView:
    """Pool kinds from a recent tier config, and the lookups of the anchor's GET endpoints."""

    def __init__(self, redis: Redis, keys: Keys, fallback: TierConfig) -> None:
        self.redis = redis
        self.keys = keys
        self.config = fallback
        self._dedicated = dedicated_pools(fallback)

    # --- the tier config ------------------------------------------------------
    def _install(self, raw: str | bytes | None) -> TierConfig | None:
        if not raw:
            return None
        try:
            config = parse_tier_config(raw, strict=False)
        except Exception as exc:  # a config we cannot read: keep the one in hand
            log.warning("gateway: cannot read the stored tier config (%s)", exc)
            return None
        self.config = config
        self._dedicated = dedicated_pools(config)
        return config

    async def refresh(self) -> None:
        self._install(await self.redis.get(self.keys.config))

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Re-read the tier config every :data:`CONFIG_REFRESH_S` until cancelled."""
        task_status.started()
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # Redis away: keep the config in hand, try again
                log.debug("gateway: tier config not re-read: %s", exc)
            await anyio.sleep(CONFIG_REFRESH_S)

    def source_pool(self, pool: str) -> str:
        """``source_pool`` as the anchor wrote it: ``merchant:<pool>`` or ``pool:<tier>``."""
        return f"merchant:{pool}" if pool in self._dedicated else f"pool:{pool}"

    # --- lookups ----------------------------------------------------------------
    async def is_draining(self, pod: str) -> bool:
        until = await self.redis.zscore(self.keys.pod_draining, pod)
        return until is not None and until >= now_ms()

    async def has_calls(self, pod: str) -> bool:
        return int(await self.redis.hget(self.keys.pod_load, pod) or 0) > 0

    async def pod(self, pod: str) -> dict[str, Any] | None:
        """``GET /api/v1/pod/{pod_name}``: None when the pod has no pool (the anchor's 404)."""
        k = self.keys
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hget(k.pod_pool, pod)
            pipe.zscore(k.pod_draining, pod)
            pipe.zrangebylex(k.pod_calls, *k.pod_calls_range(pod), start=0, num=1)
            pool, until, members = await pipe.execute()
        if not pool:
            return None
        call_ids = [m.partition(" ")[2] for m in members]
        doc: dict[str, Any] = {
            "pod_name": pod,
            "tier": pool,
            "is_draining": until is not None and until >= now_ms(),
            "has_active_lease": bool(call_ids),
        }
        if call_ids:
            doc["lease_call_sid"] = call_ids[0]
        return doc

    async def status(self) -> dict[str, Any]:
        """``GET /api/v1/status``: every configured tier with its assigned and available pods.

        ``available`` counts the pods that can take a call now (alive, not
        draining, below ``max_concurrent``); ``active_calls`` is the live
        calls of every pod. ``is_leader`` is false: the gateway is never a
        leader. Redis down: ``status: down`` with no pools, as the anchor.
        """
        k = self.keys
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.get(k.config)
                pipe.hgetall(k.pool_count)
                pipe.hvals(k.pod_load)
                raw, counts, loads = await pipe.execute()
            config = self._install(raw) or self.config
            names = list(config.pools)
            async with self.redis.pipeline(transaction=False) as pipe:
                for name in names:
                    for zone in ZONES:
                        pipe.zcard(k.pool_free(name, zone))
                free = await pipe.execute()
        except Exception as exc:
            log.warning("gateway: status read failed: %s", exc)
            return {"pools": {}, "active_calls": 0, "is_leader": False, "status": "down"}
        pools = {
            name: {
                "type": config.tier(name).type,
                "assigned": int(counts.get(name) or 0),
                "available": int(free[2 * i]) + int(free[2 * i + 1]),
            }
            for i, name in enumerate(names)
        }
        active = sum(max(0, int(v)) for v in loads)
        return {"pools": pools, "active_calls": active, "is_leader": False, "status": "up"}
