"""The pure parts of ``meshctl dlq``: times, filters, header blocks, entries that do not decode."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from mesh.dlq import DlqEntry, DlqFilter, parse_time, replay_msg_id
from mesh.envelope import Envelope, encode, encode_payload
from mesh.errors import DecodeError
from mesh.transport._jsapi import parse_headers

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("15m", NOW - timedelta(minutes=15)),
        ("2h", NOW - timedelta(hours=2)),
        ("1d", NOW - timedelta(days=1)),
        ("1h30m", NOW - timedelta(minutes=90)),
        ("30S", NOW - timedelta(seconds=30)),
        ("2024-04-30T10:00:00Z", datetime(2024, 4, 30, 10, tzinfo=UTC)),
        ("2024-04-30T12:00:00+02:00", datetime(2024, 4, 30, 10, tzinfo=UTC)),
        ("2024-04-30 10:00", datetime(2024, 4, 30, 10, tzinfo=UTC)),  # naive means UTC
        ("2024-04-30T10:00:00.123456789Z", datetime(2024, 4, 30, 10, 0, 0, 123456, tzinfo=UTC)),
    ],
)
def test_parse_time(text: str, expected: datetime) -> None:
    assert parse_time(text, now=NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "15", "m15", "", "99999999999999w"])
def test_parse_time_refuses_with_one_clear_message(text: str) -> None:
    with pytest.raises(ValueError, match=repr(text)):
        parse_time(text, now=NOW)


def test_headers_block_parsing_keeps_utf8_and_the_first_of_repeated_keys() -> None:
    raw = "NATS/1.0\r\nMesh-Reason: caf\u00e9: bad\r\nA: 1\r\nA: 2\r\n\r\n".encode()
    assert parse_headers(raw) == {"Mesh-Reason": "caf\u00e9: bad", "A": "1"}


def test_entry_decodes_what_it_can_and_filters_match_case_insensitively() -> None:
    env = Envelope(
        id="e1", kind="customer.upserted", flow="customers", key="7", version=3, origin="erp",
        occurred_at=0, payload=encode_payload({"id": 7, "blob": b"\x00"}),
    )  # fmt: skip
    headers = {
        "Mesh-Flow": "customers", "Mesh-Error-Class": "RejectedRecord", "Mesh-Reason": "CHECK failed",
        "Mesh-Attempts": "3", "Mesh-Permanent": "true", "Mesh-Original-Subject": "evt.customer.upserted.erp",
        "Content-Type": "application/msgpack",
    }  # fmt: skip
    good = DlqEntry.of(5, "dlq.customers", NOW, encode(env), headers)
    bad = DlqEntry.of(6, "dlq.orders", NOW, b"\xc1", {})
    assert good.envelope == env
    assert good.payload_json() == {"id": 7, "blob": "AA=="}
    assert good.attempts == 3
    assert good.permanent is True
    assert good.original_headers() == {"Content-Type": "application/msgpack"}
    assert bad.envelope is None
    assert bad.decode_error is not None
    assert bad.flow == "orders"
    assert bad.attempts is None
    assert bad.summary()["envelope"] is None
    with pytest.raises(DecodeError):
        bad.payload_json()
    deleted = Envelope(id="e2", kind="customer.deleted", flow="customers", key="7", version=4, origin="erp",
                       occurred_at=0)  # fmt: skip
    assert DlqEntry.of(7, "dlq.customers", NOW, encode(deleted), {}).payload_json() is None
    assert DlqFilter(error="rejectedrecord", reason="check").matches(good)
    assert not DlqFilter(flow="orders").matches(good)
    assert not DlqFilter(since=NOW + timedelta(seconds=1)).matches(good)
    assert DlqFilter(until=NOW).matches(good)
    assert DlqFilter().is_empty
    assert replay_msg_id(5) == "replay-5"
