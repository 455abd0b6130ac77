"""Every Redis key of tierpool, built in one place.

All keys of a namespace share the ``tp:{NS}:`` prefix. The braces are a Redis
Cluster hash tag, so every key of one namespace lives in one slot and a Lua
script may touch any of them. The anchor built its keys three different ways
and paid for it (digest §14.22); here nothing outside this module formats a key.

The names fixed by CONTRACT.md are marked *contract*; the rest are ours.
Pod and call state lives in namespace-wide hashes and sorted sets rather than
one key per pod, so that every script can name each key it touches in
``KEYS`` up front (Redis Cluster's rule), whichever pod it ends up choosing.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from tierpool.schemas.fields import NAMESPACE_RE, NAMESPACE_RULE
from tierpool.schemas.requests import REQUEST_KINDS

GROUP = "tierpool"
"""Consumer group on every request stream and on the pods stream (contract)."""


ANCHOR_CONFIG_KEY = "voice:tier:config"
"""smart-router's tier config key (no namespace). Read once, to adopt its
config when a namespace has none yet; never written."""


def valid_namespace(ns: str) -> bool:
    """Whether ``ns`` may name a namespace (no braces: it sits inside a hash tag)."""
    return NAMESPACE_RE.match(ns) is not None


@dataclass(frozen=True)
class Keys:
    """The keys of one namespace.

    Instances are cheap and immutable; build one per namespace and share it.
    """

    namespace: str = "default"

    def __post_init__(self) -> None:
        if not valid_namespace(self.namespace):
            raise ValueError(f"namespace {self.namespace!r} must be {NAMESPACE_RULE}")

    @cached_property
    def prefix(self) -> str:
        return f"tp:{{{self.namespace}}}:"

    # --- contract: streams -------------------------------------------------
    def request_stream(self, kind: str) -> str:
        """``tp:{NS}:req:{kind}`` for allocate, release, drain and config."""
        if kind not in REQUEST_KINDS:
            raise ValueError(f"unknown request kind {kind!r}")
        return f"{self.prefix}req:{kind}"

    @cached_property
    def pods_stream(self) -> str:
        """Pod lifecycle events: register, heartbeat, deregister (contract)."""
        return f"{self.prefix}pods"

    @cached_property
    def all_input_streams(self) -> tuple[str, ...]:
        """Every stream the workers consume, in the order they are read."""
        return (*(self.request_stream(k) for k in REQUEST_KINDS), self.pods_stream)

    def reply(self, request_id: str) -> str:
        """The one-entry reply stream of a request (contract)."""
        return f"{self.prefix}reply:{request_id}"

    @cached_property
    def reply_prefix(self) -> str:
        return f"{self.prefix}reply:"

    @cached_property
    def events(self) -> str:
        """Capped audit log of every state change (contract)."""
        return f"{self.prefix}events"

    @cached_property
    def dead(self) -> str:
        """Dead letters: messages that could not be processed (contract)."""
        return f"{self.prefix}dead"

    # --- contract: config ----------------------------------------------------
    @cached_property
    def config(self) -> str:
        """Current tier config, structured JSON with ``version`` (contract)."""
        return f"{self.prefix}config"

    @cached_property
    def config_changed(self) -> str:
        """Pub/sub channel: a config version was applied (contract)."""
        return f"{self.prefix}config:changed"

    # --- ours: config guards -----------------------------------------------
    @cached_property
    def config_version(self) -> str:
        """Integer mirror of the config's ``version``, so scripts can guard cheaply."""
        return f"{self.prefix}config:version"

    @cached_property
    def merchants(self) -> str:
        """Hash merchant_id -> policy JSON (pool, fallback, zone, min_capability)."""
        return f"{self.prefix}merchants"

    @cached_property
    def merchants_version(self) -> str:
        """Counter bumped on every merchant policy change (allocation guard)."""
        return f"{self.prefix}merchants:version"

    # --- ours: pods ----------------------------------------------------------
    @cached_property
    def pod_pool(self) -> str:
        """Hash pod_id -> assigned pool ("" while unassigned). Presence = registered."""
        return f"{self.prefix}pod:pool"

    @cached_property
    def pod_endpoint(self) -> str:
        """Hash pod_id -> the pod's base URL."""
        return f"{self.prefix}pod:endpoint"

    @cached_property
    def pod_zone(self) -> str:
        """Hash pod_id -> ``restricted`` or ``open``."""
        return f"{self.prefix}pod:zone"

    @cached_property
    def pod_capability(self) -> str:
        """Hash pod_id -> capability level 1-5."""
        return f"{self.prefix}pod:capability"

    @cached_property
    def pod_labels(self) -> str:
        """Hash pod_id -> labels JSON."""
        return f"{self.prefix}pod:labels"

    @cached_property
    def pod_load(self) -> str:
        """Hash pod_id -> number of live calls. The one count of a pod's calls."""
        return f"{self.prefix}pod:load"

    @cached_property
    def pod_calls(self) -> str:
        """Sorted set of every pod's live calls: member ``{pod_id} {call_id}``, score 0.

        A pod's calls are one ``ZRANGEBYLEX`` (``[{pod} `` to ``({pod}!``), so
        removing a pod is linear in its calls (the old ``pod:calls`` hash of
        space-separated strings made it quadratic).
        """
        return f"{self.prefix}pod:callset"

    @staticmethod
    def pod_calls_range(pod_id: str) -> tuple[str, str]:
        """``ZRANGEBYLEX`` bounds of ``pod_id``'s members of :attr:`pod_calls`."""
        return f"[{pod_id} ", f"({pod_id}!"

    @cached_property
    def pod_seen(self) -> str:
        """Sorted set pod_id -> last heartbeat, epoch ms. The liveness index."""
        return f"{self.prefix}pod:seen"

    @cached_property
    def pod_draining(self) -> str:
        """Sorted set pod_id -> drain mark expiry, epoch ms. Presence = draining."""
        return f"{self.prefix}pod:draining"

    @cached_property
    def pod_unwitnessed(self) -> str:
        """Set of pods that take no new call until they witness their calls again.

        Filled by ``quarantine.lua`` when Redis's replication history changed
        (a failover or restart may have lost writes); a pod leaves it with its
        next ``register`` or heartbeat, which restores the calls it lists first.
        """
        return f"{self.prefix}pod:unwitnessed"

    @cached_property
    def replid(self) -> str:
        """The ``master_replid`` under which this namespace's state was written.

        A server answering with another one has a new replication history
        (failover to a replica, restart): it may have lost the last writes.
        """
        return f"{self.prefix}replid"

    # --- ours: pools ---------------------------------------------------------
    @cached_property
    def pool_count(self) -> str:
        """Hash pool -> number of pods assigned to it."""
        return f"{self.prefix}pool:count"

    def pool_free(self, pool: str, zone: str) -> str:
        """Sorted set of a pool's pods that can take a call now, score = live calls.

        Split by pod zone (``restricted`` / ``open``) so that a restricted
        request looks only at restricted pods. A pod is here exactly when it
        is alive, assigned to ``pool``, not draining and below the pool's
        ``max_concurrent``.
        """
        if zone not in ("restricted", "open"):
            raise ValueError(f"unknown zone {zone!r}")
        return f"{self.prefix}pool:{pool}:free:{zone}"

    # --- ours: calls ---------------------------------------------------------
    @cached_property
    def calls(self) -> str:
        """Hash call_id -> call record (JSON). The idempotency key of allocate."""
        return f"{self.prefix}calls"

    @cached_property
    def leases(self) -> str:
        """Sorted set call_id -> lease expiry, epoch ms. The leader reaps from here."""
        return f"{self.prefix}leases"

    @cached_property
    def processed(self) -> str:
        """Sorted set of entries the scripts acknowledged since each stream's mark.

        Member ``{kind}|{ms, 16 digits}-{seq}``, score 0; trimmed below
        :attr:`processed_mark`. An entry delivered again by a consumer group
        that Redis lost and that was created again is found here and skipped.
        """
        return f"{self.prefix}processed"

    @cached_property
    def processed_mark(self) -> str:
        """Hash input-stream kind -> an entry id up to which every entry is processed.

        Where a lost consumer group is created again (``workers/streams.py``).
        """
        return f"{self.prefix}processed:mark"

    # --- ours: leadership ----------------------------------------------------
    @cached_property
    def leader(self) -> str:
        """String ``{holder}:{term}`` with a PX expiry: the leader lease."""
        return f"{self.prefix}leader"

    @cached_property
    def leader_term(self) -> str:
        """Counter bumped on every new term: the fencing token."""
        return f"{self.prefix}leader:term"

    @cached_property
    def gauges(self) -> str:
        """Hash of pool gauges the leader computes, so every replica exports the same."""
        return f"{self.prefix}gauges"

    @cached_property
    def workers(self) -> str:
        """Sorted set worker consumer name -> last seen ms (status and cleanup)."""
        return f"{self.prefix}workers"

    # --- ours: upstream tier config source ---------------------------------
    @cached_property
    def upstream_lease(self) -> str:
        """String with a PX expiry, set while the upstream tier config counts as fresh.

        Whoever leads sets it (``SET NX PX``) before fetching, so the upstream
        is fetched once per ``TIER_CONFIG_TTL_SECONDS`` however often the
        leadership moves.
        """
        return f"{self.prefix}upstream:lease"

    @cached_property
    def upstream_seq(self) -> str:
        """Counter numbering the upstream's config requests (``upstream-{n}``)."""
        return f"{self.prefix}upstream:seq"
