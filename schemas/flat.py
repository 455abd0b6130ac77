"""Flat stream entries <-> Structs: one codec per message type.

A stream entry is a flat ``str -> str`` map. The fast path decodes the few
JSON-valued fields, then hands the whole entry to one
``msgspec.convert(strict=False)`` call, which turns decimal strings into
ints and checks every ``Meta`` rule of the type. It raises nothing on a
good message.

Only when that fails does the slow path (``schemas.explain``) run: it walks
the fields one by one with the same types, so it finds *every* bad field and
words each problem with the rule's own ``description``. Both paths read the
rules from the Struct annotations, so they cannot disagree about what is
valid.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar, get_origin

import msgspec
from msgspec import Struct

from tierpool.schemas.errors import InvalidMessage
from tierpool.schemas.explain import (
    bad_value,
    describe,
    explain_value,
    is_struct,
    size_problem,
    strip_annotated,
    strip_none,
    usable_request_id,
)

T = TypeVar("T", bound=Struct)

_JSON_ENCODER = msgspec.json.Encoder()
_ANY_JSON = msgspec.json.Decoder()


class _Kind(enum.Enum):
    STR = "str"
    INT = "int"
    BOOL = "bool"
    JSON = "json"


@dataclass(frozen=True, slots=True)
class _Field:
    """One wire field of a message type, with everything both paths need."""

    attr: str
    wire: str
    type: Any
    required: bool
    kind: _Kind
    rule: str
    decoder: msgspec.json.Decoder[Any] | None


def _kind(tp: Any) -> _Kind:
    base = strip_annotated(strip_none(tp)[0])[0]
    if base is bool:
        return _Kind.BOOL
    if base is int:
        return _Kind.INT
    if base is str or get_origin(base) is Literal:
        return _Kind.STR
    return _Kind.JSON


def _explain_flat(f: _Field, raw: object) -> list[str]:
    """The problems of one raw field value: the slow path's per-field step."""
    if not isinstance(raw, str):
        return [bad_value(f.wire, f.rule, raw)]
    if f.kind is _Kind.JSON:
        try:
            value = _ANY_JSON.decode(raw)
        except msgspec.DecodeError as exc:
            return [f"{f.wire}: not valid JSON ({exc}); must be {f.rule}"]
        return explain_value(f.wire, strip_none(f.type)[0], value)
    if f.kind is _Kind.BOOL:
        return [] if raw in ("0", "1") else [bad_value(f.wire, f.rule, raw)]
    if f.kind is _Kind.INT and not (raw.isascii() and raw.isdigit()):
        return [bad_value(f.wire, f.rule, raw)]
    try:
        msgspec.convert(raw, f.type, strict=False)
    except msgspec.ValidationError:
        return [bad_value(f.wire, f.rule, raw)]
    return []


# --- the codec ---------------------------------------------------------------


