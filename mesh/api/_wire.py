"""The System API wire format (docs: README "System APIs"), shared by the server and the client.

Request: a JSON object; headers ``Mesh-Idempotency-Key``, ``Mesh-Deadline`` (absolute, unix epoch
milliseconds), ``Mesh-Correlation-Id``, ``Mesh-Causation-Id``, ``traceparent``. Reply: always
``{"ok": true, "result": ..., "replayed": bool}`` or ``{"ok": false, "error": {"code", "message",
"retryable"}}`` (errors also carry the micro headers ``Nats-Service-Error`` and
``Nats-Service-Error-Code``).
"""

from __future__ import annotations

import re
import time
from typing import Any

import msgspec

from mesh.errors import MeshError

IDEMPOTENCY_KEY = "Mesh-Idempotency-Key"
DEADLINE = "Mesh-Deadline"
CORRELATION_ID = "Mesh-Correlation-Id"
CAUSATION_ID = "Mesh-Causation-Id"
TRACEPARENT = "traceparent"

STATUS: dict[str, int] = {
    "bad_request": 400,
    "not_found": 404,
    "conflict": 409,
    "rejected": 422,
    "internal": 500,
    "unavailable": 503,
    "deadline_exceeded": 504,
    "timeout": 504,
}
"""Error code -> the HTTP-like status of ``Nats-Service-Error-Code``."""

RETRYABLE: frozenset[str] = frozenset({"unavailable", "deadline_exceeded", "timeout"})
"""Codes a caller may retry with the same idempotency key by default."""

SERVICE_PREFIX = "mesh-"
SUBJECT_PREFIX = "api"
_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


class ApiError(MeshError):
    """A System API call failed: ``code`` (see :data:`STATUS`), a one-line ``message`` and
    whether the caller may retry it with the same idempotency key."""

    def __init__(self, code: str, message: str, retryable: bool | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = code in RETRYABLE if retryable is None else retryable

    def __repr__(self) -> str:
        return f"ApiError({self.code!r}, {self.message!r}, retryable={self.retryable})"

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "retryable": self.retryable}


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


def encode(value: Any) -> bytes:
    return _encoder.encode(value)


def decode(data: bytes) -> Any:
    return _decoder.decode(data)


def ok_reply(result: Any, *, replayed: bool = False) -> bytes:
    return encode({"ok": True, "result": result, "replayed": replayed})


def error_reply(error: ApiError) -> tuple[bytes, dict[str, str]]:
    """The reply body and the micro error headers of ``error``."""
    headers = {
        "Nats-Service-Error": error.message,
        "Nats-Service-Error-Code": str(STATUS.get(error.code, 500)),
    }
    return encode({"ok": False, "error": error.to_dict()}), headers


def service_name(system: str) -> str:
    """``mesh-<system>``: the NATS service name of a system's API."""
    return f"{SERVICE_PREFIX}{system}"


def endpoint_subject(system: str, operation: str) -> str:
    """``api.<system>.<entity>.<operation>`` for operation ``<entity>.<operation>``."""
    return f"{SUBJECT_PREFIX}.{system}.{operation}"


def endpoint_name(operation: str) -> str:
    """``<entity>_<operation>``: the endpoint name (micro names allow no ``.``)."""
    return operation.replace(".", "_")


def is_token(value: str) -> bool:
    return bool(_TOKEN.match(value))


def now_ms() -> int:
    return int(time.time() * 1000)
