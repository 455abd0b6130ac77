"""The worker's in-memory snapshot of the tier config and merchant policies.

Bootstrap as the anchor: the ``TIER_CONFIG`` env value is written to
``tp:{NS}:config`` only when absent (with ``config:version``, in one MSETNX);
when present, Redis wins. A namespace with no config adopts smart-router's
``voice:tier:config`` instead when that key exists (migration). While Redis
cannot be reached the env config is the snapshot, and :meth:`ConfigCache.run` keeps trying.

Freshness, fastest first:

1. every config change PUBLISHes on ``tp:{NS}:config:changed`` (the version,
   or ``merchants:{n}``), and SPUBLISHes the same on that channel, which
   subscribers on a Redis Cluster take (sharded pub/sub: the channel's slot
   is the namespace's, so the node that runs the scripts also delivers);
   :meth:`ConfigCache.run` re-reads on a message, one read for a whole burst;
2. after the pub/sub connection comes back (dropped, killed, Redis restarted)
   it re-reads at once: whatever was published meanwhile is lost;
3. a safety re-read every ``min(config_resync_s, merchant_cache_ttl_s)``
   catches a message lost any other way. Merchant policies are in the same
   snapshot (read in the same transaction), so ``merchant_cache_ttl_s`` (the
   tenant cache TTL of seed 001) only shortens that period: while Redis
   answers, no policy is served longer than it unread, even were every
   message lost. With both defaults (30 s) the two coincide.

None of this is needed for safety: every script is handed the snapshot's
config and merchants versions and answers ``stale`` when Redis holds others,
so a worker never allocates on an old config or an old merchant policy, it
only retries after :meth:`ConfigCache.refresh`. Freshness only saves retries.

Never backwards: reads are serialised, and a read showing an older state than
the one held (Redis lost writes) is not served; Redis's content is instead
re-stamped with a version past the held one, so a version number never names
two contents. When Redis lost the config altogether, TIER_CONFIG is
bootstrapped again as the held version + 1.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Protocol

import anyio
from anyio.abc import TaskStatus
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError, WatchError

from tierpool.core.errors import TierConfigError
from tierpool.core.keys import ANCHOR_CONFIG_KEY, Keys
from tierpool.core.redistarget import on_cluster
from tierpool.core.settings import Settings
from tierpool.core.snapshot import ConfigSnapshot, read_snapshot
from tierpool.core.tierconfig import TierConfig, read_anchor_tier_config, to_json

log = logging.getLogger(__name__)

PING_INTERVAL_S = 5.0
"""How often the pub/sub connection is pinged. redis-py's own health check
only sends a PING and never notices that no answer came (redis-py #2417), so
a half-open connection would otherwise be silent for ever: no answer within
another interval counts as a dropped connection."""
SUBSCRIBE_TIMEOUT_S = 5.0
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 5.0
DRAIN_MAX = 10_000
"""Messages taken off the connection before a read: a burst costs one read."""

_CONTENT_ERRORS = (TierConfigError, ValueError)  # ValueError includes msgspec errors
_REDIS_ERRORS = (RedisError, OSError)  # OSError includes TimeoutError and refused connects

ChangeHook = Callable[[ConfigSnapshot], None]


class ReadinessFlags(Protocol):
    """What the cache reports to readiness (``workers.context.Health`` fits)."""

    subscribed: bool
    config_loaded: bool


class _PubSubDead(OSError):
    """The pub/sub connection did not answer a PING: reconnect."""


def env_config(settings: Settings) -> TierConfig:
    """The ``TIER_CONFIG`` of the environment (the default one when empty), as version 1."""
    return settings.tier_config().with_version(1)


async def bootstrap(redis: Redis, keys: Keys, config: TierConfig, after_version: int = 0) -> bool:
    """Store ``config`` when Redis has none (config and version together). True if stored.

    ``after_version`` lets a worker that knew version N before Redis lost its
    data store N+1, so no worker mistakes the new config for its old N.
    """
    version = max(config.version, after_version + 1, 1)
    stored = config.with_version(version)
    return bool(await redis.msetnx({keys.config: to_json(stored), keys.config_version: version}))


def describe(snap: ConfigSnapshot) -> str:
    """A snapshot for logs. Policies are re-encoded from their schema, never copied
    from Redis, so nothing but ``MerchantPolicy``'s four fields is ever printed."""
    count = len(snap.merchants)
    unreadable = (
        f"; {len(snap.unreadable)} that cannot be read, whose merchants' requests are "
        f"rejected: {', '.join(sorted(snap.unreadable))}"
        if snap.unreadable
        else ""
    )
    return (
        f"config version {snap.version} (pools {', '.join(snap.config.pools)}), "
        f"merchants version {snap.merchants_version} ({count} "
        f"polic{'y' if count == 1 else 'ies'}{unreadable}; `tierpool merchant get` lists them)"
    )


def _older(new: ConfigSnapshot, held: ConfigSnapshot) -> str | None:
    """Why ``new`` cannot follow ``held`` in one history, or None when it can.

    Reads are serialised, so a later read seeing an older state means Redis
    itself went back (failover that lost writes, restore, data loss after
    another worker bootstrapped first), not a race between reads.
    """
    if new.version < held.version:
        return f"Redis holds config version {new.version}, older than {held.version}"
    if new.version > held.version:
        return None
    if new.config != held.config:
        return f"Redis holds other content under config version {new.version}"
    if new.merchants_version < held.merchants_version:
        return (
            f"Redis holds merchants version {new.merchants_version}, "
            f"older than {held.merchants_version}"
        )
    if new.merchants_version == held.merchants_version and new.merchants != held.merchants:
        return f"Redis holds other policies under merchants version {new.merchants_version}"
    return None


class ConfigCache:
    """A snapshot source for :class:`core.state.PoolState`.

    :meth:`current` never touches Redis: a decision is made from the one
    snapshot it returns. :meth:`run` keeps it fresh. ``on_change`` hooks are
    called with every new snapshot (the worker sets its config gauge there);
    a failing hook is logged and does not stop the others.
    """

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        settings: Settings,
        *,
        health: ReadinessFlags | None = None,
        ping_interval_s: float = PING_INTERVAL_S,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self.health = health
        self.ping_interval_s = ping_interval_s
        self.on_change: list[ChangeHook] = []
        self.reads = 0  # snapshot reads done (a burst of messages costs one: tests, bench)
        self.messages = 0  # change notices received on the pub/sub channel
        self._env = env_config(settings)
        self._snap = ConfigSnapshot(self._env)
        self._loaded = False  # whether _snap came from Redis
        self._lock = anyio.Lock()
        self._reads_started = 0
        self._fresh_through = 0  # number of the last read that succeeded
        self._problems: set[str] = set()
        self._waiters: list[tuple[Callable[[ConfigSnapshot], bool], anyio.Event]] = []

    # --- reading -------------------------------------------------------------
    @property
    def version(self) -> int:
        return self._snap.version

    @property
    def resync_s(self) -> float:
        """Safety re-read period: a policy is never served longer unread (Redis up)."""
        return min(self.settings.config_resync_s, self.settings.merchant_cache_ttl_s)

    def current(self) -> ConfigSnapshot:
        return self._snap

    async def refresh(self) -> ConfigSnapshot:
        """Read Redis now (bootstrapping when it holds no config) and serve what it holds.

        Raises a Redis error, or ``TierConfigError`` / ``ValueError`` for a
        stored config or policy that does not parse; the snapshot in hand is
        then kept. Reads are serialised; a caller that finds that a read which
        started after its own call has already completed takes that read's
        result, so a burst of refreshes after one ``stale`` costs one read.
        """
        called_at = self._reads_started
        async with self._lock:
            if self._fresh_through > called_at:
                return self._snap
            self._reads_started += 1
            number = self._reads_started
            self.reads += 1
            snap = await read_snapshot(self.redis, self.keys, self._env)
            if snap is None:
                snap = await self._bootstrap()
            elif not self._loaded:
                self._say_if_env_ignored(snap)
            if self._loaded:
                why = _older(snap, self._snap)
                if why is not None:
                    self._problem(f"{why}; keeping it and moving Redis past it")
                    await self._rebase()
                    return self._snap
            self._fresh_through = number
            if self._problems:
                self._problems.clear()
                log.info("tier config read from Redis again")
            self._install(snap)
            return self._snap

    async def wait_until(
        self, predicate: Callable[[ConfigSnapshot], bool], timeout_s: float
    ) -> ConfigSnapshot:
        """The first snapshot for which ``predicate`` holds; TimeoutError after ``timeout_s``."""
        with anyio.fail_after(timeout_s):
            while not predicate(self._snap):
                event = anyio.Event()
                waiter = (predicate, event)
                self._waiters.append(waiter)
                try:
                    await event.wait()
                finally:
                    with suppress(ValueError):
                        self._waiters.remove(waiter)
        return self._snap

    async def wait_for_version(self, version: int, timeout_s: float) -> ConfigSnapshot:
        """The snapshot once this cache serves config ``version`` or newer (tests, bench)."""
        return await self.wait_until(lambda s: s.version >= version, timeout_s)

    def _say_if_env_ignored(self, snap: ConfigSnapshot) -> None:
        """At start: say so when ``TIER_CONFIG`` is set but Redis already holds a config.

        Only the first worker of a namespace writes ``TIER_CONFIG``; after that
        the config lives in Redis and changes through ``tierpool config set``.
        An operator who edits the variable and restarts would otherwise
        wonder why nothing changed.
        """
        if not self.settings.tier_config_raw.strip():
            return
        same = to_json(snap.config.with_version(0)) == to_json(self._env.with_version(0))
        if not same:
            log.warning(
                "TIER_CONFIG is set but ignored: %s already holds config version %d, which "
                "differs from it (the variable only seeds a new namespace; change the live "
                "config with `tierpool config set`)",
                self.keys.config,
                snap.version,
            )

    async def _bootstrap(self) -> ConfigSnapshot:
        after = self._snap.version if self._loaded else 0
        config, source = await self._first_config()
        if await bootstrap(self.redis, self.keys, config, after):
            log.info("tier config bootstrapped from %s as version %d", source, max(after + 1, 1))
        snap = await read_snapshot(self.redis, self.keys, self._env)
        if snap is None:
            raise ValueError(
                f"{self.keys.config} is missing but {self.keys.config_version} "
                "is set: not bootstrapping over a half-written config"
            )
        return snap

    async def _first_config(self) -> tuple[TierConfig, str]:
        """What a namespace with no config starts with: smart-router's stored config
        when there is one (the anchor let it win over ``TIER_CONFIG`` too), else the env's.

        Read with the anchor's leniency, each difference logged; a value that
        cannot be read even so is logged and ``TIER_CONFIG`` is used.
        """
        if await on_cluster(self.redis):
            # smart-router never ran on a cluster, and its key is in another slot
            # (on another master): a namespace's client only reaches its own slot.
            return self._env, "TIER_CONFIG"
        raw = await self.redis.get(ANCHOR_CONFIG_KEY)
        if raw is None:
            return self._env, "TIER_CONFIG"
        try:
            config, notes = read_anchor_tier_config(raw)
        except TierConfigError as exc:
            log.warning("%s not adopted, using TIER_CONFIG: %s", ANCHOR_CONFIG_KEY, exc)
            return self._env, "TIER_CONFIG"
        for note in notes:
            log.warning("%s: %s", ANCHOR_CONFIG_KEY, note)
        return config, f"smart-router's {ANCHOR_CONFIG_KEY}"

    async def _rebase(self) -> None:
        """Give Redis's config (and policies) versions past the ones this worker held.

        Redis's content wins, but a version number this worker used must never
        name other content (every guard compares version numbers), and its
        allocations would answer ``stale`` for ever otherwise. Nothing changes
        when Redis moved on in between (WATCH).
        """
        k, held = self.keys, self._snap
        async with self.redis.pipeline(transaction=True) as pipe:
            await pipe.watch(k.config, k.config_version, k.merchants, k.merchants_version)
            now = await read_snapshot(self.redis, k, self._env)
            if now is None or _older(now, held) is None:
                return
            pipe.multi()  # type: ignore[no-untyped-call]
            if now.config != held.config:  # version or content
                version = max(now.version, held.version) + 1
                pipe.set(k.config, to_json(now.config.with_version(version)))
                pipe.set(k.config_version, version)
                pipe.publish(k.config_changed, str(version))
                pipe.spublish(k.config_changed, str(version))
            else:
                mv = max(now.merchants_version, held.merchants_version) + 1
                pipe.set(k.merchants_version, mv)
                pipe.publish(k.config_changed, f"merchants:{mv}")
                pipe.spublish(k.config_changed, f"merchants:{mv}")
            pipe.xadd(
                k.events,
                {
                    "event": "config_rebased",
                    "config_version": str(now.version),
                    "merchants_version": str(now.merchants_version),
                },
                maxlen=self.settings.events_maxlen,
                approximate=True,
            )
            with suppress(WatchError):
                await pipe.execute()
                log.warning("config versions moved past the ones this worker held")

    def _install(self, snap: ConfigSnapshot) -> None:
        """Serve ``snap`` (``refresh`` checked it follows the one held)."""
        self._flag("config_loaded", True)
        old, first = self._snap, not self._loaded
        if not first and (old.version, old.merchants_version) == (
            snap.version,
            snap.merchants_version,
        ):
            return  # same content: keep the object (PoolState caches per config object)
        self._snap, self._loaded = snap, True
        log.info("serving %s", describe(snap))
        for hook in list(self.on_change):
            try:
                hook(snap)
            except Exception:
                log.exception("config on_change hook %r failed", hook)
        for predicate, event in list(self._waiters):
            if predicate(snap):
                event.set()

    def _problem(self, text: str) -> None:
        """Log ``text`` once until the next good read (no flood while Redis is down)."""
        if text not in self._problems:
            if len(self._problems) > 64:  # errors that differ every time: bounded anyway
                self._problems.clear()
            self._problems.add(text)
            log.warning("%s", text)

    # --- the listener ----------------------------------------------------------
    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep the snapshot fresh until cancelled.

        Subscribes, then loads, then reports started, so a worker that starts
        this with ``tg.start()`` is subscribed before it says it is ready (no
        change can fall between its load and its subscription). While Redis is
        down it keeps the env config, retries with backoff, and has not
        started yet.
        """
        started = False
        delay = BACKOFF_MIN_S
        while True:
            try:
                async with self._subscription() as pubsub:
                    self._flag("subscribed", True)
                    await self._read(raise_redis_errors=True)  # at once, also after a reconnect
                    if not started:
                        started = True
                        task_status.started()
                    delay = BACKOFF_MIN_S
                    await self._listen(pubsub)
            except _REDIS_ERRORS as exc:
                self._problem(f"config listener: {type(exc).__name__}: {exc}; reconnecting")
            finally:
                self._flag("subscribed", False)
            await anyio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, BACKOFF_MAX_S)

    async def _read(self, *, raise_redis_errors: bool = False) -> bool:
        """:meth:`refresh`, logging why not. True when Redis answered (even with a bad config)."""
        try:
            await self.refresh()
            return True
        except _CONTENT_ERRORS as exc:
            self._problem(f"stored tier config ignored, keeping version {self.version}: {exc}")
            return True
        except _REDIS_ERRORS as exc:
            if raise_redis_errors:
                raise
            self._problem(f"tier config not re-read: {type(exc).__name__}: {exc}")
            return False

    @asynccontextmanager
    async def _subscription(self) -> AsyncIterator[PubSub]:
        """A fresh pub/sub connection, subscribed (confirmation received)."""
        pubsub: PubSub = self.redis.pubsub()
        try:
            if await on_cluster(self.redis):
                await pubsub.ssubscribe(self.keys.config_changed)
            else:
                await pubsub.subscribe(self.keys.config_changed)
            with anyio.fail_after(SUBSCRIBE_TIMEOUT_S):
                while True:
                    msg = await pubsub.get_message(timeout=SUBSCRIBE_TIMEOUT_S)
                    if msg is not None and msg["type"] in ("subscribe", "ssubscribe"):
                        break
            yield pubsub
        finally:
            with anyio.CancelScope(shield=True), suppress(*_REDIS_ERRORS):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _listen(self, pubsub: PubSub) -> None:
        """Read on messages, on the resync period and after failures, until the
        connection is gone (a Redis or OS error: the caller reconnects)."""
        read_due = anyio.current_time() + self.resync_s
        retry_s = BACKOFF_MIN_S
        ping_due = anyio.current_time() + self.ping_interval_s
        pinged_at: float | None = None
        while True:
            wait = min(read_due, ping_due) - anyio.current_time()
            msg = await pubsub.get_message(timeout=max(wait, 0.0))
            dirty = False
            for _ in range(DRAIN_MAX):
                if msg is None:
                    break
                pinged_at = None  # anything heard proves the connection
                dirty = self._wants_read(msg) or dirty
                msg = await pubsub.get_message(timeout=0.0)
            now = anyio.current_time()
            if dirty or now >= read_due:
                if await self._read():
                    read_due, retry_s = anyio.current_time() + self.resync_s, BACKOFF_MIN_S
                else:
                    read_due = anyio.current_time() + min(retry_s, self.resync_s)
                    retry_s = min(retry_s * 2, BACKOFF_MAX_S)
            now = anyio.current_time()
            if pinged_at is not None and now - pinged_at >= self.ping_interval_s:
                raise _PubSubDead(f"no answer to PING within {self.ping_interval_s:g}s")
            if now >= ping_due:
                await pubsub.ping("tierpool")
                pinged_at = now if pinged_at is None else pinged_at
                ping_due = now + self.ping_interval_s

    def _wants_read(self, msg: dict[str, object]) -> bool:
        """Whether a pub/sub message may announce something this snapshot lacks."""
        kind, data = msg.get("type"), msg.get("data")
        if kind in ("subscribe", "ssubscribe"):
            return True  # redis-py reconnected and resubscribed by itself: we may have missed some
        if kind == "sunsubscribe":  # the slot left this node (cluster): subscribe where it is
            raise _PubSubDead("the cluster moved the channel's slot away")
        if kind not in ("message", "smessage"):
            return False
        self.messages += 1
        if not self._loaded or not isinstance(data, str):
            return True
        name, _, number = data.rpartition(":")
        if not number.isdigit():
            return True
        held = self._snap.merchants_version if name == "merchants" else self._snap.version
        return int(number) > held or name not in ("", "merchants")

    def _flag(self, name: str, value: bool) -> None:
        if self.health is not None:
            setattr(self.health, name, value)
