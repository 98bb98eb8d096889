"""A fake CRM REST API that misbehaves on purpose: the target of the REST sink's tests.

A real HTTP server on a loopback port, in-process (:func:`serve_crm_api`, or
:meth:`CrmApi.run` in an anyio task group) or as a process for chaos tests::

    python -m tests.fakes.crm_api --port 0 --db crm.db [--token-env CRM_TOKEN]

which prints ``crm-api listening on http://127.0.0.1:PORT`` once it accepts connections and
serves until SIGTERM/SIGINT.

Why Starlette + uvicorn: they are already the project's HTTP stack (the control plane's status
endpoint), both are well kept by the Encode/Kludex maintainers, uvicorn's pure-Python ``h11``
protocol needs no compiler, and ``uvicorn.Server.serve(sockets=...)`` runs inside our own event
loop, so one module serves in-process and as a subprocess.

Records live in the server's own SQLite file (``--db``), keyed by ``(collection, key)``::

    PUT|POST /{collection}/{key}   replace the record with the JSON object in the body
    PATCH    /{collection}/{key}   merge the body into the record (404 if there is none)
    POST     /{collection}         upsert keyed by the body's ``external_id``
    DELETE   /{collection}/{key}   delete (404 if there is none)
    GET      /{collection}/{key}   read

What it checks and remembers, so tests can prove *no double effect*:

* ``Authorization: Bearer <token>`` when started with a token (401 otherwise).
* ``Idempotency-Key``: the first request with a key is executed and its response stored (with
  the write, in one transaction); a replay returns that response again, marked
  ``Idempotent-Replayed: true``, without writing; the same key with another method, path or
  body is refused with 422 (as the IETF idempotency-key draft suggests).
* Every *effective* write appends ``(collection, key, version, op, idempotency key)`` to the
  ``writes`` table; ``version`` is the request's ``X-Mesh-Version``. It keeps **no version
  guard** of its own: an older version overwrites a newer one, as many real APIs do.
* A body whose ``email`` has no ``@`` is refused with 400, and that error body *echoes the
  Authorization header* (a careless API does), to test that clients never pass it on.

Misbehaviour, switched by ``POST /_chaos`` (JSON) or :meth:`CrmApi.chaos`, for ``count``
requests and/or ``seconds`` (neither: until ``{"mode": "ok"}``)::

    {"mode": "500"}                       answer 500 (``status`` picks another code)
    {"mode": "429", "retry_after": 2}     answer 429 with Retry-After (a number, or any text
                                          such as an HTTP date, sent as is)
    {"mode": "slow", "delay": 2}          do the work, then wait ``delay`` s before answering
    {"mode": "expire"}                    answer 401 "token expired", even to a valid token
    {"mode": "ok"}                        behave

``GET /_stats`` (request counts), ``GET /_writes`` (the write log) and ``POST /_reset_stats``
are for tests that run the server as a process; control routes are neither counted nor
misbehave. SQLite is used synchronously on the event loop on purpose: each request's
check-then-write is then atomic with respect to the others.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskStatus
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mesh.controlplane.http import HttpServer

__all__ = ["Chaos", "CrmApi", "Write", "main", "serve_crm_api"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    collection TEXT NOT NULL, key TEXT NOT NULL, body TEXT NOT NULL, version INTEGER,
    updated_at REAL NOT NULL, PRIMARY KEY (collection, key));
CREATE TABLE IF NOT EXISTS writes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, collection TEXT NOT NULL, key TEXT NOT NULL,
    version INTEGER, op TEXT NOT NULL, idempotency_key TEXT, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, status INTEGER NOT NULL, body BLOB NOT NULL);
"""
_MODES = ("ok", "500", "429", "slow", "expire")


@dataclass(frozen=True)
class Write:
    """One effective write, as the ``writes`` table holds it."""

    seq: int
    collection: str
    key: str
    version: int | None
    op: str
    idempotency_key: str | None


@dataclass
class Chaos:
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


