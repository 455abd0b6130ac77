"""The anchor's endpoints (``ANCHOR-HTTP-API.md`` §4) as a Starlette application.

Each handler reads its input the way the anchor did, sends one contract
request through the process's shared :class:`TierpoolClient` (or reads pool
state for the lookups), and answers in the anchor's format. What the anchor
did not do, and the gateway does: a reply that does not come in time answers
503 with ``Retry-After`` (allocate is idempotent per call id, so the retry
gets the same pod); bad input is a 400 naming the field, never a 500.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Final

import anyio
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tierpool.client.client import TierpoolClient
from tierpool.core.errors import (
    ClientClosed,
    InvalidMessage,
    RedisUnavailable,
    RequestTimeout,
)
from tierpool.core.keys import Keys
from tierpool.core.settings import Settings
from tierpool.gateway import formats, metrics
from tierpool.gateway.formats import BadInput
from tierpool.gateway.guard import Guard, Provider, Refusal
from tierpool.gateway.pools import PoolView
from tierpool.schemas import Reply

log = logging.getLogger(__name__)

JSON: Final = "application/json"
XML: Final = "application/xml"
REPLY_MARGIN_S: Final = 0.5
"""The wait for a reply ends this long before ``HTTP_WRITE_TIMEOUT``, so the 503 still goes out."""
RETRY_AFTER_S: Final = "1"
PING_TIMEOUT_S: Final = 1.0
REQUEST_ID_HEADER: Final = "x-request-id"
_REQUEST_ID_OK: Final = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:/-"
)
_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
QUIET_PATHS: Final = frozenset({"/api/v1/health", "/api/v1/ready"})
"""Probed every few seconds: logged at debug, as the anchor did."""

# Contract field -> the anchor's name for it, for errors that name a field.
_ANCHOR_NAMES: Final = {"call_id": "call_sid", "merchant_id": "reseller_id", "pod_id": "pod_name"}


class Unavailable(Exception):
    """The request could not be answered now: 503 with ``Retry-After``."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


def json_response(
    status: int, doc: dict[str, Any], headers: dict[str, str] | None = None
) -> Response:
    return Response(formats.go_json(doc), status, headers=headers, media_type=JSON)


def xml_response(body: bytes) -> Response:
    return Response(body, 200, media_type=XML)


def bad_input(exc: BadInput) -> Response:
    return json_response(400, formats.error_doc(exc.message, exc.field))


def refused(refusal: Refusal) -> Response:
    return json_response(refusal.status, formats.error_doc(refusal.message), refusal.headers)


def unavailable(exc: Unavailable) -> Response:
    return json_response(503, formats.error_doc(exc.message), {"Retry-After": RETRY_AFTER_S})


