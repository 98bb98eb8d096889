"""The SQLite sink: version-guarded upserts and tombstoned deletes, one transaction per batch.

Public through :mod:`adapters.sql.sqlite`.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import anyio
import anyio.from_thread
import anyio.to_thread
import msgspec

from adapters.sql._sqlite_common import (
    Column,
    find_column,
    is_foreign_key_error,
    is_record_error,
    quote,
    translate,
)
from adapters.sql.config import SqliteSinkConfig
from mesh.adapters import Applied, Sink, SinkRecord
from mesh.errors import ConfigError, IntegrityPending, RejectedRecord

__all__ = ["SqliteSink"]

VERSIONS_TABLE = "_mesh_versions"
_VERSIONS_DDL = (
    f"CREATE TABLE IF NOT EXISTS {VERSIONS_TABLE} (tbl TEXT, key TEXT, "
    "version INTEGER NOT NULL, deleted INTEGER NOT NULL, PRIMARY KEY (tbl, key))"
)
_STORE_VERSION = (
    f"INSERT INTO {VERSIONS_TABLE} (tbl, key, version, deleted) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (tbl, key) DO UPDATE SET version = excluded.version, deleted = excluded.deleted"
)
INBOX_TABLE = "_mesh_inbox"
_INBOX_DDL = (
    f"CREATE TABLE IF NOT EXISTS {INBOX_TABLE} (id TEXT PRIMARY KEY, flow TEXT NOT NULL, "
    "key TEXT NOT NULL, version INTEGER NOT NULL, outcome TEXT NOT NULL, applied_at INTEGER NOT NULL) "
    "WITHOUT ROWID"
)
_INBOX_INDEX = f"CREATE INDEX IF NOT EXISTS {INBOX_TABLE}_applied_at ON {INBOX_TABLE} (applied_at)"
_RECORD_HANDLED = (
    f"INSERT INTO {INBOX_TABLE} (id, flow, key, version, outcome, applied_at) VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (id) DO NOTHING"
)
_CACHE_KIB = 4096  # the connection's page cache
_CHUNK = 500  # keys per version look-up (well under SQLite's bound-parameter limit)
_INT64 = range(-(2**63), 2**63)
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1
_JSON = msgspec.json.Encoder()


def _guard_key(record: SinkRecord) -> str:
    """The version guard's key: the record key, qualified by its scope when it has one."""
    return record.key if not record.scope else f"{record.key}\x1f{record.scope}"


_T = TypeVar("_T")


