"""Helpers for state-machine tests: a PoolState over a config written to Redis."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec
from redis.asyncio import Redis

from tierpool.core.keys import Keys
from tierpool.core.settings import Settings
from tierpool.core.snapshot import ConfigSnapshot, read_snapshot
from tierpool.core.state import Outcome, PoolState
from tierpool.core.tierconfig import default_tier_config, parse_tier_config, to_json
from tierpool.schemas import (
    AllocateRequest,
    DrainRequest,
    PodDeregister,
    PodHeartbeat,
    PodRegister,
    ReleaseRequest,
)

KEYS = Keys("t")


class RedisSource:
    """Reads the snapshot from Redis on every refresh (no cache: tests see truth)."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self.snap: ConfigSnapshot | None = None

    def current(self) -> ConfigSnapshot:
        assert self.snap is not None, "call refresh() first"
        return self.snap

    async def refresh(self) -> ConfigSnapshot:
        snap = await read_snapshot(self.redis, self.keys, default_tier_config())
        assert snap is not None, "no config stored"
        self.snap = snap
        return snap


async def write_config(r: Redis, config: str | Mapping[str, Any], version: int = 1) -> None:
    raw = config if isinstance(config, str) else msgspec.json.encode(config).decode()
    cfg = parse_tier_config(raw, version=version)
    await r.mset({KEYS.config: to_json(cfg), KEYS.config_version: str(version)})


async def make_state(
    r: Redis, config: str | Mapping[str, Any], env: Mapping[str, str] | None = None
) -> PoolState:
    await write_config(r, config)
    source = RedisSource(r, KEYS)
    await source.refresh()
    return PoolState(r, KEYS, Settings.from_env(dict(env or {})), source)


class Ops:
    """Short names for transitions, with auto request ids."""

    def __init__(self, state: PoolState) -> None:
        self.state = state
        self.n = 0

    def rid(self) -> str:
        self.n += 1
        return f"r{self.n}"

    async def register(
        self,
        pod: str,
        zone: str = "open",
        capability: int = 1,
        now_ms: int | None = None,
        calls: list[str] | None = None,
    ) -> Outcome:
        return await self.state.apply(
            PodRegister(
                request_id=self.rid(),
                pod_id=pod,
                endpoint=f"http://{pod}:8080",
                zone=zone,
                capability=capability,
                calls=None if calls is None else tuple(calls),
            ),
            now_ms=now_ms,
        )  # type: ignore[arg-type]

    async def heartbeat(
        self, pod: str, calls: list[str] | None = None, now_ms: int | None = None
    ) -> Outcome:
        return await self.state.apply(
            PodHeartbeat(
                request_id=self.rid(), pod_id=pod, calls=None if calls is None else tuple(calls)
            ),
            now_ms=now_ms,
        )

    async def deregister(self, pod: str) -> Outcome:
        return await self.state.apply(PodDeregister(request_id=self.rid(), pod_id=pod))

    async def allocate(self, call: str, now_ms: int | None = None, **kw: Any) -> Outcome:
        return await self.state.apply(
            AllocateRequest(request_id=self.rid(), call_id=call, **kw), now_ms=now_ms
        )

    async def release(self, call: str) -> Outcome:
        return await self.state.apply(ReleaseRequest(request_id=self.rid(), call_id=call))

    async def drain(self, pod: str, action: str = "drain") -> Outcome:
        return await self.state.apply(
            DrainRequest(request_id=self.rid(), pod_id=pod, action=action)
        )  # type: ignore[arg-type]
