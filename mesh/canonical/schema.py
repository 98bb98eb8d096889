"""Contracts for other teams: JSON Schema per entity version, an AsyncAPI 3.0 document of the
mesh's subjects, and a breaking-change check against a previous export.

Guarantees:

* :func:`export_schemas` writes one JSON Schema (draft 2020-12) per schema version, named
  ``<entity>.v<version>.schema.json`` (``customer.v1.schema.json``, the envelope as
  ``mesh.envelope.v1.schema.json``), so versions sit side by side and an export never deletes
  an older version; plus ``asyncapi.json`` (AsyncAPI 3.0.0; JSON is valid YAML). Files are
  written with sorted keys, so exports diff cleanly.
* :func:`check_schemas` compares the current schemas with a previous export and lists every
  difference with its path. A change to an *existing* version that could break a reader or a
  writer — removed field, changed type, new field without a default, narrowed enum or
  constraint — is breaking; so is a schema or version that disappeared. Changes that come
  with a new version number are listed but allowed: the old version's file stays beside it.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import msgspec

from mesh.canonical._schema_diff import diff_schemas
from mesh.canonical.entities import ENTITIES, Entity, Tombstone
from mesh.envelope import CONTENT_TYPE, ENVELOPE_SCHEMA, DeadLetter, Envelope

__all__ = [
    "JSON_SCHEMA_DIALECT",
    "SchemaChange",
    "SchemaReport",
    "asyncapi_document",
    "check_schemas",
    "current_schemas",
    "diff_schemas",
    "entity_schema",
    "envelope_schema",
    "export_schemas",
    "load_export",
    "schema_filename",
]

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
ASYNCAPI_FILE = "asyncapi.json"
_SUFFIX = ".schema.json"
_ID_KEY = "x-mesh-schema"


def _envelope_type() -> type[msgspec.Struct]:
    """A schema-only mirror of :class:`~mesh.envelope.Envelope` (``payload`` is a nested
    msgpack value on the wire; ``msgspec.Raw`` itself has no schema). Built from Envelope's own
    fields, so it cannot drift."""
    fields: list[tuple[str, Any, Any]] = []
    for f in msgspec.structs.fields(Envelope):
        if f.name == "payload":
            fields.append((f.name, typing.Any, None))
        elif f.required:
            fields.append((f.name, f.type, msgspec.NODEFAULT))
        else:
            fields.append((f.name, f.type, f.default))
    return msgspec.defstruct("Envelope", fields, kw_only=True, frozen=True)


def _standalone(doc: dict[str, Any], schema_id: str, title: str) -> dict[str, Any]:
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        "$id": f"urn:connector-mesh:schema:{schema_id}",
        "title": title,
        _ID_KEY: schema_id,
        **doc,
    }


def entity_schema(entity: str | type[Entity]) -> dict[str, Any]:
    """The JSON Schema of an entity's current version (``entity_schema("customer")``).

    Raises:
        KeyError: unknown entity name.
    """
    cls = ENTITIES[entity] if isinstance(entity, str) else entity
    return _standalone(msgspec.json.schema(cls), cls.schema_id, f"{cls.__name__} ({cls.schema_id})")


def envelope_schema() -> dict[str, Any]:
    """The JSON Schema of the envelope (a MessagePack map on the wire)."""
    return _standalone(
        msgspec.json.schema(_envelope_type()), ENVELOPE_SCHEMA, f"Envelope ({ENVELOPE_SCHEMA})"
    )


def current_schemas() -> dict[str, dict[str, Any]]:
    """Schema id (``customer/1``) -> JSON Schema, for every entity and the envelope."""
    out = {cls.schema_id: entity_schema(cls) for cls in ENTITIES.values()}
    out[ENVELOPE_SCHEMA] = envelope_schema()
    return out


def schema_filename(schema_id: str) -> str:
    """``customer/1`` -> ``customer.v1.schema.json``."""
    name, _, version = schema_id.rpartition("/")
    return f"{name}.v{version}{_SUFFIX}"


# --- AsyncAPI ---------------------------------------------------------------------------------


def _camel(*parts: str) -> str:
    words = [w for p in parts for w in p.replace(".", "_").split("_") if w]
    return words[0] + "".join(w[:1].upper() + w[1:] for w in words[1:])


def _version() -> str:
    try:
        return metadata.version("connector-mesh")
    except metadata.PackageNotFoundError:
        return "0.0.0"


_NATS_HEADERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "Content-Type": {"type": "string", "const": CONTENT_TYPE},
        "Nats-Msg-Id": {
            "type": "string",
            "description": "The envelope id: JetStream drops republished copies.",
        },
    },
    "required": ["Content-Type", "Nats-Msg-Id"],
}


def _dlq_headers() -> dict[str, Any]:
    """The dead-letter header block, generated from :class:`~mesh.envelope.DeadLetter`; a dead
    letter also keeps the original's own headers (``Content-Type``)."""
    schema = DeadLetter.headers_schema()
    schema["properties"] = {"Content-Type": {"type": "string"}, **schema["properties"]}
    return schema


