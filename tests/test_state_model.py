"""Random sequences of transitions against real Redis and a reference model.

Hypothesis drives register, heartbeat, allocate, release, drain, undrain,
deregister, config changes, the clock, and the leader (reap, reconcile, a
new leader while the old one still acts). The model is its own oracle:

- **placement** is written here from the README's rules (chain order,
  dedicated pools, zones, capability, flexible mode, least-loaded pod,
  open pods along the whole chain before restricted ones), never by calling
  ``core.placement``; it predicts the exact pod of every allocation, or
  that it must be rejected;
- **time** is modelled: pods go silent past POD_TTL, leases end past
  LEASE_TTL unless a heartbeat listing the call renewed them, drain marks
  lapse past DRAINING_TTL, and the reaper's counts are predicted;
- **the leader** is fenced: a deposed leader's reap and reconcile change
  nothing, the current one's reconcile gives every pod a pool it may join.

After every step, on top of ``tests/invariants.py`` (one call per live
pod, counts, free indexes...), every pod in a pool meets that pool's zone
and capability: a config change that tightens a pool must move its
non-conforming pods out (issue 14 item 13).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from tests.invariants import violations
from tests.statekit import KEYS, RedisSource, write_config
from tierpool.connect.redisconn import connect
from tierpool.core.leader import Election
from tierpool.core.reconcile import reap, reconcile
from tierpool.core.settings import Settings
from tierpool.core.state import PoolState
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

CONFIG_A: dict[str, Any] = {
    "tiers": {
        "gold": {"type": "exclusive", "target": 2},
        "basic": {"type": "shared", "target": 2, "max_concurrent": 3},
        "vault": {"type": "exclusive", "target": 1, "zone": "restricted"},
        "acme": {"type": "shared", "target": 1, "max_concurrent": 2},
        # a dedicated pool no policy names: it serves nobody (contract v1.1)
        "spare": {"type": "shared", "target": 1, "max_concurrent": 2},
    },
    "default_chain": ["gold", "vault", "basic"],
}
CONFIG_B: dict[str, Any] = {  # gold and basic tightened: their pods must conform again
    "tiers": {
        "gold": {"type": "exclusive", "target": 2, "zone": "restricted", "capability": 2},
        "basic": {"type": "shared", "target": 3, "max_concurrent": 2, "capability": 2},
        "vault": {"type": "exclusive", "target": 1, "zone": "restricted"},
        "acme": {"type": "shared", "target": 1, "max_concurrent": 2, "capability": 2},
    },
    "default_chain": ["basic", "vault", "gold"],
}
CONFIG_C: dict[str, Any] = {  # gold removed; a capability-3 pool outside nobody's policy
    "tiers": {
        "basic": {"type": "shared", "target": 3, "max_concurrent": 2},
        "vault": {"type": "exclusive", "target": 1, "zone": "restricted"},
        "acme": {"type": "shared", "target": 1, "max_concurrent": 2},
        "top": {"type": "shared", "target": 1, "max_concurrent": 2, "capability": 3},
        # a dedicated pool no policy names: it serves nobody (contract v1.1)
        "spare": {"type": "shared", "target": 1, "max_concurrent": 2},
    },
    "default_chain": ["basic", "vault", "top"],
}
CONFIGS = {"A": CONFIG_A, "B": CONFIG_B, "C": CONFIG_C}
POLICIES = {
    "m1": {"pool": "acme"},
    "m2": {"zone": "restricted", "min_capability": 2, "fallback": ["basic"]},
}
PODS = [f"p{i}" for i in range(6)]
CALLS = [f"c{i}" for i in range(10)]
T0 = 10_000_000


# --- the reference model: the README's rules, nothing from core.placement ----------
@dataclass
class Pool:
    name: str
    max: int
    zone: str
    cap: int
    target: int


@dataclass
class Config:
    pools: dict[str, Pool]
    chain: list[str]

    @classmethod
    def of(cls, doc: dict[str, Any]) -> Config:
        pools = {
            name: Pool(
                name,
                t.get("max_concurrent", 1) if t.get("type") == "shared" else 1,
                t.get("zone", "open"),
                t.get("capability", 1),
                t.get("target", 0),
            )
            for name, t in doc["tiers"].items()
        }
        return cls(pools, list(doc["default_chain"]))

    def dedicated(self, name: str) -> bool:
        """README: tiers not in default_chain are dedicated (merchant) pools."""
        return name not in self.chain

    def meets(self, pool: str, zone: str, cap: int) -> bool:
        """README: restricted tiers take only restricted pods; capability is a minimum."""
        p = self.pools[pool]
        return (p.zone == "open" or zone == "restricted") and cap >= p.cap


@dataclass
class Pod:
    zone: str
    cap: int
    seen: int


@dataclass
class Call:
    pod: str
    lease_until: int


@dataclass
class Model:
    config: Config
    now: int = T0
    pods: dict[str, Pod] = field(default_factory=dict)
    draining: dict[str, int] = field(default_factory=dict)  # pod -> mark expiry
    calls: dict[str, Call] = field(default_factory=dict)

    def load(self, pod: str) -> int:
        return sum(1 for c in self.calls.values() if c.pod == pod)

    def alive(self, pod: str, pod_ttl_ms: int) -> bool:
        return self.pods[pod].seen + pod_ttl_ms >= self.now

    def owner(self, pool: str) -> str | None:
        return next((m for m, p in POLICIES.items() if p.get("pool") == pool), None)

    def order(self, req: AllocateRequest) -> tuple[list[str], str, int]:
        """Pools to try in order, the zone the call needs, and its minimum capability.

        README: the merchant's dedicated pool, then its fallback if set, else the
        request's chain, else default_chain; flexible then adds every other pool
        that meets capability (chain first, then the rest by name); dedicated
        pools serve only their merchant and are never added by flexible mode.
        """
        cfg = self.config
        policy = POLICIES.get(req.merchant_id or "", {})
        zone = "restricted" if "restricted" in (req.zone, policy.get("zone")) else "any"
        min_cap = max(req.min_capability or 1, policy.get("min_capability", 1))
        explicit: list[str] = []
        if "pool" in policy:
            explicit.append(policy["pool"])
        if "fallback" in policy:
            explicit += policy["fallback"]
        else:
            explicit += list(req.chain or cfg.chain)
        out: list[str] = []
        for name in explicit:
            if name in out or name not in cfg.pools:
                continue
            owner = self.owner(name)
            if cfg.dedicated(name) and (owner is None or owner != req.merchant_id):
                continue
            if cfg.pools[name].cap >= min_cap:
                out.append(name)
        if req.tier_mode == "flexible":
            others = [*cfg.chain, *sorted(cfg.pools)]
            for name in others:
                if (
                    name not in out
                    and name not in explicit
                    and not cfg.dedicated(name)
                    and cfg.pools[name].cap >= min_cap
                ):
                    out.append(name)
        return out, zone, min_cap

    def place(self, req: AllocateRequest, assigned: dict[str, str], pod_ttl_ms: int) -> str | None:
        """The pod this call must get, or None when it must be rejected.

        README: least-loaded pod; zone=any takes an open pod anywhere along the
        chain before any restricted pod; a restricted call only restricted pods.
        A pod takes a call when alive, not draining and below max_concurrent.
        """
        pools, zone, _ = self.order(req)
        passes = ["restricted"] if zone == "restricted" else ["open", "restricted"]
        for which in passes:
            for name in pools:
                p = self.config.pools[name]
                free = [
                    (self.load(pod), pod)
                    for pod, pool in assigned.items()
                    if pool == name
                    and pod in self.pods
                    and self.pods[pod].zone == which
                    and pod not in self.draining
                    and self.alive(pod, pod_ttl_ms)
                    and self.load(pod) < p.max
                ]
                if free:
                    return min(free)[1]
        return None


def test_random_transitions_keep_every_invariant(
    backend_url: str, request: pytest.FixtureRequest
) -> None:
    """Run on real Redis and on fakeredis (``tierpool run``'s fallback, issue 17):
    the same transitions must keep the same invariants on both."""
    on_fake = "fakeredis" in request.node.name

    class Machine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.loop = asyncio.new_event_loop()
            self.r = connect(backend_url)
            self.run(self.r.flushall())
            self.run(write_config(self.r, CONFIG_A))
            self.settings = Settings()
            self.state = PoolState(self.r, KEYS, self.settings, RedisSource(self.r, KEYS))
            self.run(self.state.source.refresh())
            self.model = Model(Config.of(CONFIG_A))
            for merchant, policy in POLICIES.items():
                out = self.apply(
                    ConfigRequest(
                        request_id=f"policy-{merchant}",
                        merchant_id=merchant,
                        merchant=msgspec.convert(policy, MerchantPolicy),
                    )
                )
                assert out.status == "applied", out
            self.run(self.state.source.refresh())
            self.n = 0
            self.config_changed = False
            self.token = self.elect("w0")
            self.deposed: str | None = None

        # --- plumbing -------------------------------------------------------------
        def run(self, coro):  # type: ignore[no-untyped-def]
            return self.loop.run_until_complete(coro)

        def apply(self, msg):  # type: ignore[no-untyped-def]
            return self.run(self.state.apply(msg, now_ms=self.model.now))

        def rid(self) -> str:
            self.n += 1
            return f"q{self.n}"

        def elect(self, holder: str) -> str:
            """A new leader: the old lease is gone (expired), ``holder`` takes the next term."""
            self.run(self.r.delete(KEYS.leader))
            token = self.run(Election(self.r, KEYS, holder, 600_000, 1.0).try_acquire())
            assert token is not None
            return token

        def assigned(self) -> dict[str, str]:
            return self.run(self.r.hgetall(KEYS.pod_pool))

        def teardown(self) -> None:
            self.run(self.r.aclose())
            self.loop.close()

        # --- pods -------------------------------------------------------------------
        @initialize(
            kinds=st.lists(
                st.tuples(st.sampled_from(["open", "restricted"]), st.integers(1, 3)),
                min_size=len(PODS),
                max_size=len(PODS),
            )
        )
        def pods_join(self, kinds: list[tuple[str, int]]) -> None:
            """Every example starts with pods in pools, so config changes have pods to move."""
            for pod, (zone, cap) in zip(PODS, kinds, strict=True):
                self.register(pod, zone, cap)

        @rule(
            pod=st.sampled_from(PODS),
            zone=st.sampled_from(["open", "restricted"]),
            cap=st.integers(1, 3),
        )
        def register(self, pod: str, zone: str, cap: int) -> None:
            m = self.model
            if pod in m.pods and m.load(pod):
                # A pod re-registers as what it is while it holds calls.
                zone, cap = m.pods[pod].zone, m.pods[pod].cap
            out = self.apply(
                PodRegister(
                    request_id=self.rid(),
                    pod_id=pod,
                    endpoint=f"http://{pod}",
                    zone=zone,  # type: ignore[arg-type]
                    capability=cap,
                )
            )
            assert out.status == "registered", out
            m.pods[pod] = Pod(zone, cap, m.now)
            pool = out.fields["pool"]
            if pool:
                assert m.config.meets(pool, zone, cap), (pod, zone, cap, pool)

        @rule(pod=st.sampled_from(PODS))
        def heartbeat(self, pod: str) -> None:
            m = self.model
            mine = tuple(c for c, call in m.calls.items() if call.pod == pod)
            out = self.apply(PodHeartbeat(request_id=self.rid(), pod_id=pod, calls=mine))
            if pod not in m.pods:
                assert out.status == "unknown_pod", out
                return
            assert out.status == "alive", out
            m.pods[pod].seen = m.now
            for c in mine:
                m.calls[c].lease_until = m.now + self.settings.lease_ttl_ms

        @rule(pod=st.sampled_from(PODS))
        def deregister(self, pod: str) -> None:
            m = self.model
            out = self.apply(PodDeregister(request_id=self.rid(), pod_id=pod))
            if pod not in m.pods:
                assert out.status == "unknown_pod"
                return
            assert out.status == "deregistered"
            ended = sorted(c for c, call in m.calls.items() if call.pod == pod)
            assert sorted(msgspec.json.decode(out.fields["calls"])) == ended
            del m.pods[pod]
            m.draining.pop(pod, None)
            for c in ended:
                del m.calls[c]

        @rule(pod=st.sampled_from(PODS), undrain=st.booleans())
        def drain(self, pod: str, undrain: bool) -> None:
            m = self.model
            action = "undrain" if undrain else "drain"
            out = self.apply(DrainRequest(request_id=self.rid(), pod_id=pod, action=action))  # type: ignore[arg-type]
            if pod not in m.pods:
                assert out.status == "not_found"
                return
            assert out.status == action + "ed"
            if undrain:
                m.draining.pop(pod, None)
            else:
                m.draining[pod] = m.now + self.settings.draining_ttl_ms

        # --- calls ------------------------------------------------------------------
        @rule(
            call=st.sampled_from(CALLS),
            merchant=st.sampled_from([None, "m1", "m2"]),
            zone=st.sampled_from(["any", "restricted"]),
            mode=st.sampled_from(["strict", "flexible"]),
            chain=st.sampled_from(
                [None, ("basic",), ("vault", "gold"), ("acme", "top"), ("spare", "basic")]
            ),
            min_cap=st.sampled_from([None, 2]),
        )
        def allocate(
            self,
            call: str,
            merchant: str | None,
            zone: str,
            mode: str,
            chain: tuple[str, ...] | None,
            min_cap: int | None,
        ) -> None:
            m = self.model
            req = AllocateRequest(
                request_id=self.rid(),
                call_id=call,
                merchant_id=merchant,
                zone=zone,  # type: ignore[arg-type]
                tier_mode=mode,  # type: ignore[arg-type]
                chain=chain,
                min_capability=min_cap,
            )
            expected = m.place(req, self.assigned(), self.settings.pod_ttl_ms)
            out = self.apply(req)
            if call in m.calls:
                assert out.status == "allocated" and out.fields["existing"] == "1", out
                assert out.fields["pod_id"] == m.calls[call].pod
                return
            if expected is None:
                assert out.status == "rejected", (out, m.order(req))
                return
            assert out.status == "allocated", (out, expected, m.order(req))
            assert out.fields["pod_id"] == expected, (out, expected, m.order(req))
            assert int(out.fields["lease_expires_ms"]) == m.now + self.settings.lease_ttl_ms
            m.calls[call] = Call(expected, m.now + self.settings.lease_ttl_ms)

        @rule(call=st.sampled_from(CALLS))
        def release(self, call: str) -> None:
            m = self.model
            out = self.apply(ReleaseRequest(request_id=self.rid(), call_id=call))
            if call in m.calls:
                assert out.status == "released"
                assert out.fields["pod_id"] == m.calls.pop(call).pod
            else:
                assert out.status == "not_found"

        # --- config, time, leader ------------------------------------------------------
        @rule(which=st.sampled_from(sorted(CONFIGS)))
        def change_config(self, which: str) -> None:
            doc = CONFIGS[which]
            self.config_changed = True
            out = self.apply(
                ConfigRequest(request_id=self.rid(), config=msgspec.json.encode(doc).decode())
            )
            assert out.status == "applied", out
            self.run(self.state.source.refresh())
            self.model.config = Config.of(doc)

        @rule(ms=st.sampled_from([1_000, 10_000, 16_000, 400_000, 901_000]))
        def tick(self, ms: int) -> None:
            self.model.now += ms

        @rule()
        def leader_reaps(self) -> None:
            m = self.model
            lease_ttl_expired = sorted(
                c for c, call in m.calls.items() if call.lease_until <= m.now
            )
            silent = sorted(p for p in m.pods if not m.alive(p, self.settings.pod_ttl_ms))
            res = self.run(reap(self.state, self.token, now_ms=m.now))
            assert res.status == "ok", res
            for c in lease_ttl_expired:
                del m.calls[c]
            for pod in silent:
                del m.pods[pod]
                m.draining.pop(pod, None)
                for c in [c for c, call in m.calls.items() if call.pod == pod]:
                    del m.calls[c]
            lapsed = sorted(p for p, until in m.draining.items() if until <= m.now)
            for pod in lapsed:
                del m.draining[pod]
            assert (res.leases, res.pods, res.drains) == (
                len(lease_ttl_expired),
                len(silent),
                len(lapsed),
            )

        @rule()
        def leader_reconciles(self) -> None:
            m = self.model
            res = self.run(reconcile(self.state, self.token, now_ms=m.now))
            assert res.status == "ok" and not res.errors, res
            assigned = self.assigned()
            for pod, attrs in m.pods.items():
                chain_fits = [p for p in m.config.chain if m.config.meets(p, attrs.zone, attrs.cap)]
                if m.alive(pod, self.settings.pod_ttl_ms) and chain_fits:
                    assert assigned.get(pod), f"alive pod {pod} fits {chain_fits} but has no pool"

        @rule(holder=st.sampled_from(["w1", "w2"]))
        def leader_moves(self, holder: str) -> None:
            self.deposed, self.token = self.token, self.elect(holder)

        @rule()
        def deposed_leader_acts(self) -> None:
            if self.deposed is None:
                return
            before = self.run(pool_state(self.r))
            assert self.run(reap(self.state, self.deposed, now_ms=self.model.now)).status == (
                "fenced"
            )
            got = self.run(reconcile(self.state, self.deposed, now_ms=self.model.now))
            assert got.status == "fenced" or not got.planned, got
            assert self.run(pool_state(self.r)) == before

        # --- invariants ------------------------------------------------------------------
        @invariant()
        def invariants_hold(self) -> None:
            m = self.model
            snap = self.state.source.current()
            found = self.run(
                violations(
                    self.r,
                    KEYS,
                    snap.config,
                    now_ms=m.now,
                    pod_ttl_ms=self.settings.pod_ttl_ms,
                    owners=dict(snap.pool_owners),
                    config_changed=self.config_changed,
                )
            )
            assert not found, found
            calls = self.run(self.r.hgetall(KEYS.calls))
            assert {c: msgspec.json.decode(v)["pod"] for c, v in calls.items()} == {
                c: call.pod for c, call in m.calls.items()
            }
            leases = dict(self.run(self.r.zrange(KEYS.leases, 0, -1, withscores=True)))
            assert {c: int(s) for c, s in leases.items()} == {
                c: call.lease_until for c, call in m.calls.items()
            }
            assert set(self.assigned()) == set(m.pods)
            assert set(self.run(self.r.zrange(KEYS.pod_draining, 0, -1))) == set(m.draining)

        @invariant()
        def every_pod_in_a_pool_meets_its_zone_and_capability(self) -> None:
            m = self.model
            for pod, pool in self.assigned().items():
                if pool:
                    attrs = m.pods[pod]
                    assert pool in m.config.pools, (pod, pool)
                    assert m.config.meets(pool, attrs.zone, attrs.cap), (
                        f"pod {pod} ({attrs.zone}, capability {attrs.cap}) is in pool {pool} "
                        f"({m.config.pools[pool]})"
                    )

    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=20 if on_fake else 60,  # fakeredis runs Lua in Python: slower
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


async def pool_state(r: Any) -> dict[str, object]:
    """Every pool-state key of the namespace (streams and the leader lease aside)."""
    out: dict[str, object] = {}
    for key in sorted(await r.keys(f"{KEYS.prefix}*")):
        if key in (KEYS.leader, KEYS.leader_term, KEYS.gauges):
            continue
        kind = await r.type(key)
        if kind == "hash":
            out[key] = await r.hgetall(key)
        elif kind == "zset":
            out[key] = await r.zrange(key, 0, -1, withscores=True)
        elif kind == "string":
            out[key] = await r.get(key)
    return out


pytestmark = pytest.mark.timeout(300)
