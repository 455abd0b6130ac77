"""Describing types and wording problems: the slow path of decoding.

Runs only for a bad entry, so it favours clear sentences over speed: it
walks a value against its type piece by piece and says, for each bad piece,
"<field>: must be <rule>, got <value>", taking <rule> from the ``Meta``
``description`` that also enforces it (see ``schemas.fields``).
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import msgspec
from msgspec import Meta, Struct

from tierpool.schemas.fields import IDENT_RE, MAX_MESSAGE_BYTES, MAX_VALUE_BYTES

_SHOW_LIMIT = 60
# Below this many characters an entry cannot exceed either byte limit
# (UTF-8 takes at most 4 bytes a character), so counting bytes is skipped.
_SURELY_SMALL_CHARS = MAX_VALUE_BYTES // 4


# --- describing types --------------------------------------------------------


def strip_none(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> ``(X, True)``; anything else -> ``(tp, False)``."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) < len(get_args(tp)):
            return (args[0] if len(args) == 1 else Union[tuple(args)]), True  # noqa: UP007
    return tp, False


def strip_annotated(tp: Any) -> tuple[Any, str | None]:
    """``Annotated[X, Meta(description=d)]`` -> ``(X, d)``."""
    if get_origin(tp) is Annotated:
        base, *extras = get_args(tp)
        for extra in extras:
            if isinstance(extra, Meta) and extra.description:
                return base, extra.description
        return base, None
    return tp, None


def is_struct(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, Struct)


def describe(tp: Any) -> str:
    """The rule a value of type ``tp`` must follow, as the end of "must be ..."."""
    base, description = strip_annotated(strip_none(tp)[0])
    if description:
        return description
    if get_origin(base) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(base))
    if base is bool:
        return "'0' or '1'"
    if base is int:
        return "an integer"
    if base is str:
        return "a string"
    if is_struct(base):
        keys = ", ".join(f.encode_name for f in msgspec.structs.fields(base))
        return f"a JSON object with keys among {keys}"
    if get_origin(base) is tuple:
        return "a JSON list"
    if get_origin(base) is dict:
        return "a JSON object"
    return str(base)  # pragma: no cover - every field type is handled above


# --- wording problems --------------------------------------------------------


def _show(value: object) -> str:
    """A short repr: the value may be 16 KiB of junk, and ends up in logs."""
    text = repr(value)
    return text if len(text) <= _SHOW_LIMIT else text[: _SHOW_LIMIT - 3] + "..."


def bad_value(path: str, rule: str, value: object) -> str:
    """The sentence for one bad value: ``<path>: must be <rule>, got <value>``."""
    if isinstance(value, str) and "\ufffd" in value:
        # redis-py put U+FFFD where the bytes were not UTF-8: showing it helps nobody.
        return f"{path}: contains bytes that are not valid UTF-8; must be {rule}"
    return f"{path}: must be {rule}, got {_show(value)}"


def _label(key: object) -> str:
    """A field name fit to start an error sentence, even when the name is junk."""
    return key if isinstance(key, str) and IDENT_RE.match(key) else _show(key)


def usable_request_id(fields: Mapping[str, Any]) -> str | None:
    """The entry's request_id if it is valid, so an ``invalid`` reply can still go out."""
    rid = fields.get("request_id")
    return rid if isinstance(rid, str) and IDENT_RE.match(rid) else None


def _utf8_len(value: object) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    return len(value) if isinstance(value, bytes | bytearray) else len(str(value))


def size_problem(
    fields: Mapping[str, Any], value_limits: Mapping[str, int] | None = None
) -> str | None:
    """Why the entry is too large to process, or None.

    The limits bound the work and memory one producer can cost a worker
    (a 16 KiB call list, a 64 KiB entry), before any parsing happens.
    ``value_limits`` raises the limit of named fields (a config request's
    ``config``); the entry may then be larger by as much.
    """
    limits = value_limits or {}
    try:
        chars = len("".join(fields)) + len("".join(fields.values()))
    except TypeError:
        chars = _SURELY_SMALL_CHARS + 1  # a value without len(): count it the slow way
    if chars <= _SURELY_SMALL_CHARS:
        return None
    total = 0
    allowance = 0
    over: tuple[str, int, int] | None = None  # (key, size, limit) of the first value too large
    for key, value in fields.items():
        size = _utf8_len(value)
        limit = limits.get(key, MAX_VALUE_BYTES) if isinstance(key, str) else MAX_VALUE_BYTES
        if limit > MAX_VALUE_BYTES:
            allowance += min(size, limit)
        if size > limit and (over is None or size - limit > over[1] - over[2]):
            over = (key, size, limit)
        total += _utf8_len(key) + size
    if total > MAX_MESSAGE_BYTES + allowance:
        return f"message too large: {total} bytes (limit {MAX_MESSAGE_BYTES + allowance})"
    if over is not None:
        key, size, limit = over
        return f"{_label(key)}: value too large: {size} bytes (limit {limit})"
    return None


# --- finding every problem ---------------------------------------------------


def explain_value(path: str, tp: Any, value: object) -> list[str]:
    """Every problem of a JSON-decoded ``value`` against ``tp``, strictly.

    Lists report their first bad element by index and maps their first bad
    entry, which is what a producer needs to find it in a long list.
    """
    inner, optional = strip_none(tp)
    if value is None and optional:
        return []
    base = strip_annotated(inner)[0]
    if is_struct(base):
        if not isinstance(value, dict):
            return [bad_value(path, describe(tp), value)]
        return _explain_struct(path, base, value)
    args = get_args(base)
    if get_origin(base) is tuple and isinstance(value, list):
        for i, item in enumerate(value):
            problems = explain_value(f"{path}[{i}]", args[0], item)
            if problems:
                return problems
    elif get_origin(base) is dict and isinstance(value, dict):
        for key, item in value.items():
            problems = explain_value(f"{path} key", args[0], key) or explain_value(
                f"{path}[{_show(key)}]", args[1], item
            )
            if problems:
                return problems
    try:
        msgspec.convert(value, tp)
    except msgspec.ValidationError:
        return [bad_value(path, describe(tp), value)]
    return []


def _explain_struct(path: str, cls: type[Struct], value: dict[Any, Any]) -> list[str]:
    """Every problem of a JSON object against a Struct: unknown, missing and bad keys."""
    fields = msgspec.structs.fields(cls)
    names = [f.encode_name for f in fields]
    problems: list[str] = []
    if cls.__struct_config__.forbid_unknown_fields:
        # Name the key, never its value: an unknown key may well be a secret.
        problems += [
            f"{path}: unknown key {_show(key)} (allowed: {', '.join(names)})"
            for key in value
            if key not in names
        ]
    for f in fields:
        if f.encode_name in value:
            problems += explain_value(f"{path}.{f.encode_name}", f.type, value[f.encode_name])
        elif f.required:
            problems.append(f"{path}.{f.encode_name}: required key is missing")
    return problems
