"""What a webhook must pass before it may take a pod: source, budget, signature.

Twilio, Plivo and Exotel reach the gateway over the internet, and every
accepted webhook takes a pod. The checks, in the order a request meets them
(cheapest first, so a flood costs little):

1. **source**: ``GATEWAY_ALLOW_FROM`` (CIDRs), when set, for every webhook;
2. **budget**: a token bucket per source address (``GATEWAY_SOURCE_RATE``),
   then, once the merchant is known, per merchant (``GATEWAY_MERCHANT_RATE``):
   429 with ``Retry-After`` before any allocation is tried;
3. **size**: bodies over ``GATEWAY_MAX_BODY_BYTES`` are refused unread;
4. **signature**: Twilio's ``X-Twilio-Signature`` (HMAC-SHA1 of the URL and
   the sorted POST parameters, or of the URL carrying ``bodySHA256`` for a
   JSON body), Plivo's ``X-Plivo-Signature-V3`` (HMAC-SHA256 of the URL, the
   sorted parameters and the nonce; any of a comma-separated list), and for
   Exotel, which signs nothing, HTTP basic auth (``EXOTEL_BASIC_AUTH``).

The algorithms are the providers' published ones, written here from their
documentation and checked against their documented test vectors (the tests),
so neither SDK is a runtime dependency. Tokens are only ever used as HMAC
keys: no log line or error carries them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Final
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from starlette.types import Scope

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Params = Mapping[str, Sequence[str]]

MAX_BUCKETS: Final = 100_000
"""Sources (or merchants) remembered at once; the least recently seen go first."""


# --- networks and the request's source ----------------------------------------------


def networks(items: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(x, strict=False) for x in items)


def _address(text: str) -> Address | None:
    try:
        return ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None


def in_networks(address: Address | None, nets: Sequence[Network]) -> bool:
    return address is not None and any(address in net for net in nets)


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of header ``name`` (lower case), or None."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def peer(scope: Scope) -> Address | None:
    client = scope.get("client")
    return _address(client[0]) if client else None


def source(scope: Scope, trusted: Sequence[Network]) -> Address | None:
    """Who sent the request: the peer, or, when the peer is a trusted proxy, the
    right-most ``X-Forwarded-For`` address that is not itself a trusted proxy.

    Reading from the right matters: a client may put anything on the left of
    the list, and only what our own proxies appended can be believed.
    """
    addr = peer(scope)
    if not in_networks(addr, trusted):
        return addr
    forwarded = header(scope, b"x-forwarded-for")
    if not forwarded:
        return addr
    for item in reversed(forwarded.split(",")):
        hop = _address(item)
        if hop is None:
            return addr  # a garbled list: trust only what we saw
        if not in_networks(hop, trusted):
            return hop
        addr = hop
    return addr


def public_url(scope: Scope, base: str | None, trusted: Sequence[Network]) -> str:
    """The URL the provider called, which is what it signed.

    ``base`` (``GATEWAY_PUBLIC_URL``: scheme, host and any prefix a proxy
    strips) plus the request's path and query, as received. Without it the
    URL is rebuilt from the request: its ``Host`` header, and the scheme
    ``http`` unless a trusted proxy says otherwise with ``X-Forwarded-Proto``
    (and ``X-Forwarded-Host``). A header from anyone else is ignored, so a
    client cannot make the gateway check a signature against a URL of its
    choosing.
    """
    raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
    tail = raw_path.decode("latin-1")
    query = scope.get("query_string", b"").decode("latin-1")
    if query:
        tail += "?" + query
    if base:
        return base + tail
    scheme = str(scope.get("scheme", "http"))
    host = header(scope, b"host") or ""
    if in_networks(peer(scope), trusted):
        proto = header(scope, b"x-forwarded-proto")
        if proto:
            scheme = proto.split(",")[0].strip().lower()
        fwd_host = header(scope, b"x-forwarded-host")
        if fwd_host:
            host = fwd_host.split(",")[0].strip()
    return f"{scheme}://{host}{tail}"


def form_params(body: bytes) -> dict[str, list[str]]:
    """Every value of every field of an urlencoded body (signatures need them all)."""
    out: dict[str, list[str]] = {}
    for key, value in parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True):
        out.setdefault(key, []).append(value)
    return out


# --- Twilio ---------------------------------------------------------------------------


def twilio_signature(token: str, url: str, params: Params) -> str:
    """``base64(HMAC-SHA1(token, url + name1 + value1 + ...))``: names sorted, and
    each name's distinct values sorted, as Twilio computes ``X-Twilio-Signature``."""
    text = url
    for name in sorted(params):
        for value in sorted(set(params[name])):
            text += name + value
    digest = hmac.new(token.encode(), text.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def _port_variants(url: str) -> tuple[str, str]:
    """``url`` without and with its port: Twilio has signed both ways."""
    parts = urlsplit(url)
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    host = hostport
    if hostport.startswith("["):
        end = hostport.find("]")
        host = hostport[: end + 1]
        has_port = hostport[end + 1 :].startswith(":")
    else:
        has_port = ":" in hostport
        host = hostport.split(":", 1)[0]
    port = parts.port if has_port else (443 if parts.scheme == "https" else 80)
    prefix = userinfo + at
    without = urlunsplit(parts._replace(netloc=prefix + host))
    with_port = urlunsplit(parts._replace(netloc=f"{prefix}{host}:{port}"))
    return without, with_port


def twilio_valid(token: str, url: str, params: Params, body: bytes, signature: str | None) -> bool:
    """Whether ``signature`` is Twilio's for this request.

    A form request signs the URL and its POST parameters; a request whose URL
    carries ``bodySHA256`` (a JSON body) signs the URL alone, and the body
    must hash to that value. The URL is tried without and with its port.
    """
    if not signature:
        return False
    query = dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))
    if "bodySHA256" in query:
        if not hmac.compare_digest(hashlib.sha256(body).hexdigest(), query["bodySHA256"]):
            return False
        params = {}
    given = signature.encode()
    return any(
        hmac.compare_digest(twilio_signature(token, variant, params).encode(), given)
        for variant in _port_variants(url)
    )