class Gateway:
    """What the handlers share: settings, the one client, a Redis for reads, the pool view."""

    def __init__(self, settings: Settings, client: TierpoolClient, redis: Redis) -> None:
        self.settings = settings
        self.client = client
        self.redis = redis
        self.keys = Keys(settings.namespace)
        self.base = settings.voice_agent_base_url
        self.reply_wait_s = max(0.1, settings.http_write_timeout_s - REPLY_MARGIN_S)
        self.pools = PoolView(redis, self.keys, settings.tier_config())
        self.max_body_bytes = settings.gateway_max_body_bytes
        self.guard = Guard(settings)

    # --- input -------------------------------------------------------------------
    async def body(self, request: Request) -> bytes:
        """The request body, refused past ``GATEWAY_MAX_BODY_BYTES`` before anything parses it."""
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            raise BadInput(f"request body larger than {self.max_body_bytes} bytes", "body")
        chunks: list[bytes] = []
        size = 0
        with anyio.move_on_after(self.settings.http_read_timeout_s) as scope:
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_body_bytes:
                    raise BadInput(f"request body larger than {self.max_body_bytes} bytes", "body")
                chunks.append(chunk)
        if scope.cancelled_caught:
            raise BadInput("request body not received within HTTP_READ_TIMEOUT", "body")
        return b"".join(chunks)

    # --- the stream contract -------------------------------------------------------
    async def allocate(
        self, call_id: str, merchant: str, provider: str, flow: str, template: str
    ) -> Reply:
        """One allocate request; raises :class:`BadInput` or :class:`Unavailable`."""
        try:
            return await self.client.allocate(
                call_id,
                merchant_id=merchant or None,
                provider=provider,
                flow=flow,
                template=template,
                timeout_s=self.reply_wait_s,
            )
        except InvalidMessage as exc:
            raise _invalid(exc) from None
        except (RequestTimeout, RedisUnavailable, ClientClosed) as exc:
            raise Unavailable(_why_unavailable(exc)) from None

    async def request(self, call: Callable[[], Awaitable[Reply]]) -> Reply:
        try:
            return await call()
        except InvalidMessage as exc:
            raise _invalid(exc) from None
        except (RequestTimeout, RedisUnavailable, ClientClosed) as exc:
            raise Unavailable(_why_unavailable(exc)) from None

    def allocated_url(self, reply: Reply, provider: str, flow: str, template: str) -> str:
        """``ws_url`` as the anchor built it: from this request's parts, also on a repeat."""
        assert reply.pod_id is not None
        return formats.ws_url(self.base, reply.pod_id, provider, flow, template)

    # --- handlers ----------------------------------------------------------------
    async def allocate_json(self, request: Request) -> Response:
        try:
            body = formats.decode_json(await self.body(request), formats.AllocateBody)
            if not body.call_sid:
                raise BadInput("call_sid is required", "call_sid")
            provider = body.provider or "twilio"
            flow = body.flow or "v2"
            template = body.template or formats.default_template(provider)
            reply = await self.allocate(body.call_sid, body.reseller_id, provider, flow, template)
        except BadInput as exc:
            return bad_input(exc)
        except Unavailable as exc:
            return unavailable(exc)
        if reply.status == "allocated":
            return json_response(
                200,
                {
                    "pod_name": reply.pod_id,
                    "source_pool": self.pools.source_pool(reply.pool or ""),
                    "success": True,
                    "was_existing": bool(reply.existing),
                    "ws_url": self.allocated_url(reply, provider, flow, template),
                },
            )
        return self.allocation_failed(reply, lambda msg: json_response(503, formats.error_doc(msg)))

    def allocation_failed(self, reply: Reply, answer: Callable[[str], Response]) -> Response:
        """The answer to a reply other than ``allocated``: ``answer(message)`` for a refusal."""
        if reply.status == "rejected":
            return answer("no pods available")
        if reply.status == "expired":
            return unavailable(Unavailable("allocation not made in time"))
        if reply.status == "invalid":
            log.warning("allocate refused as invalid by the worker: %s", reply.error)
            return json_response(400, formats.error_doc("invalid request", "body"))
        log.error("allocate answered %s: %s", reply.status, reply.error)
        return json_response(500, formats.error_doc("allocation failed"))

    async def _webhook(
        self,
        request: Request,
        provider: Provider,
        id_field: str,
        stream: Callable[[str], bytes],
        failure: Callable[[str], bytes],
    ) -> Response:
        """Twilio and Plivo: form in, XML out; the anchor answered every failure with HTTP 200.

        Before any of that: source, budget, size and signature (:mod:`gateway.guard`).
        """
        scope = request.scope
        source = self.guard.source_of(scope)
        refusal = self.guard.admit(scope, source)
        if refusal is not None:
            return refused(refusal)
        content_type = request.headers.get("content-type", "")
        try:
            raw = await self.body(request)
        except BadInput as exc:
            return bad_input(exc)
        refusal = self.guard.verify(scope, source, provider, raw, content_type)
        if refusal is not None:
            return refused(refusal)
        try:
            form = formats.form_values(raw, content_type, request.url.query)
        except BadInput:
            return xml_response(failure("invalid form data"))
        call_id = form.get(id_field, "")
        if not call_id:
            return xml_response(failure(f"missing {id_field}"))
        query = formats.query_values(request.url.query)
        flow = query.get("flow") or "v2"
        template = query.get("template") or formats.default_template(provider)
        merchant = query.get("reseller_id", "")
        refusal = self.guard.merchant(scope, source, merchant)
        if refusal is not None:
            return refused(refusal)
        try:
            reply = await self.allocate(call_id, merchant, provider, flow, template)
        except BadInput:
            return xml_response(failure(f"invalid {id_field}"))
        except Unavailable as exc:
            return unavailable(exc)
        if reply.status == "allocated":
            return xml_response(stream(self.allocated_url(reply, provider, flow, template)))
        if reply.status == "expired":
            return unavailable(Unavailable("allocation not made in time"))
        if reply.status not in ("rejected", "invalid"):
            log.error("allocate answered %s: %s", reply.status, reply.error)
        return xml_response(failure("allocation failed"))

    async def allocate_twilio(self, request: Request) -> Response:
        return await self._webhook(
            request, "twilio", "CallSid", formats.twiml_stream, formats.twiml_failure
        )

    async def allocate_plivo(self, request: Request) -> Response:
        return await self._webhook(
            request, "plivo", "CallUUID", formats.plivo_stream, formats.plivo_failure
        )

    async def allocate_exotel(self, request: Request) -> Response:
        scope = request.scope
        source = self.guard.source_of(scope)
        refusal = self.guard.admit(scope, source)
        if refusal is not None:
            return refused(refusal)
        try:
            raw = await self.body(request)
            refusal = self.guard.verify(
                scope, source, "exotel", raw, request.headers.get("content-type", "")
            )
            if refusal is not None:
                return refused(refusal)
            body = formats.decode_json(raw, formats.ExotelBody)
            if not body.call_sid:
                raise BadInput("missing CallSid", "CallSid")
            refusal = self.guard.merchant(scope, source, body.reseller_id)
            if refusal is not None:
                return refused(refusal)
            flow = body.flow or "v2"
            template = body.template or formats.default_template("exotel")
            reply = await self.allocate(body.call_sid, body.reseller_id, "exotel", flow, template)
        except BadInput as exc:
            if exc.field == "call_sid":
                exc = BadInput("invalid CallSid", "CallSid")
            return bad_input(exc)
        except Unavailable as exc:
            return unavailable(exc)
        if reply.status == "allocated":
            return json_response(200, {"url": self.allocated_url(reply, "exotel", flow, template)})
        if reply.status == "expired":
            return unavailable(Unavailable("allocation not made in time"))
        return json_response(503, formats.error_doc("allocation failed"))

    async def release(self, request: Request) -> Response:
        try:
            body = formats.decode_json(await self.body(request), formats.ReleaseBody)
            if not body.call_sid:
                raise BadInput("call_sid is required", "call_sid")
            call_id = body.call_sid
            reply = await self.request(
                lambda: self.client.release(call_id, timeout_s=self.reply_wait_s)
            )
        except BadInput as exc:
            return bad_input(exc)
        except Unavailable as exc:
            return unavailable(exc)
        if reply.status == "not_found":
            return json_response(404, formats.error_doc("call not found"))
        if reply.status != "released" or reply.pod_id is None:
            log.error("release answered %s: %s", reply.status, reply.error)
            return json_response(500, formats.error_doc("release failed"))
        draining = reply.was_draining
        if draining is None:  # a worker older than the field: read the mark instead
            draining = await self.pools.is_draining(reply.pod_id)
        return json_response(
            200,
            {
                "success": True,
                "pod_name": reply.pod_id,
                "released_to_pool": "" if draining else self.pools.source_pool(reply.pool or ""),
                "was_draining": draining,
            },
        )

    async def drain(self, request: Request) -> Response:
        try:
            body = formats.decode_json(await self.body(request), formats.DrainBody)
            if not body.pod_name:
                raise BadInput("pod_name is required", "pod_name")
            pod = body.pod_name
            reply = await self.request(lambda: self.client.drain(pod, timeout_s=self.reply_wait_s))
        except BadInput as exc:
            return bad_input(exc)
        except Unavailable as exc:
            return unavailable(exc)
        if reply.status != "drained":
            # The anchor answered 500 for an unknown pod too (drainer.go:57-61).
            if reply.status != "not_found":
                log.error("drain answered %s: %s", reply.status, reply.error)
            return json_response(500, formats.error_doc("drain failed"))
        busy = await self.pools.has_calls(pod)
        state = "is draining with active call in progress. Will complete when call ends."
        return json_response(
            200,
            {
                "success": True,
                "pod_name": pod,
                "has_active_call": busy,
                "message": f"Pod {pod} " + (state if busy else "is draining. No active calls."),
            },
        )

    async def pod_info(self, request: Request) -> Response:
        pod = request.path_params["pod_name"]
        try:
            info = await self.pools.pod(pod)
        except Exception as exc:
            log.warning("pod lookup failed: %s", exc)
            return json_response(500, formats.error_doc("failed to get pod info"))
        if info is None:
            return json_response(404, formats.error_doc("pod not found"))
        return json_response(200, info)

    async def status(self, request: Request) -> Response:
        return json_response(200, await self.pools.status())

    async def health(self, request: Request) -> Response:
        return json_response(200, {"status": "ok"})

    async def ready(self, request: Request) -> Response:
        ok = False
        with anyio.move_on_after(PING_TIMEOUT_S):
            try:
                ok = bool(await self.redis.ping())
            except Exception as exc:  # any failure to answer is "not ready"
                log.debug("ready: Redis PING failed: %s", exc)
        if ok:
            return json_response(200, {"status": "ready"})
        return json_response(503, formats.error_doc("service unavailable"))

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(metrics.REGISTRY), 200, media_type=CONTENT_TYPE_LATEST)

    # --- the application -----------------------------------------------------------
    def routes(self) -> list[Route]:
        return [
            Route("/api/v1/allocate", self.allocate_json, methods=["POST"]),
            Route("/api/v1/twilio/allocate", self.allocate_twilio, methods=["POST"]),
            Route("/api/v1/plivo/allocate", self.allocate_plivo, methods=["POST"]),
            Route("/api/v1/exotel/allocate", self.allocate_exotel, methods=["POST"]),
            Route("/api/v1/release", self.release, methods=["POST"]),
            Route("/api/v1/drain", self.drain, methods=["POST"]),
            Route("/api/v1/pod/{pod_name}", self.pod_info, methods=["GET"]),
            Route("/api/v1/status", self.status, methods=["GET"]),
            Route("/api/v1/health", self.health, methods=["GET"]),
            Route("/api/v1/ready", self.ready, methods=["GET"]),
            Route("/api/v1/metrics", self.metrics, methods=["GET"]),
        ]

    def app(self) -> ASGIApp:
        """The ASGI application: the routes inside the request-id, metrics and log edge."""
        routes = self.routes()
        inner = Starlette(
            routes=routes,
            exception_handlers={
                HTTPException: _http_error,
                Exception: _internal_error,
            },
        )
        return Edge(inner, {route.endpoint: route.path for route in routes})


