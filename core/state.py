"""The pool state machine's Python API: one method per transition, batched.

Workers hand a batch of decoded messages to :meth:`PoolState.run`; each
becomes one script call (``core/lua``), and the whole batch goes to Redis in
one pipelined round trip. A script that finds a newer config in Redis answers
``stale``: the batch's stale calls are prepared again from a refreshed
snapshot and resent, so no allocation is ever made on an old config.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import msgspec
from redis.asyncio import Redis

from tierpool.core import placement
from tierpool.core.errors import TierConfigError, write_refusal
from tierpool.core.keys import Keys
from tierpool.core.masking import mask_text
from tierpool.core.scripts import Call, CallBuilder, PoolTable, run_calls
from tierpool.core.settings import Settings
from tierpool.core.snapshot import ConfigSnapshot, SnapshotSource, dedicated_pools, retry_stale
from tierpool.core.tierconfig import TierConfig, parse_tier_config, to_json
from tierpool.schemas import (
    AllocateRequest,
    ConfigRequest,
    DrainRequest,
    PodDeregister,
    PodEvent,
    PodHeartbeat,
    PodRegister,
    ReleaseRequest,
    encode,
    request_kind,
)
from tierpool.schemas.fields import IDENT_RE
from tierpool.schemas.requests import REQUEST_KINDS

log = logging.getLogger(__name__)

Message = (
    AllocateRequest
    | ReleaseRequest
    | DrainRequest
    | ConfigRequest
    | PodRegister
    | PodHeartbeat
    | PodDeregister
)

PLANS_KEPT = 1_024
"""Distinct request shapes whose placement is kept per snapshot (then started afresh)."""

MAX_STEPS = 1_000
"""Steps of one pod removal run in a row (500 calls each: 500,000 calls)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """Where a message came from: its stream and entry id (for exactly-once)."""

    stream: str
    entry_id: str


@dataclass(slots=True)
class Outcome:
    """What a transition did: a reply status and the reply's fields.

    Besides reply statuses, ``status`` may be ``dup`` (another delivery already
    processed the entry: nothing happened, no reply), ``stale`` (still stale
    after retries: nothing happened, the entry stays pending), ``refused``
    (Redis refused the work for its own reasons -- out of memory, read-only,
    busy: the entry stays pending and is retried, never dead-lettered for it)
    or ``error`` (the call failed otherwise: the entry stays pending).
    """

    status: str
    fields: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Origin:
    """Who asked: the entry (for exactly-once), the reply key and the deadline,
    and what the reply answers (its kind, and the call_id or pod_id it echoes)."""

    entry: Entry | None
    request_id: str | None
    deadline_ms: int | None
    now_ms: int | None
    kind: str = ""
    echo: tuple[str, str] = ("", "")


REQUEST_ID_IN_USE = "request_id in use"
"""The error of a request whose request_id has an unread reply (contract v1.1):
the prelude dead-letters it with this text (``RID_IN_USE`` in _prelude.lua)."""

_ECHOED = {"allocate": "call_id", "release": "call_id", "drain": "pod_id", "pod": "pod_id"}
"""The subject field a reply of each kind echoes (contract v1.1); config has none."""


def reply_subject(msg: Message) -> tuple[str, tuple[str, str]]:
    """The reply ``kind`` of a message and the subject field its reply echoes."""
    kind = "pod" if isinstance(msg, PodEvent) else request_kind(msg)
    field = _ECHOED.get(kind)
    return kind, (field, str(getattr(msg, field))) if field else ("", "")