class CrmApi:
    """The fake API: its Starlette app, its SQLite file and its misbehaviour switch."""

    def __init__(self, db: str | Path, *, token: str | None = None) -> None:
        self.db_path = str(db)
        self._token = token
        self._db = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
        self._db.executescript(_SCHEMA)
        self._chaos = Chaos()
        self.requests: Counter[str] = Counter()
        """Data requests by ``"METHOD /path"`` (control routes are not counted)."""
        self.statuses: Counter[int] = Counter()
        self.replays = 0
        self.url = ""
        self.app = Starlette(
            routes=[
                Route("/_chaos", self._chaos_route, methods=["POST"]),
                Route("/_stats", self._stats_route, methods=["GET"]),
                Route("/_writes", self._writes_route, methods=["GET"]),
                Route("/_reset_stats", self._reset_route, methods=["POST"]),
                Route("/{collection}", self._data, methods=["POST"]),
                Route(
                    "/{collection}/{key:path}", self._data, methods=["GET", "PUT", "POST", "PATCH", "DELETE"]
                ),
            ]
        )

    def __repr__(self) -> str:
        return f"<CrmApi {self.url or 'not serving'} requests={self.request_count} chaos={self._chaos.mode}>"

    # ---------------------------------------------------------------- test-side API

    @property
    def request_count(self) -> int:
        """Data requests received so far."""
        return sum(self.requests.values())

    def chaos(
        self,
        mode: str,
        *,
        seconds: float | None = None,
        count: int | None = None,
        status: int = 500,
        retry_after: float | str | None = None,
        delay: float = 1.0,
    ) -> None:
        """Misbehave (see the module doc) for ``count`` requests and/or ``seconds``."""
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        until = None if seconds is None else time.monotonic() + seconds
        self._chaos = Chaos(mode, count, until, status, retry_after, delay)

    def writes(self, key: str | None = None) -> list[Write]:
        """The write log (of one key, when given), oldest first."""
        sql = "SELECT seq, collection, key, version, op, idempotency_key FROM writes"
        rows = self._db.execute(
            sql + " WHERE key = ? ORDER BY seq" if key else sql + " ORDER BY seq", (key,) if key else ()
        )
        return [Write(*row) for row in rows]

    def record(self, collection: str, key: str) -> dict[str, Any] | None:
        """The stored record, or None."""
        row = self._db.execute(
            "SELECT body FROM records WHERE collection = ? AND key = ?", (collection, key)
        ).fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def close(self) -> None:
        self._db.close()

    # ---------------------------------------------------------------- serving

    async def run(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled; ``task_status.started(url)`` once connections are accepted."""
        server = HttpServer(self.app, host, port, grace=1.0, name="crm-api")
        async with anyio.create_task_group() as tg:
            await tg.start(server.run)
            self.url = server.url
            task_status.started(self.url)

    # ---------------------------------------------------------------- routes

    async def _chaos_route(self, request: Request) -> Response:
        spec = await request.json()
        try:
            self.chaos(
                str(spec.get("mode", "ok")),
                seconds=spec.get("seconds"),
                count=spec.get("count"),
                status=int(spec.get("status", 500)),
                retry_after=spec.get("retry_after"),
                delay=float(spec.get("delay", 1.0)),
            )
        except (ValueError, TypeError) as exc:
            return JSONResponse({"error": str(exc)}, 400)
        return JSONResponse({"mode": self._chaos.mode})

    async def _stats_route(self, request: Request) -> Response:
        return JSONResponse(
            {
                "requests": self.request_count,
                "by_route": dict(self.requests),
                "by_status": {str(k): v for k, v in self.statuses.items()},
                "replays": self.replays,
                "writes": len(self.writes()),
                "chaos": self._chaos.mode if self._chaos.active() else "ok",
            }
        )

    async def _writes_route(self, request: Request) -> Response:
        return JSONResponse([w.__dict__ for w in self.writes()])

    async def _reset_route(self, request: Request) -> Response:
        self.requests.clear()
        self.statuses.clear()
        self.replays = 0
        return JSONResponse({"ok": True})

    async def _data(self, request: Request) -> Response:
        self.requests[f"{request.method} {request.url.path}"] += 1
        body = await request.body()
        response, slow = self._handle(request, body)
        self.statuses[response.status_code] += 1
        if slow is not None:
            await anyio.sleep(slow)  # after the work: the client may give up on a done write
        return response

    def _handle(self, request: Request, body: bytes) -> tuple[Response, float | None]:
        chaos = self._chaos
        active = chaos.active()
        if active and chaos.mode in ("500", "429", "expire"):
            chaos.spend()
            if chaos.mode == "500":
                return _error(chaos.status, "internal error (chaos)"), None
            if chaos.mode == "429":
                headers = (
                    {} if chaos.retry_after is None else {"Retry-After": _retry_after(chaos.retry_after)}
                )
                return _error(429, "too many requests (chaos)", headers), None
            return _error(401, "token expired", {"WWW-Authenticate": 'Bearer error="invalid_token"'}), None
        slow = None
        if active and chaos.mode == "slow":
            chaos.spend()
            slow = chaos.delay
        authorization = request.headers.get("authorization", "")
        if self._token is not None and authorization != f"Bearer {self._token}":
            return _error(401, "missing or invalid bearer token"), slow
        idem = request.headers.get("idempotency-key")
        fingerprint = hashlib.sha256(
            b"\0".join([request.method.encode(), request.url.path.encode(), body])
        ).hexdigest()
        if idem is not None:
            stored = self._db.execute(
                "SELECT fingerprint, status, body FROM idempotency WHERE key = ?", (idem,)
            ).fetchone()
            if stored is not None:
                if stored[0] != fingerprint:
                    return _error(422, "Idempotency-Key reused with a different request"), slow
                self.replays += 1
                return _stored(stored[1], stored[2], replayed=True), slow
        with self._transaction():  # the write, its log entry and the stored response: all or none
            status, payload = self._execute(request, body, idem)
            content = b"" if payload is None else json.dumps(payload).encode()
            if idem is not None:
                self._db.execute(
                    "INSERT INTO idempotency (key, fingerprint, status, body) VALUES (?, ?, ?, ?)",
                    (idem, fingerprint, status, content),
                )
        return _stored(status, content, replayed=False), slow

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _execute(self, request: Request, body: bytes, idem: str | None) -> tuple[int, Any]:
        """Do what the request asks. Returns (status, JSON payload or None)."""
        method = request.method
        collection = request.path_params["collection"]
        key: str | None = request.path_params.get("key")
        if collection.startswith("_"):
            return 404, {"error": "no such collection"}
        if method == "GET":
            found = self.record(collection, key or "")
            return (404, {"error": "not found"}) if found is None else (200, found)
        version_text = request.headers.get("x-mesh-version")
        version = int(version_text) if version_text and version_text.lstrip("-").isdigit() else None
        if method == "DELETE":
            assert key is not None
            gone = self._db.execute(
                "DELETE FROM records WHERE collection = ? AND key = ?", (collection, key)
            ).rowcount
            if gone:
                self._log(collection, key, version, "delete", idem)
            return (204, None) if gone else (404, {"error": "not found"})
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            return 400, {"error": "body must be a JSON object"}
        email = doc.get("email")
        if email is not None and "@" not in str(email):
            # Careless on purpose: the error echoes the credentials it was sent.
            return 400, {
                "error": f"invalid email {email!r}",
                "request": {"authorization": request.headers.get("authorization")},
            }
        if key is None:
            if not doc.get("external_id"):
                return 400, {"error": "external_id is required"}
            key = str(doc["external_id"])
        current = self.record(collection, key)
        if method == "PATCH":
            if current is None:
                return 404, {"error": "not found"}
            doc = {**current, **doc}
        op = "patch" if method == "PATCH" else ("create" if current is None else "replace")
        self._db.execute(
            "INSERT INTO records (collection, key, body, version, updated_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (collection, key) DO UPDATE SET body = excluded.body, "
            "version = excluded.version, updated_at = excluded.updated_at",
            (collection, key, json.dumps(doc), version, time.time()),
        )
        self._log(collection, key, version, op, idem)
        return (201 if current is None else 200), {"key": key, "version": version, "record": doc}

    def _log(self, collection: str, key: str, version: int | None, op: str, idem: str | None) -> None:
        self._db.execute(
            "INSERT INTO writes (collection, key, version, op, idempotency_key, at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (collection, key, version, op, idem, time.time()),
        )


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": message}, status, headers=headers)


def _stored(status: int, content: bytes, *, replayed: bool) -> Response:
    headers = {"Idempotent-Replayed": "true"} if replayed else {}
    media = "application/json" if content else None
    return Response(content, status_code=status, headers=headers, media_type=media)


def _retry_after(value: float | str) -> str:
    if isinstance(value, str):
        return value
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


@contextlib.asynccontextmanager
async def serve_crm_api(
    db: str | Path, *, token: str | None = None, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[CrmApi]:
    """Run a :class:`CrmApi` in the current event loop for the duration of the block."""
    api = CrmApi(db, token=token)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(api.run, host, port)
            try:
                yield api
            finally:
                tg.cancel_scope.cancel()
    finally:
        api.close()


def main(argv: list[str] | None = None) -> None:
    """``python -m tests.fakes.crm_api``: serve until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m tests.fakes.crm_api", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    parser.add_argument("--db", required=True, help="SQLite file for records and the write log")
    parser.add_argument("--token-env", help="require 'Authorization: Bearer $VAR' (the variable's name)")
    args = parser.parse_args(argv)
    token = None
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            parser.error(f"environment variable {args.token_env} is not set")

    async def serve() -> None:
        api = CrmApi(args.db, token=token)
        try:
            async with anyio.create_task_group() as tg:
                url = await tg.start(api.run, args.host, args.port)
                print(f"crm-api listening on {url}", flush=True)
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        break
                tg.cancel_scope.cancel()
        finally:
            api.close()

    anyio.run(serve)
    sys.exit(0)


if __name__ == "__main__":
    main()
