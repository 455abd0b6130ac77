"""Wire messages: round trips, and every kind of bad input a producer can send.

Pure Python, no Redis. The rules are restated here literally (not imported
from ``schemas.fields``) so a loosened rule in the code fails a test.
"""

from __future__ import annotations

import json
import string
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tierpool.core.errors import InvalidMessage
from tierpool.schemas import (
    AllocateRequest,
    ConfigRequest,
    DrainRequest,
    MerchantPolicy,
    PodDeregister,
    PodEvent,
    PodHeartbeat,
    PodRegister,
    Reason,
    ReleaseRequest,
    Reply,
    Request,
    decode_pod_event,
    decode_reply,
    decode_request,
    encode,
    request_kind,
)

IDENT_CHARS = string.ascii_letters + string.digits + "._:-"
NAME_CHARS = string.ascii_letters + string.digits + "._-"
LABEL_KEY_CHARS = string.ascii_letters + string.digits + "._/:-"
MAX_INT = 2**53 - 1

# --- strategies --------------------------------------------------------------

idents = st.text(IDENT_CHARS, min_size=1, max_size=128)
names = st.text(NAME_CHARS, min_size=1, max_size=64)
pool_lists = st.lists(names, max_size=32, unique=True).map(tuple)
epoch_ms = st.integers(0, MAX_INT)
capabilities = st.integers(1, 5)
# Any text but U+FFFD (what redis-py makes of non-UTF-8 bytes) and surrogates.
clean_chars = st.characters(codec="utf-8", exclude_characters="\ufffd")
free_texts = st.text(clean_chars, max_size=256)
endpoints = st.builds(
    lambda scheme, host, path: f"{scheme}://{host}{path}",
    st.sampled_from(["http", "https", "ws", "wss", "HTTPS"]),
    st.text(string.ascii_lowercase + string.digits + ".-:", min_size=1, max_size=60),
    st.text(string.ascii_letters + string.digits + "/?=&%#.-_", max_size=100).map(
        lambda p: "/" + p
    ),
)
labels = st.dictionaries(
    st.text(LABEL_KEY_CHARS, min_size=1, max_size=128),
    st.text(clean_chars, max_size=256),
    max_size=64,
)
config_texts = st.dictionaries(
    st.text(max_size=10), st.integers() | st.text(max_size=10), max_size=5
).map(json.dumps)
policies = st.builds(
    MerchantPolicy,
    pool=st.none() | names,
    fallback=st.none() | pool_lists,
    zone=st.none() | st.sampled_from(["restricted", "any"]),
    min_capability=st.none() | capabilities,
)

allocates = st.builds(
    AllocateRequest,
    request_id=idents,
    deadline_ms=st.none() | epoch_ms,
    call_id=idents,
    merchant_id=st.none() | idents,
    chain=st.none() | pool_lists,
    zone=st.sampled_from(["restricted", "any"]),
    min_capability=st.none() | capabilities,
    tier_mode=st.sampled_from(["strict", "flexible"]),
    provider=st.none() | names,
    flow=st.none() | names,
    template=st.none() | names,
)
releases = st.builds(
    ReleaseRequest,
    request_id=idents,
    deadline_ms=st.none() | epoch_ms,
    call_id=idents,
    reason=st.none() | free_texts,
)
drains = st.builds(
    DrainRequest,
    request_id=idents,
    deadline_ms=st.none() | epoch_ms,
    pod_id=idents,
    action=st.sampled_from(["drain", "undrain"]),
    reason=st.none() | free_texts,
)
tier_configs = st.builds(
    ConfigRequest,
    request_id=idents,
    deadline_ms=st.none() | epoch_ms,
    config=config_texts,
    expected_version=st.none() | st.integers(0, MAX_INT),
    merchant_id=st.none() | idents,
)
policy_changes = st.builds(
    ConfigRequest,
    request_id=idents,
    deadline_ms=st.none() | epoch_ms,
    expected_version=st.none() | st.integers(0, MAX_INT),
    merchant_id=idents,
    merchant=policies,
)
policy_removals = st.builds(
    ConfigRequest,
    request_id=idents,
    merchant_id=idents,
    remove_merchant=st.just(True),
)
requests = allocates | releases | drains | tier_configs | policy_changes | policy_removals

