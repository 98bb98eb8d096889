"""Trigger-based change capture for one SQLite table.

Three ``AFTER`` triggers feed the change table ``_mesh_changes_<table>``::

    seq INTEGER PRIMARY KEY AUTOINCREMENT   capture order; never reused, even after pruning
    op  TEXT     'I' insert, 'U' update, 'D' delete
    pk  TEXT     the key column's value
    row TEXT     json_object(...) of ALL columns of NEW (OLD for a delete)
    at  INTEGER  milliseconds since the epoch when the change happened

Guarantees: the triggers run inside the writer's own transaction, so a change is recorded if and
only if it commits. An update that changes the key is recorded as a delete of the old key
followed by an update of the new key. BLOB values are captured as upper-case hex text (JSON has
no bytes); REAL values with 17 significant digits, so every double round-trips exactly.
Installation is idempotent and atomic (one ``BEGIN IMMEDIATE`` transaction); when the
table's columns (or the key) no longer match the installed triggers, the triggers are
re-created and the change table, with any changes not yet read, is kept.

The first install also records every existing row as an insert (the initial snapshot), and
starts versions at the current time in microseconds, so versions keep growing even after the
capture is removed and installed again.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import aiosqlite

from adapters.sql._sqlite_common import (
    close_quietly,
    connect,
    fetchall,
    find_column,
    immediate_transaction,
    literal,
    quote,
    run,
    table_columns,
    translate,
)
from mesh.errors import ConfigError

# SQLite 3.40 allows 127 function arguments: json_object takes the first 60 columns and
# nested json_insert calls add the rest, 60 at a time.
_PAIRS_PER_CALL = 60
_NOW_MS = "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)"
_OPS = ("insert", "update", "delete")


def change_table(table: str) -> str:
    """Name of the change table that captures ``table``."""
    return f"_mesh_changes_{table}"


def _trigger_name(table: str, op: str) -> str:
    return f"_mesh_capture_{table}_{op}"


def _value(ref: str, column: str) -> str:
    col = f"{ref}.{quote(column)}"
    # json_object() prints REAL with 15 significant digits, which loses data (0.1 + 0.2 would
    # arrive as 0.3); 17 digits round-trip every double. JSON has no infinity: send it as text.
    real = (
        f"CASE WHEN abs({col}) <= 1.7976931348623157e308 THEN json(printf('%!.17g', {col})) "
        f"WHEN {col} > 0 THEN 'Infinity' ELSE '-Infinity' END"
    )
    return f"CASE typeof({col}) WHEN 'blob' THEN hex({col}) WHEN 'real' THEN {real} ELSE {col} END"


def _json_row(ref: str, columns: Sequence[str]) -> str:
    first, rest = columns[:_PAIRS_PER_CALL], columns[_PAIRS_PER_CALL:]
    expr = "json_object(" + ", ".join(f"{literal(c)}, {_value(ref, c)}" for c in first) + ")"
    for start in range(0, len(rest), _PAIRS_PER_CALL):
        chunk = rest[start : start + _PAIRS_PER_CALL]
        pairs = ", ".join(f"{literal(_json_path(c))}, {_value(ref, c)}" for c in chunk)
        expr = f"json_insert({expr}, {pairs})"
    return expr


def _json_path(column: str) -> str:
    if '"' in column:
        raise ConfigError(f"column {column!r}: a double quote in a name cannot be captured")
    return f'$."{column}"'


def _capture_sql(table: str, key: str, columns: Sequence[str]) -> dict[str, str]:
    """The ``CREATE TRIGGER`` statements, by trigger name, exactly as sqlite_master stores them."""
    target, changes = quote(table), quote(change_table(table))
    insert = f"INSERT INTO {changes} (op, pk, row, at)"

    def values(op: str, ref: str) -> str:
        return f"'{op}', {ref}.{quote(key)}, {_json_row(ref, columns)}, {_NOW_MS}"

    bodies = {
        "insert": f"{insert} VALUES ({values('I', 'NEW')});",
        "update": (
            f"{insert} SELECT {values('D', 'OLD')} WHERE OLD.{quote(key)} IS NOT NEW.{quote(key)}; "
            f"{insert} VALUES ({values('U', 'NEW')});"
        ),
        "delete": f"{insert} VALUES ({values('D', 'OLD')});",
    }
    return {
        _trigger_name(table, op): (
            f"CREATE TRIGGER {quote(_trigger_name(table, op))} AFTER {op.upper()} ON {target} "
            f"FOR EACH ROW BEGIN {body} END"
        )
        for op, body in bodies.items()
    }


def _change_table_sql(table: str) -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS {quote(change_table(table))} ("
        "seq INTEGER PRIMARY KEY AUTOINCREMENT, "
        "op TEXT NOT NULL CHECK (op IN ('I', 'U', 'D')), "
        "pk TEXT, row TEXT NOT NULL, at INTEGER NOT NULL)"
    )


async def _installed(conn: aiosqlite.Connection, table: str) -> tuple[dict[str, str], bool]:
    names = [_trigger_name(table, op) for op in _OPS] + [change_table(table)]
    rows = await fetchall(
        conn,
        "SELECT type, name, sql FROM sqlite_master WHERE name IN (?, ?, ?, ?)",
        names,
    )
    triggers = {str(name): str(sql) for kind, name, sql in rows if kind == "trigger"}
    has_table = any(kind == "table" for kind, _, _ in rows)
    return triggers, has_table


async def _wanted(conn: aiosqlite.Connection, path: str, table: str, key: str) -> dict[str, str]:
    columns = await table_columns(conn, table)
    if not columns:
        raise ConfigError(f"table {table!r} does not exist", source=path)
    key_column = find_column(columns, key)
    if key_column is None:
        raise ConfigError(f"table {table!r} has no column {key!r}", source=path)
    return _capture_sql(table, key_column.name, [c.name for c in columns])


async def ensure_capture(
    conn: aiosqlite.Connection, path: str, table: str, key: str, *, install: bool
) -> bool:
    """Make sure up-to-date change capture exists for ``table``; True if (re)installed now.

    Raises:
        ConfigError: the table or key column does not exist, or capture is missing or out of
            date and ``install`` is false.
    """
    wanted = await _wanted(conn, path, table, key)
    if await _installed(conn, table) == (wanted, True):
        return False
    if not install:
        raise ConfigError(
            f"change capture for table {table!r} is missing or out of date "
            "(set install_triggers = true or run install_change_capture)",
            source=path,
        )
    async with immediate_transaction(conn):
        # Look again under the write lock: another agent may have installed it meanwhile.
        wanted = await _wanted(conn, path, table, key)
        triggers, has_table = await _installed(conn, table)
        if (triggers, has_table) == (wanted, True):
            return False
        await run(conn, _change_table_sql(table))
        for name, sql in wanted.items():
            if triggers.get(name) != sql:
                await run(conn, f"DROP TRIGGER IF EXISTS {quote(name)}")
                await run(conn, sql)
        if not has_table:
            await _start_capture(conn, table, key)
    return True


async def _start_capture(conn: aiosqlite.Connection, table: str, key: str) -> None:
    """Seed a new change table: versions start above any earlier install's, and every row that
    already exists is recorded as an insert (the initial snapshot), in the same transaction as
    the triggers, so no change falls between snapshot and capture and none is captured twice.
    """
    # Versions are seq values. Starting at the current time in microseconds keeps them growing
    # across a remove + re-install (AUTOINCREMENT alone would restart at 1 and every later
    # change would look older than what the targets' version guards hold).
    await run(
        conn,
        "INSERT INTO sqlite_sequence (name, seq) VALUES (?, CAST((julianday('now') - 2440587.5)"
        " * 86400000000.0 AS INTEGER))",
        [change_table(table)],
    )
    columns = [c.name for c in await table_columns(conn, table)]
    key_column = find_column(await table_columns(conn, table), key)
    assert key_column is not None
    ref = quote(table)
    await run(
        conn,
        f"INSERT INTO {quote(change_table(table))} (op, pk, row, at) "
        f"SELECT 'I', {ref}.{quote(key_column.name)}, {_json_row(ref, columns)}, {_NOW_MS} "
        f"FROM {ref} ORDER BY {ref}.{quote(key_column.name)}",
    )


async def _primary_key(conn: aiosqlite.Connection, path: str, table: str) -> str:
    columns = await table_columns(conn, table)
    if not columns:
        raise ConfigError(f"table {table!r} does not exist", source=path)
    pk = [c.name for c in columns if c.pk]
    if len(pk) != 1:
        raise ConfigError(
            f"table {table!r} has no single-column primary key: name the key column", source=path
        )
    return pk[0]


async def install_change_capture(
    path: str | Path, table: str, *, key: str | None = None, busy_timeout: float = 5.0
) -> bool:
    """Install (or bring up to date) trigger-based change capture on ``table`` in ``path``.

    ``key`` defaults to the table's single-column primary key. Idempotent; returns True when
    triggers were created or re-created, False when they were already up to date.

    Raises:
        ConfigError: the file, table or key column does not exist.
        SystemUnavailable: the database is locked or cannot be opened now.
    """
    where = str(path)
    conn = await connect(where, create=False, busy_timeout=busy_timeout)
    try:
        if key is None:
            key = await _primary_key(conn, where, table)
        return await ensure_capture(conn, where, table, key, install=True)
    except sqlite3.Error as exc:
        raise translate(exc, where) from exc
    finally:
        await close_quietly(conn)


async def remove_change_capture(
    path: str | Path, table: str, *, keep_changes: bool = False, busy_timeout: float = 5.0
) -> bool:
    """Drop the capture triggers of ``table`` and, unless ``keep_changes``, its change table.

    Idempotent; returns True when anything was removed.

    Raises:
        ConfigError: the file does not exist.
        SystemUnavailable: the database is locked or cannot be opened now.
    """
    where = str(path)
    conn = await connect(where, create=False, busy_timeout=busy_timeout)
    try:
        async with immediate_transaction(conn):
            triggers, has_table = await _installed(conn, table)
            for name in triggers:
                await run(conn, f"DROP TRIGGER IF EXISTS {quote(name)}")
            drop_table = has_table and not keep_changes
            if drop_table:
                await run(conn, f"DROP TABLE IF EXISTS {quote(change_table(table))}")
        return bool(triggers) or drop_table
    except sqlite3.Error as exc:
        raise translate(exc, where) from exc
    finally:
        await close_quietly(conn)


class SqliteCaptureStatus(NamedTuple):
    """What ``meshctl capture status`` shows for one SQLite table."""

    installed: bool
    """The change table and all three triggers exist."""
    up_to_date: bool
    """The triggers match the table's current columns and the key."""
    pending: int
    """Changes recorded and not yet pruned by a source."""
    oldest_at: float | None
    """Seconds since the epoch of the oldest pending change."""
    change_table: str


async def capture_status(
    path: str | Path, table: str, *, key: str | None = None, busy_timeout: float = 5.0
) -> SqliteCaptureStatus:
    """Whether capture is installed on ``table`` and current, and how many changes wait.

    Raises:
        ConfigError: the file, table or key column does not exist.
        SystemUnavailable: the database is locked or cannot be opened now.
    """
    where = str(path)
    conn = await connect(where, create=False, busy_timeout=busy_timeout)
    try:
        if key is None:
            key = await _primary_key(conn, where, table)
        wanted = await _wanted(conn, where, table, key)
        triggers, has_table = await _installed(conn, table)
        installed = has_table and set(triggers) == set(wanted)
        pending, oldest = 0, None
        if has_table:
            rows = await fetchall(conn, f"SELECT count(*), min(at) FROM {quote(change_table(table))}")
            pending = int(rows[0][0])
            oldest = None if rows[0][1] is None else rows[0][1] / 1000
        return SqliteCaptureStatus(
            installed=installed,
            up_to_date=installed and triggers == wanted,
            pending=pending,
            oldest_at=oldest,
            change_table=change_table(table),
        )
    except sqlite3.Error as exc:
        raise translate(exc, where) from exc
    finally:
        await close_quietly(conn)
