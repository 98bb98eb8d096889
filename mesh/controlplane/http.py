"""The control plane's HTTP status endpoint: Starlette routes served by an embedded uvicorn.

Why Starlette + uvicorn: both are maintained by the Encode/Kludex team with frequent releases
and very wide production use; uvicorn's default pure-Python ``h11`` protocol needs no compiler,
and Starlette's router already answers unknown paths with 404 and wrong methods with 405 (with
``Allow``), so this module writes no HTTP parsing or routing of its own. uvicorn runs inside the
control plane's anyio task group (``Server.serve`` on our own bound socket); its own signal
handling is switched off because the process owns SIGTERM/SIGINT (the approach other embedders
such as vLLM use).

Routes (GET and HEAD only)::

    /               HTML dashboard (mesh.controlplane._dashboard): replica identity,
                    transactions (a failed one opens its trace), bulk runs, agents needing
                    attention (every agent paged on demand), systems, flows with KPIs, charts of
                    the last hour per flow, dead letters; updated in place by
                    static/dashboard.js every 5 s (no page reload). Without a token it is
                    server-rendered from the /status summary; with one it is a shell with no
                    data, and the script asks for the token
    /static/<file>  the page's script and style and the vendored chart library (uPlot, MIT)
    /api/series     per-flow time series JSON (``?flow=<name>&minutes=<1..1440>``; without
                    ``flow``: every flow), uPlot's layout: parallel arrays over ``t``
    /healthz        200 {"status": "alive"} while the process serves HTTP
    /readyz         200 {"ready": true} once the source says ready (the control plane: signal
                    handlers, NATS link, KV buckets and request handlers up, KV readable,
                    not stopping), else 503 {"ready": false, "reason": what it waits for}
    /status         the StatusReport JSON document (schema_version mesh-cp-status/1); by default
                    a summary (counts, counts per site, the agents that are not healthy, the
                    flows); ``?agents=all`` lists every agent; ``site=``, ``health=``,
                    ``limit=``, ``offset=`` narrow and page the agents (see
                    :func:`status_page`). ETag / If-None-Match (304), gzip
    /status/schema  JSON Schema of /status
    /metrics        Prometheus text format (names mesh_cp_*)
    /trace/<id>     a business transaction's records and status (by correlation id, envelope id
                    or entity:key), JSON; 404 when none is known
    /trace          transactions, newest first (?status=failed&since=<seconds>&limit=<n>)

Every response carries a Content-Security-Policy that allows scripts, styles and fetches from
the same origin only (no inline script, no CDN: the page works offline), plus ``nosniff``,
``no-referrer`` and ``frame-ancestors 'none'``.

Guarantees: every error is a small JSON body ``{"error": ..., "status": ...}`` (404, 405, 401,
413, 431, 500); a path with a trailing slash is 404, never a redirect (Starlette builds those from
the Host header); slow clients are cut off (see :class:`HttpServer`); a failing handler is
logged with its traceback but the response never contains one.
With a bearer token configured, every route but the probes (``/healthz``, ``/readyz``), the
page shell ``/`` and ``/static/<file>`` (no data in either, see :func:`is_public`) requires
``Authorization: Bearer <token>``; the token is compared in constant time and never echoed.
The page keeps the token in the tab's ``sessionStorage`` and sends it as that header (never in
a URL or a cookie, so no CSRF surface).
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import hmac
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from importlib import resources
from typing import Any, Protocol

import anyio
import msgspec
import uvicorn
from anyio.abc import TaskStatus
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from mesh.controlplane._dashboard import render_dashboard
from mesh.controlplane._httpguard import RequestLimits, guarded_h11, is_loopback
from mesh.controlplane.models import HEALTH_STATES, AgentsPage, StatusReport, status_schema
from mesh.controlplane.series import SeriesStore
from mesh.errors import ConfigError
from mesh.trace import STATUSES

__all__ = [
    "SUMMARY_LIMIT",
    "HttpServer",
    "StatusEncodings",
    "StatusQuery",
    "StatusSource",
    "create_app",
    "is_public",
    "parse_status_query",
    "render_dashboard",
    "status_page",
]

log = logging.getLogger(__name__)

_PUBLIC = frozenset({"/healthz", "/readyz", "/"})
"""Routes served without the bearer token: the probes and the dashboard's page shell (which
carries no data when a token is configured; see :func:`render_dashboard`)."""
_PUBLIC_PREFIX = "/static/"
"""The dashboard's script, style and chart library (package files, no data) are public too."""


