"""JSON Schema + AsyncAPI export and the breaking-change check (`meshctl schema`)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest
from typer.testing import CliRunner

from mesh.canonical import ENTITIES, Customer, Money
from mesh.canonical.schema import (
    JSON_SCHEMA_DIALECT,
    asyncapi_document,
    check_schemas,
    current_schemas,
    entity_schema,
    envelope_schema,
    export_schemas,
    schema_filename,
)
from mesh.cli import app
from mesh.envelope import CONTENT_TYPE, Envelope, encode, encode_payload, envelope_id
from mesh.transport import dlq_subject, event_subject

runner = CliRunner()

# --- JSON Schema -------------------------------------------------------------------------------


def _customer() -> Customer:
    return msgspec.convert(
        {
            "id": "ALFKI",
            "name": "Alfreds Futterkiste",
            "external_ids": {"erp": "ALFKI"},
            "credit_limit": {"amount": 500000, "currency": "EUR"},
            "status": "active",
            "billing_address": {"line1": "Obere Str. 57", "city": "Berlin", "country": "DE"},
            "contact": {"email": "maria@example.com"},
            "updated_at": "2024-05-01T08:00:00Z",
        },
        Customer,
    )


@pytest.mark.parametrize("name", sorted(ENTITIES))
def test_every_entity_schema_is_valid_json_schema_2020_12(name: str) -> None:
    doc = entity_schema(name)
    cls = ENTITIES[name]
    assert doc["$schema"] == JSON_SCHEMA_DIALECT
    assert doc["x-mesh-schema"] == cls.schema_id
    assert doc["$id"] == f"urn:connector-mesh:schema:{cls.schema_id}"
    jsonschema.Draft202012Validator.check_schema(doc)
    assert schema_filename(cls.schema_id) == f"{name}.v{cls.schema_version}.schema.json"


def test_entity_schema_accepts_encoded_entities_and_rejects_bad_ones() -> None:
    validator = jsonschema.Draft202012Validator(
        entity_schema("customer"), format_checker=jsonschema.FormatChecker()
    )
    wire = msgspec.json.decode(msgspec.json.encode(_customer()))
    validator.validate(wire)
    for path, bad in [
        (("credit_limit", "currency"), "eur"),
        (("credit_limit", "amount"), 12.5),
        (("status",), "lost"),
        (("name",), ""),
        (("billing_address", "country"), "Germany"),
    ]:
        broken = copy.deepcopy(wire)
        node = broken
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = bad
        errors = list(validator.iter_errors(broken))
        assert errors, f"{path} = {bad!r} should not validate"
        assert list(errors[0].absolute_path)[: len(path)] == list(path) or errors[0].validator == "anyOf"
    del wire["name"]
    assert any("'name' is a required property" in e.message for e in validator.iter_errors(wire))


def test_envelope_schema_mirrors_the_envelope_struct() -> None:
    doc = envelope_schema()
    jsonschema.Draft202012Validator.check_schema(doc)
    props = doc["$defs"]["Envelope"]["properties"]
    assert list(props) == [f.name for f in msgspec.structs.fields(Envelope)]
    env = Envelope(
        id="x",
        kind="customer.upserted",
        flow="f",
        key="k",
        version=1,
        origin="erp",
        occurred_at=1,
        schema="customer/1",
        payload=encode_payload(msgspec.to_builtins(_customer())),
    )
    jsonschema.validate(msgspec.msgpack.decode(encode(env)), doc)


# --- AsyncAPI ----------------------------------------------------------------------------------

_COMPONENT_KEY = re.compile(r"^[A-Za-z0-9.\-_]+$")
_MESSAGE_KEYS = {
    "headers",
    "payload",
    "correlationId",
    "contentType",
    "name",
    "title",
    "summary",
    "description",
    "tags",
    "externalDocs",
    "bindings",
    "examples",
    "traits",
}
_CHANNEL_KEYS = {
    "address",
    "messages",
    "title",
    "summary",
    "description",
    "servers",
    "parameters",
    "tags",
    "externalDocs",
    "bindings",
}
_OPERATION_KEYS = {
    "action",
    "channel",
    "title",
    "summary",
    "description",
    "security",
    "tags",
    "externalDocs",
    "bindings",
    "traits",
    "messages",
    "reply",
}
_PARAMETER_KEYS = {"enum", "default", "description", "examples", "location"}


def _pointer(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        assert isinstance(node, dict), f"unresolvable $ref {ref}"
        assert part in node, f"unresolvable $ref {ref}"
        node = node[part]
    return node


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _extension_free(obj: dict[str, Any]) -> set[str]:
    return {k for k in obj if not k.startswith("x-")}


def assert_asyncapi_3(doc: dict[str, Any]) -> None:
    """The AsyncAPI 3.0.0 rules that matter for tooling (the spec's JSON Schema is not shipped
    on PyPI, so its required structure is asserted here)."""
    assert doc["asyncapi"] == "3.0.0"
    assert isinstance(doc["info"]["title"], str)
    assert isinstance(doc["info"]["version"], str)
    assert set(doc) <= {
        "asyncapi",
        "id",
        "info",
        "servers",
        "defaultContentType",
        "channels",
        "operations",
        "components",
    }
    for server in doc.get("servers", {}).values():
        assert {"host", "protocol"} <= set(server)
    for ref in _refs(doc):
        _pointer(doc, ref)
    for section in doc["components"].values():
        for key in section:
            assert _COMPONENT_KEY.match(key), key
    for channel_id, channel in doc["channels"].items():
        assert _extension_free(channel) <= _CHANNEL_KEYS, channel_id
        params = set(re.findall(r"\{([^}]+)\}", channel["address"]))
        assert params == set(channel.get("parameters", {})), channel_id
        for param in channel.get("parameters", {}).values():
            assert _extension_free(param) <= _PARAMETER_KEYS
        for message in channel["messages"].values():
            resolved = _pointer(doc, message["$ref"]) if "$ref" in message else message
            assert _extension_free(resolved) <= _MESSAGE_KEYS
            if "headers" in resolved:
                headers = resolved["headers"]
                headers = _pointer(doc, headers["$ref"]) if "$ref" in headers else headers
                assert headers["type"] == "object"
            if "correlationId" in resolved:
                assert resolved["correlationId"]["location"].startswith("$message.")
    for op_id, op in doc["operations"].items():
        assert _extension_free(op) <= _OPERATION_KEYS, op_id
        assert op["action"] in ("send", "receive")
        channel_ref = op["channel"]["$ref"]
        assert channel_ref.startswith("#/channels/")
        channel_id = channel_ref.split("/")[2]
        for message in op.get("messages", []):
            # an operation's messages must be ones its channel carries
            assert message["$ref"].startswith(f"#/channels/{channel_id}/messages/"), op_id


def test_asyncapi_document_has_the_required_3_0_structure() -> None:
    doc = asyncapi_document()
    assert_asyncapi_3(doc)
    for schema in doc["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)


def test_asyncapi_subjects_are_the_ones_the_connector_publishes() -> None:
    doc = asyncapi_document()
    addresses = {c["address"] for c in doc["channels"].values()}
    for name in ENTITIES:
        for event in ("upserted", "deleted"):
            assert f"evt.{name}.{event}.{{origin}}" in addresses
            assert event_subject(name, event, "erp") == f"evt.{name}.{event}.{{origin}}".replace(
                "{origin}", "erp"
            )
    assert "dlq.{flow}" in addresses
    assert dlq_subject("customers") == "dlq.{flow}".replace("{flow}", "customers")
    assert "cmd.{system}.{op}" in addresses
    assert doc["defaultContentType"] == CONTENT_TYPE
    message = doc["components"]["messages"]["customerUpserted"]
    assert message["contentType"] == CONTENT_TYPE
    assert message["x-mesh-schema"] == "customer/1"
    actions = {op["action"] for op in doc["operations"].values()}
    assert actions == {"send", "receive"}


def test_asyncapi_message_payload_validates_a_real_envelope_off_the_wire() -> None:
    doc = asyncapi_document()
    customer = _customer()
    eid = envelope_id("customers", "erp", customer.id, 7)
    env = Envelope(
        id=eid,
        kind="customer.upserted",
        schema=Customer.schema_id,
        flow="customers",
        key=customer.id,
        version=7,
        origin="erp",
        occurred_at=1_700_000_000_000,
        correlation_id=eid,
        payload=encode_payload(msgspec.to_builtins(customer)),
    )
    wire = msgspec.msgpack.decode(encode(env))  # what any msgpack library sees

    def validator(message_id: str) -> jsonschema.Draft202012Validator:
        root = {"$ref": f"#/components/messages/{message_id}/payload", "components": doc["components"]}
        return jsonschema.Draft202012Validator(root)

    validator("customerUpserted").validate(wire)
    assert not validator("customerUpserted").is_valid({**wire, "schema": "customer/2"})
    assert not validator("customerUpserted").is_valid({**wire, "payload": {**wire["payload"], "name": 1}})
    assert not validator("productUpserted").is_valid(wire)  # kind and schema differ
    tomb = {**wire, "kind": "customer.deleted", "payload": {"id": "ALFKI"}}
    validator("customerDeleted").validate(tomb)
    correlation = doc["components"]["messages"]["customerUpserted"]["correlationId"]["location"]
    assert wire[correlation.rpartition("/")[2]] == eid


# --- export and check ------------------------------------------------------------------------


def _export(tmp_path: Path) -> Path:
    out = tmp_path / "contracts"
    result = runner.invoke(app, ["schema", "export", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_export_writes_one_file_per_schema_version_and_asyncapi(tmp_path: Path) -> None:
    out = _export(tmp_path)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [f"{n}.v1.schema.json" for n in ENTITIES] + ["mesh.envelope.v1.schema.json", "asyncapi.json"]
    )
    doc = json.loads((out / "customer.v1.schema.json").read_text())
    assert doc == json.loads(json.dumps(entity_schema("customer")))
    assert_asyncapi_3(json.loads((out / "asyncapi.json").read_text()))
    # an older version already in the directory stays beside the new one
    (out / "customer.v0.schema.json").write_text("{}")
    export_schemas(out)
    assert (out / "customer.v0.schema.json").read_text() == "{}"


def test_check_against_an_identical_export_passes(tmp_path: Path) -> None:
    out = _export(tmp_path)
    result = runner.invoke(app, ["schema", "check", str(out)])
    assert result.exit_code == 0, result.output
    assert "ok: no breaking changes (0 change(s) listed)" in result.output


def _edit(out: Path, name: str, edit: Any) -> None:
    path = out / f"{name}.v1.schema.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def _check(out: Path) -> tuple[int, str]:
    result = runner.invoke(app, ["schema", "check", str(out)])
    return result.exit_code, result.output


def _defs(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return doc["$defs"][name]


# Each case edits the PREVIOUS export so that the current code looks like it made the change.
BREAKING: list[tuple[str, Any, str]] = [
    (
        "removed field",
        lambda d: _defs(d, "Customer")["properties"].update(legacy_code={"type": "string", "default": ""}),
        "BREAKING    customer/1 $.legacy_code: removed field",
    ),
    (
        "changed type",
        lambda d: _defs(d, "Customer")["properties"].update(name={"type": "integer"}),
        "BREAKING    customer/1 $.name: changed type: integer -> string",
    ),
    (
        "changed type (now nullable)",
        lambda d: _defs(d, "Customer")["properties"].update(number={"type": "string", "default": None}),
        "BREAKING    customer/1 $.number: changed type: now also null",
    ),
    (
        "new required field",
        lambda d: (
            _defs(d, "Customer")["properties"].pop("name"),
            _defs(d, "Customer")["required"].remove("name"),
        ),
        "BREAKING    customer/1 $.name: new required field (no default)",
    ),
    (
        "field lost its default",
        lambda d: _defs(d, "Customer")["required"].remove("name"),
        "BREAKING    customer/1 $.name: field became required (lost its default)",
    ),
    (
        "narrowed enum",
        lambda d: _defs(d, "PartyStatus")["enum"].append("prospect"),
        "BREAKING    customer/1 $.status: narrowed enum: removed 'prospect'",
    ),
    (
        "nested removed field",
        lambda d: _defs(d, "Address")["properties"].update(line4={"type": "string", "default": ""}),
        "BREAKING    customer/1 $.billing_address.line4: removed field",
    ),
    (
        "narrowed constraint",
        lambda d: _defs(d, "Customer")["properties"]["name"].update(maxLength=1000),
        "BREAKING    customer/1 $.name: narrowed constraint maxLength: 1000 -> 500",
    ),
    (
        "changed format",
        lambda d: _defs(d, "Customer")["properties"]["updated_at"]["anyOf"][0].update(format="date"),
        "BREAKING    customer/1 $.updated_at: changed type: no longer accepts string(date)",
    ),
]


@pytest.mark.parametrize(("kind", "edit", "line"), BREAKING, ids=[b[0] for b in BREAKING])
def test_check_fails_listing_each_breaking_change_with_its_path(
    tmp_path: Path, kind: str, edit: Any, line: str
) -> None:
    out = _export(tmp_path)
    _edit(out, "customer", edit)
    code, output = _check(out)
    assert code == 1, output
    assert line in output.splitlines(), output
    assert "breaking change(s)" in output


def test_check_lists_every_breaking_change_at_once(tmp_path: Path) -> None:
    out = _export(tmp_path)
    for _, edit, _ in BREAKING[:2] + BREAKING[5:7]:
        _edit(out, "customer", edit)
    code, output = _check(out)
    assert code == 1
    for _, _, line in BREAKING[:2] + BREAKING[5:7]:
        assert line in output
    assert "BREAKING    customer/1 $.shipping_address.line4: removed field" in output
    assert "5 breaking change(s)" in output


def test_additive_changes_are_listed_as_compatible(tmp_path: Path) -> None:
    out = _export(tmp_path)

    def older(d: dict[str, Any]) -> None:
        _defs(d, "Customer")["properties"].pop("tags")  # the code added an optional field since
        _defs(d, "PartyStatus")["enum"].remove("archived")  # and an enum value
        _defs(d, "Customer")["properties"]["name"]["maxLength"] = 100  # and relaxed a limit

    _edit(out, "customer", older)
    code, output = _check(out)
    assert code == 0, output
    assert "compatible  customer/1 $.tags: new optional field (has a default)" in output
    assert "compatible  customer/1 $.status: widened enum: added 'archived'" in output
    assert "compatible  customer/1 $.name: relaxed constraint maxLength: 100 -> 500" in output
    assert "ok: no breaking changes (3 change(s) listed)" in output


def test_a_schema_that_disappeared_is_breaking_and_a_new_one_compatible(tmp_path: Path) -> None:
    out = _export(tmp_path)
    (out / "widget.v1.schema.json").write_text(
        json.dumps({**entity_schema("customer"), "x-mesh-schema": "widget/1"})
    )
    (out / "payment.v1.schema.json").unlink()
    code, output = _check(out)
    assert code == 1
    assert "BREAKING    widget/1 $: schema removed" in output
    assert "compatible  payment/1 $: new schema" in output


def test_a_new_version_may_break_but_the_old_one_must_not_go_backwards(tmp_path: Path) -> None:
    out = _export(tmp_path)
    current = current_schemas()
    v2 = copy.deepcopy(current.pop("customer/1"))
    v2["x-mesh-schema"] = "customer/2"
    v2["$defs"]["Customer"]["properties"].pop("tags")
    current["customer/2"] = v2
    report = check_schemas(out, current)
    assert report.ok, [str(c) for c in report.changes]
    lines = [str(c) for c in report.changes]
    assert "new version customer/2 $: new version (previous customer/1 stays beside it)" in lines
    assert "new version customer/2 $.tags: removed field (since customer/1)" in lines

    (out / "customer.v2.schema.json").write_text(json.dumps(v2))  # the export is ahead of the code
    code, output = _check(out)
    assert code == 1
    assert (
        "BREAKING    customer/2 $: version went backwards: the export has customer/2, the code customer/1"
        in output
    )


def test_check_of_a_missing_or_foreign_directory_exits_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["schema", "check", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "no such directory" in result.output
    (tmp_path / "x.schema.json").write_text("{not json")
    result = runner.invoke(app, ["schema", "check", str(tmp_path)])
    assert result.exit_code == 2
    assert "x.schema.json: not a readable JSON file" in result.output
    (tmp_path / "x.schema.json").write_text("{}")
    result = runner.invoke(app, ["schema", "check", str(tmp_path)])
    assert result.exit_code == 2
    assert "no 'x-mesh-schema' id" in result.output
    assert "Traceback" not in result.output


def test_money_in_the_schema_is_integer_minor_units() -> None:
    money = entity_schema("customer")["$defs"]["Money"]
    assert money["properties"]["amount"] == {"type": "integer"}
    assert money["properties"]["currency"]["pattern"] == "^[A-Z]{3}$"
    assert Money.of("1", "EUR").amount == 100


def test_a_new_version_with_an_optional_field_is_one_compatible_change() -> None:
    """customer/2 = customer/1 plus an optional field: the version's own id and title are not
    a change of shape (old readers ignore the field, new readers default it)."""
    from mesh.canonical.entities import Code
    from mesh.canonical.schema import diff_schemas

    def default(f: msgspec.structs.FieldInfo) -> Any:
        if f.default_factory is not msgspec.NODEFAULT:
            return msgspec.field(default_factory=f.default_factory)
        return f.default

    fields = [(f.name, f.type, default(f)) for f in msgspec.structs.fields(Customer)]
    v2_type = msgspec.defstruct("Customer", [*fields, ("lei", Code | None, None)], kw_only=True, frozen=True)
    v2 = {
        **entity_schema("customer"),
        **msgspec.json.schema(v2_type),
        "$id": "urn:connector-mesh:schema:customer/2",
        "title": "Customer (customer/2)",
        "x-mesh-schema": "customer/2",
    }
    assert diff_schemas(entity_schema("customer"), v2) == [
        ("$.lei", "new optional field (has a default)", False)
    ]


def test_a_new_version_that_cannot_be_mixed_with_the_previous_one_gets_a_note(tmp_path: Path) -> None:
    out = _export(tmp_path)
    current = current_schemas()
    v1 = current.pop("customer/1")
    removed = copy.deepcopy(v1)
    removed["x-mesh-schema"] = "customer/2"
    removed["$defs"]["Customer"]["properties"].pop("tags")
    report = check_schemas(out, {**current, "customer/2": removed})
    assert report.ok
    assert [c.path for c in report.not_mixable["customer/2"]] == ["$.tags"]

    added = copy.deepcopy(v1)
    added["x-mesh-schema"] = "customer/2"
    added["$defs"]["Customer"]["properties"]["lei"] = {"anyOf": [{"type": "string"}, {"type": "null"}],
                                                       "default": None}  # fmt: skip
    report = check_schemas(out, {**current, "customer/2": added})
    assert report.ok
    assert report.not_mixable == {}
    lines = [str(c) for c in report.changes]
    assert "new version customer/2 $.lei: new optional field (has a default) (since customer/1)" in lines
