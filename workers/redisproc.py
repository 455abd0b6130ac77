"""Start and stop a private ``redis-server`` on a free loopback port.

Used by the test harness, the benchmark and ``tierpool run`` (the embedded
default). The server never persists anything and never uses port 6379, so it
cannot collide with, or overwrite, a Redis somebody else runs.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tierpool.core.errors import TierpoolError


class RedisNotInstalled(TierpoolError):
    """Raised when no ``redis-server`` binary is on PATH."""

    def __init__(self) -> None:
        super().__init__(
            "redis-server not found on PATH: run ./scripts/install-redis "
            "(Debian package redis-server) or set REDIS_URL to a running server"
        )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (never 6379)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port != 6379:
            return port


def free_port_range(n: int) -> int:
    """A port such that it and the ``n - 1`` after it are free (never 6379).

    For commands that give ``n`` children consecutive ports from one base, as
    ``TIERPOOL_NAMESPACE=a,b,c tierpool worker`` does with ``METRICS_PORT``.
    """
    for _ in range(100):
        base = free_port()
        if base + n > 65_535 or base <= 6379 < base + n:
            continue
        try:
            for port in range(base + 1, base + n):
                with socket.socket() as s:
                    s.bind(("0.0.0.0", port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {n} consecutive free ports found")


class RedisProcess:
    """One private redis-server process. ``restart()`` keeps the port, loses the data."""

    def __init__(
        self,
        port: int | None = None,
        *,
        extra_args: tuple[str, ...] = (),
        new_session: bool = False,
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisNotInstalled()
        self.binary = binary
        self.port = port or free_port()
        self.extra_args = extra_args
        self.new_session = new_session
        """Run in a session of its own, out of reach of the terminal's Ctrl-C (``tierpool
        run`` stops it last, after the children that still need it)."""
        self._dir = tempfile.TemporaryDirectory(prefix="tierpool-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the server and return once it answers PING."""
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self._dir.name,
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            "--logfile",
            str(Path(self._dir.name) / "redis.log"),
            *self.extra_args,
        ]
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=self.new_session,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise TierpoolError(f"redis-server exited at start: {err.strip()}")
            if self._answers():
                return
            time.sleep(0.02)
        self.stop()
        raise TierpoolError(f"redis-server on port {self.port} did not answer in {timeout_s}s")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                # -NOAUTH: a server started with --requirepass answers too
                return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server (SIGKILL when ``kill``); safe to call twice."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        if kill:
            proc.kill()
        else:
            proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()

    def restart(self, *, kill: bool = True) -> None:
        """Stop and start on the same port: as after a crash without persistence."""
        self.stop(kill=kill)
        self.start()

    def close(self) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            self._dir.cleanup()

    def __enter__(self) -> RedisProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
