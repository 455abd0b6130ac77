"""The anchor's wire formats, byte for byte: Go's JSON, TwiML, Plivo XML, and its input quirks.

Clients of the smart-router parse its answers, and some compare them: the
gateway writes what Go's ``encoding/json`` and ``encoding/xml`` wrote
(``ANCHOR-HTTP-API.md`` §3-4), and reads bodies the way Go read them
(key names matched case-insensitively, only the first JSON value read,
unknown keys ignored). Nothing here does I/O.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any, Final, TypeVar
from urllib.parse import parse_qsl

import msgspec

from tierpool.core.placement import session_url_parts

# --- JSON out --------------------------------------------------------------------

_GO_JSON_ESCAPES: Final = (
    (b"<", b"\\u003c"),
    (b">", b"\\u003e"),
    (b"&", b"\\u0026"),
    ("\u2028".encode(), b"\\u2028"),
    ("\u2029".encode(), b"\\u2029"),
)


def go_json(doc: Mapping[str, Any]) -> bytes:
    """``doc`` as Go's ``json.Encoder`` wrote it: HTML-safe escapes and a trailing newline.

    Keys keep the order given: the caller orders them as the anchor did
    (sorted for a Go map, declaration order for a struct). msgspec never
    writes ``<``, ``>`` or ``&`` outside a string, so replacing the bytes is safe.
    """
    out = msgspec.json.encode(doc)
    for raw, escaped in _GO_JSON_ESCAPES:
        if raw in out:
            out = out.replace(raw, escaped)
    return out + b"\n"


def error_doc(message: str, field: str | None = None) -> dict[str, str]:
    """The anchor's ``{"error": message}``, plus ``field`` naming the input at fault.

    ``field`` is ours: the anchor's ``error`` text is kept as it was, so a
    client that matches it still does, and the extra key (sorted after
    ``error``, as Go would write a map) tells a person which input to fix.
    """
    return {"error": message} if field is None else {"error": message, "field": field}


# --- XML out ---------------------------------------------------------------------

_XML_ESCAPES: Final = str.maketrans(
    {
        '"': "&#34;",
        "'": "&#39;",
        "&": "&amp;",
        "<": "&lt;",
        ">": "&gt;",
        "\t": "&#x9;",
        "\n": "&#xA;",
        "\r": "&#xD;",
    }
)
_HTML_ESCAPES: Final = str.maketrans(
    {"<": "&lt;", ">": "&gt;", "&": "&amp;", "'": "&#39;", '"': "&#34;"}
)


def xml_escape(text: str) -> str:
    """Go's ``encoding/xml`` escaping of text and attribute values."""
    return text.translate(_XML_ESCAPES)


def twiml_stream(ws_url: str) -> bytes:
    """Twilio's answer: connect the call's media to ``ws_url`` (no declaration, no newline)."""
    return (
        f'<Response><Connect><Stream url="{xml_escape(ws_url)}"></Stream></Connect></Response>'
    ).encode()


def plivo_stream(ws_url: str) -> bytes:
    """Plivo's answer: a two-way mu-law stream to ``ws_url``, attributes in the anchor's order."""
    return (
        '<Response><Stream bidirectional="true" keepCallAlive="true" '
        f'contentType="audio/x-mulaw;rate=8000">{xml_escape(ws_url)}</Stream></Response>'
    ).encode()


def _spoken_failure(verb: str, message: str) -> bytes:
    text = message.translate(_HTML_ESCAPES)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Response>\n'
        f"    <{verb}>{text}</{verb}>\n    <Hangup/>\n</Response>"
    ).encode()


def twiml_failure(message: str) -> bytes:
    """Twilio's failure answer (HTTP 200): say ``message``, hang up."""
    return _spoken_failure("Say", message)


def plivo_failure(message: str) -> bytes:
    """Plivo's failure answer (HTTP 200): speak ``message``, hang up."""
    return _spoken_failure("Speak", message)


# --- ws_url ----------------------------------------------------------------------


def ws_url(base: str, pod: str, provider: str, flow: str, template: str) -> str:
    """The anchor's ``ws_url``; empty parts take its defaults (twilio, v2, order-confirmation)."""
    prefix, suffix = session_url_parts(base, provider, flow, template)
    return prefix + pod + suffix


def default_template(provider: str) -> str:
    """The anchor's template default: ``template`` for Exotel, else ``order-confirmation``."""
    return "template" if provider == "exotel" else "order-confirmation"


