"""Worker subprocesses for end-to-end tests, and the producer's side of the wire.

:class:`WorkerPool` starts ``python -m tierpool.workers`` processes against the test
Redis with short claim/block timings and a free metrics port each, waits
until each one is ready (its id is in ``tp:{NS}:workers``, which a worker
writes only after its consumer joined the group and every role started),
and kills whatever is left when the test ends, whatever happened. Each
worker's log goes to a file; the tail of every log is printed at the end,
so a failing test shows what the workers said.
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from types import TracebackType

import anyio
import anyio.to_thread
from redis.asyncio import Redis

from tierpool.core.keys import Keys
from tierpool.workers.spawn import spawn_worker

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "t"
KEYS = Keys(NAMESPACE)

FAST_ENV: Mapping[str, str] = {
    "TIERPOOL_BLOCK": "100ms",
    "TIERPOOL_CLAIM_MIN_IDLE": "600ms",
    "TIERPOOL_CLAIM_INTERVAL": "100ms",
    "TIERPOOL_SHUTDOWN_GRACE": "5s",
    "LOG_FORMAT": "console",
    "LOG_LEVEL": "info",
}
"""Timings that let a test see claims within a second."""


class WorkerProc:
    """One worker subprocess."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path, metrics_port: int) -> None:
        self.proc = proc
        self.log_path = log_path
        self.metrics_port = metrics_port
        self.worker_id: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send_signal(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (SIGKILL by default): a crash, as far as Redis can tell."""
        self.send_signal(sig)

    def wait(self, timeout_s: float = 10.0) -> int:
        return self.proc.wait(timeout=timeout_s)

    async def wait_exit(self, timeout_s: float = 15.0) -> int:
        """The exit code; raises subprocess.TimeoutExpired if it runs on."""
        return await anyio.to_thread.run_sync(partial(self.proc.wait, timeout_s))

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class WorkerPool:
    """Spawns worker processes on one Redis and namespace; kills leftovers on close."""

    def __init__(
        self,
        redis_url: str,
        log_dir: Path,
        *,
        namespace: str = NAMESPACE,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.redis_url = redis_url
        self.log_dir = log_dir
        self.namespace = namespace
        self.keys = Keys(namespace)
        self.env = {**FAST_ENV, **(env or {})}
        self.procs: list[WorkerProc] = []

    def spawn(
        self,
        n: int = 1,
        *,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        preexec_fn: Callable[[], object] | None = None,
    ) -> list[WorkerProc]:
        """Start ``n`` workers (not yet ready: see :meth:`wait_ready`)."""
        out = []
        for _ in range(n):
            log_path = self.log_dir / f"worker-{len(self.procs)}.log"
            proc, port = spawn_worker(
                self.redis_url,
                self.namespace,
                log_path,
                env={**self.env, **(env or {})},
                args=args,
                preexec_fn=preexec_fn,
            )
            wp = WorkerProc(proc, log_path, port)
            self.procs.append(wp)
            out.append(wp)
        return out

    async def wait_ready(
        self, r: Redis, procs: Sequence[WorkerProc], timeout_s: float = 20.0
    ) -> None:
        """Wait until every worker of ``procs`` announced itself in ``tp:{NS}:workers``."""
        with anyio.fail_after(timeout_s):
            while True:
                members = await r.zrange(self.keys.workers, 0, -1)
                for wp in procs:
                    if not wp.alive():
                        raise AssertionError(
                            f"worker {wp.pid} exited with {wp.proc.returncode}:\n"
                            f"{wp.log_text()[-3000:]}"
                        )
                    if wp.worker_id is None:
                        wp.worker_id = next((m for m in members if f"-{wp.pid}-" in m), None)
                if all(wp.worker_id for wp in procs):
                    return
                await anyio.sleep(0.02)

    async def start(self, r: Redis, n: int = 1, **kw: object) -> list[WorkerProc]:
        procs = self.spawn(n, **kw)  # type: ignore[arg-type]
        await self.wait_ready(r, procs)
        return procs

    def close(self) -> None:
        """Kill every worker still running and show the end of each log."""
        for wp in self.procs:
            wp.kill()
        deadline = time.monotonic() + 10
        for wp in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                wp.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            tail = wp.log_text()[-2000:]
            print(f"--- worker pid {wp.pid} exit {wp.proc.returncode} ---\n{tail}")

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        if exc_type is None:
            leaked = [
                line for wp in self.procs for line in unmasked_userinfo(wp.log_text().splitlines())
            ]
            assert not leaked, f"worker logs show URL credentials: {leaked[:3]}"


_USERINFO = re.compile(r"://([^\s/?#@'\"\\]*)@")


def unmasked_userinfo(texts: Iterable[str]) -> list[str]:
    """The texts that show a URL's userinfo unmasked (anything but ``***``).

    Every worker log of the suite is checked with it when its pool closes
    (issue 13: no log line shows a password).
    """
    out = []
    for text in texts:
        for m in _USERINFO.finditer(text):
            userinfo = m.group(1)
            if userinfo != "***":
                out.append(text)
                break
    return out


# --- the producer's side ------------------------------------------------------------


async def send(r: Redis, stream: str, fields: Mapping[str, str]) -> str:
    """XADD a request as any producer would: a flat map of strings."""
    entry_id: str = await r.xadd(stream, dict(fields))  # type: ignore[arg-type]
    return entry_id


async def reply(r: Redis, request_id: str, timeout_s: float = 10.0) -> dict[str, str]:
    """The reply to ``request_id``, waiting for it with XREAD BLOCK like a client."""
    key = KEYS.reply(request_id)
    with anyio.fail_after(timeout_s):
        while True:
            got = await r.xread({key: "0-0"}, count=1, block=200)
            if got:
                fields: dict[str, str] = got[0][1][0][1]
                return fields


async def replies(
    r: Redis, request_ids: Sequence[str], timeout_s: float = 20.0
) -> dict[str, list[dict[str, str]]]:
    """Every entry of each reply stream, once all of them have at least one."""
    with anyio.fail_after(timeout_s):
        while True:
            async with r.pipeline(transaction=False) as pipe:
                for rid in request_ids:
                    pipe.xrange(KEYS.reply(rid))
                got = await pipe.execute()
            if all(got):
                return {
                    rid: [f for _, f in entries]
                    for rid, entries in zip(request_ids, got, strict=True)
                }
            await anyio.sleep(0.05)


async def pending_total(r: Redis, keys: Keys = KEYS) -> int:
    """Entries delivered to the group but not acknowledged, over every input stream."""
    total = 0
    for stream in keys.all_input_streams:
        try:
            total += int((await r.xpending(stream, "tierpool"))["pending"])
        except Exception:  # no stream or no group yet: nothing pending there
            continue
    return total


async def settled(r: Redis, keys: Keys = KEYS) -> bool:
    """Whether nothing is pending in the group (a predicate for ``wait_for``)."""
    return await pending_total(r, keys) == 0
