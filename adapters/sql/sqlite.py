"""SQLite source and sink.

:class:`SqliteSource` captures a table's changes (trigger-fed change table, or polling a growing
cursor column); :class:`SqliteSink` applies records to a table under a per-key version guard
kept in the same database, so the guard and the write commit together. Both use one
``aiosqlite`` connection each and translate every ``sqlite3`` error into the mesh error tree:
a busy, locked or unreadable database is :class:`~mesh.errors.SystemUnavailable` and the adapter
stays usable for a retry. :func:`install_change_capture` and :func:`remove_change_capture`
manage the capture triggers outside a running source (for the CLI).
"""

from __future__ import annotations

import re
import sqlite3
from typing import Any

import aiosqlite
import anyio
import msgspec

from adapters.sql._sqlite_capture import (
    change_table,
    ensure_capture,
    install_change_capture,
    remove_change_capture,
)
from adapters.sql._sqlite_common import (
    close_quietly,
    connect,
    fetchall,
    find_column,
    is_unique_key,
    quote,
    run,
    table_columns,
    translate,
)
from adapters.sql._sqlite_sink import SqliteSink
from adapters.sql.config import SqliteSourceConfig
from mesh.adapters import Change, ChangeBatch, Source
from mesh.errors import ConfigError
from mesh.runs.bulk import row_version
from mesh.runs.bulk import timestamp_us as _timestamp_us

__all__ = ["SqliteSink", "SqliteSource", "install_change_capture", "remove_change_capture"]

_ROW_DECODER = msgspec.json.Decoder(dict[str, Any])
_CURSOR_DECODER = msgspec.json.Decoder(list[Any])
_CURSOR_ENCODER = msgspec.json.Encoder()
_INT_RE = re.compile(r"[+-]?[0-9]+")


