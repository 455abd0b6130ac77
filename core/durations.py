"""Go-style durations (``500ms``, ``30s``, ``15m``, ``1h30m``) for settings and logs.

The anchor read its intervals and TTLs with Go's ``time.ParseDuration``, so an
existing deployment's ``LEASE_TTL=15m`` must mean the same here. Two
deliberate differences: a bare whole number means seconds (some anchor
deployments set ``CLEANUP_INTERVAL=30``, which Go would reject), and a
negative duration is an error, because no tierpool setting can use one.

Values are computed in whole nanoseconds, as Go does, so ``1.1s`` is exactly
1 100 000 000 ns and adding components never accumulates float error.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

_NS_PER_UNIT: dict[str, int] = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # micro sign, which Go accepts
    "\u03bcs": 1_000,  # Greek small letter mu, which Go accepts too
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}

# "ms" must be tried before "m" and "s"; the alternation order does that.
_COMPONENT = re.compile(r"([0-9]+\.?[0-9]*|\.[0-9]+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
_BARE_SECONDS = re.compile(r"[0-9]+")

MAX_NS = 2**63 - 1
"""Go's longest duration (about 292 years); longer values are refused as in Go."""

_EXPECTED = (
    "expected a number and a unit such as 500ms, 30s, 15m or 1h30m "
    "(units: ns, us, ms, s, m, h), or a whole number of seconds"
)


def parse_duration_ns(text: str) -> int:
    """Parse a Go-style duration into whole nanoseconds.

    Exact: callers that need milliseconds (Redis ``PX``, ``BLOCK``) convert
    from this integer instead of from a float. Surrounding whitespace is
    ignored (values often come from YAML); a leading ``+`` is accepted as in
    Go. Raises :class:`ValueError` saying what a valid value looks like.
    """
    stripped = text.strip()
    if stripped.startswith("-"):
        raise ValueError(f"invalid duration {text!r}: must not be negative; {_EXPECTED}")
    if stripped.startswith("+"):
        stripped = stripped[1:]
    if not stripped:
        raise ValueError(f"invalid duration {text!r}: empty; {_EXPECTED}")

    if _BARE_SECONDS.fullmatch(stripped):
        total = int(stripped) * _NS_PER_UNIT["s"]
    else:
        total = 0
        pos = 0
        while pos < len(stripped):
            match = _COMPONENT.match(stripped, pos)
            if match is None:
                raise ValueError(f"invalid duration {text!r}: {_EXPECTED}")
            number, unit = match.groups()
            # Go truncates below one nanosecond; int() of a Decimal does too.
            total += int(Decimal(number) * _NS_PER_UNIT[unit])
            pos = match.end()
            if total > MAX_NS:
                break
    if total > MAX_NS:
        raise ValueError(
            f"invalid duration {text!r}: longer than the maximum of about 292 years; {_EXPECTED}"
        )
    return total


def parse_duration(text: str) -> float:
    """Parse a Go-style duration into seconds (see :func:`parse_duration_ns`)."""
    return parse_duration_ns(text) / 1_000_000_000


def format_duration(seconds: float) -> str:
    """Render seconds compactly for logs and the CLI: ``15m``, ``1h30m``, ``1.5s``, ``500ms``.

    The result parses back with :func:`parse_duration` to the same value
    (rounded to the nanosecond). Unlike Go's ``String()``, zero components
    are left out (``15m``, not ``15m0s``) because operators read these.
    Negative values get a leading ``-`` (a lag or a clock skew in a log line)
    and do not parse back.
    """
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"cannot format {seconds!r} as a duration")
    ns = round(seconds * 1_000_000_000)
    if ns < 0:
        return "-" + _format_ns(-ns)
    return _format_ns(ns)


def _format_ns(ns: int) -> str:
    if ns == 0:
        return "0s"
    if ns < 1_000:
        return f"{ns}ns"
    if ns < 1_000_000:
        return _with_fraction(ns, 1_000, "us")
    if ns < 1_000_000_000:
        return _with_fraction(ns, 1_000_000, "ms")
    hours, rest = divmod(ns, _NS_PER_UNIT["h"])
    minutes, rest = divmod(rest, _NS_PER_UNIT["m"])
    parts = []
    if hours:
        parts.append(f"{hours}h")
    if minutes:
        parts.append(f"{minutes}m")
    if rest:
        parts.append(_with_fraction(rest, _NS_PER_UNIT["s"], "s"))
    return "".join(parts)


def _with_fraction(ns: int, per_unit: int, unit: str) -> str:
    """``ns`` in ``unit`` with only the decimals it needs (exact, no float)."""
    whole, frac = divmod(ns, per_unit)
    if not frac:
        return f"{whole}{unit}"
    digits = len(str(per_unit)) - 1
    return f"{whole}.{str(frac).rjust(digits, '0').rstrip('0')}{unit}"
