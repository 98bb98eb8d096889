"""A mapping's reference tables (``lookups``) in memory, and how values are matched as keys."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import msgspec

from mesh import _mapping_convert as cv
from mesh._mapping_config import LookupConfig

__all__ = ["Lookup", "key_of", "quote_identifier", "read_only"]


def key_of(value: Any) -> str:
    """How a source value is matched against map and lookup keys (TOML keys are strings):
    strings as they are, booleans as ``true``/``false``, whole floats as integers."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def quote_identifier(name: str) -> str:
    """``name`` as a quoted SQLite identifier (a table or column name from the config)."""
    return '"' + name.replace('"', '""') + '"'


def read_only(path: str) -> sqlite3.Connection:
    """A read-only connection to the SQLite file at ``path``; raises ``sqlite3.Error``."""
    return sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True)


class Lookup:
    """One reference table, in memory."""

    def __init__(self, name: str, cfg: LookupConfig, path: str | None) -> None:
        self.name = name
        self.cfg = cfg
        self.path = path
        self.table: dict[str, Any] | None = (
            {key_of(k): v for k, v in cfg.values.items()} if cfg.values is not None else None
        )
        self.loaded_at = time.monotonic()

    @property
    def due(self) -> float:
        """Monotonic time of the next reload (inf for inline tables)."""
        return float("inf") if self.path is None else self.loaded_at + self.cfg.refresh

    def load(self) -> None:
        """(Re)read the SQLite table. Blocking: call through a worker thread."""
        assert self.path is not None, "inline tables are not loaded"
        key, value, name = (quote_identifier(x or "") for x in (self.cfg.key, self.cfg.value, self.cfg.table))
        conn = read_only(self.path)
        try:
            rows = conn.execute(f"SELECT {key}, {value} FROM {name}").fetchall()
        finally:
            conn.close()
        self.table = {key_of(k): v for k, v in rows if k is not None}
        self.loaded_at = time.monotonic()

    def get(self, value: Any) -> Any:
        if self.table is None:
            raise RuntimeError(f"lookup {self.name!r} is not loaded: open the mapper first")
        key = key_of(value)
        if key in self.table:
            return self.table[key]
        if self.cfg.default is not msgspec.UNSET:
            return self.cfg.default
        raise cv.Fail(f"{value!r} is not in lookup {self.name!r}")

    def __repr__(self) -> str:
        where = "inline" if self.path is None else f"{self.path}:{self.cfg.table}"
        size = "not loaded" if self.table is None else f"{len(self.table)} keys"
        return f"<Lookup {self.name} {where} {size}>"
