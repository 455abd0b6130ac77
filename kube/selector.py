"""``POD_LABEL_SELECTOR`` text -> the label requirements lightkube sends.

lightkube builds the ``labelSelector`` query from (key, operator) pairs, so
the anchor's selector string is parsed once at start: a typo stops the
process with the variable named instead of every LIST answering 400. The
grammar is Kubernetes' set-based selector: ``k=v``, ``k==v``, ``k!=v``,
``k``, ``!k``, ``k in (a,b)``, ``k notin (a,b)``, joined by commas.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Final

from lightkube import operators

from tierpool.core.errors import SettingsError

Selector = dict[str, "str | operators.Operator[Any] | Iterable[Any] | None"]

_KEY: Final = r"(?:[a-z0-9](?:[-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?"
_VALUE: Final = r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_SET: Final = re.compile(rf"\s*({_KEY})\s+(in|notin)\s*\(([^)]*)\)\s*")
_BINARY: Final = re.compile(rf"\s*({_KEY})\s*(==|!=|=)\s*({_VALUE})\s*")
_UNARY: Final = re.compile(rf"\s*(!?)\s*({_KEY})\s*")
_FORMS: Final = " (k=v, k!=v, k in (a,b), k, !k)"
_VALUE_RE: Final = re.compile(rf"\A{_VALUE}\Z")


def parse_selector(text: str, *, env: str = "POD_LABEL_SELECTOR") -> Selector:
    """The requirements of a label selector, by key; raises SettingsError naming ``env``.

    A key may appear once (lightkube takes one operator per key).
    """
    out: list[tuple[str, operators.Operator[Any]]] = []
    for part in _split(text):
        if m := _SET.fullmatch(part):
            values = [v.strip() for v in m.group(3).split(",")]
            if not values or not all(v and _VALUE_RE.match(v) for v in values):
                raise SettingsError(env, text, f"bad value list in {part.strip()!r}")
            op = operators.in_(values) if m.group(2) == "in" else operators.not_in(values)
            out.append((m.group(1), op))
        elif m := _BINARY.fullmatch(part):
            key, sign, value = m.group(1), m.group(2), m.group(3)
            op2 = operators.not_equal(value) if sign == "!=" else operators.equal(value)
            out.append((key, op2))
        elif m := _UNARY.fullmatch(part):
            out.append((m.group(2), operators.not_exists() if m.group(1) else operators.exists()))
        else:
            raise SettingsError(env, text, f"{part.strip()!r} is not a label requirement" + _FORMS)
    if not out:
        raise SettingsError(env, text, "must hold at least one label requirement")
    keys = [k for k, _ in out]
    if len(set(keys)) != len(keys):
        raise SettingsError(env, text, "names a label key twice; write one requirement per key")
    return dict(out)


def _split(text: str) -> list[str]:
    """Split on the commas that are not inside a ``(...)`` value list."""
    parts: list[str] = []
    depth, start = 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p.strip()]