pod_events = (
    st.builds(
        PodRegister,
        request_id=st.none() | idents,
        deadline_ms=st.none() | epoch_ms,
        pod_id=idents,
        endpoint=endpoints,
        zone=st.sampled_from(["restricted", "open"]),
        capability=capabilities,
        labels=labels,
    )
    | st.builds(
        PodHeartbeat,
        request_id=st.none() | idents,
        deadline_ms=st.none() | epoch_ms,
        pod_id=idents,
        calls=st.none() | st.lists(idents, max_size=40).map(tuple),
    )
    | st.builds(
        PodDeregister,
        request_id=st.none() | idents,
        deadline_ms=st.none() | epoch_ms,
        pod_id=idents,
    )
)

statuses = st.sampled_from(
    [
        "allocated",
        "rejected",
        "released",
        "not_found",
        "drained",
        "undrained",
        "applied",
        "conflict",
        "invalid",
        "expired",
        "registered",
        "alive",
        "unknown_pod",
        "deregistered",
    ]
)
replies = st.builds(
    Reply,
    request_id=idents,
    status=statuses,
    pod_id=st.none() | idents,
    pool=st.none() | names,
    endpoint=st.none() | endpoints,
    session_url=st.none() | st.text(),
    lease_expires_ms=st.none() | epoch_ms,
    existing=st.none() | st.booleans(),
    reasons=st.none()
    | st.lists(
        st.builds(Reason, filter=st.text(), detail=st.text(), suggested_action=st.text()),
        max_size=5,
    ).map(tuple),
    error=st.none() | st.text(),
    config_version=st.none() | st.integers(0, MAX_INT),
    calls=st.none() | st.lists(idents, max_size=10).map(tuple),
)


def allocate(**fields: str) -> dict[str, str]:
    """A valid allocate entry, with ``fields`` changed."""
    entry = {"request_id": "req-1", "call_id": "call-1"}
    entry.update(fields)
    return entry


def register(**fields: str) -> dict[str, str]:
    entry = {"event": "register", "pod_id": "pod-1", "endpoint": "http://10.0.0.7:8080"}
    entry.update(fields)
    return entry


def invalid(call: Any, *args: Any) -> InvalidMessage:
    """The InvalidMessage ``call(*args)`` raises."""
    with pytest.raises(InvalidMessage) as info:
        call(*args)
    return info.value


# --- round trips -------------------------------------------------------------


def assert_flat(entry: Mapping[str, Any]) -> None:
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in entry.items())


@given(requests)
@settings(max_examples=300)
def test_every_request_round_trips(msg: Request) -> None:
    entry = encode(msg)
    assert_flat(entry)
    assert decode_request(request_kind(msg), entry) == msg


@given(pod_events)
@settings(max_examples=200)
def test_every_pod_event_round_trips(msg: PodEvent) -> None:
    entry = encode(msg)
    assert_flat(entry)
    assert decode_pod_event(entry) == msg


@given(replies)
@settings(max_examples=200)
def test_every_reply_round_trips(msg: Reply) -> None:
    entry = encode(msg)
    assert_flat(entry)
    assert decode_reply(entry) == msg


def test_encode_writes_the_contract_forms() -> None:
    msg = AllocateRequest(request_id="r1", call_id="c1", chain=("gold", "silver"), min_capability=3)
    assert encode(msg) == {
        "request_id": "r1",
        "call_id": "c1",
        "chain": '["gold","silver"]',
        "zone": "any",
        "min_capability": "3",
        "tier_mode": "strict",
    }
    hb = encode(PodHeartbeat(pod_id="p1", calls=()))
    assert hb == {"event": "heartbeat", "pod_id": "p1", "calls": "[]"}
    assert encode(Reply(request_id="r1", status="allocated", existing=False))["existing"] == "0"
    assert encode(Reply(request_id="r1", status="allocated", existing=True))["existing"] == "1"
    removal = encode(ConfigRequest(request_id="r1", merchant_id="m1", remove_merchant=True))
    assert removal == {"request_id": "r1", "merchant_id": "m1", "merchant": ""}
    assert "remove_merchant" not in removal


