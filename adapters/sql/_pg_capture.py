"""Trigger-based change capture for one PostgreSQL table.

Four statement-level triggers (``AFTER INSERT / UPDATE / DELETE`` with transition tables, so a
bulk statement costs one ``INSERT ... SELECT``, and ``BEFORE TRUNCATE``) feed the change table
``<schema>._mesh_changes_<table>``::

    seq  bigint PRIMARY KEY   from the sequence _mesh_changes_<table>_seq; the change's version
    xid  xid8                 the writing transaction (pg_current_xact_id()): read order
    op   text                 'I' insert, 'U' update, 'D' delete
    key  jsonb                the JSON array of the key values
    row  jsonb                the whole row after the change (before it, for a delete)
    at   timestamptz          when the change happened (clock_timestamp())

Guarantees: the triggers run inside the writer's transaction, so a change is recorded if and
only if it commits. An update that changes the key is recorded as a delete of the old key and an
upsert of the new one; a TRUNCATE as a delete of every row. Values are recorded in the JSON
mapping of :mod:`adapters.sql._pg_common` whatever the writer's session settings (the trigger
function pins TimeZone, DateStyle, IntervalStyle and extra_float_digits). The function is
``SECURITY DEFINER`` with a fixed ``search_path``: writers need no privileges on the change table.

The sequence starts at the current time in microseconds, so versions keep growing after a
remove and a new install. Installation is idempotent and atomic (one transaction, serialised by
an advisory lock); when the table's columns or the key no longer match the installed function,
the function and triggers are replaced and the change table, with the changes not yet read, is kept.
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

import psycopg
from psycopg import sql

from adapters.sql._pg_common import (
    Column,
    Table,
    Text,
    execute,
    ident,
    key_json,
    read_table,
    regclass,
    resolve_key,
    row_json,
)
from mesh.errors import ConfigError

__all__ = [
    "CaptureStatus",
    "capture_names",
    "capture_status",
    "ensure_capture",
    "remove_capture",
]

_MAX_IDENT = 63
_LOCK_CLASS = 0x6D657368  # 'mesh': our own advisory-lock key space (two-int form)
_TRIGGERS = (
    ("insert", "AFTER INSERT", "REFERENCING NEW TABLE AS _mesh_new FOR EACH STATEMENT"),
    (
        "update",
        "AFTER UPDATE",
        "REFERENCING OLD TABLE AS _mesh_old NEW TABLE AS _mesh_new FOR EACH STATEMENT",
    ),
    ("delete", "AFTER DELETE", "REFERENCING OLD TABLE AS _mesh_old FOR EACH STATEMENT"),
    ("truncate", "BEFORE TRUNCATE", "FOR EACH STATEMENT"),
)
_COMMENT_PREFIX = "connector-mesh change capture "


class CaptureNames(NamedTuple):
    changes: str
    sequence: str
    function: str
    triggers: tuple[str, ...]


class CaptureStatus(NamedTuple):
    """What ``meshctl capture status`` shows for one table."""

    installed: bool
    """Change table, function and all triggers exist (and are enabled)."""
    up_to_date: bool
    """The installed function matches the table's current columns and the configured key."""
    pending: int
    """Changes recorded and not yet pruned by a source."""
    oldest_at: float | None
    """Seconds since the epoch of the oldest pending change."""
    change_table: str


def _bounded(name: str, table: str, prefix: str, suffix: str = "") -> str:
    if len((prefix + table + suffix).encode()) <= _MAX_IDENT:
        return name
    digest = hashlib.sha1(table.encode()).hexdigest()[:8]
    keep = table.encode()[: _MAX_IDENT - len(prefix) - len(suffix) - 9].decode(errors="ignore")
    return f"{prefix}{keep}_{digest}{suffix}"


def capture_names(table: str) -> CaptureNames:
    """The names of the capture objects of ``table`` (all at most 63 bytes)."""
    return CaptureNames(
        changes=_bounded(f"_mesh_changes_{table}", table, "_mesh_changes_"),
        sequence=_bounded(f"_mesh_changes_{table}_seq", table, "_mesh_changes_", "_seq"),
        function=_bounded(f"_mesh_capture_{table}", table, "_mesh_capture_"),
        triggers=tuple(f"_mesh_capture_{op}" for op, _, _ in _TRIGGERS),
    )


