"""``TIERPOOL_NAMESPACE=a,b,c tierpool worker``: one worker process per namespace.

The parent starts one child ``tierpool worker`` per namespace (its own
``TIERPOOL_NAMESPACE`` and ``METRICS_PORT``: the given port, then the next
ones in list order) and supervises them:

- SIGTERM / SIGINT is passed on to every child, which shuts down as usual
  (two-phase), and the parent exits when all have;
- when a child exits by itself, the parent stops the others and exits with
  that child's code, so the orchestrator (Kubernetes, systemd) restarts the
  whole set rather than leaving one namespace unserved.

Why processes and not one task group per namespace in one process: each
namespace then has its own group membership, config snapshot, leader
election, readiness and metrics (the metric registry is per process and
its series carry no namespace label), one namespace's stuck loop or crash
cannot stall another, and the namespaces use more than one core — which
is the point of spreading namespaces over the masters of a cluster.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from types import FrameType

from tierpool.core.keys import valid_namespace

log = logging.getLogger(__name__)

POLL_S = 0.2


def namespaces_of(raw: str | None) -> list[str]:
    """The namespaces of a comma-separated ``TIERPOOL_NAMESPACE`` (empty items dropped)."""
    return [part.strip() for part in (raw or "").split(",") if part.strip()]


def problem(names: Sequence[str]) -> str | None:
    """Why ``names`` cannot be served together, or None."""
    bad = [n for n in names if not valid_namespace(n)]
    if bad:
        return f"{', '.join(map(repr, bad))}: each must be 1-64 chars of [A-Za-z0-9._:-]"
    if len(set(names)) != len(names):
        return "a namespace is listed twice"
    return None


def run(
    names: Sequence[str],
    metrics_port: int,
    argv: Sequence[str],
    env: Mapping[str, str] = os.environ,
) -> int:
    """Run one child worker per namespace until they stop; the exit code to return."""
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    stopping = False

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for _name, child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for i, name in enumerate(names):
            child_env = {**env, "TIERPOOL_NAMESPACE": name, "METRICS_PORT": str(metrics_port + i)}
            cmd = [sys.executable, "-m", "tierpool.workers", *argv]
            children.append((name, subprocess.Popen(cmd, env=child_env)))
            log.info(
                "namespace %s: worker pid %d, metrics port %d",
                name,
                children[-1][1].pid,
                metrics_port + i,
            )
        code = 0
        while any(child.poll() is None for _name, child in children):
            for name, child in children:
                rc = child.poll()
                if rc is not None and not stopping:
                    log.error("namespace %s: worker exited with %d; stopping the others", name, rc)
                    code = rc or 1
                    stop(signal.SIGTERM, None)
            time.sleep(POLL_S)
        if not stopping:
            return code
        return code or max((child.returncode or 0 for _n, child in children), default=0)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for _name, child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
