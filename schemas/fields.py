"""Constrained field types shared by every wire message.

Each rule of CONTRACT.md lives here once, as an ``Annotated`` type whose
``Meta`` both validates (msgspec checks it while converting) and describes
(``description`` is the sentence an ``invalid`` reply shows the producer).
Keeping the two together means an error message can never drift from the
rule it reports.

Patterns are anchored with ``\\A`` and ``\\Z``: msgspec uses ``re.search``,
and ``$`` would let a trailing newline through, which would split a call id
stored in a space-separated Redis value.
"""

from __future__ import annotations

import re
from typing import Annotated, Final, Literal

from msgspec import Meta

MAX_MESSAGE_BYTES: Final = 65536
"""Largest stream entry accepted, keys plus values, UTF-8 bytes."""

MAX_VALUE_BYTES: Final = 16384
"""Largest single field value accepted, UTF-8 bytes."""

MAX_CONFIG_BYTES: Final = 1 << 20
"""Largest ``config`` value of a config request (a whole tier config), UTF-8 bytes.

A tier config is a document, not a request field: 200 pools already take
27 KB in canonical form, and the upstream source accepts a body of up to
this size, so it must be able to send what it fetched. 1 MiB bounds what one
config costs Redis (it is stored once, and each apply parses it) while
leaving room for any real fleet; only operators and the leader write the
config stream (see README, Security)."""

MAX_INT: Final = 2**53 - 1
"""Upper bound of every integer field: Lua numbers are doubles, exact up to here."""

MAX_POOLS_IN_LIST: Final = 32
MAX_LABELS: Final = 64

IDENT_PATTERN: Final = r"\A[A-Za-z0-9._:-]{1,128}\Z"
IDENT_RE: Final = re.compile(IDENT_PATTERN)
IDENT_RULE: Final = "1-128 chars of [A-Za-z0-9._:-]"

NAME_PATTERN: Final = r"\A[A-Za-z0-9._-]{1,64}\Z"
NAME_RE: Final = re.compile(NAME_PATTERN)
NAME_RULE: Final = "1-64 chars of [A-Za-z0-9._-]"

NAMESPACE_RE: Final = re.compile(r"\A[A-Za-z0-9._:-]{1,64}\Z")
NAMESPACE_RULE: Final = "1-64 chars of [A-Za-z0-9._:-]"
"""A namespace sits inside the ``tp:{NS}:`` hash tag of every key: no braces."""

# Free text may hold any character except U+FFFD (what redis-py puts where
# the bytes were not UTF-8: the producer's text is already lost) and lone
# surrogates (which cannot be encoded back for XADD).
_TEXT_CHARS: Final = r"[^\ufffd\ud800-\udfff]"

Ident = Annotated[str, Meta(pattern=IDENT_PATTERN, description=IDENT_RULE)]
"""request_id, call_id, pod_id, merchant_id: safe in keys and space-separated lists."""

Name = Annotated[str, Meta(pattern=NAME_PATTERN, description=NAME_RULE)]
"""Pool names and URL parts (provider, flow, template): no ':' so they nest in keys."""

PoolList = Annotated[
    tuple[Name, ...],
    Meta(
        max_length=MAX_POOLS_IN_LIST,
        description=(
            f"a JSON list of at most {MAX_POOLS_IN_LIST} distinct pool names, each {NAME_RULE}"
        ),
    ),
]
"""A fallback chain. Distinctness is checked after conversion (msgspec has no rule for it)."""

CallList = Annotated[
    tuple[Ident, ...], Meta(description=f"a JSON list of call ids, each {IDENT_RULE}")
]

Capability = Annotated[int, Meta(ge=1, le=5, description="an integer from 1 to 5")]

EpochMs = Annotated[
    int, Meta(ge=0, le=MAX_INT, description="a non-negative integer (epoch milliseconds)")
]

Version = Annotated[int, Meta(ge=0, le=MAX_INT, description="a non-negative integer")]

FreeText = Annotated[
    str,
    Meta(
        max_length=256,
        pattern=rf"\A{_TEXT_CHARS}*\Z",
        description="free text of at most 256 chars",
    ),
]

Endpoint = Annotated[
    str,
    Meta(
        max_length=512,
        # No "@" in the authority: an endpoint is echoed in every allocated
        # reply, so credentials (user:pass@host) must never get in.
        pattern=r"\A(?i:https?|wss?)://[^\s\x00-\x1f\x7f/?#@\ufffd\ud800-\udfff]+"
        r"(?:[/?#][^\s\x00-\x1f\x7f\ufffd\ud800-\udfff]*)?\Z",
        description="a URL of at most 512 chars with scheme http, https, ws or wss "
        "and no credentials",
    ),
]

LabelKey = Annotated[
    str, Meta(pattern=r"\A[A-Za-z0-9._/:-]{1,128}\Z", description="1-128 chars of [A-Za-z0-9._/:-]")
]
LabelValue = Annotated[
    str,
    Meta(
        max_length=256,
        pattern=rf"\A{_TEXT_CHARS}*\Z",
        description="a string of at most 256 chars",
    ),
]
Labels = Annotated[
    dict[LabelKey, LabelValue],
    Meta(
        max_length=MAX_LABELS,
        description=f"a JSON object of at most {MAX_LABELS} string labels",
    ),
]

ConfigText = Annotated[
    str, Meta(min_length=1, description="the text of a JSON object (a tier config)")
]
"""Kept as text: ``core.tierconfig`` parses it; here we only check it is a JSON object."""

RequestZone = Literal["restricted", "any"]
PodZone = Literal["restricted", "open"]
TierMode = Literal["strict", "flexible"]
DrainAction = Literal["drain", "undrain"]


def first_duplicate(names: tuple[str, ...]) -> str | None:
    """The first name that appears twice, or None. A pool tried twice is a producer bug."""
    if len(set(names)) == len(names):
        return None
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return None  # pragma: no cover - unreachable: the set was shorter