def _function_sql(schema: str, table: str, columns: list[Column], key: list[Column]) -> sql.Composed:
    names = capture_names(table)
    changes = ident(schema, names.changes)
    new, old = sql.Identifier("n"), sql.Identifier("o")

    def record(
        op: str, ref: sql.Identifier, source: sql.Composable, where: sql.Composable = sql.SQL("")
    ) -> sql.Composed:
        return sql.SQL(
            'INSERT INTO {changes} (op, "key", "row") '
            "SELECT {op}, {key}, {row} FROM {source} AS {ref}{where};"
        ).format(
            changes=changes, op=Text(op), key=key_json(ref, key), row=row_json(ref, columns),
            source=source, ref=ref, where=where,
        )  # fmt: skip

    # Keys compare as their JSON (jsonb = is in pg_catalog and hashable): the function's fixed
    # search_path would not find the equality operator of a key type from an extension.
    key_gone = sql.SQL(" WHERE NOT EXISTS (SELECT FROM _mesh_new AS n WHERE {} = {})").format(
        key_json(new, key), key_json(old, key)
    )
    body = sql.SQL(
        "\nBEGIN\n"
        "  IF TG_OP = 'INSERT' THEN\n    {ins}\n"
        "  ELSIF TG_OP = 'UPDATE' THEN\n    {upd_del}\n    {upd}\n"
        "  ELSIF TG_OP = 'DELETE' THEN\n    {dele}\n"
        "  ELSE\n    {trunc}\n"
        "  END IF;\n  RETURN NULL;\nEND\n"
    ).format(
        ins=record("I", new, sql.SQL("_mesh_new")),
        upd_del=record("D", old, sql.SQL("_mesh_old"), key_gone),
        upd=record("U", new, sql.SQL("_mesh_new")),
        dele=record("D", old, sql.SQL("_mesh_old")),
        trunc=record("D", old, ident(schema, table)),
    )
    return sql.SQL(
        "CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER "
        "SET search_path = pg_catalog, pg_temp SET \"TimeZone\" = 'UTC' SET \"DateStyle\" = 'ISO, YMD' "
        "SET \"IntervalStyle\" = 'iso_8601' SET extra_float_digits = 1 AS $mesh_capture${body}$mesh_capture$"
    ).format(fn=ident(schema, names.function), body=body)


def _trigger_sql(schema: str, table: str) -> list[sql.Composed]:
    names = capture_names(table)
    return [
        sql.SQL("CREATE TRIGGER {name} {when} ON {table} {how} EXECUTE FUNCTION {fn}()").format(
            name=ident(name),
            when=sql.SQL(when),
            table=ident(schema, table),
            how=sql.SQL(how),
            fn=ident(schema, names.function),
        )
        for name, (_, when, how) in zip(names.triggers, _TRIGGERS, strict=True)
    ]


def _fingerprint(function: str, triggers: list[str]) -> str:
    digest = hashlib.sha256("\n".join([function, *triggers]).encode()).hexdigest()[:24]
    return _COMMENT_PREFIX + digest


class _Installed(NamedTuple):
    has_changes: bool
    comment: str | None
    triggers: frozenset[str]


_INSTALLED_SQL = """
SELECT to_regclass(%(changes)s) IS NOT NULL,
       (SELECT obj_description(p.oid, 'pg_proc') FROM pg_proc p
          JOIN pg_namespace ns ON ns.oid = p.pronamespace
         WHERE ns.nspname = %(schema)s AND p.proname = %(function)s AND p.pronargs = 0),
       (SELECT coalesce(array_agg(t.tgname::text), '{}') FROM pg_trigger t
         WHERE t.tgrelid = to_regclass(%(table)s) AND t.tgname::text = ANY (%(triggers)s)
           AND t.tgenabled <> 'D')
"""


async def _installed(conn: psycopg.AsyncConnection[Any], schema: str, table: str) -> _Installed:
    names = capture_names(table)
    cur = await execute(
        conn,
        _INSTALLED_SQL,
        {
            "changes": regclass(schema, names.changes),
            "schema": schema,
            "function": names.function,
            "table": regclass(schema, table),
            "triggers": list(names.triggers),
        },
    )
    row = await cur.fetchone()
    assert row is not None
    return _Installed(bool(row[0]), row[1], frozenset(row[2]))


def _wanted(
    conn: psycopg.AsyncConnection[Any], schema: str, shape: Table, table: str, key: list[str], where: str
) -> tuple[str, list[str], str]:
    key_cols = resolve_key(shape, key, where=where)
    function = _function_sql(schema, table, list(shape.columns.values()), key_cols).as_string(conn)
    triggers = [t.as_string(conn) for t in _trigger_sql(schema, table)]
    return function, triggers, _fingerprint(function, triggers)


async def _shape(conn: psycopg.AsyncConnection[Any], schema: str, table: str, where: str) -> Table:
    shape = await read_table(conn, schema, table)
    if shape is None:
        raise ConfigError(f"table {schema}.{table} does not exist", source=where)
    return shape


