"""Go-style durations: what the anchor's deployments set must mean the same here."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tierpool.core.durations import MAX_NS, format_duration, parse_duration, parse_duration_ns


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("15m", 900.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1h30m15s", 5415.0),
        ("1.5s", 1.5),
        ("1.5h", 5400.0),
        ("250us", 0.00025),
        ("250\u00b5s", 0.00025),  # micro sign
        ("250\u03bcs", 0.00025),  # Greek mu
        ("100ns", 1e-7),
        (".5s", 0.5),
        ("5.s", 5.0),
        ("0", 0.0),
        ("0s", 0.0),
        ("+2s", 2.0),
        (" 15m\n", 900.0),
    ],
)
def test_go_durations_parse(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds, rel=1e-12, abs=0)


@pytest.mark.parametrize(("text", "seconds"), [("30", 30.0), ("1", 1.0), ("3600", 3600.0)])
def test_a_bare_whole_number_means_seconds(text: str, seconds: float) -> None:
    """Guards anchor deployments that set ``CLEANUP_INTERVAL=30`` (Go would reject it)."""
    assert parse_duration(text) == seconds


def test_exact_nanoseconds_no_float_drift() -> None:
    assert parse_duration_ns("1.1s") == 1_100_000_000
    assert parse_duration_ns("1h0.000000001s") == 3_600_000_000_001
    assert parse_duration_ns("0.1s0.2s") == 300_000_000
    assert parse_duration_ns("1.9ns") == 1  # truncated below a nanosecond, as in Go


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "+",
        "abc",
        "1x",
        "s",
        "1h 30m",
        "1.5",  # a bare number must be whole
        "1e3s",
        "1H",
        "1S",
        "inf",
        "nan",
        "1,5s",
        "\u0663s",  # Arabic-Indic digit three: Python's \\d would take it, Go does not
        "1_000s",
        "1s-",
    ],
)
def test_garbage_is_rejected_with_what_a_valid_value_looks_like(text: str) -> None:
    with pytest.raises(ValueError, match=r"500ms, 30s, 15m or 1h30m") as info:
        parse_duration(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize("text", ["-1s", "-0", " -5m", "-1h30m", "--1s"])
def test_negative_is_rejected(text: str) -> None:
    with pytest.raises(ValueError, match=r"must not be negative; expected .* 30s") as info:
        parse_duration(text)
    assert repr(text) in str(info.value)


def test_longer_than_go_allows_is_rejected() -> None:
    assert parse_duration_ns("2562047h") < MAX_NS
    with pytest.raises(ValueError, match="maximum"):
        parse_duration("2562048h")
    with pytest.raises(ValueError, match="maximum"):
        parse_duration("9" * 40)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (900, "15m"),
        (3600, "1h"),
        (5400, "1h30m"),
        (90.5, "1m30.5s"),
        (1.5, "1.5s"),
        (0.5, "500ms"),
        (0.0015, "1.5ms"),
        (0.00025, "250us"),
        (3e-9, "3ns"),
        (86400, "24h"),
        (3601, "1h1s"),
        (-2, "-2s"),
    ],
)
def test_format(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_format_refuses_non_finite(value: float) -> None:
    with pytest.raises(ValueError):
        format_duration(value)


@given(st.integers(min_value=0, max_value=10**15))
def test_format_parses_back(ns: int) -> None:
    seconds = ns / 1e9
    assert parse_duration_ns(format_duration(seconds)) == round(seconds * 1e9)


@given(
    st.lists(
        st.tuples(st.integers(0, 10_000), st.sampled_from(["ns", "us", "ms", "s", "m", "h"])),
        min_size=1,
        max_size=5,
    )
)
def test_components_add_up(parts: list[tuple[int, str]]) -> None:
    scale = {"ns": 1, "us": 10**3, "ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}
    text = "".join(f"{n}{unit}" for n, unit in parts)
    assert parse_duration_ns(text) == sum(n * scale[unit] for n, unit in parts)
