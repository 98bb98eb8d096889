"""Raw JetStream API requests for what nats-py does not expose (message get by subject from a
sequence or a time) and the parsing of their answers; used by :mod:`mesh.transport.jetstream`."""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from mesh.errors import TransportError
from mesh.transport.base import NotFound, Refused, StoredMessage

NO_MESSAGE = 10037
STREAM_NOT_FOUND = 10059
CONSUMER_NOT_FOUND = 10014

_FRACTION = re.compile(r"\.(\d+)")


def rfc3339(t: datetime) -> str:
    """``2024-05-01T12:00:00.000000Z`` (UTC, microseconds), as the server reads it."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def server_time(text: str) -> datetime:
    """A server timestamp (RFC 3339 with nanoseconds) as an aware UTC datetime."""
    value = _FRACTION.sub(lambda m: "." + m.group(1)[:6], text.strip())
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def parse_headers(raw: bytes) -> dict[str, str]:
    """A NATS header block (``NATS/1.0\\r\\nKey: value\\r\\n...``); the first value of a repeated
    key wins, like nats-py's."""
    headers: dict[str, str] = {}
    for line in raw.decode("utf-8", errors="replace").split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers.setdefault(name.strip(), value.strip())
    return headers


def decode_answer(what: str, data: bytes) -> dict[str, Any]:
    try:
        resp: dict[str, Any] = json.loads(data)
    except ValueError as exc:
        raise TransportError(f"{what}: unreadable answer: {exc}") from None
    return resp


def error_of(resp: Mapping[str, Any]) -> tuple[int, str] | None:
    """(err_code, description) of an API answer that is an error; None otherwise."""
    err = resp.get("error")
    if not err:
        return None
    return int(err.get("err_code") or 0), str(err.get("description") or err)


def raise_for(what: str, err: tuple[int, str]) -> None:
    """Raise the mesh error for an API error answer."""
    if err[0] in (STREAM_NOT_FOUND, CONSUMER_NOT_FOUND):
        raise NotFound(f"{what}: {err[1]}")
    raise Refused(f"{what}: JetStream refused: {err[1]}")


def stored_message(stream: str, m: Mapping[str, Any]) -> StoredMessage:
    """A ``STREAM.MSG.GET`` answer's ``message`` as a :class:`StoredMessage`."""
    headers = parse_headers(base64.b64decode(m["hdrs"])) if m.get("hdrs") else {}
    try:
        data = base64.b64decode(m.get("data") or "")
    except binascii.Error as exc:
        raise TransportError(f"stream {stream} seq {m.get('seq')}: unreadable payload: {exc}") from None
    return StoredMessage(stream, int(m["seq"]), str(m["subject"]), server_time(m["time"]), data, headers)
