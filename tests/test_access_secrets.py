"""Secrets never leak: URL passwords and tokens are masked in logs, replies, events, dead letters.

Issue 13 item 6: a ``TIER_CONFIG_URL`` with ``user:pass@`` and no port logged
the password (urllib read ``pass@host`` as a port and quoted it), and a pod
endpoint with credentials was echoed in the ``invalid`` reply, the log and
the dead letter.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import msgspec
import pytest
from redis.asyncio import Redis

from tests.conftest import wait_for
from tests.procs import WorkerPool, reply, send, unmasked_userinfo
from tierpool.core.configcache import ConfigCache
from tierpool.core.keys import Keys
from tierpool.core.masking import mask_text, mask_url
from tierpool.core.settings import Settings
from tierpool.core.upstream import check_upstream
from tierpool.workers.logs import setup_logging

pytestmark = pytest.mark.anyio

PASSWORD = "S3cretPw-7f1c"
KEYS = Keys("t")


def leaks(texts: Iterable[str], secret: str = PASSWORD) -> list[str]:
    """Every text that holds ``secret`` or a URL whose userinfo is not masked."""
    texts = list(texts)
    return [t for t in texts if secret in t] + [
        t for t in unmasked_userinfo(texts) if secret not in t
    ]


async def written_by_tierpool(r: Redis, keys: Keys = KEYS) -> list[str]:
    """Every reply, event and dead letter in Redis, as text."""
    texts: list[str] = []
    async for key in r.scan_iter(match=keys.reply("*"), count=1000):
        texts += [msgspec.json.encode(f).decode() for _, f in await r.xrange(key)]
    for stream in (keys.events, keys.dead):
        texts += [msgspec.json.encode(f).decode() for _, f in await r.xrange(stream)]
    return texts


# --- the one masking rule ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("no url here", "no url here"),
        (
            "endpoint: must be a URL, got 'http://pod:pw@10.0.0.1:8080/ws'",
            "endpoint: must be a URL, got 'http://***@10.0.0.1:8080/ws'",
        ),
        ('{"msg":"at redis://:pw@h:6379/0 down"}', '{"msg":"at redis://***@h:6379/0 down"}'),
        (
            "two: https://a:b@x/y?token=t and wss://c@z",
            "two: https://***@x/y?token=*** and wss://***@z",
        ),
        ("plain http://h:80/p?db=1 stays", "plain http://h:80/p?db=1 stays"),
    ],
)
def test_mask_text_masks_every_url_in_free_text(text: str, shown: str) -> None:
    assert mask_text(text) == shown
    assert mask_text(text) == mask_text(mask_text(text))  # masking twice changes nothing


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Leave the root logger (and the loggers setup_logging tunes) as they were."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    tuned = {name: logging.getLogger(name).level for name in ("asyncio", "redis")}
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)
    for name, old in tuned.items():
        logging.getLogger(name).setLevel(old)


@pytest.mark.usefixtures("restore_logging")
def test_log_lines_are_masked_whoever_logs() -> None:
    """A library that logs a URL with a password (or an exception quoting one) is masked too."""
    out = io.StringIO()
    setup_logging(Settings(log_format="json"), stream=out)
    logging.getLogger("some.library").warning(
        "cannot reach %s", f"redis://tierpool-worker:{PASSWORD}@redis:6379/0"
    )
    try:
        raise ConnectionError(f"refused by https://u:{PASSWORD}@cfg.example.com/t")
    except ConnectionError:
        logging.getLogger("x").exception("failed")
    setup_logging(Settings(log_format="console"), stream=out)
    logging.getLogger("y").info("url", extra={"url": f"http://u:{PASSWORD}@h/"})
    lines = out.getvalue().splitlines()
    assert len(lines) >= 3
    assert leaks(lines) == []
    assert "redis://***@redis:6379" in out.getvalue()


# --- the upstream URL ---------------------------------------------------------------------


async def test_upstream_password_without_a_port_is_not_in_the_outcome(r: Redis) -> None:
    """Regression: urllib's ``nonnumeric port: '<password>@host'`` reached the log."""
    url = f"http://tpuser:{PASSWORD}@localhost/tiers"  # no port: nothing listens on 80
    settings = Settings(namespace="t", tier_config_url=url)
    cache = ConfigCache(r, KEYS, settings)
    await cache.refresh()
    result = await check_upstream(r, KEYS, settings, cache)
    assert result.outcome == "unreachable", result
    assert leaks([result.detail]) == [], result.detail
    assert mask_url(url) == "http://***@localhost/tiers"


