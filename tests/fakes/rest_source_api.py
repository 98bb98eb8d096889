"""A fake JSON REST API to *read* from, misbehaving on purpose: the REST source's test double.

A real HTTP server on a loopback port, in-process (:func:`serve_rest_source_api`, or
:meth:`RestSourceApi.run` in an anyio task group), served by the control plane's
:class:`~mesh.controlplane.http.HttpServer` like ``tests.fakes.crm_api``. Records live in memory,
in named collections the test mutates (:meth:`RestSourceApi.put`, :meth:`~RestSourceApi.archive`,
:meth:`~RestSourceApi.remove`); each record carries ``id``, its fields, ``updated_at`` (ISO-8601
UTC with milliseconds, never going back for one record), ``version`` (1, 2, ... per record) and
``archived``. A frozen clock (:meth:`RestSourceApi.freeze`) gives many records one timestamp.

Listings, one route per pagination style::

    GET /page/{c}?page=N&page_size=S      {"data": [...], "page": N, "page_size": S}
    GET /offset/{c}?offset=O&limit=S      {"items": [...], "offset": O, "total": T}
    GET /cursor/{c}?cursor=X&limit=S      {"data": [...], "meta": {"next_cursor": X'|null}}  (keyset)
    GET /link/{c}?page=N&per_page=S       [...] + Link: <.../link/c?page=N+1&per_page=S>; rel="next"
    GET /all/{c}                          [...]  (everything, one answer)

and the same filters on each: ``updated_since`` (ISO-8601, inclusive), ``If-Modified-Since``
(HTTP date; modified strictly after it, to the second, as RFC 9110 says; 304 when nothing is),
``sync_token`` (changes after that token; the last page of page/offset/cursor listings carries
``"next_sync_token"``).
``order`` is ``id`` (default; integer ids compare as numbers), ``updated_at`` or ``seq`` (change
order; the default with ``sync_token``). For sinks: ``PUT /api/{c}/{key}`` (upsert the JSON
body), ``DELETE /api/{c}/{key}``.

OAuth2 (with an :class:`OAuthClient`): ``POST /oauth/token`` grants ``client_credentials`` to
that client (HTTP basic, form-encoded id/secret, or both in the body), issuing tokens that live
``ttl`` seconds; every other route then needs ``Authorization: Bearer <live token>`` (401
``invalid_token`` otherwise). Wrong credentials: 401 ``invalid_client``; a scope not allowed:
400 ``invalid_scope``; a wrong audience: 400 ``invalid_request``.

Misbehaviour, switched by the test for ``count`` requests and/or ``seconds`` (neither: until
``fault("ok")``): :meth:`RestSourceApi.fault` on data routes — ``500`` (``status`` picks another
code), ``429`` (with ``retry_after``), ``slow`` (answer after ``delay`` s), ``duplicate`` (every
page after the first starts one record early, repeating the previous page's last record) — and
:meth:`RestSourceApi.token_fault` on the token endpoint (``500``, ``429``, ``slow``).
:meth:`RestSourceApi.revoke_tokens` expires every token at once; :attr:`RestSourceApi.after_page`
runs after each listing page is computed and before it is sent, so a test can shift the
collection under a client that is paging.

Everything is counted (:attr:`RestSourceApi.calls`, :attr:`~RestSourceApi.token_requests`).
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import json
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, unquote

import anyio
from anyio.abc import TaskStatus
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mesh.controlplane.http import HttpServer

__all__ = ["Call", "Fault", "OAuthClient", "RestSourceApi", "serve_rest_source_api"]

_FAULTS = ("ok", "500", "429", "slow", "duplicate")
_TOKEN_FAULTS = ("ok", "500", "429", "slow")
_STYLES = ("page", "offset", "cursor", "link", "all")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class OAuthClient:
    """The one OAuth2 client the fake's token endpoint knows."""

    client_id: str
    client_secret: str
    ttl: float = 60.0
    """Seconds an issued token lives (``expires_in``)."""
    scopes: frozenset[str] | None = None
    """Scopes that may be asked for (None: any)."""
    audience: str | None = None
    """When set, the ``audience`` a token request must name."""


