"""A stored merchant policy that cannot be read (issue 12 item 5, contract v1.1).

A policy with an unknown key (written by hand, or by a newer release during
a rolling upgrade) plus a merchants version bump stopped every allocation in
the namespace: the worker's snapshot read failed as a whole, so every script
answered ``stale`` for ever. Now only that merchant's requests are rejected,
with the reason; every other request is served, and the pool the policy
names stays reserved for it.
"""

from __future__ import annotations

import msgspec
import pytest
from redis.asyncio import Redis

from tests.statekit import KEYS, Ops, write_config
from tierpool.core.configcache import ConfigCache
from tierpool.core.settings import Settings
from tierpool.core.state import PoolState
from tierpool.schemas import ConfigRequest, MerchantPolicy

pytestmark = pytest.mark.anyio

CONFIG = {
    "tiers": {
        "gold": {"type": "exclusive", "target": 2},
        "acme": {"type": "exclusive", "target": 1},
        "zeta": {"type": "exclusive", "target": 1},
    },
    "default_chain": ["gold"],
}


async def test_a_bad_stored_policy_affects_only_its_merchant(r: Redis) -> None:
    await write_config(r, CONFIG)
    settings = Settings.from_env({})
    cache = ConfigCache(r, KEYS, settings)
    await cache.refresh()
    ops = Ops(PoolState(r, KEYS, settings, cache))
    good = await ops.state.apply(
        ConfigRequest(request_id="p1", merchant_id="m1", merchant=MerchantPolicy(pool="acme"))
    )
    assert good.status == "applied"
    await cache.refresh()
    for pod in ("g0", "g1", "a0", "z0"):
        assert (await ops.register(pod)).status == "registered"
    # A newer release (or a hand) stores a policy this one cannot read, and bumps the version.
    await r.hset(KEYS.merchants, "m2", msgspec.json.encode({"pool": "zeta", "priority": 7}))
    await r.incr(KEYS.merchants_version)

    plain = await ops.allocate("c-plain")
    assert plain.status == "allocated" and plain.fields["pool"] == "gold"
    mine = await ops.allocate("c-m1", merchant_id="m1")
    assert mine.status == "allocated" and mine.fields["pool"] == "acme"
    bad = await ops.allocate("c-m2", merchant_id="m2")
    assert bad.status == "rejected"
    [reason] = msgspec.json.decode(bad.fields["reasons"])
    assert reason["filter"] == "merchant"
    assert "m2" in reason["detail"] and "cannot be read" in reason["detail"]
    assert "priority" in reason["detail"]
    # The pool the unreadable policy names is still nobody else's.
    stranger = await ops.allocate("c-x", chain=("zeta",), tier_mode="flexible")
    assert stranger.status in ("allocated", "rejected")
    if stranger.status == "allocated":
        assert stranger.fields["pool"] != "zeta"
    assert cache.current().unreadable.keys() == {"m2"}
    # Fixing the policy serves the merchant again.
    fixed = await ops.state.apply(
        ConfigRequest(request_id="p2", merchant_id="m2", merchant=MerchantPolicy(pool="zeta"))
    )
    assert fixed.status == "applied"
    await cache.refresh()
    assert (await ops.allocate("c-m2b", merchant_id="m2")).fields["pool"] == "zeta"