@pytest.fixture
def basic_auth_upstream() -> Iterator[int]:
    """A tier config service that answers only with the right basic-auth credentials."""
    expected = "Basic " + base64.b64encode(f"tpuser:{PASSWORD}".encode()).decode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.headers.get("Authorization") == expected
            body = b'{"gold": {"type": "exclusive", "target": 4}}' if ok else b""
            self.send_response(200 if ok else 401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def pool(redis_url: str, tmp_path: Path) -> Iterator[WorkerPool]:
    with WorkerPool(redis_url, tmp_path, env={"LOG_FORMAT": "json"}) as p:
        yield p


async def test_upstream_credentials_are_sent_as_basic_auth(
    r: Redis, pool: WorkerPool, basic_auth_upstream: int
) -> None:
    """``https://user:pass@host/...`` works: the credentials go in an Authorization header."""
    url = f"http://tpuser:{PASSWORD}@127.0.0.1:{basic_auth_upstream}/tiers"
    (worker,) = await pool.start(r, 1, env={"TIER_CONFIG_URL": url})

    async def applied() -> bool:
        raw = await r.get(KEYS.config)
        return raw is not None and '"target":4' in raw

    async def logged() -> bool:
        return "applied as version" in worker.log_text()

    await wait_for(applied, timeout_s=20)
    await wait_for(logged, timeout_s=20)
    assert leaks(worker.log_text().splitlines()) == []
    assert "http://***@127.0.0.1" in worker.log_text()


# --- end to end: nothing a worker writes holds the password ------------------------------


async def test_no_password_in_any_log_reply_event_or_dead_letter(
    r: Redis, pool: WorkerPool
) -> None:
    """Regression: a credentialed endpoint was echoed in the reply, the log and the dead
    letter, and a portless ``TIER_CONFIG_URL`` password reached the log."""
    url = f"http://tpuser:{PASSWORD}@localhost/tiers"
    (worker,) = await pool.start(r, 1, env={"TIER_CONFIG_URL": url})
    await send(
        r,
        KEYS.pods_stream,
        {
            "event": "register",
            "request_id": "reg-1",
            "pod_id": "pod-1",
            "endpoint": f"http://agent:{PASSWORD}@10.0.0.7:8080/ws",
        },
    )
    await send(
        r,
        KEYS.request_stream("release"),
        {"request_id": "rel-1", "call_id": f"wss://{PASSWORD}@10.0.0.7/"},
    )
    # Dead-lettered by a script, not by Python: a reused request_id (its reply
    # still unread) copies the entry's fields, which must be masked too.
    await r.xadd(KEYS.reply("in-use"), {"request_id": "in-use", "status": "released"})
    await send(
        r,
        KEYS.request_stream("release"),
        {"request_id": "in-use", "call_id": "c1", "note": f"redis://ops:{PASSWORD}@h:1/0"},
    )
    for rid in ("reg-1", "rel-1"):
        got = await reply(r, rid)
        assert got["status"] == "invalid", got

    async def three_dead() -> bool:
        return len(await r.xrange(KEYS.dead)) == 3

    await wait_for(three_dead)
    in_use = [f for _, f in await r.xrange(KEYS.dead) if f["request_id"] == "in-use"]
    assert msgspec.json.decode(in_use[0]["fields"])["note"] == "redis://***@h:1/0"
    assert "http://***@10.0.0.7:8080/ws" in (await reply(r, "reg-1"))["error"]

    async def tried() -> bool:
        return "upstream tier config" in worker.log_text()

    await wait_for(tried, timeout_s=20)
    texts = await written_by_tierpool(r)
    assert len(await r.xrange(KEYS.dead)) == 3
    logged = worker.log_text().splitlines()
    assert any("dead-lettered" in line for line in logged)
    assert leaks(texts) == []
    assert leaks(logged) == []
