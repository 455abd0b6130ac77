"""Harness for gateway tests: real worker processes, real pods, the gateway over real HTTP.

:func:`running_gateway` serves the gateway in-process under uvicorn on a free
port (real sockets, real HTTP) next to worker subprocesses from
:class:`tests.procs.WorkerPool`; :func:`spawn_gateway` starts the real
``tierpool gateway`` command instead, for signals and the CLI.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import httpx
from redis.asyncio import Redis

from tests.procs import KEYS, NAMESPACE, reply, send
from tierpool.core.settings import Settings
from tierpool.gateway.server import GatewayServer
from tierpool.workers.redisproc import free_port


async def register(r: Redis, pod: str) -> dict[str, str]:
    """Register ``pod`` as a pod would (XADD on the pods stream), waiting for its reply."""
    rid = f"reg-{pod}"
    await send(
        r,
        KEYS.pods_stream,
        {"request_id": rid, "event": "register", "pod_id": pod, "endpoint": f"http://{pod}:8080"},
    )
    got = await reply(r, rid)
    await r.delete(KEYS.reply(rid))
    return got


def gateway_settings(redis_url: str, **overrides: Any) -> Settings:
    return dataclasses.replace(Settings(), redis_url=redis_url, namespace=NAMESPACE, **overrides)


@contextlib.asynccontextmanager
async def running_gateway(
    redis_url: str, **overrides: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, GatewayServer]]:
    """The gateway on a free port; yields an HTTP client on it and the server."""
    server = GatewayServer(gateway_settings(redis_url, **overrides), host="127.0.0.1", port=0)
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.run)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as http:
            try:
                yield http, server
            finally:
                server.stop()


class GatewayProc:
    """A ``tierpool gateway`` subprocess; its log goes to a file."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{port}"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    async def wait_listening(self, timeout_s: float = 20.0) -> None:
        with anyio.fail_after(timeout_s):
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"gateway exited {self.proc.returncode}:\n{self.log_text()}"
                    )
                try:
                    async with httpx.AsyncClient() as c:
                        if (await c.get(self.url + "/api/v1/health")).status_code == 200:
                            return
                except httpx.TransportError:
                    pass
                await anyio.sleep(0.05)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def spawn_gateway(
    redis_url: str, log_path: Path, env: Mapping[str, str] | None = None
) -> GatewayProc:
    """Start ``python -m tierpool gateway`` on a free ``HTTP_PORT``."""
    port = free_port()
    full = {
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("TIERPOOL_", "HTTP_", "GATEWAY_", "TWILIO_", "PLIVO_", "EXOTEL_"))
        },
        "REDIS_URL": redis_url,
        "TIERPOOL_NAMESPACE": NAMESPACE,
        "HTTP_PORT": str(port),
        "LOG_FORMAT": "console",
        "LOG_LEVEL": "info",
        **(env or {}),
    }
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tierpool", "gateway"],
        env=full,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    return GatewayProc(proc, port, log_path)
