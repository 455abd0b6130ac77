"""``tierpool run``: the whole system on one machine, with nothing to set up.

Where Redis comes from (``--backend auto``, the default): ``REDIS_URL`` when it
is set; else a private ``redis-server`` on a free port when one is on PATH;
else an in-process fakeredis server on a free port (``workers/fakeserver.py``:
no root, no apt, for trying out only). On a ``REDIS_URL`` the run takes a
namespace of its own (``run-XXXXXX``) and pod ids of its own, touches nothing
else, and removes that namespace's keys at exit.

Then it starts worker processes, a pod simulator, and a small load (callers that
allocate a call, hold it a moment and release it), then prints one progress
line a second (allocations/s, rejections/s, p50/p99 allocate latency, each
pool's free/busy pods, active calls, the leader) until Ctrl-C, SIGTERM or
``--duration`` seconds of load, and stops everything in order: the load
(releasing its calls), the pod simulator, the workers (SIGTERM, their
graceful shutdown), Redis.

Children, the private redis-server included, run in their own sessions, so a
Ctrl-C reaches only this process, which stops them in that order (a Redis
that died with the terminal's Ctrl-C used to leave the pod simulator unable
to drain); their logs go to files in a temporary directory, removed at exit
unless something failed or ``--keep-logs`` is given (the start-up line says
which). Each worker gets a free ``METRICS_PORT``, printed at start, so its
``/metrics`` can be looked at.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import os
import random
import secrets
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final

import anyio
from anyio.abc import Process, TaskGroup
from redis.exceptions import RedisError

from tierpool.client.client import TierpoolClient
from tierpool.connect.redisconn import connect
from tierpool.core.clock import monotonic_s
from tierpool.core.errors import RequestTimeout, SettingsError, TierpoolError
from tierpool.core.keys import Keys
from tierpool.core.masking import mask_url
from tierpool.core.settings import Settings
from tierpool.workers import http
from tierpool.workers.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from tierpool.workers.fakeserver import FakeRedisServer, FakeRedisUnavailable
from tierpool.workers.gauges import ClusterView, read_view
from tierpool.workers.leader import GAUGES_INTERVAL_S
from tierpool.workers.metrics import percentile
from tierpool.workers.redisproc import RedisNotInstalled, RedisProcess, free_port

READY_TIMEOUT_S: Final = 60.0
STOP_EXTRA_S: Final = 5.0
"""Beyond a worker's own shutdown grace, how long to wait before SIGKILL."""


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument(
        "--workers", type=int, default=2, metavar="N", help="worker processes (default 2)"
    )
    parser.add_argument(
        "--pods", type=int, default=6, metavar="N", help="simulated pods (default 6)"
    )
    parser.add_argument(
        "--callers",
        type=int,
        default=4,
        metavar="N",
        help="concurrent callers of the load (default 4; 0 = no load)",
    )
    parser.add_argument(
        "--hold",
        type=float,
        default=0.5,
        metavar="S",
        help="mean seconds a caller holds a call before releasing it",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="S",
        help="stop by itself after S seconds of load (default: until Ctrl-C)",
    )
    parser.add_argument(
        "--backend",
        choices=("auto", "redis-server", "fakeredis"),
        default="auto",
        help="where Redis comes from when REDIS_URL is not set (default auto: "
        "redis-server when on PATH, else fakeredis)",
    )
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the children's log files after exit"
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="S",
        help="seconds between progress lines (default 1)",
    )


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


@dataclass
class Child:
    """One child process and the file its output goes to."""

    name: str
    process: Process
    log_path: Path
    metrics_port: int | None = None
    exit_code: int | None = None

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class LoadStats:
    """What the callers did: counts and allocate latencies, per window and overall."""

    allocated: int = 0
    rejected: int = 0
    failed: int = 0
    window: list[float] = field(default_factory=list)
    window_allocated: int = 0
    window_rejected: int = 0
    recent: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=100_000)
    )

    def record(self, status: str, latency_s: float) -> None:
        self.window.append(latency_s)
        self.recent.append(latency_s)
        if status == "allocated":
            self.allocated += 1
            self.window_allocated += 1
        elif status == "rejected":
            self.rejected += 1
            self.window_rejected += 1
        else:
            self.failed += 1

    def take_window(self) -> tuple[int, int, list[float]]:
        out = (self.window_allocated, self.window_rejected, self.window)
        self.window_allocated = self.window_rejected = 0
        self.window = []
        return out


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}ms"


