"""The SQLite sink: version-guarded upserts and tombstoned deletes, one transaction per batch.

Public through :mod:`adapters.sql.sqlite`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any, NamedTuple

import aiosqlite
import msgspec

from adapters.sql._sqlite_common import (
    close_quietly,
    connect,
    fetchall,
    find_column,
    immediate_transaction,
    is_record_error,
    is_unique_key,
    quote,
    run,
    table_columns,
    translate,
)
from mesh.adapters import Applied, Sink, SinkRecord
from mesh.config import SqliteSinkConfig
from mesh.errors import ConfigError, RejectedRecord

__all__ = ["SqliteSink"]

VERSIONS_TABLE = "_mesh_versions"
_VERSIONS_DDL = (
    f"CREATE TABLE IF NOT EXISTS {VERSIONS_TABLE} (tbl TEXT, key TEXT, "
    "version INTEGER NOT NULL, deleted INTEGER NOT NULL, PRIMARY KEY (tbl, key))"
)
_STORED_VERSION = f"SELECT version FROM {VERSIONS_TABLE} WHERE tbl = ? AND key = ?"
_STORE_VERSION = (
    f"INSERT INTO {VERSIONS_TABLE} (tbl, key, version, deleted) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (tbl, key) DO UPDATE SET version = excluded.version, deleted = excluded.deleted"
)
_INT64 = range(-(2**63), 2**63)
_JSON = msgspec.json.Encoder()


class _Target(NamedTuple):
    """The target table as this transaction sees it."""

    columns: dict[str, str]  # lower-cased name -> declared name
    key: str


class SqliteSink(Sink):
    """Applies records to one SQLite table, idempotently, under a per-key version guard.

    The guard lives in ``_mesh_versions`` inside the target database, so it commits atomically
    with the write. A record whose version is not greater than the stored one is
    :attr:`~mesh.adapters.Applied.STALE` and causes no write at all. A delete removes the row and
    keeps a tombstone version, so an older upsert arriving later cannot resurrect it. An upsert
    writes the row's values for the columns the table has (other fields are ignored; nested
    lists and objects are stored as JSON text). Key values are compared with the key column's
    affinity (``"42"`` matches an INTEGER key ``42``); the guard is keyed by ``record.key``.

    :meth:`apply` runs the whole batch in one ``BEGIN IMMEDIATE`` transaction (WAL,
    ``synchronous=FULL``), durable when it returns. A record the table refuses (constraint,
    type mismatch, missing or NULL key, unsupported value) yields a
    :class:`~mesh.errors.RejectedRecord` in its slot, its savepoint rolled back, while the rest
    apply. A busy, locked or unwritable database rolls the batch back and raises
    :class:`~mesh.errors.SystemUnavailable`; the sink stays usable.

    With ``create_table`` the table is created from the first upserted row (the key column as
    PRIMARY KEY, types from the values); otherwise a missing table is a
    :class:`~mesh.errors.ConfigError` at :meth:`open`.
    """

    def __init__(self, config: SqliteSinkConfig) -> None:
        self._config = config
        self._conn: aiosqlite.Connection | None = None
        self._upserts: dict[tuple[str, ...], str] = {}
        self._applied = self._stale = self._rejected = 0

    def __repr__(self) -> str:
        state = "" if self._conn is not None else " closed"
        return (
            f"<SqliteSink {self._config.table} applied={self._applied} stale={self._stale} "
            f"rejected={self._rejected}{state}>"
        )

    async def open(self) -> None:
        """Connect (WAL), check the target table and create the version-guard table.

        Raises:
            ConfigError: the table (or its key column) does not exist and may not be created,
                or the key column is neither the primary key nor UNIQUE.
            SystemUnavailable: the database is locked or cannot be opened now.
        """
        if self._conn is not None:
            return
        cfg = self._config
        conn = await connect(cfg.path, create=cfg.create_table, busy_timeout=cfg.busy_timeout)
        try:
            await self._target(conn)
            await run(conn, "PRAGMA journal_mode = WAL")
            await run(conn, "PRAGMA synchronous = FULL")
            await run(conn, _VERSIONS_DDL)
        except sqlite3.Error as exc:
            await close_quietly(conn)
            raise translate(exc, cfg.path) from exc
        except BaseException:
            await close_quietly(conn)
            raise
        self._conn = conn

    async def _target(self, conn: aiosqlite.Connection) -> _Target | None:
        """The target table's shape; None if it is missing and may be created."""
        cfg = self._config
        columns = await table_columns(conn, cfg.table)
        if not columns:
            if cfg.create_table:
                return None
            raise ConfigError(
                f"table {cfg.table!r} does not exist (set create_table = true to create it)",
                source=cfg.path,
            )
        key = find_column(columns, cfg.key)
        if key is None:
            raise ConfigError(f"table {cfg.table!r} has no column {cfg.key!r}", source=cfg.path)
        if not await is_unique_key(conn, cfg.table, key):
            raise ConfigError(
                f"key column {key.name!r} of table {cfg.table!r} is neither its primary key nor UNIQUE",
                source=cfg.path,
            )
        return _Target({c.name.lower(): c.name for c in columns}, key.name)

    async def apply(self, records: Sequence[SinkRecord]) -> list[Applied | Exception]:
        """Apply ``records`` in order in one transaction; one outcome per record.

        Raises:
            SystemUnavailable: the database is locked or failed; nothing was applied.
            ConfigError: the table disappeared (and may not be created) or its schema no longer
                fits; nothing was applied.
        """
        if not records:
            return []
        if self._conn is None:
            raise RuntimeError(f"{self!r} is not open")
        conn = self._conn
        outcomes: list[Applied | Exception] = []
        try:
            async with immediate_transaction(conn):
                target = await self._target(conn)
                for record in records:
                    outcome, target = await self._apply_one(conn, record, target)
                    outcomes.append(outcome)
        except sqlite3.Error as exc:
            raise translate(exc, self._config.path) from exc
        self._applied += sum(1 for o in outcomes if o is Applied.APPLIED)
        self._stale += sum(1 for o in outcomes if o is Applied.STALE)
        self._rejected += sum(1 for o in outcomes if isinstance(o, Exception))
        return outcomes

    async def _apply_one(
        self, conn: aiosqlite.Connection, record: SinkRecord, target: _Target | None
    ) -> tuple[Applied | Exception, _Target | None]:
        table = self._config.table
        if record.version not in _INT64:
            return RejectedRecord(f"{table} key {record.key!r}: version out of range"), target
        stored = await fetchall(conn, _STORED_VERSION, (table, record.key))
        if stored and stored[0][0] >= record.version:
            return Applied.STALE, target
        values: dict[str, Any] = {}
        if not record.deleted:
            try:
                values = _row_values(record.row, self._config.key)
            except RejectedRecord as exc:
                return RejectedRecord(f"{table} key {record.key!r}: {exc}"), target
        created = False
        await run(conn, "SAVEPOINT mesh_record")
        try:
            if record.deleted:
                if target is not None:
                    # A bound value has no affinity, so SQLite compares it under the key
                    # column's affinity: "42" matches an INTEGER 42, 42 matches a TEXT '42'.
                    await run(
                        conn,
                        f"DELETE FROM {quote(table)} WHERE {quote(target.key)} = ?",
                        (record.key,),
                    )
            else:
                if target is None:
                    await run(conn, _create_table_sql(table, self._config.key, values))
                    created = True
                    target = await self._target(conn)
                    assert target is not None
                await self._upsert(conn, target, values)
            await run(conn, _STORE_VERSION, (table, record.key, record.version, int(record.deleted)))
            await run(conn, "RELEASE mesh_record")
        except sqlite3.Error as exc:
            if not is_record_error(exc):
                raise  # the whole batch rolls back
            await run(conn, "ROLLBACK TO mesh_record")
            await run(conn, "RELEASE mesh_record")
            return RejectedRecord(f"{table} key {record.key!r}: {exc}"), None if created else target
        return Applied.APPLIED, target

    async def _upsert(self, conn: aiosqlite.Connection, target: _Target, values: dict[str, Any]) -> None:
        names: list[str] = []
        params: list[Any] = []
        for name, value in values.items():
            column = target.columns.get(name.lower())
            if column is None:
                continue  # the table has no such column: ignore the field
            names.append(column)
            params.append(value)  # stored under the column's affinity: "42" -> INTEGER 42
        cache_key = (target.key, *names)
        sql = self._upserts.get(cache_key)
        if sql is None:
            others = [n for n in names if n != target.key]
            action = (
                "DO UPDATE SET " + ", ".join(f"{quote(n)} = excluded.{quote(n)}" for n in others)
                if others
                else "DO NOTHING"
            )
            sql = (
                f"INSERT INTO {quote(self._config.table)} ({', '.join(map(quote, names))}) "
                f"VALUES ({', '.join('?' * len(names))}) "
                f"ON CONFLICT ({quote(target.key)}) {action}"
            )
            self._upserts[cache_key] = sql
        await run(conn, sql, params)

    async def aclose(self) -> None:
        """Close the connection. Idempotent; the sink may be opened again."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await close_quietly(conn)


def _row_values(row: dict[str, Any], key: str) -> dict[str, Any]:
    """The row's values as SQLite can bind them; rejects a missing/NULL key or odd values."""
    values: dict[str, Any] = {}
    seen: set[str] = set()
    has_key = False
    for name, value in row.items():
        lowered = name.lower()
        if lowered in seen:
            raise RejectedRecord(f"field {name!r} appears twice (names are case-insensitive)")
        seen.add(lowered)
        if lowered == key.lower():
            if value is None:
                raise RejectedRecord(f"key column {key!r} is null")
            has_key = True
        values[name] = _bindable(name, value)
    if not has_key:
        raise RejectedRecord(f"row has no key column {key!r}")
    return values


