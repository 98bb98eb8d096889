"""The PostgreSQL source: trigger-fed change table with a resumable initial snapshot, or a
compound cursor over growing columns. Public through :mod:`adapters.sql.postgres`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import anyio
import msgspec
import psycopg
from psycopg import sql

from adapters.sql._pg_capture import capture_names, ensure_capture
from adapters.sql._pg_common import (
    Column,
    Text,
    cast_expr,
    close_quietly,
    connect_prepared,
    decode_row,
    encode_key,
    ident,
    is_connection_error,
    key_columns,
    read_table,
    regclass,
    resolve_key,
    row_json,
    to_text,
    translate,
    where_of,
)
from adapters.sql.config import PostgresSourceConfig
from mesh.adapters import Change, ChangeBatch, Source
from mesh.errors import ConfigError, RejectedRecord
from mesh.runs.bulk import row_version
from mesh.runs.bulk import timestamp_us as _timestamp_us

__all__ = ["PostgresSource"]

log = logging.getLogger(__name__)

_MIN_SEQ = -(2**63)


class _Cursor(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """What the opaque cursor string holds (JSON).

    ``snapshot``: rows up to key ``after`` were emitted, all with version ``version``.
    ``changes``: every change whose transaction is visible in the snapshot ``seen`` was
    emitted, and of those visible in ``upto`` (being paged), the ones with ``seq`` up to ``seq``.
    ``cursor``: rows up to (cursor columns..., key columns...) = ``after`` were emitted.
    """

    phase: Literal["snapshot", "changes", "cursor"]
    after: list[Any] | None = None
    version: int | None = None
    seen: str | None = None
    upto: str | None = None
    seq: int | None = None


_CURSOR_ENCODER = msgspec.json.Encoder()
_CURSOR_DECODER = msgspec.json.Decoder(_Cursor)


def _encode(cursor: _Cursor) -> str:
    return _CURSOR_ENCODER.encode(cursor).decode()


class PostgresSource(Source):
    """Reads one PostgreSQL table's changes, at-least-once and resumable from an opaque cursor.

    ``mode = "changes"`` (default): statement triggers record every committed insert, update,
    delete and truncate in a change table (see :mod:`adapters.sql._pg_capture`; installed by
    ``meshctl capture install`` or, with ``install_triggers``, by :meth:`open`). ``version`` is
    the change's sequence number; an update of the key arrives as a delete of the old key, then
    an upsert of the new one. Changes are read in commit order of their transactions: a read
    returns the changes of transactions that committed since the previous read (whatever order
    their sequence numbers were drawn in, so a long transaction that commits late is not
    skipped), and changes of one key always come in version order. :meth:`committed` deletes
    the change rows up to the cursor.

    With ``snapshot`` (default) the first read (cursor ``None``) emits every existing row, in
    key order, ``snapshot_chunk`` rows per batch, then the recorded changes. The cursor records
    the last key emitted, so a crash resumes the snapshot where it stopped. Snapshot rows all
    carry a version below every recorded change (the change sequence's start minus one), so a
    change made while the snapshot runs is applied after the snapshot's copy of its row, never
    overwritten by it, whichever chunk saw it.

    ``mode = "cursor"``: polls rows ordered by (cursor columns..., key columns...) after the
    last emitted tuple, so a page that ends amid equal cursor values neither loses nor repeats
    rows. **Deletes are not seen.** ``version`` is ``version_column`` (default: the first cursor
    column): an integer, or a timestamp as integer microseconds since the epoch. The writers
    must make the cursor grow in commit order, or a transaction that commits late with a
    smaller value is skipped.

    Rows are JSON objects in the mapping of :mod:`adapters.sql._pg_common` (numeric as decimal
    strings, timestamps ISO 8601 in UTC, bytea as hex, ...); ``Change.key`` is the key value as
    text, or the JSON array of the values for a composite key.

    :meth:`read` blocks, polling every ``poll_interval`` seconds, until there is at least one
    change; it is cancellable and never returns an empty batch. A lost connection raises
    :class:`~mesh.errors.SystemUnavailable`; the next :meth:`read` reconnects, and a retry from
    the same cursor returns the same changes with the same versions.
    """

    def __init__(self, config: PostgresSourceConfig) -> None:
        if config.mode == "cursor" and config.cursor_column is None:
            raise ConfigError('cursor_column: required when mode = "cursor"')
        self._config = config
        self._where = where_of(config.dsn, config.schema, config.table)
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._opened = False
        self._cursor: str | None = None
        self._key: list[Column] = []
        self._order: list[Column] = []  # cursor mode: cursor columns, then key columns
        self._version: Column | None = None
        self._columns: list[Column] = []

    def __repr__(self) -> str:
        cfg = self._config
        state = "" if self._conn is not None else " disconnected" if self._opened else " closed"
        return (
            f"<PostgresSource {cfg.schema}.{cfg.table} mode={cfg.mode} "
            f"cursor={self._cursor if self._cursor is not None else '-'}{state}>"
        )

    # -- connection -------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect; check (or, with ``install_triggers``, install) change capture, or the
        cursor columns.

        Raises:
            ConfigError: the table or a configured column does not exist, the key is not the
                primary key or UNIQUE, capture is missing or out of date and may not be
                installed, or the server refuses the database, role or password.
            SystemUnavailable: the server cannot be reached now.
        """
        await self._connection()
        self._opened = True

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is not None and self._conn.closed:
            self._conn = None
        if self._conn is None:
            self._conn = await connect_prepared(self._config, self._where, self._prepare)
        return self._conn

    async def _prepare(self, conn: psycopg.AsyncConnection[Any]) -> None:
        cfg = self._config
        shape = await read_table(conn, cfg.schema, cfg.table)
        if shape is None:
            raise ConfigError(f"table {cfg.schema}.{cfg.table} does not exist", source=self._where)
        self._columns = list(shape.columns.values())
        self._key = resolve_key(shape, key_columns(cfg.key), where=self._where)
        if cfg.mode == "changes":
            await ensure_capture(
                conn, cfg.schema, cfg.table, [c.name for c in self._key],
                install=cfg.install_triggers, where=self._where,
            )  # fmt: skip
            return
        assert cfg.cursor_column is not None
        order = []
        for name in key_columns(cfg.cursor_column):
            column = shape.find(name)
            if column is None:
                raise ConfigError(f"table has no column {name!r} (cursor_column)", source=self._where)
            order.append(column)
        version = shape.find(cfg.version_column) if cfg.version_column else order[0]
        if version is None:
            raise ConfigError(
                f"table has no column {cfg.version_column!r} (version_column)", source=self._where
            )
        self._version = version
        self._order = order + [k for k in self._key if k not in order]

    async def _discard(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if conn is self._conn:
            self._conn = None
        with anyio.CancelScope(shield=True):
            await close_quietly(conn)

    async def _fetch(self, query: sql.Composed | sql.SQL, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """Run one query, reconnecting first if needed; errors translated, a broken or
        interrupted connection dropped (the next call reconnects)."""
        conn = await self._connection()
        try:
            cur = await conn.execute(query, params)
            return await cur.fetchall()
        except psycopg.Error as exc:
            if is_connection_error(exc) or conn.closed:
                await self._discard(conn)
            raise translate(exc, self._where) from None
        except BaseException:
            # Cancelled mid-query: the connection's state is unknown, start afresh next time.
            await self._discard(conn)
            raise

    # -- reading ------------------------------------------------------------------------------

    async def read(self, cursor: str | None, limit: int) -> ChangeBatch:
        """Return up to ``limit`` changes after ``cursor``; block until there is at least one.

        Raises:
            SystemUnavailable: the connection was lost or the server is unavailable; retry
                from the same cursor (the next call reconnects).
            ConfigError: ``cursor`` is not a cursor of this source's mode, the table or change
                table disappeared, or (cursor mode) a version value is neither an integer nor
                a timestamp.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        if not self._opened:
            raise RuntimeError(f"{self!r} is not open")
        state = self._decode(cursor)
        while True:
            before = state
            if state.phase == "snapshot":
                batch, state = await self._read_snapshot(state, limit)
            elif state.phase == "changes":
                batch, state = await self._read_changes(state, limit)
            else:
                batch = await self._read_rows(state, limit)
            if batch is not None:
                self._cursor = batch.cursor
                return batch
            if state == before:  # nothing new: wait (an empty snapshot or window moves on at once)
                await anyio.sleep(self._config.poll_interval)

    def _decode(self, cursor: str | None) -> _Cursor:
        cfg = self._config
        if cursor is None:
            if cfg.mode == "cursor":
                return _Cursor(phase="cursor")
            if cfg.snapshot:
                return _Cursor(phase="snapshot")
            return _Cursor(phase="changes")
        try:
            state = _CURSOR_DECODER.decode(cursor)
        except msgspec.DecodeError:
            state = None
        if state is None or (state.phase == "cursor") != (cfg.mode == "cursor"):
            raise ConfigError(f"{cursor[:200]!r} is not a cursor of a {cfg.mode}-mode PostgreSQL source")
        return state

    def _with_key_field(self, row: dict[str, Any], key: str) -> dict[str, Any]:
        if self._config.key_field is not None:
            row[self._config.key_field] = key
        return row

    def _key_of(self, row: dict[str, Any]) -> str:
        return encode_key([row.get(c.name) for c in self._key])

    def _after(
        self, columns: Sequence[Column], values: list[Any] | None, ref: sql.Composable
    ) -> tuple[sql.Composable, dict[str, Any]]:
        """``(ref.c1, ref.c2) > (v1, v2)`` with the values cast back from their JSON mapping."""
        not_null = sql.SQL(" AND ").join(
            sql.SQL("{}.{} IS NOT NULL").format(ref, ident(c.name)) for c in columns
        )
        if values is None:
            return not_null, {}
        if len(values) != len(columns):
            raise ConfigError("cursor does not match the configured key or cursor columns")
        params: dict[str, Any] = {}
        try:
            for i, (column, value) in enumerate(zip(columns, values, strict=True)):
                params[f"a{i}"] = to_text(value, column)
        except RejectedRecord as exc:
            raise ConfigError(f"cursor does not fit the table: {exc}") from None
        left = sql.SQL(", ").join(sql.SQL("{}.{}").format(ref, ident(c.name)) for c in columns)
        right = sql.SQL(", ").join(cast_expr(sql.Placeholder(f"a{i}"), c) for i, c in enumerate(columns))
        return sql.SQL("{} AND ({}) > ({})").format(not_null, left, right), params

    def _page(
        self, columns: Sequence[Column], after: list[Any] | None, limit: int
    ) -> tuple[sql.Composed, dict[str, Any]]:
        cfg = self._config
        t = sql.Identifier("t")
        where, params = self._after(columns, after, t)
        query = sql.SQL(
            "SELECT {row}::text FROM {table} AS t WHERE {where} ORDER BY {order} LIMIT {limit}"
        ).format(
            row=row_json(t, self._columns),
            table=ident(cfg.schema, cfg.table),
            where=where,
            order=sql.SQL(", ").join(sql.SQL("t.{}").format(ident(c.name)) for c in columns),
            limit=sql.Literal(limit),
        )
        return query, params

    async def _read_snapshot(self, state: _Cursor, limit: int) -> tuple[ChangeBatch | None, _Cursor]:
        cfg = self._config
        version = state.version
        if version is None:
            version = await self._snapshot_version()
        chunk = min(limit, cfg.snapshot_chunk)
        query, params = self._page(self._key, state.after, chunk)
        rows = await self._fetch(query, params)
        changes = []
        for (text,) in rows:
            row = decode_row(text)
            key = self._key_of(row)
            changes.append(Change(key=key, version=version, row=self._with_key_field(row, key)))
        if len(rows) < chunk:
            # The snapshot is complete; every change recorded since the install follows.
            done = _Cursor(phase="changes")
            if not changes:
                return None, done
            return ChangeBatch(changes=changes, cursor=_encode(done)), done
        last = changes[-1].row
        after = [last.get(c.name) for c in self._key]
        nxt = _Cursor(phase="snapshot", after=after, version=version)
        return ChangeBatch(changes=changes, cursor=_encode(nxt)), nxt

    async def _snapshot_version(self) -> int:
        """One below the first version the change sequence hands out."""
        cfg = self._config
        seq = regclass(cfg.schema, capture_names(cfg.table).sequence)
        rows = await self._fetch(
            sql.SQL("SELECT seqstart FROM pg_sequence WHERE seqrelid = to_regclass({})").format(Text(seq)), {}
        )
        if not rows:
            raise ConfigError(
                f"change capture sequence {seq} is missing (was capture removed?)", source=self._where
            )
        return int(rows[0][0]) - 1

    async def _read_changes(self, state: _Cursor, limit: int) -> tuple[ChangeBatch | None, _Cursor]:
        cfg = self._config
        changes_table = ident(cfg.schema, capture_names(cfg.table).changes)
        seen_filter = sql.SQL("")
        if state.seen is not None:
            seen_filter = sql.SQL(
                "AND c.xid >= pg_snapshot_xmin(%(seen)s::pg_snapshot) "
                "AND NOT pg_visible_in_snapshot(c.xid, %(seen)s::pg_snapshot) "
            )
        query = sql.SQL(
            'SELECT c.seq, c.op, c."key"::text, c."row"::text, (extract(epoch FROM c."at") * 1000)::bigint, '
            "s.snap::text "
            "FROM (SELECT coalesce(%(upto)s::pg_snapshot, pg_current_snapshot()) AS snap) AS s "
            "JOIN {changes} AS c "
            "ON c.xid < pg_snapshot_xmax(s.snap) AND pg_visible_in_snapshot(c.xid, s.snap) "
            "WHERE c.seq > %(seq)s {seen_filter}"
            "ORDER BY c.seq LIMIT %(limit)s"
        ).format(changes=changes_table, seen_filter=seen_filter)
        params = {
            "upto": state.upto,
            "seen": state.seen,
            "seq": state.seq if state.seq is not None and state.upto is not None else _MIN_SEQ,
            "limit": limit,
        }
        rows = await self._fetch(query, params)
        if not rows:
            if state.upto is not None:  # that window is exhausted: it becomes what was seen
                return None, _Cursor(phase="changes", seen=state.upto)
            return None, state
        upto = rows[0][5]
        changes = []
        for seq, op, key_text, row_text, at_ms, _ in rows:
            row = decode_row(row_text)
            key = encode_key(msgspec.json.decode(key_text))
            changes.append(
                Change(
                    key=key,
                    version=int(seq),
                    deleted=op == "D",
                    row=self._with_key_field(row, key),
                    occurred_at=int(at_ms),
                )
            )
        if len(rows) == limit:
            nxt = _Cursor(phase="changes", seen=state.seen, upto=upto, seq=int(rows[-1][0]))
        else:
            nxt = _Cursor(phase="changes", seen=upto)
        return ChangeBatch(changes=changes, cursor=_encode(nxt)), nxt

    async def _read_rows(self, state: _Cursor, limit: int) -> ChangeBatch | None:
        query, params = self._page(self._order, state.after, limit)
        rows = await self._fetch(query, params)
        if not rows:
            return None
        assert self._version is not None
        changes = []
        first = self._order[0]
        for (text,) in rows:
            row = decode_row(text)
            key = self._key_of(row)
            position = row.get(first.name)
            stamp = _timestamp_us(position) if isinstance(position, str) else None
            changes.append(
                Change(
                    key=key,
                    version=_version(row.get(self._version.name), self._version.name),
                    row=self._with_key_field(row, key),
                    occurred_at=0 if stamp is None else stamp // 1000,
                )
            )
        last = changes[-1].row
        after = [last.get(c.name) for c in self._order]
        return ChangeBatch(changes=changes, cursor=_encode(_Cursor(phase="cursor", after=after)))

    async def committed(self, cursor: str) -> None:
        """Changes mode: delete the change rows the cursor has passed.

        Raises:
            SystemUnavailable: the server is unavailable; pruning happens with a later cursor.
        """
        if self._config.mode != "changes":
            return
        state = self._decode(cursor)
        if state.phase != "changes":
            return
        changes = ident(self._config.schema, capture_names(self._config.table).changes)
        if state.seen is not None:
            await self._fetch(
                sql.SQL(
                    "WITH d AS (DELETE FROM {} WHERE xid < pg_snapshot_xmax(%(s)s::pg_snapshot) "
                    "AND pg_visible_in_snapshot(xid, %(s)s::pg_snapshot) RETURNING 1) SELECT count(*) FROM d"
                ).format(changes),
                {"s": state.seen},
            )
        if state.upto is not None and state.seq is not None:
            await self._fetch(
                sql.SQL(
                    "WITH d AS (DELETE FROM {} WHERE seq <= %(seq)s "
                    "AND xid < pg_snapshot_xmax(%(s)s::pg_snapshot) "
                    "AND pg_visible_in_snapshot(xid, %(s)s::pg_snapshot) RETURNING 1) SELECT count(*) FROM d"
                ).format(changes),
                {"s": state.upto, "seq": state.seq},
            )

    async def aclose(self) -> None:
        """Close the connection. Idempotent; the source may be opened again."""
        self._opened = False
        conn, self._conn = self._conn, None
        if conn is not None:
            with anyio.CancelScope(shield=True):
                await close_quietly(conn)


def _version(value: Any, column: str) -> int:
    """A cursor-mode version (:func:`~mesh.runs.bulk.row_version`). Raises ConfigError."""
    return row_version(value, column, what="column")
