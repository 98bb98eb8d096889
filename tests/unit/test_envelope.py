from __future__ import annotations

import uuid

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.envelope import (
    CONTENT_TYPE,
    Envelope,
    decode,
    decode_payload,
    encode,
    encode_payload,
    envelope_id,
)
from mesh.errors import DecodeError, PermanentError


def make(**kw: object) -> Envelope:
    fields: dict[str, object] = dict(
        id=envelope_id("customers", "erp", "42", 7),
        kind="customer.upserted",
        flow="customers",
        key="42",
        version=7,
        origin="erp",
        occurred_at=1_700_000_000_000,
        payload=encode_payload({"id": 42, "name": "Alfreds", "limit": 1000}),
    )
    fields.update(kw)
    return Envelope(**fields)  # type: ignore[arg-type]


def test_roundtrip_keeps_every_field() -> None:
    env = make(correlation_id="c-1", causation_id="c-0", traceparent="00-abc-def-01", schema="customer/row")
    back = decode(encode(env))
    assert back.id == env.id
    assert (back.kind, back.flow, back.key, back.version, back.origin) == (
        "customer.upserted",
        "customers",
        "42",
        7,
        "erp",
    )
    assert (back.correlation_id, back.causation_id, back.traceparent) == ("c-1", "c-0", "00-abc-def-01")
    assert decode_payload(back) == {"id": 42, "name": "Alfreds", "limit": 1000}
    assert back.entity == "customer"
    assert back.event == "upserted"
    assert not back.is_delete


def test_ids_are_deterministic_and_distinct() -> None:
    assert envelope_id("f", "erp", "1", 1) == envelope_id("f", "erp", "1", 1)
    ids = {
        envelope_id("f", "erp", "1", 1),
        envelope_id("f", "erp", "1", 2),
        envelope_id("f", "erp", "2", 1),
        envelope_id("f", "crm", "1", 1),
        envelope_id("g", "erp", "1", 1),
        # the separator keeps ("a", "b c") and ("a b", "c") apart
        envelope_id("f", "erp", "1\x1f1", 1),
    }
    assert len(ids) == 6


# Ids already in outboxes, streams and inboxes were made by uuid.uuid5: the fast path must give
# exactly the same text for every input, or a re-captured change would not be a duplicate (I2).
_NAMESPACE = uuid.UUID("6f1c2a47-3c1e-4a59-9d0e-8a6c0b7f5e21")


def test_ids_are_the_uuid5_ids_of_earlier_releases() -> None:
    expected = "9ed7eb12-0f66-51eb-8d61-e5467c3d097e"  # what releases before the fast path made
    assert str(uuid.uuid5(_NAMESPACE, "customers\x1ferp\x1f42\x1f7")) == expected
    assert envelope_id("customers", "erp", "42", 7) == expected


@given(st.text(), st.text(), st.text(), st.integers())
def test_ids_equal_uuid5_for_any_input(flow: str, origin: str, key: str, version: int) -> None:
    try:
        expected = str(uuid.uuid5(_NAMESPACE, f"{flow}\x1f{origin}\x1f{key}\x1f{version}"))
    except UnicodeEncodeError:
        with pytest.raises(UnicodeEncodeError):
            envelope_id(flow, origin, key, version)
        return
    assert envelope_id(flow, origin, key, version) == expected


def test_wire_format_is_plain_msgpack_map() -> None:
    """A client in another language reads the envelope with any msgpack library."""
    raw = msgspec.msgpack.decode(encode(make()))
    assert isinstance(raw, dict)
    assert raw["kind"] == "customer.upserted"
    assert raw["payload"] == {"id": 42, "name": "Alfreds", "limit": 1000}
    assert "msgpack" in CONTENT_TYPE


def test_old_reader_ignores_new_fields_and_new_reader_defaults_missing_ones() -> None:
    class Future(msgspec.Struct, kw_only=True):
        id: str
        kind: str
        flow: str
        key: str
        version: int
        origin: str
        occurred_at: int
        brand_new_field: str = "x"

    data = msgspec.msgpack.encode(
        Future(id="i", kind="c.upserted", flow="f", key="k", version=1, origin="o", occurred_at=0)
    )
    env = decode(data)
    assert env.id == "i"
    assert env.correlation_id == ""
    assert env.is_delete is False


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"\x00\x01garbage", "not a valid envelope"),
        (msgspec.msgpack.encode({"id": "x"}), "missing required field"),
        (msgspec.msgpack.encode({**msgspec.structs.asdict(make()), "version": "seven"}), "version"),
    ],
)
def test_malformed_bytes_raise_decode_error(data: bytes, needle: str) -> None:
    with pytest.raises(DecodeError, match=needle) as info:
        decode(data)
    assert isinstance(info.value, PermanentError)


def test_delete_without_payload() -> None:
    env = make(kind="customer.deleted", payload=encode_payload(None))
    back = decode(encode(env))
    assert back.is_delete
    with pytest.raises(DecodeError):
        decode_payload(back)
