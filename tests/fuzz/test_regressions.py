"""The bugs the fuzzers found, each pinned by a plain test (issue 10, item 10)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from adapters.webhook._mapping import EventMapper
from adapters.webhook._mapping import MappingError as WebhookMappingError
from adapters.webhook.config import WebhookSourceConfig
from mesh.config import decode_adapter_config, parse_agent_config
from mesh.envelope import Envelope, decode_payload
from mesh.errors import ConfigError, DecodeError, InvalidEnvelope, MappingError
from mesh.mapping import compile_mapping
from mesh.redact import redact_urls
from tests.fuzz._support import assert_clear, assert_clear_config_error, toml_document


@pytest.mark.parametrize("when", [1e20, "1e400", 10**30, -(10**15)])
def test_an_epoch_timestamp_beyond_the_datetime_range_is_a_mapping_error(when: Any) -> None:
    mapper = compile_mapping(
        {
            "fields": {
                "id": "id",
                "name": "n",
                "updated_at": {"from": "t", "convert": "datetime", "format": "epoch"},
            }
        },
        "customer",
        "to_canonical",
    )
    with pytest.raises(MappingError, match="out of the range of datetimes") as info:
        mapper.map({"id": "1", "n": "A", "t": when})
    assert_clear(info.value)


@pytest.mark.parametrize("when", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"])
def test_an_offset_that_moves_a_datetime_out_of_range_is_a_mapping_error(when: str) -> None:
    to = compile_mapping(
        {"fields": {"id": "id", "name": "n", "updated_at": {"from": "t", "convert": "datetime"}}},
        "customer",
        "to_canonical",
    )
    with pytest.raises(MappingError, match="out of the range of datetimes"):
        to.map({"id": "1", "n": "A", "t": when})


def test_a_datetime_at_the_edge_written_in_a_zone_ahead_is_a_mapping_error() -> None:
    back = compile_mapping(
        {"fields": {"t": {"from": "updated_at", "convert": "datetime", "timezone": "Asia/Tokyo"}}},
        "customer",
        "from_canonical",
    )
    with pytest.raises(MappingError, match="out of the range of datetimes"):
        back.map({"updated_at": "9999-12-31T23:00:00Z"})


@pytest.mark.parametrize(
    ("agent", "flow_path", "where"),
    [
        ({"state_dir": "x\x00"}, "a.db", "agent.state_dir"),
        ({"state_dir": "x", "allowed_paths": ["ok", "b\x00"]}, "a.db", "agent.allowed_paths[1]"),
        ({"state_dir": "x"}, "a\x00b.db", "flows.f.sink"),
    ],
)
def test_a_nul_in_a_configured_path_is_a_config_error_with_its_field(
    agent: dict[str, Any], flow_path: str, where: str
) -> None:
    doc = {
        "agent": {"name": "a", "system": "s", **agent},
        "flows": [
            {
                "name": "f",
                "entity": "customer",
                "sink": {"adapter": "sqlite", "path": flow_path, "table": "t", "key": "id"},
            }
        ],
    }
    with pytest.raises(ConfigError) as info:
        parse_agent_config(toml_document(doc), source="agent.toml")
    assert_clear_config_error(info.value)
    assert info.value.problems[0].path == where
    assert "NUL" in info.value.problems[0].message


def test_config_problems_stay_one_printable_line_whatever_a_key_holds() -> None:
    doc = {"agent": {"name": "a", "system": "s", "state_dir": "x", "bad\r\x1b[31mkey": 1}}
    with pytest.raises(ConfigError) as info:
        parse_agent_config(toml_document(doc), source="agent.toml")
    assert_clear_config_error(info.value)
    assert "\\r\\x1b[31mkey" in str(info.value)


def test_a_payload_decode_error_quotes_the_senders_kind_and_id() -> None:
    env = Envelope(
        id="x\ny",
        kind="customer.upserted\x1b",
        flow="f",
        key="k",
        version=1,
        origin="crm",
        occurred_at=0,
        payload=msgspec.Raw(b"\x01"),
    )
    with pytest.raises(DecodeError) as info:
        decode_payload(env)
    assert_clear(info.value)
    assert "'x\\ny'" in str(info.value)


def test_an_invalid_envelope_message_escapes_the_subject() -> None:
    exc = InvalidEnvelope("kind", "", "customer.upserted (from subject evt.customer.upserted.\x1b[2J)")
    assert_clear(exc)
    assert "\\x1b[2J" in str(exc)


def test_a_webhook_event_with_an_integer_beyond_64_bits_is_refused_not_a_capture_crash() -> None:
    mapper = EventMapper(WebhookSourceConfig(port=0, state_path="s.db", secret_env="S", key_field="id"))
    with pytest.raises(WebhookMappingError, match="beyond 64 bits") as info:
        mapper.changes({"id": 1, "amount": 2**64}, 1_732_700_000)
    assert_clear(info.value)
    changes, _ = mapper.changes({"id": 1, "amount": 2**63 - 1}, 1_732_700_000)
    assert changes[0].row["amount"] == 2**63 - 1


@pytest.mark.parametrize(
    "dsn", ["host=db hunter2secret", "postgresql://mesh:hunter2%zzsecret@db/erp", "host=db hunter2secret=x"]
)
def test_an_unparsable_dsn_is_refused_without_repeating_any_part_of_it(dsn: str) -> None:
    with pytest.raises(ConfigError) as info:
        decode_adapter_config("source", {"adapter": "postgres", "dsn": dsn, "table": "t", "key": "id"})
    assert "hunter2" not in str(info.value)
    assert "not a valid libpq connection string" in str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0nats://:0000@hub", "0nats://***@hub"), ("xpostgresql://u:p@db/erp", "xpostgresql://***@db/erp")],
)
def test_redact_urls_finds_a_url_glued_to_a_word(text: str, expected: str) -> None:
    assert redact_urls(text) == expected


@pytest.mark.parametrize("code", [[], {"a": 1}, ["EUR"]])
def test_a_currency_read_from_the_record_that_is_a_list_or_map_is_a_mapping_error(code: Any) -> None:
    mapper = compile_mapping(
        {
            "fields": {
                "id": "id",
                "name": "n",
                "credit_limit": {"from": "a", "convert": "money", "currency_from": "c"},
            }
        },
        "customer",
        "to_canonical",
    )
    with pytest.raises(MappingError, match="not an ISO 4217 code") as info:
        mapper.map({"id": "1", "n": "A", "a": "1.00", "c": code})
    assert_clear(info.value)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_a_non_finite_float_converted_to_str_is_a_mapping_error(value: float) -> None:
    mapper = compile_mapping(
        {"fields": {"id": "id", "name": "n", "number": {"from": "c", "convert": "str"}}},
        "customer",
        "to_canonical",
    )
    with pytest.raises(MappingError, match="not a finite number") as info:
        mapper.map({"id": "1", "n": "A", "c": value})
    assert_clear(info.value)


def test_a_misspelt_dsn_option_is_still_named() -> None:
    with pytest.raises(ConfigError, match='invalid connection option "colour"'):
        decode_adapter_config(
            "source", {"adapter": "postgres", "dsn": "host=db colour=red", "table": "t", "key": "id"}
        )