def test_empty_deadline_is_none_and_zero_is_a_deadline() -> None:
    """Contract v1.1: only an absent or empty deadline_ms means "no deadline";
    ``0`` is a deadline long past, kept as 0 (the state layer expires it)."""
    for decode, entry in (
        (lambda e: decode_request("allocate", e), allocate()),
        (lambda e: decode_request("release", e), {"request_id": "r1", "call_id": "c1"}),
        (decode_pod_event, {"event": "heartbeat", "request_id": "r1", "pod_id": "p1"}),
    ):
        assert decode({**entry, "deadline_ms": ""}).deadline_ms is None
        assert decode({**entry, "deadline_ms": "0"}).deadline_ms == 0


def test_typical_allocate_decodes_with_defaults() -> None:
    msg = decode_request("allocate", allocate(chain='["gold", "silver"]', deadline_ms="17"))
    assert msg == AllocateRequest(
        request_id="req-1", call_id="call-1", chain=("gold", "silver"), deadline_ms=17
    )
    assert isinstance(msg, AllocateRequest)
    assert msg.zone == "any" and msg.tier_mode == "strict" and msg.merchant_id is None


def test_text_null_is_a_value_not_absence() -> None:
    """msgspec's lax mode reads "null" as None for optional ints; we never do."""
    msg = decode_request("allocate", allocate(merchant_id="null"))
    assert isinstance(msg, AllocateRequest) and msg.merchant_id == "null"
    for field in ("deadline_ms", "min_capability"):
        with pytest.raises(InvalidMessage, match=f"^{field}: must be"):
            decode_request("allocate", allocate(**{field: "null"}))


def test_unknown_fields_are_ignored() -> None:
    msg = decode_request("allocate", allocate(colour="blue", chain_v2="[[["))
    assert msg == AllocateRequest(request_id="req-1", call_id="call-1")


def test_remove_merchant_is_not_read_from_the_wire() -> None:
    """Only an empty ``merchant`` removes a policy; a stray field cannot."""
    entry = {"request_id": "r1", "config": "{}", "remove_merchant": "1"}
    msg = decode_request("config", entry)
    assert isinstance(msg, ConfigRequest)
    assert not msg.remove_merchant and not msg.is_merchant_change


def test_any_mapping_decodes() -> None:
    entry = MappingProxyType(allocate())
    assert decode_request("allocate", entry) == AllocateRequest(
        request_id="req-1", call_id="call-1"
    )


def test_heartbeat_tells_absent_calls_from_no_calls() -> None:
    absent = decode_pod_event({"event": "heartbeat", "pod_id": "p1"})
    empty = decode_pod_event({"event": "heartbeat", "pod_id": "p1", "calls": "[]"})
    assert isinstance(absent, PodHeartbeat) and isinstance(empty, PodHeartbeat)
    assert absent.calls is None
    assert empty.calls == ()


def test_register_defaults() -> None:
    msg = decode_pod_event(register())
    assert msg == PodRegister(pod_id="pod-1", endpoint="http://10.0.0.7:8080")
    assert isinstance(msg, PodRegister)
    assert (msg.zone, msg.capability, msg.labels, msg.request_id) == ("open", 1, {}, None)


