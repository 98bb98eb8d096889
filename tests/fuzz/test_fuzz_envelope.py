"""Fuzzing the envelope decoder and the sink side's checks of what it decoded.

Properties: arbitrary bytes, and msgpack maps shaped like envelopes with hostile field values,
either decode or raise :class:`DecodeError` with a one-line message; a valid envelope survives
encode/decode unchanged; a decoded envelope that reaches the sink side (subject check, origin,
version bounds, payload, ownership, mapping) is either accepted as a record or refused with
:class:`InvalidEnvelope`, :class:`DecodeError` or :class:`MappingError`, never anything else.
Dead-letter headers read back what they wrote, and foreign headers raise DecodeError only.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st

from agents.delivery import Apply, FlowPlan
from mesh.config import decode_flow
from mesh.envelope import DEAD_LETTER_HEADERS, DeadLetter, Envelope, decode, encode, encode_payload
from mesh.errors import DecodeError, InvalidEnvelope, MappingError
from mesh.flowdata import compile_flow_data
from mesh.metrics import Metrics
from tests.fuzz._support import assert_clear, names, text_any

pytestmark = [pytest.mark.fuzz, pytest.mark.timeout(600)]

FIELDS = (
    "id",
    "kind",
    "flow",
    "key",
    "version",
    "origin",
    "occurred_at",
    "schema",
    "correlation_id",
    "causation_id",
    "traceparent",
    "payload",
)

msgpack_values: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | text_any
    | st.binary(max_size=16)
    | st.builds(msgspec.msgpack.Ext, st.integers(-128, 127), st.binary(max_size=8)),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text_any, children, max_size=4),
    max_leaves=12,
)
"""Anything msgpack can carry, extension types included."""

wire_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.floats() | text_any,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text_any, children, max_size=4),
    max_leaves=12,
)
"""What a row can hold on the wire (msgpack integers are 64-bit)."""

int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def valid_envelopes() -> st.SearchStrategy[Envelope]:
    return st.builds(
        Envelope,
        id=text_any,
        kind=text_any,
        flow=text_any,
        key=text_any,
        version=int64,
        origin=text_any,
        occurred_at=int64,
        schema=text_any,
        correlation_id=text_any,
        causation_id=text_any,
        traceparent=text_any,
        payload=st.just(encode_payload(None))
        | st.dictionaries(text_any, wire_values, max_size=4).map(encode_payload),
    )


@st.composite
def envelope_maps(draw: st.DrawFn) -> dict[Any, Any]:
    """An envelope-shaped map: every field present or not, of the right type or any other,
    plus unknown keys."""
    out: dict[Any, Any] = {}
    good = draw(valid_envelopes())
    for name in FIELDS:
        choice = draw(st.sampled_from(["keep", "keep", "drop", "hostile"]))
        if choice == "keep":
            value = getattr(good, name)
            out[name] = msgspec.msgpack.decode(bytes(value)) if name == "payload" else value
        elif choice == "hostile":
            out[name] = draw(msgpack_values)
    out.update(draw(st.dictionaries(text_any, msgpack_values, max_size=2)))
    return out


def _decode_or_clear(data: bytes) -> Envelope | None:
    try:
        return decode(data)
    except DecodeError as exc:
        assert_clear(exc)
        return None


@given(st.binary(max_size=512))
@example(b"")
@example(b"\xc1")
@example(b"\x81\xa2id\xd9\xff")  # a str8 longer than the data
@example(b"\xdd\xff\xff\xff\xff")  # an array of 2**32-1 items, announced, not sent
def test_arbitrary_bytes_decode_or_raise_decode_error(data: bytes) -> None:
    _decode_or_clear(data)


@given(envelope_maps())
def test_hostile_envelope_maps_decode_or_raise_decode_error(fields: dict[Any, Any]) -> None:
    env = _decode_or_clear(msgspec.msgpack.encode(fields))
    if env is not None:
        assert encode(env)  # what was decoded encodes again (e.g. for the DLQ)


@given(valid_envelopes())
def test_valid_envelopes_round_trip(env: Envelope) -> None:
    assert decode(encode(env)) == env


# --- the sink side: subject, origin, version bounds, payload, ownership, mapping -------------


def _flow(**extra: Any) -> FlowPlan:
    cfg = decode_flow(
        {
            "name": "customers",
            "entity": "customer",
            "sink": {"adapter": "sqlite", "path": "unused.db", "table": "t", "key": "id"},
            **extra,
        }
    )
    data = compile_flow_data(cfg, source="fuzz", path="customers")
    return FlowPlan(cfg, agent="erp-agent", system="erp", _data=data)


PLANS = {
    "raw": _flow(),
    "mapped": _flow(
        from_canonical={
            "fields": {
                "id": "id",
                "name": "name",
                "city": "billing_address.city",
                "limit": {"from": "credit_limit", "convert": "money", "as_string": True},
                "terms": {"from": "payment_terms_days", "convert": "str"},
                "updated": {"from": "updated_at", "convert": "datetime", "format": "epoch_ms"},
            }
        },
        ownership={"system_of_record": "crm", "fields": {"credit_limit": "billing"}},
    ),
}


def _apply(plan: FlowPlan) -> Apply:
    # Apply.check and Apply._record read only the plan; the transport, inbox and sink are unused.
    return Apply(plan, None, None, Metrics(), lambda: None)  # type: ignore[arg-type]


customer_rows = st.fixed_dictionaries(
    {},
    optional={
        "id": wire_values,
        "name": wire_values,
        "billing_address": wire_values,
        "credit_limit": wire_values | st.fixed_dictionaries({"amount": wire_values, "currency": wire_values}),
        "payment_terms_days": wire_values,
        "updated_at": wire_values | st.datetimes().map(str),
        "tags": wire_values,
    },
).flatmap(lambda row: st.dictionaries(text_any, wire_values, max_size=2).map(lambda extra: {**extra, **row}))
"""Customer-shaped rows with any value in any field."""

NOW_US = time.time_ns() // 1000
""""Now" for the version bounds, fixed for the run (a strategy must not depend on the clock)."""

known_origins = st.sampled_from(["crm", "billing", "erp"])
origins = st.integers(0, 7).flatmap(lambda n: names | text_any if n == 7 else known_origins)
"""Mostly systems the flows know (so that envelopes get past the checks), sometimes anything."""
_consistent = st.tuples(st.sampled_from(["upserted", "deleted"]), origins).map(
    lambda t: f"evt.customer.{t[0]}.{t[1]}"
)
_any_subject = st.lists(
    st.text(st.characters(codec="utf-8", exclude_categories=["Z", "Cc"]), max_size=8), max_size=5
).map(".".join)
subjects = st.integers(0, 7).flatmap(lambda n: _any_subject if n == 7 else _consistent)
"""Mostly ``evt.customer.<event>.<origin>``, sometimes any subject without whitespace."""


@st.composite
def sink_side_cases(draw: st.DrawFn) -> tuple[str, str, Envelope]:
    """(plan, subject, envelope): mostly envelopes that pass the subject checks, so that the
    payload, ownership and mapping are reached, with hostile values everywhere."""
    plan = draw(st.sampled_from(sorted(PLANS)))
    subject = draw(subjects)
    parts = subject.split(".")
    consistent = len(parts) == 4 and draw(st.integers(0, 7)) != 7
    kind = f"customer.{parts[2]}" if consistent else draw(text_any)
    origin = parts[3] if consistent else draw(origins)
    version = draw(st.integers(1, NOW_US) | int64 | st.integers(NOW_US, NOW_US + 10**12))
    payload = draw(
        customer_rows.map(encode_payload)
        | st.just(encode_payload(None))
        | msgpack_values.map(lambda v: msgspec.Raw(msgspec.msgpack.encode(v)))
        | st.binary(max_size=32).map(msgspec.Raw)
    )
    env = Envelope(
        id=draw(text_any),
        kind=kind,
        flow="customers",
        key=draw(text_any),
        version=version,
        origin=origin,
        occurred_at=draw(int64),
        payload=payload,
    )
    return plan, subject, env


@given(sink_side_cases())
def test_hostile_envelopes_are_refused_with_a_permanent_error_or_become_records(
    case: tuple[str, str, Envelope],
) -> None:
    name, subject, env = case
    plan = PLANS[name]
    apply = _apply(plan)
    max_version = NOW_US + int(plan.consumer.max_version_skew * 1_000_000)
    try:
        apply.check(subject, env, max_version)
    except InvalidEnvelope as exc:
        assert_clear(exc)
        event(f"InvalidEnvelope: {exc.field}")
        return
    assert 1 <= env.version <= max_version
    assert subject == f"evt.{env.kind}.{env.origin}"
    if not plan.accepts(env.origin):
        event("echo or origin not accepted")
        return
    try:
        record = apply._record(env)
    except (DecodeError, MappingError) as exc:
        assert_clear(exc)
        event(type(exc).__name__)
        return
    event("not the owner" if record is None else "record")
    if record is not None:
        assert (record.key, record.version, record.deleted) == (env.key, env.version, env.is_delete)
        assert isinstance(record.row, dict)


# --- dead-letter headers -----------------------------------------------------------------------

header_names = st.sampled_from(sorted(DEAD_LETTER_HEADERS)) | text_any


@given(st.dictionaries(header_names, text_any, max_size=12))
def test_foreign_headers_read_as_a_dead_letter_or_raise_decode_error(headers: dict[str, str]) -> None:
    try:
        DeadLetter.from_headers(headers)
    except DecodeError as exc:
        assert_clear(exc)


@given(
    st.builds(
        DeadLetter,
        reason=text_any,
        error_class=names,
        flow=names,
        original_subject=names,
        permanent=st.booleans(),
        attempts=st.integers(0, 2**63 - 1),
        agent=names,
        stage=st.sampled_from(["apply", "capture"]),
        original_stream_seq=st.none() | st.integers(0, 2**63 - 1),
        original_msg_id=names,
    )
)
def test_dead_letter_headers_round_trip(letter: DeadLetter) -> None:
    headers = letter.to_headers()
    assert all("\n" not in v and "\r" not in v for v in headers.values())
    back = DeadLetter.from_headers(headers)
    assert back == msgspec.structs.replace(letter, reason=headers["Mesh-Reason"])