async def ensure_capture(
    conn: psycopg.AsyncConnection[Any], schema: str, table: str, key: list[str], *, install: bool, where: str
) -> bool:
    """Make sure up-to-date change capture exists for ``schema.table``; True if (re)installed now.

    ``conn`` must be in autocommit mode (the install is its own transaction).

    Raises:
        ConfigError: the table or a key column does not exist, the key is not unique, or
            capture is missing or out of date and ``install`` is false.
        psycopg.Error: the database failed (the caller translates it).
    """
    shape = await _shape(conn, schema, table, where)
    _, _, fingerprint = _wanted(conn, schema, shape, table, key, where)
    names = capture_names(table)
    state = await _installed(conn, schema, table)
    if state == _Installed(True, fingerprint, frozenset(names.triggers)):
        return False
    if not install:
        what = "out of date" if state.has_changes else "not installed"
        raise ConfigError(
            f"change capture for {schema}.{table} is {what} "
            "(run `meshctl capture install --config <agent.toml>` or set install_triggers = true)",
            source=where,
        )
    async with conn.transaction():
        await execute(
            conn, "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_LOCK_CLASS, regclass(schema, table))
        )
        # Look again under the lock: another installer may have finished meanwhile.
        shape = await _shape(conn, schema, table, where)
        function, triggers, fingerprint = _wanted(conn, schema, shape, table, key, where)
        state = await _installed(conn, schema, table)
        if state == _Installed(True, fingerprint, frozenset(names.triggers)):
            return False
        if not state.has_changes:
            await _create_change_table(conn, schema, table)
        await execute(conn, function.encode())
        await execute(
            conn,
            sql.SQL("COMMENT ON FUNCTION {}() IS {}").format(
                ident(schema, names.function), Text(fingerprint)
            ),
        )
        for name, create in zip(names.triggers, triggers, strict=True):
            await execute(
                conn, sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(ident(name), ident(schema, table))
            )
            await execute(conn, create.encode())
    return True


async def _create_change_table(conn: psycopg.AsyncConnection[Any], schema: str, table: str) -> None:
    names = capture_names(table)
    seq, changes = ident(schema, names.sequence), ident(schema, names.changes)
    cur = await execute(conn, "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint")
    row = await cur.fetchone()
    assert row is not None
    # Versions start at the current time in microseconds: a new install after a removal keeps
    # them growing, so sinks' version guards still accept what it captures.
    await execute(conn, sql.SQL("DROP SEQUENCE IF EXISTS {}").format(seq))
    await execute(conn, sql.SQL("CREATE SEQUENCE {} START WITH {}").format(seq, Text(int(row[0]))))
    await execute(
        conn,
        sql.SQL(
            "CREATE TABLE {changes} ("
            "seq bigint PRIMARY KEY DEFAULT nextval({seq_text}::regclass), "
            "xid xid8 NOT NULL DEFAULT pg_current_xact_id(), "
            "op text NOT NULL CHECK (op IN ('I', 'U', 'D')), "
            '"key" jsonb NOT NULL, "row" jsonb NOT NULL, '
            '"at" timestamptz NOT NULL DEFAULT clock_timestamp())'
        ).format(changes=changes, seq_text=Text(regclass(schema, names.sequence))),
    )
    await execute(conn, sql.SQL("CREATE INDEX ON {} (xid)").format(changes))
    await execute(conn, sql.SQL("ALTER SEQUENCE {} OWNED BY {}.seq").format(seq, changes))


async def remove_capture(
    conn: psycopg.AsyncConnection[Any], schema: str, table: str, *, keep_changes: bool
) -> bool:
    """Drop the triggers and function and, unless ``keep_changes``, the change table and its
    sequence. Idempotent; True when anything was removed."""
    names = capture_names(table)
    removed = False
    async with conn.transaction():
        await execute(
            conn, "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_LOCK_CLASS, regclass(schema, table))
        )
        state = await _installed(conn, schema, table)
        cur = await execute(conn, "SELECT to_regclass(%s) IS NOT NULL", (regclass(schema, table),))
        row = await cur.fetchone()
        if row is not None and row[0]:
            for name in names.triggers:
                if name in state.triggers:
                    removed = True
                await execute(
                    conn, sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(ident(name), ident(schema, table))
                )
        if state.comment is not None:
            removed = True
        await execute(conn, sql.SQL("DROP FUNCTION IF EXISTS {}()").format(ident(schema, names.function)))
        if not keep_changes:
            removed = removed or state.has_changes
            await execute(conn, sql.SQL("DROP TABLE IF EXISTS {}").format(ident(schema, names.changes)))
            await execute(conn, sql.SQL("DROP SEQUENCE IF EXISTS {}").format(ident(schema, names.sequence)))
    return removed


async def capture_status(
    conn: psycopg.AsyncConnection[Any], schema: str, table: str, key: list[str], *, where: str
) -> CaptureStatus:
    """Whether capture is installed and current, and how many changes wait in the change table.

    Raises:
        ConfigError: the table or a key column does not exist, or the key is not unique.
    """
    names = capture_names(table)
    shape = await _shape(conn, schema, table, where)
    _, _, fingerprint = _wanted(conn, schema, shape, table, key, where)
    state = await _installed(conn, schema, table)
    installed = (
        state.has_changes and state.comment is not None and state.triggers == frozenset(names.triggers)
    )
    pending, oldest = 0, None
    if state.has_changes:
        cur = await execute(
            conn,
            sql.SQL('SELECT count(*), extract(epoch FROM min("at"))::float8 FROM {}').format(
                ident(schema, names.changes)
            ),
        )
        row = await cur.fetchone()
        assert row is not None
        pending, oldest = int(row[0]), row[1]
    return CaptureStatus(
        installed=installed,
        up_to_date=installed and state.comment == fingerprint,
        pending=pending,
        oldest_at=oldest,
        change_table=f"{schema}.{names.changes}",
    )
