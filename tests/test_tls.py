"""TLS: every component reaches a real TLS-only Redis through ``rediss://`` with CA options.

The test makes its own CA, a server certificate for ``127.0.0.1`` and a
client certificate (``cryptography``), and starts ``redis-server`` with
``--tls-port``, a password and ``--tls-auth-clients yes``: a component that
does not verify the server, or does not present its certificate, or does
not send the password, gets nowhere. Then a worker process, the client, a
pod agent and the CLI all work through one ``REDIS_URL``; the plain port is
only the harness's own readiness probe.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import anyio
import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.procs import KEYS, NAMESPACE, WorkerPool
from tierpool.client.client import TierpoolClient
from tierpool.client.podagent import PodAgent
from tierpool.connect.redisconn import connect
from tierpool.workers.redisproc import RedisProcess, free_port

pytestmark = [pytest.mark.anyio]

PASSWORD = "tls-test-secret"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(folder: Path) -> Pki:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    ca_key = _key()
    ca = _cert("tierpool test CA", ca_key, None, ca_key, ca=True)
    server_key, client_key = _key(), _key()
    server = _cert("127.0.0.1", server_key, ca.subject, ca_key, server=True)
    client = _cert("tierpool-worker", client_key, ca.subject, ca_key)
    pki = Pki(
        folder / "ca.pem",
        folder / "server.pem",
        folder / "server.key",
        folder / "client.pem",
        folder / "client.key",
    )
    for cert, path in ((ca, pki.ca), (server, pki.server_cert), (client, pki.client_cert)):
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(server_key, pki.server_key)
    _write_key(client_key, pki.client_key)
    return pki


@dataclass(frozen=True)
class TlsRedis:
    pki: Pki
    tls_port: int

    def url(self, *, ca: bool = True, client_cert: bool = True, password: bool = True) -> str:
        query = []
        if ca:
            query.append(f"ssl_ca_certs={quote(str(self.pki.ca))}")
        if client_cert:
            query.append(f"ssl_certfile={quote(str(self.pki.client_cert))}")
            query.append(f"ssl_keyfile={quote(str(self.pki.client_key))}")
        auth = f":{PASSWORD}@" if password else ""
        return f"rediss://{auth}127.0.0.1:{self.tls_port}/0" + ("?" + "&".join(query))


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    tls_port = free_port()
    server = RedisProcess(
        extra_args=(
            "--tls-port",
            str(tls_port),
            "--tls-cert-file",
            str(pki.server_cert),
            "--tls-key-file",
            str(pki.server_key),
            "--tls-ca-cert-file",
            str(pki.ca),
            "--tls-auth-clients",
            "yes",
            "--requirepass",
            PASSWORD,
        )
    )
    # the harness's readiness probe (plain PING) is answered NOAUTH, which it does
    # not take for PONG: probe the TLS port with the client instead.
    server._answers = lambda: _tls_answers(pki, tls_port)  # type: ignore[method-assign]
    server.start()
    try:
        yield TlsRedis(pki, tls_port)
    finally:
        server.close()


def _tls_answers(pki: Pki, port: int) -> bool:
    import redis as syncredis

    try:
        with syncredis.Redis.from_url(
            TlsRedis(pki, port).url(), socket_connect_timeout=0.5, socket_timeout=0.5
        ) as r:
            return bool(r.ping())
    except (syncredis.ConnectionError, OSError):
        return False


async def test_a_client_that_does_not_verify_or_authenticate_gets_nowhere(
    tls_redis: TlsRedis,
) -> None:
    """The server really demands TLS, a trusted certificate both ways and the password."""
    for url, expect in (
        (tls_redis.url().replace("rediss://", "redis://"), "Connection|closed|reset"),
        (tls_redis.url(ca=False), "certificate verify failed"),
        (tls_redis.url(client_cert=False), "."),
        (tls_redis.url(password=False), "NOAUTH|Authentication|authenticated"),
    ):
        r = connect(url, retries=0)
        try:
            with pytest.raises(Exception, match=expect):
                with anyio.fail_after(5):
                    await r.ping()
        finally:
            await r.aclose()
    r = connect(tls_redis.url())
    try:
        assert await r.ping()
    finally:
        await r.aclose()


async def test_worker_client_agent_and_cli_over_tls(tls_redis: TlsRedis, tmp_path: Path) -> None:
    url = tls_redis.url()
    r = connect(url)
    await r.flushall()
    env = {
        "TIER_CONFIG": msgspec.json.encode({"gold": {"type": "exclusive", "target": 1}}).decode(),
        "TIERPOOL_HEARTBEAT": "250ms",
    }
    try:
        with WorkerPool(url, tmp_path, env=env) as pool:
            await pool.start(r, 1)
            async with TierpoolClient.from_url(url, namespace=NAMESPACE) as client:
                agent = PodAgent(client, "pod-a", "http://pod-a:8080", heartbeat_s=0.25)
                async with anyio.create_task_group() as tg:
                    await tg.start(agent.run)
                    with anyio.fail_after(15):
                        while True:
                            reply = await client.allocate("call-1")
                            if reply.status == "allocated":
                                break
                            await anyio.sleep(0.1)  # the leader assigns the pod to gold first
                    assert reply.pod_id == "pod-a"
                    assert await r.hexists(KEYS.calls, "call-1")
                    cli = await anyio.to_thread.run_sync(_cli, url, "pods", "--json")
                    assert cli.returncode == 0, cli.stderr
                    assert "pod-a" in cli.stdout and "call-1" in cli.stdout
                    assert PASSWORD not in cli.stdout + cli.stderr
                    assert (await client.release("call-1")).status == "released"
                    tg.start_soon(agent.shutdown, 2.0)
            logs = "".join(w.log_text() for w in pool.procs)
            assert "worker ready" in logs
            assert PASSWORD not in logs
    finally:
        await r.aclose()


def _cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIERPOOL_", "REDIS_"))}
    env.update(REDIS_URL=url, TIERPOOL_NAMESPACE=NAMESPACE)
    return subprocess.run(
        [sys.executable, "-m", "tierpool.workers.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
