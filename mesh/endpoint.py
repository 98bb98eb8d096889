"""The agent's HTTP endpoint on its metrics port: ``/metrics``, ``/healthz``, ``/readyz``.

Routes (GET and HEAD)::

    /metrics   Prometheus exposition of the agent's registry (prometheus_client's own WSGI app,
               so content negotiation for OpenMetrics and gzip stay exactly as before)
    /healthz   200 {"status": "alive", "pid": ...} while the process serves HTTP
    /readyz    200 + the readiness snapshot when ready; 503 + the same JSON otherwise (its
               "waiting" list and "detail" name what the agent still waits for, or "stopping")
    other      404 {"error": "not found"}

Why a stdlib server on a thread (the way prometheus_client serves ``/metrics`` already) rather
than the control plane's Starlette + uvicorn :class:`~mesh.controlplane.http.HttpServer`: three
small routes need no router or ASGI stack, the agent keeps one HTTP implementation instead of
two, and the probes only *read* a :class:`~mesh.readiness.Readiness` snapshot that the event
loop writes (its snapshot is safe to read from another thread). Whether the event loop itself
is alive is systemd's watchdog's job (``WATCHDOG=1`` is sent from the loop; see mesh.sdnotify).

Tests, ``meshctl dev up`` and the examples may run an agent with ``metrics_port = 0``; the
runner then writes the bound address to ``<state_dir>/endpoint.json`` (:func:`write_endpoint_file`,
read back with :func:`read_endpoint_file`), so nobody has to parse a log to find it.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from mesh.errors import ConfigError
from mesh.readiness import Readiness

__all__ = [
    "ENDPOINT_FILE",
    "AgentEndpoint",
    "read_endpoint_file",
    "remove_endpoint_file",
    "write_endpoint_file",
]

ENDPOINT_FILE = "endpoint.json"
"""Name of the file in the agent's state dir that says where its endpoint listens."""

_StartResponse = Callable[..., Any]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow client never holds up the process exit
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # probes every few seconds would drown the agent's log


class AgentEndpoint:
    """Serves the three routes on ``host:port`` (0: a free port) from a daemon thread.

    :meth:`start` binds (an unusable address raises :class:`~mesh.errors.ConfigError` naming
    it) and returns the bound port; :meth:`close` stops serving and is idempotent. Also a
    context manager.
    """

    def __init__(self, registry: CollectorRegistry, readiness: Readiness, host: str, port: int) -> None:
        self.registry = registry
        self.readiness = readiness
        self.host = host
        self.port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._metrics = make_wsgi_app(registry)

    def __repr__(self) -> str:
        state = "serving" if self._server is not None else "closed"
        return f"<AgentEndpoint {self.url} {state} {self.readiness!r}>"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> int:
        if self._server is not None:
            return self.port
        cls = _Server6 if ":" in self.host else _Server
        try:
            server = make_server(self.host, self.port, self._app, cls, handler_class=_Quiet)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve the agent endpoint on {self.host}:{self.port}: {exc.strerror or exc}"
            ) from None
        assert isinstance(server, _Server)
        self._server = server
        self.port = int(server.server_address[1])
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="agent-endpoint", daemon=True
        )
        self._thread.start()
        return self.port

    def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> AgentEndpoint:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _app(self, environ: dict[str, Any], start_response: _StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _json(start_response, "405 Method Not Allowed", {"error": "method not allowed"},
                         [("Allow", "GET, HEAD")])  # fmt: skip
        if path == "/metrics":
            return self._metrics(environ, start_response)
        if path == "/healthz":
            return _json(start_response, "200 OK", {"status": "alive", "pid": os.getpid()})
        if path == "/readyz":
            snap = self.readiness.snapshot()
            status = "200 OK" if snap["ready"] else "503 Service Unavailable"
            return _json(start_response, status, snap)
        return _json(start_response, "404 Not Found", {"error": "not found"})


def _json(
    start_response: _StartResponse, status: str, body: object, headers: list[tuple[str, str]] | None = None
) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(
        status,
        [("Content-Type", "application/json"), ("Content-Length", str(len(data))),
         ("Cache-Control", "no-store"), *(headers or [])],
    )  # fmt: skip
    return [data]


def write_endpoint_file(state_dir: str | Path, url: str) -> Path:
    """Write ``{"pid", "url", "readyz", "metrics"}`` to ``<state_dir>/endpoint.json`` atomically
    (write, then rename); returns the path."""
    path = Path(state_dir) / ENDPOINT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"pid": os.getpid(), "url": url, "readyz": f"{url}/readyz", "metrics": f"{url}/metrics"}
    tmp = path.with_name(f".{ENDPOINT_FILE}.{os.getpid()}")
    tmp.write_text(json.dumps(doc) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_endpoint_file(state_dir: str | Path, pid: int | None = None) -> dict[str, Any] | None:
    """The endpoint document in ``state_dir``, or None when there is none (yet), it is
    unreadable, or ``pid`` is given and the file was written by another process (a previous run)."""
    try:
        doc = json.loads((Path(state_dir) / ENDPOINT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or (pid is not None and doc.get("pid") != pid):
        return None
    return doc


def remove_endpoint_file(state_dir: str | Path) -> None:
    """Remove ``<state_dir>/endpoint.json`` if this process wrote it."""
    path = Path(state_dir) / ENDPOINT_FILE
    if read_endpoint_file(state_dir, os.getpid()) is not None:
        path.unlink(missing_ok=True)
