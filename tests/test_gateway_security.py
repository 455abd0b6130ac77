"""Webhooks the internet may reach: signatures, allow-lists, budgets, body limits.

The signature algorithms are checked against the providers' own material:
Twilio's documented test vectors (its request-validation docs and SDK tests:
token ``12345``, ``https://mycompany.com/myapp.php?foo=1&bar=2``...), and
Plivo's SDK (``plivo.utils``, a test-only dependency) computing and
validating V3 signatures. Over real HTTP, against real workers: unsigned,
wrongly signed and tampered requests get 403 and put nothing on the
allocate stream; correctly signed ones are served; a flood from one source
is cut to its budget while another source is served; no secret appears in
any log line.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import signal
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import anyio
import httpx
import plivo.utils.signature_v3 as plivo_reference
import pytest
from redis.asyncio import Redis

from tests.gatewayproc import register, running_gateway, spawn_gateway
from tests.procs import KEYS, WorkerPool
from tierpool.gateway import security

pytestmark = pytest.mark.anyio

ALLOCATE = KEYS.request_stream("allocate")
TWILIO_TOKEN = "tw-7f3c9a1e5b2d"
PLIVO_TOKEN = "pl-0b8e4d6c2a91"

# Twilio's documented example (request validation docs; the SDKs' tests).
DOC_TOKEN = "12345"
DOC_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
DOC_PARAMS = {
    "CallSid": "CA1234567890ABCDE",
    "Caller": "+14158675309",
    "Digits": "1234",
    "From": "+14158675309",
    "To": "+18005551212",
}
DOC_SIGNATURE = "RSOYDt4T1cUTdK1PDd93/VVr8B8="
DOC_BODY = b'{"property": "value", "boolean": true}'
DOC_BODY_HASH = "0a1ff7634d9ab3b95db5c9a2dfe9416e41502b283a80c7cf19632632f96e6620"
DOC_BODY_SIGNATURE = "a9nBmqA0ju/hNViExpshrM61xv4="


def twilio_sign(token: str, url: str, params: dict[str, str]) -> str:
    """The test's own signer, from Twilio's docs; pinned to their vector below."""
    text = url + "".join(k + params[k] for k in sorted(params))
    return base64.b64encode(hmac.new(token.encode(), text.encode(), hashlib.sha1).digest()).decode()


def plivo_sign(token: str, url: str, params: dict[str, str], nonce: str) -> str:
    """A V3 signature computed by Plivo's own SDK code."""
    signed = plivo_reference.construct_post_url(url, dict(params))
    raw = plivo_reference.get_signature_v3(token.encode(), signed, nonce.encode())
    return raw.decode() if isinstance(raw, bytes) else str(raw)


# --- the algorithms against the providers' material -------------------------------------


