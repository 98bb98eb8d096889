"""The SQL adapters' ``reconcile`` capability (:class:`mesh.plugins.ReconcileAccess`).

PostgreSQL: the same keyset pagination. As a sink, the field hashes are computed **in SQL**
(``sha256`` over the value's text, normalised as :func:`mesh.reconcile._hashing.text_of` does)
for integer, boolean, numeric and text columns; other columns are read as their JSON mapping and
hashed in the agent. As a source, rows are read as the capture triggers record them
(:func:`~adapters.sql._pg_common.row_json` under the capture's session settings), and a repair
inserts ``U`` changes into the change table (the next sequence number: a new version).

SQLite: rows are read by keyset pagination (``WHERE key > ? ORDER BY key LIMIT chunk``), one
chunk per query, so a table of any size streams through a bounded buffer. A repair re-emits
source rows by writing a ``U`` change for each into the change table, the very row the capture
triggers would write (same JSON encoding), so it takes the next sequence number: a new version
and envelope id that the relay, the stream, the inbox and the sinks' version guards all let
through. Extras are deleted from the target table in one transaction per request.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Sequence
from typing import Any

from adapters.sql._sqlite_capture import _NOW_MS, _json_row, change_table
from adapters.sql._sqlite_common import (
    close_quietly,
    connect,
    immediate_transaction,
    quote,
    table_columns,
    translate,
)
from adapters.sql.config import SqliteSinkConfig, SqliteSourceConfig
from mesh.errors import ConfigError

__all__ = ["POSTGRES", "SQLITE"]

_BUSY = 10.0
_IN_BATCH = 500  # bound parameters per statement (SQLite's default limit is 999 or more)


class SqliteReconcile:
    """:class:`mesh.plugins.ReconcileAccess` for ``adapter = "sqlite"``."""

    def __repr__(self) -> str:
        return "<SqliteReconcile>"

    async def scan(self, cfg: Any, role: str, chunk: int) -> AsyncIterator[list[dict[str, Any]]]:
        assert isinstance(cfg, SqliteSourceConfig | SqliteSinkConfig)
        conn = await connect(cfg.path, create=False, busy_timeout=_BUSY)
        try:
            table, key = quote(cfg.table), quote(cfg.key)
            last: Any = None
            while True:
                where = "" if last is None else f"WHERE {key} > ?"
                params = () if last is None else (last,)
                try:
                    cur = await conn.execute(
                        f"SELECT * FROM {table} {where} ORDER BY {key} LIMIT {int(chunk)}", params
                    )
                    names = [d[0] for d in cur.description]
                    rows = [dict(zip(names, r, strict=True)) for r in await cur.fetchall()]
                    await cur.close()
                except sqlite3.Error as exc:
                    raise translate(exc, cfg.path) from exc
                if not rows:
                    return
                last = rows[-1][cfg.key]
                if role == "source":  # as the capture triggers encode them: blobs as hex
                    rows = [{k: v.hex() if isinstance(v, bytes) else v for k, v in r.items()} for r in rows]
                yield rows
                if len(rows) < chunk:
                    return
        finally:
            await close_quietly(conn)

    async def restamp(self, cfg: Any, keys: Sequence[Any]) -> int:
        assert isinstance(cfg, SqliteSourceConfig)
        if cfg.mode != "changes":
            raise ConfigError(
                f'repair needs mode = "changes" (table {cfg.table} is read in {cfg.mode} mode)',
                source=cfg.path,
            )
        conn = await connect(cfg.path, create=False, busy_timeout=_BUSY)
        done = 0
        try:
            columns = [c.name for c in await table_columns(conn, cfg.table)]
            table, key = quote(cfg.table), quote(cfg.key)
            insert = (
                f"INSERT INTO {quote(change_table(cfg.table))} (op, pk, row, at) "
                f"SELECT 'U', t.{key}, {_json_row('t', columns)}, {_NOW_MS} FROM {table} AS t "
            )
            try:
                async with immediate_transaction(conn):
                    for start in range(0, len(keys), _IN_BATCH):
                        part = list(keys[start : start + _IN_BATCH])
                        marks = ", ".join("?" * len(part))
                        cur = await conn.execute(f"{insert} WHERE t.{key} IN ({marks})", part)
                        done += max(cur.rowcount, 0)
                        await cur.close()
            except sqlite3.Error as exc:
                raise translate(exc, cfg.path) from exc
        finally:
            await close_quietly(conn)
        return done

    async def delete(self, cfg: Any, keys: Sequence[str]) -> int:
        assert isinstance(cfg, SqliteSinkConfig)
        conn = await connect(cfg.path, create=False, busy_timeout=cfg.busy_timeout)
        done = 0
        try:
            table, key = quote(cfg.table), quote(cfg.key)
            try:
                async with immediate_transaction(conn):
                    for start in range(0, len(keys), _IN_BATCH):
                        part = list(keys[start : start + _IN_BATCH])
                        marks = ", ".join("?" * len(part))
                        # CAST: the key as text on both sides, whatever the column's type
                        cur = await conn.execute(
                            f"DELETE FROM {table} WHERE CAST({key} AS TEXT) IN ({marks})", part
                        )
                        done += max(cur.rowcount, 0)
                        await cur.close()
            except sqlite3.Error as exc:
                raise translate(exc, cfg.path) from exc
        finally:
            await close_quietly(conn)
        return done


SQLITE = SqliteReconcile()


# --- PostgreSQL ---------------------------------------------------------------------------------

_SQL_HASHED = frozenset({"int2", "int4", "int8", "bool", "numeric", "text", "varchar", "bpchar"})


def _pg_text(col: Any, base: str) -> Any:
    """SQL for the comparable text of a column (see ``text_of``)."""
    from psycopg import sql

    if base == "numeric":
        return sql.SQL("trim_scale({})::text").format(col)
    if base in ("text", "varchar", "bpchar"):
        return sql.SQL(
            "CASE WHEN {c} ~ '^-?[0-9]+\\.[0-9]+$' THEN trim_scale({c}::numeric)::text ELSE {c}::text END"
        ).format(c=col)
    return sql.SQL("{}::text").format(col)


class PostgresReconcile:
    """:class:`mesh.plugins.ReconcileAccess` for ``adapter = "postgres"`` (single key column)."""

    def __repr__(self) -> str:
        return "<PostgresReconcile>"

    @staticmethod
    async def _connect(cfg: Any) -> Any:
        from adapters.sql._pg_common import connect, where_of

        return await connect(
            cfg.dsn, cfg.password_env, where=where_of(cfg.dsn, cfg.schema, cfg.table),
            password_file=cfg.password_file, connect_timeout=cfg.connect_timeout,
            statement_timeout=max(cfg.statement_timeout, 300.0),
        )  # fmt: skip

    @staticmethod
    def _key(cfg: Any) -> str:
        if not isinstance(cfg.key, str):
            raise ConfigError(f"reconcile needs a single key column (table {cfg.table} has {cfg.key})")
        return str(cfg.key)

    async def _pages(
        self, cfg: Any, select: Any, key_col: Any, chunk: int
    ) -> AsyncIterator[list[tuple[Any, ...]]]:
        """Pages of ``select`` rows (the key value last) in key order, ``chunk`` at a time."""
        import psycopg
        from psycopg import sql

        from adapters.sql._pg_common import close_quietly, ident, translate, where_of

        where = where_of(cfg.dsn, cfg.schema, cfg.table)
        conn = await self._connect(cfg)
        try:
            last: Any = None
            while True:
                cond = sql.SQL("") if last is None else sql.SQL(" WHERE {} > %s").format(key_col)
                query = sql.SQL("SELECT {sel}, {k} FROM {t} AS t{cond} ORDER BY {k} LIMIT {n}").format(
                    sel=select,
                    k=key_col,
                    t=ident(cfg.schema, cfg.table),
                    cond=cond,
                    n=sql.Literal(int(chunk)),
                )
                try:
                    cur = await conn.execute(query, () if last is None else (last,))
                    rows = await cur.fetchall()
                except psycopg.Error as exc:
                    raise translate(exc, where) from None
                if not rows:
                    return
                last = rows[-1][-1]
                yield rows
                if len(rows) < chunk:
                    return
        finally:
            await close_quietly(conn)

    async def _shape(self, cfg: Any) -> Any:
        from adapters.sql._pg_common import close_quietly, read_table, where_of

        conn = await self._connect(cfg)
        try:
            shape = await read_table(conn, cfg.schema, cfg.table)
        finally:
            await close_quietly(conn)
        if shape is None:
            raise ConfigError("table does not exist", source=where_of(cfg.dsn, cfg.schema, cfg.table))
        return shape

    async def scan(self, cfg: Any, role: str, chunk: int) -> AsyncIterator[list[dict[str, Any]]]:
        from psycopg import sql

        from adapters.sql._pg_common import decode_row, ident, row_json

        shape = await self._shape(cfg)
        columns = list(shape.columns.values())
        select = sql.SQL("({})::text").format(row_json(sql.Identifier("t"), columns))
        key_col = sql.SQL("t.{}").format(ident(self._key(cfg)))
        async for rows in self._pages(cfg, select, key_col, chunk):
            yield [decode_row(r[0]) for r in rows]

    async def scan_hashes(
        self, cfg: Any, key_field: str, fields: Sequence[str], chunk: int
    ) -> AsyncIterator[list[tuple[str, dict[str, str]]]]:
        """Sink side: ``(key text, {field: hash})`` per row, hashed in SQL where the type allows."""
        from psycopg import sql

        from adapters.sql._pg_common import decode_row, ident, value_json
        from mesh.reconcile._hashing import NULL_HASH, field_hash, text_of

        shape = await self._shape(cfg)
        t = sql.Identifier("t")
        parts: list[sql.Composable] = []
        in_agent: list[str] = []
        for f in fields:
            column = shape.find(f)
            if column is None:
                parts.append(sql.Literal(NULL_HASH))
            elif column.base in _SQL_HASHED:
                col = sql.SQL("t.{}").format(ident(column.name))
                parts.append(sql.SQL(
                    "coalesce(left(encode(sha256(convert_to('v' || {}, 'UTF8')), 'hex'), 16), {})"
                ).format(_pg_text(col, column.base), sql.Literal(NULL_HASH)))  # fmt: skip
            else:
                parts.append(sql.SQL("({})::text").format(value_json(t, column)))
                in_agent.append(f)
        key = shape.find(key_field)
        if key is None:
            raise ConfigError(f"table {cfg.table} has no key column {key_field!r}")
        parts.append(_pg_text(sql.SQL("t.{}").format(ident(key.name)), key.base))
        key_col = sql.SQL("t.{}").format(ident(self._key(cfg)))
        async for rows in self._pages(cfg, sql.SQL(", ").join(parts), key_col, chunk):
            out = []
            for r in rows:
                hashes = dict(zip(fields, r[: len(fields)], strict=True))
                for f in in_agent:
                    raw = hashes[f]
                    hashes[f] = field_hash(None if raw is None else decode_row(f'{{"v": {raw}}}')["v"])
                out.append((str(text_of(r[len(fields)])), hashes))
            yield out

    async def restamp(self, cfg: Any, keys: Sequence[Any]) -> int:
        import psycopg
        from psycopg import sql

        from adapters.sql._pg_capture import capture_names
        from adapters.sql._pg_common import close_quietly, ident, key_json, row_json, translate, where_of

        if cfg.mode != "changes":
            raise ConfigError(f'repair needs mode = "changes" (table {cfg.table} is read in {cfg.mode} mode)')
        shape = await self._shape(cfg)
        columns = list(shape.columns.values())
        key = shape.find(self._key(cfg))
        t = sql.Identifier("t")
        insert = sql.SQL(
            'INSERT INTO {changes} (op, "key", "row") SELECT \'U\', {k}, {row} FROM {table} AS t '
            "WHERE t.{kc} = ANY(%s)"
        ).format(
            changes=ident(cfg.schema, capture_names(cfg.table).changes), k=key_json(t, [key]),
            row=row_json(t, columns), table=ident(cfg.schema, cfg.table), kc=ident(key.name),
        )  # fmt: skip
        conn = await self._connect(cfg)
        try:
            async with conn.transaction():
                cur = await conn.execute(insert, (list(keys),))
                return max(cur.rowcount, 0)
        except psycopg.Error as exc:
            raise translate(exc, where_of(cfg.dsn, cfg.schema, cfg.table)) from None
        finally:
            await close_quietly(conn)

    async def delete(self, cfg: Any, keys: Sequence[str]) -> int:
        import psycopg
        from psycopg import sql

        from adapters.sql._pg_common import close_quietly, ident, translate, where_of

        key = self._key(cfg)
        query = sql.SQL("DELETE FROM {} WHERE {}::text = ANY(%s)").format(
            ident(cfg.schema, cfg.table), ident(key)
        )
        conn = await self._connect(cfg)
        try:
            async with conn.transaction():
                cur = await conn.execute(query, (list(keys),))
                return max(cur.rowcount, 0)
        except psycopg.Error as exc:
            raise translate(exc, where_of(cfg.dsn, cfg.schema, cfg.table)) from None
        finally:
            await close_quietly(conn)


POSTGRES = PostgresReconcile()
