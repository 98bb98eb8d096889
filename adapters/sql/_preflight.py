"""Preflight of the SQL adapters (the ``preflight`` capability, :class:`mesh.plugins.Preflight`):
reach the database a source or sink config names and list what would stop the flow.

Checked: the file or server is reachable with the configured credentials; the table exists;
the key columns exist and (sinks) form the primary key or a UNIQUE key; cursor and version
columns exist; a ``changes`` source without ``install_triggers`` has its capture installed and
current; a sink's table has every column the flow's mapping writes; on PostgreSQL the role holds
the privileges the flow needs. Nothing is written. Problems carry the config field they concern
and name the database without its password.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

import anyio
import psycopg

from adapters.sql._pg_common import (
    close_quietly as pg_close,
)
from adapters.sql._pg_common import (
    connect as pg_connect,
)
from adapters.sql._pg_common import (
    key_columns,
    read_table,
    translate,
    where_of,
)
from adapters.sql._sqlite_common import close_quietly, connect, find_column, is_unique_key, table_columns
from adapters.sql.config import PostgresSinkConfig, PostgresSourceConfig, SqliteSinkConfig, SqliteSourceConfig
from mesh.errors import ConfigError, ConfigProblem, MeshError

__all__ = ["sql_preflight"]

_INSTALL_HINT = "run `meshctl capture install -c CONFIG`, or set install_triggers = true"


def _capture_problem(installed: bool, up_to_date: bool, table: str, where: str) -> list[ConfigProblem]:
    if not installed:
        why = "is not installed"
        return [ConfigProblem("mode", f'change capture {why} on "{table}" ({where}): {_INSTALL_HINT}')]
    if not up_to_date:
        why = "is out of date (the table changed)"
        return [ConfigProblem("mode", f'change capture on "{table}" ({where}) {why}: {_INSTALL_HINT}')]
    return []


def _no_column(name: str, table: str, where: str, written: bool = False) -> str:
    by = " (written by the mapping)" if written else ""
    return f'column "{name}"{by} not found in table "{table}" ({where})'


async def sql_preflight(cfg: Any, *, columns: Sequence[str] | None = None) -> list[ConfigProblem]:
    """The problems of one SQL source or sink config (see the module docstring)."""
    if isinstance(cfg, SqliteSourceConfig | SqliteSinkConfig):
        return await _sqlite(cfg, columns)
    if isinstance(cfg, PostgresSourceConfig | PostgresSinkConfig):
        return await _postgres(cfg, columns)
    raise TypeError(f"not a SQL adapter config: {type(cfg).__name__}")


# -- SQLite --------------------------------------------------------------------------------------


async def _sqlite(
    cfg: SqliteSourceConfig | SqliteSinkConfig, columns: Sequence[str] | None
) -> list[ConfigProblem]:
    sink = isinstance(cfg, SqliteSinkConfig)
    creates = isinstance(cfg, SqliteSinkConfig) and cfg.create_table
    where = f"sqlite {cfg.path}"
    if not await anyio.Path(cfg.path).exists():
        if creates:
            return []
        return [ConfigProblem("path", f"SQLite database file {cfg.path} does not exist")]
    try:
        conn = await connect(cfg.path, create=False, busy_timeout=5.0)
    except MeshError as exc:
        return [ConfigProblem("path", _one_line(exc))]
    problems: list[ConfigProblem] = []
    try:
        found = await table_columns(conn, cfg.table)
        if not found:
            if not creates:
                problems.append(ConfigProblem("table", f'table "{cfg.table}" not found in {where}'))
            return problems
        key = find_column(found, cfg.key)
        if key is None:
            problems.append(ConfigProblem("key", _no_column(cfg.key, cfg.table, where)))
        elif sink and not await is_unique_key(conn, cfg.table, key):
            problems.append(ConfigProblem(
                "key", f'column "{key.name}" is neither the primary key of "{cfg.table}" nor UNIQUE ({where})'
            ))  # fmt: skip
        if isinstance(cfg, SqliteSourceConfig):
            problems += _sqlite_cursor(cfg, found, where)
            if key is not None and cfg.mode == "changes" and not cfg.install_triggers:
                problems += await _sqlite_capture(cfg, where)
        else:
            problems += [
                ConfigProblem("table", _no_column(name, cfg.table, where, written=True))
                for name in columns or () if find_column(found, name) is None
            ]  # fmt: skip
    except sqlite3.Error as exc:
        problems.append(ConfigProblem("path", f"cannot read {where}: {exc}"))
    finally:
        await close_quietly(conn)
    return problems


def _sqlite_cursor(cfg: SqliteSourceConfig, found: Sequence[Any], where: str) -> list[ConfigProblem]:
    if cfg.mode != "cursor":
        return []
    out = []
    for field in ("cursor_column", "version_column"):
        name = getattr(cfg, field)
        if name is not None and find_column(found, name) is None:
            out.append(ConfigProblem(field, _no_column(name, cfg.table, where)))
    return out


async def _sqlite_capture(cfg: SqliteSourceConfig, where: str) -> list[ConfigProblem]:
    from adapters.sql._sqlite_capture import capture_status

    state = await capture_status(cfg.path, cfg.table, key=cfg.key)
    return _capture_problem(state.installed, state.up_to_date, cfg.table, where)


# -- PostgreSQL ----------------------------------------------------------------------------------


def _credential_field(cfg: PostgresSourceConfig | PostgresSinkConfig, message: str) -> str:
    if "password" in message:
        if cfg.password_env is not None:
            return "password_env"
        if cfg.password_file is not None:
            return "password_file"
    return "dsn"


async def _postgres(
    cfg: PostgresSourceConfig | PostgresSinkConfig, columns: Sequence[str] | None
) -> list[ConfigProblem]:
    sink = isinstance(cfg, PostgresSinkConfig)
    where = where_of(cfg.dsn, cfg.schema, cfg.table)
    server = where.rsplit(" ", 1)[0]
    try:
        conn = await pg_connect(
            cfg.dsn, cfg.password_env, where=server, password_file=cfg.password_file,
            connect_timeout=cfg.connect_timeout, statement_timeout=cfg.statement_timeout,
        )  # fmt: skip
    except ConfigError as exc:
        message = _one_line(exc)
        return [ConfigProblem(_credential_field(cfg, message), message)]
    except MeshError as exc:
        return [ConfigProblem("dsn", f"cannot reach {server}: {_one_line(exc)}")]
    try:
        return await _postgres_checks(conn, cfg, columns, sink=sink, server=server)
    except psycopg.Error as exc:
        return [ConfigProblem("", _one_line(translate(exc, where)))]
    finally:
        await pg_close(conn)


async def _postgres_checks(
    conn: psycopg.AsyncConnection[Any],
    cfg: PostgresSourceConfig | PostgresSinkConfig,
    columns: Sequence[str] | None,
    *,
    sink: bool,
    server: str,
) -> list[ConfigProblem]:
    qualified = f"{cfg.schema}.{cfg.table}"
    shape = await read_table(conn, cfg.schema, cfg.table)
    if shape is None:
        if sink and isinstance(cfg, PostgresSinkConfig) and cfg.create_table:
            return await _privileges(conn, cfg, server, ["CREATE"], on_schema=True)
        return [ConfigProblem("table", f'table "{qualified}" not found in {server}')]
    problems: list[ConfigProblem] = []
    key = key_columns(cfg.key)
    missing = [name for name in key if shape.find(name) is None]
    for name in missing:
        problems.append(ConfigProblem("key", _no_column(name, qualified, server)))
    if not missing and sink:
        names = frozenset(c.name for c in (shape.find(n) for n in key) if c is not None)
        if names not in shape.unique_keys:
            why = f'is neither the primary key of "{qualified}" nor a UNIQUE key'
            problems.append(ConfigProblem("key", f"({', '.join(key)}) {why} ({server})"))
    if isinstance(cfg, PostgresSourceConfig):
        if cfg.mode == "cursor":
            for field in ("cursor_column", "version_column"):
                value = getattr(cfg, field)
                for name in key_columns(value) if value is not None else []:
                    if shape.find(name) is None:
                        problems.append(ConfigProblem(field, _no_column(name, qualified, server)))
        problems += await _privileges(conn, cfg, server, ["SELECT"])
        if not missing and cfg.mode == "changes":
            check = _may_install if cfg.install_triggers else _pg_capture
            problems += await check(conn, cfg, server)
    else:
        problems += [
            ConfigProblem("table", _no_column(name, qualified, server, written=True))
            for name in columns or () if shape.find(name) is None
        ]  # fmt: skip
        problems += await _privileges(conn, cfg, server, ["SELECT", "INSERT", "UPDATE", "DELETE"])
    return problems


async def _privileges(
    conn: psycopg.AsyncConnection[Any],
    cfg: PostgresSourceConfig | PostgresSinkConfig,
    server: str,
    wanted: Sequence[str],
    *,
    on_schema: bool = False,
) -> list[ConfigProblem]:
    from psycopg import sql

    from adapters.sql._pg_common import regclass

    lacking = []
    for privilege in wanted:
        if on_schema:
            query = sql.SQL("SELECT has_schema_privilege(%(obj)s, %(priv)s)")
            obj = cfg.schema
        else:
            query = sql.SQL("SELECT has_table_privilege(%(obj)s, %(priv)s)")
            obj = regclass(cfg.schema, cfg.table)
        cur = await conn.execute(query, {"obj": obj, "priv": privilege})
        row = await cur.fetchone()
        if row is None or not row[0]:
            lacking.append(privilege)
    if not lacking:
        return []
    cur = await conn.execute("SELECT current_user")
    row = await cur.fetchone()
    role = row[0] if row else "?"
    what = f'schema "{cfg.schema}"' if on_schema else f'table "{cfg.schema}.{cfg.table}"'
    field = "schema" if on_schema else "table"
    return [ConfigProblem(field, f"role {role} lacks {', '.join(lacking)} on {what} ({server})")]


_OWNS = (
    "SELECT pg_has_role(current_user, c.relowner, 'USAGE'), current_user "
    "FROM pg_class c WHERE c.oid = %(rel)s::regclass"
)


async def _may_install(
    conn: psycopg.AsyncConnection[Any], cfg: PostgresSourceConfig, server: str
) -> list[ConfigProblem]:
    """``install_triggers = true`` and the capture is not installed and current: the role must own
    the table (PostgreSQL lets only the owner create triggers) and may create the change table."""
    from adapters.sql._pg_capture import capture_status
    from adapters.sql._pg_common import regclass

    try:
        state = await capture_status(conn, cfg.schema, cfg.table, key_columns(cfg.key), where=server)
    except ConfigError as exc:
        return [ConfigProblem("key", _one_line(exc))]
    if state.installed and state.up_to_date:
        return []  # the agent finds nothing to do at start
    cur = await conn.execute(_OWNS, {"rel": regclass(cfg.schema, cfg.table)})
    row = await cur.fetchone()
    problems = []
    if row is not None and not row[0]:
        problems.append(ConfigProblem(
            "install_triggers",
            f'role {row[1]} does not own "{cfg.schema}.{cfg.table}" ({server}) and cannot create its '
            "capture triggers: install them as the owner (`meshctl capture install`) and set "
            "install_triggers = false",
        ))  # fmt: skip
    return problems + await _privileges(conn, cfg, server, ["CREATE"], on_schema=True)


async def _pg_capture(
    conn: psycopg.AsyncConnection[Any], cfg: PostgresSourceConfig, server: str
) -> list[ConfigProblem]:
    from adapters.sql._pg_capture import capture_status

    qualified = f"{cfg.schema}.{cfg.table}"
    try:
        state = await capture_status(conn, cfg.schema, cfg.table, key_columns(cfg.key), where=server)
    except ConfigError as exc:
        return [ConfigProblem("key", _one_line(exc))]
    return _capture_problem(state.installed, state.up_to_date, qualified, server)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, ConfigError):
        return "; ".join(exc.lines())
    return " ".join(str(exc).split())