def test_merchant_policy_set_and_remove() -> None:
    base = {"request_id": "r1", "merchant_id": "m1"}
    msg = decode_request("config", {**base, "merchant": '{"pool": "vip", "zone": "restricted"}'})
    assert isinstance(msg, ConfigRequest) and msg.is_merchant_change
    assert msg.merchant == MerchantPolicy(pool="vip", zone="restricted")
    assert not msg.remove_merchant
    removed = decode_request("config", {**base, "merchant": ""})
    assert isinstance(removed, ConfigRequest)
    assert removed.remove_merchant and removed.merchant is None and removed.is_merchant_change
    # "{}" is a policy with nothing set, not a removal: the two have different wire forms.
    empty = decode_request("config", {**base, "merchant": "{}"})
    assert isinstance(empty, ConfigRequest)
    assert empty.merchant == MerchantPolicy() and not empty.remove_merchant


def test_config_text_is_kept_verbatim() -> None:
    text = '{"pools": {"gold": {"max_concurrent": 1}}, "version": 3}'
    msg = decode_request("config", {"request_id": "r1", "config": text, "expected_version": "2"})
    assert isinstance(msg, ConfigRequest)
    assert (msg.config, msg.expected_version) == (text, 2)


def test_unknown_kind_is_a_caller_bug() -> None:
    with pytest.raises(ValueError, match="unknown request kind"):
        decode_request("bogus", allocate())  # type: ignore[arg-type]


def test_encode_refuses_non_messages() -> None:
    with pytest.raises(TypeError):
        encode(MerchantPolicy())  # type: ignore[arg-type]


# --- bad input ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (allocate(call_id=""), "call_id: must be 1-128 chars of [A-Za-z0-9._:-], got ''"),
        ({"request_id": "r1"}, "call_id: required field is missing"),
        (allocate(min_capability="9"), "min_capability: must be an integer from 1 to 5, got '9'"),
        (allocate(min_capability="0"), "min_capability: must be an integer from 1 to 5, got '0'"),
        (allocate(min_capability="abc"), "min_capability: must be an integer from 1 to 5"),
        (allocate(min_capability="3.0"), "min_capability: must be an integer from 1 to 5"),
        (allocate(min_capability=" 3"), "min_capability: must be an integer from 1 to 5"),
        (allocate(deadline_ms="null"), "deadline_ms: must be a non-negative integer"),
        (allocate(deadline_ms="1e12"), "deadline_ms: must be a non-negative integer"),
        (allocate(deadline_ms="-1"), "deadline_ms: must be a non-negative integer"),
        (allocate(deadline_ms=str(2**53)), "deadline_ms: must be a non-negative integer"),
        (allocate(zone="open"), "zone: must be one of 'restricted', 'any', got 'open'"),
        (allocate(tier_mode="STRICT"), "tier_mode: must be one of 'strict', 'flexible'"),
        (allocate(call_id="a b"), "call_id: must be 1-128 chars of [A-Za-z0-9._:-], got 'a b'"),
        (allocate(call_id="c1\n"), "call_id: must be 1-128 chars"),
        (allocate(call_id="x" * 129), "call_id: must be 1-128 chars"),
        (allocate(merchant_id="m{1}"), "merchant_id: must be 1-128 chars"),
        (allocate(provider="a:b"), "provider: must be 1-64 chars of [A-Za-z0-9._-]"),
        (allocate(template="t" * 65), "template: must be 1-64 chars of [A-Za-z0-9._-]"),
        (allocate(chain="["), "chain: not valid JSON"),
        (allocate(chain="gold,silver"), "chain: not valid JSON"),
        (allocate(chain='"gold"'), "chain: must be a JSON list of at most 32 distinct pool names"),
        (allocate(chain="null"), "chain: must be a JSON list"),
        (allocate(chain='["gold", 7]'), "chain[1]: must be 1-64 chars of [A-Za-z0-9._-], got 7"),
        (allocate(chain='["gold", "a:b"]'), "chain[1]: must be 1-64 chars"),
        (allocate(chain=json.dumps([f"p{i}" for i in range(33)])), "chain: must be a JSON list"),
        (allocate(chain='["gold", "silver", "gold"]'), "chain: must not name a pool twice"),
    ],
)
def test_bad_allocate_names_the_field(entry: dict[str, str], expected: str) -> None:
    err = invalid(decode_request, "allocate", entry)
    assert expected in err.error
    assert err.request_id == entry["request_id"]


