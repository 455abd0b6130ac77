"""``tierpool gateway`` over real HTTP, against real worker processes and a real Redis.

Every endpoint of the anchor (``ANCHOR-HTTP-API.md`` §4), success and
failure, is compared to the reference: status codes, content types, JSON
field names and order, XML element and attribute names, and for the fixed
answers the exact bytes.
"""

from __future__ import annotations

import signal
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.lowlevel
import httpx
import msgspec
import pytest
from redis.asyncio import Redis

from tests.gatewayproc import register, running_gateway, spawn_gateway
from tests.procs import KEYS, WorkerPool
from tierpool.workers.redisproc import RedisProcess

pytestmark = pytest.mark.anyio

BASE = "wss://localhost:8081"
AGENT = "/agent/voice/breeze-buddy"


@pytest.fixture
def pool(redis_url: str, tmp_path: Path) -> Iterator[WorkerPool]:
    with WorkerPool(redis_url, tmp_path) as p:
        yield p


def twiml_failure(message: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Response>\n'
        f"    <Say>{message}</Say>\n    <Hangup/>\n</Response>"
    ).encode()


def plivo_failure(message: str) -> bytes:
    return twiml_failure(message).replace(b"Say>", b"Speak>")


def json_of(resp: httpx.Response) -> object:
    assert resp.headers["content-type"] == "application/json"
    assert resp.content.endswith(b"\n"), "Go's json.Encoder ends with a newline"
    return msgspec.json.decode(resp.content)


async def test_json_allocate_release_drain_lookup_and_status(
    r: Redis, pool: WorkerPool, redis_url: str
) -> None:
    await pool.start(r, 1)
    for pod in ("p1", "p2"):
        assert (await register(r, pod))["status"] == "registered"
    async with running_gateway(redis_url) as (http, _):
        resp = await http.post("/api/v1/allocate", json={"call_sid": "c1", "reseller_id": ""})
        assert resp.status_code == 200
        doc = json_of(resp)
        assert isinstance(doc, dict)
        # A Go map: keys sorted.
        assert list(doc) == ["pod_name", "source_pool", "success", "was_existing", "ws_url"]
        pod = doc["pod_name"]
        assert doc == {
            "pod_name": pod,
            "source_pool": "pool:gold",
            "success": True,
            "was_existing": False,
            "ws_url": f"{BASE}/ws/pod/{pod}{AGENT}/twilio/callback/order-confirmation/v2",
        }
        # A repeat: same pod, was_existing, ws_url rebuilt from this request's parts.
        again = await http.post(
            "/api/v1/allocate",
            json={"call_sid": "c1", "provider": "plivo", "flow": "v1", "template": "t9"},
        )
        assert json_of(again) == {
            "pod_name": pod,
            "source_pool": "pool:gold",
            "success": True,
            "was_existing": True,
            "ws_url": f"{BASE}/ws/pod/{pod}{AGENT}/plivo/callback/t9",
        }
        exotel_default = await http.post(
            "/api/v1/allocate", json={"call_sid": "c2", "provider": "exotel"}
        )
        other = json_of(exotel_default)
        assert isinstance(other, dict) and other["pod_name"] != pod
        assert other["ws_url"].endswith("/exotel/callback/template/v2")

        lookup = await http.get(f"/api/v1/pod/{pod}")
        assert lookup.status_code == 200
        assert list(json_of(lookup)) == [  # type: ignore[arg-type]
            "pod_name",
            "tier",
            "is_draining",
            "has_active_lease",
            "lease_call_sid",
        ]
        assert msgspec.json.decode(lookup.content) == {
            "pod_name": pod,
            "tier": "gold",
            "is_draining": False,
            "has_active_lease": True,
            "lease_call_sid": "c1",
        }

        status = await http.get("/api/v1/status")
        assert status.status_code == 200
        st = json_of(status)
        assert st == {
            "pools": {
                "gold": {"type": "exclusive", "assigned": 2, "available": 0},
                "standard": {"type": "exclusive", "assigned": 0, "available": 0},
                "overflow": {"type": "exclusive", "assigned": 0, "available": 0},
            },
            "active_calls": 2,
            "is_leader": False,
            "status": "up",
        }

        # No pod left: the anchor's 503.
        full = await http.post("/api/v1/allocate", json={"call_sid": "c3"})
        assert (full.status_code, json_of(full)) == (503, {"error": "no pods available"})

        drain = await http.post("/api/v1/drain", json={"pod_name": pod})
        assert drain.status_code == 200
        d = json_of(drain)
        assert isinstance(d, dict)
        assert list(d) == ["success", "pod_name", "has_active_call", "message"]
        assert d == {
            "success": True,
            "pod_name": pod,
            "has_active_call": True,
            "message": f"Pod {pod} is draining with active call in progress. "
            "Will complete when call ends.",
        }
        assert msgspec.json.decode((await http.get(f"/api/v1/pod/{pod}")).content)["is_draining"]

        rel = await http.post("/api/v1/release", json={"call_sid": "c1"})
        assert rel.status_code == 200
        rd = json_of(rel)
        assert isinstance(rd, dict)
        assert list(rd) == ["success", "pod_name", "released_to_pool", "was_draining"]
        assert rd == {
            "success": True,
            "pod_name": pod,
            "released_to_pool": "",
            "was_draining": True,
        }
        idle = await http.get(f"/api/v1/pod/{pod}")
        assert "lease_call_sid" not in msgspec.json.decode(idle.content)  # omitted when empty

        gone = await http.post("/api/v1/release", json={"call_sid": "c1"})
        assert (gone.status_code, json_of(gone)) == (404, {"error": "call not found"})
        rel2 = await http.post("/api/v1/release", json={"call_sid": "c2"})
        assert json_of(rel2) == {
            "success": True,
            "pod_name": other["pod_name"],
            "released_to_pool": "pool:gold",
            "was_draining": False,
        }
        quiet = await http.post("/api/v1/drain", json={"pod_name": other["pod_name"]})
        assert json_of(quiet)["message"] == f"Pod {other['pod_name']} is draining. No active calls."  # type: ignore[index]

        unknown = await http.post("/api/v1/drain", json={"pod_name": "ghost"})
        assert (unknown.status_code, json_of(unknown)) == (500, {"error": "drain failed"})
        missing = await http.get("/api/v1/pod/ghost")
        assert (missing.status_code, json_of(missing)) == (404, {"error": "pod not found"})


