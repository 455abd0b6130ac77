"""Logging that a fault repeating at full speed cannot turn into a flood.

A producer sending junk, or a client whose Redis is gone, meets the same
failure hundreds of times a second. Each site keeps one :class:`LogLimit`:
the first lines of a window are logged, the rest only counted, and the
count is said in one line when the next window opens, so the log keeps the
shape and the size of the trouble without its volume.
"""

from __future__ import annotations

import logging

from tierpool.core.clock import monotonic_s


class LogLimit:
    """At most ``per_window`` lines each ``window_s`` seconds; the rest counted.

    ``what`` names the lines in the summary: ``"12 more dead letters not logged"``.
    """

    def __init__(
        self, logger: logging.Logger, what: str, *, per_window: int = 10, window_s: float = 1.0
    ) -> None:
        self.logger = logger
        self.what = what
        self.per_window = per_window
        self.window_s = window_s
        self._window = -1
        self._used = 0
        self._dropped = 0

    def allow(self) -> bool:
        """Whether to log this occurrence (count it either way)."""
        window = int(monotonic_s() / self.window_s)
        if window != self._window:
            if self._dropped:
                self.logger.warning(
                    "%d more %s not logged in the last %gs",
                    self._dropped,
                    self.what,
                    self.window_s,
                )
            self._window, self._used, self._dropped = window, 0, 0
        self._used += 1
        if self._used > self.per_window:
            self._dropped += 1
            return False
        return True
