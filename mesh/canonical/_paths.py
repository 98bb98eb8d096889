"""Dotted field paths (``billing_address.city``, ``lines[0].unit_price``) over canonical types
and over plain dict/list data. Shared by mappings and ownership rules."""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Union

import msgspec

__all__ = [
    "MISSING",
    "PathError",
    "Segment",
    "describe",
    "format_path",
    "get_path",
    "parse_path",
    "resolve",
    "set_path",
    "struct_fields",
    "unwrap",
]

_SEGMENT = re.compile(r"^(?P<name>[^.\[\]]+)(?P<index>(\[\d+\])*)$")
_INDEX = re.compile(r"\[(\d+)\]")

Segment = str | int
"""A field/key name or a list index."""


class PathError(ValueError):
    """A path that is malformed or does not exist on a type."""


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()
"""What :func:`get_path` returns when the path is absent from the data."""


def parse_path(text: str) -> tuple[Segment, ...]:
    """``"lines[0].unit_price"`` -> ``("lines", 0, "unit_price")``.

    Raises:
        PathError: empty segments, unbalanced brackets or a non-integer index.
    """
    if not text:
        raise PathError("empty path")
    segments: list[Segment] = []
    for part in text.split("."):
        match = _SEGMENT.match(part)
        if match is None:
            raise PathError(f"malformed path {text!r} (expected names joined by '.', optional [n] indexes)")
        segments.append(match["name"].strip())
        segments.extend(int(i) for i in _INDEX.findall(match["index"]))
    return tuple(segments)


def format_path(segments: tuple[Segment, ...]) -> str:
    out = ""
    for seg in segments:
        out += f"[{seg}]" if isinstance(seg, int) else (f".{seg}" if out else seg)
    return out


def unwrap(tp: Any) -> tuple[Any, bool]:
    """Strip ``Annotated`` and ``| None``: returns (core type, whether None is allowed).

    A union of several non-None types is returned as it is.
    """
    optional = False
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            optional = optional or len(members) < len(typing.get_args(tp))
            if len(members) != 1:
                return Union[tuple(members)], optional  # noqa: UP007 - built from a tuple
            tp = members[0]
        else:
            return tp, optional


def struct_fields(cls: type) -> dict[str, msgspec.structs.FieldInfo]:
    return {f.name: f for f in msgspec.structs.fields(cls)}


def _is_struct(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, msgspec.Struct)


def describe(tp: Any) -> str:
    """A short human name for a field type (``Money``, ``list[SalesOrderLine]``, ``date``)."""
    core, optional = unwrap(tp)
    origin = typing.get_origin(core)
    if origin is list:
        text = f"list[{describe(typing.get_args(core)[0])}]"
    elif origin is dict:
        text = f"dict[str, {describe(typing.get_args(core)[1])}]"
    elif isinstance(core, type):
        text = core.__name__
    else:
        text = str(core).replace("typing.", "")
    return f"{text} | None" if optional else text


def resolve(root: type, segments: tuple[Segment, ...]) -> Any:
    """The annotation of the field at ``segments`` inside struct type ``root``.

    Names step into struct fields and dict values (any key), indexes into list items.

    Raises:
        PathError: the path leaves the type; the message names the part and what exists there.
    """
    tp: Any = root
    walked: tuple[Segment, ...] = ()
    for seg in segments:
        core, _ = unwrap(tp)
        where = format_path(walked) or root.__name__
        if isinstance(seg, int):
            if typing.get_origin(core) is not list:
                raise PathError(f"`{where}` is {describe(tp)}, not a list: it cannot be indexed")
            tp = typing.get_args(core)[0]
        elif _is_struct(core):
            fields = struct_fields(core)
            if seg not in fields:
                raise PathError(
                    f"no field `{seg}` on {core.__name__}"
                    + (f" (at `{where}`)" if walked else "")
                    + f" (expected one of: {', '.join(sorted(fields))})"
                )
            tp = fields[seg].type
        elif typing.get_origin(core) is dict:
            tp = typing.get_args(core)[1]
        else:
            raise PathError(f"`{where}` is {describe(tp)}: it has no field `{seg}`")
        walked += (seg,)
    return tp


def get_path(data: Any, segments: tuple[Segment, ...]) -> Any:
    """The value at ``segments`` in nested dicts/lists, or :data:`MISSING` when absent.

    ``None`` on the way (a null nested object) reads as ``None``.
    """
    value = data
    for seg in segments:
        if value is None:
            return None
        if isinstance(seg, int):
            if not isinstance(value, list | tuple) or seg >= len(value):
                return MISSING
            value = value[seg]
        else:
            if not isinstance(value, Mapping) or seg not in value:
                return MISSING
            value = value[seg]
    return value


def set_path(data: dict[str, Any], segments: tuple[Segment, ...], value: Any) -> None:
    """Set ``value`` at ``segments``, creating dicts and lists (padded with ``None``) on the way.

    Raises:
        PathError: something that is not a dict/list already sits on the way.
    """
    node: Any = data
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        nxt = segments[i + 1] if not last else None
        if isinstance(seg, int):
            if not isinstance(node, list):
                raise PathError(f"`{format_path(segments[:i])}` is not a list")
            while len(node) <= seg:
                node.append(None)
            if last:
                node[seg] = value
            else:
                if node[seg] is None:
                    node[seg] = [] if isinstance(nxt, int) else {}
                node = node[seg]
        else:
            if not isinstance(node, dict):
                raise PathError(f"`{format_path(segments[:i])}` is not an object")
            if last:
                node[seg] = value
            else:
                if node.get(seg) is None:
                    node[seg] = [] if isinstance(nxt, int) else {}
                node = node[seg]
