"""Drop-in migration from smart-router (issue 15): each row of
``docs/migrating-from-smart-router.md`` that tierpool honours is proven here."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import orjson
import pytest

from tierpool.core.settings import Settings
from tierpool.workers import http
from tierpool.workers.context import WorkerContext

pytestmark = pytest.mark.anyio


@pytest.fixture
async def ctx(redis_url: str) -> AsyncIterator[WorkerContext]:
    context = WorkerContext.create(Settings(redis_url=redis_url, namespace="t"))
    try:
        yield context
    finally:
        await context.redis.aclose()


async def test_anchor_probe_paths_are_aliases(ctx: WorkerContext) -> None:
    """The anchor's ``/health`` and ``/ready`` answer as ``/healthz`` and ``/readyz``.

    Guards the probes of an unchanged smart-router manifest: without the
    aliases they get 404 and Kubernetes restarts a healthy worker.
    """
    async with anyio.create_task_group() as tg:
        port = await tg.start(lambda task_status: http.serve(ctx, port=0, task_status=task_status))
        status, body = await http.get("127.0.0.1", port, "/health")
        assert status == 200 and orjson.loads(body)["status"] == "ok"
        status, body = await http.get("127.0.0.1", port, "/ready")
        assert status == 503 and orjson.loads(body)["missing"] == ["config_loaded", "group_joined"]
        ctx.health.config_loaded = ctx.health.group_joined = True
        status, body = await http.get("127.0.0.1", port, "/ready")
        assert status == 200 and orjson.loads(body)["status"] == "ready"
        assert (await http.get("127.0.0.1", port, "/readyz"))[0] == 200
        tg.cancel_scope.cancel()