def test_every_bad_field_is_reported_at_once() -> None:
    err = invalid(decode_request, "allocate", {"request_id": "r1", "zone": "x", "flow": ""})
    for field in ("call_id: required", "zone: must be", "flow: must be"):
        assert field in err.error


@pytest.mark.parametrize(
    ("kind", "entry", "expected"),
    [
        ("release", {"request_id": "r1"}, "call_id: required field is missing"),
        ("release", {"request_id": "r1", "call_id": "c", "reason": "x" * 257}, "reason: must be"),
        ("drain", {"request_id": "r1"}, "pod_id: required field is missing"),
        ("drain", {"request_id": "r1", "pod_id": "p", "action": "stop"}, "action: must be one of"),
        ("config", {"request_id": "r1"}, "config: required field is missing"),
        ("config", {"request_id": "r1", "config": ""}, "config: must be the text of a JSON object"),
        ("config", {"request_id": "r1", "config": "{"}, "config: not valid JSON"),
        ("config", {"request_id": "r1", "config": "[1, 2]"}, "JSON object, got a JSON list"),
        ("config", {"request_id": "r1", "config": "null"}, "JSON object, got a JSON null"),
        ("config", {"request_id": "r1", "config": "{}", "expected_version": "-1"}, "expected_ver"),
        (
            "config",
            {"request_id": "r1", "merchant": '{"pool": "p"}'},
            "merchant: needs merchant_id",
        ),
        ("config", {"request_id": "r1", "merchant": ""}, "merchant: needs merchant_id"),
        (
            "config",
            {"request_id": "r1", "merchant_id": "m", "merchant": "{}", "config": "{}"},
            "config: cannot come with merchant",
        ),
        (
            "config",
            {"request_id": "r1", "merchant_id": "m", "merchant": "{"},
            "merchant: not valid",
        ),
        ("config", {"request_id": "r1", "merchant_id": "m", "merchant": "[]"}, "merchant: must be"),
        (
            "config",
            {"request_id": "r1", "merchant_id": "m", "merchant": '{"min_capability": 9}'},
            "merchant.min_capability: must be an integer from 1 to 5, got 9",
        ),
        (
            "config",
            {"request_id": "r1", "merchant_id": "m", "merchant": '{"min_capability": "3"}'},
            "merchant.min_capability: must be an integer from 1 to 5, got '3'",
        ),
        (
            "config",
            {"request_id": "r1", "merchant_id": "m", "merchant": '{"zone": "open"}'},
            "merchant.zone: must be one of 'restricted', 'any'",
        ),
        (
            "config",
            {"request_id": "r1", "merchant_id": "m", "merchant": '{"fallback": ["a", "a"]}'},
            "merchant.fallback: must not name a pool twice",
        ),
    ],
)
def test_bad_request_names_the_field(kind: Any, entry: dict[str, str], expected: str) -> None:
    err = invalid(decode_request, kind, entry)
    assert expected in err.error
    assert err.request_id == "r1"