def _invalid(exc: InvalidMessage) -> BadInput:
    """A contract rule broken by the input, named by the anchor's field name."""
    text = str(exc)
    field = text.split(":", 1)[0].strip() if ":" in text else "body"
    name = _ANCHOR_NAMES.get(field, field)
    return BadInput(f"invalid {name}", name)


def _why_unavailable(exc: Exception) -> str:
    if isinstance(exc, RequestTimeout):
        return "no reply in time; retry: the same call id gets the same answer"
    if isinstance(exc, ClientClosed):
        return "gateway shutting down"
    return "Redis unavailable"


async def _http_error(request: Request, exc: Exception) -> Response:
    """Unknown path and wrong method as Go's mux answered them."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return Response(b"404 page not found\n", 404, media_type="text/plain; charset=utf-8")
    if exc.status_code == 405:
        return Response(b"", 405, headers=dict(exc.headers or {}))
    return json_response(exc.status_code, formats.error_doc(str(exc.detail)))


async def _internal_error(request: Request, exc: Exception) -> Response:
    """The anchor's recovery middleware: 500, JSON, no trailing newline."""
    return Response(b'{"error":"internal server error"}', 500, media_type=JSON)


class Edge:
    """Request id, metrics and the access log around every request (plain ASGI: cheap).

    The request id is the caller's ``X-Request-Id`` when it is a sane token,
    else a new one; it is logged and echoed in the response's header (the
    anchor only kept it in its context). Query strings are never logged: a
    webhook URL may carry a secret.
    """

    def __init__(self, app: ASGIApp, patterns: dict[Any, str]) -> None:
        self.app = app
        self.patterns = patterns
        # Metric children by (method, endpoint, status): ``labels()`` takes a lock each call.
        self._children: dict[tuple[str, Any, int], tuple[Counter, Histogram]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = _request_id(scope)
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", ()),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # Starlette already answered 500 (or the client went away); say why once.
            log.exception("gateway: request failed", extra={"request_id": request_id})
            if not started:
                await send_with_id(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [(b"content-type", JSON.encode())],
                    }
                )
                await send(
                    {"type": "http.response.body", "body": b'{"error":"internal server error"}'}
                )
        finally:
            elapsed = time.perf_counter() - start
            method = scope["method"]
            if method not in _METHODS:
                method = "OTHER"  # a client's made-up method must not grow the labels
            key = (method, scope.get("endpoint"), status)
            children = self._children.get(key)
            if children is None:
                labels = (method, self.patterns.get(key[1], "other"), str(status))
                children = (
                    metrics.http_requests.labels(*labels),
                    metrics.http_request_duration.labels(*labels),
                )
                self._children[key] = children
            children[0].inc()
            children[1].observe(elapsed)
            path = scope["path"]
            level = logging.DEBUG if path in QUIET_PATHS else logging.INFO
            if log.isEnabledFor(level):
                log.log(
                    level,
                    "%s %s %d",
                    method,
                    path,
                    status,
                    extra={
                        "request_id": request_id,
                        "remote_addr": _client(scope),
                        "user_agent": _header(scope, b"user-agent"),
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 3),
                    },
                )


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return ""


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else ""


def _request_id(scope: Scope) -> str:
    given = _header(scope, REQUEST_ID_HEADER.encode())
    if given and len(given) <= 128 and all(ch in _REQUEST_ID_OK for ch in given):
        return given
    return uuid.uuid4().hex
