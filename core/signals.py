"""Two-phase stop on SIGTERM/SIGINT, for every long-running tierpool process.

The first signal asks for a graceful stop (finish what is in hand within a
grace period); a second one means the operator will not wait: stop now.
Workers and the gateway share this so both behave the same under a
supervisor (Kubernetes, compose, honcho) and at a terminal.
"""

from __future__ import annotations

import logging
import signal
from typing import Protocol

import anyio


class Stoppable(Protocol):
    """A process's main object: ``stop()`` gracefully, ``kill()`` now."""

    def stop(self) -> None: ...

    def kill(self) -> None: ...


async def stop_on_signals(target: Stoppable, logger: logging.Logger, doing: str) -> None:
    """Until cancelled: the first SIGTERM/SIGINT calls ``target.stop()`` (logged as
    ``doing``), any later one ``target.kill()``."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        count = 0
        async for signum in signals:
            count += 1
            name = signal.Signals(signum).name
            if count == 1:
                logger.info("%s received: %s", name, doing)
                target.stop()
            else:
                logger.warning("%s received again: stopping now", name)
                target.kill()