# --- Plivo ----------------------------------------------------------------------------


def plivo_signed_text(url: str, params: Params) -> str:
    """What Plivo's V3 signature covers for a POST, before ``.nonce`` is appended.

    The URL without its query, then ``?`` and the query parameters sorted
    (``k=v`` joined by ``&``); with POST parameters, a ``.`` after a non-empty
    query and the parameters sorted, each ``name + value``. A POST without
    parameters ends after the query (no ``?`` when there is none).
    """
    parts = urlsplit(url)
    text = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    query: dict[str, list[str]] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        query.setdefault(key, []).append(value)
    query_text = "&".join(
        "&".join(f"{name}={value}" for value in sorted(query[name])) for name in sorted(query)
    )
    if not params:
        return text + (f"?{query_text}" if query_text else "")
    text += "?" + query_text + ("." if query_text else "")
    for name in sorted(params):
        text += "".join(name + value for value in sorted(params[name]))
    return text


def plivo_signature(token: str, url: str, params: Params, nonce: str) -> str:
    payload = f"{plivo_signed_text(url, params)}.{nonce}".encode()
    return base64.b64encode(hmac.new(token.encode(), payload, hashlib.sha256).digest()).decode()


def plivo_valid(
    token: str, url: str, params: Params, nonce: str | None, header_value: str | None
) -> bool:
    """Whether any signature of the comma-separated ``X-Plivo-Signature-V3`` is Plivo's.

    Plivo sends one signature per active auth token of the account (during a
    token rotation, two), so a match with any of them is enough.
    """
    if not nonce or not header_value:
        return False
    expected = plivo_signature(token, url, params, nonce).encode()
    return any(
        hmac.compare_digest(expected, candidate.strip().encode())
        for candidate in header_value.split(",")
    )


# --- Exotel: basic auth ---------------------------------------------------------------


def basic_auth_valid(expected: str, authorization: str | None) -> bool:
    """Whether ``Authorization: Basic ...`` carries ``expected`` (``user:password``)."""
    if not authorization:
        return False
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        given = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    return hmac.compare_digest(given, expected.encode())


# --- budgets --------------------------------------------------------------------------


class Budget:
    """A token bucket per key: ``rate`` requests a second, ``burst`` at once.

    In the process's memory: each gateway replica keeps its own, so the limit
    a client meets is per replica. ``take`` answers 0 when the request may go
    on, else the seconds until it could (for ``Retry-After``).
    """

    def __init__(self, rate: float, burst: int, *, max_keys: int = MAX_BUCKETS) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, key: str, now: float | None = None) -> float:
        if not self.enabled:
            return 0.0
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            wait = 0.0
        else:
            self._buckets[key] = (tokens, now)
            wait = (1.0 - tokens) / self.rate
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait


def retry_after(wait_s: float) -> str:
    """``Retry-After`` in whole seconds, at least 1."""
    return str(max(1, math.ceil(wait_s)))