async def test_twilio_and_plivo_webhooks_answer_the_anchors_xml(
    r: Redis, pool: WorkerPool, redis_url: str
) -> None:
    await pool.start(r, 1)
    await register(r, "p1")
    await register(r, "p2")
    async with running_gateway(redis_url) as (http, _):
        tw = await http.post(
            "/api/v1/twilio/allocate?flow=v1&template=welcome&reseller_id=",
            data={"CallSid": "CA1", "From": "+15550001"},
        )
        assert (tw.status_code, tw.headers["content-type"]) == (200, "application/xml")
        calls_p1 = await r.zrangebylex(KEYS.pod_calls, *KEYS.pod_calls_range("p1"))  # who got it
        got = "p1" if calls_p1 == ["p1 CA1"] else "p2"
        url = f"{BASE}/ws/pod/{got}{AGENT}/twilio/callback/welcome"
        assert (
            tw.content
            == (f'<Response><Connect><Stream url="{url}"></Stream></Connect></Response>').encode()
        )
        root = ET.fromstring(tw.content)
        assert root.tag == "Response" and root[0].tag == "Connect"
        assert root[0][0].tag == "Stream" and root[0][0].attrib == {"url": url}

        # CallSid from the query when the body has none (Go's FormValue).
        pl = await http.post("/api/v1/plivo/allocate?CallUUID=uuid-1", data={})
        assert pl.status_code == 200
        other = "p2" if got == "p1" else "p1"
        purl = f"{BASE}/ws/pod/{other}{AGENT}/plivo/callback/order-confirmation/v2"
        assert (
            pl.content
            == (
                '<Response><Stream bidirectional="true" keepCallAlive="true" '
                f'contentType="audio/x-mulaw;rate=8000">{purl}</Stream></Response>'
            ).encode()
        )
        stream = ET.fromstring(pl.content)[0]
        assert list(stream.attrib) == ["bidirectional", "keepCallAlive", "contentType"]
        assert stream.text == purl

        # Failures: HTTP 200 with Say/Speak + Hangup, exact bytes.
        for path, body, expected in (
            ("/api/v1/twilio/allocate", {"From": "x"}, twiml_failure("missing CallSid")),
            ("/api/v1/plivo/allocate", {"From": "x"}, plivo_failure("missing CallUUID")),
            ("/api/v1/twilio/allocate", {"CallSid": "CA2"}, twiml_failure("allocation failed")),
            ("/api/v1/plivo/allocate", {"CallUUID": "u2"}, plivo_failure("allocation failed")),
        ):
            resp = await http.post(path, data=body)
            assert (resp.status_code, resp.headers["content-type"]) == (200, "application/xml")
            assert resp.content == expected, path
        bad = await http.post(
            "/api/v1/twilio/allocate",
            content=b"CallSid=%ff%fe",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert bad.content == twiml_failure("invalid form data")


async def test_exotel_webhook(r: Redis, pool: WorkerPool, redis_url: str) -> None:
    await pool.start(r, 1)
    await register(r, "p1")
    async with running_gateway(redis_url) as (http, _):
        ok = await http.post("/api/v1/exotel/allocate", json={"CallSid": "ex1", "flow": "v1"})
        assert (ok.status_code, json_of(ok)) == (
            200,
            {"url": f"{BASE}/ws/pod/p1{AGENT}/exotel/callback/template"},
        )
        busy = await http.post("/api/v1/exotel/allocate", json={"CallSid": "ex2"})
        assert (busy.status_code, json_of(busy)) == (503, {"error": "allocation failed"})
        missing = await http.post("/api/v1/exotel/allocate", json={"reseller_id": "m"})
        assert (missing.status_code, json_of(missing)) == (
            400,
            {"error": "missing CallSid", "field": "CallSid"},
        )
        garbage = await http.post("/api/v1/exotel/allocate", content=b"{nope")
        assert (garbage.status_code, json_of(garbage)) == (
            400,
            {"error": "invalid request body", "field": "body"},
        )


async def test_bad_input_is_a_400_naming_the_field(
    r: Redis, pool: WorkerPool, redis_url: str
) -> None:
    await pool.start(r, 1)
    await register(r, "p1")
    async with running_gateway(redis_url) as (http, _):
        cases: list[tuple[str, bytes, dict[str, str]]] = [
            ("/api/v1/allocate", b"", {"error": "invalid request body", "field": "body"}),
            ("/api/v1/allocate", b"{bad json", {"error": "invalid request body", "field": "body"}),
            ("/api/v1/allocate", b"[1,2]", {"error": "invalid request body", "field": "body"}),
            (
                "/api/v1/allocate",
                b'{"call_sid": 5}',
                {"error": "invalid request body", "field": "call_sid"},
            ),
            ("/api/v1/allocate", b"null", {"error": "call_sid is required", "field": "call_sid"}),
            ("/api/v1/allocate", b"{}", {"error": "call_sid is required", "field": "call_sid"}),
            (
                "/api/v1/allocate",
                b'{"call_sid": "has space"}',
                {"error": "invalid call_sid", "field": "call_sid"},
            ),
            (
                "/api/v1/allocate",
                b'{"call_sid": "ok", "reseller_id": "a/b"}',
                {"error": "invalid reseller_id", "field": "reseller_id"},
            ),
            ("/api/v1/release", b"{}", {"error": "call_sid is required", "field": "call_sid"}),
            ("/api/v1/release", b"{x", {"error": "invalid request body", "field": "body"}),
            ("/api/v1/drain", b"{}", {"error": "pod_name is required", "field": "pod_name"}),
            (
                "/api/v1/drain",
                b'{"pod_name": true}',
                {"error": "invalid request body", "field": "pod_name"},
            ),
        ]
        for path, body, expected in cases:
            resp = await http.post(path, content=body)
            assert (resp.status_code, json_of(resp)) == (400, expected), (path, body)
        huge = await http.post("/api/v1/allocate", content=b'{"call_sid":"' + b"x" * 20_000 + b'"}')
        assert huge.status_code == 400
        assert json_of(huge) == {"error": "request body larger than 16384 bytes", "field": "body"}
        twilio_huge = await http.post(
            "/api/v1/twilio/allocate", content=b"CallSid=" + b"x" * 70_000
        )
        assert twilio_huge.status_code == 400
        # Go's decoding: case-insensitive keys, trailing bytes ignored, unknown keys ignored.
        lax = await http.post(
            "/api/v1/allocate", content=b'{"CALL_SID": "c9", "extra": 1} trailing'
        )
        assert lax.status_code == 200
        assert json_of(lax)["pod_name"] == "p1"  # type: ignore[index]
        # Nothing above allocated anything but c9.
        assert await r.hkeys(KEYS.calls) == ["c9"]


async def test_other_endpoints_health_ready_metrics_request_id(
    r: Redis, pool: WorkerPool, redis_url: str
) -> None:
    await pool.start(r, 1)
    async with running_gateway(redis_url) as (http, _):
        health = await http.get("/api/v1/health")
        assert (health.status_code, health.content) == (200, b'{"status":"ok"}\n')
        ready = await http.get("/api/v1/ready")
        assert (ready.status_code, ready.content) == (200, b'{"status":"ready"}\n')
        nowhere = await http.get("/api/v1/nowhere")
        assert (nowhere.status_code, nowhere.content) == (404, b"404 page not found\n")
        assert nowhere.headers["content-type"] == "text/plain; charset=utf-8"
        assert (await http.get("/api/v1/allocate")).status_code == 405

        given = await http.get("/api/v1/health", headers={"X-Request-Id": "trace-42"})
        assert given.headers["x-request-id"] == "trace-42"
        made = await http.get("/api/v1/health")
        assert len(made.headers["x-request-id"]) == 32
        hostile = await http.get("/api/v1/health", headers={"X-Request-Id": "a b\tc"})
        assert hostile.headers["x-request-id"] != "a b\tc"

        await http.post("/api/v1/allocate", json={"call_sid": "m1"})
        text = (await http.get("/api/v1/metrics")).text
        assert (
            'tierpool_http_requests_total{endpoint="/api/v1/allocate",method="POST",status="503"}'
            in text
        )
        assert 'tierpool_http_request_duration_seconds_bucket{endpoint="/api/v1/health"' in text
        assert 'endpoint="other",method="GET",status="404"' in text


async def test_ready_and_status_when_redis_goes_away(tmp_path: Path) -> None:
    server = RedisProcess()
    server.start()
    try:
        async with running_gateway(server.url) as (http, _):
            assert (await http.get("/api/v1/ready")).status_code == 200
            server.close()
            ready = await http.get("/api/v1/ready")
            assert (ready.status_code, ready.content) == (
                503,
                b'{"error":"service unavailable"}\n',
            )
            status = await http.get("/api/v1/status")
            assert (status.status_code, json_of(status)) == (
                200,
                {"pools": {}, "active_calls": 0, "is_leader": False, "status": "down"},
            )
            down = await http.post("/api/v1/allocate", json={"call_sid": "x1"})
            assert down.status_code == 503 and down.headers["retry-after"] == "1"
    finally:
        server.close()


async def test_no_reply_in_time_is_a_503_with_retry_after_and_the_retry_is_served(
    r: Redis, pool: WorkerPool, redis_url: str
) -> None:
    """No worker answers: 503 + Retry-After, and the late request never places the call;
    once a worker runs, the provider's retry (same call id) is served once."""
    async with running_gateway(redis_url, http_write_timeout_s=1.0) as (http, _):
        for path, kw in (
            ("/api/v1/allocate", {"json": {"call_sid": "slow"}}),
            ("/api/v1/twilio/allocate", {"data": {"CallSid": "slow"}}),
            ("/api/v1/exotel/allocate", {"json": {"CallSid": "slow"}}),
            ("/api/v1/release", {"json": {"call_sid": "slow"}}),
        ):
            resp = await http.post(path, **kw)  # type: ignore[arg-type]
            assert resp.status_code == 503, path
            assert resp.headers["retry-after"] == "1"
            assert "error" in msgspec.json.decode(resp.content)
        await pool.start(r, 1)
        await register(r, "p1")
        retry = await http.post("/api/v1/allocate", json={"call_sid": "slow"})
        assert retry.status_code == 200
        assert json_of(retry)["was_existing"] is False  # type: ignore[index]
        assert await r.hkeys(KEYS.calls) == ["slow"]


async def test_merchant_pool_and_reseller_id(r: Redis, pool: WorkerPool, redis_url: str) -> None:
    """reseller_id is the contract's merchant_id; a merchant's pool shows as merchant:<pool>."""
    config = msgspec.json.encode(
        {
            "tiers": {
                "gold": {"type": "exclusive", "target": 1},
                "acme": {"type": "exclusive", "target": 1},
            },
            "default_chain": ["gold"],
        }
    ).decode()
    await pool.start(r, 1, env={"TIER_CONFIG": config})
    from tierpool.client.client import TierpoolClient

    async with TierpoolClient.from_url(redis_url, namespace="t") as client:
        assert (await client.set_merchant("acme", {"pool": "acme", "fallback": []})).status == (
            "applied"
        )
    await register(r, "p1")
    await register(r, "p2")
    async with running_gateway(redis_url, tier_config_raw=config) as (http, gw):
        assert gw.gateway is not None
        await gw.gateway.pools.refresh()
        resp = await http.post("/api/v1/allocate", json={"call_sid": "m1", "reseller_id": "acme"})
        doc = json_of(resp)
        assert isinstance(doc, dict)
        assert doc["source_pool"] == "merchant:acme"
        assert (
            msgspec.json.decode((await http.get(f"/api/v1/pod/{doc['pod_name']}")).content)["tier"]
            == "acme"
        )
        tw = await http.post("/api/v1/twilio/allocate?reseller_id=acme", data={"CallSid": "m2"})
        assert tw.content == twiml_failure("allocation failed")  # acme's one pod is busy
        plain = await http.post("/api/v1/allocate", json={"call_sid": "g1"})
        assert json_of(plain)["source_pool"] == "pool:gold"  # type: ignore[index]


async def test_the_real_command_drains_in_flight_requests_on_sigterm(
    r: Redis, pool: WorkerPool, redis_url: str, tmp_path: Path
) -> None:
    """SIGTERM while an allocation waits: the answer still goes out, then the process exits 0."""
    await pool.start(r, 1)
    await register(r, "p1")
    gw = spawn_gateway(redis_url, tmp_path / "gateway.log", env={"HTTP_WRITE_TIMEOUT": "20s"})
    try:
        await gw.wait_listening()
        worker = pool.procs[0]
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
            result: list[httpx.Response] = []

            async def call() -> None:
                result.append(await http.post("/api/v1/allocate", json={"call_sid": "inflight"}))

            worker.send_signal(signal.SIGSTOP)  # the request waits for its reply
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(call)
                    await anyio.sleep(0.5)
                    gw.proc.send_signal(signal.SIGTERM)
                    await anyio.sleep(0.5)
                    assert gw.proc.poll() is None, "the gateway left a request unanswered"
                    worker.send_signal(signal.SIGCONT)
            finally:
                worker.send_signal(signal.SIGCONT)
            assert result[0].status_code == 200, result[0].content
            assert json_of(result[0])["pod_name"] == "p1"  # type: ignore[index]
        code = await anyio.to_thread.run_sync(lambda: gw.proc.wait(15))
        assert code == 0, gw.log_text()
        assert "draining requests in flight" in gw.log_text()
    finally:
        gw.close()


def test_listening_socket_is_tcp_nodelay() -> None:
    """Regression: a socket made without ``IPPROTO_TCP`` left Nagle on for accepted
    connections (asyncio checks ``sock.proto``), and every kept-alive answer in two
    writes waited ~40 ms for the client's delayed ACK (health took 22 ms, not 0.1)."""
    import socket

    from tierpool.gateway.server import bind

    sock = bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        sock.close()


async def test_kept_alive_requests_do_not_wait_for_delayed_acks(redis_url: str) -> None:
    """Forty sequential requests on one connection: far below 40 x 22 ms of Nagle stalls."""
    import time

    from tierpool.bench.gateway import HttpConn

    async with running_gateway(redis_url) as (http, _server):
        port = int(str(http.base_url).rsplit(":", 1)[1].rstrip("/"))
        conn = await HttpConn.open("127.0.0.1", port)
        try:
            start = time.perf_counter()
            for _ in range(40):
                status, _body = await conn.post("/api/v1/drain", b"{}")
                assert status == 400
            assert time.perf_counter() - start < 0.5
        finally:
            await conn.aclose()


async def test_writes_of_one_loop_turn_leave_together() -> None:
    """uvicorn writes headers and body apart; the gateway's transport sends them in one call
    (two sends per answer were a third of the gateway's CPU on a loaded machine)."""
    from typing import Any, cast

    from tierpool.gateway.server import _CoalescingTransport

    class Recorder:
        def __init__(self) -> None:
            self.writes: list[bytes] = []
            self.closed = False

        def write(self, data: bytes) -> None:
            self.writes.append(data)

        def is_closing(self) -> bool:
            return self.closed

        def close(self) -> None:
            self.closed = True

        def get_extra_info(self, name: str) -> Any:
            return name

    real = Recorder()
    t = _CoalescingTransport(cast(Any, real))
    t.write(b"HTTP/1.1 200 OK\r\n\r\n")
    t.write(memoryview(b"body"))
    assert real.writes == []
    await anyio.lowlevel.checkpoint()
    await anyio.lowlevel.checkpoint()
    assert real.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
    t.write(b"last")
    t.close()  # flushes before closing
    assert real.writes[-1] == b"last" and real.closed
    assert t.get_extra_info("peername") == "peername"
