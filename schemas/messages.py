"""Decode stream entries into typed messages, and encode them back.

The edge of tierpool: everything past these functions may trust a message's
types and ranges. A bad entry raises ``InvalidMessage`` with a sentence
naming each bad field, and with the entry's request_id whenever that id is
itself valid, so the worker can still answer ``invalid`` (contract guarantee
4) instead of leaving the producer to time out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from tierpool.schemas.errors import InvalidMessage
from tierpool.schemas.explain import bad_value, size_problem, usable_request_id
from tierpool.schemas.fields import MAX_CONFIG_BYTES, first_duplicate
from tierpool.schemas.flat import FlatCodec
from tierpool.schemas.pods import (
    POD_EVENT_TYPES,
    PodDeregister,
    PodEvent,
    PodHeartbeat,
    PodRegister,
)
from tierpool.schemas.replies import Reply
from tierpool.schemas.requests import (
    AllocateRequest,
    ConfigRequest,
    DrainRequest,
    ReleaseRequest,
    Request,
    RequestKind,
)

_ANY_JSON = msgspec.json.Decoder()
_JSON_KINDS: dict[type, str] = {
    list: "list",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


def _allocate_problems(msg: AllocateRequest) -> list[str]:
    if msg.chain is not None:
        repeated = first_duplicate(msg.chain)
        if repeated is not None:
            return [f"chain: must not name a pool twice, got {repeated!r} twice"]
    return []


def _config_text_problem(text: str) -> str | None:
    """Why ``config`` is not the text of a JSON object, or None.

    Only the outer shape is checked here; ``core.tierconfig`` validates the
    content, and it gets a string it can rely on being an object.
    """
    if "\ufffd" in text:
        return "config: contains bytes that are not valid UTF-8"
    try:
        value = _ANY_JSON.decode(text)
    except msgspec.DecodeError as exc:
        return f"config: not valid JSON ({exc}); must be the text of a JSON object"
    if not isinstance(value, dict):
        kind = _JSON_KINDS.get(type(value), "value")
        return f"config: must be the text of a JSON object, got a JSON {kind}"
    return None


def _config_problems(msg: ConfigRequest) -> list[str]:
    problems: list[str] = []
    if msg.is_merchant_change:
        if msg.merchant_id is None:
            problems.append("merchant: needs merchant_id, the merchant whose policy it sets")
        if msg.config is not None:
            problems.append(
                "config: cannot come with merchant; send the tier config and the "
                "merchant policy as separate messages"
            )
        if msg.merchant is not None and msg.merchant.fallback is not None:
            repeated = first_duplicate(msg.merchant.fallback)
            if repeated is not None:
                problems.append(
                    f"merchant.fallback: must not name a pool twice, got {repeated!r} twice"
                )
    elif msg.config is None:
        problems.append(
            "config: required field is missing (a merchant policy change sends "
            "merchant_id and merchant instead)"
        )
    if msg.config is not None:
        text_problem = _config_text_problem(msg.config)
        if text_problem is not None:
            problems.append(text_problem)
    return problems


# Only an absent or empty deadline_ms means "no deadline"; 0 is long past (v1.1).
_NO_DEADLINE = ("deadline_ms",)
_ALLOCATE = FlatCodec(AllocateRequest, check=_allocate_problems, empty_is_absent=_NO_DEADLINE)
_RELEASE = FlatCodec(ReleaseRequest, empty_is_absent=_NO_DEADLINE)
_DRAIN = FlatCodec(DrainRequest, empty_is_absent=_NO_DEADLINE)
_CONFIG = FlatCodec(
    ConfigRequest,
    not_on_wire=("remove_merchant",),
    value_limits={"config": MAX_CONFIG_BYTES},  # a whole tier config, not a request field
    empty_is_absent=_NO_DEADLINE,
)
_REPLY = FlatCodec(Reply)
_POD_CODECS: dict[str, FlatCodec[Any]] = {
    tag: FlatCodec(cls, empty_is_absent=_NO_DEADLINE) for tag, cls in POD_EVENT_TYPES.items()
}
_REQUEST_CODECS: dict[str, FlatCodec[Any]] = {
    "allocate": _ALLOCATE,
    "release": _RELEASE,
    "drain": _DRAIN,
    "config": _CONFIG,
}
_CODECS: dict[type, FlatCodec[Any]] = {
    AllocateRequest: _ALLOCATE,
    ReleaseRequest: _RELEASE,
    DrainRequest: _DRAIN,
    ConfigRequest: _CONFIG,
    Reply: _REPLY,
    PodRegister: _POD_CODECS["register"],
    PodHeartbeat: _POD_CODECS["heartbeat"],
    PodDeregister: _POD_CODECS["deregister"],
}
_EVENT_RULE = "one of " + ", ".join(repr(tag) for tag in POD_EVENT_TYPES)


def decode_request(kind: RequestKind, fields: Mapping[str, str]) -> Request:
    """The request in an entry of the ``kind`` request stream.

    Raises InvalidMessage for a bad entry, and ValueError for an unknown
    ``kind`` (a bug in the caller, not in the message).
    """
    if kind == "config":
        return _decode_config(fields)
    codec = _REQUEST_CODECS.get(kind)
    if codec is None:
        raise ValueError(f"unknown request kind {kind!r}")
    if kind == "allocate" and "reseller_id" in fields:
        fields = _reseller_as_merchant(fields)
    msg: Request = codec.decode(fields)
    return msg


def _reseller_as_merchant(fields: Mapping[str, str]) -> Mapping[str, str]:
    """``reseller_id`` (the anchor's name) read as ``merchant_id`` (contract v1.1 alias).

    Without it a smart-router producer's merchant would be dropped as an
    unknown field and its policy would silently not apply. An empty one is
    no merchant, as in the anchor; one that contradicts ``merchant_id`` is
    a bad request rather than a guess.
    """
    reseller = fields["reseller_id"]
    rest = {k: v for k, v in fields.items() if k != "reseller_id"}
    merchant = fields.get("merchant_id")
    if not reseller:
        return rest
    if merchant is not None and merchant != reseller:
        raise InvalidMessage(
            f"merchant_id {merchant!r} and reseller_id {reseller!r} differ "
            "(reseller_id is an alias of merchant_id: send one)",
            usable_request_id(fields),
        )
    rest["merchant_id"] = reseller
    return rest


def _decode_config(fields: Mapping[str, str]) -> ConfigRequest:
    # An empty ``merchant`` means "remove the policy": it is not JSON, so it
    # is taken out before decoding and comes back as ``remove_merchant``.
    remove = fields.get("merchant") == ""
    if remove:
        fields = {k: v for k, v in fields.items() if k != "merchant"}
    msg = _CONFIG.decode(fields)
    if remove:
        msg = msgspec.structs.replace(msg, remove_merchant=True)
    problems = _config_problems(msg)
    if problems:
        raise InvalidMessage("; ".join(problems), msg.request_id)
    return msg


def decode_pod_event(fields: Mapping[str, str]) -> PodEvent:
    """The pod event in an entry of the pods stream, dispatched on ``event``."""
    event = fields.get("event")
    codec = _POD_CODECS.get(event) if isinstance(event, str) else None
    if codec is None:
        problem = size_problem(fields) or (
            "event: required field is missing"
            if event is None
            else bad_value("event", _EVENT_RULE, event)
        )
        raise InvalidMessage(problem, usable_request_id(fields))
    msg: PodEvent = codec.decode(fields)
    return msg


def decode_reply(fields: Mapping[str, str]) -> Reply:
    """The reply in a reply stream entry (written by a Lua script)."""
    return _REPLY.decode(fields)


def encode(msg: Request | PodEvent | Reply) -> dict[str, str]:
    """The flat stream entry of ``msg``, ready for XADD.

    The inverse of the decoders: ``decode_*(encode(m)) == m`` for every
    valid message. ``remove_merchant`` is written as an empty ``merchant``,
    which wins over a ``merchant`` policy set on the same message.
    """
    codec = _CODECS.get(type(msg))
    if codec is None:
        raise TypeError(f"not a tierpool wire message: {type(msg).__name__}")
    out = codec.encode(msg)
    if isinstance(msg, ConfigRequest) and msg.remove_merchant:
        out["merchant"] = ""
    return out


def request_kind(msg: Request) -> RequestKind:
    """The request stream ``msg`` goes on (``Keys.request_stream(kind)``)."""
    if isinstance(msg, AllocateRequest):
        return "allocate"
    if isinstance(msg, ReleaseRequest):
        return "release"
    if isinstance(msg, DrainRequest):
        return "drain"
    return "config"
