"""Delivery ids the webhook source has captured, in its own SQLite file (``state_path``).

An id is recorded right after the agent committed its events to the outbox, in an fsync'd
transaction (WAL, ``synchronous=FULL``), and forgotten after the retention. Rows are scoped by
the receiver's URL path, so one file can serve several sources.

Errors: a missing directory is :class:`~mesh.errors.ConfigError`; any other ``sqlite3`` error is
:class:`~mesh.errors.SystemUnavailable` (disk full, locked, unreadable).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from contextlib import suppress

import aiosqlite
import anyio

from mesh.errors import ConfigError, SystemUnavailable

__all__ = ["SeenIds"]

_DDL = (
    "CREATE TABLE IF NOT EXISTS mesh_webhook_seen ("
    "scope TEXT NOT NULL, delivery_id TEXT NOT NULL, seen_at REAL NOT NULL, "
    "PRIMARY KEY (scope, delivery_id)) WITHOUT ROWID"
)
_INDEX = "CREATE INDEX IF NOT EXISTS mesh_webhook_seen_at ON mesh_webhook_seen (seen_at)"


class SeenIds:
    """The delivery ids of one receiver, in the SQLite file at ``path``."""

    def __init__(self, path: str, scope: str, *, busy_timeout: float = 5.0) -> None:
        self.path = path
        self.scope = scope
        self._busy_timeout = busy_timeout
        self._conn: aiosqlite.Connection | None = None

    def __repr__(self) -> str:
        return f"<SeenIds {self.path} {self.scope}{'' if self._conn else ' closed'}>"

    def _unavailable(self, exc: sqlite3.Error) -> SystemUnavailable:
        return SystemUnavailable(f"webhook source state {self.path}: {exc}")

    async def open(self) -> None:
        """Open (creating the file and table when missing).

        Raises:
            ConfigError: the file's directory does not exist.
            SystemUnavailable: the file cannot be opened or written now.
        """
        if self._conn is not None:
            return
        if not await anyio.Path(self.path).parent.is_dir():
            raise ConfigError(f"directory of webhook source state_path {self.path} does not exist")
        try:
            conn = await aiosqlite.connect(self.path, isolation_level=None)
        except sqlite3.Error as exc:
            raise self._unavailable(exc) from exc
        try:
            for sql in (
                f"PRAGMA busy_timeout = {round(self._busy_timeout * 1000)}",
                "PRAGMA journal_mode = WAL",
                "PRAGMA synchronous = FULL",
                _DDL,
                _INDEX,
            ):
                await conn.execute_fetchall(sql)
        except sqlite3.Error as exc:
            await _close(conn)
            raise self._unavailable(exc) from exc
        except BaseException:
            await _close(conn)
            raise
        self._conn = conn

    def _require(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise SystemUnavailable(f"webhook source state {self.path} is closed")
        return self._conn

    async def contains(self, delivery_id: str) -> bool:
        """Whether ``delivery_id`` was recorded (and not yet pruned).

        Raises:
            SystemUnavailable: the file cannot be read now.
        """
        conn = self._require()
        try:
            rows = await conn.execute_fetchall(
                "SELECT 1 FROM mesh_webhook_seen WHERE scope = ? AND delivery_id = ?",
                (self.scope, delivery_id),
            )
        except sqlite3.Error as exc:
            raise self._unavailable(exc) from exc
        return bool(list(rows))

    async def record(self, delivery_ids: Sequence[str]) -> None:
        """Durably record ``delivery_ids`` (one transaction; already recorded ones are kept).

        Raises:
            SystemUnavailable: the file cannot be written now.
        """
        if not delivery_ids:
            return
        conn = self._require()
        now = time.time()
        try:
            await conn.execute_fetchall("BEGIN IMMEDIATE")
            try:
                async with conn.executemany(
                    "INSERT OR IGNORE INTO mesh_webhook_seen (scope, delivery_id, seen_at) VALUES (?, ?, ?)",
                    [(self.scope, d, now) for d in delivery_ids],
                ):
                    pass
                await conn.execute_fetchall("COMMIT")
            except BaseException:
                with anyio.CancelScope(shield=True), suppress(sqlite3.Error):
                    await conn.execute_fetchall("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise self._unavailable(exc) from exc

    async def prune(self, retention: float) -> int:
        """Forget ids recorded more than ``retention`` seconds ago; how many were forgotten.

        Raises:
            SystemUnavailable: the file cannot be written now.
        """
        conn = self._require()
        try:
            async with conn.execute(
                "DELETE FROM mesh_webhook_seen WHERE scope = ? AND seen_at < ?",
                (self.scope, time.time() - retention),
            ) as cursor:
                count = cursor.rowcount
        except sqlite3.Error as exc:
            raise self._unavailable(exc) from exc
        return max(0, count)

    async def aclose(self) -> None:
        """Close the file. Idempotent."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await _close(conn)


async def _close(conn: aiosqlite.Connection) -> None:
    with anyio.CancelScope(shield=True), suppress(sqlite3.Error):
        await conn.close()
