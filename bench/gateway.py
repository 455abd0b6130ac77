"""The gateway measure: HTTP allocations/s, and the latency the gateway adds.

A ``tierpool gateway`` process is started next to the workers; load is sent
as a service would, ``POST /api/v1/allocate`` then ``POST /api/v1/release``
of the same call, over kept-alive HTTP/1.1 connections. The HTTP client is a
few lines over raw sockets, so the figure is the gateway's cost, not a
client library's. Two figures:

- **throughput**: closed loop, ``concurrency`` connections each sending its
  next allocation as soon as its release was answered;
- **added latency**: the open loop of :mod:`bench.e2e` at one rate, once
  straight through the streams (``TierpoolClient``) and once through the
  gateway; the difference of their allocate p50 and p99 is what the HTTP
  hop costs. Latencies run from the scheduled send time, as in ``e2e``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import anyio
from anyio.abc import SocketStream, TaskGroup

from tierpool.bench.e2e import WARMUP_S, LoadResult, at_fixed_rate
from tierpool.workers.redisproc import free_port

REQUEST_TIMEOUT_S = 10.0


class HttpConn:
    """One kept-alive HTTP/1.1 connection: POST a JSON body, read the status and body."""

    def __init__(self, stream: SocketStream, host: str) -> None:
        self.stream = stream
        self.host = host
        self.buf = b""

    @classmethod
    async def open(cls, host: str, port: int) -> HttpConn:
        return cls(await anyio.connect_tcp(host, port), f"{host}:{port}")

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        await self.stream.send(head + body)
        while b"\r\n\r\n" not in self.buf:
            self.buf += await self.stream.receive()
        header, _, rest = self.buf.partition(b"\r\n\r\n")
        lines = header.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(rest) < length:
            rest += await self.stream.receive()
        self.buf = rest[length:]
        return status, rest[:length]

    async def aclose(self) -> None:
        await self.stream.aclose()


class ConnPool:
    """Idle connections reused first; a new one opened when none is idle."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.idle: list[HttpConn] = []
        self.opened = 0

    async def get(self) -> HttpConn:
        if self.idle:
            return self.idle.pop()
        self.opened += 1
        return await HttpConn.open(self.host, self.port)

    def put(self, conn: HttpConn) -> None:
        self.idle.append(conn)

    async def aclose(self) -> None:
        for conn in self.idle:
            await conn.aclose()
        self.idle.clear()


async def _pair(
    pool: ConnPool, call_id: str, res: LoadResult, t_sched: float, record: bool
) -> None:
    """One allocate and its release over HTTP; latencies from ``t_sched`` (perf_counter)."""
    try:
        conn = await pool.get()
    except OSError:
        res.errors += 1
        return
    try:
        with anyio.fail_after(REQUEST_TIMEOUT_S):
            status, _ = await conn.post("/api/v1/allocate", b'{"call_sid":"%s"}' % call_id.encode())
            t_alloc = time.perf_counter()
            if status != 200:
                if status == 503:
                    res.rejected += 1
                else:
                    res.errors += 1
                pool.put(conn)
                return
            t_rel0 = time.perf_counter()
            status, _ = await conn.post("/api/v1/release", b'{"call_sid":"%s"}' % call_id.encode())
            t_rel = time.perf_counter()
    except (OSError, TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError, ValueError):
        res.errors += 1
        await conn.aclose()
        return
    pool.put(conn)
    if status != 200:
        res.errors += 1
        return
    res.all_pairs += 1
    if record:
        res.pairs += 1
        res.alloc_latency_s.append(t_alloc - t_sched)
        res.release_latency_s.append(t_rel - t_rel0)


async def closed_loop(port: int, *, concurrency: int, duration_s: float, tag: str) -> LoadResult:
    res = LoadResult()
    pool = ConnPool("127.0.0.1", port)
    cpu0 = time.process_time()
    start = time.perf_counter() + WARMUP_S
    end = start + duration_s

    async def loop(k: int) -> None:
        n = 0
        while (now := time.perf_counter()) < end:
            await _pair(pool, f"{tag}-{k}-{n}", res, now, now >= start)
            n += 1

    async with anyio.create_task_group() as tg:
        for k in range(concurrency):
            tg.start_soon(loop, k)
    await pool.aclose()
    res.elapsed_s = duration_s
    res.cpu_s = time.process_time() - cpu0
    return res


async def open_loop(port: int, *, rate: float, duration_s: float, tag: str) -> LoadResult:
    res = LoadResult()
    pool = ConnPool("127.0.0.1", port)
    for i in range(20):  # open connections and warm up before the clock starts
        await _pair(pool, f"{tag}-w{i}", res, time.perf_counter(), False)
    cpu0 = time.process_time()

    def launch(tg: TaskGroup, i: int, t_sched: float) -> None:
        tg.start_soon(_pair, pool, f"{tag}-{i}", res, t_sched, True)

    await at_fixed_rate(rate, duration_s, res, launch)
    res.cpu_s = time.process_time() - cpu0
    await pool.aclose()
    return res


@dataclass
class GatewayProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def start_gateway(
    url: str, namespace: str, log_dir: Path, env: Mapping[str, str]
) -> GatewayProcess:
    """``tierpool gateway`` on a free port, once it answers ``/api/v1/health``."""
    port = free_port()
    log_path = log_dir / "gateway.log"
    full = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("TIERPOOL_", "HTTP_"))},
        **env,
        "REDIS_URL": url,
        "TIERPOOL_NAMESPACE": namespace,
        "HTTP_PORT": str(port),
        # One access-log line per request is the anchor's habit and a real cost;
        # measured without it, what the README says.
        "LOG_LEVEL": "warning",
    }
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tierpool", "gateway"],
            env=full,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    gw = GatewayProcess(proc, port, log_path)

    async def wait() -> None:
        with anyio.fail_after(30):
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"gateway exited {proc.returncode}:\n{gw.log_tail()}")
                try:
                    conn = await HttpConn.open("127.0.0.1", port)
                except OSError:
                    await anyio.sleep(0.05)
                    continue
                await conn.aclose()
                return

    anyio.run(wait)
    return gw