def test_unknown_policy_key_is_named_but_its_value_never_shown() -> None:
    """Guards the promise that no secret reaches a policy, or an error message."""
    entry = {
        "request_id": "r1",
        "merchant_id": "m1",
        "merchant": '{"pool": "vip", "api_key": "sk_live_SECRET"}',
    }
    err = invalid(decode_request, "config", entry)
    assert "merchant: unknown key 'api_key'" in err.error
    assert "SECRET" not in err.error
    assert err.request_id == "r1"


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"pod_id": "p1"}, "event: required field is missing"),
        ({"event": "reboot", "pod_id": "p1"}, "event: must be one of 'register', 'heartbeat'"),
        ({"event": "REGISTER", "pod_id": "p1"}, "event: must be one of"),
        ({"event": "deregister"}, "pod_id: required field is missing"),
        ({"event": "register", "pod_id": "p1"}, "endpoint: required field is missing"),
        (register(endpoint="ftp://x"), "endpoint: must be a URL of at most 512 chars"),
        (register(endpoint="http://"), "endpoint: must be a URL"),
        (register(endpoint="http://a b"), "endpoint: must be a URL"),
        (register(endpoint="http://a\n"), "endpoint: must be a URL"),
        (register(endpoint="http://" + "a" * 506), "endpoint: must be a URL"),
        (register(zone="any"), "zone: must be one of 'restricted', 'open'"),
        (register(capability="6"), "capability: must be an integer from 1 to 5, got '6'"),
        (register(labels="{"), "labels: not valid JSON"),
        (register(labels='["a"]'), "labels: must be a JSON object of at most 64 string labels"),
        (register(labels='{"a": 1}'), "labels['a']: must be a string of at most 256 chars, got 1"),
        (register(labels='{"a b": "c"}'), "labels key: must be 1-128 chars"),
        (register(labels=json.dumps({f"k{i}": "v" for i in range(65)})), "labels: must be a JSON"),
        ({"event": "heartbeat", "pod_id": "p1", "calls": "c1 c2"}, "calls: not valid JSON"),
        ({"event": "heartbeat", "pod_id": "p1", "calls": '["c1", "c 2"]'}, "calls[1]: must be"),
        ({"event": "heartbeat", "pod_id": "p1", "calls": "{}"}, "calls: must be a JSON list"),
    ],
)
def test_bad_pod_event_names_the_field(entry: dict[str, str], expected: str) -> None:
    err = invalid(decode_pod_event, entry)
    assert expected in err.error
    assert err.request_id is None


def test_pod_event_request_id_is_optional_but_checked() -> None:
    err = invalid(decode_pod_event, register(request_id="r 1"))
    assert err.error.startswith("request_id: must be 1-128 chars of [A-Za-z0-9._:-]")
    assert err.request_id is None
    err = invalid(decode_pod_event, register(request_id="r1", capability="9"))
    assert err.request_id == "r1"


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"request_id": "r1"}, "status: required field is missing"),
        ({"request_id": "r1", "status": "ok"}, "status: must be one of 'allocated'"),
        ({"request_id": "r1", "status": "allocated", "existing": "true"}, "existing: must be"),
        ({"request_id": "r1", "status": "allocated", "lease_expires_ms": "x"}, "lease_expires_ms"),
        ({"request_id": "r1", "status": "rejected", "reasons": '[{"filter": "zone"}]'}, "detail"),
        ({"request_id": "r1", "status": "deregistered", "calls": "c1"}, "calls: not valid JSON"),
    ],
)
def test_bad_reply_names_the_field(entry: dict[str, str], expected: str) -> None:
    err = invalid(decode_reply, entry)
    assert expected in err.error


# --- size, junk, request id ----------------------------------------------------


def test_oversize_message_is_invalid() -> None:
    entry = allocate(**{f"pad{i}": "x" * 10_000 for i in range(7)})
    err = invalid(decode_request, "allocate", entry)
    assert err.error.startswith("message too large: ")
    assert err.error.endswith("bytes (limit 65536)")
    assert err.request_id == "req-1"


def test_oversize_value_is_invalid_even_in_an_unknown_field() -> None:
    err = invalid(decode_request, "allocate", allocate(junk="x" * 16_385))
    assert err.error == "junk: value too large: 16385 bytes (limit 16384)"


def test_size_limits_count_utf8_bytes_not_characters() -> None:
    """6000 euro signs are 18000 bytes: over the 16 KiB value limit."""
    err = invalid(decode_request, "release", {"request_id": "r1", "call_id": "c", "x": "€" * 6000})
    assert err.error == "x: value too large: 18000 bytes (limit 16384)"
    # Just under both limits: fine, whatever the field holds.
    ok = decode_request("release", {"request_id": "r1", "call_id": "c", "x": "€" * 5461})
    assert isinstance(ok, ReleaseRequest)


