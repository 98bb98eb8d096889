"""Fuzzing the webhook signature check and the event mapper (adapters/webhook/).

Properties: any signature header, timestamp header and body is either accepted or refused with a
one-line :class:`SignatureError` (401), and is accepted only when it carries a valid HMAC of
that very body and timestamp from a configured secret; a signature computed by the sender's
formula is accepted in both encodings, with rotation, and fails for any other body. A decoded
JSON body is either mapped to changes or refused with the webhook's one-line MappingError (422).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

import msgspec
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from adapters.webhook._mapping import EventMapper, MappingError, parse_json
from adapters.webhook._signature import SignatureError, Verifier, compute_signature
from adapters.webhook.config import WebhookSourceConfig
from tests.fuzz._support import assert_clear, json_values, text_any

pytestmark = [pytest.mark.fuzz, pytest.mark.timeout(600)]

NOW = 1_732_700_000
SECRETS = [b"whsec_primary_0123456789", b"whsec_previous_9876543210"]


def _verifier(encoding: str = "hex", timestamp_header: str | None = None) -> Verifier:
    return Verifier(SECRETS, encoding=encoding, timestamp_header=timestamp_header, clock=lambda: NOW)  # type: ignore[arg-type]


def _authentic(headers: dict[str, str], body: bytes, stamp: int, encoding: str) -> bool:
    """Whether the headers carry a signature of (stamp, body) by one of the secrets."""
    wanted = {compute_signature(s, stamp, body, encoding) for s in SECRETS}  # type: ignore[arg-type]
    return any(w in v for v in headers.values() for w in wanted)


header_text = text_any | st.text("tv0123456789abcdef=,; +/", max_size=80)


@given(
    st.sampled_from(["hex", "base64"]),
    st.booleans(),
    st.dictionaries(
        st.sampled_from(["Webhook-Signature", "Webhook-Timestamp", "Other"]), header_text, max_size=3
    ),
    st.binary(max_size=64),
)
@example("hex", False, {"Webhook-Signature": "t=" + "9" * 13 + ",v1=00"}, b"")
@example("hex", False, {"Webhook-Signature": "t=1732700000," + "v1=zz," * 40}, b"{}")
@example("base64", False, {"Webhook-Signature": "t=1732700000,v1====="}, b"")
def test_any_request_is_refused_with_signature_error_unless_authentic(
    encoding: str, ts_header: bool, headers: dict[str, str], body: bytes
) -> None:
    verifier = _verifier(encoding, "Webhook-Timestamp" if ts_header else None)
    try:
        stamp = verifier.verify(headers, body)
    except SignatureError as exc:
        assert_clear(exc)
        return
    assert _authentic(headers, body, stamp, encoding)  # never accepted by chance


@st.composite
def signed_requests(draw: st.DrawFn) -> tuple[str, bool, dict[str, str], bytes, int]:
    encoding = draw(st.sampled_from(["hex", "base64"]))
    ts_header = draw(st.booleans())
    stamp = NOW + draw(st.integers(-300, 300))
    body = draw(st.binary(max_size=256))
    signatures = [
        compute_signature(s, stamp, body, encoding)
        for s in draw(st.lists(st.sampled_from(SECRETS), min_size=1, max_size=2))
    ]
    noise = draw(st.lists(st.sampled_from(["v0=abc", "v2=" + "0" * 64, "x=y"]), max_size=2))
    entries = [*(f"v1={s}" for s in signatures), *noise]
    entries = draw(st.permutations(entries))
    if ts_header:
        headers = {"Webhook-Signature": " ".join(entries), "Webhook-Timestamp": str(stamp)}
    else:
        headers = {"Webhook-Signature": ",".join([f"t={stamp}", *entries])}
    return encoding, ts_header, headers, body, stamp


@given(signed_requests(), st.binary(max_size=8))
def test_signed_requests_are_accepted_and_any_other_body_refused(
    request: tuple[str, bool, dict[str, str], bytes, int], tamper: bytes
) -> None:
    encoding, ts_header, headers, body, stamp = request
    verifier = _verifier(encoding, "Webhook-Timestamp" if ts_header else None)
    assert verifier.verify(headers, body) == stamp
    other = body + tamper if tamper else body[:-1]
    assume(other != body)
    with pytest.raises(SignatureError, match="invalid signature"):
        verifier.verify(headers, other)


@given(st.integers(0, 10**12), st.binary(max_size=64), st.sampled_from(SECRETS))
def test_compute_signature_is_the_documented_hmac(stamp: int, body: bytes, secret: bytes) -> None:
    digest = hmac.new(secret, f"{stamp}.".encode() + body, hashlib.sha256).digest()
    assert compute_signature(secret, stamp, body) == digest.hex()
    assert compute_signature(secret, stamp, body, "base64") == base64.b64encode(digest).decode()


# --- the event mapper ----------------------------------------------------------------------------

MAPPER_CONFIGS = [
    WebhookSourceConfig(port=0, state_path="s.db", secret_env="S", key_field="data.id"),
    WebhookSourceConfig(
        port=0,
        state_path="s.db",
        secret_env="S",
        key_field="id",
        version_field="meta.version",
        type_field="type",
        delete_types=["deleted"],
        accept_types=["created", "deleted"],
        row_field="data",
        batch=True,
    ),
]

event_values = json_values | st.sampled_from(
    [
        "2024-02-29T12:00:00Z",
        "0001-01-01T00:00:00+14:00",
        "9999-12-31T23:59:59-14:00",
        "9" * 20,
        "-9" * 10,
        1e300,
    ]
)


@st.composite
def events(draw: st.DrawFn) -> Any:
    event: dict[str, Any] = draw(st.dictionaries(text_any, json_values, max_size=3))
    for key in draw(st.lists(st.sampled_from(["id", "data", "type", "meta"]), unique=True)):
        if key == "data":
            event["data"] = draw(st.fixed_dictionaries({}, optional={"id": event_values}) | event_values)
        elif key == "meta":
            event["meta"] = draw(st.fixed_dictionaries({}, optional={"version": event_values}) | event_values)
        elif key == "type":
            event["type"] = draw(st.sampled_from(["created", "deleted", "other"]) | event_values)
        else:
            event["id"] = draw(event_values)
    return event


@given(
    st.sampled_from(range(len(MAPPER_CONFIGS))),
    events() | st.lists(events(), max_size=3) | json_values,
    st.integers(0, 10**10),
)
def test_any_json_body_maps_or_raises_mapping_error(which: int, body: Any, stamp: int) -> None:
    mapper = EventMapper(MAPPER_CONFIGS[which])
    decoded = parse_json(msgspec.json.encode(body))  # as the source sees it
    try:
        changes, _ignored = mapper.changes(decoded, stamp)
    except MappingError as exc:
        assert_clear(exc)
        return
    for change in changes:
        assert change.key
        assert isinstance(change.key, str)
        assert -(2**63) <= change.version < 2**63
        assert isinstance(change.row, dict)
        msgspec.msgpack.encode(change.row)  # the row can go on the wire (envelope payload)


@given(st.binary(max_size=128))
def test_any_body_bytes_parse_or_raise_msgspec_decode_error(body: bytes) -> None:
    try:
        parse_json(body)
    except msgspec.DecodeError as exc:
        error: Exception = exc
    else:
        return
    assert str(error)  # the 400 answer says why
