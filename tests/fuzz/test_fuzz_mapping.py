"""Fuzzing the mapping compiler and the mappers it builds (mesh/mapping.py, mesh/_mapping_*.py).

Properties: any mapping table (rules assembled from real and made-up field names, converters,
formats, time zones, currencies, value maps, lookups, nested ``items``) either compiles or is
refused with one :class:`ConfigError` listing one-line problems with their field paths; a
compiled mapper turns any record into a dict or refuses it with a one-line
:class:`MappingError`; and a customer mapped to canonical and back is the row it was.
"""

from __future__ import annotations

import datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st

from mesh.canonical import _paths
from mesh.canonical.entities import ENTITIES
from mesh.errors import ConfigError, MappingError
from mesh.mapping import CONVERTERS, TRANSFORMS, Mapper, compile_mapping
from tests.fuzz._support import assert_clear, assert_clear_config_error, json_values, text_any, toml_values

pytestmark = [pytest.mark.fuzz, pytest.mark.timeout(600)]


def _field_paths(tp: type, prefix: str = "", depth: int = 0) -> list[str]:
    out = []
    for name, f in _paths.struct_fields(tp).items():
        out.append(prefix + name)
        core, _ = _paths.unwrap(f.type)
        if depth < 2 and isinstance(core, type) and hasattr(core, "__struct_fields__"):
            out.extend(_field_paths(core, f"{prefix}{name}.", depth + 1))
    return out


ENTITY_PATHS = {name: _field_paths(tp) for name, tp in sorted(ENTITIES.items())}
SOURCE_COLUMNS = ["id", "name", "amount", "when", "code", "flag", "lines", "cur", "Ship.City", "lines[0].qty"]

formats = (
    st.sampled_from(["iso", "epoch", "epoch_ms", "%d.%m.%Y", "%Y-%m-%d %H:%M", "%H", "%", "%Q", "x"])
    | text_any
)
zones = st.sampled_from(["UTC", "Europe/Berlin", "America/New_York", "Nope/Zone", "", "../etc"]) | text_any
currencies = st.sampled_from(["EUR", "JPY", "KWD", "CLF", "XAU", "eur", ""]) | text_any


def _paths_for(entity: str) -> st.SearchStrategy[str]:
    return st.sampled_from(ENTITY_PATHS[entity]) | st.sampled_from(SOURCE_COLUMNS) | text_any


@st.composite
def rules(
    draw: st.DrawFn, targets: st.SearchStrategy[str], sources: st.SearchStrategy[str], depth: int = 0
) -> Any:
    if draw(st.integers(0, 4)) == 0:
        return draw(sources)
    rule: dict[str, Any] = {}
    start = draw(st.sampled_from(["from", "from", "from", "const", "position", "none", "both"]))
    if start in ("from", "both"):
        rule["from"] = draw(sources | sources.map(lambda s: "$." + s))
    if start in ("const", "both"):
        rule["const"] = draw(toml_values)
    if start == "position":
        rule["position"] = True
    optional: dict[str, st.SearchStrategy[Any]] = {
        "transform": st.lists(st.sampled_from(TRANSFORMS) | text_any, max_size=3),
        "map": st.dictionaries(text_any | st.sampled_from(["1", "true", "A"]), toml_values, max_size=3),
        "map_default": toml_values,
        "lookup": st.sampled_from(["countries", "codes", "missing"]),
        "convert": st.sampled_from(CONVERTERS) | text_any,
        "format": formats,
        "timezone": zones,
        "currency": currencies,
        "currency_from": sources,
        "rounding": st.sampled_from(["reject", "half_even", "up", "sideways"]),
        "as_string": st.booleans(),
        "default": toml_values,
        "required": st.booleans(),
    }
    for key in draw(st.lists(st.sampled_from(sorted(optional)), max_size=4, unique=True)):
        rule[key] = draw(optional[key])
    if depth == 0 and draw(st.integers(0, 6)) == 0:
        rule["items"] = draw(st.dictionaries(targets, rules(targets, sources, depth + 1), max_size=3))
    return rule


@st.composite
def mappings(draw: st.DrawFn) -> tuple[str, str, dict[str, Any]]:
    entity = draw(st.sampled_from(sorted(ENTITIES)) | text_any)
    direction = draw(st.sampled_from(["to_canonical", "from_canonical"]))
    canonical = _paths_for(entity) if entity in ENTITIES else text_any
    columns = st.sampled_from(SOURCE_COLUMNS) | text_any
    targets, sources = (canonical, columns) if direction == "to_canonical" else (columns, canonical)
    fields = draw(st.dictionaries(targets, rules(targets, sources), max_size=6))
    cfg: dict[str, Any] = {"fields": fields}
    if draw(st.booleans()):
        cfg["lookups"] = {
            "countries": {"values": {"Germany": "DE", "France": "FR", "1": 7}},
            "codes": draw(
                st.dictionaries(
                    st.sampled_from(
                        ["values", "sqlite", "table", "key", "value", "refresh", "default", "bogus"]
                    ),
                    toml_values,
                    max_size=3,
                )
            ),
        }
    if draw(st.integers(0, 9)) == 0:  # not even a mapping table
        cfg = draw(st.dictionaries(text_any | st.just("fields"), toml_values, max_size=3))
    return entity, direction, cfg


