"""Shared helpers for the agent's SQLite stores: opening with the right pragmas, and
translating sqlite3 errors into the mesh's error tree."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiosqlite

from mesh.errors import StopError, SystemUnavailable


async def open_store(path: Path, *, synchronous: str) -> aiosqlite.Connection:
    """Open (creating) a store in WAL mode with the given ``synchronous`` level.

    Autocommit mode (``isolation_level=None``): transactions are explicit ``BEGIN IMMEDIATE``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        db = await aiosqlite.connect(path, isolation_level=None)
    except sqlite3.Error as exc:
        raise StopError(f"cannot open store {path}: {exc}") from exc
    try:
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute(f"PRAGMA synchronous={synchronous}")
        await db.execute("PRAGMA busy_timeout=10000")
    except sqlite3.Error as exc:
        await db.close()
        raise StopError(f"cannot open store {path}: {exc}") from exc
    return db


@contextmanager
def store_errors(path: Path) -> Iterator[None]:
    """Busy/locked -> SystemUnavailable (retry); anything else (corrupt, full disk) -> StopError."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        text = str(exc).lower()
        if "locked" in text or "busy" in text:
            raise SystemUnavailable(f"store {path} busy: {exc}") from exc
        raise StopError(f"store {path}: {exc}") from exc
    except sqlite3.Error as exc:
        raise StopError(f"store {path}: {exc}") from exc
