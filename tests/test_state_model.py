"""Random sequences of transitions against real Redis and a reference model.

Hypothesis drives register, heartbeat, allocate, release, drain, undrain,
deregister and config changes. After every step the test checks what the
contract promises: no exclusive pod with two calls, no shared pod above
max_concurrent, no restricted call on an open pod, no dedicated pod serving
another merchant, every live call on exactly one live pod, counts equal to
calls, and the free indexes hold exactly the pods that can take a call. The
model also predicts whether each allocation must succeed, so a pod that is
free but never offered (the anchor's hidden pods, §14.4/7/8) fails the test.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from tests.invariants import violations
from tests.statekit import KEYS, RedisSource, write_config
from tierpool.core.placement import place
from tierpool.core.redisconn import connect
from tierpool.core.settings import Settings
from tierpool.core.state import PoolState
from tierpool.core.tierconfig import parse_tier_config
from tierpool.schemas import (
    AllocateRequest,
    ConfigRequest,
    DrainRequest,
    MerchantPolicy,
    PodDeregister,
    PodHeartbeat,
    PodRegister,
    ReleaseRequest,
)

CONFIG_A = {
    "tiers": {
        "gold": {"type": "exclusive", "target": 2},
        "basic": {"type": "shared", "target": 2, "max_concurrent": 3},
        "vault": {"type": "exclusive", "target": 1, "zone": "restricted"},
        "acme": {"type": "shared", "target": 1, "max_concurrent": 2},
    },
    "default_chain": ["gold", "vault", "basic"],
}
CONFIG_B = {
    "tiers": {
        "basic": {"type": "shared", "target": 3, "max_concurrent": 2},
        "vault": {"type": "exclusive", "target": 1, "zone": "restricted"},
        "acme": {"type": "shared", "target": 1, "max_concurrent": 2, "capability": 2},
    },
    "default_chain": ["basic", "vault"],
}
PODS = [f"p{i}" for i in range(6)]
CALLS = [f"c{i}" for i in range(10)]
NOW = 10_000_000
POD_TTL_MS = 15_000


@dataclass
class Model:
    """What the contract says must be true, tracked without Redis."""

    pods: dict[str, dict[str, object]] = field(default_factory=dict)  # pod -> zone, cap
    draining: set[str] = field(default_factory=set)
    calls: dict[str, str] = field(default_factory=dict)  # call -> pod
    needs: dict[str, tuple[str, int]] = field(default_factory=dict)  # call -> zone, capability


def test_random_transitions_keep_every_invariant(redis_url: str) -> None:
    class Machine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.loop = asyncio.new_event_loop()
            self.r = connect(redis_url)
            self.run(self.r.flushall())
            self.run(write_config(self.r, CONFIG_A))
            self.state = PoolState(self.r, KEYS, Settings(), RedisSource(self.r, KEYS))
            self.run(self.state.source.refresh())
            out = self.apply(
                ConfigRequest(
                    request_id="m", merchant_id="m1", merchant=MerchantPolicy(pool="acme")
                )
            )
            assert out.status == "applied"
            self.run(self.state.source.refresh())
            self.model = Model()
            self.n = 0
            self.config_changed = False

        def run(self, coro):  # type: ignore[no-untyped-def]
            return self.loop.run_until_complete(coro)

        def apply(self, msg):  # type: ignore[no-untyped-def]
            return self.run(self.state.apply(msg, now_ms=NOW))

        def rid(self) -> str:
            self.n += 1
            return f"q{self.n}"

        def teardown(self) -> None:
            self.run(self.r.aclose())
            self.loop.close()

        @rule(
            pod=st.sampled_from(PODS),
            zone=st.sampled_from(["open", "restricted"]),
            cap=st.integers(1, 3),
        )
        def register(self, pod: str, zone: str, cap: int) -> None:
            out = self.apply(
                PodRegister(
                    request_id=self.rid(),
                    pod_id=pod,
                    endpoint=f"http://{pod}",
                    zone=zone,  # type: ignore[arg-type]
                    capability=cap,
                )
            )
            # Contract v1.1: no zone change or lower capability under a call needing it.
            blocked = pod in self.model.pods and any(
                (self.model.needs[c][0] == "restricted" and zone != "restricted")
                or self.model.needs[c][1] > cap
                for c, p in self.model.calls.items()
                if p == pod
            )
            if blocked:
                assert out.status == "invalid", out
                return
            assert out.status == "registered"
            self.model.pods[pod] = {"zone": zone, "cap": cap}

        @rule(pod=st.sampled_from(PODS))
        def heartbeat(self, pod: str) -> None:
            mine = tuple(c for c, p in self.model.calls.items() if p == pod)
            out = self.apply(PodHeartbeat(request_id=self.rid(), pod_id=pod, calls=mine))
            assert out.status == ("alive" if pod in self.model.pods else "unknown_pod")

        @rule(pod=st.sampled_from(PODS))
        def deregister(self, pod: str) -> None:
            out = self.apply(PodDeregister(request_id=self.rid(), pod_id=pod))
            if pod not in self.model.pods:
                assert out.status == "unknown_pod"
                return
            assert out.status == "deregistered"
            del self.model.pods[pod]
            self.model.draining.discard(pod)
            for c in [c for c, p in self.model.calls.items() if p == pod]:
                del self.model.calls[c]

        @rule(pod=st.sampled_from(PODS), undrain=st.booleans())
        def drain(self, pod: str, undrain: bool) -> None:
            action = "undrain" if undrain else "drain"
            out = self.apply(DrainRequest(request_id=self.rid(), pod_id=pod, action=action))  # type: ignore[arg-type]
            if pod not in self.model.pods:
                assert out.status == "not_found"
                return
            assert out.status == action + "ed"
            if undrain:
                self.model.draining.discard(pod)
            else:
                self.model.draining.add(pod)

        @rule(
            call=st.sampled_from(CALLS),
            merchant=st.sampled_from([None, "m1", "m2"]),
            zone=st.sampled_from(["any", "restricted"]),
            mode=st.sampled_from(["strict", "flexible"]),
        )
        def allocate(self, call: str, merchant: str | None, zone: str, mode: str) -> None:
            req = AllocateRequest(
                request_id=self.rid(), call_id=call, merchant_id=merchant, zone=zone, tier_mode=mode
            )  # type: ignore[arg-type]
            snap = self.state.source.current()
            expected_free = self.free_pods_for(req)
            out = self.apply(req)
            if call in self.model.calls:
                assert out.status == "allocated" and out.fields["existing"] == "1"
                assert out.fields["pod_id"] == self.model.calls[call]
                return
            if expected_free:
                assert out.status == "allocated", (out, expected_free)
                pod = out.fields["pod_id"]
                assert pod in expected_free, (out, expected_free)
                self.model.calls[call] = pod
                plan = place(req, snap)
                self.model.needs[call] = (plan.zone, plan.min_capability)
                load = sum(1 for p in self.model.calls.values() if p == pod)
                assert load <= snap.config.tier(out.fields["pool"]).max_concurrent
            else:
                assert out.status == "rejected", (out, snap.version)

        def free_pods_for(self, req: AllocateRequest) -> set[str]:
            """Pods the model says could take this call now."""
            snap = self.state.source.current()
            plan = place(req, snap)
            pools = self.run(self.r.hgetall(KEYS.pod_pool))
            load: dict[str, int] = {}
            for p in self.model.calls.values():
                load[p] = load.get(p, 0) + 1
            ok = set()
            for pod, attrs in self.model.pods.items():
                pool = pools.get(pod, "")
                if pool not in plan.candidates or pod in self.model.draining:
                    continue
                if plan.zone == "restricted" and attrs["zone"] != "restricted":
                    continue
                if load.get(pod, 0) < snap.config.tier(pool).max_concurrent:
                    ok.add(pod)
            return ok

        @rule(call=st.sampled_from(CALLS))
        def release(self, call: str) -> None:
            out = self.apply(ReleaseRequest(request_id=self.rid(), call_id=call))
            if call in self.model.calls:
                assert out.status == "released"
                assert out.fields["pod_id"] == self.model.calls.pop(call)
            else:
                assert out.status == "not_found"

        @rule(which=st.sampled_from(["A", "B"]))
        def change_config(self, which: str) -> None:
            cfg = CONFIG_A if which == "A" else CONFIG_B
            self.config_changed = True
            import msgspec

            out = self.apply(
                ConfigRequest(request_id=self.rid(), config=msgspec.json.encode(cfg).decode())
            )
            assert out.status == "applied"
            self.run(self.state.source.refresh())
            assert self.state.source.current().config == parse_tier_config(
                cfg, version=self.state.source.current().version
            )

        @invariant()
        def invariants_hold(self) -> None:
            snap = self.state.source.current()
            found = self.run(
                violations(
                    self.r,
                    KEYS,
                    snap.config,
                    now_ms=NOW,
                    pod_ttl_ms=POD_TTL_MS,
                    owners=dict(snap.pool_owners),
                    config_changed=self.config_changed,
                )
            )
            assert not found, found
            calls = self.run(self.r.hgetall(KEYS.calls))
            import msgspec

            assert {c: msgspec.json.decode(v)["pod"] for c, v in calls.items()} == self.model.calls

    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=40,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


pytestmark = pytest.mark.timeout(300)
