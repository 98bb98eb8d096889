"""Fuzzing the agent config loader (``parse_agent_config``, TOML text in).

Properties: any text, any TOML document and any mutation of a valid config (a key removed, a
value replaced by any TOML value, an unknown key added, anywhere in the tree) is either accepted
or refused with one :class:`ConfigError` whose problems each carry a one-line message (and a
field path where a field is at fault); valid configs are accepted and mean what they say.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from mesh.config import AgentConfig, parse_agent_config
from mesh.errors import ConfigError
from tests.fuzz._support import assert_clear_config_error, names, text_any, toml_document, toml_values

pytestmark = [pytest.mark.fuzz, pytest.mark.timeout(600)]

BASE = Path(tempfile.gettempdir()) / "mesh-fuzz-config"
"""Relative paths resolve against this directory; nothing is created there."""


def _parse(text: str) -> AgentConfig | None:
    try:
        return parse_agent_config(text, source="fuzz.toml", base=BASE)
    except ConfigError as exc:
        assert_clear_config_error(exc)
        return None


@given(st.text(st.characters(codec="utf-8"), max_size=300))
@example("[agent]\nname = 'a'\nsystem = 's'\nstate_dir = 'x'\n[[flows]]\nname = 1\n")
@example("flows = 3\n[agent]\nname='a'\nsystem='s'\nstate_dir='d'\n")
@example("[agent]\nname = \"a\\n\"\nsystem = 's'\nstate_dir = 'x'\n")
def test_any_text_parses_or_raises_config_error(text: str) -> None:
    _parse(text)


@given(
    st.dictionaries(
        st.sampled_from(["agent", "nats", "streams", "relay", "flows", "log_level"]) | text_any,
        toml_values,
        max_size=6,
    )
)
def test_any_toml_document_parses_or_raises_config_error(doc: dict[str, Any]) -> None:
    _parse(toml_document(doc))


# --- mutations of a valid config ---------------------------------------------------------------

VALID: dict[str, Any] = {
    "log_level": "info",
    "agent": {
        "name": "erp-agent",
        "system": "erp",
        "state_dir": "state",
        "site": "plant-1",
        "allowed_paths": ["shared"],
    },
    "nats": {"servers": ["nats://127.0.0.1:4222"], "connect_timeout": 2.0},
    "streams": {"replicas": 1, "storage": "file"},
    "relay": {"batch_size": 100},
    "flows": [
        {
            "name": "customers",
            "entity": "customer",
            "source": {
                "adapter": "sqlite",
                "path": "erp.db",
                "table": "customers",
                "key": "id",
                "mode": "cursor",
                "cursor_column": "rev",
            },
            "consumer": {"max_deliver": 5, "max_version_skew": 60.0},
            "retry": {"initial_delay": 1.0, "errors": {"RejectedRecord": "retry"}},
            "to_canonical": {
                "fields": {
                    "id": {"from": "id", "convert": "str"},
                    "name": {"from": "company", "transform": ["trim"]},
                    "credit_limit": {"from": "limit", "convert": "money", "currency": "EUR"},
                    "billing_address.country": {"from": "country", "lookup": "countries"},
                    "updated_at": {
                        "from": "modified",
                        "convert": "datetime",
                        "format": "%d.%m.%Y %H:%M",
                        "timezone": "Europe/Berlin",
                    },
                },
                "lookups": {"countries": {"values": {"Germany": "DE", "France": "FR"}}},
            },
        },
        {
            "name": "orders",
            "entity": "sales_order",
            "accept_origins": ["crm"],
            "sink": {
                "adapter": "postgres",
                "dsn": "host=db dbname=erp user=mesh",
                "table": "orders",
                "key": ["order_id"],
                "password_env": "PGPASSWORD",
            },
            "ownership": {"system_of_record": "crm", "fields": {"reference": ["crm", "erp"]}},
        },
        {
            "name": "hooks",
            "entity": "payment",
            "source": {
                "adapter": "webhook",
                "port": 8080,
                "state_path": "hooks.db",
                "secret_env": "HOOK_SECRET",
                "key_field": "data.id",
                "type_field": "type",
                "delete_types": ["payment.deleted"],
            },
        },
        {
            "name": "export",
            "entity": "customer",
            "sink": {"adapter": "csv", "out_dir": "out", "state_path": "export.db"},
        },
    ],
}


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value in ``node`` (dict keys and list indexes)."""
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out.extend(_paths(v, (*prefix, k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.extend(_paths(v, (*prefix, i)))
    return out


@st.composite
def mutated_configs(draw: st.DrawFn) -> dict[str, Any]:
    doc = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(doc)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent: Any = doc
        for seg in path[:-1]:
            parent = parent[seg]
        last = path[-1]
        action = draw(st.sampled_from(["drop", "replace", "replace", "unknown", "tweak"]))
        if action == "drop":
            del parent[last]
        elif action == "replace":
            parent[last] = draw(toml_values)
        elif action == "unknown" and isinstance(parent[last], dict):
            parent[last][draw(names)] = draw(toml_values)
        else:  # a near miss of the same type: the edges of ranges, odd names, empty things
            old = parent[last]
            if isinstance(old, str):
                parent[last] = draw(
                    st.sampled_from(["", " ", "a\n", "../x", "x" * 300, old + "\n", old.upper()]) | text_any
                )
            elif isinstance(old, bool):
                parent[last] = not old
            elif isinstance(old, int | float):
                parent[last] = draw(
                    st.sampled_from(
                        [0, -1, 2**63 - 1, -(2**63), 0.0, -0.0, 1e308, float("inf"), float("nan"), 65536]
                    )
                )
            elif isinstance(old, list):
                parent[last] = draw(st.sampled_from([[], old * 2, [old]]))
            else:
                parent[last] = {}
    return doc


@given(mutated_configs())
def test_mutated_valid_configs_parse_or_raise_config_error_with_field_paths(doc: dict[str, Any]) -> None:
    _parse(toml_document(doc))


def test_the_valid_config_is_accepted_as_written() -> None:
    cfg = _parse(toml_document(VALID))
    assert cfg is not None
    assert (cfg.agent.name, cfg.agent.state_dir) == ("erp-agent", str(BASE / "state"))
    assert [f.name for f in cfg.flows] == ["customers", "orders", "hooks", "export"]
    assert cfg.flows[0].consumer.max_version_skew == 60.0


@given(st.lists(names, min_size=1, max_size=4, unique=True), names, names)
def test_generated_valid_configs_are_accepted(flows: list[str], agent: str, system: str) -> None:
    doc = {
        "agent": {"name": agent, "system": system, "state_dir": "state"},
        "flows": [
            {
                "name": f,
                "entity": "customer",
                "sink": {"adapter": "sqlite", "path": f"{f}.db", "table": "t", "key": "id"},
            }
            for f in flows
        ],
    }
    cfg = _parse(toml_document(doc))
    assert cfg is not None
    assert (cfg.agent.name, cfg.agent.system) == (agent, system)
    assert [f.name for f in cfg.flows] == flows