class FlatCodec(Generic[T]):
    """Decodes and encodes one message type as a flat stream entry.

    Built once per type at import; all the reflection happens here so that
    ``decode`` does no more than the checks the message needs.
    ``not_on_wire`` names Struct fields derived from others (never read from
    an entry, never written); ``check`` adds rules that span fields;
    ``value_limits`` lets named fields exceed ``MAX_VALUE_BYTES``. A field
    in ``empty_is_absent`` that is present but empty reads as absent (the
    contract: an empty ``deadline_ms`` means no deadline, as a missing one).
    """

    def __init__(
        self,
        cls: type[T],
        *,
        not_on_wire: tuple[str, ...] = (),
        check: Callable[[T], list[str]] | None = None,
        value_limits: Mapping[str, int] | None = None,
        empty_is_absent: tuple[str, ...] = (),
    ) -> None:
        self.cls = cls
        self._empty_is_absent = empty_is_absent
        self._check = check
        self._value_limits = dict(value_limits or {})
        self._not_on_wire = not_on_wire
        config = cls.__struct_config__
        self._tag: tuple[str, str] | None = None
        if config.tag_field is not None and config.tag is not None:
            self._tag = (config.tag_field, str(config.tag))
        fields: list[_Field] = []
        for info in msgspec.structs.fields(cls):
            if info.name in not_on_wire:
                continue
            kind = _kind(info.type)
            decoder = None
            if kind is _Kind.JSON:
                # A Struct (the merchant policy) is decoded typed and strict:
                # lax mode would take "3" for an int inside JSON. Lists and maps
                # hold only strings (or objects of strings), where lax and strict
                # agree, so they are decoded untyped and checked once, by convert.
                base = strip_none(info.type)[0]
                decoder = msgspec.json.Decoder(base) if is_struct(base) else _ANY_JSON
            fields.append(
                _Field(
                    attr=info.name,
                    wire=info.encode_name,
                    type=info.type,
                    required=info.required,
                    kind=kind,
                    rule=describe(info.type),
                    decoder=decoder,
                )
            )
        self.fields = tuple(fields)
        self._int_wire = tuple(f.wire for f in fields if f.kind is _Kind.INT)
        self._bool_wire = tuple(f.wire for f in fields if f.kind is _Kind.BOOL)
        self._json = tuple((f.wire, f.decoder) for f in fields if f.decoder is not None)

    def decode(self, fields: Mapping[str, str]) -> T:
        """The message in ``fields``; raises InvalidMessage naming every bad field."""
        entry: dict[str, Any] = fields if type(fields) is dict else dict(fields)
        for name in self._empty_is_absent:
            if entry.get(name) == "":
                entry = {k: v for k, v in entry.items() if k != name}
        msg = self._fast(entry)
        if msg is None:
            raise InvalidMessage(
                "; ".join(self.problems(entry)) or f"not a valid {self.cls.__name__}",
                usable_request_id(entry),
            )
        if self._check is not None:
            problems = self._check(msg)
            if problems:
                raise InvalidMessage("; ".join(problems), usable_request_id(entry))
        return msg

    def _fast(self, entry: dict[str, Any]) -> T | None:
        """The message, or None when anything is off (the slow path then says what)."""
        if size_problem(entry, self._value_limits) is not None:
            return None
        # msgspec's lax mode also takes "5.0", "1e0" and "null" as integers
        # and "true" as a bool; the contract says decimal strings and "0"/"1".
        for name in self._int_wire:
            raw = entry.get(name)
            if raw is not None and not (type(raw) is str and raw.isascii() and raw.isdigit()):
                return None
        for name in self._bool_wire:
            raw = entry.get(name)
            if raw is not None and raw != "0" and raw != "1":
                return None
        if self._json or self._not_on_wire:
            entry = dict(entry)
            for name in self._not_on_wire:
                entry.pop(name, None)
            for name, decoder in self._json:
                raw = entry.get(name)
                if raw is not None:
                    try:
                        value = decoder.decode(raw)
                    except (msgspec.DecodeError, TypeError):
                        return None
                    if value is None:  # JSON null is not "absent": leave the field out
                        return None
                    entry[name] = value
        try:
            return msgspec.convert(entry, self.cls, strict=False)
        except msgspec.ValidationError:
            return None

    def problems(self, fields: Mapping[str, Any]) -> list[str]:
        """Every problem of the entry, worded for the producer (the slow path)."""
        too_large = size_problem(fields, self._value_limits)
        if too_large is not None:
            return [too_large]
        problems: list[str] = []
        if self._tag is not None:
            tag_field, tag = self._tag
            if tag_field in fields and fields[tag_field] != tag:
                problems.append(bad_value(tag_field, repr(tag), fields[tag_field]))
        for f in self.fields:
            raw = fields.get(f.wire)
            if raw is not None:
                problems += _explain_flat(f, raw)
            elif f.required:
                problems.append(f"{f.wire}: required field is missing")
        return problems

    def encode(self, msg: T) -> dict[str, str]:
        """The flat entry for ``msg``: None omitted, JSON for lists and maps, "0"/"1"."""
        out: dict[str, str] = {}
        if self._tag is not None:
            out[self._tag[0]] = self._tag[1]
        for f in self.fields:
            value = getattr(msg, f.attr)
            if value is None:
                continue
            if f.kind is _Kind.STR:
                out[f.wire] = value
            elif f.kind is _Kind.INT:
                out[f.wire] = str(value)
            elif f.kind is _Kind.BOOL:
                out[f.wire] = "1" if value else "0"
            else:
                out[f.wire] = _JSON_ENCODER.encode(value).decode()
        return out
