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
from contextlib import closing, suppress
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote

import aiosqlite
import anyio

from mesh.errors import ConfigError, SystemUnavailable

__all__ = ["VersionStore", "XrefRow", "default_target", "read_xrefs"]

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
# The cross-reference: the id the target assigned to a key on create. A row with a NULL id and a
# ``pending_version`` is a create that was sent (written durably *before* the request) whose
# answer was not seen: before creating again, the sink looks the record up.
_XREF_DDL = (
    "CREATE TABLE IF NOT EXISTS mesh_rest_xref ("
    "target TEXT NOT NULL, key TEXT NOT NULL, id TEXT, pending_version INTEGER, "
    "updated_at INTEGER NOT NULL, PRIMARY KEY (target, key)"
    ") WITHOUT ROWID"
)
_XREF_PENDING = (
    "INSERT INTO mesh_rest_xref (target, key, id, pending_version, updated_at) VALUES (?, ?, NULL, ?, ?) "
    "ON CONFLICT (target, key) DO UPDATE SET pending_version = excluded.pending_version, "
    "updated_at = excluded.updated_at WHERE mesh_rest_xref.id IS NULL"
)
_XREF_SET = (
    "INSERT INTO mesh_rest_xref (target, key, id, pending_version, updated_at) VALUES (?, ?, ?, NULL, ?) "
    "ON CONFLICT (target, key) DO UPDATE SET id = excluded.id, pending_version = NULL, "
    "updated_at = excluded.updated_at"
)
_CHUNK = 500  # keys per look-up, well under SQLite's bound-parameter limit


class VersionStore:
    """Per-key applied versions of one target, in the SQLite file at ``path``."""

    def __init__(self, path: str, target: str, *, busy_timeout: float = 5.0) -> None:
        self.path = path
        self.target = target
        self._busy_timeout = busy_timeout
        self._conn: aiosqlite.Connection | None = None
        self._write = anyio.Lock()  # one explicit transaction at a time on the shared connection

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
                _XREF_DDL,
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
            async with self._write:  # never inside another task's explicit transaction
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
            async with self._write:  # never inside another task's explicit transaction
                await conn.execute_fetchall(
                    _RECORD, (self.target, key, version, int(deleted), int(time.time()))
                )
        except sqlite3.Error as exc:
            raise SystemUnavailable(f"REST sink state {self.path}: {exc}") from exc

    async def xrefs(self, keys: Iterable[str]) -> dict[str, XrefRow]:
        """The cross-reference rows of those of ``keys`` that have one.

        Raises:
            SystemUnavailable: the file cannot be read now.
        """
        conn = self._require()
        wanted = list(dict.fromkeys(keys))
        found: dict[str, XrefRow] = {}
        try:
            for i in range(0, len(wanted), _CHUNK):
                chunk = wanted[i : i + _CHUNK]
                rows = await conn.execute_fetchall(
                    "SELECT key, id, pending_version, updated_at FROM mesh_rest_xref "
                    f"WHERE target = ? AND key IN ({', '.join('?' * len(chunk))})",
                    (self.target, *chunk),
                )
                found.update((str(r[0]), XrefRow(self.target, str(r[0]), r[1], r[2], r[3])) for r in rows)
        except sqlite3.Error as exc:
            raise SystemUnavailable(f"REST sink state {self.path}: {exc}") from exc
        return found

    async def mark_creating(self, versions: dict[str, int]) -> None:
        """Durably note, before a create goes out, that ``key`` may get an id from ``version``'s
        create (kept until the id is known; a key with an id is left alone).

        Raises:
            SystemUnavailable: the file cannot be written now.
        """
        if not versions:
            return
        now = int(time.time())
        await self._transaction([(_XREF_PENDING, (self.target, k, v, now)) for k, v in versions.items()])

    async def forget_pending(self, keys: list[str]) -> None:
        """Drop the pending-create marks of ``keys`` (their creates were refused: nothing to look
        up); a key with an id is left alone.

        Raises:
            SystemUnavailable: the file cannot be written now.
        """
        sql = "DELETE FROM mesh_rest_xref WHERE target = ? AND key = ? AND id IS NULL"
        await self._transaction([(sql, (self.target, key)) for key in keys])

    async def record_applied(
        self,
        key: str,
        version: int | None,
        *,
        deleted: bool = False,
        guard: str | None = None,
        target_id: str | None = None,
    ) -> None:
        """Durably record, in ONE transaction, that the target acknowledged ``version`` of the
        record (version table, under ``guard``, default ``key``; none: no version) and, when
        given, the id it assigned to ``key``.

        Raises:
            SystemUnavailable: the file cannot be written now.
        """
        now = int(time.time())
        statements: list[tuple[str, tuple[object, ...]]] = []
        if version is not None:
            statements.append((_RECORD, (self.target, guard or key, version, int(deleted), now)))
        if target_id is not None:
            statements.append((_XREF_SET, (self.target, key, target_id, now)))
        await self._transaction(statements)

    async def _transaction(self, statements: list[tuple[str, tuple[object, ...]]]) -> None:
        conn = self._require()
        async with self._write:
            try:
                await conn.execute_fetchall("BEGIN IMMEDIATE")
                try:
                    for sql, params in statements:
                        await conn.execute_fetchall(sql, params)
                except BaseException:
                    with anyio.CancelScope(shield=True), suppress(sqlite3.Error):
                        await conn.execute_fetchall("ROLLBACK")
                    raise
                await conn.execute_fetchall("COMMIT")
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


class XrefRow(NamedTuple):
    """One cross-reference row: ``id`` is None while a create's answer is unknown
    (``pending_version`` then names the version whose create was sent)."""

    target: str
    key: str
    id: str | None
    pending_version: int | None
    updated_at: int


def read_xrefs(path: str, *, key: str | None = None) -> list[XrefRow]:
    """The cross-reference rows in the state file at ``path`` (of every target in it; of one
    ``key`` when given), read-only, ordered by target and key.

    Raises:
        ConfigError: there is no such file.
        SystemUnavailable: it cannot be read (locked, not a state file).
    """
    if not Path(path).is_file():
        raise ConfigError(f"REST sink state {path}: no such file (has the sink run yet?)")
    try:
        with closing(sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True)) as db:
            exists = db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'mesh_rest_xref'"
            ).fetchone()
            if not exists:
                return []
            sql = "SELECT target, key, id, pending_version, updated_at FROM mesh_rest_xref"
            if key is None:
                rows = db.execute(sql + " ORDER BY target, key").fetchall()
            else:
                rows = db.execute(sql + " WHERE key = ? ORDER BY target", (key,)).fetchall()
    except sqlite3.Error as exc:
        raise SystemUnavailable(f"REST sink state {path}: {exc}") from exc
    return [XrefRow(str(t), str(k), i, p, int(u)) for t, k, i, p, u in rows]


def default_target(base_url: str, template: str) -> str:
    """The name rows are scoped by: the base URL and the upsert path template."""
    return base_url.rstrip("/") + "/" + template.lstrip("/")