# --- input -----------------------------------------------------------------------


class BadInput(Exception):
    """A request the anchor answered with 400: ``message`` is its text, ``field`` the input."""

    def __init__(self, message: str, field: str) -> None:
        self.message = message
        self.field = field
        super().__init__(f"{field}: {message}")


class AllocateBody(msgspec.Struct, kw_only=True):
    """``POST /api/v1/allocate`` (models.go AllocateRequest)."""

    call_sid: str = ""
    reseller_id: str = ""
    provider: str = ""
    flow: str = ""
    template: str = ""


class ExotelBody(msgspec.Struct, kw_only=True, rename={"call_sid": "CallSid"}):
    """``POST /api/v1/exotel/allocate``: Exotel's passthru JSON."""

    call_sid: str = ""
    reseller_id: str = ""
    flow: str = ""
    template: str = ""


class ReleaseBody(msgspec.Struct, kw_only=True):
    call_sid: str = ""


class DrainBody(msgspec.Struct, kw_only=True):
    pod_name: str = ""


_json_any: Final = msgspec.json.Decoder()
_first_value: Final = json.JSONDecoder()


def _first_json_value(body: bytes) -> Any:
    """The first JSON value of ``body``, trailing bytes ignored, as Go's ``Decoder.Decode``."""
    try:
        return _json_any.decode(body)
    except msgspec.DecodeError:
        pass
    try:
        text = body.decode()
        start = len(text) - len(text.lstrip(" \t\r\n"))
        value, _end = _first_value.raw_decode(text, start)
    except (UnicodeDecodeError, ValueError):
        raise BadInput("invalid request body", "body") from None
    return value


T = TypeVar("T", bound=msgspec.Struct)


def decode_json(body: bytes, kind: type[T]) -> T:
    """Read ``body`` into ``kind`` as Go's ``encoding/json`` would.

    Empty, malformed or wrongly typed input raises :class:`BadInput` with the
    anchor's ``invalid request body`` and the field at fault; ``null`` is an
    empty request (its required field is then reported missing).
    """
    doc = _first_json_value(body)
    if doc is None:
        return kind()
    if not isinstance(doc, dict):
        raise BadInput("invalid request body", "body")
    wire, folded = _names(kind)
    picked: dict[str, Any] = {}
    for key, value in doc.items():
        # Go prefers an exact match, then takes a case-insensitive one.
        name = wire.get(key) or folded.get(key.lower())
        if name is not None and (name == key or name not in picked):
            picked[name] = value
    try:
        return msgspec.convert(picked, kind)
    except msgspec.ValidationError as exc:
        raise BadInput("invalid request body", _field_of(exc, kind)) from None


@functools.cache
def _names(kind: type[msgspec.Struct]) -> tuple[dict[str, str], dict[str, str]]:
    """A body's wire names, and the same by lower case (reading the fields costs a compile)."""
    wire = {f.encode_name: f.encode_name for f in msgspec.structs.fields(kind)}
    return wire, {name.lower(): name for name in wire}


def _field_of(exc: msgspec.ValidationError, kind: type[msgspec.Struct]) -> str:
    """The wire name in a msgspec error (``... - at `$.call_sid` ``), else ``body``."""
    text = str(exc)
    for name in _names(kind)[0]:
        if f"$.{name}`" in text:
            return name
    return "body"


def form_values(body: bytes, content_type: str, query: str) -> dict[str, str]:
    """Go's ``FormValue`` source: the urlencoded body's fields first, then the query's.

    Only ``application/x-www-form-urlencoded`` bodies are read (what Twilio
    and Plivo send); malformed percent-escapes raise :class:`BadInput`.
    """
    values: dict[str, str] = {}
    try:
        if content_type.split(";", 1)[0].strip().lower() == "application/x-www-form-urlencoded":
            for key, value in parse_qsl(
                body.decode(), keep_blank_values=True, strict_parsing=False, errors="strict"
            ):
                values.setdefault(key, value)
        for key, value in parse_qsl(query, keep_blank_values=True, errors="strict"):
            values.setdefault(key, value)
    except (UnicodeDecodeError, ValueError):
        raise BadInput("invalid form data", "body") from None
    return values


def query_values(query: str) -> dict[str, str]:
    """The first value of each query parameter (Go's ``URL.Query().Get``)."""
    values: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        values.setdefault(key, value)
    return values
