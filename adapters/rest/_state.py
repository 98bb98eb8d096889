"""The REST sink's local version guard: key -> highest version the target acknowledged.

A REST target usually keeps no per-key version the sink could compare against, so the sink keeps
one itself, in a small SQLite file it owns (``state_path``). A version is recorded only after
the target answered 2xx, in its own fsync'd transaction (WAL, ``synchronous=FULL``); the stored
version never goes down (the upsert keeps the larger one), and a delete is kept as a tombstone
row (``deleted = 1``) so an older upsert arriving later is still recognised as stale (I5).

Rows are scoped by a *target* name (base URL and path template), so one file can serve several
sinks, and pointing a sink at another API starts from an empty guard.

Errors: a missing directory is :class:`~mesh.errors.ConfigError`; any other ``sqlite3`` error is
:class:`~mesh.errors.SystemUnavailable` (disk full, locked, unreadable): the caller retries.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from contextlib import suppress

import aiosqlite
import anyio

from mesh.errors import ConfigError, SystemUnavailable

__all__ = ["VersionStore", "default_target"]

_DDL = (
    "CREATE TABLE IF NOT EXISTS mesh_rest_versions ("
    "target TEXT NOT NULL, key TEXT NOT NULL, version INTEGER NOT NULL, "
    "deleted INTEGER NOT NULL, applied_at INTEGER NOT NULL, PRIMARY KEY (target, key)"
    ") WITHOUT ROWID"
)
_RECORD = (
    "INSERT INTO mesh_rest_versions (target, key, version, deleted, applied_at) "
    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (target, key) DO UPDATE SET "
    "version = excluded.version, deleted = excluded.deleted, applied_at = excluded.applied_at "
    "WHERE excluded.version > mesh_rest_versions.version"
)
# The highest version of each key ever *sent* (recorded before the request goes out). A request
# may take effect without us seeing the answer (a timeout, a kill, a batch given back); anything
# older than what was sent must then never be sent, or it would overwrite the newer write at a
# target that has no version guard of its own.
_SENT_DDL = (
    "CREATE TABLE IF NOT EXISTS mesh_rest_sent ("
    "target TEXT NOT NULL, key TEXT NOT NULL, version INTEGER NOT NULL, PRIMARY KEY (target, key)"
    ") WITHOUT ROWID"
)
_MARK_SENT = (
    "INSERT INTO mesh_rest_sent (target, key, version) VALUES (?, ?, ?) "
    "ON CONFLICT (target, key) DO UPDATE SET version = excluded.version "
    "WHERE excluded.version > mesh_rest_sent.version"
)
_CHUNK = 500  # keys per look-up, well under SQLite's bound-parameter limit


class VersionStore:
    """Per-key applied versions of one target, in the SQLite file at ``path``."""

    def __init__(self, path: str, target: str, *, busy_timeout: float = 5.0) -> None:
        self.path = path
        self.target = target
        self._busy_timeout = busy_timeout
        self._conn: aiosqlite.Connection | None = None

    def __repr__(self) -> str:
        return f"<VersionStore {self.path}{'' if self._conn else ' closed'}>"

    async def open(self) -> None:
        """Open (creating the file and table when missing).

        Raises:
            ConfigError: the file's directory does not exist.
            SystemUnavailable: the file cannot be opened or written now.
        """
        if self._conn is not None:
            return
        if not await anyio.Path(self.path).parent.is_dir():
            raise ConfigError(f"directory of REST sink state_path {self.path} does not exist")
        try:
            conn = await aiosqlite.connect(self.path, isolation_level=None)
        except sqlite3.Error as exc:
            raise SystemUnavailable(f"REST sink state {self.path}: {exc}") from exc
        try:
            for sql in (
                f"PRAGMA busy_timeout = {round(self._busy_timeout * 1000)}",
                "PRAGMA journal_mode = WAL",
                "PRAGMA synchronous = FULL",
                _DDL,
                _SENT_DDL,
            ):
                await conn.execute_fetchall(sql)
        except sqlite3.Error as exc:
            await _close(conn)
            raise SystemUnavailable(f"REST sink state {self.path}: {exc}") from exc
        except BaseException:
            await _close(conn)
            raise
        self._conn = conn

    def _require(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise RuntimeError(f"{self!r} is not open")
        return self._conn

    async def versions(self, keys: Iterable[str], *, table: str = "mesh_rest_versions") -> dict[str, int]:
        """The recorded (acknowledged, or with ``table="mesh_rest_sent"`` sent) version of each of
        ``keys`` that has one.

        Raises:
            SystemUnavailable: the file cannot be read now.
        """
        assert table in ("mesh_rest_versions", "mesh_rest_sent")
        conn = self._require()
        wanted = list(dict.fromkeys(keys))
        found: dict[str, int] = {}
        try:
            for i in range(0, len(wanted), _CHUNK):
                chunk = wanted[i : i + _CHUNK]
                rows = await conn.execute_fetchall(
                    f"SELECT key, version FROM {table} "
                    f"WHERE target = ? AND key IN ({', '.join('?' * len(chunk))})",
                    (self.target, *chunk),
                )
                found.update((str(k), int(v)) for k, v in rows)
        except sqlite3.Error as exc:
            raise SystemUnavailable(f"REST sink state {self.path}: {exc}") from exc
        return found

    async def mark_sent(self, versions: dict[str, int]) -> None:
        """Durably remember, before a request goes out, the version about to be sent per key
        (never lowers it).

        Raises:
            SystemUnavailable: the file cannot be written now.
        """
        if not versions:
            return
        conn = self._require()
        try:
            # Autocommit: each statement is its own durable transaction (the connection is shared
            # by the sink's concurrent workers, so no explicit BEGIN here).
            for key, version in versions.items():
                await conn.execute_fetchall(_MARK_SENT, (self.target, key, version))
        except sqlite3.Error as exc:
            raise SystemUnavailable(f"REST sink state {self.path}: {exc}") from exc

    async def record(self, key: str, version: int, *, deleted: bool) -> None:
        """Durably remember that the target acknowledged ``version`` of ``key`` (never lowers it).

        Raises:
            SystemUnavailable: the file cannot be written now.
        """
        conn = self._require()
        try:
            await conn.execute_fetchall(_RECORD, (self.target, key, version, int(deleted), int(time.time())))
        except sqlite3.Error as exc:
            raise SystemUnavailable(f"REST sink state {self.path}: {exc}") from exc

    async def aclose(self) -> None:
        """Close the file. Idempotent."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await _close(conn)


async def _close(conn: aiosqlite.Connection) -> None:
    with anyio.CancelScope(shield=True), suppress(sqlite3.Error):
        await conn.close()


def default_target(base_url: str, template: str) -> str:
    """The name rows are scoped by: the base URL and the upsert path template."""
    return base_url.rstrip("/") + "/" + template.lstrip("/")