def is_public(path: str) -> bool:
    """Whether ``path`` is served without the bearer token: ``/healthz``, ``/readyz``, the page
    shell ``/`` and the package's static files ``/static/<name>`` (one path segment)."""
    if path in _PUBLIC:
        return True
    name = path.removeprefix(_PUBLIC_PREFIX)
    return name != path and bool(name) and "/" not in name


_json = msgspec.json.Encoder()

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
"""The Content-Security-Policy of every response: same-origin scripts, styles and fetches only."""
_SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
_STATIC_TYPES = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
    "uPlot.LICENSE": "text/plain; charset=utf-8",
}


class _SecurityHeaders:
    """ASGI middleware: add the CSP and friends to every HTTP response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *_SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, with_headers)


def _static(name: str) -> bytes:
    return resources.files("mesh.controlplane").joinpath("static", name).read_bytes()


class StatusSource(Protocol):
    """What the HTTP endpoint reads; the control plane implements it (tests may fake it)."""

    registry: CollectorRegistry

    def status(self) -> StatusReport:
        """The current status document (from memory; must not block)."""
        ...

    async def readiness(self) -> str | None:
        """None when ready, else why not (one line)."""
        ...


def _json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_json.encode(body), status_code=status, media_type="application/json", headers=headers)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return _json_response({"error": message, "status": status}, status, headers)


Handler = Callable[[Request], Awaitable[Response]]

SUMMARY_LIMIT = 100
"""Agents a ``/status`` summary lists at most unless ``limit`` says otherwise."""
_MAX_LIMIT = 10_000
_GZIP_MIN = 1024
"""Bodies at least this large are sent gzip-compressed to clients that accept it."""
_GZIP_THREAD_MIN = 128 * 1024
"""Bodies at least this large are compressed in a worker thread (the loop keeps serving)."""


class StatusQuery(msgspec.Struct, frozen=True):
    """What ``/status`` was asked for (see :func:`parse_status_query`)."""

    agents: str = "summary"
    site: str | None = None
    health: str | None = None
    limit: int | None = None
    offset: int = 0


def parse_status_query(params: Mapping[str, str]) -> StatusQuery | str:
    """The :class:`StatusQuery` of ``/status``'s query parameters, or the one-line reason they
    are wrong (``agents`` is ``summary`` or ``all``; ``health`` one of the health states;
    ``limit`` 0..10000 and ``offset`` >= 0, whole numbers)."""
    agents = params.get("agents", "summary")
    if agents not in ("summary", "all"):
        return "agents must be summary or all"
    health = params.get("health") or None
    if health is not None and health not in HEALTH_STATES:
        return f"health must be one of {', '.join(HEALTH_STATES)}"
    try:
        limit = int(params["limit"]) if params.get("limit") else None
        offset = int(params.get("offset") or 0)
    except ValueError:
        return "limit and offset must be whole numbers"
    if limit is not None and not 0 <= limit <= _MAX_LIMIT:
        return f"limit must be from 0 to {_MAX_LIMIT}"
    if offset < 0:
        return "offset must be 0 or more"
    return StatusQuery(agents=agents, site=params.get("site") or None, health=health, limit=limit,
                       offset=offset)  # fmt: skip


def status_page(report: StatusReport, query: StatusQuery) -> StatusReport:
    """``report`` with the agents ``query`` selects and the per-site counts.

    ``summary``: the agents that are not both healthy and active (unless ``health`` asks for
    one state: then the agents in it), at most ``limit`` (default :data:`SUMMARY_LIMIT`), and
    the per-site counts of sites with such an agent, so its size does not grow with healthy
    agents. ``all``: every agent (``limit`` only when given) and every site. ``site`` and
    ``health`` narrow both modes. Counts, flows, systems, transactions and runs are unchanged.
    """
    sites: dict[str, dict[str, int]] = {}
    for a in report.agents:
        per = sites.get(a.site)
        if per is None:
            per = sites[a.site] = dict.fromkeys(HEALTH_STATES, 0)
        per[a.health] += 1
    chosen = [
        a
        for a in report.agents
        if (query.site is None or a.site == query.site)
        and (
            a.health == query.health
            if query.health is not None
            else query.agents == "all" or a.health != "healthy" or a.state != "active"
        )
    ]
    limit = query.limit
    if limit is None and query.agents == "summary":
        limit = SUMMARY_LIMIT
    end = None if limit is None else query.offset + limit
    if query.agents == "summary":
        listed = {a.site for a in chosen}
        shown = {k: v for k, v in sites.items() if k in listed}
    else:
        shown = sites if query.site is None else {k: v for k, v in sites.items() if k == query.site}
    page = AgentsPage(mode="summary" if query.agents == "summary" else "all", total=len(chosen),
                      offset=query.offset, limit=limit, sites=len(sites))  # fmt: skip
    return msgspec.structs.replace(
        report, agents=chosen[query.offset : end], agents_page=page, sites=dict(sorted(shown.items()))
    )


class _Encoded:
    """One ``/status`` variant, encoded once per report: body, ETag, gzip form (lazily, or
    ahead of time by :meth:`StatusEncodings.warm`)."""

    __slots__ = ("body", "etag", "gzipped")

    def __init__(self, body: bytes, etag: str | None = None, gzipped: bytes | None = None) -> None:
        self.body = body
        self.etag = _etag(body) if etag is None else etag
        self.gzipped = gzipped

    async def gzip(self) -> bytes:
        if self.gzipped is None:
            squeeze = functools.partial(_gzip, self.body)
            if len(self.body) >= _GZIP_THREAD_MIN:
                self.gzipped = await anyio.to_thread.run_sync(squeeze)
            else:
                self.gzipped = squeeze()
        return self.gzipped


def _etag(body: bytes) -> str:
    return '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'


def _gzip(body: bytes) -> bytes:
    return gzip.compress(body, 5, mtime=0)


def _hash_and_gzip(body: bytes) -> tuple[str, bytes | None]:
    return _etag(body), _gzip(body) if len(body) >= _GZIP_MIN else None


class StatusEncodings:
    """The encodings (body, ETag, gzip form) of the current report's ``/status`` variants, by
    query, each built at most once per report. They are dropped when the source hands out
    another report object (sources such as the control plane return the same object until they
    rebuild it, so a poll between rebuilds costs a dict lookup). At most ``size`` variants are
    kept per report (the oldest goes first)."""

    def __init__(self, size: int = 32) -> None:
        self.report: StatusReport | None = None
        self.size = size
        self.variants: dict[StatusQuery, _Encoded] = {}

    def __repr__(self) -> str:
        return f"<StatusEncodings variants={len(self.variants)}>"

    def get(self, report: StatusReport, query: StatusQuery) -> _Encoded:
        """The encoding of ``query``'s variant of ``report`` (built now unless cached)."""
        if report is not self.report:
            self.report = report
            self.variants = {}
        found = self.variants.get(query)
        if found is None:
            if len(self.variants) >= self.size:
                self.variants.pop(next(iter(self.variants)))
            found = self.variants[query] = _Encoded(_json.encode(status_page(report, query)))
        return found

    async def warm(self, report: StatusReport) -> None:
        """Build the default summary's encoding of ``report`` ahead of any request and make
        ``report`` the current one: encoded on the loop, hashed and gzip-compressed in a worker
        thread when large (both release the GIL), so the request that first asks for it after
        the report is published pays only a lookup. Call it before publishing ``report``; the
        previous report's encodings keep serving until it returns."""
        if report is self.report and StatusQuery() in self.variants:
            return
        page = status_page(report, StatusQuery())
        await anyio.lowlevel.checkpoint()  # the two are a few ms each with thousands of flows
        body = _json.encode(page)
        if len(body) >= _GZIP_THREAD_MIN:
            etag, gzipped = await anyio.to_thread.run_sync(_hash_and_gzip, body)
        else:
            etag, gzipped = _hash_and_gzip(body)
        if report is not self.report:
            self.report = report
            self.variants = {}
        self.variants[StatusQuery()] = _Encoded(body, etag, gzipped)


