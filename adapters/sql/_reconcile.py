"""The SQL adapters' ``reconcile`` capability (:class:`mesh.plugins.ReconcileAccess`).

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

__all__ = ["SQLITE"]

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
