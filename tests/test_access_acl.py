"""Access roles (contract v1.1): each Redis ACL user can do its job and nothing else.

A private redis-server per test gets the users ``tierpool acl`` prints, with
test passwords. A real worker process runs as ``tierpool-worker``; pod agents
as ``tierpool-pod``; ``TierpoolClient`` as ``tierpool-producer``; the CLI and
the HTTP gateway as ``tierpool-operator``. ``ACL LOG`` stays empty through all of it, and every
forbidden write answers NOPERM (and is logged). Password authentication
(``requirepass``) is tested on its own.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import msgspec
import pytest
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from tests.conftest import wait_for
from tests.gatewayproc import running_gateway
from tests.procs import WorkerPool
from tests.test_access_secrets import leaks
from tierpool.client.client import TierpoolClient
from tierpool.client.podagent import PodAgent
from tierpool.connect.redisconn import connect
from tierpool.core.keys import Keys
from tierpool.workers.ops.acl import ROLES, acl_lines
from tierpool.workers.redisproc import RedisProcess

pytestmark = pytest.mark.anyio

NS = "t"
KEYS = Keys(NS)
OTHER = Keys("other")
ROOT = Path(__file__).resolve().parent.parent


def password(role: str) -> str:
    return f"pw-{role}-5e1f"


@pytest.fixture
def acl_server() -> Iterator[RedisProcess]:
    """A redis-server of this test's own: the ACL users must not leak into other tests."""
    server = RedisProcess()
    server.start()
    try:
        yield server
    finally:
        server.close()


def url_of(server: RedisProcess, role: str) -> str:
    return f"redis://{role}:{password(role)}@127.0.0.1:{server.port}/0"