class PoolState:
    """Typed access to every state transition of one namespace."""

    def __init__(
        self, redis: Redis, keys: Keys, settings: Settings, source: SnapshotSource
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self.source = source
        self.calls = CallBuilder(
            keys,
            reply_ttl_ms=settings.reply_ttl_ms,
            events_maxlen=settings.events_maxlen,
            pod_ttl_ms=settings.pod_ttl_ms,
            lease_ttl_ms=settings.lease_ttl_ms,
            draining_ttl_ms=settings.draining_ttl_ms,
            dead_maxlen=settings.dead_maxlen,
        )
        self.on_stale_retry: Callable[[int], object] = lambda n: None
        """Told how many calls of a batch are resent after a ``stale`` (a metric)."""
        # The pool table of the config last used: it holds the config itself,
        # so the identity check can never match a different, newer object.
        self._last_table: tuple[TierConfig, PoolTable] | None = None
        # Allocate placement arguments by request shape, for one snapshot.
        self._plans: tuple[ConfigSnapshot, dict[tuple[object, ...], tuple[str, ...]]] | None = None

    # --- building calls -------------------------------------------------------
    def _table(self, cfg: TierConfig) -> PoolTable:
        last = self._last_table
        if last is not None and last[0] is cfg:
            return last[1]
        table = PoolTable.of(self.keys, cfg)
        self._last_table = (cfg, table)
        return table

    def _call(
        self,
        name: str,
        snap: ConfigSnapshot,
        origin: _Origin,
        args: Sequence[str],
        *,
        guard_merchants: bool = False,
        table_config: TierConfig | None = None,
        extra_keys: Sequence[str] = (),
    ) -> Call:
        table = (
            self._table(snap.config)
            if table_config is None
            else PoolTable.of(self.keys, table_config)
        )
        entry = origin.entry
        return self.calls.call(
            name,
            table,
            args,
            stream=entry.stream if entry else None,
            entry_id=entry.entry_id if entry else None,
            request_id=origin.request_id,
            now_ms=origin.now_ms,
            deadline_ms=origin.deadline_ms,
            want_cfgv=snap.version,
            want_mv=snap.merchants_version if guard_merchants else None,
            kind=origin.kind,
            echo=origin.echo,
            extra_keys=extra_keys,
        )

    def _placement_args(self, msg: AllocateRequest, snap: ConfigSnapshot) -> tuple[str, ...]:
        """The allocate script's arguments after call_id and merchant_id.

        Placement is a pure function of the snapshot and a few request fields,
        which most requests share, so the arguments (with the reasons already
        JSON) are kept per snapshot instead of being worked out per message.
        """
        key = (
            msg.merchant_id,
            msg.chain,
            msg.zone,
            msg.min_capability,
            msg.tier_mode,
            msg.provider,
            msg.flow,
            msg.template,
        )
        plans = self._plans
        if plans is None or plans[0] is not snap or len(plans[1]) >= PLANS_KEPT:
            plans = self._plans = (snap, {})
        args = plans[1].get(key)
        if args is None:
            plan = placement.place(msg, snap)
            prefix, suffix = placement.session_url_parts(
                self.settings.voice_agent_base_url, msg.provider, msg.flow, msg.template
            )
            reasons = msgspec.json.encode(plan.excluded).decode()
            args = plans[1][key] = (
                plan.zone,
                prefix,
                suffix,
                reasons,
                str(plan.min_capability),
                str(len(plan.widen)),
                *plan.widen,
                str(len(plan.candidates)),
                *plan.candidates,
            )
        return args

    def prepare(
        self,
        msg: Message,
        snap: ConfigSnapshot,
        entry: Entry | None = None,
        now_ms: int | None = None,
    ) -> Call | Outcome:
        """The script call for one message, or an ``invalid`` Outcome when the
        message is well-formed but cannot apply to this snapshot (a config
        that fails validation, a policy naming an unknown pool)."""
        kind, echo = reply_subject(msg)
        common = _Origin(entry, msg.request_id, msg.deadline_ms, now_ms, kind, echo)
        if isinstance(msg, AllocateRequest):
            return self._call(
                "allocate",
                snap,
                common,
                (msg.call_id, msg.merchant_id or "", *self._placement_args(msg, snap)),
                guard_merchants=True,
                extra_keys=(self.keys.merchants,),
            )
        if isinstance(msg, ReleaseRequest):
            return self._call("release", snap, common, (msg.call_id, msg.reason or ""))
        if isinstance(msg, DrainRequest):
            return self._call("drain", snap, common, (msg.pod_id, msg.action, msg.reason or ""))
        if isinstance(msg, PodRegister):
            cands, fallback = placement.join_candidates(snap, msg.zone, msg.capability)
            flat = [x for name, target in cands for x in (name, str(target))]
            return self._call(
                "register",
                snap,
                common,
                (
                    msg.pod_id,
                    msg.endpoint,
                    msg.zone,
                    str(msg.capability),
                    msgspec.json.encode(dict(msg.labels)).decode(),
                    fallback,
                    str(len(cands)),
                    *flat,
                    "0" if msg.calls is None else "1",
                    *(msg.calls or ()),
                ),
            )
        if isinstance(msg, PodHeartbeat):
            calls = msg.calls
            return self._call(
                "heartbeat",
                snap,
                common,
                (msg.pod_id, "0" if calls is None else "1", *(calls or ())),
            )
        if isinstance(msg, PodDeregister):
            return self._call("deregister", snap, common, (msg.pod_id,))
        if isinstance(msg, ConfigRequest):
            return self._prepare_config(msg, snap, common)
        raise TypeError(f"no transition for {type(msg).__name__}")

    def _prepare_config(
        self, msg: ConfigRequest, snap: ConfigSnapshot, common: _Origin
    ) -> Call | Outcome:
        cfg = snap.config
        if msg.merchant_id is not None and (msg.merchant is not None or msg.remove_merchant):
            policy_json = ""
            if msg.merchant is not None:
                problems = merchant_policy_problems(msg.merchant_id, msg.merchant, snap)
                if problems:
                    return Outcome("invalid", {"error": "; ".join(problems)})
                policy_json = msgspec.json.encode(
                    {
                        k: v
                        for k, v in (
                            ("pool", msg.merchant.pool),
                            ("fallback", msg.merchant.fallback),
                            ("zone", msg.merchant.zone),
                            ("min_capability", msg.merchant.min_capability),
                        )
                        if v is not None
                    }
                ).decode()
            return self._call(
                "merchant_set",
                snap,
                common,
                (msg.merchant_id, policy_json, self.keys.config_changed),
                guard_merchants=True,
                extra_keys=(self.keys.merchants,),
            )
        try:
            new = parse_tier_config(
                msg.config or "", version=cfg.version + 1, empty_is_default=False
            )
        except TierConfigError as exc:
            return Outcome("invalid", {"error": str(exc)})
        removed = [p for p in cfg.pools if p not in new]
        extra = [self.keys.config]
        for name in removed:
            extra += [self.keys.pool_free(name, "open"), self.keys.pool_free(name, "restricted")]
        return self._call(
            "config_apply",
            snap,
            common,
            (
                "" if msg.expected_version is None else str(msg.expected_version),
                to_json(new),
                str(new.version),
                self.keys.config_changed,
                str(len(removed)),
                *removed,
            ),
            table_config=new,
            extra_keys=extra,
        )

    # --- running ----------------------------------------------------------------
    async def run(
        self,
        items: Sequence[tuple[Message, Entry | None]],
        now_ms: int | None = None,
    ) -> list[Outcome]:
        """Apply a batch: one pipelined round trip, plus one per stale retry."""
        out = [Outcome("stale")] * len(items)
        todo = list(range(len(items)))

        async def attempt(snap: ConfigSnapshot) -> list[int]:
            """Send the calls still to do; the indexes that came back stale."""
            nonlocal todo
            calls: list[Call] = []
            for i in todo:
                msg, entry = items[i]
                prepared = self.prepare(msg, snap, entry, now_ms)
                if isinstance(prepared, Outcome):
                    # Well-formed but inapplicable (a config that fails
                    # validation): reply invalid, dead-letter and ack, atomically.
                    prepared = self.reject_call(
                        entry=entry,
                        request_id=msg.request_id,
                        error=prepared.fields.get("error", "invalid"),
                        fields=encode(msg),
                        now_ms=now_ms,
                        decided_with=snap,
                    )
                calls.append(prepared)
            results = await run_calls(self.redis, calls) if calls else []
            results = await self._finish_steps(calls, results)
            for i, res in zip(todo, results, strict=True):
                out[i] = _outcome(res)
            todo = [i for i in todo if out[i].status == "stale"]
            return todo

        await retry_stale(self.source, attempt, bool, lambda stale: self.on_stale_retry(len(stale)))
        return out

    async def _finish_steps(self, calls: Sequence[Call], results: list[object]) -> list[object]:
        """Run again the calls that answered ``{'more', n}`` until they finish.

        Removing a pod with many calls takes several steps (``remove_pod`` in
        ``_prelude.lua``), each a short script, so that no script holds Redis
        for long; every step leaves a consistent state and the last one
        replies and acknowledges. One round trip per step for the whole batch.
        """
        out = list(results)
        for _ in range(MAX_STEPS):
            todo = [
                n for n, res in enumerate(out) if isinstance(res, list) and res and res[0] == "more"
            ]
            if not todo:
                break
            again = await run_calls(self.redis, [calls[n] for n in todo])
            for n, res in zip(todo, again, strict=True):
                out[n] = res
        return out

    async def apply(
        self, msg: Message, entry: Entry | None = None, now_ms: int | None = None
    ) -> Outcome:
        """One message (tests, the CLI); the same path as a batch of one."""
        (outcome,) = await self.run([(msg, entry)], now_ms)
        return outcome

    def leader_call(
        self,
        name: str,
        snap: ConfigSnapshot,
        args: Sequence[str],
        *,
        extra_keys: Sequence[str] = (),
        now_ms: int | None = None,
    ) -> Call:
        """A call of a leader script (reap, move, gauges) with the fixed layout.

        ``args`` start with the fencing token; the script does nothing unless
        it is the current one, and answers ``{"stale", ...}`` when Redis holds
        a newer config than ``snap`` (an old pool table could re-index a pod
        under an old, larger max_concurrent). No entry, no reply.
        """
        origin = _Origin(None, None, None, now_ms)
        return self._call(name, snap, origin, args, extra_keys=extra_keys)

    # --- dead letters -------------------------------------------------------------
    def reject_call(
        self,
        *,
        entry: Entry | None,
        request_id: str | None,
        error: str,
        fields: dict[str, str],
        deliveries: int = 1,
        now_ms: int | None = None,
        decided_with: ConfigSnapshot | None = None,
    ) -> Call:
        """Dead-letter an entry atomically: ``invalid`` reply, dead entry, XACK.

        ``decided_with``: the snapshot a config-dependent rejection was decided
        with (a policy naming an unknown pool); the script answers ``stale``
        instead of rejecting when Redis holds a newer config or policy set.
        """
        # Masked here, the one door to the dead stream and the ``invalid``
        # reply: an error may quote a bad field (an endpoint with a password)
        # and the fields are kept as sent.
        error = mask_text(error)
        payload = msgspec.json.encode(
            {mask_text(k): mask_text(v) for k, v in fields.items()}
        ).decode()
        kind, echo = self._reject_subject(entry, fields)
        config_reply = kind == "config"
        return self.calls.call(
            "reject",
            PoolTable.of(self.keys, None),
            (
                error,
                payload,
                str(deliveries),
                "1" if config_reply else "0",
            ),
            stream=entry.stream if entry else None,
            entry_id=entry.entry_id if entry else None,
            request_id=request_id,
            now_ms=now_ms,
            want_cfgv=None if decided_with is None else decided_with.version,
            want_mv=None if decided_with is None else decided_with.merchants_version,
            kind=kind,
            echo=echo,
        )

    def _reject_subject(
        self, entry: Entry | None, fields: Mapping[str, str]
    ) -> tuple[str, tuple[str, str]]:
        """What an ``invalid`` reply answers: the kind of the entry's stream, and
        its call_id or pod_id when that is a valid identifier (junk is not echoed)."""
        stream = entry.stream if entry else ""
        kind = "pod" if stream == self.keys.pods_stream else ""
        for name in REQUEST_KINDS:
            if stream == self.keys.request_stream(name):
                kind = name
        field = _ECHOED.get(kind, "")
        value = fields.get(field, "") if field else ""
        if not (isinstance(value, str) and IDENT_RE.match(value)):
            return kind, ("", "")
        return kind, (field, value)


def merchant_policy_problems(merchant_id: str, policy: object, snap: ConfigSnapshot) -> list[str]:
    """Every reason a merchant policy cannot be stored against this snapshot."""
    from tierpool.schemas import MerchantPolicy

    assert isinstance(policy, MerchantPolicy)
    cfg = snap.config
    problems: list[str] = []
    dedicated = dedicated_pools(cfg)
    if policy.pool is not None:
        if policy.pool not in cfg:
            problems.append(f"merchant.pool: tier {policy.pool!r} is not configured")
        else:
            owner = snap.owner_of(policy.pool)
            if owner is not None and owner != merchant_id:
                problems.append(
                    f"merchant.pool: pool {policy.pool!r} is dedicated to merchant {owner!r}"
                )
    for name in policy.fallback or ():
        if name not in cfg:
            problems.append(f"merchant.fallback: tier {name!r} is not configured")
        elif name in dedicated and snap.owner_of(name) not in (None, merchant_id):
            problems.append(
                f"merchant.fallback: pool {name!r} is dedicated to merchant {snap.owner_of(name)!r}"
            )
    return problems


def _outcome(result: object) -> Outcome:
    if isinstance(result, BaseException):
        refusal = write_refusal(result)
        if refusal is not None:  # counted and logged, rate-limited, by the caller
            return Outcome("refused", {"error": refusal})
        log.warning("script call failed: %s", result)
        return Outcome("error", {"error": str(result)})
    if not isinstance(result, list) or not result:
        return Outcome("error", {"error": f"unexpected script result {result!r}"})
    status = str(result[0])
    if status == "more":  # a step of a removal still running (see PoolState._finish_steps)
        return Outcome("more")
    if status == "stale":
        return Outcome(
            "stale", {"config_version": str(result[1]), "merchants_version": str(result[2])}
        )
    it = iter(result[1:])
    return Outcome(status, {str(k): str(v) for k, v in zip(it, it, strict=True)})
