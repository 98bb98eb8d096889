"""The webhook source: a SaaS POSTs signed JSON events, answered 2xx only once they are in the
agent's outbox.

What one request goes through::

    POST {path} ─► size (413) ─► signature + timestamp (401) ─► JSON (400) ─► mapping (422)
      ─► delivery id captured before? (200 duplicate) ─► bounded queue (full: 503)
      ─► read() hands the changes to the capture loop ─► outbox commit (I1) ─► committed(cursor)
      ─► delivery id recorded ─► 200 accepted         (not within ack_timeout: 503)

Answers (every body is small JSON ``{"status": ...}`` or ``{"error": ..., "status": ...}``;
never a stack trace; every 503 carries ``Retry-After``):

=====  ========================================================================================
200    ``accepted``: the events are committed (fsync'd) in the agent's outbox and will be
       delivered. ``duplicate``: this delivery id was captured before. ``ignored``: no event of
       an accepted type.
400    the body is not JSON, or a malformed ``Content-Length`` or delivery-id header
401    signature missing or wrong, timestamp missing or outside ``tolerance`` (replay window)
404    any other path; 405 any other method (with ``Allow: POST``)
413    body larger than ``max_body_bytes``
422    JSON, but not an event the mapping can read (no key, wrong kinds, array without ``batch``)
503    queue full, not committed within ``ack_timeout``, the receiver is stopping, or the state
       file is unavailable: the sender retries later and nothing is lost
=====  ========================================================================================

Why a replayed delivery id gets **200**: a sender retries when it did not see our 2xx (the answer
was lost, or it timed out while we committed). The event is already captured, so the truthful
answer to "did you get it?" is yes; a 4xx would make a Stripe-like sender keep retrying for days,
alert its owner, and eventually disable the endpoint, while nothing is missing. A retry that
arrives while the first delivery is still waiting for its commit waits with it and gets the same
answer.

Guarantees:

* **2xx means durable.** A request is answered 2xx only after :meth:`WebhookSource.committed`
  was called for a cursor covering its events, i.e. after the agent's outbox transaction
  committed (I1). A 503 promises nothing either way: the events may still be captured (they were
  already handed to the capture loop), and the re-sent request is then answered ``duplicate``.
* **No second event for a delivery id.** Captured delivery ids are recorded in ``state_path``
  right after the commit and remembered for ``id_retention`` seconds. A crash *between* the
  outbox commit and that record loses the record (the sender got no 2xx and re-sends); the
  re-sent event maps to the same key and version, hence the same envelope id (I2), which the
  outbox, JetStream's duplicate window and the sink's inbox absorb: no second effect. (With the
  signed timestamp as the version, this holds when the sender re-sends with the same timestamp;
  a re-signed retry is a newer version of the same row, which the sink's version guard applies as
  an unchanged write.)
* **Back-pressure.** At most ``queue_size`` requests wait to be captured; more get 503 at once.
  While the agent's outbox is full, capture pauses and waiting requests time out with 503.
* **The cursor is a monotonic counter** (one per batch handed out). The sender, not this source,
  is the durable log before the commit: events handed out but not committed when the agent dies
  were never acknowledged, so the sender re-sends them.

The HTTP server (:class:`~mesh.controlplane.http.HttpServer`) runs in a task group this source
enters in :meth:`~WebhookSource.open` and leaves in :meth:`~WebhookSource.aclose`, so both must be
called from the same task (``async with`` does that); a crash of the server cancels the code
inside that block and surfaces from ``aclose``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Mapping
from contextlib import AsyncExitStack
from typing import Any, NamedTuple

import anyio
import msgspec
from anyio.abc import TaskGroup
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from adapters.webhook._mapping import EventMapper, MappingError, TooDeep, parse_json
from adapters.webhook._seen import SeenIds
from adapters.webhook._signature import Encoding, SignatureError, Verifier, compute_signature
from adapters.webhook.config import WebhookSourceConfig
from mesh.adapters import Change, ChangeBatch, Source
from mesh.controlplane.http import HttpServer
from mesh.errors import ConfigError, SystemUnavailable
from mesh.trace import trace_context

__all__ = ["WebhookSource", "sign"]

log = logging.getLogger(__name__)

_json = msgspec.json.Encoder()
_GRACE = 2.0  # seconds open connections get to finish when the receiver stops
_PRUNE_INTERVAL = 3600.0
_MAX_ID = 256


def sign(
    secret: str | bytes,
    body: bytes,
    timestamp: int | None = None,
    *,
    scheme: str = "v1",
    encoding: Encoding = "hex",
) -> str:
    """The ``Webhook-Signature`` value a sender attaches to ``body``: ``t=<ts>,v1=<hmac>``.

    ``timestamp`` defaults to now (unix seconds). For senders and tests.
    """
    stamp = int(time.time()) if timestamp is None else timestamp
    return f"t={stamp},{scheme}={compute_signature(secret, stamp, body, encoding)}"


def _respond(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_json.encode(body), status_code=status, media_type="application/json", headers=headers)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return _respond({"error": message, "status": status}, status, headers)


class _Delivery:
    """One accepted request: its changes, and the outcome the requests waiting on it answer."""

    __slots__ = ("abandoned", "changes", "committed", "delivery_id", "done", "waiters")

    def __init__(self, changes: list[Change], delivery_id: str | None) -> None:
        self.changes = changes
        self.delivery_id = delivery_id
        self.done = anyio.Event()
        self.committed = False
        self.waiters = 0
        self.abandoned = False
        """Every request waiting on it gave up (503): read() may drop it if not yet handed out."""

    def settle(self, committed: bool) -> None:
        if not self.done.is_set():
            self.committed = committed
            self.done.set()


class _Handed(NamedTuple):
    """A batch read() returned, and the deliveries whose last change is in it."""

    cursor: int
    batch: ChangeBatch
    completes: list[_Delivery]


class WebhookSource(Source):
    """Receives signed webhook POSTs and hands their events to the capture loop (see module doc).

    ``environ`` replaces the process environment the secrets are read from (for tests).
    """

    def __init__(self, config: WebhookSourceConfig, *, environ: Mapping[str, str] | None = None) -> None:
        self._config = config
        self._environ = environ
        self._mapper = EventMapper(config)
        self._seen = SeenIds(config.state_path, scope=config.path)
        self._verifier: Verifier | None = None
        self._server: HttpServer | None = None
        self._stack: AsyncExitStack | None = None
        self._tg: TaskGroup | None = None
        self._queue: deque[_Delivery] = deque()
        self._offset = 0  # changes of the queue's head already handed out (a split delivery)
        self._arrived: anyio.Event | None = None
        self._pending: dict[str, _Delivery] = {}  # delivery id -> not yet settled
        self._handed: deque[_Handed] = deque()
        self._counter = 0
        self._settled = 0  # bumped whenever deliveries are settled as committed
        self._closing = False
        self._waiting = 0
        self.app = self._create_app()
        """The ASGI application (one POST route at ``config.path``)."""

    def __repr__(self) -> str:
        where = self.url or f"{self._config.host}:{self._config.port}{self._config.path} closed"
        return (
            f"<WebhookSource {where} queued={len(self._queue)} waiting={self._waiting} "
            f"handed={len(self._handed)} cursor={self._counter}>"
        )

    @property
    def url(self) -> str | None:
        """The receiver's URL (with the bound port) while open, else None."""
        return None if self._server is None else self._server.url + self._config.path

    @property
    def queued(self) -> int:
        """Deliveries waiting to be handed to the capture loop."""
        return len(self._queue)

    @property
    def waiting(self) -> int:
        """Requests waiting for their answer (retries of one delivery count each)."""
        return self._waiting

    async def open(self) -> None:
        """Read the secrets, open the state file and start serving HTTP.

        Raises:
            ConfigError: a secret variable is unset or empty, the state file's directory does
                not exist, or the address cannot be bound (in use, not local).
            SystemUnavailable: the state file cannot be opened now.
        """
        if self._stack is not None:
            return
        cfg = self._config
        self._verifier = Verifier.from_config(cfg, self._environ)
        self._closing = False
        self._arrived = anyio.Event()
        stack = AsyncExitStack()
        tg: TaskGroup | None = None
        try:
            await self._seen.open()
            stack.push_async_callback(self._seen.aclose)
            await self._prune()
            tg = await stack.enter_async_context(anyio.create_task_group())
            server = HttpServer(
                self.app, cfg.host, cfg.port, grace=_GRACE, name=f"webhook {cfg.path}",
                max_body_bytes=cfg.max_body_bytes, header_timeout=cfg.header_timeout,
                body_timeout=cfg.body_timeout,
            )  # fmt: skip
            await tg.start(server.run)
            tg.start_soon(self._prune_loop)
        except BaseException:
            if tg is not None:
                tg.cancel_scope.cancel()
            # Not shielded: the task group must be left from its own scope (it waits for its
            # tasks anyway); the state file closes shielded.
            await stack.aclose()
            raise
        self._stack, self._tg, self._server = stack, tg, server
        log.info("webhook receiver on %s", self.url)

    async def read(self, cursor: str | None, limit: int) -> ChangeBatch:
        """The next changes received, up to ``limit``; blocks until there is at least one.

        A retry from a cursor older than batches already returned (and not committed) returns
        those batches again, unchanged. A request's events may be split across batches; it is
        answered once the batch with its last event is committed.

        Raises:
            SystemUnavailable: the receiver was closed while waiting.
            ConfigError: ``cursor`` is not a cursor of this source.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        position = self._position(cursor)
        self._counter = max(self._counter, position)
        for handed in self._handed:
            if handed.cursor > position:
                return handed.batch
        while True:
            await self._wait_for_requests()
            changes: list[Change] = []
            completes: list[_Delivery] = []
            while self._queue and len(changes) < limit:
                head = self._queue[0]
                if head.abandoned and self._offset == 0:
                    self._discard(self._queue.popleft())
                    continue
                take = head.changes[self._offset : self._offset + limit - len(changes)]
                changes.extend(take)
                self._offset += len(take)
                if self._offset >= len(head.changes):
                    self._queue.popleft()
                    self._offset = 0
                    completes.append(head)
            if changes:
                break
        self._counter += 1
        batch = ChangeBatch(changes=changes, cursor=str(self._counter))
        self._handed.append(_Handed(self._counter, batch, completes))
        return batch

    async def _wait_for_requests(self) -> None:
        while True:
            if self._closing or self._arrived is None:
                raise SystemUnavailable(f"webhook receiver {self._config.path} is closed")
            if self._queue:
                return
            if self._arrived.is_set():
                self._arrived = anyio.Event()
            await self._arrived.wait()

    async def committed(self, cursor: str) -> None:
        """Everything up to ``cursor`` is in the outbox: record the delivery ids, answer 200.

        Never raises for the state file: when the ids cannot be recorded (logged), the events
        are still durable, and a re-sent delivery is absorbed by its envelope id.
        """
        position = self._position(cursor)
        # Shielded: once the outbox has committed, the waiting senders must hear so even if the
        # capture loop is being stopped.
        with anyio.CancelScope(shield=True):
            done: list[_Delivery] = []
            while self._handed and self._handed[0].cursor <= position:
                done.extend(self._handed.popleft().completes)
            ids = [d.delivery_id for d in done if d.delivery_id is not None]
            try:
                await self._seen.record(ids)
            except SystemUnavailable as exc:
                log.warning(
                    "webhook %s: could not record %d delivery ids (%s); a re-sent one is captured "
                    "again with the same envelope id, which downstream absorbs",
                    self._config.path, len(ids), exc,
                )  # fmt: skip
            for d in done:
                d.settle(True)
                self._forget(d)
            self._settled += 1

    async def aclose(self) -> None:
        """Stop serving (waiting requests are answered 503) and close the state file. Idempotent."""
        self._closing = True
        for d in [*self._queue, *self._pending.values()] + [d for h in self._handed for d in h.completes]:
            d.settle(False)
        self._queue.clear()
        self._pending.clear()
        self._handed.clear()
        self._offset = 0
        if self._arrived is not None:
            self._arrived.set()
        stack, self._stack = self._stack, None
        tg, self._tg = self._tg, None
        self._server = None
        if stack is None:
            return
        if tg is not None:
            tg.cancel_scope.cancel()
        try:
            await stack.aclose()
        except BaseExceptionGroup as group:  # the server crashed: raise its error itself
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise

    def _position(self, cursor: str | None) -> int:
        if cursor is None:
            return 0
        if not cursor.isdigit():
            raise ConfigError(f"{cursor!r} is not a cursor of a webhook source")
        return int(cursor)

    def _forget(self, d: _Delivery) -> None:
        if d.delivery_id is not None and self._pending.get(d.delivery_id) is d:
            del self._pending[d.delivery_id]

    def _discard(self, d: _Delivery) -> None:
        d.settle(False)
        self._forget(d)

    def _drop_abandoned(self) -> None:
        keep: deque[_Delivery] = deque()
        for i, d in enumerate(self._queue):
            if d.abandoned and not (i == 0 and self._offset > 0):
                self._discard(d)
            else:
                keep.append(d)
        self._queue = keep

    async def _prune(self) -> None:
        try:
            forgotten = await self._seen.prune(self._config.id_retention)
        except SystemUnavailable as exc:
            log.warning("webhook %s: pruning delivery ids failed: %s", self._config.path, exc)
            return
        if forgotten:
            log.info("webhook %s: forgot %d delivery ids past id_retention", self._config.path, forgotten)

    async def _prune_loop(self) -> None:
        while True:
            await anyio.sleep(_PRUNE_INTERVAL)
            await self._prune()

    # --- HTTP ---------------------------------------------------------------------------------

    def _create_app(self) -> Starlette:
        path = self._config.path

        async def endpoint(request: Request) -> Response:
            try:
                return await self._receive(request)
            except Exception:
                log.exception("webhook %s: handling a request failed", path)
                return _error(500, "internal error (details in the agent log)")

        async def http_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, HTTPException)
            message = {404: "not found", 405: "method not allowed"}.get(
                exc.status_code, str(exc.detail).lower()
            )
            return _error(exc.status_code, message, dict(exc.headers or {}))

        async def server_error(request: Request, exc: Exception) -> Response:
            log.error("webhook %s: %s %s failed: %s", path, request.method, request.url.path, exc)
            return _error(500, "internal error (details in the agent log)")

        app = Starlette(
            routes=[Route(path, endpoint, methods=["POST"])],
            exception_handlers={HTTPException: http_error, Exception: server_error},
        )
        app.router.redirect_slashes = False  # "/webhook/" is another path: 404, not a redirect
        return app

    def _unavailable(self, reason: str) -> Response:
        return _error(503, reason, {"Retry-After": str(self._config.retry_after)})

    async def _body(self, request: Request) -> bytes | Response:
        limit = self._config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                return _error(400, "invalid Content-Length")
            if int(length) > limit:
                return _error(413, f"body larger than {limit} bytes")
        data = bytearray()
        try:
            async for chunk in request.stream():
                data += chunk
                if len(data) > limit:
                    return _error(413, f"body larger than {limit} bytes")
        except ClientDisconnect:
            return _error(400, "client disconnected before the body was complete")
        return bytes(data)

    async def _receive(self, request: Request) -> Response:
        cfg = self._config
        verifier = self._verifier
        if self._closing or verifier is None:
            return self._unavailable("the receiver is stopping")
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        try:
            timestamp = verifier.verify(request.headers, body)
        except SignatureError as exc:
            return _error(401, str(exc))
        try:
            document = parse_json(body)
        except TooDeep as exc:
            return _error(400, f"body refused: {exc}")
        except msgspec.DecodeError:
            return _error(400, "body is not valid JSON")
        try:
            changes, ignored = self._mapper.changes(document, timestamp)
        except MappingError as exc:
            return _error(422, str(exc))
        context = trace_context(request.headers)
        if context:  # the sender's transaction: the captured changes belong to it (README "Tracing")
            changes = [msgspec.structs.replace(c, **context) for c in changes]
        delivery_id = request.headers.get(cfg.id_header) if cfg.id_header is not None else None
        if delivery_id:
            if len(delivery_id) > _MAX_ID or not delivery_id.isprintable():
                return _error(400, f"{cfg.id_header} header: expected at most {_MAX_ID} printable characters")
            earlier = await self._earlier(delivery_id)
            if isinstance(earlier, Response):
                return earlier
            if earlier is not None:
                return await self._wait(earlier, duplicate=True)
        if not changes:
            return _respond({"status": "ignored", "events": 0, "ignored": ignored})
        if self._closing or self._arrived is None:
            return self._unavailable("the receiver is stopping")
        if len(self._queue) >= cfg.queue_size:
            self._drop_abandoned()
            if len(self._queue) >= cfg.queue_size:
                return self._unavailable(f"{len(self._queue)} requests wait to be captured (queue_size)")
        delivery = _Delivery(changes, delivery_id or None)
        self._queue.append(delivery)
        if delivery_id:
            self._pending[delivery_id] = delivery
        self._arrived.set()
        return await self._wait(delivery)

    async def _earlier(self, delivery_id: str) -> _Delivery | Response | None:
        """The pending delivery with this id, a 200 ``duplicate`` if it was captured, or None."""
        while True:
            pending = self._pending.get(delivery_id)
            if pending is not None:
                return pending
            settled = self._settled
            try:
                captured = await self._seen.contains(delivery_id)
            except SystemUnavailable as exc:
                log.warning("webhook %s: %s", self._config.path, exc)
                return self._unavailable("delivery ids cannot be checked now")
            if captured:
                return _respond({"status": "duplicate"})
            if self._settled == settled:
                return self._pending.get(delivery_id)
            # A commit settled deliveries while we looked: look again (it may have been this id).

    async def _wait(self, delivery: _Delivery, *, duplicate: bool = False) -> Response:
        delivery.waiters += 1
        delivery.abandoned = False
        self._waiting += 1
        try:
            with anyio.move_on_after(self._config.ack_timeout):
                await delivery.done.wait()
        finally:
            self._waiting -= 1
            delivery.waiters -= 1
            if not delivery.done.is_set() and delivery.waiters == 0:
                delivery.abandoned = True
        if delivery.committed:
            status = "duplicate" if duplicate else "accepted"
            return _respond({"status": status, "events": len(delivery.changes)})
        if self._closing:
            return self._unavailable("the receiver is stopping")
        return self._unavailable("not captured within ack_timeout")
