"""What every fuzz target checks of an error, shared strategies, and a small TOML writer (the
standard library reads TOML but does not write it)."""

from __future__ import annotations

import datetime
import json
import math
import string
from typing import Any

from hypothesis import strategies as st

from mesh.errors import ConfigError

__all__ = [
    "assert_clear",
    "assert_clear_config_error",
    "json_values",
    "names",
    "text_any",
    "toml_document",
    "toml_values",
]


def assert_clear(exc: BaseException) -> None:
    """An error an operator reads: a non-empty message on one line, no traceback needed. Raw
    control characters (line breaks, escapes) are refused too: what a sender or a config file
    chose is quoted, so it can neither split a log line nor drive a terminal."""
    message = str(exc)
    assert message.strip(), f"{type(exc).__name__} with an empty message"
    assert message.isprintable(), f"{type(exc).__name__} message has raw control characters: {message!r}"
    assert "Traceback" not in message


def assert_clear_config_error(exc: ConfigError) -> None:
    """A ConfigError lists problems, each a non-empty one-line message (with its field path when
    it concerns a field), and renders one line per problem."""
    assert exc.problems, "a ConfigError without problems"
    for path, message in exc.problems:
        assert message.strip(), f"problem at {path!r} has no message"
        assert message.isprintable(), f"problem at {path!r} has raw control characters: {message!r}"
        assert path.isprintable(), f"field path has raw control characters: {path!r}"
    assert len(str(exc).splitlines()) == len(exc.problems)
    assert "Traceback" not in str(exc)


text_any = st.text(st.characters(codec="utf-8"), max_size=40)
"""Any text a UTF-8 file can hold (surrogates excluded)."""

names = st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=12)
"""Names that are valid tokens (agent, system, flow, table names)."""

json_values: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text_any,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text_any, children, max_size=4),
    max_leaves=12,
)
"""Anything a JSON document can hold (integers beyond 64 bits included)."""

_toml_scalars = (
    st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats()
    | text_any
    | st.datetimes(timezones=st.none() | st.just(datetime.UTC))
    | st.dates()
    | st.times()
)
toml_values: st.SearchStrategy[Any] = st.recursive(
    _toml_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text_any, children, max_size=4),
    max_leaves=12,
)
"""Anything a TOML value can be."""


def _string(text: str) -> str:
    out = []
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return json.dumps(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_string(str(k))} = {_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML for {type(value).__name__}")


def toml_document(data: dict[str, Any]) -> str:
    """``data`` as a TOML document: one ``key = value`` line per top-level key, tables inline."""
    return "".join(f"{_string(str(k))} = {_value(v)}\n" for k, v in data.items())
