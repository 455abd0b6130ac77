"""A small Kubernetes API server for tests: pods only, over real HTTP.

There is no cluster on the test machines, so the real client library
(lightkube, over httpx) talks to this instead. It serves what the pod
source uses, the way the API server does it:

- ``GET /api/v1/namespaces/{ns}/pods?labelSelector=...&limit=&continue=``:
  a ``PodList`` filtered by the selector, paged, with the collection's
  ``resourceVersion``;
- ``...&watch=true&resourceVersion=N``: chunked newline-delimited events
  after version N (``ADDED``/``MODIFIED``/``DELETED``), held open until
  ``timeoutSeconds``; a version older than the last compaction gets the
  ``ERROR`` event with a ``410 Expired`` Status, as a real server sends it.
  Without a version, the pods that exist now come as ``ADDED`` first (so a
  deletion in a client's gap is lost to a client that reopens that way).

Tests change pods with :meth:`FakeKube.put_pod` / :meth:`delete_pod`, cut
every open watch with :meth:`drop_watches`, refuse new ones with
``refuse_watches`` and forget history with :meth:`compact`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit


def matches(selector: str, labels: dict[str, str]) -> bool:
    """Equality, inequality and existence requirements (what the tests use)."""
    for part in filter(None, (p.strip() for p in selector.split(","))):
        if "!=" in part:
            k, v = part.split("!=", 1)
            if labels.get(k.strip()) == v.strip():
                return False
        elif "=" in part:
            k, v = part.replace("==", "=").split("=", 1)
            if labels.get(k.strip()) != v.strip():
                return False
        elif part.startswith("!"):
            if part[1:].strip() in labels:
                return False
        elif part not in labels:
            return False
    return True


class FakeKube:
    def __init__(self, namespace: str = "voice") -> None:
        self.namespace = namespace
        self.cond = threading.Condition()
        self.version = 1000
        self.pods: dict[str, dict[str, Any]] = {}
        self.log: list[tuple[int, str, dict[str, Any]]] = []
        self.compacted_below = 0
        self.generation = 0
        self.refuse_watches = False
        self.lists = 0
        self.watches = 0
        self.watch_versions: list[str | None] = []
        self.closed = False
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        server.daemon_threads = True
        self.server = server
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        self.thread = threading.Thread(target=server.serve_forever, daemon=True)

    # --- lifecycle ------------------------------------------------------------
    def start(self) -> FakeKube:
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                    "users": [{"name": "test", "user": {"token": "test-token"}}],
                    "contexts": [
                        {
                            "name": "fake",
                            "context": {
                                "cluster": "fake",
                                "user": "test",
                                "namespace": self.namespace,
                            },
                        }
                    ],
                    "current-context": "fake",
                }
            )
        )
        return path

    # --- what tests change ------------------------------------------------------
    def put_pod(
        self,
        name: str,
        *,
        ready: bool = True,
        ip: str | None = "10.0.0.1",
        labels: dict[str, str] | None = None,
        annotations: dict[str, str] | None = None,
        phase: str = "Running",
        terminating: bool = False,
    ) -> None:
        """Create or update a pod (ADDED or MODIFIED)."""
        with self.cond:
            self.version += 1
            kind = "MODIFIED" if name in self.pods else "ADDED"
            meta: dict[str, Any] = {
                "name": name,
                "namespace": self.namespace,
                "uid": f"uid-{name}",
                "resourceVersion": str(self.version),
                "labels": {"app": "voice-agent"} if labels is None else labels,
                "annotations": annotations or {},
            }
            if terminating:
                meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
            status: dict[str, Any] = {
                "phase": phase,
                "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            }
            if ip:
                status["podIP"] = ip
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "status": status}
            self.pods[name] = pod
            self.log.append((self.version, kind, pod))
            self.cond.notify_all()

    def delete_pod(self, name: str) -> None:
        with self.cond:
            pod = self.pods.pop(name)
            self.version += 1
            gone = json.loads(json.dumps(pod))
            gone["metadata"]["resourceVersion"] = str(self.version)
            self.log.append((self.version, "DELETED", gone))
            self.cond.notify_all()

    def drop_watches(self) -> None:
        """Cut every open watch mid-stream (no terminating chunk)."""
        with self.cond:
            self.generation += 1
            self.cond.notify_all()

    def compact(self) -> None:
        """Forget the history: a watch from any version seen so far gets 410 Gone."""
        with self.cond:
            self.compacted_below = self.version + 1
            self.log.clear()

    @contextmanager
    def watches_refused(self) -> Iterator[None]:
        """Open watches are cut and new ones answered 503 while inside."""
        self.refuse_watches = True
        self.drop_watches()
        try:
            yield
        finally:
            self.refuse_watches = False

    # --- serving ----------------------------------------------------------------
    def list_pods(self, q: dict[str, str]) -> dict[str, Any]:
        with self.cond:
            self.lists += 1
            selector = q.get("labelSelector", "")
            items = [
                p
                for _, p in sorted(self.pods.items())
                if matches(selector, p["metadata"]["labels"])
            ]
            version = str(self.version)
        start, _, at = q.get("continue", "").partition(":")
        if at:
            version = at
        offset = int(start or 0)
        limit = int(q.get("limit") or 0) or len(items) or 1
        page = items[offset : offset + limit]
        meta: dict[str, Any] = {"resourceVersion": version}
        if offset + limit < len(items):
            meta["continue"] = f"{offset + limit}:{version}"
        return {"apiVersion": "v1", "kind": "PodList", "metadata": meta, "items": page}


def _handler(kube: FakeKube) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            q = {k: v[0] for k, v in parse_qs(parts.query).items()}
            if parts.path != f"/api/v1/namespaces/{kube.namespace}/pods":
                self._json(404, _status(404, "NotFound", f"no route {parts.path}"))
                return
            if q.get("watch") in ("true", "1"):
                self._watch(q)
            else:
                self._json(200, kube.list_pods(q))

        def _json(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _chunk(self, event: dict[str, Any]) -> None:
            line = json.dumps(event).encode() + b"\n"
            self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
            self.wfile.flush()

        def _watch(self, q: dict[str, str]) -> None:
            if kube.refuse_watches:
                self._json(503, _status(503, "ServiceUnavailable", "watches refused (test)"))
                return
            with kube.cond:
                kube.watches += 1
                kube.watch_versions.append(q.get("resourceVersion"))
                generation = kube.generation
            selector = q.get("labelSelector", "")
            since = int(q.get("resourceVersion") or 0)
            deadline = time.monotonic() + float(q.get("timeoutSeconds") or 300)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if since and since < kube.compacted_below:
                self._chunk(
                    {
                        "type": "ERROR",
                        "object": _status(410, "Expired", f"too old resource version: {since}"),
                    }
                )
                self.wfile.write(b"0\r\n\r\n")
                return
            try:
                if not since:
                    # No version: the current pods as ADDED, then what follows
                    # (a deletion before this moment is never seen).
                    with kube.cond:
                        current = [
                            p
                            for _, p in sorted(kube.pods.items())
                            if matches(selector, p["metadata"]["labels"])
                        ]
                        since = kube.version
                    for pod in current:
                        self._chunk({"type": "ADDED", "object": pod})
                while True:
                    with kube.cond:
                        pending = [
                            (v, kind, pod)
                            for v, kind, pod in kube.log
                            if v > since and matches(selector, pod["metadata"]["labels"])
                        ]
                        if not pending:
                            kube.cond.wait(0.2)
                        if kube.closed or kube.generation != generation:
                            self.close_connection = True
                            return  # cut: no terminating chunk
                    for v, kind, pod in pending:
                        self._chunk({"type": kind, "object": pod})
                        since = v
                    if time.monotonic() > deadline:
                        self.wfile.write(b"0\r\n\r\n")
                        return
            except OSError:
                self.close_connection = True

    return Handler


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Status",
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
