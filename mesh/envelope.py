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

import time
import uuid
from typing import Any

import msgspec

from mesh.errors import DecodeError

__all__ = [
    "CONTENT_TYPE",
    "ENVELOPE_SCHEMA",
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
_NIL = b"\xc0"  # msgpack nil: the payload of an envelope that carries none


class Envelope(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One change or command on its way through the mesh.

    ``version`` is the per-entity version assigned at the source; sinks never let a lower version
    overwrite a higher one (I5). ``occurred_at`` is milliseconds since the Unix epoch, when the
    change was captured. ``payload`` stays encoded until whoever needs it decodes it.
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
        return self.event == "deleted"


RowPayload = dict[str, Any]
"""A row as column name -> value; the payload of the generic ``<entity>.upserted`` event."""

_encoder = msgspec.msgpack.Encoder()
_envelope_decoder = msgspec.msgpack.Decoder(Envelope)
_row_decoder = msgspec.msgpack.Decoder(dict[str, Any])


def envelope_id(flow: str, origin: str, key: str, version: int) -> str:
    """The deterministic id of one version of one entity in one flow (I2)."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"{flow}\x1f{origin}\x1f{key}\x1f{version}"))


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
        raise DecodeError(f"payload of {envelope.kind} {envelope.id} is not a row: {exc}") from None
