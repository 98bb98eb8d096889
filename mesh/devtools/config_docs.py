"""The agent config, documented from the code: a JSON Schema and a Markdown reference.

Both are built from the config Structs themselves (:class:`mesh.config.AgentConfig` and the
config Struct of every adapter in the registry): field names, types, constraints, defaults and
the attribute docstrings (the string under a field), so they cannot drift from what
``meshctl config check`` accepts.

* :func:`agent_config_schema`: ``msgspec.json.schema`` of the agent config with the installed
  adapters' configs as the ``[flows.source]`` / ``[flows.sink]`` tagged unions, each property's
  attribute docstring as its ``description`` (``meshctl config schema``).
* :func:`config_reference`: docs/config-reference.md, every option of every table and every
  adapter of this distribution (not third-party plugins, so the file is the same everywhere):
  ``python -m mesh.devtools.config_docs > docs/config-reference.md``. A unit test regenerates it
  and compares.
"""

from __future__ import annotations

import ast
import enum
import functools
import inspect
import json
import re
import sys
import textwrap
from collections.abc import Iterator
from importlib import metadata
from typing import Any

import msgspec
import msgspec.inspect as mi

from mesh._config_base import AdapterConfig
from mesh.config import AgentConfig, agent_config_type
from mesh.plugins import ENTRY_POINT_GROUP, AdapterRegistry, adapter_registry, discover

__all__ = [
    "agent_config_schema",
    "builtin_registry",
    "config_reference",
    "field_docs",
    "main",
]

DISTRIBUTION = "connector-mesh"
_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def builtin_registry() -> AdapterRegistry:
    """The adapters this distribution declares (its own ``mesh.adapters`` entry points only).

    Raises:
        PluginError: one of them does not load (see :func:`mesh.plugins.discover`).
    """
    eps = [ep for ep in metadata.distribution(DISTRIBUTION).entry_points if ep.group == ENTRY_POINT_GROUP]
    return discover(eps)


