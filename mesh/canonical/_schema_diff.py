"""Compare two JSON Schemas (as exported by :mod:`mesh.canonical.schema`) and classify every
difference as breaking or compatible for readers and writers of the mesh's messages."""

from __future__ import annotations

from typing import Any

__all__ = ["diff_schemas"]

_LOWER = ("minLength", "minimum", "exclusiveMinimum", "minItems", "minProperties")
_UPPER = ("maxLength", "maximum", "exclusiveMaximum", "maxItems", "maxProperties")
_EXACT = ("pattern", "multipleOf")
_MAX_DEPTH = 64

Change = tuple[str, str, bool]
"""(path, what changed, breaking)."""


def _pointer(doc: dict[str, Any], ref: str) -> Any:
    if not ref.startswith("#/"):
        raise ValueError(f"unsupported $ref {ref!r} (only local refs)")
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _resolve(node: Any, doc: dict[str, Any]) -> Any:
    hops = 0
    while isinstance(node, dict) and "$ref" in node:
        siblings = {k: v for k, v in node.items() if k != "$ref"}
        node = {**_pointer(doc, node["$ref"]), **siblings}
        hops += 1
        if hops > _MAX_DEPTH:
            raise ValueError("$ref cycle")
    return node


def _signature(node: dict[str, Any]) -> str:
    if "enum" in node:
        return "enum"
    if "const" in node:
        return "const"
    kind = node.get("type")
    if kind == "string":
        return f"string({node['format']})" if "format" in node else "string"
    if kind == "object":
        if "properties" in node:
            return f"object({node.get('title', '')})"
        return "map"
    if kind is None:
        return "any"
    return str(kind)


class _Differ:
    def __init__(self, old_doc: dict[str, Any], new_doc: dict[str, Any]) -> None:
        self.old_doc = old_doc
        self.new_doc = new_doc
        self.changes: list[Change] = []

    def add(self, path: str, what: str, breaking: bool) -> None:
        self.changes.append((path, what, breaking))

    def alternatives(self, node: Any, doc: dict[str, Any]) -> list[dict[str, Any]]:
        node = _resolve(node, doc)
        if not isinstance(node, dict):
            return [{}]
        for key in ("anyOf", "oneOf"):
            if key in node:
                out: list[dict[str, Any]] = []
                for member in node[key]:
                    out.extend(self.alternatives(member, doc))
                return out
        if isinstance(node.get("type"), list):
            return [{**node, "type": t} for t in node["type"]]
        return [node]

    def walk(self, old: Any, new: Any, path: str, depth: int = 0) -> None:
        if depth > _MAX_DEPTH:
            return
        olds = {_signature(a): a for a in self.alternatives(old, self.old_doc)}
        news = {_signature(a): a for a in self.alternatives(new, self.new_doc)}
        if len(olds) == 1 and len(news) == 1 and set(olds) != set(news):
            (o,), (n,) = olds, news
            self.add(path, f"changed type: {o} -> {n}", True)
            return
        for sig, node in olds.items():
            if sig in news:
                self.compare(node, news[sig], path, depth)
            else:
                self.add(path, f"changed type: no longer accepts {sig}", True)
        for sig in news.keys() - olds.keys():
            self.add(path, f"changed type: now also {sig}", True)

    def compare(self, o: dict[str, Any], n: dict[str, Any], path: str, depth: int) -> None:
        if "enum" in o:
            old_values, new_values = list(o["enum"]), list(n["enum"])
            removed = [v for v in old_values if v not in new_values]
            added = [v for v in new_values if v not in old_values]
            if removed:
                self.add(path, f"narrowed enum: removed {', '.join(map(repr, removed))}", True)
            if added:
                self.add(path, f"widened enum: added {', '.join(map(repr, added))}", False)
            return
        if "const" in o:
            if o["const"] != n["const"]:
                self.add(path, f"changed constant: {o['const']!r} -> {n['const']!r}", True)
            return
        self.constraints(o, n, path)
        if "properties" in o:
            self.properties(o, n, path, depth)
        if isinstance(o.get("additionalProperties"), dict) and isinstance(
            n.get("additionalProperties"), dict
        ):
            self.walk(o["additionalProperties"], n["additionalProperties"], f"{path}.*", depth + 1)
        if "items" in o and "items" in n:
            self.walk(o["items"], n["items"], f"{path}[]", depth + 1)

    def properties(self, o: dict[str, Any], n: dict[str, Any], path: str, depth: int) -> None:
        old_props, new_props = o.get("properties", {}), n.get("properties", {})
        old_req, new_req = set(o.get("required", ())), set(n.get("required", ()))
        for name in old_props:
            if name not in new_props:
                self.add(f"{path}.{name}", "removed field", True)
        for name in new_props:
            sub = f"{path}.{name}"
            if name not in old_props:
                if name in new_req:
                    self.add(sub, "new required field (no default)", True)
                else:
                    self.add(sub, "new optional field (has a default)", False)
                continue
            if name in new_req and name not in old_req:
                self.add(sub, "field became required (lost its default)", True)
            elif name in old_req and name not in new_req:
                self.add(sub, "field became optional (got a default)", False)
            old_field = _resolve(old_props[name], self.old_doc)
            new_field = _resolve(new_props[name], self.new_doc)
            if (
                "default" in old_field
                and "default" in new_field
                and old_field["default"] != new_field["default"]
            ):
                self.add(sub, f"default changed: {old_field['default']!r} -> {new_field['default']!r}", False)
            self.walk(old_props[name], new_props[name], sub, depth + 1)

    def constraints(self, o: dict[str, Any], n: dict[str, Any], path: str) -> None:
        for key in _LOWER + _UPPER + _EXACT:
            before, after = o.get(key), n.get(key)
            if before == after:
                continue
            if key in _EXACT:
                tighter = after is not None
            elif after is None:
                tighter = False
            elif before is None:
                tighter = True
            else:
                tighter = after > before if key in _LOWER else after < before
            verb = "narrowed" if tighter else "relaxed"
            self.add(path, f"{verb} constraint {key}: {before!r} -> {after!r}", tighter)


def diff_schemas(old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    """Every difference between two JSON Schema documents, as (path, what, breaking).

    Breaking: a removed field, a changed type (including a type that now also allows null), a
    new field without a default, a field that lost its default, a narrowed enum or constraint.
    Compatible: new optional fields, widened enums, relaxed constraints, changed defaults.
    """
    differ = _Differ(old, new)
    # The document's own metadata (its id and title name the version: "Customer (customer/1)")
    # says nothing about the shape; left in, it would make every new version a "changed type".
    differ.walk(_shape(old), _shape(new), "$")
    return differ.changes


_DOCUMENT_KEYS = ("$schema", "$id", "title", "x-mesh-schema", "$defs")


def _shape(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k not in _DOCUMENT_KEYS}