def progress_line(
    elapsed_s: float,
    interval_s: float,
    window: tuple[int, int, list[float]],
    view: ClusterView | None,
    live_calls: int | None = None,
) -> str:
    """One progress line: rates, allocate latency, live calls, pools, leader.

    ``live_calls`` is read now; the pool figures are the leader's last ones
    (every ``GAUGES_INTERVAL_S``), so the line says how old they are when they
    are older than that cadence allows (no leader, or a leader that stalls)
    rather than pass them off as current.
    """
    allocated, rejected, latencies = window
    parts = [
        f"{elapsed_s:5.0f}s",
        f"{allocated / interval_s:6.1f} alloc/s",
        f"{rejected / interval_s:5.1f} rejected/s",
        f"p50 {_ms(percentile(latencies, 0.5)):>7}",
        f"p99 {_ms(percentile(latencies, 0.99)):>7}",
    ]
    if view is None:
        parts.append("(Redis not answering)")
    elif view.gauges_at_ms is None:
        parts.append("(no pool figures from the leader yet)")
    else:
        pools = (
            "  ".join(
                f"{name} {g.free} free {g.busy + g.full} busy"
                + (f" {g.draining} draining" if g.draining else "")
                for name, g in view.pools.items()
                if g.pods
            )
            or "no pods in any pool"
        )
        age_s = max(0.0, (view.now_ms - view.gauges_at_ms) / 1000)
        if age_s > interval_s + GAUGES_INTERVAL_S:  # older than the leader's own cadence
            pools = f"{pools} (pools as of {age_s:.1f}s ago)"
        calls = view.active_calls if live_calls is None else live_calls
        parts += [f"calls {calls:3d}", pools, f"leader {view.leader_holder or 'none'}"]
    return "  ".join(parts)