class _Target(NamedTuple):
    """The target table's shape."""

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

    All database work runs on a plain ``sqlite3`` connection in a worker thread, one thread hop
    per :meth:`open`, :meth:`apply` and :meth:`aclose`, serialised by a per-sink limiter.
    """

    def __init__(self, config: SqliteSinkConfig) -> None:
        self._config = config
        self._conn: sqlite3.Connection | None = None
        self._limiter = anyio.CapacityLimiter(1)
        # The target's shape, valid while the database's schema_version equals _schema.
        self._target: _Target | None = None
        self._schema: int | None = None
        self._upserts: dict[tuple[Any, ...], str] = {}
        self._lookups: dict[int, str] = {}
        self._plans: dict[tuple[Any, ...], tuple[str | None, list[int]]] = {}
        self._names: dict[tuple[str, ...], int] = {}  # field names -> _key_position
        self._applied = self._stale = self._rejected = 0

    def __repr__(self) -> str:
        state = "" if self._conn is not None else " closed"
        return (
            f"<SqliteSink {self._config.table} applied={self._applied} stale={self._stale} "
            f"rejected={self._rejected}{state}>"
        )

    async def _in_thread(self, fn: Callable[..., _T], *args: Any) -> _T:
        # Not abandoned on cancellation: once ``fn`` has started, this await returns only after
        # it has finished in its thread, so a batch always commits or rolls back there (and the
        # connection is never used by two threads at once).
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def open(self) -> None:
        """Connect (WAL), check the target table and create the version-guard table.

        Raises:
            ConfigError: the table (or its key column) does not exist and may not be created,
                or the key column is neither the primary key nor UNIQUE.
            SystemUnavailable: the database is locked or cannot be opened now.
        """
        if self._conn is not None:
            return
        try:
            self._conn = await self._in_thread(self._open)
        except sqlite3.Error as exc:
            raise translate(exc, self._config.path) from exc

    def _open(self) -> sqlite3.Connection:
        cfg = self._config
        file = Path(cfg.path)
        if not cfg.create_table and not file.exists():
            raise ConfigError("SQLite database file does not exist", source=cfg.path)
        uri = file.absolute().as_uri() + ("?mode=rwc" if cfg.create_table else "?mode=rw")
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {max(0, round(cfg.busy_timeout * 1000))}")
            # The target's own foreign keys hold (SQLite enforces them per connection, off by
            # default): a child before its parent is IntegrityPending, not a dangling row.
            conn.execute("PRAGMA foreign_keys = ON")
            self._schema = None
            self._shape(conn)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            # The inbox and the version guard are keyed by ids and keys in no particular order,
            # so a batch touches pages all over their B-trees: a cache of 4 MiB (2 by default)
            # keeps most of them in memory instead of reading them again from the file (8 MiB
            # made the inbox insert of a 50,000-event drain ~40% cheaper than 2 MB, but put the
            # sink agent's peak RSS at 62 MB, over the 60 MB target; 4 MiB: 57 MB).
            conn.execute(f"PRAGMA cache_size = -{_CACHE_KIB}")
            conn.execute(_VERSIONS_DDL)
            conn.execute(_INBOX_DDL)
            conn.execute(_INBOX_INDEX)
        except BaseException:
            conn.close()
            raise
        return conn

    def _shape(self, conn: sqlite3.Connection) -> _Target | None:
        """The target table's shape; None if it is missing and may be created.

        Re-read only when the schema changed: ``PRAGMA schema_version`` is a header read, while
        the table and index inspection costs several queries.
        """
        (version,) = conn.execute("PRAGMA schema_version").fetchone()
        if version != self._schema:
            self._plans.clear()
            self._target = self._read_target(conn)
            self._schema = version
        return self._target

    def _read_target(self, conn: sqlite3.Connection) -> _Target | None:
        cfg = self._config
        columns = _table_columns(conn, cfg.table)
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
        if not _is_unique_key(conn, cfg.table, key, columns):
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
        try:
            outcomes = await self._in_thread(self._apply_batch, self._conn, records)
        except sqlite3.Error as exc:
            raise translate(exc, self._config.path) from exc
        self._applied += sum(1 for o in outcomes if o is Applied.APPLIED)
        self._stale += sum(1 for o in outcomes if o is Applied.STALE)
        self._rejected += sum(1 for o in outcomes if isinstance(o, Exception))
        return outcomes

    keeps_inbox = True

    async def apply_recording(
        self, records: Sequence[SinkRecord], flow: str, skipped: Sequence[tuple[str, str, str, int, str]]
    ) -> list[Applied | Exception]:
        """:meth:`apply`, and in its transaction the handled ids in ``_mesh_inbox`` (same
        database): ``skipped`` and every record that did not fail.

        Raises:
            SystemUnavailable, ConfigError: as :meth:`apply`; nothing was applied nor recorded.
        """
        if not records and not skipped:
            return []
        if self._conn is None:
            raise RuntimeError(f"{self!r} is not open")
        try:
            outcomes = await self._in_thread(self._apply_batch, self._conn, records, (flow, skipped))
        except sqlite3.Error as exc:
            raise translate(exc, self._config.path) from exc
        self._applied += sum(1 for o in outcomes if o is Applied.APPLIED)
        self._stale += sum(1 for o in outcomes if o is Applied.STALE)
        self._rejected += sum(1 for o in outcomes if isinstance(o, Exception))
        return outcomes

    async def handled(self, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` :meth:`apply_recording` recorded.

        Raises:
            SystemUnavailable: the database is locked or failed.
        """
        if not ids:
            return set()
        if self._conn is None:
            raise RuntimeError(f"{self!r} is not open")
        try:
            return await self._in_thread(self._handled, self._conn, ids)
        except sqlite3.Error as exc:
            raise translate(exc, self._config.path) from exc

    def _handled(self, conn: sqlite3.Connection, ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(ids), _CHUNK):
            part = list(ids[start : start + _CHUNK])
            marks = ",".join("?" * len(part))
            rows = conn.execute(f"SELECT id FROM {INBOX_TABLE} WHERE id IN ({marks})", part).fetchall()
            found.update(r[0] for r in rows)
        return found

    async def forget_handled(self, older_than: float) -> int:
        """Forget handled ids recorded more than ``older_than`` seconds ago; returns how many.

        Raises:
            SystemUnavailable: the database is locked or failed.
        """
        if self._conn is None:
            return 0
        cutoff = int((time.time() - older_than) * 1000)
        try:
            return await self._in_thread(self._forget, self._conn, cutoff)
        except sqlite3.Error as exc:
            raise translate(exc, self._config.path) from exc

    @staticmethod
    def _forget(conn: sqlite3.Connection, cutoff: int) -> int:
        return int(conn.execute(f"DELETE FROM {INBOX_TABLE} WHERE applied_at < ?", (cutoff,)).rowcount)

    def _apply_batch(
        self,
        conn: sqlite3.Connection,
        records: Sequence[SinkRecord],
        inbox: tuple[str, Sequence[tuple[str, str, str, int, str]]] | None = None,
    ) -> list[Applied | Exception]:
        """The whole batch, in the worker thread: ``BEGIN IMMEDIATE`` ... ``COMMIT``.

        First without a savepoint per record, consecutive upserts of the same columns as one
        ``executemany`` each (and their guard versions as another); when a record fails, the
        batch is rolled back and applied again record by record with one savepoint each, so the
        failing record alone is refused.
        """
        try:
            return self._apply_tx(conn, records, inbox, savepoints=False)
        except _RecordFailed:
            return self._apply_tx(conn, records, inbox, savepoints=True)

    def _apply_tx(
        self,
        conn: sqlite3.Connection,
        records: Sequence[SinkRecord],
        inbox: tuple[str, Sequence[tuple[str, str, str, int, str]]] | None,
        *,
        savepoints: bool,
    ) -> list[Applied | Exception]:
        try:
            conn.execute("BEGIN IMMEDIATE")
            target = self._shape(conn)
            versions = self._stored_versions(conn, records)
            outcomes: list[Applied | Exception] = []
            if savepoints:
                for record in records:
                    outcome, target = self._apply_one(conn, record, target, versions, savepoints)
                    outcomes.append(outcome)
            else:
                outcomes = self._apply_runs(conn, records, target, versions)
            if inbox is not None:  # the handled ids commit with the writes and their guard
                flow, skipped = inbox
                now = time.time_ns() // 1_000_000
                rows = [(*h, now) for h in skipped]
                rows += [
                    (r.id, flow, r.key, r.version, o.value, now)
                    for r, o in zip(records, outcomes, strict=True)
                    if not isinstance(o, Exception)
                ]
                conn.executemany(_RECORD_HANDLED, rows)
            # Cancelled while the batch ran: roll it back rather than commit behind the back of
            # a caller that will not see the outcomes.
            anyio.from_thread.check_cancelled()
            conn.execute("COMMIT")
        except BaseException:
            self._schema = None  # the batch may have created the table: re-read the shape
            with suppress(sqlite3.Error):  # "no transaction is active"
                conn.execute("ROLLBACK")
            raise
        return outcomes

    def _apply_runs(
        self,
        conn: sqlite3.Connection,
        records: Sequence[SinkRecord],
        target: _Target | None,
        versions: dict[str, int],
    ) -> list[Applied | Exception]:
        """The batch without savepoints: consecutive upserts of the same columns into an
        existing table go as one ``executemany`` (a "run"); deletes, creations, key-only rows
        and ``create = false`` updates one by one, in order.

        Raises:
            _RecordFailed: a record failed (the caller applies the batch again with savepoints).
        """
        table = self._config.table
        outcomes: list[Applied | Exception | None] = [None] * len(records)
        run: list[int] = []  # indexes of the records in the current run
        run_sql = ""
        run_params: list[list[Any]] = []
        run_versions: list[tuple[str, str, int, int]] = []
        run_values: list[dict[str, Any]] = []

        def flush() -> None:
            if run:
                self._apply_run(conn, target, run_sql, run_params, run_versions, run_values, run, outcomes)
                run.clear()
                run_params.clear()
                run_versions.clear()
                run_values.clear()

        for i, record in enumerate(records):
            if record.deleted or not record.create or target is None or record.version not in _INT64:
                flush()
                outcomes[i], target = self._apply_one(conn, record, target, versions, False)
                continue
            guard = _guard_key(record)
            stored = versions.get(guard)
            if stored is not None and stored >= record.version:
                outcomes[i] = Applied.STALE
                continue
            try:
                values = self._plain_values(record.row)
            except RejectedRecord as exc:
                outcomes[i] = RejectedRecord(f"{table} key {record.key!r}: {exc}")
                continue
            planned = self._upsert_statement(target, values)
            if planned is None:  # key only
                flush()
                outcomes[i], target = self._apply_one(conn, record, target, versions, False)
                continue
            sql, params = planned
            if sql != run_sql:
                flush()
                run_sql = sql
            run.append(i)
            run_params.append(params)
            run_values.append(values)
            run_versions.append((table, guard, record.version, 0))
            versions[guard] = record.version  # a later record of this key sees this version
        flush()
        return outcomes  # type: ignore[return-value]  # every slot is filled

    def _apply_run(
        self,
        conn: sqlite3.Connection,
        target: _Target | None,
        sql: str,
        params: list[list[Any]],
        guards: list[tuple[str, str, int, int]],
        values: list[dict[str, Any]],
        indexes: list[int],
        outcomes: list[Applied | Exception | None],
    ) -> None:
        """One run of same-shaped upserts: one ``executemany``. When some row was left
        unchanged (it held these values already), the run is rolled back to its savepoint and
        written row by row to tell which (two-way sync echoes; rare on a plain drain)."""
        assert target is not None
        try:
            conn.execute("SAVEPOINT mesh_run")
            written = conn.executemany(sql, params).rowcount
            if written == len(indexes):
                for i in indexes:
                    outcomes[i] = Applied.APPLIED
            else:
                conn.execute("ROLLBACK TO mesh_run")
                for i, row in zip(indexes, values, strict=True):
                    changed = self._upsert(conn, target, row, create=True)
                    outcomes[i] = Applied.APPLIED if changed else Applied.UNCHANGED
            conn.executemany(_STORE_VERSION, guards)
            conn.execute("RELEASE mesh_run")
        except sqlite3.Error as exc:
            if not is_record_error(exc):
                raise  # the whole batch rolls back
            raise _RecordFailed from exc  # the batch again, with a savepoint per record

    def _stored_versions(self, conn: sqlite3.Connection, records: Sequence[SinkRecord]) -> dict[str, int]:
        """The guard's stored version of every (key, scope) in the batch that has one."""
        keys = list(dict.fromkeys(_guard_key(r) for r in records))
        versions: dict[str, int] = {}
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start : start + _CHUNK]
            # Pad to a few fixed sizes (NULL matches nothing) so the statements stay cached.
            size = _CHUNK if len(chunk) > _CHUNK // 2 else 1 << (len(chunk) - 1).bit_length()
            sql = self._lookups.get(size)
            if sql is None:
                sql = self._lookups[size] = (
                    f"SELECT key, version FROM {VERSIONS_TABLE} "
                    f"WHERE tbl = ? AND key IN ({', '.join('?' * size)})"
                )
            params = [self._config.table, *chunk] + [None] * (size - len(chunk))
            versions.update(conn.execute(sql, params).fetchall())
        return versions

    def _apply_one(
        self,
        conn: sqlite3.Connection,
        record: SinkRecord,
        target: _Target | None,
        versions: dict[str, int],
        savepoints: bool = True,
    ) -> tuple[Applied | Exception, _Target | None]:
        table = self._config.table
        if record.version not in _INT64:
            return RejectedRecord(f"{table} key {record.key!r}: version out of range"), target
        guard = _guard_key(record)
        stored = versions.get(guard)
        if stored is not None and stored >= record.version:
            return Applied.STALE, target
        values: dict[str, Any] = {}
        if not record.deleted:
            try:
                values = _row_values(record.row, self._config.key)
            except RejectedRecord as exc:
                return RejectedRecord(f"{table} key {record.key!r}: {exc}"), target
        created = False
        outcome = Applied.APPLIED
        if savepoints:
            conn.execute("SAVEPOINT mesh_record")
        try:
            if record.deleted:
                if target is not None and record.create:
                    # A bound value has no affinity, so SQLite compares it under the key
                    # column's affinity: "42" matches an INTEGER 42, 42 matches a TEXT '42'.
                    conn.execute(f"DELETE FROM {quote(table)} WHERE {quote(target.key)} = ?", (record.key,))
                elif not record.create:
                    outcome = Applied.UNCHANGED  # not the owner of the entity's existence
            else:
                if target is None and record.create:
                    conn.execute(_create_table_sql(table, self._config.key, values))
                    created = True
                    target = self._shape(conn)
                    assert target is not None
                written = 0
                if target is not None:
                    written = self._upsert(conn, target, values, create=record.create)
                if not written:
                    outcome = Applied.UNCHANGED  # the row held these values already (or is absent)
            conn.execute(_STORE_VERSION, (table, guard, record.version, int(record.deleted)))
            if savepoints:
                conn.execute("RELEASE mesh_record")
        except sqlite3.Error as exc:
            if not is_record_error(exc):
                raise  # the whole batch rolls back
            if not savepoints:
                raise _RecordFailed from exc  # the batch again, with a savepoint per record
            conn.execute("ROLLBACK TO mesh_record")
            conn.execute("RELEASE mesh_record")
            if created:
                self._schema = None  # the creation was rolled back with the record
                target = None
            refused = IntegrityPending if is_foreign_key_error(exc) else RejectedRecord
            return refused(f"{table} key {record.key!r}: {exc}"), target
        versions[guard] = record.version  # a later record of this key sees this version
        return outcome, target

    def _plain_values(self, row: dict[str, Any]) -> dict[str, Any]:
        """:func:`_row_values`, quicker for the usual row: when its field names (checked once per
        list of names) and its values need no conversion, the row itself is returned.

        Raises:
            RejectedRecord: as :func:`_row_values`.
        """
        names = tuple(row)
        at = self._names.get(names)
        if at is None:
            if len(self._names) > 256:
                self._names.clear()
            at = self._names[names] = _key_position(names, self._config.key)
        if at < 0:
            return _row_values(row, self._config.key)  # raises (duplicate name, no key) as it does
        for i, value in enumerate(row.values()):
            kind = type(value)
            if (
                kind is str
                or kind is float
                or kind is bytes
                or (kind is int and _INT_MIN <= value <= _INT_MAX)
            ):
                continue
            if value is None and i != at:
                continue
            return _row_values(row, self._config.key)  # converts, or raises, as it does
        return row

    def _upsert_statement(self, target: _Target, values: dict[str, Any]) -> tuple[str, list[Any]] | None:
        """The upsert ``_upsert`` would run for ``values`` (``create`` true) and its parameters;
        None when the row has only the key. Planned once per field list and table shape."""
        shape = (id(target), tuple(values))  # the plans are cleared when the shape is re-read
        plan = self._plans.get(shape)
        if plan is None:
            names: list[str] = []
            picks: list[int] = []
            for j, name in enumerate(values):
                column = target.columns.get(name.lower())
                if column is not None:
                    names.append(column)
                    picks.append(j)
            others = [n for n in names if n != target.key]
            sql = None if not others else self._sql(("upsert", target.key, *names), lambda: (
                f"INSERT INTO {quote(self._config.table)} ({', '.join(map(quote, names))}) "
                f"VALUES ({', '.join('?' * len(names))}) ON CONFLICT ({quote(target.key)}) DO UPDATE SET "
                + ", ".join(f"{quote(n)} = excluded.{quote(n)}" for n in others)
                + " WHERE " + " OR ".join(f"{quote(n)} IS NOT excluded.{quote(n)}" for n in others)
            ))  # fmt: skip
            if len(self._plans) > 256:
                self._plans.clear()
            plan = self._plans[shape] = (sql, picks)
        sql, picks = plan
        if sql is None:
            return None
        row = list(values.values())
        return sql, [row[j] for j in picks]

    def _upsert(
        self, conn: sqlite3.Connection, target: _Target, values: dict[str, Any], *, create: bool
    ) -> int:
        """Write ``values`` (their columns only); returns 0 when nothing changed: the row held
        these values already, or (``create`` false) it does not exist."""
        names: list[str] = []
        params: list[Any] = []
        for name, value in values.items():
            column = target.columns.get(name.lower())
            if column is None:
                continue  # the table has no such column: ignore the field
            names.append(column)
            params.append(value)  # stored under the column's affinity: "42" -> INTEGER 42
        others = [n for n in names if n != target.key]
        by_name = dict(zip(names, params, strict=True))
        key = by_name.get(target.key)
        if not others:  # only the key: insert when absent, else nothing to write
            if not create:
                return 0
            sql = self._sql(("key-only", target.key), lambda: (
                f"INSERT INTO {quote(self._config.table)} ({quote(target.key)}) SELECT ? WHERE NOT EXISTS "
                f"(SELECT 1 FROM {quote(self._config.table)} WHERE {quote(target.key)} = ?)"
            ))  # fmt: skip
            return conn.execute(sql, (key, key)).rowcount
        new = [by_name[n] for n in others]
        update = self._sql(("update", target.key, *others), lambda: (
            f"UPDATE {quote(self._config.table)} SET " + ", ".join(f"{quote(n)} = ?" for n in others)
            + f" WHERE {quote(target.key)} = ? AND ("
            + " OR ".join(f"{quote(n)} IS NOT ?" for n in others) + ")"
        ))  # fmt: skip
        if not create:
            return conn.execute(update, [*new, key, *new]).rowcount
        # Only a change writes: the WHERE keeps an identical row untouched, so the table's own
        # triggers (its change capture) see nothing and two-way sync falls silent.
        upsert = self._sql(("upsert", target.key, *names), lambda: (
            f"INSERT INTO {quote(self._config.table)} ({', '.join(map(quote, names))}) "
            f"VALUES ({', '.join('?' * len(names))}) ON CONFLICT ({quote(target.key)}) DO UPDATE SET "
            + ", ".join(f"{quote(n)} = excluded.{quote(n)}" for n in others)
            + " WHERE " + " OR ".join(f"{quote(n)} IS NOT excluded.{quote(n)}" for n in others)
        ))  # fmt: skip
        try:
            return conn.execute(upsert, params).rowcount
        except sqlite3.IntegrityError as exc:
            # SQLite checks NOT NULL before it looks for a conflict: a partial row for an
            # existing entity (columns another system owns left out) is an update.
            if "NOT NULL" not in str(exc):
                raise
            written = conn.execute(update, [*new, key, *new]).rowcount
            exists = conn.execute(
                f"SELECT 1 FROM {quote(self._config.table)} WHERE {quote(target.key)} = ?", (key,)
            ).fetchone()
            if written or exists:
                return written
            raise

    def _sql(self, cache_key: tuple[Any, ...], build: Callable[[], str]) -> str:
        sql = self._upserts.get(cache_key)
        if sql is None:
            sql = self._upserts[cache_key] = build()
        return sql

    async def aclose(self) -> None:
        """Close the connection. Idempotent; the sink may be opened again."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with anyio.CancelScope(shield=True), suppress(sqlite3.Error):
                await self._in_thread(conn.close)


class _RecordFailed(Exception):
    """A record failed in a batch applied without savepoints: apply it again with them."""


def _table_columns(conn: sqlite3.Connection, table: str) -> list[Column]:
    """Columns of ``table`` in declaration order; empty when the table does not exist."""
    rows = conn.execute(
        'SELECT name, type, "notnull", pk FROM pragma_table_info(?) ORDER BY cid', (table,)
    ).fetchall()
    return [Column(str(n), str(t or ""), bool(nn), int(pk)) for n, t, nn, pk in rows]


def _is_unique_key(conn: sqlite3.Connection, table: str, column: Column, columns: list[Column]) -> bool:
    """Whether ``column`` alone is the primary key of ``table`` or has a full unique index."""
    if column.pk and sum(1 for c in columns if c.pk) == 1:
        return True
    indexes = conn.execute(
        'SELECT name FROM pragma_index_list(?) WHERE "unique" AND NOT partial', (table,)
    ).fetchall()
    for (index,) in indexes:
        cols = conn.execute("SELECT name FROM pragma_index_info(?) ORDER BY seqno", (index,)).fetchall()
        if len(cols) == 1 and str(cols[0][0]).lower() == column.name.lower():
            return True
    return False


def _key_position(names: tuple[str, ...], key: str) -> int:
    """Where the key column is among a row's field names; -1 when it is missing or a name
    appears twice (names are case-insensitive)."""
    lowered = [n.lower() for n in names]
    if len(set(lowered)) != len(lowered) or key.lower() not in lowered:
        return -1
    return lowered.index(key.lower())


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