def test_twilio_documented_vectors() -> None:
    multi = {k: [v] for k, v in DOC_PARAMS.items()}
    assert twilio_sign(DOC_TOKEN, DOC_URL, DOC_PARAMS) == DOC_SIGNATURE
    assert security.twilio_signature(DOC_TOKEN, DOC_URL, multi) == DOC_SIGNATURE
    assert security.twilio_valid(DOC_TOKEN, DOC_URL, multi, b"", DOC_SIGNATURE)
    # Repeated names: distinct values, sorted (the SDKs' "array and duplicates" vector).
    repeated = {"Sid": ["CA123"], "SidAccount": ["AC123"], "Digits": ["5678", "1234", "1234"]}
    assert security.twilio_signature(DOC_TOKEN, DOC_URL, repeated) == "IK+Dwps556ElfBT0I3Rgjkr1wJU="
    # Signed with the default port, or received with a port Twilio signed without.
    assert security.twilio_valid(DOC_TOKEN, DOC_URL, multi, b"", "kvajT1Ptam85bY51eRf/AJRuM3w=")
    with_port = DOC_URL.replace(".com", ".com:1234")
    assert security.twilio_valid(DOC_TOKEN, with_port, multi, b"", DOC_SIGNATURE)
    http_port = with_port.replace("https", "http")
    assert security.twilio_valid(DOC_TOKEN, http_port, multi, b"", "Zmvh+3yNM1Phv2jhDCwEM3q5ebU=")
    # The JSON-body variant: the URL carries bodySHA256, the body must hash to it.
    assert hashlib.sha256(DOC_BODY).hexdigest() == DOC_BODY_HASH
    body_url = f"{DOC_URL}&bodySHA256={DOC_BODY_HASH}"
    assert security.twilio_valid(DOC_TOKEN, body_url, {}, DOC_BODY, DOC_BODY_SIGNATURE)
    assert not security.twilio_valid(DOC_TOKEN, body_url, {}, DOC_BODY + b" ", DOC_BODY_SIGNATURE)
    # Anything changed fails.
    assert not security.twilio_valid("54321", DOC_URL, multi, b"", DOC_SIGNATURE)
    assert not security.twilio_valid(DOC_TOKEN, DOC_URL + "&x=1", multi, b"", DOC_SIGNATURE)
    tampered = {**multi, "Digits": ["9999"]}
    assert not security.twilio_valid(DOC_TOKEN, DOC_URL, tampered, b"", DOC_SIGNATURE)
    assert not security.twilio_valid(DOC_TOKEN, DOC_URL, multi, b"", None)
    assert not security.twilio_valid(DOC_TOKEN, DOC_URL, multi, b"", "invalid 王")


@pytest.mark.parametrize(
    ("url", "params"),
    [
        ("https://example.com/api/v1/plivo/allocate", {"CallUUID": "u-1", "From": "+9180"}),
        ("https://example.com/api/v1/plivo/allocate?flow=v1&a=2&a=1", {"CallUUID": "u-2"}),
        ("https://example.com/api/v1/plivo/allocate?reseller_id=m1", {}),
        ("https://example.com/api/v1/plivo/allocate", {}),
        ("http://gw:8080/p?x=%20y", {"CallUUID": "a b", "Z": "é", "Empty": ""}),
    ],
)
def test_plivo_v3_matches_plivos_own_code(url: str, params: dict[str, str]) -> None:
    nonce = "12345678901234567890"
    mine = security.plivo_signature(PLIVO_TOKEN, url, {k: [v] for k, v in params.items()}, nonce)
    assert plivo_reference.validate_v3_signature(
        "POST", url, nonce, PLIVO_TOKEN, mine, dict(params)
    )
    if all(v.isascii() for v in params.values()):
        assert mine == plivo_sign(PLIVO_TOKEN, url, params, nonce)
    multi = {k: [v] for k, v in params.items()}
    assert security.plivo_valid(PLIVO_TOKEN, url, multi, nonce, f"bogus=, {mine}")
    assert not security.plivo_valid(PLIVO_TOKEN, url, multi, nonce + "1", mine)
    assert not security.plivo_valid("other", url, multi, nonce, mine)
    assert not security.plivo_valid(PLIVO_TOKEN, url, multi, None, mine)


