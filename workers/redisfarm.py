"""Replicated Redis set-ups from local ``redis-server`` processes: Sentinel and Cluster.

The tests of failover and ``tierpool bench --cluster`` need more than one
private server (:mod:`tierpool.workers.redisproc`): a primary with a replica
watched by three Sentinels, or a cluster of masters (with replicas). Every
process listens on a free loopback port, persists nothing and is killed on
``close()``, so nothing here can touch a Redis somebody else runs.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tierpool.core.errors import TierpoolError
from tierpool.workers.redisproc import RedisProcess, free_port

MASTER_NAME = "mymaster"


def command(port: int, *args: str, timeout_s: float = 2.0) -> str:
    """One command to ``127.0.0.1:port`` in RESP, its reply as text (errors included).

    Dependency-free on purpose: the set-up must not rely on the client under test.
    """
    payload = f"*{len(args)}\r\n".encode() + b"".join(
        f"${len(a.encode())}\r\n".encode() + a.encode() + b"\r\n" for a in args
    )
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        s.sendall(payload)
        return _read_reply(s.makefile("rb"))


def _read_reply(f: object) -> str:
    read = f.readline  # type: ignore[attr-defined]
    line: bytes = read()
    if not line:
        raise OSError("connection closed")
    kind, rest = line[:1], line[1:].rstrip(b"\r\n")
    if kind in (b"+", b"-", b":"):
        return rest.decode(errors="replace")
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return ""
        data: bytes = f.read(n + 2)  # type: ignore[attr-defined]
        return data[:-2].decode(errors="replace")
    if kind == b"*":
        n = int(rest)
        return "\n".join(_read_reply(f) for _ in range(max(n, 0)))
    raise OSError(f"unexpected reply {line!r}")


def info_field(port: int, section: str, name: str) -> str | None:
    """One ``name:value`` of ``INFO section`` (None when absent or unreachable)."""
    try:
        text = command(port, "INFO", section)
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    return None


def wait_until(what: str, predicate: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TierpoolError(f"{what}: not within {timeout_s}s")


class SentinelProcess:
    """One ``redis-server --sentinel`` watching ``MASTER_NAME``."""

    def __init__(self, master_port: int, *, down_after_ms: int, failover_timeout_ms: int) -> None:
        self.port = free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="tierpool-sentinel-")
        self.conf = Path(self._dir.name) / "sentinel.conf"
        self.conf.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            "daemonize no\n"
            f"dir {self._dir.name}\n"
            f"logfile {Path(self._dir.name) / 'sentinel.log'}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {down_after_ms}\n"
            f"sentinel failover-timeout {MASTER_NAME} {failover_timeout_ms}\n"
            f"sentinel parallel-syncs {MASTER_NAME} 1\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", str(self.conf), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(f"sentinel on {self.port}", self._answers, 10)

    def _answers(self) -> bool:
        try:
            return command(self.port, "PING") == "PONG"
        except OSError:
            return False

    def master(self) -> tuple[str, int] | None:
        """The master's address as this Sentinel sees it now."""
        try:
            text = command(self.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
        except OSError:
            return None
        parts = text.split("\n")
        return (parts[0], int(parts[1])) if len(parts) == 2 and parts[1] else None

    def knows(self, *, replicas: int, sentinels: int) -> bool:
        try:
            text = command(self.port, "SENTINEL", "MASTER", MASTER_NAME)
        except OSError:
            return False
        it = iter(text.split("\n"))
        state = dict(zip(it, it, strict=False))
        return (
            int(state.get("num-slaves", "0")) >= replicas
            and int(state.get("num-other-sentinels", "0")) >= sentinels
        )

    def log_text(self) -> str:
        with contextlib.suppress(OSError):
            return (Path(self._dir.name) / "sentinel.log").read_text(errors="replace")
        return ""

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        with contextlib.suppress(OSError):
            self._dir.cleanup()


class SentinelSetup:
    """A primary, its replica and three Sentinels (quorum 2), all local.

    ``down_after_ms`` is how long the Sentinels wait before calling the
    primary down; with the defaults a killed primary is replaced in a few
    seconds. ``sentinels`` is what ``REDIS_SENTINELS`` takes.
    """

    def __init__(
        self, *, down_after_ms: int = 1_000, failover_timeout_ms: int = 5_000, count: int = 3
    ) -> None:
        self.primary = RedisProcess()
        self.replica = RedisProcess(extra_args=("--replicaof", "127.0.0.1", str(self.primary.port)))
        self.nodes = [self.primary, self.replica]
        self.watchers = [
            SentinelProcess(
                self.primary.port,
                down_after_ms=down_after_ms,
                failover_timeout_ms=failover_timeout_ms,
            )
            for _ in range(count)
        ]

    @property
    def sentinels(self) -> str:
        return ",".join(f"127.0.0.1:{s.port}" for s in self.watchers)

    @property
    def url(self) -> str:
        """A URL for the credentials and database; Sentinels name the host."""
        return "redis://127.0.0.1/0"

    def start(self, timeout_s: float = 30.0) -> None:
        try:
            self.primary.start()
            self.replica.start()
            wait_until(
                "replica in sync",
                lambda: info_field(self.replica.port, "replication", "master_link_status") == "up",
                timeout_s,
            )
            for s in self.watchers:
                s.start()
            others = len(self.watchers) - 1
            wait_until(
                "sentinels know the replica and each other",
                lambda: all(s.knows(replicas=1, sentinels=others) for s in self.watchers),
                timeout_s,
            )
        except BaseException:
            self.close()
            raise

    def master_port(self) -> int | None:
        """The master's port as the Sentinels agree on it (None while they disagree)."""
        seen = {s.master() for s in self.watchers}
        if len(seen) != 1:
            return None
        (addr,) = seen
        return addr[1] if addr else None

    def node(self, port: int) -> RedisProcess:
        return next(n for n in self.nodes if n.port == port)

    def close(self) -> None:
        for s in self.watchers:
            s.close()
        for n in self.nodes:
            n.close()

    def __enter__(self) -> SentinelSetup:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cluster_state(port: int) -> str | None:
    try:
        text = command(port, "CLUSTER", "INFO")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "cluster_state":
            return value.strip()
    return None


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    for _ in range(1000):
        port = free_port()
        if port + 10_000 > 65_535:
            continue
        with contextlib.suppress(OSError), socket.socket() as s:
            s.bind(("127.0.0.1", port + 10_000))
            return port
    raise TierpoolError("no free port pair for a cluster node")


class ClusterSetup:
    """A Redis Cluster of ``masters`` masters, each with ``replicas`` replicas, all local.

    Made with ``redis-cli --cluster create`` (slots split evenly, in order of
    the masters' ports). ``node_timeout_ms`` is ``cluster-node-timeout``: how
    long before a silent master is failed over to its replica.
    """

    def __init__(
        self, masters: int = 3, replicas: int = 0, *, node_timeout_ms: int = 1_000
    ) -> None:
        self.masters = masters
        self.replicas = replicas
        self.nodes = [
            RedisProcess(
                cluster_port(),
                extra_args=(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    str(node_timeout_ms),
                    "--cluster-require-full-coverage",
                    "no",
                ),
            )
            for _ in range(masters * (1 + replicas))
        ]

    @property
    def url(self) -> str:
        """The first node's URL: any node will do, the client asks it for the rest."""
        return self.nodes[0].url

    def start(self, timeout_s: float = 60.0) -> None:
        try:
            for n in self.nodes:
                n.start()
            args = ["redis-cli", "--cluster", "create"]
            args += [f"127.0.0.1:{n.port}" for n in self.nodes]
            args += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
            done = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s)
            if done.returncode != 0:
                raise TierpoolError(f"redis-cli --cluster create failed: {done.stdout[-2000:]}")
            self.wait_ok(timeout_s)
        except BaseException:
            self.close()
            raise

    def alive(self) -> list[RedisProcess]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def wait_ok(self, timeout_s: float = 60.0) -> None:
        """Until every live node says ``cluster_state:ok`` and agrees on the masters."""

        def ok() -> bool:
            alive = self.alive()
            if any(_cluster_state(n.port) != "ok" for n in alive):
                return False
            views = {tuple(sorted(self.slot_masters(n.port).items())) for n in alive}
            if len(views) != 1:
                return False
            masters = set(dict(next(iter(views))).values())
            return all(
                n.port in masters or info_field(n.port, "replication", "master_link_status") == "up"
                for n in alive
            )

        wait_until("cluster ok", ok, timeout_s)

    def slot_masters(self, port: int | None = None) -> dict[tuple[int, int], int]:
        """(first slot, last slot) -> port of the master serving them, as one node sees it."""
        import redis as syncredis

        try:
            with syncredis.Redis(port=port or self.alive()[0].port, socket_timeout=2) as r:
                ranges = r.execute_command("CLUSTER", "SLOTS")
        except (syncredis.RedisError, OSError):
            return {}
        return {(int(e[0]), int(e[1])): int(e[2][1]) for e in ranges}

    def master_of(self, slot: int) -> int:
        for (start, end), port in self.slot_masters().items():
            if start <= slot <= end:
                return port
        raise TierpoolError(f"no master serves slot {slot}")

    def node(self, port: int) -> RedisProcess:
        return next(n for n in self.nodes if n.port == port)

    def migrate_slot(self, slot: int, dest_port: int, *, batch: int = 10) -> int:
        """Move ``slot`` to the master on ``dest_port`` as ``redis-cli --cluster reshard``
        does (IMPORTING/MIGRATING, MIGRATE keys a few at a time, SETSLOT NODE); keys moved."""
        import redis as syncredis

        src_port = self.master_of(slot)
        with (
            syncredis.Redis(port=src_port, decode_responses=True) as src,
            syncredis.Redis(port=dest_port, decode_responses=True) as dst,
        ):
            src_id, dst_id = (
                src.execute_command("CLUSTER MYID"),
                dst.execute_command("CLUSTER MYID"),
            )
            dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
            src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
            moved = 0
            while True:
                keys = src.execute_command("CLUSTER GETKEYSINSLOT", slot, batch)
                if not keys:
                    break
                src.execute_command(
                    "MIGRATE", "127.0.0.1", dest_port, "", 0, 5000, "REPLACE", "KEYS", *keys
                )
                moved += len(keys)
            dst.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
            src.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
            for port in set(self.slot_masters().values()) - {src_port, dest_port}:
                with syncredis.Redis(port=port) as r:
                    r.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
        return moved

    def spread_namespaces(self, count: int, prefix: str = "ns") -> list[str]:
        """``count`` namespace names (``ns0``...) whose slots ``count`` different masters serve."""
        from tierpool.connect.clusterslot import namespace_slot

        masters = self.slot_masters()

        def master_of(slot: int) -> int:
            return next(port for (a, b), port in masters.items() if a <= slot <= b)

        chosen: dict[int, str] = {}
        for i in range(10_000):
            name = f"{prefix}{i}"
            chosen.setdefault(master_of(namespace_slot(name)), name)
            if len(chosen) == count:
                return list(chosen.values())
        raise TierpoolError(f"fewer than {count} masters serve slots")

    def close(self) -> None:
        for n in self.nodes:
            n.close()

    def __enter__(self) -> ClusterSetup:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