def test_a_config_may_exceed_the_field_limit_up_to_one_mib() -> None:
    """Issue 13 item 7: a tier config is a document; only ``config`` gets the larger limit."""
    pools = {f"pool-{i:04d}": {"type": "shared", "target": 1} for i in range(2_000)}
    text = json.dumps(pools)
    assert 16_384 < len(text) < 1 << 20
    msg = decode_request("config", {"request_id": "c1", "config": text})
    assert isinstance(msg, ConfigRequest) and msg.config == text
    err = invalid(decode_request, "config", {"request_id": "c1", "config": "{" + " " * (1 << 20)})
    assert err.error == f"config: value too large: {(1 << 20) + 1} bytes (limit {1 << 20})"
    err = invalid(decode_request, "config", {"request_id": "c1", "config": text, "x": "y" * 16_385})
    assert err.error == "x: value too large: 16385 bytes (limit 16384)"


def test_largest_heartbeat_under_the_limit_decodes() -> None:
    calls = [f"call-{i:07d}" for i in range(1000)]
    text = json.dumps(calls)
    assert len(text) < 16_384
    msg = decode_pod_event({"event": "heartbeat", "pod_id": "p1", "calls": text})
    assert isinstance(msg, PodHeartbeat) and msg.calls is not None and len(msg.calls) == 1000


@pytest.mark.parametrize(
    ("kind", "entry", "field"),
    [
        ("allocate", allocate(call_id="c\ufffd\ufffd1"), "call_id"),
        ("allocate", allocate(chain='["gold\ufffd"]'), "chain[0]"),
        ("release", {"request_id": "r1", "call_id": "c", "reason": "bad \ufffd"}, "reason"),
        ("config", {"request_id": "r1", "config": '{"a": "\ufffd"}'}, "config"),
    ],
)
def test_binary_junk_is_reported_as_not_utf8(kind: Any, entry: dict[str, str], field: str) -> None:
    err = invalid(decode_request, kind, entry)
    assert err.error.startswith(f"{field}: contains bytes that are not valid UTF-8")
    assert err.request_id == entry["request_id"]


def test_binary_junk_in_pod_event_labels() -> None:
    err = invalid(decode_pod_event, register(labels='{"a": "\ufffd"}'))
    assert "labels['a']: contains bytes that are not valid UTF-8" in err.error


@pytest.mark.parametrize(
    ("request_id", "usable"),
    [
        ("req-1", True),
        ("a.b:c_d-9", True),
        ("x" * 128, True),
        ("", False),
        ("x" * 129, False),
        ("req 1", False),
        ("req-1\n", False),
        ("req\ufffd", False),
        ("{req}", False),
    ],
)
def test_request_id_is_reported_only_when_valid(request_id: str, usable: bool) -> None:
    """The worker replies ``invalid`` to ``request_id``: it must be safe in a key."""
    err = invalid(decode_request, "allocate", allocate(request_id=request_id, zone="nowhere"))
    assert "zone: must be one of" in err.error
    assert err.request_id == (request_id if usable else None)
    assert err.error.startswith("request_id: ") is not usable


def test_missing_request_id() -> None:
    err = invalid(decode_request, "drain", {"pod_id": "p1"})
    assert err.error == "request_id: required field is missing"
    assert err.request_id is None


def test_long_junk_is_shown_shortened() -> None:
    err = invalid(decode_request, "allocate", allocate(call_id="é" * 5000))
    assert len(err.error) < 200


def test_endpoint_with_credentials_is_rejected() -> None:
    """An endpoint is echoed in every allocated reply: no user:pass@ may get in."""
    from tierpool.core.errors import InvalidMessage
    from tierpool.schemas import decode_pod_event

    ok = decode_pod_event(
        {"event": "register", "pod_id": "p1", "endpoint": "https://p1.internal:8443/path?x=a@b"}
    )
    assert ok.endpoint.startswith("https://p1.internal")  # type: ignore[union-attr]
    with pytest.raises(InvalidMessage) as err:
        decode_pod_event(
            {"event": "register", "pod_id": "p1", "endpoint": "https://user:secret@p1.internal"}
        )
    assert "endpoint" in err.value.error and "credentials" in err.value.error