def asyncapi_document() -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document of the mesh's subjects.

    Channels: ``evt.<entity>.<upserted|deleted>.{origin}`` per entity and event,
    ``dlq.{flow}`` and ``cmd.{system}.{op}``. Every message is an envelope (MessagePack map,
    ``Content-Type`` header); an event's ``payload`` is the canonical entity (or a tombstone for
    deletes) and its ``schema`` names the version.
    """
    envelope = _envelope_type()
    types: list[Any] = [envelope, Tombstone, *ENTITIES.values()]
    _, schemas = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    schemas["NatsHeaders"] = _NATS_HEADERS
    schemas["DeadLetterHeaders"] = _dlq_headers()

    def ref(kind: str, name: str) -> dict[str, str]:
        return {"$ref": f"#/components/{kind}/{name}"}

    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}

    def add(
        channel_id: str,
        address: str,
        params: dict[str, str],
        message_id: str,
        message: dict[str, Any],
        send: str,
        receive: str,
        description: str,
    ) -> None:
        messages[message_id] = message
        channels[channel_id] = {
            "address": address,
            "description": description,
            "parameters": {p: {"description": d} for p, d in params.items()},
            "messages": {message_id: ref("messages", message_id)},
        }
        msg_ref = {"$ref": f"#/channels/{channel_id}/messages/{message_id}"}
        for op_id, action in ((send, "send"), (receive, "receive")):
            operations[op_id] = {
                "action": action,
                "channel": {"$ref": f"#/channels/{channel_id}"},
                "messages": [msg_ref],
            }

    origin = {"origin": "The system the change came from (the capturing agent's `system`)."}
    for name, cls in ENTITIES.items():
        for event, payload in (("upserted", cls.__name__), ("deleted", "Tombstone")):
            kind = f"{name}.{event}"
            message_id = _camel(name, event)
            message = {
                "name": kind,
                "title": f"{cls.__name__} {event}",
                "summary": f"A {name} was created or changed."
                if event == "upserted"
                else f"A {name} was deleted.",
                "contentType": CONTENT_TYPE,
                "headers": ref("schemas", "NatsHeaders"),
                "correlationId": {"location": "$message.payload#/correlation_id"},
                "payload": {
                    "allOf": [
                        ref("schemas", "Envelope"),
                        {
                            "type": "object",
                            "properties": {
                                "kind": {"const": kind},
                                "schema": {"const": cls.schema_id},
                                "payload": ref("schemas", payload),
                            },
                            "required": ["schema"],
                        },
                    ]
                },
                "x-mesh-schema": cls.schema_id,
            }
            add(
                message_id,
                f"evt.{name}.{event}.{{origin}}",
                origin,
                message_id,
                message,
                f"publish{_camel('x', name, event)[1:]}",
                f"consume{_camel('x', name, event)[1:]}",
                f"{cls.__name__} {event} events ({cls.schema_id}), one subject per origin system.",
            )

    add(
        "deadLetters",
        "dlq.{flow}",
        {"flow": "The flow whose sink gave the message up."},
        "deadLetter",
        {
            "name": "dead_letter",
            "title": "Dead letter",
            "summary": "The original message byte for byte (usually an envelope), with why it was given up.",
            "contentType": CONTENT_TYPE,
            "headers": ref("schemas", "DeadLetterHeaders"),
            "payload": ref("schemas", "Envelope"),
        },
        "deadLetter",
        "readDeadLetters",
        "MESH_DLQ: messages a flow could not apply (I6).",
    )
    add(
        "commands",
        "cmd.{system}.{op}",
        {"system": "The system that executes the command.", "op": "The operation (e.g. sales_order_create)."},
        "command",
        {
            "name": "command",
            "title": "Command",
            "summary": "A request to a system; `schema` names the payload's shape.",
            "contentType": CONTENT_TYPE,
            "headers": ref("schemas", "NatsHeaders"),
            "correlationId": {"location": "$message.payload#/correlation_id"},
            "payload": ref("schemas", "Envelope"),
        },
        "sendCommand",
        "receiveCommand",
        "MESH_COMMANDS: requests to one system's operations.",
    )

    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "connector-mesh",
            "version": _version(),
            "description": "Events, dead letters and commands of the connector mesh on NATS JetStream. "
            "Every message is a MessagePack envelope; its `schema` field names the payload's "
            "JSON Schema (`customer/1` -> customer.v1.schema.json).",
        },
        "defaultContentType": CONTENT_TYPE,
        "servers": {
            "local": {
                "host": "127.0.0.1:4222",
                "protocol": "nats",
                "description": "The broker `meshctl dev up` starts.",
            },
        },
        "channels": channels,
        "operations": operations,
        "components": {"schemas": schemas, "messages": messages},
    }


# --- export and check -------------------------------------------------------------------------


def _write_json(path: Path, doc: Any) -> None:
    path.write_text(json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def export_schemas(directory: str | Path) -> list[Path]:
    """Write every current schema and ``asyncapi.json`` into ``directory`` (created if needed).

    Files of other versions already there are left alone. Returns the paths written.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for schema_id, doc in current_schemas().items():
        path = out / schema_filename(schema_id)
        _write_json(path, doc)
        written.append(path)
    path = out / ASYNCAPI_FILE
    _write_json(path, asyncapi_document())
    written.append(path)
    return written


