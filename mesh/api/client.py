"""Call a system's API over NATS (the wire format of README "System APIs").

:func:`call` sends one request and returns the result, or raises :class:`ApiError`. It never
hangs: the request carries ``Mesh-Deadline`` = now + ``timeout`` and the wait ends at ``timeout``.
A retry with the same ``idempotency_key`` returns the first result (``replayed``), wherever it lands.
"""

from __future__ import annotations

import math
from typing import Any

from mesh.api._wire import (
    CAUSATION_ID,
    CORRELATION_ID,
    DEADLINE,
    IDEMPOTENCY_KEY,
    SUBJECT_PREFIX,
    TRACEPARENT,
    ApiError,
    decode,
    encode,
    now_ms,
)

__all__ = ["ApiError", "CallResult", "call", "call_detailed", "subject_of"]


class CallResult:
    """A successful reply: ``result`` and whether it was ``replayed`` (the key was seen)."""

    __slots__ = ("replayed", "result")

    def __init__(self, result: Any, replayed: bool) -> None:
        self.result = result
        self.replayed = replayed

    def __repr__(self) -> str:
        return f"<CallResult replayed={self.replayed}>"


def subject_of(name: str) -> str:
    """``erp.sales_order.create`` -> ``api.erp.sales_order.create``; a subject is kept as is."""
    return name if name.startswith(f"{SUBJECT_PREFIX}.") else f"{SUBJECT_PREFIX}.{name}"


async def _request(conn: Any, subject: str, data: bytes, headers: dict[str, str], timeout: float) -> Any:
    """(data, headers) of the reply, from a :class:`~mesh.transport.Transport` or a nats-py client."""
    from mesh.api._micro import NO_RESPONDERS, TIMEOUTS
    from mesh.transport import NoReply, NoResponders

    no_responders: tuple[type[BaseException], ...] = (NoResponders, *NO_RESPONDERS)
    timeouts: tuple[type[BaseException], ...] = (NoReply, *TIMEOUTS, TimeoutError)
    try:
        msg = await conn.request(subject, data, timeout=timeout, headers=headers)
    except no_responders:
        raise ApiError("unavailable", f"nobody serves {subject}", retryable=True) from None
    except timeouts:
        raise ApiError("timeout", f"no reply from {subject} within {timeout:g}s", retryable=True) from None
    return msg.data, dict(msg.headers or {})


async def call_detailed(
    conn: Any,
    subject: str,
    data: dict[str, Any],
    *,
    idempotency_key: str | None,
    timeout: float,
    correlation_id: str = "",
    causation_id: str = "",
    traceparent: str = "",
) -> CallResult:
    """Like :func:`call`, also saying whether the result was replayed."""
    headers = {DEADLINE: str(now_ms() + math.ceil(timeout * 1000))}
    if idempotency_key:
        headers[IDEMPOTENCY_KEY] = idempotency_key
    for name, value in (
        (CORRELATION_ID, correlation_id),
        (CAUSATION_ID, causation_id),
        (TRACEPARENT, traceparent),
    ):
        if value:
            headers[name] = value
    body, reply_headers = await _request(conn, subject, encode(data), headers, timeout)
    try:
        reply = decode(body)
    except Exception:
        reply = None
    if not isinstance(reply, dict) or "ok" not in reply:
        code = reply_headers.get("Nats-Service-Error-Code")
        if code:
            raise ApiError("internal", f"{subject}: {reply_headers.get('Nats-Service-Error', code)}", False)
        raise ApiError("internal", f"{subject}: the reply is not a System API reply", retryable=False)
    if reply["ok"]:
        return CallResult(reply.get("result"), bool(reply.get("replayed", False)))
    err = reply.get("error") or {}
    raise ApiError(
        str(err.get("code", "internal")), str(err.get("message", "")), bool(err.get("retryable", False))
    )


async def call(
    conn: Any,
    subject: str,
    data: dict[str, Any],
    *,
    idempotency_key: str | None,
    timeout: float,
    correlation_id: str = "",
    causation_id: str = "",
    traceparent: str = "",
) -> Any:
    """Call the endpoint ``subject`` (``api.<system>.<entity>.<operation>``) with ``data``.

    ``conn`` is a :class:`~mesh.transport.Transport` or a connected nats-py client.

    Returns:
        The result the system returned (or, for a seen ``idempotency_key``, the first result).

    Raises:
        ApiError: the reply's error (``bad_request``, ``not_found``, ``conflict``, ``rejected``,
            ``unavailable``, ``deadline_exceeded``, ``internal``); ``timeout`` (retryable) when no
            reply came within ``timeout``; ``unavailable`` (retryable) when nobody serves it.
    """
    res = await call_detailed(
        conn,
        subject,
        data,
        idempotency_key=idempotency_key,
        timeout=timeout,
        correlation_id=correlation_id,
        causation_id=causation_id,
        traceparent=traceparent,
    )
    return res.result
