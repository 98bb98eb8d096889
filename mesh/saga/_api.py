"""A minimal system-API caller on the wire contract (to be replaced by ``mesh.api.client``).

Request: JSON body, headers ``Mesh-Idempotency-Key``, ``Mesh-Deadline`` (unix ms),
``Mesh-Correlation-Id``, ``Mesh-Causation-Id``, ``traceparent``. Reply: ``{"ok": true,
"result": {...}, "replayed": bool}`` or ``{"ok": false, "error": {"code", "message",
"retryable"}}``.
"""

from __future__ import annotations

import json
import time
from typing import Any

from mesh.errors import MeshError
from mesh.transport import NoReply, NoResponders, Transport

__all__ = ["ApiError", "call"]


class ApiError(MeshError):
    """A system API call failed: ``code`` (bad_request, not_found, conflict, deadline_exceeded,
    unavailable, rejected, internal, timeout), ``retryable`` whether the same call may succeed."""

    def __init__(self, code: str, message: str, retryable: bool) -> None:
        self.code = code
        self.message = message
        self.retryable = retryable
        super().__init__(f"{code}: {message}")


async def call(
    transport: Transport,
    subject: str,
    data: dict[str, Any],
    *,
    idempotency_key: str | None,
    timeout: float,
    correlation_id: str = "",
    causation_id: str = "",
    traceparent: str = "",
) -> dict[str, Any]:
    """Call the API endpoint ``subject``; its result.

    Raises:
        ApiError: the structured error of the reply; ``timeout``/``unavailable`` (retryable)
            when nobody answers in time or nobody serves the subject; ``internal`` for a reply
            that is not the contract's JSON.
        TransportError: the connection is down or the credentials may not call ``subject``.
    """
    headers = {"Mesh-Deadline": str(int((time.time() + timeout) * 1000))}
    if idempotency_key:
        headers["Mesh-Idempotency-Key"] = idempotency_key
    for name, value in (
        ("Mesh-Correlation-Id", correlation_id),
        ("Mesh-Causation-Id", causation_id),
        ("traceparent", traceparent),
    ):
        if value:
            headers[name] = value
    try:
        reply = await transport.request(subject, json.dumps(data).encode(), timeout=timeout, headers=headers)
    except NoResponders:
        raise ApiError("unavailable", f"nobody serves {subject}", True) from None
    except NoReply:
        raise ApiError("timeout", f"{subject} did not answer within {timeout:g}s", True) from None
    try:
        body = json.loads(reply.data)
    except ValueError:
        raise ApiError("internal", f"{subject} replied with something that is not JSON", False) from None
    if not isinstance(body, dict):
        raise ApiError("internal", f"{subject} replied with a JSON {type(body).__name__}", False)
    if body.get("ok") is True:
        result = body.get("result")
        return result if isinstance(result, dict) else {"value": result}
    error = body.get("error")
    if not isinstance(error, dict):
        error = {}
    raise ApiError(
        str(error.get("code", "internal")),
        str(error.get("message", "error without a message")),
        bool(error.get("retryable", False)),
    )
