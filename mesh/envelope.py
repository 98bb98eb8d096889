"""The envelope: the one message shape that crosses the wire, and its codec.

Guarantees:

* The wire format is MessagePack with string field names, so any msgpack library in any language
  can read an event; the ``Content-Type`` header names the envelope schema.
* ``Envelope.id`` is derived from (flow, origin, key, version) and never random (invariant I2):
  re-reading the same change after a crash produces the same id, which JetStream's duplicate
  window and the inbox use to suppress the second copy.
* New fields always get defaults, so old readers and old messages keep working.
* Encoders and decoders are built once, at import.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec

from mesh.errors import DecodeError

__all__ = [
    "CONTENT_TYPE",
    "DEAD_LETTER_HEADERS",
    "ENVELOPE_SCHEMA",
    "DeadLetter",
    "Envelope",
    "RowPayload",
    "decode",
    "decode_payload",
    "encode",
    "encode_payload",
    "envelope_id",
    "now_ms",
]

ENVELOPE_SCHEMA = "mesh.envelope/1"
CONTENT_TYPE = f"application/msgpack; schema={ENVELOPE_SCHEMA}"

# A fixed namespace makes ids reproducible across processes, hosts and versions of this code.
_ID_NAMESPACE = uuid.UUID("6f1c2a47-3c1e-4a59-9d0e-8a6c0b7f5e21")
_ID_PREFIX = _ID_NAMESPACE.bytes
_NIL = b"\xc0"  # msgpack nil: the payload of an envelope that carries none


class Envelope(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One change or command on its way through the mesh.

    ``version`` is the per-entity version assigned at the source; sinks never let a lower version
    overwrite a higher one (I5). ``occurred_at`` is milliseconds since the Unix epoch, when the
    change was captured. ``payload`` stays encoded until whoever needs it decodes it.

    ``correlation_id`` names the business transaction: a capture starts a new one (its own id)
    unless the change came with one (a webhook header) or is the effect of a change this agent
    just applied; whatever a message causes carries the same value. ``causation_id`` is the id of
    the message that caused this one (empty for a fresh change); ``traceparent`` is a W3C trace
    context, a child span of the cause's (README "Tracing business transactions").
    """

    id: str
    kind: str
    flow: str
    key: str
    version: int
    origin: str
    occurred_at: int
    schema: str = ""
    correlation_id: str = ""
    causation_id: str = ""
    traceparent: str = ""
    payload: msgspec.Raw = msgspec.Raw(_NIL)

    @property
    def entity(self) -> str:
        """The entity part of ``kind`` (``"customer"`` for ``"customer.upserted"``)."""
        return self.kind.rpartition(".")[0]

    @property
    def event(self) -> str:
        """The event part of ``kind`` (``"upserted"`` or ``"deleted"`` for row changes)."""
        return self.kind.rpartition(".")[2]

    @property
    def is_delete(self) -> bool:
        """Whether ``event`` is ``"deleted"``."""
        kind = self.kind
        return kind.endswith(".deleted") or kind == "deleted"


RowPayload = dict[str, Any]
"""A row as column name -> value; the payload of the generic ``<entity>.upserted`` event."""

_encoder = msgspec.msgpack.Encoder()
_envelope_decoder = msgspec.msgpack.Decoder(Envelope)
_row_decoder = msgspec.msgpack.Decoder(dict[str, Any])


def envelope_id(flow: str, origin: str, key: str, version: int) -> str:
    """The deterministic id of one version of one entity in one flow (I2).

    Exactly ``str(uuid.uuid5(namespace, "flow\\x1forigin\\x1fkey\\x1fversion"))``, computed
    without building a :class:`uuid.UUID` (it is on the capture path, once per change).
    """
    digest = bytearray(
        hashlib.sha1(
            _ID_PREFIX + f"{flow}\x1f{origin}\x1f{key}\x1f{version}".encode(), usedforsecurity=False
        ).digest()[:16]
    )
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def encode(envelope: Envelope) -> bytes:
    return _encoder.encode(envelope)


def decode(data: bytes) -> Envelope:
    """Decode wire bytes into an Envelope.

    Raises:
        DecodeError: the bytes are not msgpack or do not match the envelope schema; the message
            says which field is wrong.
    """
    try:
        return _envelope_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise DecodeError(f"not a valid envelope: {exc}") from None


def encode_payload(row: RowPayload | None) -> msgspec.Raw:
    if row is None:
        return msgspec.Raw(_NIL)
    return msgspec.Raw(_encoder.encode(row))


def decode_payload(envelope: Envelope) -> RowPayload:
    """Decode a row payload.

    Raises:
        DecodeError: the payload is not a msgpack map of column names to values.
    """
    try:
        return _row_decoder.decode(envelope.payload)
    except msgspec.DecodeError as exc:
        # kind and id come from the sender: quoted, so that a forged one cannot break the line.
        raise DecodeError(f"payload of {envelope.kind!r} {envelope.id!r} is not a row: {exc}") from None


