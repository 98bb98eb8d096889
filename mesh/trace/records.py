"""Trace records: the small msgspec messages that tell where a business transaction went.

Every agent (and the API server and saga engine) publishes what happened to a message as a
:class:`TraceRecord`; records travel in a :class:`TraceBatch` on ``trace.<agent>.<kind>``
(stream ``MESH_TRACE``). A record names the business transaction it belongs to (its
``correlation_id``), the message it is about (``envelope_id``), the message that caused it
(``causation_id``) and the business key (``<entity>:<key>``, e.g. ``deal:42``).

Guarantees: the wire format is MessagePack with string field names (any language can read it);
new fields get defaults; encoders and decoders are built once.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Literal

import msgspec

from mesh.errors import DecodeError

__all__ = [
    "KINDS",
    "TraceBatch",
    "TraceKind",
    "TraceRecord",
    "child_traceparent",
    "decode_batch",
    "encode_batch",
    "new_traceparent",
    "trace_context",
    "trace_subject",
    "valid_id",
    "valid_traceparent",
]

TraceKind = Literal["captured", "published", "applied", "dead_lettered", "api_call", "saga_step"]
KINDS: tuple[str, ...] = ("captured", "published", "applied", "dead_lettered", "api_call", "saga_step")


class TraceRecord(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One thing that happened to one message of one business transaction.

    ``at`` is milliseconds since the epoch; ``latency_ms`` is, for ``captured``/``published``/
    ``applied``, the time since the change occurred at its source, for ``api_call`` and
    ``saga_step`` the call's or step's duration. ``outcome`` is what happened: for ``applied``
    the sink's outcome (``applied``, ``unchanged``, ``stale``, ``echo``, ``not_owner``); for
    ``api_call`` ``ok`` or the error code; for ``saga_step`` ``started``, ``completed``,
    ``failed``, ``compensating``, ``compensated`` (the whole saga: ``saga_completed``,
    ``saga_failed``, ``saga_compensated``). ``detail`` is a short free text (a dead letter's
    reason, an API subject, a step name).
    """

    kind: TraceKind
    at: int
    agent: str
    system: str = ""
    flow: str = ""
    envelope_id: str = ""
    correlation_id: str = ""
    causation_id: str = ""
    business_key: str = ""
    latency_ms: int = 0
    outcome: str = ""
    detail: str = ""
    traceparent: str = ""


class TraceBatch(msgspec.Struct, frozen=True, kw_only=True):
    """The records one agent published at once (one message, one subject per kind)."""

    records: list[TraceRecord]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(TraceBatch)


def encode_batch(records: list[TraceRecord]) -> bytes:
    return _encoder.encode(TraceBatch(records=records))


def decode_batch(data: bytes) -> list[TraceRecord]:
    """The records of one trace message.

    Raises:
        DecodeError: the bytes are not a :class:`TraceBatch`.
    """
    try:
        return _decoder.decode(data).records
    except msgspec.DecodeError as exc:
        raise DecodeError(f"not a trace batch: {exc}") from None


def trace_subject(agent: str, kind: str) -> str:
    """``trace.<agent>.<kind>``: an agent may publish only under its own name."""
    return f"trace.{agent}.{kind}"


_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,200}")


def valid_traceparent(value: str) -> bool:
    """Whether ``value`` is a W3C ``traceparent`` (``00-<32 hex>-<16 hex>-<2 hex>``)."""
    return bool(_TRACEPARENT.fullmatch(value))


def valid_id(value: str) -> bool:
    """Whether ``value`` may serve as a correlation or causation id taken from outside: 1-200
    characters of letters, digits and ``._:@/+=-`` (no spaces, nothing that could break a log
    line or a subject)."""
    return bool(_ID.fullmatch(value))


def trace_context(headers: Mapping[str, str]) -> dict[str, str]:
    """The trace context carried by request headers (``Mesh-Correlation-Id``,
    ``Mesh-Causation-Id``, ``traceparent``, case-insensitive): only the valid ones."""
    lowered = {k.lower(): v for k, v in headers.items()}
    out = {}
    corr = lowered.get("mesh-correlation-id", "").strip()
    if corr and valid_id(corr):
        out["correlation_id"] = corr
    cause = lowered.get("mesh-causation-id", "").strip()
    if cause and valid_id(cause):
        out["causation_id"] = cause
    parent = lowered.get("traceparent", "").strip().lower()
    if parent and valid_traceparent(parent):
        out["traceparent"] = parent
    return out


def new_traceparent() -> str:
    """A new W3C ``traceparent`` (version 00, random trace and span ids, sampled)."""
    return f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"


def child_traceparent(parent: str) -> str:
    """A ``traceparent`` for something caused by ``parent``: the same trace id, a new span id
    (a new trace when ``parent`` is empty or malformed)."""
    if not valid_traceparent(parent):
        return new_traceparent()
    parts = parent.split("-")
    return f"{parts[0]}-{parts[1]}-{os.urandom(8).hex()}-{parts[3]}"