def _compile(entity: str, direction: str, cfg: dict[str, Any]) -> Mapper | None:
    try:
        return compile_mapping(cfg, entity, direction, source="fuzz.toml", path="flows[0].mapping")  # type: ignore[arg-type]
    except ConfigError as exc:
        assert_clear_config_error(exc)
        return None


record_values = (
    json_values
    | st.sampled_from(
        [
            "2024-02-29",
            "29.02.2024",
            "2024-02-29T12:30:00+01:00",
            "1e400",
            "NaN",
            "-0",
            "12.345",
            " EUR ",
            "true",
        ]
    )
    | st.dates().map(str)
    | st.datetimes().map(str)
    | st.integers(-(2**80), 2**80)
    | st.floats()
)


@given(
    mappings(),
    st.lists(
        st.dictionaries(
            st.sampled_from([*SOURCE_COLUMNS, "lines", "Ship"]) | text_any, record_values, max_size=6
        ),
        max_size=3,
    ),
)
@example(
    (
        "customer",
        "to_canonical",
        {
            "fields": {
                "id": "id",
                "name": "name",
                "updated_at": {"from": "when", "convert": "datetime", "format": "epoch"},
            }
        },
    ),
    [
        {"id": "1", "name": "A", "when": 1e20},
        {"id": "1", "name": "A", "when": "1e400"},
        {"id": "1", "name": "A", "when": 10**30},
    ],
)
def test_any_mapping_compiles_or_raises_config_error_and_maps_or_raises_mapping_error(
    mapping: tuple[str, str, dict[str, Any]], records: list[dict[str, Any]]
) -> None:
    mapper = _compile(*mapping)
    event("compiled" if mapper is not None else "refused at compile time")
    if mapper is None:
        return
    for record in records:
        try:
            out = mapper.map(record)
        except MappingError as exc:
            assert_clear(exc)
            event("record refused")
        else:
            assert isinstance(out, dict)
            event("record mapped")


# --- round trip ---------------------------------------------------------------------------------

TO = {
    "fields": {
        "id": {"from": "id", "convert": "str"},
        "name": "name",
        "credit_limit": {"from": "limit", "convert": "money", "currency": "EUR"},
        "payment_terms_days": {"from": "terms", "convert": "int"},
        "updated_at": {
            "from": "modified",
            "convert": "datetime",
            "format": "%Y-%m-%d %H:%M:%S",
            "timezone": "Europe/Berlin",
        },
        "billing_address.country": {"from": "country", "lookup": "countries"},
    },
    "lookups": {"countries": {"values": {"Germany": "DE", "France": "FR"}}},
}
FROM = {
    "fields": {
        "id": "id",
        "name": "name",
        "limit": {"from": "credit_limit", "convert": "money", "currency": "EUR", "as_string": True},
        "terms": "payment_terms_days",
        "modified": {
            "from": "updated_at",
            "convert": "datetime",
            "format": "%Y-%m-%d %H:%M:%S",
            "timezone": "Europe/Berlin",
        },
        "country": {"from": "billing_address.country", "map": {"DE": "Germany", "FR": "France"}},
    }
}
TO_CANONICAL = compile_mapping(TO, "customer", "to_canonical")
FROM_CANONICAL = compile_mapping(FROM, "customer", "from_canonical")

customers = st.fixed_dictionaries(
    {
        "id": st.text(st.characters(codec="utf-8"), min_size=1, max_size=20),
        "name": st.text(st.characters(codec="utf-8"), min_size=1, max_size=40),
        "limit": st.decimals(min_value=-(10**12), max_value=10**12, places=2).map(str),
        "terms": st.integers(0, 3650),
        # Berlin wall-clock times that exist exactly once (no DST gap or fold), second precision.
        "modified": st.datetimes(datetime.datetime(1990, 1, 1), datetime.datetime(2100, 1, 1))
        .map(lambda d: d.replace(microsecond=0))
        .filter(lambda d: d.month not in (3, 10))
        .map(lambda d: d.strftime("%Y-%m-%d %H:%M:%S")),
        "country": st.sampled_from(["Germany", "France"]),
    }
)


@given(customers)
def test_a_customer_mapped_to_canonical_and_back_is_unchanged(row: dict[str, Any]) -> None:
    canonical = TO_CANONICAL.map(row)
    assert canonical["credit_limit"]["currency"] == "EUR"
    back = FROM_CANONICAL.map(canonical)
    assert Decimal(back.pop("limit")) == Decimal(row["limit"])
    assert back == {k: v for k, v in row.items() if k != "limit"}


# --- well-formed mappings: compiled, then fed hostile records -------------------------------------------

