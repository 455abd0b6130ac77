"""The error a wire message raises, and the base of every tierpool error.

``schemas`` is the bottom layer (it imports nothing from ``core``), so the
base class lives here with the one error this layer raises;
``tierpool.core.errors`` re-exports both beside the errors of the layers above.
"""

from __future__ import annotations


class TierpoolError(Exception):
    """Base of every error tierpool raises on purpose."""


class InvalidMessage(TierpoolError):
    """Raised by ``schemas`` when a stream entry is not a valid message.

    ``request_id`` is the entry's request id when it was usable, so the
    worker can still send an ``invalid`` reply; ``error`` names the field.
    """

    def __init__(self, error: str, request_id: str | None = None) -> None:
        self.error = error
        self.request_id = request_id
        super().__init__(error)
