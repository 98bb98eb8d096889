"""Paths into JSON answers for the REST sink's templates: ``Contacts[0].ContactID``,
``Elements[].ValidationErrors[].Message`` (``[]`` fans out over every item of a list).

Pure functions; nothing here raises on data that does not match: a path that is absent reads as
no value (an empty list from :func:`collect`, ``None`` from :func:`first`).
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["MISSING", "check_path", "collect", "dotted", "first", "parse"]

_PART = re.compile(r"^(?P<name>[^.\[\]]*)(?P<index>(\[\d*\])*)$")
_INDEX = re.compile(r"\[(\d*)\]")

Step = str | int | None
"""A key, a list index, or ``None`` for every item of a list."""


def parse(text: str) -> tuple[Step, ...]:
    """``"Elements[].ValidationErrors[0].Message"`` -> ``("Elements", None, "ValidationErrors", 0,
    "Message")``.

    Raises:
        ValueError: an empty path, an empty name where one is needed, or unbalanced brackets.
    """
    if not text:
        raise ValueError("empty path")
    steps: list[Step] = []
    for i, part in enumerate(text.split(".")):
        match = _PART.match(part)
        if match is None or (not match["name"] and (i > 0 or not match["index"])):
            raise ValueError(f"malformed path {text!r} (names joined by '.', then [n] or [] if any)")
        if match["name"]:
            steps.append(match["name"])
        for index in _INDEX.findall(match["index"]):
            steps.append(int(index) if index else None)
    return tuple(steps)


def check_path(text: str) -> str | None:
    """What is wrong with ``text`` as a path, or None."""
    try:
        parse(text)
    except ValueError as exc:
        return str(exc)
    return None


def collect(data: Any, path: str | tuple[Step, ...]) -> list[Any]:
    """Every value at ``path`` (several where it fans out with ``[]``), in document order; absent
    parts and JSON nulls are left out."""
    values = [data]
    for step in parse(path) if isinstance(path, str) else path:
        out: list[Any] = []
        for value in values:
            if step is None:
                if isinstance(value, list):
                    out.extend(value)
            elif isinstance(step, int):
                if isinstance(value, list) and step < len(value):
                    out.append(value[step])
            elif isinstance(value, dict) and step in value:
                out.append(value[step])
        values = [v for v in out if v is not None]
    return values


def first(data: Any, path: str | tuple[Step, ...]) -> Any:
    """The first value at ``path``, or None."""
    found = collect(data, path)
    return found[0] if found else None


MISSING: Any = object()
"""What :func:`dotted` returns where nothing is (a JSON null is ``None``)."""


def dotted(doc: Any, path: str | tuple[str, ...] | None) -> Any:
    """The value at a dotted path of the REST source's fields (``data.items``, ``tags.0``: list
    items by index), or :data:`MISSING`. ``None`` is the whole document; a string path is split
    on ``.`` (pass it split, ``tuple(path.split("."))``, to do that once)."""
    if path is None:
        return doc
    for part in path.split(".") if isinstance(path, str) else path:
        if isinstance(doc, dict):
            doc = doc.get(part, MISSING)
        elif isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            return MISSING
        if doc is MISSING:
            return MISSING
    return doc
