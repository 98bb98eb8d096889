"""Plumbing shared by the SQLite source, sink and change capture.

Connecting (without ever creating a database file by accident), translating ``sqlite3`` errors
into the mesh error tree, explicit ``BEGIN IMMEDIATE`` transactions that always end, and schema
inspection through the ``pragma_*`` table-valued functions.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any, NamedTuple

import aiosqlite
import anyio

from mesh.errors import ConfigError, MeshError, SystemUnavailable

# Primary SQLite result codes (extended codes keep these in their low byte).
_SQLITE_ERROR = 1
_UNAVAILABLE_CODES = frozenset(
    {
        5,  # SQLITE_BUSY
        6,  # SQLITE_LOCKED
        7,  # SQLITE_NOMEM
        8,  # SQLITE_READONLY
        9,  # SQLITE_INTERRUPT
        10,  # SQLITE_IOERR
        11,  # SQLITE_CORRUPT
        13,  # SQLITE_FULL
        14,  # SQLITE_CANTOPEN
        15,  # SQLITE_PROTOCOL
        26,  # SQLITE_NOTADB
    }
)
# Codes that describe one statement's data, not the database: the record is refused.
_RECORD_CODES = frozenset({18, 19, 20, 25})  # TOOBIG, CONSTRAINT, MISMATCH, RANGE
CACHE_KIB = -1024
"""``PRAGMA cache_size`` of the adapters' own connections (KiB; SQLite's default is 2,000): each
connection holds its page cache for its lifetime, and the adapters read changes in key order and
write in batches, so a smaller cache keeps the agent small without costing speed."""


def quote(name: str) -> str:
    """Quote an SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def literal(text: str) -> str:
    """Quote an SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def _primary_code(exc: BaseException) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def translate(exc: sqlite3.Error, path: str) -> MeshError:
    """Map a ``sqlite3`` error on database ``path`` to the mesh error tree.

    Busy, locked, I/O, full, unopenable or damaged databases are :class:`SystemUnavailable`
    (retry later); a plain SQL error means the schema no longer matches the configuration
    (:class:`ConfigError`); anything else is treated as unavailable, so the caller backs off
    instead of dead-lettering data over an unknown condition.
    """
    code = _primary_code(exc)
    if code == _SQLITE_ERROR:
        return ConfigError(f"SQL error: {exc}", source=path)
    return SystemUnavailable(f"SQLite database {path} unavailable: {exc}")


def is_record_error(exc: sqlite3.Error) -> bool:
    """Whether ``exc`` refuses one statement's values (constraint, type mismatch, too big)."""
    return isinstance(exc, sqlite3.IntegrityError) or _primary_code(exc) in _RECORD_CODES


_CONSTRAINT_FOREIGNKEY = 787  # SQLITE_CONSTRAINT_FOREIGNKEY


def is_foreign_key_error(exc: sqlite3.Error) -> bool:
    """Whether ``exc`` is a foreign key refusal (a parent missing, a child still there)."""
    return getattr(exc, "sqlite_errorcode", None) == _CONSTRAINT_FOREIGNKEY


async def connect(path: str, *, create: bool, busy_timeout: float) -> aiosqlite.Connection:
    """Open ``path`` in autocommit mode (transactions are explicit) with a busy timeout.

    Raises:
        ConfigError: the file does not exist and ``create`` is false.
        SystemUnavailable: the file cannot be opened now.
    """
    file = anyio.Path(path)
    if not create and not await file.exists():
        raise ConfigError("SQLite database file does not exist", source=path)
    uri = (await file.absolute()).as_uri() + ("?mode=rwc" if create else "?mode=rw")
    try:
        conn = await aiosqlite.connect(uri, uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise translate(exc, path) from exc
    try:
        await run(conn, f"PRAGMA busy_timeout = {max(0, round(busy_timeout * 1000))}")
        await run(conn, f"PRAGMA cache_size = {CACHE_KIB}")
    except BaseException:
        await close_quietly(conn)
        raise
    return conn


async def close_quietly(conn: aiosqlite.Connection) -> None:
    """Close ``conn`` even while the caller is being cancelled."""
    with anyio.CancelScope(shield=True):
        with suppress(sqlite3.Error):
            await conn.close()


async def run(conn: aiosqlite.Connection, sql: str, params: Sequence[Any] = ()) -> None:
    """Execute one statement, discarding any rows."""
    await conn.execute_fetchall(sql, params)


async def fetchall(conn: aiosqlite.Connection, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Execute one query and return its rows as tuples."""
    return [tuple(row) for row in await conn.execute_fetchall(sql, params)]


@asynccontextmanager
async def immediate_transaction(conn: aiosqlite.Connection) -> AsyncIterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``; any exception (or cancellation) rolls back.

    The rollback is queued behind whatever the connection's thread still runs, so it also ends a
    ``BEGIN`` whose awaiting was cancelled.
    """
    try:
        await run(conn, "BEGIN IMMEDIATE")
        yield
        await run(conn, "COMMIT")
    except BaseException:
        with anyio.CancelScope(shield=True):
            with suppress(sqlite3.Error):  # "no transaction is active"
                await run(conn, "ROLLBACK")
        raise


class Column(NamedTuple):
    """One column as ``PRAGMA table_info`` describes it."""

    name: str
    decl_type: str
    notnull: bool
    pk: int


async def table_columns(conn: aiosqlite.Connection, table: str) -> list[Column]:
    """Columns of ``table`` in declaration order; empty when the table does not exist."""
    rows = await fetchall(
        conn, 'SELECT name, type, "notnull", pk FROM pragma_table_info(?) ORDER BY cid', (table,)
    )
    return [Column(str(n), str(t or ""), bool(nn), int(pk)) for n, t, nn, pk in rows]


def find_column(columns: Sequence[Column], name: str) -> Column | None:
    """The column called ``name`` (SQLite compares identifiers case-insensitively)."""
    lowered = name.lower()
    return next((c for c in columns if c.name.lower() == lowered), None)


async def is_unique_key(conn: aiosqlite.Connection, table: str, column: Column) -> bool:
    """Whether ``column`` alone is the primary key of ``table`` or has a full unique index."""
    if column.pk and sum(1 for c in await table_columns(conn, table) if c.pk) == 1:
        return True
    indexes = await fetchall(
        conn, 'SELECT name FROM pragma_index_list(?) WHERE "unique" AND NOT partial', (table,)
    )
    for (index,) in indexes:
        cols = await fetchall(conn, "SELECT name FROM pragma_index_info(?) ORDER BY seqno", (index,))
        if len(cols) == 1 and str(cols[0][0]).lower() == column.name.lower():
            return True
    return False
