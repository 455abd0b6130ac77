"""Start ``python -m tierpool.workers`` as a child process: one recipe for tests and the bench.

The child gets the caller's environment minus any ``TIERPOOL_*``,
``REDIS_URL`` and ``METRICS_PORT`` of its own (so a developer's shell cannot
leak into a test), then the given settings, and a free ``METRICS_PORT``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from tierpool.workers.redisproc import free_port

ROOT = Path(__file__).resolve().parent.parent


def spawn_worker(
    redis_url: str,
    namespace: str,
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    preexec_fn: Callable[[], object] | None = None,
) -> tuple[subprocess.Popen[bytes], int]:
    """The started worker (stdout and stderr to ``log_path``) and its metrics port.

    ``preexec_fn`` runs in the child before the worker starts (a test lowers
    ``RLIMIT_NOFILE`` there).
    """
    port = free_port()
    full = {
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith("TIERPOOL_") and k not in ("REDIS_URL", "METRICS_PORT")
        },
        **(env or {}),
        "REDIS_URL": redis_url,
        "TIERPOOL_NAMESPACE": namespace,
        "METRICS_PORT": str(port),
        "PYTHONUNBUFFERED": "1",
    }
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tierpool.workers", *args],
            env=full,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec_fn,
        )
    return proc, port
