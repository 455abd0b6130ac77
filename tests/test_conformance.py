"""The same flows on both backends: a real redis-server and the fakeredis server.

``tierpool run`` falls back to fakeredis (``workers/fakeserver.py``) where no
redis-server exists, so everything a first user does there must behave as on
Redis: a real worker process and the client library run the acceptance flows
(register, allocate, repeat, release, drain, config change, merchant policy)
against each backend, and the expected replies are the same. The state-model
test runs on both backends too (``tests/test_state_model.py``). Differences
that remain are listed in the README ("Trying it out without Redis").
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from redis.asyncio import Redis

from tests.conftest import wait_for
from tests.procs import WorkerPool
from tierpool.client import TierpoolClient
from tierpool.connect.redisconn import connect
from tierpool.core.keys import Keys
from tierpool.schemas import MerchantPolicy, PodDeregister, PodHeartbeat, PodRegister

pytestmark = pytest.mark.anyio

NS = "t"
KEYS = Keys(NS)


@pytest.fixture
async def system(backend_url: str, tmp_path: Path) -> AsyncIterator[tuple[Redis, TierpoolClient]]:
    r = connect(backend_url)
    try:
        with WorkerPool(backend_url, tmp_path, env={"POD_TTL": "60s"}) as pool:
            await pool.start(r, 1)
            async with TierpoolClient.from_url(backend_url, namespace=NS) as client:
                yield r, client
    finally:
        await r.aclose()


async def test_acceptance_flows_behave_alike(system: tuple[Redis, TierpoolClient]) -> None:
    r, client = system
    config = {
        "tiers": {
            "gold": {"type": "exclusive", "target": 2},
            "shared": {"type": "shared", "target": 2, "max_concurrent": 2},
            "acme": {"type": "exclusive", "target": 1},
        },
        "default_chain": ["gold", "shared"],
    }
    applied = await client.change_config(msgspec.json.encode(config).decode())
    assert applied.status == "applied", applied

    for i in range(5):
        reply = await client.send_pod_event(
            PodRegister(pod_id=f"p{i}", endpoint=f"http://10.0.0.{i}:8080")
        )
        assert reply is not None and reply.status == "registered", reply

    async def assigned() -> bool:
        pools = await r.hgetall(KEYS.pod_pool)
        return sorted(pools.values()).count("") == 0 and len(pools) == 5

    await wait_for(assigned)

    first = await client.allocate("call-1")
    assert first.status == "allocated" and first.pod_id and not first.existing
    again = await client.allocate("call-1")
    assert again.status == "allocated" and again.pod_id == first.pod_id and again.existing

    hb = await client.send_pod_event(PodHeartbeat(pod_id=first.pod_id, calls=("call-1",)))
    assert hb is not None and hb.status == "alive"

    released = await client.release("call-1")
    assert released.status == "released"
    assert (await client.release("call-1")).status == "not_found"

    drained = await client.drain(first.pod_id, reason="test")
    assert drained.status == "drained"
    placed = [await client.allocate(f"d{i}") for i in range(3)]
    assert all(p.status == "allocated" and p.pod_id != first.pod_id for p in placed), placed
    assert (await client.undrain(first.pod_id)).status == "undrained"

    policy = await client.set_merchant("acme-co", MerchantPolicy(pool="acme", fallback=()))
    assert policy.status == "applied", policy
    mine = await client.allocate("m1", merchant_id="acme-co")
    assert mine.status == "allocated" and mine.pool == "acme", mine
    full = await client.allocate("m2", merchant_id="acme-co")
    assert full.status == "rejected" and full.reasons, full

    stale = await client.change_config("{}")
    assert stale.status == "invalid"
    bye = await client.send_pod_event(PodDeregister(pod_id="p4"))
    assert bye is not None and bye.status == "deregistered"


async def test_entries_of_a_dead_consumer_are_claimed_once(
    backend_url: str, tmp_path: Path
) -> None:
    """XAUTOCLAIM and the scripts' pending check, on both backends: entries a
    consumer read and never acknowledged are answered once by a live worker."""
    r = connect(backend_url)
    try:
        stream = KEYS.request_stream("allocate")
        await r.xgroup_create(stream, "tierpool", id="0", mkstream=True)
        for i in range(5):
            await r.xadd(stream, {"request_id": f"r{i}", "call_id": f"c{i}"})
        taken = await r.xreadgroup("tierpool", "ghost", {stream: ">"}, count=10)
        assert len(taken[0][1]) == 5
        with WorkerPool(backend_url, tmp_path) as pool:
            await pool.start(r, 1)

            async def all_answered() -> bool:
                return all([await r.exists(KEYS.reply(f"r{i}")) for i in range(5)])

            await wait_for(all_answered, timeout_s=20)
            for i in range(5):
                entries = await r.xrange(KEYS.reply(f"r{i}"))
                assert len(entries) == 1 and entries[0][1]["status"] == "rejected"  # no pods
            assert (await r.xpending(stream, "tierpool"))["pending"] == 0
    finally:
        await r.aclose()
