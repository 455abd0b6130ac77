"""The client library as the operator commands use it: opened from the command's settings.

Kept apart from :mod:`workers.ops.common` so that read-only commands
(status, pods, events, dead) never import ``tierpool.client``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from tierpool.client.client import TierpoolClient
from tierpool.schemas import Reply
from tierpool.workers.ops.common import Ops


@contextlib.asynccontextmanager
async def tierpool_client(ops: Ops) -> AsyncIterator[TierpoolClient]:
    """A started client; requests time out after ``--timeout`` (RequestTimeout: exit 4)."""
    async with TierpoolClient.from_url(
        ops.settings.redis_target,
        namespace=ops.settings.namespace,
        default_timeout_s=float(ops.args.timeout),
    ) as client:
        yield client


def reply_doc(reply: Reply) -> dict[str, Any]:
    """A reply as plain data, without the fields its status does not set."""
    doc: dict[str, Any] = msgspec.to_builtins(reply)
    return {k: v for k, v in doc.items() if v is not None}
