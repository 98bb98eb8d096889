"""Request-reading limits of :class:`~mesh.controlplane.http.HttpServer` (control plane, webhook).

* :func:`guarded_h11` — uvicorn's h11 protocol with read deadlines: a client must send a
  request's whole header block within ``header_timeout`` seconds of connecting (or of the
  previous response), and its whole body within ``body_timeout`` seconds of the headers;
  otherwise the connection is closed. uvicorn alone only times out an idle kept-alive
  connection, so a client dripping one byte a second (slowloris) would hold a connection
  forever. A header block still incomplete past ``max_header_bytes`` is answered 400 by h11.
* :class:`RequestLimits` — ASGI middleware: headers larger than ``max_header_bytes`` are
  answered 431, a body larger than ``max_body_bytes`` (by its ``Content-Length`` or as it
  arrives) 413, and the connection is closed.
* :func:`is_loopback` — whether a bind address only accepts local connections.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging

import h11
import msgspec
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["RequestLimits", "guarded_h11", "is_loopback"]

log = logging.getLogger("mesh.controlplane.http")


class _GuardedH11(H11Protocol):
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    _deadline: asyncio.TimerHandle | None = None

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        # Only while we wait for the client: a slow handler is not the client's fault.
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            who = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
            log.warning("HTTP client %s cut off: request not complete within its read deadline", who)
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not before:  # a request's headers are in: now its body has a deadline
            if self.conn.their_state is h11.SEND_BODY:
                self._arm(self.body_timeout)
            else:
                self._disarm()
        elif self.conn.their_state is h11.DONE:
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm(self.header_timeout)  # the next request's headers


def guarded_h11(header_timeout: float, body_timeout: float) -> type[H11Protocol]:
    """An h11 protocol class for ``uvicorn.Config(http=...)`` with these read deadlines."""
    return type(
        "GuardedH11Protocol",
        (_GuardedH11,),
        {"header_timeout": header_timeout, "body_timeout": body_timeout},
    )


class RequestLimits:
    """ASGI middleware: a header block (request line and headers) over ``max_header_bytes``
    gets 431, a body over ``max_bytes`` 413 (JSON error bodies) and the connection is closed;
    after a 413 the application sees the client as disconnected."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_header_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        size = len(scope.get("raw_path", b"")) + len(scope.get("query_string", b""))
        size += sum(len(name) + len(value) + 4 for name, value in scope.get("headers", []))
        if size > self.max_header_bytes:
            await _plain_error(send, 431, f"request headers larger than {self.max_header_bytes} bytes")
            return
        too_large = f"body larger than {self.max_bytes} bytes"
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                if not value.strip().isdigit():
                    await _plain_error(send, 400, "invalid Content-Length")
                    return
                if int(value) > self.max_bytes:
                    await _plain_error(send, 413, too_large)
                    return
        seen = 0
        started = refused = False

        async def counted() -> Message:
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    refused = True
                    if not started:
                        await _plain_error(send, 413, too_large)
                    return {"type": "http.disconnect"}
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 went out already; the application's answer is dropped
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, counted, tracked)


async def _plain_error(send: Send, status: int, message: str) -> None:
    body = msgspec.json.encode({"error": message, "status": status})
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": body})


def is_loopback(host: str) -> bool:
    """True when ``host`` (a bind address) only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
