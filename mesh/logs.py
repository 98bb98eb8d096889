"""Structured logging: one line per event, ``key=value`` pairs after the message."""

from __future__ import annotations

import logging
import sys
import time

__all__ = ["setup_logging"]


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = (
            f"{ts}.{int(record.msecs):03d}Z {record.levelname.lower():<7} "
            f"{record.name}: {record.getMessage()}"
        )
        for key in ("agent", "flow", "correlation_id"):
            value = getattr(record, key, None)
            if value is not None:
                line += f" {key}={value}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(level: str = "info", *, stream: object = None) -> None:
    """Send mesh logs to stderr (or ``stream``) at ``level``; nats-py's chatter at WARNING+."""
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.setFormatter(_Formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("nats").setLevel(logging.WARNING)
    logging.getLogger("aiosqlite").setLevel(logging.WARNING)