def _bindable(name: str, value: Any) -> Any:
    if value is None or isinstance(value, str | float | bytes):
        return value
    if isinstance(value, int):  # bool included: stored as 0/1
        if value not in _INT64:
            raise RejectedRecord(f"field {name!r}: integer {value} does not fit in 64 bits")
        return int(value)
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if isinstance(value, dict | list | tuple):
        try:
            return _JSON.encode(value).decode()
        except (TypeError, msgspec.EncodeError) as exc:
            raise RejectedRecord(f"field {name!r}: {exc}") from None
    raise RejectedRecord(f"field {name!r}: cannot store a {type(value).__name__}")


def _sql_type(value: Any) -> str:
    if isinstance(value, int):
        return "INTEGER"
    if isinstance(value, float):
        return "REAL"
    if isinstance(value, str):
        return "TEXT"
    if isinstance(value, bytes):
        return "BLOB"
    return ""


def _create_table_sql(table: str, key: str, values: dict[str, Any]) -> str:
    columns = []
    for name, value in values.items():
        definition = f"{quote(name)} {_sql_type(value)}".rstrip()
        if name.lower() == key.lower():
            definition += " PRIMARY KEY NOT NULL"
        columns.append(definition)
    return f"CREATE TABLE {quote(table)} ({', '.join(columns)})"
