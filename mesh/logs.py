"""Structured logging: one line per event, with the agent, flow and correlation id it concerns.

Context travels in a :class:`contextvars.ContextVar`, so it follows a task and whatever it
awaits, never leaks into sibling tasks (anyio copies the context when it starts a task):

* :func:`bind` sets fields for the rest of the current task (an actor binds ``agent`` and
  ``flow`` once when it starts);
* :func:`log_context` sets fields for one block (an apply loop binds ``correlation_id`` while
  it handles one message) and restores the previous ones after it.

Every log record gets those fields; the text format appends them as ``key=value`` pairs, the
JSON-lines format (``log_format = "json"``) writes one object per line for a log shipper.
Credentials in URLs (``nats://user:pass@host``) are redacted from every line.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import time
from collections.abc import Iterator
from typing import Literal

import msgspec

from mesh.redact import redact_urls

__all__ = ["LogFormat", "bind", "current_context", "log_context", "setup_logging"]

LogFormat = Literal["text", "json"]

FIELDS = ("agent", "flow", "correlation_id")
"""The context fields, in the order the text format prints them (others follow sorted)."""

_context: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("mesh_log_context", default={})  # noqa: B039 - never mutated
_json = msgspec.json.Encoder()


def current_context() -> dict[str, str]:
    """The fields bound in the current task (a copy)."""
    return dict(_context.get())


def bind(**fields: object) -> None:
    """Set ``fields`` for the rest of the current task (and the tasks it starts); None removes one."""
    _context.set(_merged(fields))


@contextlib.contextmanager
def log_context(**fields: object) -> Iterator[None]:
    """Set ``fields`` for the duration of the block; the previous values come back after it."""
    token = _context.set(_merged(fields))
    try:
        yield
    finally:
        _context.reset(token)


def _merged(fields: dict[str, object]) -> dict[str, str]:
    merged = dict(_context.get())
    for key, value in fields.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = str(value)
    return merged


class _ContextFilter(logging.Filter):
    """Copies the bound context onto each record (``extra=`` given to one call wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            if getattr(record, key, None) is None:
                setattr(record, key, value)
        return True


def _fields(record: logging.LogRecord) -> dict[str, str]:
    out = {}
    for key in (*FIELDS, *sorted(k for k in _context.get() if k not in FIELDS)):
        value = getattr(record, key, None)
        if value is not None:
            out[key] = str(value)
    return out


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = redact_urls(record.getMessage())
        line = f"{_timestamp(record)} {record.levelname.lower():<7} {record.name}: {message}"
        for key, value in _fields(record).items():
            line += f" {key}={value}"
        if record.exc_info:
            line += "\n" + redact_urls(self.formatException(record.exc_info))
        return line


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, str] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact_urls(record.getMessage()),
            **_fields(record),
        }
        if record.exc_info:
            obj["exc"] = redact_urls(self.formatException(record.exc_info))
        return _json.encode(obj).decode()


def setup_logging(level: str = "info", *, stream: object = None, fmt: LogFormat = "text") -> None:
    """Send logs to stderr (or ``stream``) at ``level`` as text lines or JSON lines; nats-py's and
    aiosqlite's chatter only from WARNING up."""
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("nats").setLevel(logging.WARNING)
    logging.getLogger("aiosqlite").setLevel(logging.WARNING)
