"""An in-process Redis for trying tierpool out: fakeredis behind a real TCP port.

``tierpool run`` starts one when no ``redis-server`` is on PATH and no
``REDIS_URL`` is set, so a laptop with nothing but ``pip install tierpool``
runs the whole system. The server speaks RESP on a loopback port, so the
workers, the pod simulator and the load stay separate processes talking to
it exactly as they would to Redis; only the server is a stand-in.

It is for trying out, never for production: it keeps everything in this
process's memory, serves each client from a thread of this process, wakes
blocked readers by polling, and lacks commands tierpool can do without
(``INFO``, a working ``CLIENT UNBLOCK``). :func:`tierpool.connect.redisconn.server_kind`
lets the client library notice it and adapt (see ``client/mux.py``). The
differences the conformance test found are listed in the README.
"""

from __future__ import annotations

import importlib.util
import threading
from typing import Final

from tierpool.core.errors import TierpoolError
from tierpool.workers.redisproc import free_port

REDIS_VERSION: Final = (7, 0)
"""The Redis version fakeredis imitates: the one tierpool's scripts are written for."""


class FakeRedisUnavailable(TierpoolError):
    """Raised when fakeredis (with Lua support, from ``lupa``) cannot be imported."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(
            f"fakeredis with Lua support is not installed ({cause}); "
            "pip install 'fakeredis[lua]', install redis-server, or set REDIS_URL"
        )


class FakeRedisServer:
    """A fakeredis TCP server on a free loopback port, served by a thread of this process."""

    def __init__(self, port: int | None = None) -> None:
        try:
            from fakeredis import TcpFakeServer
        except ImportError as exc:
            raise FakeRedisUnavailable(exc) from exc
        if importlib.util.find_spec("lupa") is None:  # fakeredis runs EVAL only with lupa
            raise FakeRedisUnavailable(ModuleNotFoundError("No module named 'lupa'"))
        self.port = port or free_port()
        self._server = TcpFakeServer(
            ("127.0.0.1", self.port), server_type="redis", server_version=REDIS_VERSION
        )
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Serve in a daemon thread; the port accepts connections once this returns."""
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fakeredis",
            daemon=True,
        )
        self._thread.start()

    def close(self) -> None:
        """Stop serving and close the port; safe to call twice."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._server.shutdown()
            thread.join(timeout=5)
        self._server.server_close()
