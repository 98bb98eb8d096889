"""The full extract of a SQLite or PostgreSQL table for scheduled bulk runs (the ``bulk``
capability of the SQL adapters; see :mod:`mesh.runs.bulk`).

Rows come in key order, ``limit`` at a time after the last key returned, each page one short
read (no long transaction), so a 100,000-row table never sits in memory and a run resumes from
the last key its checkpoint holds. Rows changed while a run extracts are read as they are when
their page is read; their real version (``version_field``) lets the sink's guard order them
against real-time changes.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from adapters.sql import _pg_common as pg
from adapters.sql import _sqlite_common as lite
from adapters.sql.config import PostgresSourceConfig, SqliteSourceConfig
from mesh.errors import ConfigError
from mesh.runs.bulk import BulkExtract, BulkRow

__all__ = ["PostgresExtract", "SqliteExtract", "postgres_extract", "sqlite_extract"]


class SqliteExtract(BulkExtract):
    """``SELECT * FROM table WHERE key > ? ORDER BY key LIMIT ?`` pages of a SQLite table."""

    def __init__(self, cfg: SqliteSourceConfig) -> None:
        self.cfg = cfg
        self._conn: Any = None
        self._names: list[str] = []

    def __repr__(self) -> str:
        return f"<SqliteExtract {self.cfg.path}:{self.cfg.table}>"

    async def open(self) -> None:
        cfg = self.cfg
        conn = await lite.connect(cfg.path, create=False, busy_timeout=5.0)
        try:
            columns = await lite.table_columns(conn, cfg.table)
            if not columns:
                raise ConfigError(f"table {cfg.table!r} does not exist", source=cfg.path)
            if lite.find_column(columns, cfg.key) is None:
                raise ConfigError(f"table {cfg.table!r} has no key column {cfg.key!r}", source=cfg.path)
        except sqlite3.Error as exc:
            await lite.close_quietly(conn)
            raise lite.translate(exc, cfg.path) from exc
        except BaseException:
            await lite.close_quietly(conn)
            raise
        self._conn = conn
        self._names = [c.name for c in columns]

    async def chunk(self, after: Any, limit: int) -> list[BulkRow]:
        cfg = self.cfg
        cols = ", ".join(lite.quote(n) for n in self._names)
        sql = f"SELECT {cols} FROM {lite.quote(cfg.table)}"
        params: list[Any] = []
        if after is not None:
            sql += f" WHERE {lite.quote(cfg.key)} > ?"
            params.append(after)
        sql += f" ORDER BY {lite.quote(cfg.key)} LIMIT ?"
        params.append(limit)
        try:
            rows = await lite.fetchall(self._conn, sql, params)
        except sqlite3.Error as exc:
            raise lite.translate(exc, cfg.path) from exc
        out = []
        for values in rows:
            row = dict(zip(self._names, values, strict=True))
            out.append(BulkRow(row[cfg.key], str(row[cfg.key]), row))
        return out

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await lite.close_quietly(conn)


class PostgresExtract(BulkExtract):
    """Keyset pages (``WHERE (key...) > (...) ORDER BY key... LIMIT n``) of a PostgreSQL table,
    rows as the continuous source encodes them (JSON of the row, timestamps as ISO text)."""

    def __init__(self, cfg: PostgresSourceConfig) -> None:
        self.cfg = cfg
        self._where = pg.where_of(cfg.dsn, cfg.schema, cfg.table)
        self._conn: Any = None
        self._columns: list[pg.Column] = []
        self._key: list[pg.Column] = []

    def __repr__(self) -> str:
        return f"<PostgresExtract {self._where}>"

    async def open(self) -> None:
        cfg = self.cfg
        conn = await pg.connect(
            cfg.dsn, cfg.password_env, where=self._where, password_file=cfg.password_file,
            connect_timeout=cfg.connect_timeout, statement_timeout=cfg.statement_timeout,
        )  # fmt: skip
        try:
            shape = await pg.read_table(conn, cfg.schema, cfg.table)
            if shape is None:
                raise ConfigError(f"table {cfg.schema}.{cfg.table} does not exist", source=self._where)
            self._key = pg.resolve_key(shape, pg.key_columns(cfg.key), where=self._where)
            self._columns = list(shape.columns.values())
        except BaseException:
            await pg.close_quietly(conn)
            raise
        self._conn = conn

    async def chunk(self, after: Any, limit: int) -> list[BulkRow]:
        import psycopg
        from psycopg import sql

        t = sql.Identifier("t")
        keys = sql.SQL(", ").join(sql.SQL("t.{}").format(pg.ident(c.name)) for c in self._key)
        params: list[Any] = []
        where: sql.Composable = sql.SQL("true")
        if after is not None:
            where = sql.SQL("({}) > ({})").format(
                keys, sql.SQL(", ").join(sql.Placeholder() for _ in self._key)
            )
            params.extend(after)
        page = "SELECT {row}::text FROM {table} AS t WHERE {where} ORDER BY {keys} LIMIT {limit}"
        query = sql.SQL(page).format(
            row=pg.row_json(t, self._columns), table=pg.ident(self.cfg.schema, self.cfg.table),
            where=where, keys=keys, limit=sql.Literal(limit),
        )  # fmt: skip
        try:
            cur = await self._conn.execute(query, params)
            rows = await cur.fetchall()
        except psycopg.Error as exc:
            raise pg.translate(exc, self._where) from None
        out = []
        for (text,) in rows:
            row = pg.decode_row(text)
            values = [row.get(c.name) for c in self._key]
            key = pg.encode_key(values)  # as the continuous PostgreSQL source spells it
            out.append(BulkRow(values, key, row))
        return out

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await pg.close_quietly(conn)


def sqlite_extract(cfg: SqliteSourceConfig) -> SqliteExtract:
    return SqliteExtract(cfg)


def postgres_extract(cfg: PostgresSourceConfig) -> PostgresExtract:
    return PostgresExtract(cfg)
