"""The errors tierpool raises. One base class; each says who raises it and why.

``TierpoolError`` and ``InvalidMessage`` live in ``tierpool.schemas.errors``
(the bottom layer, which imports nothing from ``core``) and are re-exported here.
"""

from __future__ import annotations

from typing import TypeVar

from tierpool.schemas.errors import InvalidMessage, TierpoolError

__all__ = [
    "ClientClosed",
    "InvalidMessage",
    "RedisUnavailable",
    "RequestNotSent",
    "RequestTimeout",
    "SettingsError",
    "TierConfigError",
    "TierpoolError",
    "find_in_group",
]


class SettingsError(TierpoolError):
    """Raised at start by ``core.settings`` when an environment variable is bad.

    The message names the variable, so the operator knows what to fix.
    """

    def __init__(self, variable: str, value: str, problem: str) -> None:
        self.variable = variable
        self.value = value
        self.problem = problem
        super().__init__(f"{variable}={value!r}: {problem}")


class TierConfigError(TierpoolError):
    """Raised by ``core.tierconfig`` when a tier config is invalid.

    Carries every problem found, not just the first, so one round trip with
    the operator fixes them all.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid tier config: " + "; ".join(self.problems))


class RedisUnavailable(TierpoolError):
    """Raised when Redis cannot be reached after the retries a caller allows."""

    def __init__(self, what: str, cause: BaseException | None = None) -> None:
        self.what = what
        super().__init__(f"{what}: Redis unavailable ({cause!r})" if cause else what)


class RequestTimeout(TierpoolError):
    """Raised by the client when no reply arrived in time.

    The request may still have happened: check state before retrying with a
    new request id (the allocate call id is idempotent, so retrying it is safe).
    """

    def __init__(self, request_id: str, timeout_s: float) -> None:
        self.request_id = request_id
        self.timeout_s = timeout_s
        super().__init__(f"no reply to {request_id} within {timeout_s:.3g}s")


class ClientClosed(TierpoolError):
    """Raised by the client to a request still waiting when the client closes."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        super().__init__(f"client closed while {request_id} was waiting for its reply")


class RequestNotSent(RequestTimeout):
    """A RequestTimeout whose request was never sent: it certainly did not happen.

    Raised by the client when the timeout passed while the request was still
    queued (Redis unreachable, or the process too busy to send it); it will
    not be sent later. Catching RequestTimeout catches it too.
    """


E = TypeVar("E", bound=BaseException)


def find_in_group(exc: BaseException, kind: type[E]) -> E | None:
    """``exc`` itself, or the first exception of ``kind`` inside its nested groups.

    Task groups wrap what a task raised in an exception group; a command that
    promises a one-line error for a known failure must find it under that
    wrapping instead of printing the group's traceback.
    """
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = find_in_group(inner, kind)
            if found is not None:
                return found
    return None


class LeadershipLost(TierpoolError):
    """Raised by :class:`core.podsource.FencedPods` when the leader lease is not ours.

    A pod source's writes are fenced by the lease token: once another process
    holds the lease (or nobody does), nothing is written and the term must end.
    """

    def __init__(self, token: str, holder: str | None) -> None:
        self.token = token
        self.holder = holder
        super().__init__(f"leader lease is held by {holder or 'nobody'}, not {token}")


class ReplyMismatch(TierpoolError):
    """Raised by the client when the reply on its request's reply stream is not
    the answer to that request: another kind, another call or pod, another
    request id, or no ``kind`` at all.

    Either the request id was in use (the worker dead-lettered this request
    as ``request_id in use`` and the reply is the other request's), or
    someone with write access to reply keys forged or misrouted it. Nothing
    in it may be trusted; the request itself did not take effect in the
    first case, and may have in the second.
    """

    def __init__(self, request_id: str, problem: str) -> None:
        self.request_id = request_id
        self.problem = problem
        super().__init__(f"the reply to {request_id} is not this request's: {problem}")


REFUSAL_CODES = frozenset(
    {
        "OOM",  # used_memory over maxmemory with noeviction
        "READONLY",  # a replica (a demoted primary after a failover)
        "MISCONF",  # stop-writes-on-bgsave-error after a failed save
        "BUSY",  # a script or function runs past busy-reply-threshold
        "LOADING",  # loading its dataset after a restart
        "MASTERDOWN",  # a replica that lost its primary (replica-serve-stale-data no)
        "NOREPLICAS",  # min-replicas-to-write not met
        "TRYAGAIN",  # cluster: slot being migrated
        "CLUSTERDOWN",
        "UNBLOCKED",  # a blocked read ended because the primary became a replica
    }
)
"""Error codes with which Redis refuses work for its own reasons (guarantee 5)."""


def write_refusal(exc: BaseException) -> str | None:
    """Why Redis refused work, when ``exc`` is such a refusal; None otherwise.

    A refusal is Redis's state (out of memory, read-only, a failed save, a
    busy script), never the request's fault: the entry stays pending and is
    tried again once writes succeed, and is never dead-lettered for it.
    redis-py turns some codes into classes and strips the code from the
    message (``OOM`` -> ``OutOfMemoryError``); the others keep their code as
    the first word (``BUSYGROUP``, a bad request's error, is another word).
    A transaction discarded for a refused command is a refusal too.
    """
    from redis import exceptions as rx

    classes: tuple[tuple[type[BaseException], str], ...] = (
        (rx.OutOfMemoryError, "OOM"),
        (rx.ReadOnlyError, "READONLY"),
        (rx.BusyLoadingError, "LOADING"),
        (rx.MasterDownError, "MASTERDOWN"),
        (rx.TryAgainError, "TRYAGAIN"),
        (rx.ClusterDownError, "CLUSTERDOWN"),
    )
    text = str(exc)
    for cls, code in classes:
        if isinstance(exc, cls):
            return f"{code} {text}"[:200]
    if text.split(" ", 1)[0] in REFUSAL_CODES:
        return text[:200]
    if isinstance(exc, rx.ExecAbortError) and exc.__cause__ is not None:
        return write_refusal(exc.__cause__)
    return None