Severity = Literal["breaking", "compatible", "new_version"]


@dataclass(frozen=True)
class SchemaChange:
    """One difference between the previous export and the current schemas."""

    schema: str
    """Schema id (``customer/1``)."""
    path: str
    """Where in the document (``$.billing_address.city``)."""
    change: str
    severity: Severity
    breaks_previous: bool = False
    """A ``new_version`` change that breaks readers or writers of the previous version (a removed
    or retyped field, a new required one): the two cannot be mixed in a rolling upgrade."""

    def __str__(self) -> str:
        label = {"breaking": "BREAKING", "compatible": "compatible", "new_version": "new version"}[
            self.severity
        ]
        return f"{label:<11} {self.schema} {self.path}: {self.change}"


@dataclass
class SchemaReport:
    """What :func:`check_schemas` found."""

    changes: list[SchemaChange] = field(default_factory=list)

    @property
    def breaking(self) -> list[SchemaChange]:
        return [c for c in self.changes if c.severity == "breaking"]

    @property
    def not_mixable(self) -> dict[str, list[SchemaChange]]:
        """New version -> its changes that break the previous version's readers or writers. Empty for
        a version that only adds optional fields (old readers ignore them, new readers default
        them): such versions can be mixed while agents are upgraded one at a time."""
        out: dict[str, list[SchemaChange]] = {}
        for c in self.changes:
            if c.severity == "new_version" and c.breaks_previous:
                out.setdefault(c.schema, []).append(c)
        return out

    @property
    def ok(self) -> bool:
        """No breaking change."""
        return not self.breaking


def load_export(directory: str | Path) -> dict[str, dict[str, Any]]:
    """Schema id -> JSON Schema of every ``*.schema.json`` in a previous export.

    Raises:
        FileNotFoundError: ``directory`` does not exist.
        ValueError: a file is not JSON or lacks its ``x-mesh-schema`` id.
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"no such directory: {root}")
    out: dict[str, dict[str, Any]] = {}
    for file in sorted(root.glob(f"*{_SUFFIX}")):
        try:
            doc = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{file}: not a readable JSON file: {exc}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get(_ID_KEY), str):
            raise ValueError(f"{file}: no {_ID_KEY!r} id: not written by `meshctl schema export`")
        out[doc[_ID_KEY]] = doc
    return out


def _split(schema_id: str) -> tuple[str, int]:
    name, _, version = schema_id.rpartition("/")
    return name, int(version)


def check_schemas(directory: str | Path, current: Mapping[str, dict[str, Any]] | None = None) -> SchemaReport:
    """Compare ``current`` (default: :func:`current_schemas`) with the export in ``directory``.

    Raises:
        FileNotFoundError, ValueError: see :func:`load_export`.
    """
    previous: dict[str, dict[int, dict[str, Any]]] = {}
    for schema_id, doc in load_export(directory).items():
        name, version = _split(schema_id)
        previous.setdefault(name, {})[version] = doc
    now: dict[str, dict[int, dict[str, Any]]] = {}
    for schema_id, doc in (current if current is not None else current_schemas()).items():
        name, version = _split(schema_id)
        now.setdefault(name, {})[version] = doc
    report = SchemaReport()

    def add(schema: str, path: str, change: str, severity: Severity) -> None:
        report.changes.append(SchemaChange(schema, path, change, severity))

    for name in sorted(previous.keys() - now.keys()):
        for version in sorted(previous[name]):
            add(f"{name}/{version}", "$", "schema removed", "breaking")
    for name in sorted(now):
        old_versions = previous.get(name, {})
        for version, doc in sorted(now[name].items()):
            schema = f"{name}/{version}"
            newer = [v for v in old_versions if v > max(now[name])]
            if version in old_versions:
                for path, what, breaking in diff_schemas(old_versions[version], doc):
                    add(schema, path, what, "breaking" if breaking else "compatible")
            elif older := [v for v in old_versions if v < version]:
                base = max(older)
                add(schema, "$", f"new version (previous {name}/{base} stays beside it)", "new_version")
                for path, what, breaking in diff_schemas(old_versions[base], doc):
                    report.changes.append(
                        SchemaChange(schema, path, f"{what} (since {name}/{base})", "new_version", breaking)
                    )
            elif not newer:
                add(schema, "$", "new schema", "compatible")
        for version in sorted({v for v in old_versions if v > max(now[name])}):
            add(
                f"{name}/{version}",
                "$",
                f"version went backwards: the export has {name}/{version}, the code {name}/{max(now[name])}",
                "breaking",
            )
    return report
