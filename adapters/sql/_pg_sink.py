"""The PostgreSQL sink: batched, version-guarded upserts and tombstoned deletes, one transaction
per batch. Public through :mod:`adapters.sql.postgres`."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import anyio
import anyio.lowlevel
import psycopg
from psycopg import sql

from adapters.sql._pg_common import (
    FOREIGN_KEY_VIOLATION,
    Column,
    Table,
    cast_expr,
    close_quietly,
    compare_expr,
    connect,
    decode_key,
    execute,
    ident,
    is_connection_error,
    is_record_error,
    key_columns,
    read_table,
    resolve_key,
    to_text,
    translate,
    where_of,
)
from adapters.sql.config import PostgresSinkConfig
from mesh.adapters import Applied, Sink, SinkRecord
from mesh.errors import ConfigError, IntegrityPending, RejectedRecord

__all__ = ["VERSIONS_TABLE", "PostgresSink"]

log = logging.getLogger(__name__)

VERSIONS_TABLE = "_mesh_versions"
INBOX_TABLE = "_mesh_inbox"
_Handled = tuple[str, str, str, int, str]
_INT64 = range(-(2**63), 2**63)
_LOCK_CLASS = 0x6D657368  # 'mesh': our own advisory-lock key space (two-int form)
# Keys are locked in buckets (a power of two): a batch takes at most this many advisory locks,
# however large, in a fixed order, so concurrent sinks serialise per bucket and never deadlock.
_LOCK_BUCKETS = 32
# SQLSTATEs after which the cached table shape may be stale (a column or the table changed).
_SHAPE_STATES = frozenset({"42P01", "42703", "42804", "0A000"})


class _Retry(Exception):
    """A set-based statement hit a record-level error: redo the batch record by record."""


class _Item(NamedTuple):
    slot: int
    record: SinkRecord
    values: dict[str, str | None]
    """Column name -> value as text (upserts: the row's columns; deletes: the key columns)."""


class PostgresSink(Sink):
    """Applies records to one PostgreSQL table, idempotently, under a per-key version guard.

    The guard lives in ``<schema>._mesh_versions`` (``tbl, key, scope -> version, deleted``)
    in the target database, so it commits atomically with the writes. A record whose version
    is not greater than the stored one for its (key, scope) is
    :attr:`~mesh.adapters.Applied.STALE` and writes nothing. A delete removes the row and keeps a
    tombstone version, so an older upsert arriving later cannot resurrect it. An upsert writes
    exactly the columns present in ``record.row`` (fields the table lacks are ignored; key
    columns missing from the row are taken from ``record.key``); when the row already holds
    those values nothing is written (no row trigger fires) and the outcome is
    :attr:`~mesh.adapters.Applied.UNCHANGED`; a delete of an absent row is UNCHANGED too, and
    so is a record with ``create`` false (its origin does not own the entity's existence) that
    would insert or delete a row: such a record only updates a row that exists. The guard
    advances either way. Values are read back through the JSON mapping of
    :mod:`adapters.sql._pg_common` (decimal strings into numeric, hex into bytea, ISO 8601 into
    timestamps; lists into arrays, objects into json/jsonb).

    :meth:`apply` runs the batch in one transaction, durable when it returns: advisory locks
    on the batch's keys, hashed into 32 buckets (so sink replicas sharing a consumer serialise on
    a key, and a batch of any size takes at most 32 locks), one guard look-up, then one
    set-based statement per kind of record (deletes; upserts with the same columns) and one
    guard update. If the target refuses a value (a data exception or a constraint violation),
    the batch is rolled back and redone record by record, each in its own savepoint: the refused
    record yields :class:`~mesh.errors.RejectedRecord` in its slot, the others apply. Records of
    one key in a batch are applied in order, each seeing the versions of the ones before it.

    A lost connection raises :class:`~mesh.errors.SystemUnavailable` with the transaction
    rolled back (if the connection drops during COMMIT the outcome is unknown; a redelivery is
    then absorbed by the guard); the next :meth:`apply` reconnects. A statement running longer
    than ``statement_timeout`` (a locked row) gives the batch back the same way.

    With ``create_table`` a missing table is created from the first upserted row (the key
    columns as primary key; bigint, double precision, boolean, text, bytea or jsonb from the
    values); otherwise it is a :class:`~mesh.errors.ConfigError` at :meth:`open`.
    """

    def __init__(self, config: PostgresSinkConfig) -> None:
        self._config = config
        self._where = where_of(config.dsn, config.schema, config.table)
        self._key_names = key_columns(config.key)
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._opened = False
        self._shape: Table | None = None
        self._shape_valid = False
        self._recheck_shape = False
        self._key: list[Column] = []
        self._statements: dict[tuple[str, ...], sql.Composed] = {}  # by (create, columns...)
        self._applied = self._unchanged = self._stale = self._rejected = 0

    def __repr__(self) -> str:
        cfg = self._config
        state = "" if self._conn is not None else " disconnected" if self._opened else " closed"
        return (
            f"<PostgresSink {cfg.schema}.{cfg.table} applied={self._applied} unchanged={self._unchanged} "
            f"stale={self._stale} rejected={self._rejected}{state}>"
        )

    # -- connection and shape -------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, check the target table and create the version-guard table if needed.

        Raises:
            ConfigError: the table does not exist and may not be created, a key column is
                missing or the key is neither the primary key nor UNIQUE, or the server refuses
                the database, role or password.
            SystemUnavailable: the server cannot be reached now.
        """
        await self._connection()
        self._opened = True

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is not None and self._conn.closed:
            self._conn = None
        if self._conn is not None:
            return self._conn
        cfg = self._config
        conn = await connect(
            cfg.dsn, cfg.password_env, where=self._where, password_file=cfg.password_file,
            connect_timeout=cfg.connect_timeout, statement_timeout=cfg.statement_timeout,
        )  # fmt: skip
        try:
            await self._ensure_versions_table(conn)
            self._shape_valid = False
            await self._read_shape(conn)
        except psycopg.Error as exc:
            await self._discard(conn)
            raise translate(exc, self._where) from None
        except BaseException:
            await self._discard(conn)
            raise
        self._conn = conn
        return conn

    async def _ensure_versions_table(self, conn: psycopg.AsyncConnection[Any]) -> None:
        schema = self._config.schema
        cur = await execute(
            conn,
            "SELECT to_regclass(%s) IS NOT NULL AND to_regclass(%s) IS NOT NULL",
            [_regclass(schema, VERSIONS_TABLE), _regclass(schema, INBOX_TABLE)],
        )
        row = await cur.fetchone()
        if row is not None and row[0]:
            return
        async with conn.transaction():
            await execute(
                conn, "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", [_LOCK_CLASS, VERSIONS_TABLE]
            )
            await execute(
                conn,
                sql.SQL(
                    'CREATE TABLE IF NOT EXISTS {} (tbl text NOT NULL, "key" text NOT NULL, '
                    "scope text NOT NULL DEFAULT '', version bigint NOT NULL, "
                    "deleted boolean NOT NULL DEFAULT false, updated_at timestamptz NOT NULL DEFAULT now(), "
                    'PRIMARY KEY (tbl, "key", scope))'
                ).format(ident(schema, VERSIONS_TABLE)),
            )
            await execute(
                conn,
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} (id text PRIMARY KEY, flow text NOT NULL, "
                    '"key" text NOT NULL, version bigint NOT NULL, outcome text NOT NULL, '
                    "applied_at bigint NOT NULL)"
                ).format(ident(schema, INBOX_TABLE)),
            )
            await execute(
                conn,
                sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (applied_at)").format(
                    sql.Identifier(f"{INBOX_TABLE}_applied_at"), ident(schema, INBOX_TABLE)
                ),
            )

    async def _read_shape(self, conn: psycopg.AsyncConnection[Any]) -> Table | None:
        """The target's shape (cached until an error says it may have changed); None when the
        table is missing and may be created."""
        if self._shape_valid:
            return self._shape
        cfg = self._config
        shape = await read_table(conn, cfg.schema, cfg.table)
        if shape is None and not cfg.create_table:
            raise ConfigError(
                f"table {cfg.schema}.{cfg.table} does not exist (set create_table = true to create it)",
                source=self._where,
            )
        self._key = [] if shape is None else resolve_key(shape, self._key_names, where=self._where)
        self._shape, self._shape_valid = shape, True
        self._statements.clear()
        return shape

    async def _discard(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if conn is self._conn:
            self._conn = None
        with anyio.CancelScope(shield=True):
            await close_quietly(conn)

    # -- apply ------------------------------------------------------------------------------------

    keeps_inbox = True

    async def apply(self, records: Sequence[SinkRecord]) -> list[Applied | Exception]:
        """Apply ``records`` in order in one transaction; one outcome per record.

        Raises:
            SystemUnavailable: the connection was lost, the server is unavailable or a statement
                timed out; nothing was applied (the next call reconnects).
            ConfigError: the table disappeared (and may not be created) or no longer fits the
                key; nothing was applied.
        """
        if not records:
            return []
        return await self._apply_all(records, None)

    async def apply_recording(
        self, records: Sequence[SinkRecord], flow: str, skipped: Sequence[_Handled]
    ) -> list[Applied | Exception]:
        """:meth:`apply`, and in its transaction the handled ids in ``_mesh_inbox`` (the
        target's schema): ``skipped`` and every record that did not fail.

        Raises:
            SystemUnavailable, ConfigError: as :meth:`apply`; nothing was applied nor recorded.
        """
        if not records and not skipped:
            return []
        return await self._apply_all(records, (flow, skipped))

    async def handled(self, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` :meth:`apply_recording` recorded.

        Raises:
            SystemUnavailable: the server cannot be reached now.
        """
        if not ids:
            return set()
        return {str(r[0]) for r in await self._query(
            sql.SQL("SELECT id FROM {} WHERE id = ANY(%s::text[])").format(
                ident(self._config.schema, INBOX_TABLE)
            ),
            [list(ids)],
        )}  # fmt: skip

    async def forget_handled(self, older_than: float) -> int:
        """Forget handled ids recorded more than ``older_than`` seconds ago; returns how many.

        Raises:
            SystemUnavailable: the server cannot be reached now.
        """
        cutoff = int((time.time() - older_than) * 1000)
        rows = await self._query(
            sql.SQL(
                "WITH d AS (DELETE FROM {} WHERE applied_at < %s RETURNING 1) SELECT count(*) FROM d"
            ).format(ident(self._config.schema, INBOX_TABLE)),
            [cutoff],
        )
        return int(rows[0][0])

    async def _query(self, statement: sql.Composed, params: list[Any]) -> list[tuple[Any, ...]]:
        if not self._opened:
            raise RuntimeError(f"{self!r} is not open")
        conn = await self._connection()
        try:
            async with conn.transaction():
                cur = await execute(conn, statement, params)
                return list(await cur.fetchall())
        except psycopg.Error as exc:
            if is_connection_error(exc) or conn.closed:
                await self._discard(conn)
            raise translate(exc, self._where) from None
        except BaseException:
            if conn.closed or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                await self._discard(conn)
            raise

    async def _apply_all(
        self, records: Sequence[SinkRecord], inbox: tuple[str, Sequence[_Handled]] | None
    ) -> list[Applied | Exception]:
        if not self._opened:
            raise RuntimeError(f"{self!r} is not open")
        conn = await self._connection()
        try:
            try:
                outcomes = await self._apply(conn, records, inbox, careful=False)
            except _Retry:
                outcomes = await self._apply(conn, records, inbox, careful=True)
            except psycopg.Error as exc:
                if exc.sqlstate not in _SHAPE_STATES:
                    raise
                # The table changed under the cached shape (a column added or dropped): once more
                # with the shape read afresh.
                self._shape_valid = False
                try:
                    outcomes = await self._apply(conn, records, inbox, careful=False)
                except _Retry:
                    outcomes = await self._apply(conn, records, inbox, careful=True)
        except psycopg.Error as exc:
            if exc.sqlstate in _SHAPE_STATES:
                self._shape_valid = False
            if is_connection_error(exc) or conn.closed:
                await self._discard(conn)
            raise translate(exc, self._where) from None
        except ConfigError:
            self._shape_valid = False
            raise
        except BaseException:
            # Cancelled mid-batch: drop the connection, which rolls the transaction back.
            if conn.closed or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                await self._discard(conn)
            raise
        self._applied += sum(1 for o in outcomes if o is Applied.APPLIED)
        self._unchanged += sum(1 for o in outcomes if o is Applied.UNCHANGED)
        self._stale += sum(1 for o in outcomes if o is Applied.STALE)
        self._rejected += sum(1 for o in outcomes if isinstance(o, Exception))
        return outcomes

    async def _apply(
        self,
        conn: psycopg.AsyncConnection[Any],
        records: Sequence[SinkRecord],
        inbox: tuple[str, Sequence[_Handled]] | None,
        *,
        careful: bool,
    ) -> list[Applied | Exception]:
        outcomes: list[Applied | Exception | None] = [None] * len(records)
        try:
            await self._transaction(conn, records, outcomes, careful, inbox)
        finally:
            if self._recheck_shape:
                self._shape_valid = self._recheck_shape = False
        assert all(o is not None for o in outcomes)
        return [o for o in outcomes if o is not None]

    async def _transaction(
        self,
        conn: psycopg.AsyncConnection[Any],
        records: Sequence[SinkRecord],
        outcomes: list[Applied | Exception | None],
        careful: bool,
        inbox: tuple[str, Sequence[_Handled]] | None = None,
    ) -> None:
        cfg = self._config
        async with conn.transaction():
            shape = await self._read_shape(conn)
            keys = sorted({r.key for r in records})
            await execute(
                conn,
                "SELECT count(pg_advisory_xact_lock(%(cls)s, h)) FROM (SELECT DISTINCT "
                "hashtext(%(tbl)s || chr(31) || (hashtext(k) & %(buckets)s)) AS h "
                "FROM unnest(%(keys)s::text[]) AS k ORDER BY 1) AS x",
                {
                    "cls": _LOCK_CLASS,
                    "tbl": f"{cfg.schema}.{cfg.table}",
                    "keys": keys,
                    "buckets": _LOCK_BUCKETS - 1,
                },
            )
            cur = await execute(
                conn,
                sql.SQL(
                    'SELECT "key", scope, version FROM {} '
                    'WHERE tbl = %(tbl)s AND "key" = ANY(%(keys)s::text[])'
                ).format(ident(cfg.schema, VERSIONS_TABLE)),
                {"tbl": cfg.table, "keys": keys},
            )
            versions: dict[tuple[str, str], int] = {(k, s): v for k, s, v in await cur.fetchall()}
            pending = list(enumerate(records))
            while pending:
                # One record per key per round: later records of a key see the earlier ones.
                this_round: list[tuple[int, SinkRecord]] = []
                later: list[tuple[int, SinkRecord]] = []
                seen: set[str] = set()
                for i, r in pending:
                    (later if r.key in seen else this_round).append((i, r))
                    seen.add(r.key)
                shape = await self._round(conn, shape, this_round, versions, outcomes, careful)
                pending = later
            if inbox is not None:  # the handled ids commit with the writes and their guard
                await self._record_handled(conn, records, outcomes, *inbox)
            # Cancelled while the batch ran: roll back rather than commit behind the back of a
            # caller that will not see the outcomes.
            await anyio.lowlevel.checkpoint_if_cancelled()

    async def _record_handled(
        self,
        conn: psycopg.AsyncConnection[Any],
        records: Sequence[SinkRecord],
        outcomes: list[Applied | Exception | None],
        flow: str,
        skipped: Sequence[_Handled],
    ) -> None:
        rows = list(skipped) + [
            (r.id, flow, r.key, r.version, o.value)
            for r, o in zip(records, outcomes, strict=True)
            if isinstance(o, Applied)
        ]
        if not rows:
            return
        await execute(
            conn,
            sql.SQL(
                'INSERT INTO {} (id, flow, "key", version, outcome, applied_at) '
                "SELECT u.i, u.f, u.k, u.v, u.o, %(now)s FROM unnest(%(i)s::text[], %(f)s::text[], "
                "%(k)s::text[], %(v)s::bigint[], %(o)s::text[]) AS u(i, f, k, v, o) "
                "ON CONFLICT (id) DO NOTHING"
            ).format(ident(self._config.schema, INBOX_TABLE)),
            {
                "now": time.time_ns() // 1_000_000,
                "i": [r[0] for r in rows], "f": [r[1] for r in rows], "k": [r[2] for r in rows],
                "v": [r[3] for r in rows], "o": [r[4] for r in rows],
            },
        )  # fmt: skip

    async def _round(
        self,
        conn: psycopg.AsyncConnection[Any],
        shape: Table | None,
        items: list[tuple[int, SinkRecord]],
        versions: dict[tuple[str, str], int],
        outcomes: list[Applied | Exception | None],
        careful: bool,
    ) -> Table | None:
        table = f"{self._config.schema}.{self._config.table}"
        fresh: list[tuple[int, SinkRecord]] = []
        for i, r in items:
            if r.version not in _INT64:
                outcomes[i] = RejectedRecord(f"{table} key {r.key!r}: version {r.version} out of range")
                continue
            stored = versions.get((r.key, r.scope))
            if stored is not None and stored >= r.version:
                outcomes[i] = Applied.STALE
                continue
            fresh.append((i, r))
        if shape is None:
            first = next((r for _, r in fresh if not r.deleted and r.create), None)
            if first is not None:
                shape = await self._create_table(conn, first)
        deletes: list[_Item] = []
        upserts: dict[tuple[bool, tuple[str, ...]], list[_Item]] = {}
        done: list[_Item] = []
        for i, r in fresh:
            if shape is None or (r.deleted and not r.create):
                # No table (and nothing that may create it), or an origin that does not own the
                # entity's existence deleting it: nothing to write, the guard still moves.
                outcomes[i] = Applied.UNCHANGED
                done.append(_Item(i, r, {}))
                continue
            try:
                if r.deleted:
                    deletes.append(_Item(i, r, self._key_values(r)))
                else:
                    values = self._row_values(shape, r)
                    nkey = len(self._key)
                    names = list(values)
                    columns = (*names[:nkey], *sorted(names[nkey:]))
                    upserts.setdefault((r.create, columns), []).append(_Item(i, r, values))
            except RejectedRecord as exc:
                outcomes[i] = RejectedRecord(f"{table} key {r.key!r}: {exc}")
        if deletes:
            keys = tuple(c.name for c in self._key)
            done += await self._run(conn, self._delete_sql(), keys, deletes, outcomes, careful)
        for (create, columns), group in upserts.items():
            assert shape is not None
            statement = self._upsert_sql(shape, columns, create=create)
            done += await self._run(conn, statement, columns, group, outcomes, careful)
        if done:
            await execute(
                conn,
                sql.SQL(
                    'INSERT INTO {} AS g (tbl, "key", scope, version, deleted) '
                    "SELECT %(tbl)s, u.k, u.s, u.v, u.d "
                    "FROM unnest(%(k)s::text[], %(s)s::text[], %(v)s::bigint[], %(d)s::bool[]) "
                    "AS u(k, s, v, d) "
                    'ON CONFLICT (tbl, "key", scope) DO UPDATE SET version = excluded.version, '
                    "deleted = excluded.deleted, updated_at = now()"
                ).format(ident(self._config.schema, VERSIONS_TABLE)),
                {
                    "tbl": self._config.table,
                    "k": [d.record.key for d in done],
                    "s": [d.record.scope for d in done],
                    "v": [d.record.version for d in done],
                    "d": [d.record.deleted for d in done],
                },
            )
            for d in done:
                versions[(d.record.key, d.record.scope)] = d.record.version
        return shape

    async def _run(
        self,
        conn: psycopg.AsyncConnection[Any],
        statement: sql.Composed,
        columns: tuple[str, ...],
        items: list[_Item],
        outcomes: list[Applied | Exception | None],
        careful: bool,
    ) -> list[_Item]:
        """Run a set-based statement over ``items``; set their outcomes; return the ones that
        took effect or were unchanged (their guard advances)."""
        if not careful:
            try:
                written = await self._execute(conn, statement, columns, items)
            except psycopg.Error as exc:
                if is_record_error(exc):
                    raise _Retry from exc
                raise
            for item in items:
                outcomes[item.slot] = Applied.APPLIED if item.slot in written else Applied.UNCHANGED
            return items
        ok = []
        table = f"{self._config.schema}.{self._config.table}"
        for item in items:
            try:
                async with conn.transaction():  # a savepoint
                    written = await self._execute(conn, statement, columns, [item])
            except psycopg.Error as exc:
                if not is_record_error(exc):
                    raise
                message = " ".join(str(exc).split())
                refused = IntegrityPending if exc.sqlstate == FOREIGN_KEY_VIOLATION else RejectedRecord
                outcomes[item.slot] = refused(f"{table} key {item.record.key!r}: {message}")
                continue
            outcomes[item.slot] = Applied.APPLIED if written else Applied.UNCHANGED
            ok.append(item)
        return ok

    async def _execute(
        self,
        conn: psycopg.AsyncConnection[Any],
        statement: sql.Composed,
        columns: tuple[str, ...],
        items: list[_Item],
    ) -> set[int]:
        """Execute over ``items``; the indexes of the records that wrote a row."""
        params: dict[str, Any] = {"n": [item.slot for item in items]}
        for j, name in enumerate(columns):
            params[f"c{j}"] = [item.values[name] for item in items]
        cur = await execute(conn, statement, params)
        return {int(n) for (n,) in await cur.fetchall()}

    def _key_values(self, record: SinkRecord) -> dict[str, str | None]:
        values = decode_key(record.key, len(self._key))
        return {c.name: to_text(v, c) for c, v in zip(self._key, values, strict=True)}

    def _row_values(self, shape: Table, record: SinkRecord) -> dict[str, str | None]:
        """The row's values for the table's columns, as text, key columns first."""
        values: dict[str, str | None] = {}
        for name, value in record.row.items():
            column = shape.find(name)
            if column is None:
                continue  # the table has no such column: ignore the field
            if column.name in values:
                raise RejectedRecord(f"fields {name!r} and another both name column {column.name!r}")
            values[column.name] = to_text(value, column)
        keys: dict[str, str | None] = {}
        from_key: list[Any] | None = None
        for i, column in enumerate(self._key):
            if column.name in values:
                keys[column.name] = values.pop(column.name)
            else:
                if from_key is None:
                    from_key = decode_key(record.key, len(self._key))
                keys[column.name] = to_text(from_key[i], column)
            if keys[column.name] is None:
                raise RejectedRecord(f"key column {column.name!r} is null")
        return {**keys, **values}

    def _delete_sql(self) -> sql.Composed:
        cached = self._statements.get(("\0delete",))
        if cached is not None:
            return cached
        cfg = self._config
        v = sql.Identifier("v")
        casts = sql.SQL(", ").join(
            sql.SQL("{} AS {}").format(
                cast_expr(sql.SQL("v.{}").format(sql.Identifier(f"c{j}")), c), sql.Identifier(f"c{j}")
            )
            for j, c in enumerate(self._key)
        )
        arrays = sql.SQL(", ").join(
            sql.SQL("%(c{})s::text[]").format(sql.SQL(str(j))) for j in range(len(self._key))
        )
        names = sql.SQL(", ").join(sql.Identifier(f"c{j}") for j in range(len(self._key)))
        match = sql.SQL(" AND ").join(
            sql.SQL("t.{} = d.{}").format(ident(c.name), sql.Identifier(f"c{j}"))
            for j, c in enumerate(self._key)
        )
        statement = sql.SQL(
            "WITH d AS (SELECT v.n, {casts} FROM unnest(%(n)s::int[], {arrays}) AS {v}(n, {names})) "
            "DELETE FROM {table} AS t USING d WHERE {match} RETURNING d.n"
        ).format(
            casts=casts, arrays=arrays, v=v, names=names, table=ident(cfg.schema, cfg.table), match=match
        )
        self._statements[("\0delete",)] = statement
        return statement

    def _upsert_sql(self, shape: Table, columns: tuple[str, ...], *, create: bool) -> sql.Composed:
        """Update the rows that exist and differ; insert (``create``) the ones that do not.
        Returns the slots of the records that wrote a row."""
        cache_key = (str(create), *columns)
        cached = self._statements.get(cache_key)
        if cached is not None:
            return cached
        cfg = self._config
        table = ident(cfg.schema, cfg.table)
        cols = [shape.columns[name] for name in columns]
        alias = [sql.Identifier(f"c{j}") for j in range(len(cols))]
        nkey = len(self._key)
        casts = sql.SQL(", ").join(
            sql.SQL("{} AS {}").format(cast_expr(sql.SQL("v.{}").format(a), c), a)
            for a, c in zip(alias, cols, strict=True)
        )
        arrays = sql.SQL(", ").join(
            sql.SQL("%(c{})s::text[]").format(sql.SQL(str(j))) for j in range(len(cols))
        )

        def match(ref: str) -> sql.Composable:
            return sql.SQL(" AND ").join(
                sql.SQL("{}.{} = src.{}").format(sql.Identifier(ref), ident(c.name), a)
                for a, c in zip(alias[:nkey], cols[:nkey], strict=True)
            )

        parts = [
            sql.SQL(
                "WITH src AS (SELECT v.n, {casts} FROM unnest(%(n)s::int[], {arrays}) AS v(n, {names}))"
            ).format(casts=casts, arrays=arrays, names=sql.SQL(", ").join(alias))
        ]
        others = list(zip(alias[nkey:], cols[nkey:], strict=True))
        if others:
            sets = sql.SQL(", ").join(sql.SQL("{} = src.{}").format(ident(c.name), a) for a, c in others)
            old = sql.SQL(", ").join(
                compare_expr(sql.SQL("t.{}").format(ident(c.name)), c) for _, c in others
            )
            new = sql.SQL(", ").join(compare_expr(sql.SQL("src.{}").format(a), c) for a, c in others)
            parts.append(
                sql.SQL(
                    "upd AS (UPDATE {table} AS t SET {sets} FROM src WHERE {match} "
                    "AND ({old}) IS DISTINCT FROM ({new}) RETURNING src.n)"
                ).format(table=table, sets=sets, match=match("t"), old=old, new=new)
            )
        results = ["SELECT n FROM upd"] if others else []
        if create:
            parts.append(
                sql.SQL(
                    "missing AS (SELECT src.* FROM src "
                    "WHERE NOT EXISTS (SELECT FROM {table} AS e WHERE {match}))"
                ).format(table=table, match=match("e"))
            )
            parts.append(
                sql.SQL(
                    "ins AS (INSERT INTO {table} ({cols}) SELECT {alias} FROM missing RETURNING 1)"
                ).format(
                    table=table,
                    cols=sql.SQL(", ").join(ident(c.name) for c in cols),
                    alias=sql.SQL(", ").join(alias),
                )
            )
            results.append("SELECT n FROM missing")
        if not results:  # only key columns and no insert: there is nothing to write
            results.append("SELECT n FROM src WHERE false")
        statement = sql.SQL(", ").join(parts) + sql.SQL(" " + " UNION ALL ".join(results))
        self._statements[cache_key] = statement
        return statement

    async def _create_table(self, conn: psycopg.AsyncConnection[Any], record: SinkRecord) -> Table:
        cfg = self._config
        row = dict(record.row)
        key_values = decode_key(record.key, len(self._key_names))
        for name, value in zip(self._key_names, key_values, strict=True):
            row.setdefault(name, value)
        definitions = [
            sql.SQL("{} {}").format(ident(name), sql.SQL(_sql_type(value))) for name, value in row.items()
        ]
        definitions.append(
            sql.SQL("PRIMARY KEY ({})").format(sql.SQL(", ").join(ident(k) for k in self._key_names))
        )
        await execute(
            conn,
            sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(
                ident(cfg.schema, cfg.table), sql.SQL(", ").join(definitions)
            ),
        )
        log.info("created table %s.%s from the first row", cfg.schema, cfg.table)
        self._shape_valid = False
        shape = await self._read_shape(conn)
        assert shape is not None
        # The creation commits (or rolls back) with the batch: read the shape again after it.
        self._recheck_shape = True
        return shape

    async def aclose(self) -> None:
        """Close the connection. Idempotent; the sink may be opened again."""
        self._opened = False
        conn, self._conn = self._conn, None
        if conn is not None:
            with anyio.CancelScope(shield=True):
                await close_quietly(conn)


def _regclass(schema: str, table: str) -> str:
    return sql.Identifier(schema, table).as_string(None)


def _sql_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "bigint"
    if isinstance(value, float):
        return "double precision"
    if isinstance(value, bytes | bytearray):
        return "bytea"
    if isinstance(value, dict | list):
        return "jsonb"
    return "text"
