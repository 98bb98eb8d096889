"""The adapter registry: discovery through entry points, broken and duplicate plugins, lazy
declarations, and the decoders built from it."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import msgspec
import pytest

from adapters.sql.config import SqliteSinkConfig, SqliteSourceConfig
from mesh.config import AdapterConfig, decode_flow, parse_agent_config
from mesh.errors import ConfigError, PluginError
from mesh.plugins import AdapterPlugin, AdapterRegistry, Role, adapter_registry, discover

BUILT_IN = {
    "csv": "adapters.files.plugin:CSV",
    "postgres": "adapters.sql.plugin:POSTGRES",
    "rest": "adapters.rest.plugin:REST",
    "sqlite": "adapters.sql.plugin:SQLITE",
    "webhook": "adapters.webhook.plugin:WEBHOOK",
}


def ep(name: str, value: str) -> EntryPoint:
    return EntryPoint(name=name, value=value, group="mesh.adapters")


def test_the_built_in_adapters_are_installed_entry_points_of_this_distribution() -> None:
    registry = adapter_registry()
    for name, value in BUILT_IN.items():
        assert name in registry
        assert f"{value!r} (distribution connector-mesh " in registry.origins[name]
    assert set(BUILT_IN) <= set(registry.names("source"))
    assert set(BUILT_IN) - {"webhook"} <= set(registry.names("sink"))
    assert registry["sqlite"].capabilities == {
        "source", "sink", "capture", "preflight", "operation", "bulk", "reconcile",
    }  # fmt: skip
    assert registry["csv"].capabilities == {"source", "sink", "runs"}


def test_a_plugin_that_does_not_import_names_its_entry_point() -> None:
    with pytest.raises(PluginError) as info:
        discover([ep("sqlite", BUILT_IN["sqlite"]), ep("oracle", "mesh_oracle.plugin:ORACLE")])
    message = str(info.value)
    assert "entry point mesh.adapters:oracle = 'mesh_oracle.plugin:ORACLE'" in message
    assert "does not load: ModuleNotFoundError" in message


def test_a_name_declared_twice_is_an_error_naming_both() -> None:
    with pytest.raises(PluginError) as info:
        discover([ep("sqlite", BUILT_IN["sqlite"]), ep("sqlite", BUILT_IN["sqlite"])])
    assert str(info.value).count("entry point mesh.adapters:sqlite") == 2
    assert "declared twice" in str(info.value)
    with pytest.raises(PluginError, match="declared twice"):
        AdapterRegistry([adapter_registry()["sqlite"], adapter_registry()["sqlite"]])


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (ep("sqlite3", BUILT_IN["sqlite"]), "declares adapter 'sqlite'; the entry point must be named alike"),
        (ep("group", "mesh.plugins:ENTRY_POINT_GROUP"), "names str, not a mesh.plugins.AdapterPlugin"),
    ],
)
def test_an_entry_point_must_name_a_declaration_of_its_own_name(entry: EntryPoint, expected: str) -> None:
    with pytest.raises(PluginError, match=expected):
        discover([entry])


def test_a_declaration_is_checked_when_it_is_made() -> None:
    with pytest.raises(ValueError, match="neither a source nor a sink"):
        AdapterPlugin(name="empty")
    with pytest.raises(ValueError, match="has tag 'sqlite'"):
        AdapterPlugin(name="lite", source=Role(SqliteSourceConfig, "adapters.sql.sqlite:SqliteSource"))
    with pytest.raises(ValueError, match="is not 'module:attribute'"):
        AdapterPlugin(name="sqlite", sink=Role(SqliteSinkConfig, "adapters.sql.sqlite.SqliteSink"))
    with pytest.raises(ValueError, match="must subclass"):
        AdapterPlugin(name="x", sink=Role(dict, "a:b"))  # type: ignore[arg-type]


class _NoSource(AdapterConfig, frozen=True, tag="nosource"):
    path: str


def test_a_factory_that_does_not_load_is_a_plugin_error_when_a_flow_uses_it() -> None:
    registry = AdapterRegistry([AdapterPlugin(name="nosource", source=Role(_NoSource, "no_such_mod:Source"))])
    cfg = decode_flow(
        {"name": "f", "entity": "customer", "source": {"adapter": "nosource", "path": "x"}}, registry=registry
    ).source
    assert isinstance(cfg, _NoSource)
    with pytest.raises(PluginError, match="cannot load its source factory 'no_such_mod:Source'"):
        registry.open_source(cfg)
    with pytest.raises(PluginError, match="no installed adapter declares"):
        adapter_registry().open_source(cfg)


def test_decoders_are_built_from_the_registry_they_are_given() -> None:
    only_sqlite = AdapterRegistry([adapter_registry()["sqlite"]])
    text = """
