"""The one clock of tierpool's Python side.

Pool state uses the Redis server's clock (scripts call ``TIME`` when no
``now_ms`` is passed), so workers on machines with skewed clocks agree.
Python code that needs wall time (deadlines set by clients, log stamps)
calls :func:`now_ms` here, and tests move it with :func:`set_offset_ms`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

_offset_ms = 0


def now_ms() -> int:
    """Epoch milliseconds, shifted by the test offset."""
    return time.time_ns() // 1_000_000 + _offset_ms


def monotonic_s() -> float:
    """Seconds on a clock that never goes back: for timeouts and latencies."""
    return time.monotonic()


def set_offset_ms(offset: int) -> None:
    """Move the clock (tests only)."""
    global _offset_ms
    _offset_ms = offset


def redis_time_ms(reply: Sequence[str | bytes | int]) -> int:
    """Epoch ms from a Redis ``TIME`` reply (seconds, microseconds): the one clock
    of pool state, which scripts read the same way."""
    seconds, micros = reply[0], reply[1]
    return int(seconds) * 1000 + int(micros) // 1000