def test_budget_refills_at_its_rate() -> None:
    budget = security.Budget(2.0, 3)
    assert [budget.take("a", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert budget.take("a", now=0.0) == pytest.approx(0.5)
    assert budget.take("b", now=0.0) == 0.0  # another key has its own bucket
    assert budget.take("a", now=0.6) == 0.0  # 1.2 tokens came back
    assert security.retry_after(0.2) == "1" and security.retry_after(2.1) == "3"
    assert security.Budget(0, 1).take("a") == 0.0  # rate 0: no limit
    small = security.Budget(1.0, 1, max_keys=2)
    for key in ("x", "y", "z"):
        small.take(key, now=0.0)
    assert len(small._buckets) == 2


def test_source_and_public_url_trust_only_configured_proxies() -> None:
    trusted = security.networks(["10.0.0.0/8"])
    scope = {
        "type": "http",
        "client": ("10.1.1.1", 5555),
        "scheme": "http",
        "path": "/api/v1/twilio/allocate",
        "raw_path": b"/api/v1/twilio/allocate",
        "query_string": b"flow=v1",
        "headers": [
            (b"host", b"gw.internal:8080"),
            (b"x-forwarded-for", b"198.51.100.7, 203.0.113.9, 10.2.2.2"),
            (b"x-forwarded-proto", b"https"),
            (b"x-forwarded-host", b"voice.example.com"),
        ],
    }
    assert str(security.source(scope, trusted)) == "203.0.113.9"
    assert (
        security.public_url(scope, None, trusted)
        == "https://voice.example.com/api/v1/twilio/allocate?flow=v1"
    )
    assert (
        security.public_url(scope, "https://pub.example.com/router", trusted)
        == "https://pub.example.com/router/api/v1/twilio/allocate?flow=v1"
    )
    untrusted = {**scope, "client": ("198.51.100.1", 1)}
    assert str(security.source(untrusted, trusted)) == "198.51.100.1"
    assert (
        security.public_url(untrusted, None, trusted)
        == "http://gw.internal:8080/api/v1/twilio/allocate?flow=v1"
    )


def test_basic_auth() -> None:
    good = "Basic " + base64.b64encode(b"exo:pw").decode()
    assert security.basic_auth_valid("exo:pw", good)
    assert not security.basic_auth_valid("exo:pw", "Basic " + base64.b64encode(b"exo:px").decode())
    assert not security.basic_auth_valid("exo:pw", "Bearer x")
    assert not security.basic_auth_valid("exo:pw", "Basic !!!")
    assert not security.basic_auth_valid("exo:pw", None)


# --- over real HTTP, against real workers -----------------------------------------------


@pytest.fixture
def pool(redis_url: str, tmp_path: Path) -> Iterator[WorkerPool]:
    with WorkerPool(redis_url, tmp_path) as p:
        yield p


async def allocations_sent(r: Redis) -> int:
    return int(await r.xlen(ALLOCATE))


def form(params: dict[str, str]) -> dict[str, object]:
    return {
        "content": urlencode(params).encode(),
        "headers": {"content-type": "application/x-www-form-urlencoded"},
    }


async def test_twilio_signatures_over_http(r: Redis, pool: WorkerPool, redis_url: str) -> None:
    await pool.start(r, 1)
    for pod in ("p1", "p2", "p3"):
        await register(r, pod)
    async with running_gateway(redis_url, twilio_auth_token=TWILIO_TOKEN) as (http, _):
        path = "/api/v1/twilio/allocate?flow=v1&template=welcome"
        url = f"{http.base_url}".rstrip("/") + path
        params = {"CallSid": "CA100", "From": "+15550001", "To": "+15550002"}
        good = twilio_sign(TWILIO_TOKEN, url, params)

        refusals = [
            ("unsigned", params, {}),
            ("wrong token", params, {"X-Twilio-Signature": twilio_sign("nope", url, params)}),
            ("garbage", params, {"X-Twilio-Signature": "AAAA"}),
            ("tampered call", {**params, "CallSid": "CA999"}, {"X-Twilio-Signature": good}),
            ("added field", {**params, "Extra": "1"}, {"X-Twilio-Signature": good}),
        ]
        for why, body, headers in refusals:
            kw = form(body)
            kw["headers"] = {**kw["headers"], **headers}  # type: ignore[dict-item]
            resp = await http.post(path, **kw)  # type: ignore[arg-type]
            assert resp.status_code == 403, why
            assert resp.json() == {"error": "invalid signature"}
        other_query = await http.post(
            "/api/v1/twilio/allocate?flow=v1&template=other",
            **{**form(params), "headers": {**form(params)["headers"], "X-Twilio-Signature": good}},  # type: ignore[dict-item]
        )
        assert other_query.status_code == 403
        assert await allocations_sent(r) == 0, "a refused webhook reached the stream"
        assert await r.hlen(KEYS.calls) == 0

        kw = form(params)
        kw["headers"] = {**kw["headers"], "X-Twilio-Signature": good}  # type: ignore[dict-item]
        served = await http.post(path, **kw)  # type: ignore[arg-type]
        assert served.status_code == 200
        assert served.content.startswith(b"<Response><Connect><Stream url=")
        assert b"/twilio/callback/welcome" in served.content

        # The JSON-body variant: CallSid in the query, bodySHA256 signed with the URL.
        body = b'{"CallSid": "ignored"}'
        jpath = (
            f"/api/v1/twilio/allocate?CallSid=CA200&bodySHA256={hashlib.sha256(body).hexdigest()}"
        )
        jurl = f"{http.base_url}".rstrip("/") + jpath
        jsig = twilio_sign(TWILIO_TOKEN, jurl, {})
        ok = await http.post(
            jpath,
            content=body,
            headers={"content-type": "application/json", "X-Twilio-Signature": jsig},
        )
        assert ok.status_code == 200 and ok.content.startswith(b"<Response><Connect>")
        bad = await http.post(
            jpath,
            content=body + b" ",
            headers={"content-type": "application/json", "X-Twilio-Signature": jsig},
        )
        assert bad.status_code == 403
        assert await allocations_sent(r) == 2
        assert sorted(await r.hkeys(KEYS.calls)) == ["CA100", "CA200"]


async def test_public_url_and_trusted_proxy_decide_the_signed_url(
    r: Redis, pool: WorkerPool, redis_url: str
) -> None:
    await pool.start(r, 1)
    await register(r, "p1")
    await register(r, "p2")
    public = "https://voice.example.com/router"
    path = "/api/v1/twilio/allocate"
    params = {"CallSid": "CA1"}
    async with running_gateway(
        redis_url, twilio_auth_token=TWILIO_TOKEN, gateway_public_url=public
    ) as (http, _):
        local = f"{http.base_url}".rstrip("/") + path
        for url, status in ((local, 403), (public + path, 200)):
            kw = form(params)
            kw["headers"] = {
                **kw["headers"],
                "X-Twilio-Signature": twilio_sign(TWILIO_TOKEN, url, params),
            }  # type: ignore[dict-item]
            assert (await http.post(path, **kw)).status_code == status, url  # type: ignore[arg-type]

    # Without a public URL: X-Forwarded-Proto/Host count only from a trusted proxy.
    proxied = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "edge.example.com"}
    signed_url = "https://edge.example.com" + path
    params = {"CallSid": "CA2"}
    sig = twilio_sign(TWILIO_TOKEN, signed_url, params)
    for trusted, status in (((), 403), (("127.0.0.1/32",), 200)):
        async with running_gateway(
            redis_url, twilio_auth_token=TWILIO_TOKEN, gateway_trusted_proxies=trusted
        ) as (http, _):
            kw = form(params)
            kw["headers"] = {**kw["headers"], **proxied, "X-Twilio-Signature": sig}  # type: ignore[dict-item]
            assert (await http.post(path, **kw)).status_code == status, trusted  # type: ignore[arg-type]


async def test_plivo_signatures_over_http(r: Redis, pool: WorkerPool, redis_url: str) -> None:
    await pool.start(r, 1)
    await register(r, "p1")
    async with running_gateway(redis_url, plivo_auth_token=PLIVO_TOKEN) as (http, _):
        path = "/api/v1/plivo/allocate?reseller_id="
        url = f"{http.base_url}".rstrip("/") + path
        params = {"CallUUID": "uuid-7", "From": "+918000"}
        nonce = "05429567804466091622"
        sig = plivo_sign(PLIVO_TOKEN, url, params, nonce)
        cases = [
            ("unsigned", params, {}),
            ("no nonce", params, {"X-Plivo-Signature-V3": sig}),
            (
                "other nonce",
                params,
                {"X-Plivo-Signature-V3": sig, "X-Plivo-Signature-V3-Nonce": "1"},
            ),
            (
                "tampered",
                {**params, "CallUUID": "uuid-8"},
                {"X-Plivo-Signature-V3": sig, "X-Plivo-Signature-V3-Nonce": nonce},
            ),
            (
                "wrong token",
                params,
                {
                    "X-Plivo-Signature-V3": plivo_sign("x", url, params, nonce),
                    "X-Plivo-Signature-V3-Nonce": nonce,
                },
            ),
        ]
        for why, body, headers in cases:
            kw = form(body)
            kw["headers"] = {**kw["headers"], **headers}  # type: ignore[dict-item]
            resp = await http.post(path, **kw)  # type: ignore[arg-type]
            assert resp.status_code == 403, why
        assert await allocations_sent(r) == 0
        kw = form(params)
        # Plivo sends one signature per active token: any of them may match.
        kw["headers"] = {  # type: ignore[dict-item]
            **kw["headers"],  # type: ignore[dict-item]
            "X-Plivo-Signature-V3": f"{plivo_sign('old-token', url, params, nonce)},{sig}",
            "X-Plivo-Signature-V3-Nonce": nonce,
        }
        served = await http.post(path, **kw)  # type: ignore[arg-type]
        assert served.status_code == 200
        assert served.content.startswith(b"<Response><Stream bidirectional")
        assert await allocations_sent(r) == 1


async def test_exotel_basic_auth_and_allow_list(r: Redis, pool: WorkerPool, redis_url: str) -> None:
    await pool.start(r, 1)
    await register(r, "p1")
    await register(r, "p2")
    async with running_gateway(redis_url, exotel_basic_auth="exo:s3cret") as (http, _):
        body = {"CallSid": "ex1"}
        none = await http.post("/api/v1/exotel/allocate", json=body)
        assert none.status_code == 401 and none.headers["www-authenticate"].startswith("Basic")
        wrong = await http.post("/api/v1/exotel/allocate", json=body, auth=("exo", "nope"))
        assert wrong.status_code == 401
        assert await allocations_sent(r) == 0
        ok = await http.post("/api/v1/exotel/allocate", json=body, auth=("exo", "s3cret"))
        assert ok.status_code == 200 and "url" in ok.json()

    async with running_gateway(
        redis_url,
        gateway_allow_from=("203.0.113.0/24",),
        gateway_trusted_proxies=("127.0.0.1/32",),
    ) as (http, _):
        for path, kw in (
            ("/api/v1/exotel/allocate", {"json": {"CallSid": "ex2"}}),
            ("/api/v1/twilio/allocate", form({"CallSid": "tw2"})),
            ("/api/v1/plivo/allocate", form({"CallUUID": "pl2"})),
        ):
            resp = await http.post(path, **kw)  # type: ignore[arg-type]
            assert (resp.status_code, resp.json()) == (403, {"error": "source not allowed"}), path
        assert await allocations_sent(r) == 1
        inside = await http.post(
            "/api/v1/exotel/allocate",
            json={"CallSid": "ex3"},
            headers={"X-Forwarded-For": "203.0.113.50"},
        )
        assert inside.status_code == 200
        # A client cannot claim an address: only a trusted proxy's header counts,
        # read from the right.
        spoof = await http.post(
            "/api/v1/exotel/allocate",
            json={"CallSid": "ex4"},
            headers={"X-Forwarded-For": "203.0.113.50, 198.51.100.1"},
        )
        assert spoof.status_code == 403
        assert await allocations_sent(r) == 2


async def test_a_flood_from_one_source_is_cut_while_another_is_served(
    r: Redis, pool: WorkerPool, redis_url: str
) -> None:
    await pool.start(r, 1)
    for i in range(4):
        await register(r, f"p{i}")
    async with running_gateway(
        redis_url,
        gateway_source_rate=0.5,
        gateway_source_burst=3,
        gateway_trusted_proxies=("127.0.0.1/32",),
        gateway_max_body_bytes=256,
    ) as (http, _):
        flood = {"X-Forwarded-For": "198.51.100.66"}
        codes = []
        for i in range(15):
            resp = await http.post(
                "/api/v1/twilio/allocate", headers=flood, data={"CallSid": f"F{i}"}
            )
            codes.append(resp.status_code)
            if resp.status_code == 429:
                assert int(resp.headers["retry-after"]) >= 1
                assert resp.json() == {"error": "too many requests"}
        assert codes[:3] == [200, 200, 200]
        assert codes.count(429) >= 11, codes
        other = await http.post(
            "/api/v1/twilio/allocate",
            headers={"X-Forwarded-For": "203.0.113.7"},
            data={"CallSid": "calm"},
        )
        assert other.status_code == 200 and other.content.startswith(b"<Response><Connect>")
        served = codes.count(200) + 1
        assert await allocations_sent(r) == served, "a refused request reached the stream"

        # A body over the limit is refused before it is parsed, and allocates nothing.
        big = await http.post(
            "/api/v1/twilio/allocate",
            headers={"X-Forwarded-For": "203.0.113.8"},
            data={"CallSid": "big", "Pad": "x" * 400},
        )
        assert big.status_code == 400 and big.json()["field"] == "body"
        assert await allocations_sent(r) == served

    async with running_gateway(
        redis_url, gateway_merchant_rate=0.5, gateway_merchant_burst=2, gateway_source_rate=0
    ) as (http, _):
        codes = [
            (
                await http.post("/api/v1/twilio/allocate?reseller_id=m1", data={"CallSid": f"M{i}"})
            ).status_code
            for i in range(4)
        ]
        assert codes[:2] == [200, 200] and codes[2:] == [429, 429]
        other = await http.post("/api/v1/twilio/allocate?reseller_id=m2", data={"CallSid": "M9"})
        assert other.status_code == 200


async def test_no_secret_in_any_log_line_and_warnings_when_unset(
    r: Redis, pool: WorkerPool, redis_url: str, tmp_path: Path
) -> None:
    await pool.start(r, 1)
    await register(r, "p1")
    secrets = {
        "TWILIO_AUTH_TOKEN": "tw-LOGCANARY-4711",
        "PLIVO_AUTH_TOKEN": "pl-LOGCANARY-0815",
        "EXOTEL_BASIC_AUTH": "exo:LOGCANARY-pw",
    }
    gw = spawn_gateway(redis_url, tmp_path / "gw.log", env={**secrets, "LOG_LEVEL": "debug"})
    try:
        await gw.wait_listening()
        async with httpx.AsyncClient(base_url=gw.url, timeout=20) as http:
            path = "/api/v1/twilio/allocate"
            params = {"CallSid": "CAlog"}
            await http.post(path, data=params, headers={"X-Twilio-Signature": "wrong"})
            sig = twilio_sign(secrets["TWILIO_AUTH_TOKEN"], gw.url + path, params)
            ok = await http.post(path, data=params, headers={"X-Twilio-Signature": sig})
            assert ok.status_code == 200
            await http.post("/api/v1/plivo/allocate", data={"CallUUID": "x"})
            await http.post("/api/v1/exotel/allocate", json={"CallSid": "e"}, auth=("exo", "x"))
            await http.post(
                "/api/v1/exotel/allocate", json={"CallSid": "e2"}, auth=("exo", "LOGCANARY-pw")
            )
        gw.proc.send_signal(signal.SIGTERM)
        assert await anyio.to_thread.run_sync(lambda: gw.proc.wait(15)) == 0
    finally:
        gw.close()
    text = gw.log_text()
    assert "webhook refused" in text and "invalid signature" in text
    assert "LOGCANARY" not in text, "a secret reached the log"
    assert "is not set" not in text  # every webhook is protected: no warning

    open_gw = spawn_gateway(redis_url, tmp_path / "open.log")
    try:
        await open_gw.wait_listening()
    finally:
        open_gw.proc.send_signal(signal.SIGTERM)
        await anyio.to_thread.run_sync(lambda: open_gw.proc.wait(15))
        open_gw.close()
    warned = open_gw.log_text()
    for name in ("TWILIO_AUTH_TOKEN", "PLIVO_AUTH_TOKEN"):
        assert f"{name} is not set" in warned
    assert "EXOTEL_BASIC_AUTH nor GATEWAY_ALLOW_FROM" in warned