@functools.cache
def _own_docs(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # built with defstruct: no source of its own
        return {}
    tree = ast.parse(source)
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    out: dict[str, str] = {}
    for stmt, nxt in zip(body, [*body[1:], None], strict=True):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            out[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return out


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its attribute docstring, for ``cls`` and its bases (a subclass's wins)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or klass is msgspec.Struct:
            continue
        out.update(_own_docs(klass))
    return out


def _structs(t: mi.Type) -> Iterator[mi.StructType]:
    """Every Struct type directly inside ``t`` (through unions, lists, dicts, metadata)."""
    if isinstance(t, mi.StructType):
        yield t
    elif isinstance(t, mi.Metadata):
        yield from _structs(t.type)
    elif isinstance(t, mi.UnionType):
        for member in t.types:
            yield from _structs(member)
    elif isinstance(t, (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType)):
        yield from _structs(t.item_type)
    elif isinstance(t, mi.TupleType):
        for member in t.item_types:
            yield from _structs(member)
    elif isinstance(t, mi.DictType):
        yield from _structs(t.value_type)


def _all_structs(root: type) -> list[type]:
    seen: list[type] = []
    todo = [mi.type_info(root)]
    while todo:
        t = todo.pop()
        for st in _structs(t):
            if st.cls in seen:
                continue
            seen.append(st.cls)
            todo.extend(f.type for f in st.fields)
    return seen


def _def_names(cls: type) -> tuple[str, str]:
    """The names msgspec may give ``cls`` in ``$defs``: short, or fully qualified on a clash."""
    return tuple(
        re.sub(r"[^a-zA-Z0-9.\-_]", "_", n) for n in (cls.__name__, f"{cls.__module__}.{cls.__qualname__}")
    )  # type: ignore[return-value]


def agent_config_schema(registry: AdapterRegistry | None = None) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of an agent config file, with the adapters of
    ``registry`` (default: the installed ones) and every field's docstring as its description.

    Raises:
        PluginError: an installed adapter plugin is broken.
    """
    root = agent_config_type(registry if registry is not None else adapter_registry())
    doc: dict[str, Any] = msgspec.json.schema(root)
    classes = _all_structs(root)
    # $defs are named by class name (module-qualified when two classes share a name).
    for name, node in doc.get("$defs", {}).items():
        matches = [c for c in classes if name in _def_names(c)]
        if len(matches) != 1 or not isinstance(node.get("properties"), dict):
            continue
        cls = matches[0]
        docs = field_docs(cls)
        by_encoded = {f.encode_name: f.name for f in msgspec.structs.fields(cls)}
        for prop, schema in node["properties"].items():
            text = docs.get(by_encoded.get(prop, prop))
            if text and isinstance(schema, dict) and "description" not in schema:
                schema["description"] = text
    return {"$schema": _DIALECT, "title": "connector-mesh agent config", **doc}


# --- the Markdown reference ------------------------------------------------------------------


def _bound(t: Any, names: tuple[tuple[str, str], ...]) -> str:
    parts = [f"{sym} {getattr(t, attr)}" for attr, sym in names if getattr(t, attr, None) is not None]
    return f" ({', '.join(parts)})" if parts else ""


_NUM = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
_LEN = (("min_length", "length >="), ("max_length", "length <="))


class _Writer:
    def __init__(self) -> None:
        self.anchors: dict[type, str] = {}
        self.headings: dict[type, str] = {}
        self.queue: list[type] = []
        self.prefix = ""

    def anchor(self, cls: type, path: str, *, array: bool = False) -> str:
        """The anchor of ``cls``'s section (queued on first use, at ``path``)."""
        if cls not in self.anchors:
            info = mi.type_info(cls)
            assert isinstance(info, mi.StructType)
            heading = f"[[{path}]]" if array else f"[{path}]"
            if info.tag_field is not None and info.tag is not None and not issubclass(cls, AdapterConfig):
                heading += f' {info.tag_field} = "{info.tag}"'
            base = re.sub(r"[^a-z0-9]+", "-", f"{self.prefix} {heading}".lower()).strip("-")
            anchor, n = base, 1
            while anchor in self.anchors.values():
                n += 1
                anchor = f"{base}-{n}"
            self.anchors[cls], self.headings[cls] = anchor, heading
            self.queue.append(cls)
        return self.anchors[cls]

    def type_name(self, t: mi.Type, path: str, *, array: bool = False) -> str:
        if isinstance(t, mi.Metadata):
            return self.type_name(t.type, path, array=array)
        if isinstance(t, mi.UnionType):
            members = [m for m in t.types if not isinstance(m, mi.NoneType)]
            return " or ".join(self.type_name(m, path, array=array) for m in members)
        if isinstance(t, mi.StructType):
            if issubclass(t.cls, AdapterConfig):
                return "adapter table (see [Adapters](#adapters))"
            anchor = self.anchor(t.cls, path, array=array)
            return f"table, see [`{self.headings[t.cls]}`](#{anchor})"
        if isinstance(t, (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType)):
            item = self.type_name(t.item_type, path, array=True)
            return f"list of {item}{_bound(t, _LEN)}"
        if isinstance(t, mi.DictType):
            key = self.type_name(t.key_type, path)
            return f"table of {key} = {self.type_name(t.value_type, f'{path}.<key>')}"
        if isinstance(t, mi.LiteralType):
            return " or ".join(json.dumps(v) for v in t.values)
        if isinstance(t, mi.EnumType):
            return " or ".join(json.dumps(m.value) for m in t.cls)
        simple = {
            mi.IntType: ("integer", _NUM), mi.FloatType: ("number", _NUM), mi.StrType: ("string", _LEN),
        }  # fmt: skip
        for kind, (label, bounds) in simple.items():
            if isinstance(t, kind):
                return label + _bound(t, bounds)
        labels = {
            mi.BoolType: "boolean", mi.NoneType: "none", mi.AnyType: "any", mi.DecimalType: "decimal",
            mi.DateTimeType: "datetime", mi.DateType: "date", mi.BytesType: "bytes",
        }  # fmt: skip
        for kind, label in labels.items():
            if isinstance(t, kind):
                return label
        if isinstance(t, mi.CustomType):
            return t.cls.__name__
        return type(t).__name__.removesuffix("Type").lower()

    def table(self, cls: type, path: str) -> list[str]:
        docs = field_docs(cls)
        info = mi.type_info(cls)
        assert isinstance(info, mi.StructType)
        lines = ["| Option | Type | Default | Description |", "|---|---|---|---|"]
        for f in info.fields:
            if info.tag_field is not None and f.encode_name == info.tag_field:
                continue
            kind = self.type_name(f.type, f"{path}.{f.encode_name}" if path else f.encode_name)
            cells = (f"`{f.encode_name}`", _cell(kind), _cell(_default(f)), _cell(docs.get(f.name, "")))
            lines.append(f"| {' | '.join(cells)} |")
        return lines

    def sections(self, out: list[str], level: str, paths: dict[type, str]) -> None:
        while self.queue:
            cls = self.queue.pop(0)
            out += ["", f'<a id="{self.anchors[cls]}"></a>', "", f"{level} `{self.headings[cls]}`", ""]
            summary = _summary(cls)
            if summary:
                out += [" ".join(summary.split()), ""]
            out += self.table(cls, paths.get(cls, _path_of(self.headings[cls])))


def _path_of(heading: str) -> str:
    return heading.split(" ", 1)[0].strip("[]")


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _default(f: mi.Field) -> str:
    if f.required:
        return "**required**"
    value = f.default if f.default_factory is msgspec.NODEFAULT else f.default_factory()
    if isinstance(value, msgspec.Struct):
        return "(see the table)"
    if value is None:
        return "unset"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (int, float, str, list, dict)):
        return f"`{json.dumps(value)}`"
    return f"`{value}`"


def _summary(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    if not doc or doc == inspect.getdoc(msgspec.Struct) or cls.__doc__ is None:
        return ""
    return doc.split("\n\n", 1)[0]


def config_reference(registry: AdapterRegistry | None = None) -> str:
    """docs/config-reference.md: every table and option of an agent config, then every adapter's
    source and sink options (default registry: :func:`builtin_registry`).

    Raises:
        PluginError: an adapter plugin does not load.
    """
    reg = registry if registry is not None else builtin_registry()
    w = _Writer()
    out = [
        "# Agent config reference",
        "",
        "<!-- Generated by `python -m mesh.devtools.config_docs > docs/config-reference.md`:",
        "     do not edit by hand (tests/unit/test_config_docs.py compares). -->",
        "",
        "Every option of an agent's TOML config, from the config Structs (types, defaults, the",
        "documentation of each field). `meshctl config check FILE` validates a file against",
        "them; `meshctl config schema` prints the same as a JSON Schema (with the adapters",
        "installed where it runs). Unknown options are errors. A list of tables (`[[flows]]`)",
        "is written once per entry; a table inside it as `[flows.consumer]` after its `[[flows]]`.",
        "",
        "## The agent",
        "",
        '<a id="top-level"></a>',
        "",
        "### Top level",
        "",
        *w.table(AgentConfig, ""),
    ]
    w.sections(out, "###", {})
    out += [
        "",
        '<a id="adapters"></a>',
        "",
        "## Adapters",
        "",
        "A flow's `[flows.source]` and `[flows.sink]` tables name their adapter with",
        '`adapter = "..."`; the other options are the adapter\'s.',
    ]
    for plugin in reg:
        out += ["", f"### `{plugin.name}`"]
        if plugin.summary:
            out += ["", plugin.summary]
        for role in plugin.roles:
            decl = plugin.role(role)
            assert decl is not None
            path = f"flows.{role}"
            w.prefix = plugin.name
            anchor = f"{plugin.name}-{role}"
            w.anchors[decl.config], w.headings[decl.config] = anchor, f"[{path}]"
            out += ["", f'<a id="{anchor}"></a>', "", f'#### {role}: `[{path}]` `adapter = "{plugin.name}"`']
            summary = _summary(decl.config)
            out += ["", " ".join(summary.split())] if summary else []
            out += ["", *w.table(decl.config, path)]
            w.sections(out, "####", {})
    return "\n".join(line.rstrip() for line in out) + "\n"


def main() -> None:
    """``python -m mesh.devtools.config_docs``: print the reference to stdout."""
    sys.stdout.write(config_reference())


if __name__ == "__main__":
    main()
