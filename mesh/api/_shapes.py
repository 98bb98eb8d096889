"""Request/response shapes compiled to msgspec types (canonical entities or declared fields)."""

from __future__ import annotations

import datetime
import re
from decimal import Decimal
from typing import Any

import msgspec

from mesh._api_config import ShapeConfig
from mesh.api._wire import ApiError
from mesh.canonical import ENTITIES, Money

_TYPES: dict[str, Any] = {
    "str": str,
    "int": int,
    "float": float,
    "bool": bool,
    "decimal": Decimal,
    "date": datetime.date,
    "datetime": datetime.datetime,
    "money": Money,
    "object": dict[str, Any],
    "list": list[Any],
}
_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")


def compile_shape(shape: ShapeConfig | None, name: str) -> Any:
    """The msgspec type of ``shape`` (None or empty: any JSON object)."""
    if shape is None or (shape.entity is None and not shape.fields):
        one: Any = dict[str, Any]
    elif shape.entity is not None:
        one = ENTITIES[shape.entity]
    else:
        required = [(k, _TYPES[t]) for k, t in shape.fields.items() if not t.endswith("?")]
        optional = [(k, _TYPES[t[:-1]] | None, None) for k, t in shape.fields.items() if t.endswith("?")]
        one = msgspec.defstruct(name, [*required, *optional], kw_only=True, forbid_unknown_fields=True)
    return list[one] if shape is not None and shape.many else one


def validate(data: Any, typ: Any, what: str) -> Any:
    """``data`` converted through ``typ`` and back to JSON-able builtins.

    Raises:
        ApiError: ``bad_request`` naming the field path (``lines[0].quantity: expected ...``).
    """
    try:
        value = msgspec.convert(data, typ)
    except msgspec.ValidationError as exc:
        raise ApiError("bad_request", f"{what}: {_describe(exc)}", retryable=False) from None
    return msgspec.to_builtins(value)


def _describe(exc: msgspec.ValidationError) -> str:
    message = str(exc)
    m = _PATH.search(message)
    if m is None:
        return message[:1].lower() + message[1:]
    text = message[: m.start()]
    text = text[:1].lower() + text[1:]
    return f"{m.group('path')}: {text}" if m.group("path") else text
