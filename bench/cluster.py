"""A private Redis and worker processes for one benchmark run.

Workers are ``python -m tierpool.workers`` processes, as deployed, each with its own
free ``METRICS_PORT`` and a log file. A worker is ready once its id is in
``tp:{NS}:workers`` (written after every role started). The cluster kills
whatever it started when it closes, whatever happened.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import anyio
from redis.asyncio import Redis

from tierpool.bench.common import BENCH_ENV
from tierpool.core.keys import Keys
from tierpool.workers.redisproc import RedisProcess
from tierpool.workers.spawn import spawn_worker

READY_TIMEOUT_S = 30.0
HTTP_TIMEOUT_S = 2.0


class BenchError(RuntimeError):
    """A benchmark part could not run (a worker died, nothing was measured)."""


@dataclass(eq=False)
class WorkerProcess:
    proc: subprocess.Popen[bytes]
    metrics_port: int
    log_path: Path
    worker_id: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)

    def rss_kb(self) -> int:
        """Resident set size now, from ``/proc/PID/status`` (VmRSS), in KiB."""
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return 0
        for line in text.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    async def metrics(self) -> dict[str, float]:
        """The worker's ``/metrics``, as ``{series: value}`` (labels kept in the name)."""
        body = await http_get("127.0.0.1", self.metrics_port, "/metrics")
        out: dict[str, float] = {}
        for line in body.splitlines():
            if not line or line.startswith("#"):
                continue
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
        return out


async def http_get(host: str, port: int, path: str) -> str:
    """The body of one plain HTTP/1.1 GET (the worker answers ``Connection: close``)."""
    with anyio.fail_after(HTTP_TIMEOUT_S):
        async with await anyio.connect_tcp(host, port) as stream:
            await stream.send(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            chunks: list[bytes] = []
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                while True:
                    chunks.append(await stream.receive())
    raw = b"".join(chunks)
    _, _, body = raw.partition(b"\r\n\r\n")
    return body.decode(errors="replace")


class Cluster:
    """One private redis-server and the workers of one namespace on it."""

    def __init__(self, namespace: str = "bench", env: Mapping[str, str] | None = None) -> None:
        self.namespace = namespace
        self.keys = Keys(namespace)
        self.env = {**BENCH_ENV, **(env or {})}
        self.redis_proc = RedisProcess()
        self.workers: list[WorkerProcess] = []
        self._dir = tempfile.TemporaryDirectory(prefix="tierpool-bench-")
        self.log_dir = Path(self._dir.name)

    @property
    def url(self) -> str:
        return self.redis_proc.url

    def start_redis(self) -> None:
        self.redis_proc.start()

    def spawn(
        self, n: int, env: Mapping[str, str] | None = None, args: tuple[str, ...] = ()
    ) -> list[WorkerProcess]:
        out = []
        for _ in range(n):
            log_path = self.log_dir / f"worker-{len(self.workers)}.log"
            proc, port = spawn_worker(
                self.url, self.namespace, log_path, env={**self.env, **(env or {})}, args=args
            )
            wp = WorkerProcess(proc, port, log_path)
            self.workers.append(wp)
            out.append(wp)
        return out

    async def wait_ready(self, redis: Redis, procs: list[WorkerProcess]) -> None:
        """Until every worker of ``procs`` announced itself in ``tp:{NS}:workers``."""
        with anyio.fail_after(READY_TIMEOUT_S):
            while True:
                members = [str(m) for m in await redis.zrange(self.keys.workers, 0, -1)]
                for wp in procs:
                    if not wp.alive():
                        raise BenchError(
                            f"worker {wp.pid} exited with {wp.proc.returncode}:\n{wp.log_tail()}"
                        )
                    if wp.worker_id is None:
                        wp.worker_id = next((m for m in members if f"-{wp.pid}-" in m), None)
                if all(wp.worker_id for wp in procs):
                    return
                await anyio.sleep(0.02)

    async def start_workers(
        self, redis: Redis, n: int, args: tuple[str, ...] = ()
    ) -> list[WorkerProcess]:
        procs = self.spawn(n, args=args)
        await self.wait_ready(redis, procs)
        return procs

    def live_workers(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.alive()]

    def by_worker_id(self, worker_id: str) -> WorkerProcess | None:
        return next((w for w in self.workers if w.worker_id == worker_id), None)

    def stop_workers(self) -> None:
        for wp in self.workers:
            if wp.alive():
                wp.proc.terminate()
        for wp in self.workers:
            try:
                wp.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                wp.kill9()
                wp.proc.wait(timeout=10)

    def close(self) -> None:
        try:
            self.stop_workers()
        finally:
            self.redis_proc.close()
            with contextlib.suppress(OSError):
                self._dir.cleanup()

    def __enter__(self) -> Cluster:
        self.start_redis()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