_DEAD_LETTER_NAMES = {
    "reason": "Mesh-Reason",
    "error_class": "Mesh-Error-Class",
    "permanent": "Mesh-Permanent",
    "attempts": "Mesh-Attempts",
    "flow": "Mesh-Flow",
    "agent": "Mesh-Agent",
    "stage": "Mesh-Stage",
    "original_subject": "Mesh-Original-Subject",
    "original_stream_seq": "Mesh-Original-Stream-Seq",
    "original_msg_id": "Mesh-Original-Msg-Id",
    "http_status": "Mesh-Http-Status",
    "request_body": "Mesh-Request-Body",
    "response_body": "Mesh-Response-Body",
}
_BODY_LIMIT = 4096  # characters of a request or response body a dead letter keeps


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True, rename=_DEAD_LETTER_NAMES):
    """Why a message is in ``MESH_DLQ``: the headers a dead letter carries (I6).

    One definition for the writers (the sink's apply loop, the capture side's mapping), the
    reader (``meshctl dlq``) and the AsyncAPI export. On the wire every value is a header string
    (:meth:`to_headers`); :meth:`from_headers` reads them back.
    """

    reason: Annotated[str, msgspec.Meta(description="Why the message was dead-lettered (one line).")]
    error_class: Annotated[str, msgspec.Meta(description="mesh.errors class name, e.g. MappingError.")]
    flow: Annotated[str, msgspec.Meta(description="The flow whose message this was.")]
    original_subject: Annotated[str, msgspec.Meta(description="Where the message was published.")]
    permanent: Annotated[bool, msgspec.Meta(description="A permanent error (true) or retries ran out.")] = (
        False
    )
    attempts: Annotated[int, msgspec.Meta(ge=0, description="Deliveries before it was given up.")] = 1
    agent: Annotated[str, msgspec.Meta(description="The agent that dead-lettered it.")] = ""
    stage: Annotated[
        Literal["apply", "capture"],
        msgspec.Meta(description="apply: the sink side gave up; capture: the source side's mapping refused."),
    ] = "apply"
    original_stream_seq: Annotated[
        int | None, msgspec.Meta(description="The original's sequence in MESH_EVENTS (apply stage).")
    ] = None
    original_msg_id: Annotated[str, msgspec.Meta(description="The original's Nats-Msg-Id.")] = ""
    http_status: Annotated[
        int | None, msgspec.Meta(description="An HTTP target's answer status (HTTP sinks only).")
    ] = None
    request_body: Annotated[
        str, msgspec.Meta(description="The request body (HTTP sinks; one line, <= 4 KiB, secrets masked).")
    ] = ""
    response_body: Annotated[
        str, msgspec.Meta(description="The answer's body (HTTP sinks; one line, <= 4 KiB, secrets masked).")
    ] = ""

    def to_headers(self) -> dict[str, str]:
        """The header block (``Mesh-*`` names, string values; an absent sequence is omitted)."""
        out = {}
        for name, value in msgspec.structs.asdict(self).items():
            if value is None or (name in ("request_body", "response_body") and not value):
                continue  # absent: a dead letter of a non-HTTP sink carries no such header
            if isinstance(value, bool):
                value = "true" if value else "false"
            elif name == "reason":
                value = (" ".join(str(value).split()) or self.error_class)[:1000]  # one line
            elif name in ("request_body", "response_body"):
                value = " ".join(str(value).split())[:_BODY_LIMIT]  # one line, bounded
            out[_DEAD_LETTER_NAMES[name]] = str(value)
        return out

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> DeadLetter:
        """Read the dead-letter headers of a message (other headers are ignored).

        Raises:
            DecodeError: a required header is missing or a value has the wrong form.
        """
        data = {k: v for k, v in headers.items() if k in DEAD_LETTER_HEADERS}
        try:
            return msgspec.convert(data, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise DecodeError(f"not a dead letter: {exc}") from None

    @classmethod
    def headers_schema(cls) -> dict[str, Any]:
        """JSON Schema of the header block, derived from the fields: every value a string."""
        schema = msgspec.json.schema(cls)
        struct = schema["$defs"][cls.__name__] if "$defs" in schema else schema
        properties: dict[str, Any] = {}
        for name, prop in struct["properties"].items():
            out: dict[str, Any] = {"type": "string"}
            if "description" in prop:
                out["description"] = prop["description"]
            kinds = {p.get("type") for p in prop.get("anyOf", [prop])}
            if "boolean" in kinds:
                out["enum"] = ["true", "false"]
            elif "integer" in kinds:
                out["pattern"] = "^[0-9]+$"
            elif "enum" in prop:
                out["enum"] = prop["enum"]
            properties[name] = out
        return {"type": "object", "properties": properties, "required": struct.get("required", [])}


DEAD_LETTER_HEADERS: frozenset[str] = frozenset(_DEAD_LETTER_NAMES.values())
"""Every header name a :class:`DeadLetter` may write."""