TO_RULES: dict[str, st.SearchStrategy[Any]] = {
    "updated_at": st.fixed_dictionaries(
        {"from": st.just("when"), "convert": st.just("datetime")},
        optional={
            "format": st.sampled_from(["iso", "epoch", "epoch_ms", "%d.%m.%Y %H:%M", "%Y%m%d%H%M%S"]),
            "timezone": st.sampled_from(["UTC", "Europe/Berlin", "Pacific/Kiritimati", "Etc/GMT+12"]),
        },
    ),
    "credit_limit": st.fixed_dictionaries(
        {"from": st.just("amount"), "convert": st.just("money")},
        optional={"rounding": st.sampled_from(["half_even", "up", "floor", "reject"])},
    ).flatmap(
        lambda r: st.sampled_from(
            [{**r, "currency": c} for c in ("EUR", "JPY", "KWD", "CLF")] + [{**r, "currency_from": "cur"}]
        )
    ),
    "payment_terms_days": st.fixed_dictionaries(
        {"from": st.just("days"), "convert": st.sampled_from(["int"])},
        optional={"default": st.integers(0, 3650)},
    ),
    "number": st.fixed_dictionaries(
        {"from": st.just("code"), "convert": st.just("str")},
        optional={"transform": st.lists(st.sampled_from(TRANSFORMS), max_size=3)},
    ),
    "status": st.fixed_dictionaries(
        {"from": st.just("flag"), "map": st.just({"A": "active", "B": "blocked"})},
        optional={"map_default": st.just("inactive")},
    ),
    "billing_address.country": st.fixed_dictionaries(
        {"from": st.just("country"), "lookup": st.just("countries")}
    ),
    "tags": st.just({"const": ["vip"]}),
}
FROM_RULES: dict[str, st.SearchStrategy[Any]] = {
    "when": st.fixed_dictionaries(
        {"from": st.just("updated_at"), "convert": st.just("datetime")},
        optional={
            "format": st.sampled_from(["iso", "epoch", "epoch_ms", "%d.%m.%Y %H:%M"]),
            "timezone": st.sampled_from(["UTC", "Europe/Berlin", "Pacific/Kiritimati", "Etc/GMT+12"]),
        },
    ),
    "amount": st.fixed_dictionaries(
        {"from": st.just("credit_limit"), "convert": st.just("money")},
        optional={"as_string": st.booleans(), "currency": st.sampled_from(["EUR", "JPY"])},
    ),
    "minor": st.just(
        {"from": "credit_limit.amount", "convert": "minor_units", "currency_from": "$.currency"}
    ),
    "days": st.fixed_dictionaries(
        {"from": st.just("payment_terms_days")},
        optional={"convert": st.sampled_from(["int", "str", "float", "decimal"])},
    ),
    "name": st.fixed_dictionaries(
        {"from": st.just("name")}, optional={"transform": st.lists(st.sampled_from(TRANSFORMS), max_size=3)}
    ),
    "flag": st.just({"from": "status", "map": {"active": "A", "blocked": "B"}, "map_default": "X"}),
    "ok": st.just({"from": "contact.email", "convert": "bool", "default": False}),
}
LOOKUPS = {"countries": {"values": {"Germany": "DE", "France": "FR"}, "default": "US"}}

hostile_values = (
    record_values
    | st.sampled_from(
        [
            "0001-01-01T00:00:00+14:00",
            "9999-12-31T23:59:59-12:00",
            "99999999999999",
            "1" * 40,
            "EUR",
            "jpy",
            "XAU",
            "31.12.9999 23:59",
            "00000000000000",
            "Germany",
            " france ",
        ]
    )
    | st.fixed_dictionaries(
        {"amount": record_values, "currency": st.sampled_from(["EUR", "JPY", "XYZ"]) | record_values}
    )
)


@st.composite
def well_formed(draw: st.DrawFn) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    direction = draw(st.sampled_from(["to_canonical", "from_canonical"]))
    table = TO_RULES if direction == "to_canonical" else FROM_RULES
    fields: dict[str, Any] = {"id": "id", "name": "name"} if direction == "to_canonical" else {"id": "id"}
    for target in draw(st.lists(st.sampled_from(sorted(table)), min_size=1, max_size=5, unique=True)):
        fields[target] = draw(table[target])
    columns = (
        ["id", "name", "when", "amount", "cur", "days", "code", "flag", "country"]
        if direction == "to_canonical"
        else [
            "id",
            "name",
            "updated_at",
            "credit_limit",
            "payment_terms_days",
            "status",
            "contact",
            "currency",
        ]
    )
    records = draw(
        st.lists(
            st.dictionaries(st.sampled_from(columns), hostile_values, max_size=len(columns)),
            min_size=1,
            max_size=4,
        )
    )
    return direction, {"fields": fields, "lookups": LOOKUPS}, records


@given(well_formed())
def test_well_formed_mappings_compile_and_map_any_record_or_raise_mapping_error(
    case: tuple[str, dict[str, Any], list[dict[str, Any]]],
) -> None:
    direction, cfg, records = case
    mapper = compile_mapping(cfg, "customer", direction)  # type: ignore[arg-type]
    for record in records:
        try:
            out = mapper.map(record)
        except MappingError as exc:
            assert_clear(exc)
            event("record refused")
        else:
            assert isinstance(out, dict)
            event("record mapped")
