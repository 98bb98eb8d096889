"""`meshctl config schema` (the JSON Schema of an agent config) and docs/config-reference.md
(every option of every adapter), both generated from the config Structs."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest
from typer.testing import CliRunner

from mesh.cli import app
from mesh.devtools.config_docs import builtin_registry, config_reference, field_docs

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "config-reference.md"
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*/*.toml") if p.name != "orchestrator.toml")
"""Agent configs (an orchestrator.toml is checked by test_saga_definition)."""


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    result = CliRunner().invoke(app, ["config", "schema"])
    assert result.exit_code == 0, result.output
    doc: dict[str, Any] = json.loads(result.output)
    jsonschema.Draft202012Validator.check_schema(doc)
    return doc


def _errors(schema: dict[str, Any], config: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(config)]


@pytest.mark.parametrize("path", EXAMPLES, ids=[f"{p.parent.name}/{p.name}" for p in EXAMPLES])
def test_the_examples_configs_pass_the_schema(schema: dict[str, Any], path: Path) -> None:
    # The examples are templates their run.py fills in: a bare ${port} is a number,
    # ${..._url} a URL, others text.
    text = re.sub(r'(?<=[=\[] )\$\{\w+\}(?!")', "0", path.read_text(encoding="utf-8"))
    text = re.sub(r"\$\{\w*url\}", "http://127.0.0.1:1", text)
    text = re.sub(r"\$\{\w+\}", "x", text)
    assert _errors(schema, tomllib.loads(text)) == []


def test_the_schema_refuses_what_config_check_refuses(schema: dict[str, Any]) -> None:
    good = {
        "agent": {"name": "erp", "system": "erp", "state_dir": "/var/lib/mesh/erp"},
        "flows": [{"name": "c", "entity": "customer",
                   "sink": {"adapter": "sqlite", "path": "x.db", "table": "t", "key": "id"}}],
    }  # fmt: skip
    assert _errors(schema, good) == []
    typo = json.loads(json.dumps(good))
    typo["flows"][0]["sink"]["tabel"] = "t"
    assert _errors(schema, typo), "an unknown option of an adapter passes"
    unknown = json.loads(json.dumps(good))
    unknown["flows"][0]["sink"]["adapter"] = "nosuch"
    assert _errors(schema, unknown)
    wrong_type = json.loads(json.dumps(good))
    wrong_type["agent"]["shutdown_grace"] = "10s"
    assert _errors(schema, wrong_type)
    missing = json.loads(json.dumps(good))
    del missing["flows"][0]["sink"]["key"]
    assert _errors(schema, missing)


def test_the_schema_documents_every_adapter_option(schema: dict[str, Any]) -> None:
    defs = schema["$defs"]
    for plugin in builtin_registry():
        for role in plugin.roles:
            decl = plugin.role(role)
            assert decl is not None
            node = defs[decl.config.__name__]
            docs = field_docs(decl.config)
            for f in msgspec.structs.fields(decl.config):
                assert f.encode_name in node["properties"], (plugin.name, role, f.name)
                if f.name in docs:
                    assert node["properties"][f.encode_name]["description"] == docs[f.name]
    # e.g. the REST sink's method, which the README did not document:
    rest_sink = defs[builtin_registry()["rest"].sink.config.__name__]  # type: ignore[union-attr]
    assert "description" in rest_sink["properties"]["method"]


def test_config_schema_writes_a_file(tmp_path: Path, schema: dict[str, Any]) -> None:
    out = tmp_path / "agent-config.schema.json"
    result = CliRunner().invoke(app, ["config", "schema", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text(encoding="utf-8")) == schema
    result = CliRunner().invoke(app, ["config", "schema", "--output", str(tmp_path / "no" / "such.json")])
    assert result.exit_code == 2
    assert "cannot write" in result.output


def test_the_reference_is_current() -> None:
    """docs/config-reference.md is what the generator writes today: after a config change run
    `python -m mesh.devtools.config_docs > docs/config-reference.md`."""
    assert REFERENCE.read_text(encoding="utf-8") == config_reference(), (
        "docs/config-reference.md is stale: "
        "run `python -m mesh.devtools.config_docs > docs/config-reference.md`"
    )


def test_the_reference_names_every_option_of_every_adapter() -> None:
    text = config_reference()
    for plugin in builtin_registry():
        for role in plugin.roles:
            decl = plugin.role(role)
            assert decl is not None
            section = text.split(f'#### {role}: `[flows.{role}]` `adapter = "{plugin.name}"`', 1)[1]
            section = section.split("\n#### ", 1)[0].split("\n### ", 1)[0]
            for f in msgspec.structs.fields(decl.config):
                if f.encode_name != "adapter":
                    assert f"| `{f.encode_name}` |" in section, (plugin.name, role, f.encode_name)
    assert "| `shutdown_grace` | number (> 0) | `10.0` | On SIGTERM" in text