class Embedded:
    """Runs and stops the children, the load and the progress display."""

    def __init__(
        self, args: argparse.Namespace, settings: Settings, url: str, *, pod_prefix: str = "sim"
    ) -> None:
        self.args = args
        self.settings = settings
        self.url = url
        self.pod_prefix = pod_prefix
        self.keys = Keys(settings.namespace)
        self.logdir = Path(tempfile.mkdtemp(prefix="tierpool-run-"))
        self.children: list[Child] = []
        self.stats = LoadStats()
        self.stopping = anyio.Event()
        self.failure: str | None = None
        self._files: list[IO[bytes]] = []

    # --- children -------------------------------------------------------------------
    async def spawn(
        self, name: str, argv: list[str], env: dict[str, str], metrics_port: int | None = None
    ) -> Child:
        log_path = self.logdir / f"{name}.log"
        out = _open_log(log_path)
        self._files.append(out)
        process = await anyio.open_process(
            [sys.executable, "-m", "tierpool", *argv],
            stdin=None,
            stdout=out,
            stderr=out,
            env=env,
            start_new_session=True,
        )
        child = Child(name, process, log_path, metrics_port)
        self.children.append(child)
        return child

    async def watch(self, child: Child) -> None:
        """Wait for the child to exit; exiting before we stop it is a failure."""
        child.exit_code = await child.process.wait()
        if not self.stopping.is_set():
            self.failure = f"{child.name} exited with code {child.exit_code}"
            say(f"\n{self.failure}; its last log lines:\n{child.tail()}")
            self.stopping.set()

    async def start_children(self, tg: TaskGroup) -> None:
        env = {**os.environ, "REDIS_URL": self.url, "TIERPOOL_NAMESPACE": self.keys.namespace}
        env.setdefault("LOG_FORMAT", "console")
        for i in range(1, self.args.workers + 1):
            port = free_port()
            child = await self.spawn(
                f"worker-{i}", ["worker"], {**env, "METRICS_PORT": str(port)}, port
            )
            tg.start_soon(self.watch, child)
        sim = await self.spawn(
            "pod-sim",
            ["pod-sim", "--pods", str(self.args.pods), "--prefix", self.pod_prefix],
            env,
        )
        tg.start_soon(self.watch, sim)

    async def wait_ready(self) -> bool:
        """Every worker answers /readyz 200, the pods registered, and the leader's
        pool figures count them (or we are stopping).

        Waiting for the figures keeps the first progress lines true: they
        showed pools as the leader last computed them, before the pods came.
        """
        workers = [c.metrics_port for c in self.children if c.metrics_port is not None]
        redis = connect(self.url, client_name="tierpool-run")
        try:
            with anyio.move_on_after(READY_TIMEOUT_S):
                while not self.stopping.is_set():
                    statuses = [await _readyz(port) for port in workers]
                    with contextlib.suppress(OSError, RedisError):
                        pods = await redis.hlen(self.keys.pod_pool)
                        if all(s == 200 for s in statuses) and pods >= self.args.pods:
                            view = await read_view(redis, self.keys)
                            counted = sum(g.pods for g in view.pools.values())
                            if view.gauges_at_ms is not None and counted >= self.args.pods:
                                return True
                    await anyio.sleep(0.1)
                return False
        finally:
            await redis.aclose()
        self.failure = f"not ready within {READY_TIMEOUT_S:.0f}s"
        return False

    async def stop_children(self) -> None:
        """Pod simulator first (no new pod events), then the workers, in parallel."""
        grace = self.settings.shutdown_grace_s + STOP_EXTRA_S
        sims = [c for c in self.children if c.metrics_port is None]
        workers = [c for c in self.children if c.metrics_port is not None]
        for group in (sims, workers):
            async with anyio.create_task_group() as tg:
                for child in group:
                    tg.start_soon(_stop, child, grace)
        for f in self._files:
            f.close()

    # --- load and progress ------------------------------------------------------------
    async def caller(self, client: TierpoolClient, index: int) -> None:
        n = 0
        while not self.stopping.is_set():
            n += 1
            call_id = f"{self.pod_prefix}-call-{os.getpid()}-{index}-{n}"
            t0 = monotonic_s()
            try:
                reply = await client.allocate(call_id)
            except RequestTimeout:
                self.stats.record("timeout", monotonic_s() - t0)
                continue
            self.stats.record(reply.status, monotonic_s() - t0)
            if reply.status != "allocated":
                await anyio.sleep(0.2)
                continue
            try:
                await anyio.sleep(random.uniform(0.5, 1.5) * self.args.hold)
            finally:
                with (
                    anyio.CancelScope(shield=True),
                    anyio.move_on_after(2.0),
                    contextlib.suppress(TierpoolError),
                ):  # timed out, or the client closed
                    await client.release(call_id)

    async def show_progress(self) -> None:
        redis = connect(self.url, client_name="tierpool-run-progress")
        started = monotonic_s()
        try:
            while True:
                await anyio.sleep(self.args.interval)
                view: ClusterView | None
                live: int | None = None
                try:
                    view = await read_view(redis, self.keys)
                    live = int(await redis.hlen(self.keys.calls))
                except Exception:  # Redis gone for a moment: say so and go on
                    view = None
                window = self.stats.take_window()
                say(progress_line(monotonic_s() - started, self.args.interval, window, view, live))
        finally:
            await redis.aclose()

    async def run_load(self) -> None:
        async with (
            TierpoolClient.from_url(
                self.url, namespace=self.settings.namespace, default_timeout_s=5.0
            ) as client,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(self.show_progress)
            for i in range(self.args.callers):
                tg.start_soon(self.caller, client, i)
            with anyio.move_on_after(self.args.duration):
                await self.stopping.wait()
            self.stopping.set()
            tg.cancel_scope.cancel()


def _open_log(path: Path) -> IO[bytes]:
    return path.open("ab")


async def _readyz(port: int | None) -> int:
    if port is None:
        return 0
    try:
        status, _ = await http.get("127.0.0.1", port, "/readyz", timeout_s=1.0)
    except (OSError, TimeoutError):
        return 0
    return status


async def _stop(child: Child, grace_s: float) -> None:
    if child.process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        child.process.terminate()
    with anyio.move_on_after(grace_s):
        await child.process.wait()
        return
    say(f"{child.name} did not stop within {grace_s:.0f}s: killing it")
    with contextlib.suppress(ProcessLookupError):
        child.process.kill()
    await child.process.wait()


async def _signals(emb: Embedded) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            if not emb.stopping.is_set():
                say(f"\n{signal.Signals(signum).name}: stopping")
            emb.stopping.set()


FAKEREDIS_BANNER: Final = (
    "{why}: using fakeredis, an in-process stand-in, on {url}.\n"
    "  It is for trying tierpool out, NOT for production (no persistence, one process,\n"
    "  slower). Install redis-server or set REDIS_URL for the real thing."
)


@dataclass
class Backend:
    """The Redis this run uses, and how to put it away."""

    url: str
    namespace: str
    pod_prefix: str
    close: Callable[[], None] | None = None
    own_namespace_on_shared_redis: bool = False


def start_backend(args: argparse.Namespace, settings: Settings) -> Backend:
    """REDIS_URL, else a private redis-server, else fakeredis (``--backend`` may force one)."""
    url = os.environ.get("REDIS_URL", "").strip()
    if url:
        tag = secrets.token_hex(3)
        namespace = f"run-{tag}"
        say(
            f"using REDIS_URL={mask_url(url)}: this run's own namespace {namespace} and pods "
            f"run-{tag}-*; nothing else is touched, and {namespace} is removed at exit"
        )
        return Backend(url, namespace, f"run-{tag}", own_namespace_on_shared_redis=True)
    want = args.backend
    if want in ("auto", "redis-server"):
        try:
            proc = RedisProcess(new_session=True)
        except RedisNotInstalled:
            if want == "redis-server":
                raise
        else:
            proc.start()
            pid = proc.proc.pid if proc.proc else "?"
            say(f"private Redis on {proc.url} (pid {pid}; data is lost at exit)")
            return Backend(proc.url, settings.namespace, "sim", proc.close)
    fake = FakeRedisServer()
    fake.start()
    why = "--backend fakeredis" if want == "fakeredis" else "no redis-server on PATH"
    say(FAKEREDIS_BANNER.format(why=why, url=fake.url))
    return Backend(fake.url, settings.namespace, "sim", fake.close)


async def remove_namespace(url: str, keys: Keys) -> int:
    """Delete every key of ``keys``' namespace (this run's own, on a shared Redis)."""
    redis = connect(url, client_name="tierpool-run-cleanup")
    removed = 0
    try:
        pattern = keys.prefix.replace("{", "\\{").replace("}", "\\}") + "*"
        batch: list[str] = []
        async for key in redis.scan_iter(match=pattern, count=500):
            batch.append(key)
            if len(batch) >= 500:
                removed += await redis.unlink(*batch)
                batch = []
        if batch:
            removed += await redis.unlink(*batch)
    finally:
        await redis.aclose()
    return removed


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        backend = await anyio.to_thread.run_sync(start_backend, args, settings)
    except (RedisNotInstalled, FakeRedisUnavailable) as exc:
        sys.stderr.write(f"tierpool run: {exc}\n")
        return EXIT_FAILED
    settings = dataclasses.replace(settings, namespace=backend.namespace)
    emb = Embedded(args, settings, backend.url, pod_prefix=backend.pod_prefix)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_signals, emb)
            await emb.start_children(tg)
            for child in emb.children:
                port = (
                    f", metrics http://127.0.0.1:{child.metrics_port}/metrics"
                    if child.metrics_port
                    else ""
                )
                say(f"started {child.name} (pid {child.process.pid}{port})")
            kept = "kept" if args.keep_logs else "removed at exit unless something fails"
            say(f"logs in {emb.logdir} ({kept}); waiting for the workers and {args.pods} pods...")
            if await emb.wait_ready():
                say(
                    "ready. Ctrl-C to stop"
                    + (f" (stopping by itself after {args.duration:g}s)" if args.duration else "")
                )
                await emb.run_load()
            emb.stopping.set()
            await emb.stop_children()
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            emb.stopping.set()
            await emb.stop_children()
            if backend.own_namespace_on_shared_redis:
                with contextlib.suppress(OSError, RedisError):
                    removed = await remove_namespace(backend.url, emb.keys)
                    say(f"removed namespace {backend.namespace} ({removed} keys)")
            if backend.close is not None:
                await anyio.to_thread.run_sync(backend.close)
    s = emb.stats
    say(
        f"stopped. {s.allocated} allocated, {s.rejected} rejected, {s.failed} failed or "
        f"timed out; allocate p50 {_ms(percentile(list(s.recent), 0.5))}, "
        f"p99 {_ms(percentile(list(s.recent), 0.99))}"
    )
    if emb.failure:
        say(f"failed: {emb.failure}; logs kept in {emb.logdir}")
        return EXIT_FAILED
    if args.keep_logs:
        say(f"logs kept in {emb.logdir}")
    else:
        shutil.rmtree(emb.logdir, ignore_errors=True)
    return EXIT_OK


def main(args: argparse.Namespace) -> int:
    try:
        settings = Settings.from_env(os.environ)
    except SettingsError as exc:
        sys.stderr.write(f"tierpool run: {exc}\n")
        return EXIT_USAGE
    if args.workers < 1 or args.pods < 0 or args.callers < 0 or args.interval <= 0:
        sys.stderr.write("tierpool run: --workers must be >= 1; --pods, --callers >= 0\n")
        return EXIT_USAGE
    return anyio.run(_run, args, settings)