[agent]
name = "a"
system = "erp"
state_dir = "state"
[[flows]]
name = "f"
entity = "customer"
[flows.source]
adapter = "csv"
state_path = "s.db"
path = "in.csv"
key = "id"
"""
    assert parse_agent_config(text, base=Path("/tmp")).flows[0].source is not None
    with pytest.raises(ConfigError) as info:
        parse_agent_config(text, source="a.toml", registry=only_sqlite)
    assert info.value.problems == [
        (
            "flows[0].source.adapter",
            "invalid value 'csv' (expected one of the installed source adapters: sqlite)",
        )
    ]
    assert str(info.value) == f"a.toml: {info.value.problems[0].path}: {info.value.problems[0].message}"


def test_config_error_lists_problems_one_per_line_and_survives_pickling() -> None:
    import pickle

    exc = ConfigError(source="agent.toml", problems=[("flows[0].name", "duplicate"), ("", "empty file")])
    assert str(exc) == "agent.toml: flows[0].name: duplicate\nagent.toml: empty file"
    assert exc.path == "flows[0].name"
    again = pickle.loads(pickle.dumps(exc))
    assert (again.source, again.problems) == (exc.source, exc.problems)
    assert str(ConfigError("no such file")) == "no such file"


def test_loading_the_registry_and_a_config_imports_no_driver_and_no_adapter() -> None:
    """Declarations are lazy: httpx, aiosqlite and the adapters' implementations are imported
    only when a flow opens them, never to decode or check a config. (A PostgreSQL DSN is checked
    with libpq's own parser, so psycopg's conninfo module is the one driver import allowed.)"""
    code = """
import sys, msgspec
from mesh.config import decode_flow
decode_flow({"name": "f", "entity": "customer",
             "source": {"adapter": "postgres", "dsn": "host=db", "table": "t", "key": "id"},
             "sink": {"adapter": "rest", "base_url": "https://x.example", "upsert_path": "/c/{key}",
                      "state_path": "s.db"}})
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("httpx", "aiosqlite")
                or m in ("adapters.sql.postgres", "adapters.rest.sink", "adapters.sql.sqlite"))
print(",".join(loaded))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_struct_options_of_the_built_decoders_match_the_base() -> None:
    flow_type = type(decode_flow({"name": "f", "entity": "customer"}))
    assert flow_type.__struct_config__.forbid_unknown_fields
    with pytest.raises(ConfigError, match="unknown field `sorce`"):
        decode_flow({"name": "f", "entity": "customer", "sorce": {}})
    assert msgspec.json.schema(flow_type)


def test_with_no_adapter_installed_the_error_says_to_reinstall() -> None:
    """Stale package metadata (an editable install from before the entry points existed) leaves
    the registry empty: the error says so instead of listing nothing."""
    with pytest.raises(ConfigError) as info:
        decode_flow(
            {"name": "f", "entity": "customer", "sink": {"adapter": "sqlite"}}, path="flows[0]",
            registry=AdapterRegistry([]),
        )  # fmt: skip
    ((path, message),) = info.value.problems
    assert path == "flows[0].sink.adapter"
    assert "no sink adapter is installed" in message
    assert "reinstall connector-mesh" in message