def _etag_matches(header: str, etag: str) -> bool:
    """Whether an If-None-Match header matches ``etag`` (weak comparison, RFC 9110 13.1.2;
    the gzip form's tag is the identity one with ``-gz``)."""
    for tag in header.split(","):
        tag = tag.strip().removeprefix("W/")
        if tag == "*" or tag == etag or tag == etag[:-1] + '-gz"':
            return True
    return False


def _guarded(handler: Handler) -> Handler:
    """Turn any exception into a JSON 500 (logged with its traceback, never sent)."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except Exception:
            log.exception("HTTP %s %s failed", request.method, request.url.path)
            return _error(500, "internal error (details in the control-plane log)")

    endpoint.__name__ = handler.__name__
    return endpoint


class _BearerAuth:
    """ASGI middleware: require ``Authorization: Bearer <token>`` outside the public routes
    (:func:`is_public`)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_public(scope["path"]):
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                given = value[7:].strip()
        if not hmac.compare_digest(given, self.token):
            response = _error(
                401, "missing or wrong bearer token", {"WWW-Authenticate": 'Bearer realm="mesh"'}
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(
    source: StatusSource,
    *,
    token: str | None = None,
    series: SeriesStore | None = None,
    encodings: StatusEncodings | None = None,
) -> Starlette:
    """The ASGI application for ``source`` (optionally behind a bearer token); ``series``
    feeds ``/api/series`` (absent: it lists no flow); ``encodings`` caches ``/status``'s
    encodings (give one to warm it with each new report, see :meth:`StatusEncodings.warm`)."""

    async def dashboard(request: Request) -> Response:
        if token:  # the shell is public: no data in it, the script fetches it with the token
            return HTMLResponse(render_dashboard(None), headers={"Cache-Control": "no-cache"})
        summary = status_page(source.status(), StatusQuery())
        return HTMLResponse(render_dashboard(summary), headers={"Cache-Control": "no-store"})

    async def healthz(request: Request) -> Response:
        return _json_response({"status": "alive"})

    async def readyz(request: Request) -> Response:
        reason = await source.readiness()
        if reason is None:
            return _json_response({"ready": True})
        return _json_response({"ready": False, "reason": reason}, 503)

    cache = encodings if encodings is not None else StatusEncodings()

    async def status(request: Request) -> Response:
        query = parse_status_query(request.query_params)
        if isinstance(query, str):
            return _error(400, query)
        encoded = cache.get(source.status(), query)
        zipped = len(encoded.body) >= _GZIP_MIN and "gzip" in request.headers.get("accept-encoding", "")
        etag = encoded.etag[:-1] + '-gz"' if zipped else encoded.etag
        headers = {"ETag": etag, "Cache-Control": "no-cache", "Vary": "Accept-Encoding"}
        if _etag_matches(request.headers.get("if-none-match", ""), encoded.etag):
            return Response(status_code=304, headers=headers)
        if zipped:
            headers["Content-Encoding"] = "gzip"
            return Response(await encoded.gzip(), media_type="application/json", headers=headers)
        return Response(encoded.body, media_type="application/json", headers=headers)

    async def schema(request: Request) -> Response:
        return _json_response(status_schema())

    async def trace_one(request: Request) -> Response:
        tracker = getattr(source, "txns", None)
        if tracker is None:
            return _error(404, "tracing is not available on this endpoint")
        ident = request.path_params["ident"]
        found = tracker.trace(ident)
        if not found:
            what = "a correlation id, envelope id or entity:key"
            return _error(404, f"no transaction known for {ident!r} ({what})")
        return _json_response({"query": ident, "transactions": found})

    async def trace_list(request: Request) -> Response:
        tracker = getattr(source, "txns", None)
        if tracker is None:
            return _error(404, "tracing is not available on this endpoint")
        status = request.query_params.get("status") or None
        if status is not None and status not in STATUSES:
            return _error(400, f"status must be one of {', '.join(STATUSES)}")
        try:
            since = float(request.query_params.get("since", "0"))
            limit = int(request.query_params.get("limit", "100"))
        except ValueError:
            return _error(400, "since (seconds) and limit must be numbers")
        since_ms = int((time.time() - since) * 1000) if since > 0 else 0
        listed = tracker.index.list(status, since_ms, max(1, min(limit, 1000)))
        return _json_response({"transactions": listed})

    async def metrics(request: Request) -> Response:
        # In a worker thread: at 5,000 flows the exposition takes ~0.15 s of Python, which the
        # interpreter then interleaves with the loop instead of blocking it (the collectors read
        # lists and dicts the sweep replaces whole, never mutates).
        body = await anyio.to_thread.run_sync(generate_latest, source.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        media = _STATIC_TYPES.get(name)
        if media is None:
            return _error(404, "not found")
        return Response(_static(name), media_type=media, headers={"Cache-Control": "max-age=300"})

    async def api_series(request: Request) -> Response:
        try:
            minutes = float(request.query_params.get("minutes", "60"))
        except ValueError:
            minutes = -1.0
        if not 1 <= minutes <= 1440:
            return _error(400, "minutes must be a number from 1 to 1440")
        flow = request.query_params.get("flow")
        if series is None:
            if flow:
                return _error(404, f"no series for flow {flow!r}")
            return _json_response({"flows": []})
        if flow:
            if flow not in series.series:
                return _error(
                    404, f"no series for flow {flow!r} (flows: {', '.join(series.flows()) or 'none'})"
                )
            return _json_response(series.as_json(flow, minutes))
        return _json_response({"flows": [series.as_json(f, minutes) for f in series.flows()]})

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = {404: "not found", 405: "method not allowed"}.get(exc.status_code, str(exc.detail).lower())
        return _error(exc.status_code, message, dict(exc.headers or {}))

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("HTTP %s %s failed: %s", request.method, request.url.path, exc)
        return _error(500, "internal error (details in the control-plane log)")

    routes = [
        Route(path, _guarded(fn), methods=["GET"])
        for path, fn in (
            ("/", dashboard),
            ("/healthz", healthz),
            ("/readyz", readyz),
            ("/status", status),
            ("/status/schema", schema),
            ("/metrics", metrics),
            ("/trace", trace_list),
            ("/trace/{ident:path}", trace_one),
            ("/api/series", api_series),
            ("/static/{name}", static),
        )
    ]
    # Large bodies (the dashboard, /api/series, /metrics) compressed for clients that accept it;
    # /status compresses its own (once per report, not per request), which this then leaves be.
    middleware = [
        Middleware(_SecurityHeaders),
        Middleware(GZipMiddleware, minimum_size=_GZIP_MIN, compresslevel=5),
    ]
    if token:
        middleware.append(Middleware(_BearerAuth, token=token))
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={HTTPException: http_error, Exception: server_error},
    )
    # Starlette would answer "/status/" with a redirect to an absolute URL built from the
    # request's Host header (an open redirect to any host a client names): 404 instead.
    app.router.redirect_slashes = False
    return app


class _EmbeddedServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._exit = anyio.Event()

    def request_exit(self) -> None:
        self.should_exit = True
        self._exit.set()

    async def main_loop(self) -> None:
        # uvicorn polls should_exit every 0.1 s; wake on the request instead, and still tick
        # once a second (on_tick refreshes the Date header when the counter is a multiple of 10).
        counter = 0
        while not await self.on_tick(counter):
            counter += 10
            with anyio.move_on_after(1.0):
                await self._exit.wait()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the process handles SIGTERM/SIGINT itself


class HttpServer:
    """Serves an ASGI app on ``host:port`` (0: a free port) inside the caller's task group.

    With ``tls_cert_file`` and ``tls_key_file`` (PEM) it serves HTTPS only (a certificate or
    key that cannot be loaded raises :class:`~mesh.errors.ConfigError` naming them).

    ``run`` binds first (an unusable address raises :class:`~mesh.errors.ConfigError` naming
    it), signals ``started(port)``, and on cancellation closes the listener and gives open
    connections up to ``grace`` seconds.

    Against slow or greedy clients: a request's headers must arrive within ``header_timeout``
    seconds (of connecting, or of the previous response) and its body within ``body_timeout``
    seconds of the headers, or the connection is closed (slowloris); a header block over
    ``max_header_bytes`` is answered 431 (400 while still incomplete) and a body over
    ``max_body_bytes`` 413. With
    ``open_access`` (no token guards the app) and a non-loopback ``host``, ``run`` logs a
    warning: anyone who can reach the address can read what the app serves.
    """

    def __init__(
        self,
        app: ASGIApp,
        host: str = "127.0.0.1",
        port: int = 8080,
        *,
        grace: float = 2.0,
        name: str = "control plane",
        header_timeout: float = 10.0,
        body_timeout: float = 30.0,
        max_header_bytes: int = 16 * 1024,
        max_body_bytes: int = 1 << 20,
        open_access: bool = False,
        tls_cert_file: str | None = None,
        tls_key_file: str | None = None,
    ) -> None:
        self.name = name
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self.open_access = open_access
        self.tls_cert_file = tls_cert_file
        self.tls_key_file = tls_key_file
        self.app = app
        self.host = host
        self.port = port
        self.grace = grace

    def __repr__(self) -> str:
        return f"<HttpServer {self.url}>"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "https" if self.tls_cert_file else "http"
        return f"{scheme}://{host}:{self.port}"

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            sock = socket.create_server((self.host, self.port), family=family, backlog=512)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve HTTP on {self.host}:{self.port}: {exc.strerror or exc}"
            ) from None
        # Accepted connections inherit TCP_NODELAY. Without it each response on a kept-alive
        # connection waits ~40 ms for the client's delayed ACK (Nagle): asyncio sets it only on
        # sockets whose proto is IPPROTO_TCP, and socket.create_server leaves proto 0.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    async def run(self, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        config = uvicorn.Config(
            RequestLimits(self.app, self.max_body_bytes, self.max_header_bytes),
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="off",
            http=guarded_h11(self.header_timeout, self.body_timeout),
            h11_max_incomplete_event_size=self.max_header_bytes,
            ws="none",
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=max(1, int(self.grace)),
            ssl_certfile=self.tls_cert_file,
            ssl_keyfile=self.tls_key_file,
        )
        if self.tls_cert_file is not None:
            try:
                config.load()  # builds the SSL context: a bad certificate or key fails here
            except (ssl.SSLError, OSError) as exc:
                raise ConfigError(
                    f"cannot serve HTTPS with certificate {self.tls_cert_file} and key "
                    f"{self.tls_key_file}: {getattr(exc, 'strerror', None) or exc}"
                ) from None
        sock = self._bind()
        self.port = int(sock.getsockname()[1])
        if self.open_access and not is_loopback(self.host):
            log.warning(
                "%s HTTP on %s is reachable from other machines and requires no token: "
                "set a token (http_token_env) or bind 127.0.0.1",
                self.name, self.url,
            )  # fmt: skip
        server = _EmbeddedServer(config)
        done = anyio.Event()

        async def serve() -> None:
            try:
                with anyio.CancelScope(shield=True):  # it stops through should_exit, cleanly
                    await server.serve(sockets=[sock])
            finally:
                done.set()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(serve)
                try:
                    while not server.started:
                        if done.is_set():
                            raise ConfigError(f"HTTP server on {self.url} stopped while starting")
                        await anyio.sleep(0.01)
                    log.info("%s HTTP on %s", self.name, self.url)
                    task_status.started(self.port)
                    await done.wait()
                finally:
                    server.request_exit()
        finally:
            sock.close()