@dataclass
class Fault:
    """The current misbehaviour and how long it lasts."""

    mode: str = "ok"
    count: int | None = None
    until: float | None = None
    status: int = 500
    retry_after: float | str | None = None
    delay: float = 1.0

    def active(self) -> bool:
        if self.mode == "ok":
            return False
        if (self.count is not None and self.count <= 0) or (
            self.until is not None and time.monotonic() >= self.until
        ):
            self.mode = "ok"
            return False
        return True

    def spend(self) -> None:
        if self.count is not None:
            self.count -= 1


@dataclass(frozen=True)
class Call:
    """One request as the fake saw it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    status: int


@dataclass
class _Record:
    body: dict[str, Any]
    ms: int  # updated_at in milliseconds since the epoch
    seq: int  # global change sequence


@dataclass
class RestSourceApi:
    """The fake API: its collections, clock, OAuth2 client and misbehaviour switches."""

    oauth: OAuthClient | None = None
    collections: dict[str, dict[str, _Record]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    """Every data request (listings and writes), oldest first."""
    token_requests: list[dict[str, str]] = field(default_factory=list)
    """Every token request's form (the secret removed) plus ``client_auth``."""
    statuses: Counter[int] = field(default_factory=Counter)
    after_page: Callable[[int], None] | None = None
    """Called with the number of listing pages served so far, before each page is sent."""
    url: str = ""

    def __post_init__(self) -> None:
        self._seq = 0
        self._frozen_ms: int | None = None
        self._fault = Fault()
        self._token_fault = Fault()
        self._tokens: dict[str, float] = {}  # token -> monotonic expiry
        self.pages_served = 0
        self.expired_hits = 0
        """Requests refused because their token had expired or was revoked."""
        self.app = Starlette(
            routes=[
                Route("/oauth/token", self._token_route, methods=["POST"]),
                Route("/api/{collection}/{key:path}", self._write_route, methods=["PUT", "DELETE"]),
                Route("/{style}/{collection}", self._list_route, methods=["GET"]),
            ]
        )

    def __repr__(self) -> str:
        sizes = {name: len(c) for name, c in self.collections.items()}
        return f"<RestSourceApi {self.url or 'not serving'} {sizes} fault={self._fault.mode}>"

    # ---------------------------------------------------------------- test-side API

    def freeze(self, at: str | None = None) -> None:
        """Stop the clock (at ``at``, ISO-8601, or now): new writes share one timestamp."""
        moment = datetime.fromisoformat(at) if at else datetime.now(UTC)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        self._frozen_ms = (moment - _EPOCH) // timedelta(milliseconds=1)

    def advance(self, seconds: float) -> None:
        """Move the frozen clock forward."""
        assert self._frozen_ms is not None, "freeze() first"
        self._frozen_ms += int(seconds * 1000)

    def unfreeze(self) -> None:
        self._frozen_ms = None

    def put(self, collection: str, key: int | str, **fields: Any) -> dict[str, Any]:
        """Create or update a record (fields are merged); returns its new body."""
        records = self.collections.setdefault(collection, {})
        old = records.get(str(key))
        now = self._frozen_ms if self._frozen_ms is not None else int(time.time() * 1000)
        ms = now if old is None else max(now, old.ms + 1)  # one record's time never goes back
        self._seq += 1
        body = dict(old.body) if old is not None else {"id": key, "archived": False}
        body.update(fields)
        body["id"] = key
        body["updated_at"] = _iso(ms)
        body["version"] = (old.body["version"] + 1) if old is not None else 1
        records[str(key)] = _Record(body, ms, self._seq)
        return dict(body)

    def archive(self, collection: str, key: int | str) -> dict[str, Any]:
        """Soft-delete: ``archived = true`` (a change like any other)."""
        return self.put(collection, key, archived=True)

    def remove(self, collection: str, key: int | str) -> None:
        """Hard-delete: the record vanishes from listings (no client can see that)."""
        self.collections.get(collection, {}).pop(str(key), None)

    def record(self, collection: str, key: int | str) -> dict[str, Any] | None:
        found = self.collections.get(collection, {}).get(str(key))
        return None if found is None else dict(found.body)

    def records(self, collection: str) -> dict[str, dict[str, Any]]:
        """Every record of ``collection`` by key (as text)."""
        return {k: dict(r.body) for k, r in self.collections.get(collection, {}).items()}

    def fault(
        self,
        mode: str,
        *,
        count: int | None = None,
        seconds: float | None = None,
        status: int = 500,
        retry_after: float | str | None = None,
        delay: float = 1.0,
    ) -> None:
        """Misbehave on data routes (see the module doc) for ``count`` requests and/or ``seconds``."""
        if mode not in _FAULTS:
            raise ValueError(f"mode must be one of {_FAULTS}, got {mode!r}")
        until = None if seconds is None else time.monotonic() + seconds
        self._fault = Fault(mode, count, until, status, retry_after, delay)

    def token_fault(
        self,
        mode: str,
        *,
        count: int | None = None,
        seconds: float | None = None,
        status: int = 500,
        retry_after: float | str | None = None,
        delay: float = 1.0,
    ) -> None:
        """Misbehave on the token endpoint."""
        if mode not in _TOKEN_FAULTS:
            raise ValueError(f"mode must be one of {_TOKEN_FAULTS}, got {mode!r}")
        until = None if seconds is None else time.monotonic() + seconds
        self._token_fault = Fault(mode, count, until, status, retry_after, delay)

    def revoke_tokens(self) -> None:
        """Every token issued so far is refused from now on (as if expired)."""
        self._tokens.clear()

    def listings(self, path: str | None = None) -> list[Call]:
        """The GET calls (to ``path`` when given)."""
        return [c for c in self.calls if c.method == "GET" and (path is None or c.path == path)]

    # ---------------------------------------------------------------- serving

    async def run(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled; ``task_status.started(url)`` once connections are accepted."""
        server = HttpServer(self.app, host, port, grace=1.0, name="rest-source-api")
        async with anyio.create_task_group() as tg:
            await tg.start(server.run)
            self.url = server.url
            task_status.started(self.url)

    # ---------------------------------------------------------------- routes

    async def _token_route(self, request: Request) -> Response:
        form = dict(parse_qsl((await request.body()).decode("utf-8", "replace")))  # x-www-form-urlencoded
        fault = self._token_fault
        if fault.active():
            fault.spend()
            if fault.mode == "500":
                return _json({"error": "server_error"}, fault.status)
            if fault.mode == "429":
                headers = {} if fault.retry_after is None else {"Retry-After": str(fault.retry_after)}
                return _json({"error": "slow_down"}, 429, headers)
            await anyio.sleep(fault.delay)
        client_id, secret, how = form.get("client_id"), form.get("client_secret"), "body"
        authorization = request.headers.get("authorization", "")
        if authorization.lower().startswith("basic "):
            try:
                pair = base64.b64decode(authorization[6:].strip()).decode()
            except ValueError:
                pair = ""
            user, _, password = pair.partition(":")
            client_id, secret, how = unquote(user), unquote(password), "basic"
        self.token_requests.append(
            {**{k: v for k, v in form.items() if k != "client_secret"}, "client_auth": how}
        )
        client = self.oauth
        if client is None:
            return _json({"error": "not_found"}, 404)
        if form.get("grant_type") != "client_credentials":
            return _json({"error": "unsupported_grant_type"}, 400)
        if client_id != client.client_id or secret != client.client_secret:
            return _json(
                {"error": "invalid_client", "error_description": "unknown client or wrong secret"},
                401,
                {"WWW-Authenticate": 'Basic realm="token"'},
            )
        scope = form.get("scope", "")
        if client.scopes is not None and not set(scope.split()) <= client.scopes:
            return _json({"error": "invalid_scope", "error_description": f"scope {scope!r} not allowed"}, 400)
        if client.audience is not None and form.get("audience") != client.audience:
            return _json({"error": "invalid_request", "error_description": "unknown audience"}, 400)
        token = secrets.token_urlsafe(18)
        self._tokens[token] = time.monotonic() + client.ttl
        return _json(
            {"access_token": token, "token_type": "Bearer", "expires_in": client.ttl, "scope": scope},
            200,
            {"Cache-Control": "no-store"},
        )

    def _authorized(self, request: Request) -> Response | None:
        if self.oauth is None:
            return None
        authorization = request.headers.get("authorization", "")
        token = authorization[7:].strip() if authorization.lower().startswith("bearer ") else ""
        expiry = self._tokens.get(token)
        if expiry is not None and time.monotonic() < expiry:
            return None
        if token:
            self.expired_hits += 1
        return _json(
            {"error": "invalid_token"},
            401,
            {"WWW-Authenticate": 'Bearer error="invalid_token", error_description="expired or unknown"'},
        )

    def _misbehave(self) -> tuple[Response | None, float, bool]:
        """(an error response, a delay before answering, whether pages overlap)."""
        fault = self._fault
        if not fault.active():
            return None, 0.0, False
        fault.spend()
        if fault.mode == "500":
            return _json({"error": "internal error (fault)"}, fault.status), 0.0, False
        if fault.mode == "429":
            headers = {} if fault.retry_after is None else {"Retry-After": str(fault.retry_after)}
            return _json({"error": "too many requests (fault)"}, 429, headers), 0.0, False
        if fault.mode == "slow":
            return None, fault.delay, False
        return None, 0.0, True

    def _log(self, request: Request, status: int) -> None:
        headers = {k: v for k, v in request.headers.items() if k in ("if-modified-since", "authorization")}
        self.calls.append(Call(request.method, request.url.path, dict(request.query_params), headers, status))
        self.statuses[status] += 1

    async def _write_route(self, request: Request) -> Response:
        response = self._authorized(request) or (self._misbehave()[0])
        if response is None:
            collection, key = request.path_params["collection"], request.path_params["key"]
            if request.method == "DELETE":
                gone = self.collections.get(collection, {}).pop(key, None)
                response = Response(status_code=204 if gone else 404)
            else:
                try:
                    doc = json.loads(await request.body())
                except ValueError:
                    doc = None
                if not isinstance(doc, dict):
                    response = _json({"error": "body must be a JSON object"}, 400)
                else:
                    doc.pop("id", None)
                    response = _json(self.put(collection, int(key) if key.isdigit() else key, **doc), 200)
        self._log(request, response.status_code)
        return response

    async def _list_route(self, request: Request) -> Response:
        response = self._authorized(request)
        delay, overlap = 0.0, False
        if response is None:
            response, delay, overlap = self._misbehave()
        if response is None:
            response = self._listing(request, overlap)
        self._log(request, response.status_code)
        if delay:
            await anyio.sleep(delay)
        return response

    def _listing(self, request: Request, overlap: bool) -> Response:
        style, name = request.path_params["style"], request.path_params["collection"]
        if style not in _STYLES:
            return _json({"error": f"no such style {style!r}"}, 404)
        q = request.query_params
        try:
            selected = self._select(name, q, request.headers.get("if-modified-since"))
        except ValueError as exc:
            return _json({"error": str(exc)}, 400)
        if selected is None:
            return Response(status_code=304)
        ordered, sort_key = selected
        sync = {"next_sync_token": f"sync-{self._seq}"}
        if style == "all":
            response = _json([r.body for r in ordered], 200)
        elif style == "cursor":
            size = int(q.get("limit", "10"))
            after = _decode_cursor(q["cursor"]) if "cursor" in q else None
            if after is not None:
                ordered = [r for r in ordered if (sort_key(r) >= after if overlap else sort_key(r) > after)]
            page, more = ordered[:size], len(ordered) > size
            meta = {"next_cursor": _encode_cursor(sort_key(page[-1])) if more else None}
            response = _json({"data": [r.body for r in page], "meta": meta, **({} if more else sync)}, 200)
        else:
            if style == "offset":
                size, start = int(q.get("limit", "10")), int(q.get("offset", "0"))
            else:
                size = int(q.get("page_size" if style == "page" else "per_page", "10"))
                number = int(q.get("page", "1"))
                start = (number - 1) * size
            begin = max(0, start - 1) if overlap and start > 0 else start
            page, more = ordered[begin : begin + size], start + size < len(ordered)
            bodies = [r.body for r in page]
            if style == "page":
                response = _json(
                    {"data": bodies, "page": number, "page_size": size, **({} if more else sync)}, 200
                )
            elif style == "offset":
                payload = {"items": bodies, "offset": start, "total": len(ordered), **({} if more else sync)}
                response = _json(payload, 200)
            else:
                headers = {}
                if more:
                    nxt = request.url.include_query_params(page=number + 1, per_page=size)
                    headers["Link"] = (
                        f'<{nxt}>; rel="next", <{request.url.remove_query_params("page")}>; rel="first"'
                    )
                response = _json(bodies, 200, headers)
        self.pages_served += 1
        if self.after_page is not None:
            self.after_page(self.pages_served)
        return response

    def _select(
        self, name: str, q: Any, if_modified_since: str | None
    ) -> tuple[list[_Record], Callable[[_Record], tuple[Any, ...]]] | None:
        """The records a listing's filters select, ordered; None for a 304."""
        records = list(self.collections.get(name, {}).values())
        if "updated_since" in q:
            moment = datetime.fromisoformat(q["updated_since"])
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            since_us = (moment - _EPOCH) // timedelta(microseconds=1)
            records = [r for r in records if r.ms * 1000 >= since_us]
        if "sync_token" in q:
            token = q["sync_token"]
            if not token.startswith("sync-") or not token[5:].isdigit():
                raise ValueError(f"bad sync_token {token!r}")
            records = [r for r in records if r.seq > int(token[5:])]
        if if_modified_since is not None:
            moment = email.utils.parsedate_to_datetime(if_modified_since)
            # RFC 9110: modified strictly after the date, to the second.
            records = [r for r in records if r.ms // 1000 > int(moment.timestamp())]
            if not records:
                return None
        order = q.get("order", "seq" if "sync_token" in q else "id")

        def by_id(r: _Record) -> tuple[Any, ...]:
            key = r.body["id"]
            return (0, key, "") if isinstance(key, int) else (1, 0, str(key))

        sort_key: Callable[[_Record], tuple[Any, ...]]
        if order == "id":
            sort_key = by_id
        elif order == "updated_at":
            sort_key = lambda r: (r.ms, *by_id(r))  # noqa: E731
        elif order == "seq":
            sort_key = lambda r: (r.seq,)  # noqa: E731
        else:
            raise ValueError(f"bad order {order!r}")
        return sorted(records, key=sort_key), sort_key


def _iso(ms: int) -> str:
    moment = datetime.fromtimestamp(ms // 1000, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def _json(body: Any, status: int, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(body, status, headers=headers)


def _encode_cursor(key: tuple[Any, ...]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode()


def _decode_cursor(text: str) -> tuple[Any, ...]:
    return tuple(json.loads(base64.urlsafe_b64decode(text.encode())))


@contextlib.asynccontextmanager
async def serve_rest_source_api(
    oauth: OAuthClient | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[RestSourceApi]:
    """Run a :class:`RestSourceApi` in the current event loop for the duration of the block."""
    api = RestSourceApi(oauth=oauth)
    async with anyio.create_task_group() as tg:
        await tg.start(api.run, host, port)
        try:
            yield api
        finally:
            tg.cancel_scope.cancel()