class SqliteSource(Source):
    """Reads one SQLite table's changes, at-least-once and resumable from an opaque cursor.

    ``mode = "changes"`` (default): AFTER INSERT/UPDATE/DELETE triggers record every committed
    change in ``_mesh_changes_<table>`` (installed or brought up to date by :meth:`open` when
    ``install_triggers`` is set). Inserts, updates and deletes are all seen, in commit order; an
    update of the key column arrives as a delete of the old key, then an upsert of the new one.
    ``version`` is the change's sequence number (grows with every change, never reused) and the
    cursor is that number as text. :meth:`committed` deletes the change rows up to the cursor.
    Rows that existed before capture was installed are not emitted. BLOB values arrive as hex.

    ``mode = "cursor"``: polls rows whose ``cursor_column`` is greater than the cursor, ordered
    by (cursor column, key). The cursor holds both values (JSON), so a page that ends in the
    middle of equal cursor values neither loses nor repeats rows; the key must therefore be the
    table's primary key or UNIQUE, and rows whose cursor column is NULL are never read.
    **Deletes are not seen in this mode.** ``version`` is the integer value of
    ``version_column`` (default: the cursor column); an ISO-8601 timestamp text (as SQLite's
    ``datetime()`` writes it) becomes integer microseconds since the epoch, naive times read as
    UTC. Any other value raises :class:`~mesh.errors.ConfigError`. The writer must make the
    cursor column grow monotonically in commit order, or concurrent commits may be skipped.

    :meth:`read` blocks, polling every ``poll_interval`` seconds, until at least one change
    exists; it is cancellable while it waits and never returns an empty batch. A busy, locked or
    unreadable database raises :class:`~mesh.errors.SystemUnavailable`; the source stays usable
    and a retry from the same cursor returns the same changes with the same versions.

    ``busy_timeout`` (seconds) bounds how long one statement waits for another connection's lock.
    """

    def __init__(self, config: SqliteSourceConfig, *, busy_timeout: float = 5.0) -> None:
        if config.mode == "cursor" and config.cursor_column is None:
            raise ConfigError('cursor_column: required when mode = "cursor"', source=config.path)
        self._config = config
        self._busy_timeout = busy_timeout
        self._conn: aiosqlite.Connection | None = None
        self._cursor: str | None = None
        # Resolved column names (cursor mode) and the two page queries, built by open().
        self._key = config.key
        self._cursor_column = config.cursor_column or ""
        self._version_column = config.version_column or self._cursor_column
        self._first_page = ""
        self._next_page = ""

    def __repr__(self) -> str:
        state = "" if self._conn is not None else " closed"
        return (
            f"<SqliteSource {self._config.table} mode={self._config.mode} "
            f"cursor={self._cursor if self._cursor is not None else '-'}{state}>"
        )

    async def open(self) -> None:
        """Connect; install or check change capture (``changes``) or the columns (``cursor``).

        Raises:
            ConfigError: the file, table or a configured column does not exist; capture is
                missing or out of date and ``install_triggers`` is false; the key is not unique.
            SystemUnavailable: the database is locked or cannot be opened now.
        """
        if self._conn is not None:
            return
        cfg = self._config
        conn = await connect(cfg.path, create=False, busy_timeout=self._busy_timeout)
        try:
            if cfg.mode == "changes":
                await ensure_capture(conn, cfg.path, cfg.table, cfg.key, install=cfg.install_triggers)
            else:
                await self._prepare_cursor_mode(conn)
        except sqlite3.Error as exc:
            await close_quietly(conn)
            raise translate(exc, cfg.path) from exc
        except BaseException:
            await close_quietly(conn)
            raise
        self._conn = conn

    async def _prepare_cursor_mode(self, conn: aiosqlite.Connection) -> None:
        cfg = self._config
        columns = await table_columns(conn, cfg.table)
        if not columns:
            raise ConfigError(f"table {cfg.table!r} does not exist", source=cfg.path)

        def column(name: str) -> str:
            found = find_column(columns, name)
            if found is None:
                raise ConfigError(f"table {cfg.table!r} has no column {name!r}", source=cfg.path)
            return found.name

        self._key = column(cfg.key)
        self._cursor_column = column(self._cursor_column)
        self._version_column = column(self._version_column)
        key_column = find_column(columns, self._key)
        assert key_column is not None
        if not await is_unique_key(conn, cfg.table, key_column):
            raise ConfigError(
                f"key column {self._key!r} of table {cfg.table!r} must be its primary key or "
                "UNIQUE in cursor mode",
                source=cfg.path,
            )
        c, k = quote(self._cursor_column), quote(self._key)
        base = f"SELECT * FROM {quote(cfg.table)} WHERE {c} IS NOT NULL AND {k} IS NOT NULL"
        self._first_page = f"{base} ORDER BY {c}, {k} LIMIT ?"
        self._next_page = f"{base} AND ({c}, {k}) > (?, ?) ORDER BY {c}, {k} LIMIT ?"

    def _require(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise RuntimeError(f"{self!r} is not open")
        return self._conn

    async def read(self, cursor: str | None, limit: int) -> ChangeBatch:
        """Return up to ``limit`` changes after ``cursor``; block until there is at least one.

        Raises:
            SystemUnavailable: the database is locked or unreadable; retry from the same cursor.
            ConfigError: ``cursor`` is not a cursor of this mode, the schema no longer matches,
                or (cursor mode) a version value is neither an integer nor a timestamp.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        conn = self._require()
        while True:
            try:
                if self._config.mode == "changes":
                    batch = await self._read_changes(conn, cursor, limit)
                else:
                    batch = await self._read_rows(conn, cursor, limit)
            except sqlite3.Error as exc:
                raise translate(exc, self._config.path) from exc
            if batch is not None:
                self._cursor = batch.cursor
                return batch
            await anyio.sleep(self._config.poll_interval)

    async def _read_changes(
        self, conn: aiosqlite.Connection, cursor: str | None, limit: int
    ) -> ChangeBatch | None:
        rows = await fetchall(
            conn,
            f"SELECT seq, op, pk, row, at FROM {quote(change_table(self._config.table))} "
            "WHERE seq > ? ORDER BY seq LIMIT ?",
            (self._seq(cursor), limit),
        )
        if not rows:
            return None
        changes = [
            Change(
                key="" if pk is None else str(pk),
                version=seq,
                deleted=op == "D",
                row=_ROW_DECODER.decode(row),
                occurred_at=at,
            )
            for seq, op, pk, row, at in rows
        ]
        return ChangeBatch(changes=changes, cursor=str(rows[-1][0]))

    def _seq(self, cursor: str | None) -> int:
        if cursor is None:
            return 0
        if not _INT_RE.fullmatch(cursor):
            raise ConfigError(f"{cursor!r} is not a cursor of a changes-mode source")
        return int(cursor)

    async def _read_rows(
        self, conn: aiosqlite.Connection, cursor: str | None, limit: int
    ) -> ChangeBatch | None:
        params: tuple[Any, ...]
        if cursor is None:
            sql, params = self._first_page, (limit,)
        else:
            value, key = self._decode_cursor(cursor)
            sql, params = self._next_page, (value, key, limit)
        async with conn.execute(sql, params) as cur:
            rows = list(await cur.fetchall())
            names = [d[0] for d in cur.description]
        if not rows:
            return None
        changes = []
        for values in rows:
            row = dict(zip(names, values, strict=True))
            position = row[self._cursor_column]
            version = _version(row[self._version_column], self._version_column)
            stamp = _timestamp_us(position) if isinstance(position, str) else None
            changes.append(
                Change(
                    key=str(row[self._key]),
                    version=version,
                    row=row,
                    occurred_at=0 if stamp is None else stamp // 1000,
                )
            )
        last = changes[-1].row
        return ChangeBatch(
            changes=changes, cursor=self._encode_cursor(last[self._cursor_column], last[self._key])
        )

    def _encode_cursor(self, value: Any, key: Any) -> str:
        if isinstance(value, bytes) or isinstance(key, bytes):
            raise ConfigError(
                f"cursor mode needs non-BLOB values in {self._cursor_column!r} and {self._key!r}",
                source=self._config.path,
            )
        return _CURSOR_ENCODER.encode([value, key]).decode()

    def _decode_cursor(self, cursor: str) -> tuple[Any, Any]:
        try:
            parts = _CURSOR_DECODER.decode(cursor)
        except msgspec.DecodeError:
            parts = []
        if len(parts) != 2 or not all(isinstance(p, int | float | str) for p in parts):
            raise ConfigError(f"{cursor!r} is not a cursor of a cursor-mode source")
        return parts[0], parts[1]

    async def committed(self, cursor: str) -> None:
        """Changes mode: delete the change rows up to and including ``cursor``.

        Raises:
            SystemUnavailable: the database is locked; pruning is retried with a later cursor.
        """
        if self._config.mode != "changes":
            return
        conn = self._require()
        try:
            await run(
                conn,
                f"DELETE FROM {quote(change_table(self._config.table))} WHERE seq <= ?",
                (self._seq(cursor),),
            )
        except sqlite3.Error as exc:
            raise translate(exc, self._config.path) from exc

    async def aclose(self) -> None:
        """Close the connection. Idempotent; the source may be opened again."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await close_quietly(conn)


def _version(value: Any, column: str) -> int:
    """A cursor-mode version (:func:`~mesh.runs.bulk.row_version`). Raises ConfigError."""
    return row_version(value, column, what="column")
