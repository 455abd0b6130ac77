"""``tierpool pod-sim``: N simulated pods in one process, for ``tierpool run`` and compose.

Each simulated pod is a real :class:`tierpool.client.podagent.PodAgent` (register,
heartbeat, drain, deregister); they share one client, so N pods cost two
Redis connections. SIGTERM or SIGINT shuts every pod down gracefully: each
drains, waits up to ``--grace`` for its calls to end, and deregisters.

A simulated pod has no callers connecting to it, so by default it does not
know its calls: it heartbeats without ``calls`` (leases are not renewed;
calls end by release or lease expiry). With ``--call-seconds S`` the pods
learn of their calls from the audit log (``allocated`` events naming
them), list them in heartbeats, and end each call after S seconds with a
release, like a caller hanging up. A second signal stops at once.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any, Final

import anyio
from anyio.abc import TaskGroup
from redis.asyncio import Redis

from tierpool.client.client import TierpoolClient
from tierpool.client.mux import backoff_s
from tierpool.client.podagent import PodAgent
from tierpool.connect.redisconn import connect
from tierpool.core.errors import RequestTimeout, SettingsError, TierpoolError
from tierpool.core.keys import Keys
from tierpool.core.settings import Settings
from tierpool.workers.cli import EXIT_OK, EXIT_USAGE

log = logging.getLogger(__name__)

EVENTS_BLOCK_MS: Final = 1_000
"""XREAD BLOCK on the audit log; below the connection's socket timeout (redis-py #3138)."""
_CALL_OVER_EVENTS: Final = frozenset({"released", "lease_expired", "call_lost"})


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument(
        "--pods", type=int, default=3, metavar="N", help="simulated pods (default 3)"
    )
    parser.add_argument("--zone", choices=("open", "restricted"), default="open")
    parser.add_argument(
        "--capability",
        type=int,
        default=1,
        choices=range(1, 6),
        metavar="C",
        help="capability 1-5 of every pod (default 1)",
    )
    parser.add_argument(
        "--prefix", default="sim", help="pod ids are PREFIX-0 .. PREFIX-(N-1) (default sim)"
    )
    parser.add_argument(
        "--call-seconds",
        type=float,
        default=0.0,
        metavar="S",
        help="learn of calls from the audit log and end each after S seconds "
        "(default 0: heartbeat without calls)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=10.0,
        metavar="S",
        help="on SIGTERM, how long each pod waits for its calls (default 10)",
    )


class PodSim:
    """N agents on one client, and (with ``call_seconds``) the call simulation."""

    def __init__(self, client: TierpoolClient, args: argparse.Namespace, heartbeat_s: float):
        self.client = client
        self.call_seconds: float = args.call_seconds
        self.grace_s: float = args.grace
        self.agents: dict[str, PodAgent] = {}
        for i in range(args.pods):
            pod_id = f"{args.prefix}-{i}"
            self.agents[pod_id] = PodAgent(
                client,
                pod_id,
                f"http://{pod_id}.podsim.invalid:8080",
                zone=args.zone,
                capability=args.capability,
                labels={"simulated": "true"},
                heartbeat_s=heartbeat_s,
                report_calls=self.call_seconds > 0,
            )

    async def run(self, tg: TaskGroup) -> None:
        """Start every agent and wait until all are registered."""
        registered = 0
        all_in = anyio.Event()

        async def one(agent: PodAgent) -> None:
            nonlocal registered
            await tg.start(agent.run)
            registered += 1
            if registered == len(self.agents):
                all_in.set()

        for agent in self.agents.values():
            tg.start_soon(one, agent)
        if self.agents:
            await all_in.wait()
        log.info("pod-sim ready: %d pods registered", len(self.agents))

    async def shutdown(self) -> None:
        async with anyio.create_task_group() as tg:
            for agent in self.agents.values():
                tg.start_soon(agent.shutdown, self.grace_s)
        log.info("pod-sim stopped: %d pods deregistered", len(self.agents))

    async def follow_calls(self, redis: Redis, keys: Keys, tg: TaskGroup) -> None:
        """Learn of our pods' calls from the audit log; end each after call_seconds."""
        last_id = "$"
        failures = 0
        while True:
            try:
                answer: Any = await redis.xread({keys.events: last_id}, block=EVENTS_BLOCK_MS)
                failures = 0
            except Exception as exc:  # Redis away (restart): retry; "$" again after it
                failures += 1
                log.warning("pod-sim: reading the audit log failed: %s", exc)
                last_id = "$"
                await anyio.sleep(backoff_s(failures))
                continue
            for _stream, entries in answer or []:
                for entry_id, fields in entries:
                    last_id = entry_id
                    self._on_event(fields, tg)

    def _on_event(self, fields: dict[str, str], tg: TaskGroup) -> None:
        agent = self.agents.get(fields.get("pod_id", ""))
        call_id = fields.get("call_id")
        if agent is None or not call_id:
            return
        kind = fields.get("event")
        if kind == "allocated" and call_id not in agent.calls:
            agent.call_started(call_id)
            tg.start_soon(self._hang_up, agent, call_id)
        elif kind in _CALL_OVER_EVENTS:
            agent.call_ended(call_id)

    async def _hang_up(self, agent: PodAgent, call_id: str) -> None:
        await anyio.sleep(self.call_seconds)
        if call_id not in agent.calls:
            return  # released by its caller already
        agent.call_ended(call_id)
        try:
            await self.client.release(call_id, reason="pod-sim call ended")
        except (RequestTimeout, TierpoolError) as exc:
            log.warning("pod-sim: releasing %s failed: %s (its lease will expire)", call_id, exc)


async def serve(settings: Settings, args: argparse.Namespace) -> None:
    keys = Keys(settings.namespace)
    events_redis = connect(
        settings.redis_target, client_name="tierpool-podsim-events", namespace=settings.namespace
    )
    try:
        async with TierpoolClient.from_url(
            settings.redis_target, namespace=settings.namespace, client_name="tierpool-podsim"
        ) as client:
            sim = PodSim(client, args, settings.heartbeat_s)
            async with anyio.create_task_group() as tg:
                if sim.call_seconds > 0:
                    tg.start_soon(sim.follow_calls, events_redis, keys, tg)
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    startup = anyio.CancelScope()
                    tg.start_soon(_startup, sim, tg, startup)
                    async for signum in signals:
                        log.info("%s received: draining every pod", signum.name)
                        startup.cancel()
                        break
                    async with anyio.create_task_group() as stopping:
                        stopping.start_soon(_stop_at_second_signal, signals, stopping)
                        await sim.shutdown()
                        stopping.cancel_scope.cancel()
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await events_redis.aclose()


async def _startup(sim: PodSim, tg: TaskGroup, scope: anyio.CancelScope) -> None:
    with scope:
        await sim.run(tg)


async def _stop_at_second_signal(signals: AsyncIterator[signal.Signals], tg: TaskGroup) -> None:
    async for signum in signals:
        log.warning("%s received again: stopping now", signum.name)
        tg.cancel_scope.cancel()
        return


def main(args: argparse.Namespace) -> int:
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        sys.stderr.write(f"tierpool pod-sim: {exc}\n")
        return EXIT_USAGE
    if args.pods < 0 or args.call_seconds < 0 or args.grace < 0:
        sys.stderr.write("tierpool pod-sim: --pods, --call-seconds and --grace must be >= 0\n")
        return EXIT_USAGE
    from tierpool.workers.logs import setup_logging

    setup_logging(settings)
    anyio.run(serve, settings, args)
    return EXIT_OK
