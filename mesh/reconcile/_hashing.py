"""Stable hashes of records in a flow's target form (private to :mod:`mesh.reconcile`).

A value is hashed by its *text*: ``None`` as null, booleans as ``true``/``false``, integral
numbers without a fraction, other floats by ``repr``, decimals normalised, nested objects as
canonical JSON (sorted keys). So an integer key stored in a TEXT column, or ``1.0`` read back
as ``1``, hash alike on both sides.
"""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

_json = msgspec.json.Encoder(order="sorted")
_DECIMAL_TEXT = re.compile(r"-?[0-9]+\.[0-9]+")
_TIMESTAMP_TEXT = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}(:?\d{2})?)?")
NULL_HASH = ""  # set below: the hash of a null value (SQL hashing uses it as a literal)


def text_of(value: Any) -> str | None:
    """The comparable text of one value (None for null). PostgreSQL computes the same text in
    SQL for integer, boolean, numeric and text columns (``adapters/sql/_reconcile.py``)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, decimal.Decimal):
        return format(value.normalize(), "f") if value.is_finite() else str(value)
    if isinstance(value, dt.datetime):
        return _instant(value)
    if isinstance(value, str):
        if _TIMESTAMP_TEXT.fullmatch(value):
            # one instant, whatever the notation: "…Z", "…+00:00", "… 10:00:00.120"
            try:
                return _instant(dt.datetime.fromisoformat(value))
            except ValueError:
                return value
        # "12.50" (a money amount as text) and numeric 12.5 are one value: trailing zeros go
        return format(decimal.Decimal(value).normalize(), "f") if _DECIMAL_TEXT.fullmatch(value) else value
    if isinstance(value, bytes):
        return value.hex()
    return _json.encode(value).decode()


def _instant(value: dt.datetime) -> str:
    if value.tzinfo is not None:
        value = value.astimezone(dt.UTC)
    return value.isoformat(timespec="microseconds")


def field_hash(value: Any) -> str:
    """16 hex digits of SHA-256 over the value's text (null has its own hash)."""
    text = text_of(value)
    data = b"\x00null" if text is None else b"v" + text.encode()
    return hashlib.sha256(data).hexdigest()[:16]


NULL_HASH = field_hash(None)


def field_hashes(row: Mapping[str, Any], fields: Iterable[str]) -> dict[str, str]:
    """``{field: field_hash}`` for ``fields`` (a field the row lacks hashes as null)."""
    return {f: field_hash(row.get(f)) for f in fields}


def record_hash(hashes: Mapping[str, str]) -> int:
    """One record's hash (a 128-bit int) from its field hashes, independent of field order."""
    data = "\n".join(f"{k}={v}" for k, v in sorted(hashes.items())).encode()
    return int.from_bytes(hashlib.sha256(data).digest()[:16], "big")


def bucket_of(key: str, buckets: int) -> int:
    """The bucket of a key: stable across processes and sides (not Python's ``hash``)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % buckets


class Digests:
    """Per-bucket (count, XOR of record hashes): order-independent, so rows can stream in any
    order and only one pair per bucket is kept."""

    __slots__ = ("buckets", "count", "xor")

    def __init__(self, buckets: int) -> None:
        self.buckets = buckets
        self.count: dict[int, int] = {}
        self.xor: dict[int, int] = {}

    def add(self, key: str, rhash: int) -> None:
        b = bucket_of(key, self.buckets)
        self.count[b] = self.count.get(b, 0) + 1
        self.xor[b] = (
            self.xor.get(b, 0) ^ rhash ^ int.from_bytes(hashlib.sha256(key.encode()).digest()[:16], "big")
        )

    def as_wire(self) -> dict[str, list[Any]]:
        return {str(b): [self.count[b], f"{self.xor[b]:032x}"] for b in sorted(self.count)}