def tierpool_cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("TIERPOOL_")}
    full.pop("REDIS_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "tierpool", *argv],
        env={**full, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


@pytest.fixture
async def admin(acl_server: RedisProcess) -> AsyncIterator[Redis]:
    """The default user, with the four roles created from ``tierpool acl``'s own output."""
    out = await anyio.to_thread.run_sync(lambda: tierpool_cli("acl", "--namespace", NS))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [shlex.split(line)[2] for line in lines] == list(ROLES)
    assert not any(">" in word or "nopass" in word for line in lines for word in line.split())
    client = connect(acl_server.url)
    try:
        for line in lines:
            await client.execute_command(*shlex.split(line))
            role = shlex.split(line)[2]
            await client.execute_command("ACL", "SETUSER", role, f">{password(role)}")
        await client.execute_command("ACL", "LOG", "RESET")
        yield client
    finally:
        await client.aclose()


async def acl_log(admin: Redis) -> list[dict[str, object]]:
    entries = await admin.execute_command("ACL", "LOG")
    out = []
    for e in entries:
        out.append(dict(zip(e[::2], e[1::2], strict=True)) if isinstance(e, list) else dict(e))
    return out


def test_acl_prints_one_setuser_per_role_without_passwords() -> None:
    lines = acl_lines(["eu", "us"])
    assert len(lines) == 4
    for role, line in zip(ROLES, lines, strict=True):
        words = shlex.split(line)
        assert words[:3] == ["ACL", "SETUSER", role]
        assert "reset" not in words and "nopass" not in words
        assert not any(w.startswith(">") or w.startswith("#") for w in words)
        assert "tp:{eu}:" in line and "tp:{us}:" in line
    producer = shlex.split(lines[1])
    assert "(+xread +del ~tp:{eu}:reply:* ~tp:{us}:reply:*)" in producer


def test_acl_namespaces_from_the_environment_and_bad_ones_refused() -> None:
    done = tierpool_cli("acl", env={"TIERPOOL_NAMESPACE": "eu,us"})
    assert done.returncode == 0, done.stderr
    assert all("tp:{eu}:" in line and "tp:{us}:" in line for line in done.stdout.splitlines())
    assert "password" in done.stderr  # the hint goes to stderr, stdout stays pipeable
    bad = tierpool_cli("acl", "--namespace", "eu,{x}")
    assert bad.returncode == 2 and bad.stdout == ""
    assert "{x}" in bad.stderr


async def test_each_role_does_its_job_and_acl_log_stays_empty(
    acl_server: RedisProcess, admin: Redis, tmp_path: Path
) -> None:
    """Worker, pods, producer and operator run their real code under their own users."""
    with WorkerPool(url_of(acl_server, "tierpool-worker"), tmp_path, namespace=NS) as pool:
        (worker,) = await pool.start(admin, 1)
        pod_client = TierpoolClient.from_url(url_of(acl_server, "tierpool-pod"), namespace=NS)
        producer = TierpoolClient.from_url(url_of(acl_server, "tierpool-producer"), namespace=NS)
        async with pod_client, producer, anyio.create_task_group() as tg:
            agents = [
                PodAgent(pod_client, f"pod-{i}", f"wss://10.0.0.{i}:8080", heartbeat_s=0.5)
                for i in range(3)
            ]
            for agent in agents:
                await tg.start(agent.run)

            async def allocated() -> bool:
                reply = await producer.allocate("call-1", timeout_s=5)
                return reply.status == "allocated"

            await wait_for(allocated, timeout_s=20, interval_s=0.2)
            holder = next(a for a in agents if a.pool is not None)
            assert (await producer.release("call-1")).status == "released"

            operator = {"REDIS_URL": url_of(acl_server, "tierpool-operator")}
            config = tmp_path / "tiers.json"
            config.write_text('{"gold": {"type": "exclusive", "target": 2}}')
            for argv in (
                ("status", "-n", NS),
                ("pods", "-n", NS),
                ("config", "get", "-n", NS),
                ("config", "set", str(config), "-n", NS),
                ("merchant", "get", "-n", NS),
                ("drain", holder.pod_id, "-n", NS),
                ("undrain", holder.pod_id, "-n", NS),
                ("allocate", "call-2", "-n", NS),
                ("release", "call-2", "-n", NS),
                ("events", "-n", NS),
                ("dead", "-n", NS),
            ):
                done = await anyio.to_thread.run_sync(lambda a=argv: tierpool_cli(*a, env=operator))
                assert done.returncode == 0, (argv, done.stdout, done.stderr)
                assert leaks([done.stdout, done.stderr], password("tierpool-operator")) == []

            # The gateway drains pods and reads pool state: it runs as the operator.
            async with running_gateway(url_of(acl_server, "tierpool-operator")) as (http, _):
                resp = await http.post("/api/v1/allocate", json={"call_sid": "gw-1"})
                assert resp.status_code == 200, resp.text
                pod = msgspec.json.decode(resp.content)["pod_name"]
                assert (await http.get(f"/api/v1/pod/{pod}")).status_code == 200
                assert (await http.get("/api/v1/status")).status_code == 200
                resp = await http.post("/api/v1/release", json={"call_sid": "gw-1"})
                assert resp.status_code == 200, resp.text

            for agent in agents:
                await agent.shutdown(grace_s=2)
            tg.cancel_scope.cancel()
        assert worker.alive()
        log = worker.log_text()
    assert await acl_log(admin) == []
    assert "NOPERM" not in log and "Traceback" not in log
    assert leaks(log.splitlines(), password("tierpool-worker")) == []


async def test_each_role_is_refused_everything_else(acl_server: RedisProcess, admin: Redis) -> None:
    """NOPERM for every write outside a role; the refusals are in ACL LOG."""
    forbidden: dict[str, list[tuple[str, ...]]] = {
        "tierpool-producer": [
            ("XADD", KEYS.reply("r-1"), "*", "status", "allocated", "pod_id", "evil"),
            ("SET", KEYS.config, "{}"),
            ("DEL", KEYS.config),
            ("XADD", KEYS.request_stream("config"), "*", "request_id", "c", "config", "{}"),
            ("XADD", KEYS.request_stream("drain"), "*", "request_id", "d", "pod_id", "p"),
            ("XADD", KEYS.pods_stream, "*", "event", "deregister", "pod_id", "p"),
            ("XADD", KEYS.events, "*", "event", "x"),
            ("HSET", KEYS.pod_pool, "p", "gold"),
            ("DEL", KEYS.request_stream("allocate")),
            ("XRANGE", KEYS.request_stream("allocate"), "-", "+"),
            ("XADD", OTHER.request_stream("allocate"), "*", "request_id", "x"),
            ("XREAD", "STREAMS", OTHER.reply("r-1"), "0"),
            ("EVAL", "return 1", "0"),
            ("PUBLISH", KEYS.config_changed, "9"),
            ("KEYS", "*"),
            ("FLUSHALL",),
        ],
        "tierpool-pod": [
            ("XADD", KEYS.reply("r-1"), "*", "status", "registered"),
            ("XADD", KEYS.request_stream("allocate"), "*", "request_id", "a"),
            ("XADD", KEYS.request_stream("config"), "*", "request_id", "c", "config", "{}"),
            ("HSET", KEYS.pod_pool, "p", "gold"),
            ("SET", KEYS.config, "{}"),
            ("XRANGE", KEYS.pods_stream, "-", "+"),
        ],
        "tierpool-operator": [
            ("XADD", KEYS.reply("r-1"), "*", "status", "applied"),
            ("SET", KEYS.config, "{}"),
            ("HSET", KEYS.pod_pool, "p", "gold"),
            ("XADD", KEYS.events, "*", "event", "x"),
            ("XADD", KEYS.dead, "*", "error", "x"),
            ("XADD", KEYS.pods_stream, "*", "event", "deregister", "pod_id", "p"),
            ("XDEL", KEYS.request_stream("allocate"), "0-1"),
            ("GET", OTHER.config),
            ("SCAN", "0"),
            ("FLUSHALL",),
        ],
        "tierpool-worker": [
            ("GET", OTHER.config),
            ("XADD", OTHER.request_stream("allocate"), "*", "request_id", "x"),
            ("PUBLISH", OTHER.config_changed, "1"),
            ("FLUSHALL",),
            ("KEYS", "*"),
            ("CONFIG", "SET", "maxmemory", "1"),
            ("ACL", "SETUSER", "tierpool-producer", "+@all"),
        ],
    }
    refused = 0
    for role, commands in forbidden.items():
        client = connect(url_of(acl_server, role))
        try:
            for command in commands:
                with pytest.raises(NoPermissionError):
                    await client.execute_command(*command)
                refused += 1
        finally:
            await client.aclose()
    # Nothing was written, and the server logged each refusal for the operator to see.
    assert await admin.exists(KEYS.config, KEYS.reply("r-1"), KEYS.events, KEYS.pod_pool) == 0
    assert len(await admin.execute_command("ACL", "LOG", "200")) > 0
    assert refused == sum(len(c) for c in forbidden.values())


async def test_producer_reads_and_deletes_its_reply(acl_server: RedisProcess, admin: Redis) -> None:
    """The producer's selector: XREAD and DEL on reply keys, and only those commands there."""
    await admin.xadd(KEYS.reply("r-9"), {"request_id": "r-9", "status": "released"})
    client = connect(url_of(acl_server, "tierpool-producer"))
    try:
        got = await client.xread({KEYS.reply("r-9"): "0-0"}, count=1)
        assert got
        assert await client.delete(KEYS.reply("r-9")) == 1
        with pytest.raises(NoPermissionError):
            await client.expire(KEYS.reply("r-9"), 10)
    finally:
        await client.aclose()


# --- passwords --------------------------------------------------------------------------


async def test_requirepass_password_in_redis_url(tmp_path: Path) -> None:
    """A ``requirepass`` server: workers and clients authenticate from ``REDIS_URL``;
    without the password a client is refused; the password is in no log line."""
    secret = "rq-pass-91c3"
    server = RedisProcess(extra_args=("--requirepass", secret))
    await anyio.to_thread.run_sync(server.start)
    try:
        url = f"redis://:{secret}@127.0.0.1:{server.port}/0"
        admin = connect(url)
        try:
            with WorkerPool(url, tmp_path, namespace=NS) as pool:
                (worker,) = await pool.start(admin, 1)
                async with TierpoolClient.from_url(url, namespace=NS) as client:
                    agent = PodAgent(client, "pod-1", "wss://10.0.0.1:8080", heartbeat_s=0.5)
                    async with anyio.create_task_group() as tg:
                        await tg.start(agent.run)

                        async def allocated() -> bool:
                            reply = await client.allocate("call-1", timeout_s=5)
                            return reply.status == "allocated"

                        await wait_for(allocated, timeout_s=20, interval_s=0.2)
                        await agent.shutdown(grace_s=1)
                        tg.cancel_scope.cancel()
                assert leaks(worker.log_text().splitlines(), secret) == []
            anonymous = connect(f"redis://127.0.0.1:{server.port}/0")
            try:
                with pytest.raises((AuthenticationError, ResponseError)):
                    await anonymous.get(KEYS.config)
            finally:
                await anonymous.aclose()
            wrong = connect(f"redis://:not-it@127.0.0.1:{server.port}/0")
            try:
                with pytest.raises(AuthenticationError):
                    await wrong.ping()
            finally:
                await wrong.aclose()
            out = await anyio.to_thread.run_sync(
                lambda: tierpool_cli(
                    "status",
                    "-n",
                    NS,
                    env={"REDIS_URL": f"redis://:{secret}x@127.0.0.1:{server.port}/0"},
                )
            )
            assert out.returncode != 0
            assert leaks([out.stdout, out.stderr], secret) == []
        finally:
            await admin.aclose()
    finally:
        server.close()


async def test_the_worker_role_may_read_the_replication_id(
    acl_server: RedisProcess, admin: Redis
) -> None:
    """``INFO`` is flagged dangerous; a worker needs it to notice a failover
    to a replica that lost writes (core/epoch.py), so its role grants it."""
    from tierpool.core.epoch import server_replid

    client = connect(url_of(acl_server, "tierpool-worker"))
    try:
        assert await server_replid(client) == (await admin.info("replication"))["master_replid"]
    finally:
        await client.aclose()
