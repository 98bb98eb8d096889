"""SQLite source and sink against real SQLite files."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from adapters.sql.config import SqliteSinkConfig, SqliteSourceConfig
from adapters.sql.sqlite import (
    SqliteSink,
    SqliteSource,
    install_change_capture,
    remove_change_capture,
)
from mesh.adapters import Applied, Change, SinkRecord
from mesh.errors import ConfigError, RejectedRecord, SystemUnavailable

pytestmark = pytest.mark.anyio

CUSTOMERS = (
    "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, "
    "balance REAL CHECK (balance >= 0), data BLOB)"
)


def sql(path: Path, *statements: str | tuple[str, tuple[Any, ...]]) -> None:
    """Run statements on a separate plain connection and commit."""
    with closing(sqlite3.connect(path)) as db:
        for statement in statements:
            if isinstance(statement, tuple):
                db.execute(*statement)
            else:
                db.execute(statement)
        db.commit()


def rows(path: Path, query: str) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(path)) as db:
        return db.execute(query).fetchall()


@contextmanager
def write_lock(path: Path, begin: str = "BEGIN IMMEDIATE") -> Iterator[None]:
    """Another connection holding a lock on ``path`` for the duration of the block."""
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute(begin)
        try:
            yield
        finally:
            db.execute("ROLLBACK")


def source_config(path: Path, **kw: Any) -> SqliteSourceConfig:
    return SqliteSourceConfig(
        path=str(path), table=kw.pop("table", "customers"), key=kw.pop("key", "id"),
        poll_interval=0.02, **kw,
    )  # fmt: skip


def sink_config(path: Path, **kw: Any) -> SqliteSinkConfig:
    return SqliteSinkConfig(path=str(path), table="customers", key="id", **kw)


def rec(key: Any, version: int, row: dict[str, Any] | None = None, **kw: Any) -> SinkRecord:
    return SinkRecord(
        id=f"{key}@{version}", key=str(key), version=version,
        deleted=kw.get("deleted", False), row=row if row is not None else {}, origin="crm",
    )  # fmt: skip


async def read_all(source: SqliteSource, cursor: str | None, limit: int) -> list[Change]:
    """Everything currently available after ``cursor``, in pages of ``limit``."""
    changes: list[Change] = []
    for _ in range(100):  # a source that repeats itself must fail, not spin
        with anyio.move_on_after(0.3):
            batch = await source.read(cursor, limit)
            assert batch.changes
            assert len(batch.changes) <= limit
            changes += batch.changes
            cursor = batch.cursor
            continue
        return changes
    raise AssertionError(f"still reading after {len(changes)} changes")


# --- source, changes mode ------------------------------------------------------------------


async def test_changes_mode_captures_inserts_updates_deletes_in_order(tmp_path: Path) -> None:
    db = tmp_path / "crm.db"
    sql(db, CUSTOMERS)
    async with SqliteSource(source_config(db)) as source:
        assert repr(source) == "<SqliteSource customers mode=changes cursor=->"
        before = int(time.time() * 1000)
        sql(
            db,
            "INSERT INTO customers VALUES (1, 'Ada', 10.5, X'0102')",
            "INSERT INTO customers VALUES (2, 'Bob', NULL, NULL)",
            "UPDATE customers SET name = 'Ada L' WHERE id = 1",
            "DELETE FROM customers WHERE id = 2",
        )
        batch = await source.read(None, 100)
    changes = batch.changes
    assert [(c.key, c.deleted) for c in changes] == [
        ("1", False), ("2", False), ("1", False), ("2", True),
    ]  # fmt: skip
    assert changes[0].row == {"id": 1, "name": "Ada", "balance": 10.5, "data": "0102"}
    assert changes[2].row == {"id": 1, "name": "Ada L", "balance": 10.5, "data": "0102"}
    # a delete carries the old row
    assert changes[3].row == {"id": 2, "name": "Bob", "balance": None, "data": None}
    versions = [c.version for c in changes]
    assert versions == sorted(set(versions))
    assert batch.cursor == str(versions[-1])
    assert all(before - 1000 <= c.occurred_at <= before + 60_000 for c in changes)
    assert repr(source) == f"<SqliteSource customers mode=changes cursor={batch.cursor} closed>"


async def test_key_change_is_delete_of_old_key_then_upsert_of_new(tmp_path: Path) -> None:
    db = tmp_path / "crm.db"
    sql(db, CUSTOMERS)
    async with SqliteSource(source_config(db)) as source:
        sql(db, "INSERT INTO customers VALUES (1, 'Ada', 0, NULL)")
        sql(db, "UPDATE customers SET id = 7, name = 'Ada7' WHERE id = 1")
        changes = (await source.read(None, 10)).changes
    assert [(c.key, c.deleted, c.row["name"]) for c in changes] == [
        ("1", False, "Ada"), ("1", True, "Ada"), ("7", False, "Ada7"),
    ]  # fmt: skip
    assert changes[1].version < changes[2].version


async def test_capture_install_is_idempotent_and_follows_schema_changes(tmp_path: Path) -> None:
    db = tmp_path / "crm.db"
    sql(db, CUSTOMERS)
    with pytest.raises(ConfigError, match="missing or out of date"):
        await SqliteSource(source_config(db, install_triggers=False)).open()
    assert await install_change_capture(db, "customers") is True
    assert await install_change_capture(db, "customers") is False
    sql(db, "INSERT INTO customers (id, name) VALUES (1, 'Ada')")
    sql(db, "ALTER TABLE customers ADD COLUMN email TEXT")
    # the installed triggers no longer cover every column
    with pytest.raises(ConfigError, match="out of date"):
        await SqliteSource(source_config(db, install_triggers=False)).open()
    async with SqliteSource(source_config(db)) as source:  # re-creates the triggers
        sql(db, "INSERT INTO customers (id, name, email) VALUES (2, 'Bob', 'b@x')")
        changes = (await source.read(None, 10)).changes
    # the change captured before the re-install survived it
    assert [c.row for c in changes] == [
        {"id": 1, "name": "Ada", "balance": None, "data": None},
        {"id": 2, "name": "Bob", "balance": None, "data": None, "email": "b@x"},
    ]
    assert await install_change_capture(db, "customers") is False
    assert await remove_change_capture(db, "customers") is True
    assert await remove_change_capture(db, "customers") is False
    assert rows(db, "SELECT name FROM sqlite_master WHERE name LIKE '_mesh%'") == []
    sql(db, "INSERT INTO customers (id, name) VALUES (3, 'Cy')")  # no triggers left to fail


async def test_capture_of_a_wide_table(tmp_path: Path) -> None:
    db = tmp_path / "erp.db"
    columns = ", ".join(f"c{i} INTEGER" for i in range(150))
    sql(db, f"CREATE TABLE customers (id INTEGER PRIMARY KEY, {columns})")
    async with SqliteSource(source_config(db)) as source:
        sql(db, ("INSERT INTO customers (id, c0, c149) VALUES (?, ?, ?)", (1, 10, 149)))
        (change,) = (await source.read(None, 10)).changes
    assert len(change.row) == 151
    assert (change.row["c0"], change.row["c75"], change.row["c149"]) == (10, None, 149)


async def test_resume_from_stored_cursor_after_reopen(tmp_path: Path) -> None:
    db = tmp_path / "crm.db"
    sql(db, CUSTOMERS)
    async with SqliteSource(source_config(db)) as source:
        for i in range(5):
            sql(db, ("INSERT INTO customers (id, name) VALUES (?, ?)", (i, f"n{i}")))
        everything = (await source.read(None, 100)).changes
        first = await source.read(None, 2)
    assert first.changes == everything[:2]
    stored = first.cursor
    async with SqliteSource(source_config(db)) as source:
        rest = await read_all(source, stored, 100)
    assert rest == everything[2:]
    assert [c.version for c in rest] == [c.version for c in everything[2:]]


async def test_committed_prunes_the_change_table(tmp_path: Path) -> None:
    db = tmp_path / "crm.db"
    sql(db, CUSTOMERS)
    async with SqliteSource(source_config(db)) as source:
        for i in range(4):
            sql(db, ("INSERT INTO customers (id, name) VALUES (?, ?)", (i, f"n{i}")))
        first = await source.read(None, 3)
        await source.committed(first.cursor)
        left = rows(db, "SELECT seq, pk FROM _mesh_changes_customers")
        assert left == [(first.changes[-1].version + 1, "3")]
        assert [c.key for c in (await source.read(first.cursor, 10)).changes] == ["3"]
        # pruning does not reuse sequence numbers
        await source.committed(str(left[0][0]))
        sql(db, "INSERT INTO customers (id, name) VALUES (9, 'z')")
        (late,) = (await source.read(str(left[0][0]), 10)).changes
        assert late.version == left[0][0] + 1


async def test_read_blocks_until_a_change_and_is_cancellable(tmp_path: Path) -> None:
    db = tmp_path / "crm.db"
    sql(db, CUSTOMERS)
    async with SqliteSource(source_config(db)) as source:
        with anyio.move_on_after(0.3) as scope:
            await source.read(None, 10)
        assert scope.cancelled_caught

        got: list[str] = []

        async def reader() -> None:
            got.extend(c.key for c in (await source.read(None, 10)).changes)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(reader)
                await anyio.sleep(0.2)
                assert got == []
                sql(db, "INSERT INTO customers (id, name) VALUES (5, 'late')")
        assert got == ["5"]


async def test_locked_source_is_unavailable_then_recovers(tmp_path: Path) -> None:
    db = tmp_path / "crm.db"
    sql(db, CUSTOMERS)
    async with SqliteSource(source_config(db), busy_timeout=0.05) as source:
        sql(db, "INSERT INTO customers (id, name) VALUES (1, 'Ada')")
        with write_lock(db, "BEGIN EXCLUSIVE"):
            with pytest.raises(SystemUnavailable, match="locked"):
                await source.read(None, 10)
            with pytest.raises(SystemUnavailable):
                await source.committed("1")
        batch = await source.read(None, 10)
        assert [c.key for c in batch.changes] == ["1"]


async def test_missing_source_table_or_file_is_config_error(tmp_path: Path) -> None:
    db = tmp_path / "crm.db"
    sql(db, CUSTOMERS)
    with pytest.raises(ConfigError, match=r"crm\.db.*'nope' does not exist"):
        await SqliteSource(source_config(db, table="nope")).open()
    with pytest.raises(ConfigError, match="no column 'uid'"):
        await SqliteSource(source_config(db, key="uid")).open()
    with pytest.raises(ConfigError, match="does not exist"):
        await SqliteSource(source_config(tmp_path / "absent.db")).open()
    assert not (tmp_path / "absent.db").exists()


# --- source, cursor mode -------------------------------------------------------------------


async def test_cursor_mode_pages_across_equal_cursor_values(tmp_path: Path) -> None:
    db = tmp_path / "erp.db"
    sql(db, "CREATE TABLE customers (id INTEGER PRIMARY KEY, rev INTEGER NOT NULL, name TEXT)")
    revs = {9: 1, 3: 1, 5: 1, 1: 2, 8: 2, 2: 2, 7: 2, 4: 2, 6: 3}
    for key, rev in revs.items():
        sql(db, ("INSERT INTO customers VALUES (?, ?, ?)", (key, rev, f"n{key}")))
    config = source_config(db, mode="cursor", cursor_column="rev")
    async with SqliteSource(config) as source:
        changes = await read_all(source, None, 2)
        expected = sorted(revs, key=lambda k: (revs[k], k))
        assert [c.key for c in changes] == [str(k) for k in expected]
        assert [c.version for c in changes] == [revs[k] for k in expected]
        assert changes[0].row == {"id": 3, "rev": 1, "name": "n3"}
        assert not any(c.deleted for c in changes)
        cursor = (await source.read(None, len(revs))).cursor
        sql(db, "UPDATE customers SET rev = 4, name = 'again' WHERE id = 5")
        (again,) = await read_all(source, cursor, 2)
        assert (again.key, again.version, again.row["name"]) == ("5", 4, "again")
        assert repr(source).startswith("<SqliteSource customers mode=cursor cursor=[4,5]")


async def test_cursor_mode_timestamps_become_microseconds(tmp_path: Path) -> None:
    db = tmp_path / "erp.db"
    sql(
        db,
        "CREATE TABLE customers (id TEXT PRIMARY KEY, modified TEXT, row_version INTEGER)",
        "INSERT INTO customers VALUES ('a', '2024-01-02 03:04:05.250', 7)",
        "INSERT INTO customers VALUES ('b', '2024-01-02T03:04:06+01:00', 8)",
    )
    stamp = datetime(2024, 1, 2, 3, 4, 5, 250_000, tzinfo=UTC)
    micros = int(stamp.timestamp()) * 1_000_000 + 250_000
    config = source_config(db, mode="cursor", cursor_column="modified")
    async with SqliteSource(config) as source:
        a, b = await read_all(source, None, 10)
    assert (a.key, a.version, a.occurred_at) == ("a", micros, micros // 1000)
    assert b.version == micros - 3600 * 1_000_000 + 750_000
    config = source_config(db, mode="cursor", cursor_column="modified", version_column="row_version")
    async with SqliteSource(config) as source:
        assert [c.version for c in await read_all(source, None, 1)] == [7, 8]


async def test_cursor_mode_config_errors(tmp_path: Path) -> None:
    db = tmp_path / "erp.db"
    sql(db, "CREATE TABLE customers (id INTEGER, rev TEXT)", "INSERT INTO customers VALUES (1, 'x')")
    with pytest.raises(ConfigError, match="cursor_column"):
        SqliteSource(source_config(db, mode="cursor"))
    with pytest.raises(ConfigError, match="primary key or UNIQUE"):
        await SqliteSource(source_config(db, mode="cursor", cursor_column="rev")).open()
    sql(db, "CREATE UNIQUE INDEX customers_id ON customers (id)")
    async with SqliteSource(source_config(db, mode="cursor", cursor_column="rev")) as source:
        with pytest.raises(ConfigError, match="'x'"):
            await source.read(None, 10)
        with pytest.raises(ConfigError, match="not a cursor"):
            await source.read("17", 10)


# --- sink ----------------------------------------------------------------------------------

WRITE_LOG = (
    "CREATE TABLE write_log (n INTEGER PRIMARY KEY, op TEXT, id INTEGER, name TEXT)",
    *(
        f"CREATE TRIGGER log_{op} AFTER {op} ON customers BEGIN "
        f"INSERT INTO write_log (op, id, name) VALUES ('{op}', {ref}.id, {ref}.name); END"
        for op, ref in (("INSERT", "NEW"), ("UPDATE", "NEW"), ("DELETE", "OLD"))
    ),
)


def target(path: Path) -> None:
    sql(path, CUSTOMERS, *WRITE_LOG)


async def test_sink_applies_and_skips_older_and_equal_versions(tmp_path: Path) -> None:
    db = tmp_path / "erp.db"
    target(db)
    async with SqliteSink(sink_config(db)) as sink:
        out = await sink.apply([rec(1, 5, {"id": 1, "name": "Ada", "unknown": "ignored"})])
        assert out == [Applied.APPLIED]
        assert await sink.apply([rec(1, 5, {"id": 1, "name": "Ada"})]) == [Applied.STALE]
        assert await sink.apply([rec(1, 3, {"id": 1, "name": "Old"})]) == [Applied.STALE]
        assert rows(db, "SELECT op, id, name FROM write_log") == [("INSERT", 1, "Ada")]
        out = await sink.apply([rec(1, 6, {"id": 1, "name": "Ada2"}), rec(1, 6, {"id": 1})])
        assert out == [Applied.APPLIED, Applied.STALE]
        assert repr(sink) == "<SqliteSink customers applied=2 stale=3 rejected=0>"
    # the guard is durable: a redelivery after a restart writes nothing either
    async with SqliteSink(sink_config(db)) as sink:
        assert await sink.apply([rec(1, 6, {"id": 1, "name": "Ada2"})]) == [Applied.STALE]
    assert rows(db, "SELECT id, name FROM customers") == [(1, "Ada2")]
    assert rows(db, "SELECT op, name FROM write_log") == [("INSERT", "Ada"), ("UPDATE", "Ada2")]
    assert rows(db, "SELECT tbl, key, version, deleted FROM _mesh_versions") == [("customers", "1", 6, 0)]
    assert rows(db, "PRAGMA journal_mode") == [("wal",)]


async def test_delete_tombstone_prevents_resurrection(tmp_path: Path) -> None:
    db = tmp_path / "erp.db"
    target(db)
    async with SqliteSink(sink_config(db)) as sink:
        await sink.apply([rec(1, 1, {"id": 1, "name": "Ada"}), rec(2, 1, {"id": 2, "name": "B"})])
        assert await sink.apply([rec(1, 2, deleted=True)]) == [Applied.APPLIED]
        assert rows(db, "SELECT id FROM customers") == [(2,)]
        assert await sink.apply([rec(1, 1, {"id": 1, "name": "Ada"})]) == [Applied.STALE]
        assert rows(db, "SELECT id FROM customers") == [(2,)]
        assert rows(db, "SELECT version, deleted FROM _mesh_versions WHERE key = '1'") == [(2, 1)]
        # a delete of a key the target never had still leaves a tombstone
        assert await sink.apply([rec(9, 4, deleted=True)]) == [Applied.APPLIED]
        assert await sink.apply([rec(9, 3, {"id": 9, "name": "x"})]) == [Applied.STALE]
        assert await sink.apply([rec(1, 3, {"id": 1, "name": "Back"})]) == [Applied.APPLIED]
    assert rows(db, "SELECT id, name FROM customers ORDER BY id") == [(1, "Back"), (2, "B")]


async def test_sink_matches_keys_by_the_key_column_affinity(tmp_path: Path) -> None:
    db = tmp_path / "erp.db"
    target(db)
    async with SqliteSink(sink_config(db)) as sink:
        assert await sink.apply([rec("42", 1, {"id": "42", "name": "a"})]) == [Applied.APPLIED]
        assert rows(db, "SELECT typeof(id), id FROM customers") == [("integer", 42)]
        assert await sink.apply([rec("42", 2, {"id": 42, "name": "b"})]) == [Applied.APPLIED]
        assert rows(db, "SELECT id, name FROM customers") == [(42, "b")]
        assert await sink.apply([rec("42", 3, deleted=True)]) == [Applied.APPLIED]
    assert rows(db, "SELECT count(*) FROM customers") == [(0,)]


async def test_refused_records_are_rejected_while_the_rest_apply(tmp_path: Path) -> None:
    db = tmp_path / "erp.db"
    target(db)
    async with SqliteSink(sink_config(db)) as sink:
        out = await sink.apply(
            [
                rec(1, 1, {"id": 1, "name": "ok1"}),
                rec(2, 1, {"id": 2, "name": None}),  # NOT NULL
                rec(3, 1, {"id": 3, "name": "ok3", "balance": 1.5}),
                rec(4, 1, {"id": 4, "name": "neg", "balance": -1}),  # CHECK
                rec(5, 1, {"name": "no key"}),
                rec(6, 1, {"id": "six", "name": "bad type"}),  # INTEGER PRIMARY KEY
            ]
        )
        assert out[0] is Applied.APPLIED
        assert out[2] is Applied.APPLIED
        assert all(isinstance(o, RejectedRecord) for o in out[1:2] + out[3:])
        assert "NOT NULL constraint failed: customers.name" in str(out[1])
        assert "CHECK constraint failed" in str(out[3])
        assert "no key column 'id'" in str(out[4])
        assert "mismatch" in str(out[5])
        assert repr(sink) == "<SqliteSink customers applied=2 stale=0 rejected=4>"
    assert rows(db, "SELECT id, name FROM customers ORDER BY id") == [(1, "ok1"), (3, "ok3")]
    assert rows(db, "SELECT key FROM _mesh_versions ORDER BY key") == [("1",), ("3",)]


async def test_locked_target_is_unavailable_and_applies_after_release(tmp_path: Path) -> None:
    db = tmp_path / "erp.db"
    target(db)
    async with SqliteSink(sink_config(db, busy_timeout=0.05)) as sink:
        batch = [rec(1, 1, {"id": 1, "name": "a"}), rec(2, 1, {"id": 2, "name": "b"})]
        with write_lock(db), pytest.raises(SystemUnavailable, match="locked"):
            await sink.apply(batch)
        assert rows(db, "SELECT count(*) FROM customers") == [(0,)]
        assert await sink.apply(batch) == [Applied.APPLIED, Applied.APPLIED]
    assert rows(db, "SELECT id FROM customers ORDER BY id") == [(1,), (2,)]


async def test_a_failing_batch_applies_nothing_and_the_sink_stays_usable(tmp_path: Path) -> None:
    db = tmp_path / "erp.db"
    target(db)
    # a target-side trigger that breaks on one value: an error of the database, not of the record
    sql(
        db,
        "CREATE TRIGGER boom AFTER INSERT ON customers WHEN NEW.name = 'boom' "
        "BEGIN INSERT INTO no_such_table VALUES (1); END",
    )
    async with SqliteSink(sink_config(db)) as sink:
        batch = [rec(1, 1, {"id": 1, "name": "a"}), rec(2, 1, {"id": 2, "name": "boom"})]
        with pytest.raises(ConfigError, match="no_such_table"):
            await sink.apply(batch)
        assert rows(db, "SELECT count(*) FROM customers") == [(0,)]
        assert rows(db, "SELECT count(*) FROM _mesh_versions") == [(0,)]
        sql(db, "DROP TRIGGER boom")
        assert await sink.apply(batch) == [Applied.APPLIED, Applied.APPLIED]
    assert rows(db, "SELECT id, name FROM customers ORDER BY id") == [(1, "a"), (2, "boom")]


async def test_missing_target_table_is_config_error(tmp_path: Path) -> None:
    db = tmp_path / "erp.db"
    sql(db, "CREATE TABLE other (id INTEGER PRIMARY KEY)")
    with pytest.raises(ConfigError, match=r"erp\.db: table 'customers' does not exist"):
        await SqliteSink(sink_config(db)).open()
    sql(db, "CREATE TABLE customers (id INTEGER, name TEXT)")
    with pytest.raises(ConfigError, match="neither its primary key nor UNIQUE"):
        await SqliteSink(sink_config(db)).open()
    with pytest.raises(ConfigError, match="does not exist"):
        await SqliteSink(sink_config(tmp_path / "absent.db")).open()
    assert not (tmp_path / "absent.db").exists()


async def test_create_table_from_the_first_row(tmp_path: Path) -> None:
    db = tmp_path / "new" / "erp.db"
    db.parent.mkdir()
    async with SqliteSink(sink_config(db, create_table=True)) as sink:
        # a delete before the table exists only leaves a tombstone
        assert await sink.apply([rec("k0", 1, deleted=True)]) == [Applied.APPLIED]
        out = await sink.apply(
            [
                rec("k1", 1, {"id": "k1", "qty": 3, "price": 2.5, "tags": ["a"], "n": None}),
                rec("k2", 1, {"id": "k2", "qty": 4, "extra": "dropped"}),
                rec("k0", 1, {"id": "k0", "qty": 1}),
            ]
        )
        assert out == [Applied.APPLIED, Applied.APPLIED, Applied.STALE]
        assert await sink.apply([rec("k1", 2, deleted=True)]) == [Applied.APPLIED]
    assert rows(db, "SELECT name, type, pk FROM pragma_table_info('customers')") == [
        ("id", "TEXT", 1), ("qty", "INTEGER", 0), ("price", "REAL", 0),
        ("tags", "TEXT", 0), ("n", "", 0),
    ]  # fmt: skip
    assert rows(db, "SELECT * FROM customers") == [("k2", 4, None, None, None)]


async def test_create_table_skips_a_rejected_first_row(tmp_path: Path) -> None:
    db = tmp_path / "erp.db"
    async with SqliteSink(sink_config(db, create_table=True)) as sink:
        out = await sink.apply([rec(1, 1, {"id": 1, "big": 2**70}), rec(2, 1, {"id": 2, "name": "b"})])
        assert isinstance(out[0], RejectedRecord)
        assert out[1] is Applied.APPLIED
    assert rows(db, "SELECT name FROM pragma_table_info('customers')") == [("id",), ("name",)]


async def test_repeated_keys_in_one_batch_see_the_versions_applied_before_them(tmp_path: Path) -> None:
    db = tmp_path / "erp.db"
    target(db)
    async with SqliteSink(sink_config(db)) as sink:
        assert await sink.apply([rec(2, 5, {"id": 2, "name": "stored"})]) == [Applied.APPLIED]
        out = await sink.apply(
            [
                rec(1, 2, {"id": 1, "name": "v2"}),
                rec(1, 1, {"id": 1, "name": "v1"}),  # older than the v2 just applied
                rec(1, 4, {"id": 1, "name": "v4"}),
                rec(1, 4, {"id": 1, "name": "v4 again"}),
                rec(1, 3, {"id": 1, "name": "v3"}),
                rec(1, 5, {"id": 1, "name": None}),  # refused: does not move the guard
                rec(1, 5, deleted=True),
                rec(1, 5, {"id": 1, "name": "v5"}),  # the tombstone holds
                rec(2, 4, {"id": 2, "name": "old"}),
                rec(2, 7, {"id": 2, "name": "v7"}),
                rec(2, 6, {"id": 2, "name": "v6"}),
            ]
        )
        S, A = Applied.STALE, Applied.APPLIED
        assert out[:5] == [A, S, A, S, S]
        assert isinstance(out[5], RejectedRecord)
        assert out[6:] == [A, S, S, A, S]
        assert repr(sink) == "<SqliteSink customers applied=5 stale=6 rejected=1>"
    assert rows(db, "SELECT id, name FROM customers") == [(2, "v7")]
    assert rows(db, "SELECT op, id, name FROM write_log") == [
        ("INSERT", 2, "stored"), ("INSERT", 1, "v2"), ("UPDATE", 1, "v4"), ("DELETE", 1, "v4"),
        ("UPDATE", 2, "v7"),
    ]  # fmt: skip
    assert rows(db, "SELECT key, version, deleted FROM _mesh_versions ORDER BY key") == [
        ("1", 5, 1), ("2", 7, 0),
    ]  # fmt: skip


async def test_a_batch_larger_than_one_version_lookup(tmp_path: Path) -> None:
    db = tmp_path / "erp.db"
    target(db)
    async with SqliteSink(sink_config(db)) as sink:
        first = [rec(k, 2, {"id": k, "name": f"n{k}"}) for k in range(0, 1300, 2)]
        assert await sink.apply(first) == [Applied.APPLIED] * len(first)
        batch = [rec(k, 2 + k % 3 // 2, {"id": k, "name": f"m{k}"}) for k in range(1300)]
        out = await sink.apply(batch)
        # odd keys are new; even keys apply only where the version moved past 2
        expected = [Applied.APPLIED if k % 2 or k % 3 == 2 else Applied.STALE for k in range(1300)]
        assert out == expected
    assert rows(db, "SELECT count(*), sum(name LIKE 'm%') FROM customers") == [
        (1300, sum(1 for o in expected if o is Applied.APPLIED))
    ]


async def test_sink_follows_schema_changes_between_batches(tmp_path: Path) -> None:
    db = tmp_path / "erp.db"
    target(db)
    async with SqliteSink(sink_config(db)) as sink:
        assert await sink.apply([rec(1, 1, {"id": 1, "name": "a", "tier": "gold"})]) == [Applied.APPLIED]
        sql(db, "ALTER TABLE customers ADD COLUMN tier TEXT")
        assert await sink.apply([rec(1, 2, {"id": 1, "name": "a", "tier": "gold"})]) == [Applied.APPLIED]
        assert rows(db, "SELECT id, tier FROM customers") == [(1, "gold")]
        sql(db, "DROP TABLE customers")
        with pytest.raises(ConfigError, match="does not exist"):
            await sink.apply([rec(2, 1, {"id": 2, "name": "b"})])
        sql(db, "CREATE TABLE customers (ID TEXT UNIQUE, Name TEXT)")
        assert await sink.apply([rec(2, 1, {"id": 2, "name": "b"})]) == [Applied.APPLIED]
    assert rows(db, "SELECT ID, Name FROM customers") == [("2", "b")]


async def test_cancelled_batch_is_rolled_back_and_the_sink_stays_usable(tmp_path: Path) -> None:
    db = tmp_path / "erp.db"
    target(db)
    async with SqliteSink(sink_config(db)) as sink:
        # a slow row, through a function only the sink's connection knows
        assert isinstance(sink._conn, sqlite3.Connection)
        sink._conn.create_function("pause", 1, lambda s: time.sleep(s))
        sql(db, "CREATE TRIGGER slow AFTER INSERT ON customers BEGIN SELECT pause(0.3); END")
        batch = [rec(1, 1, {"id": 1, "name": "a"}), rec(2, 1, {"id": 2, "name": "b"})]
        with anyio.move_on_after(0.1) as scope:
            await sink.apply(batch)
        assert scope.cancelled_caught
        assert rows(db, "SELECT count(*) FROM _mesh_versions") == [(0,)]
        sql(db, "DROP TRIGGER slow")
        assert await sink.apply(batch) == [Applied.APPLIED, Applied.APPLIED]
    assert rows(db, "SELECT id FROM customers ORDER BY id") == [(1,), (2,)]


async def test_real_values_round_trip_exactly(tmp_path: Path) -> None:
    """json_object() alone keeps 15 digits; capture must keep every double exactly."""
    import sqlite3

    from adapters.sql.config import SqliteSourceConfig
    from adapters.sql.sqlite import SqliteSource

    db = tmp_path / "erp.db"
    with sqlite3.connect(db) as c:
        c.execute("CREATE TABLE prices (id INTEGER PRIMARY KEY, amount REAL)")
    values = [0.1 + 0.2, 123.45678901234568, 1e-300, -2.5e300, 18.0, float("inf")]
    async with SqliteSource(SqliteSourceConfig(path=str(db), table="prices", key="id")) as src:
        with sqlite3.connect(db) as c:
            c.executemany("INSERT INTO prices VALUES (?, ?)", list(enumerate(values, 1)))
        batch = await src.read(None, 100)
    got = [ch.row["amount"] for ch in batch.changes]
    assert got[:5] == values[:5]
    assert got[5] == "Infinity"


async def test_values_are_bound_converted_or_refused_the_same_in_a_batch(tmp_path: Path) -> None:
    """Plain values are bound as they are; others converted (bool, JSON, bytearray) or refused
    in their slot, whatever the rows around them (one field list or several)."""
    db = tmp_path / "erp.db"
    target(db)
    async with SqliteSink(sink_config(db)) as sink:
        out = await sink.apply(
            [
                rec(1, 1, {"id": 1, "name": "plain", "balance": 1.5, "data": b"\x00\x01"}),
                rec(2, 1, {"id": 2, "name": True, "balance": 2, "data": bytearray(b"ab")}),
                rec(3, 1, {"id": 3, "name": {"a": [1, None]}, "balance": 0.0, "data": None}),
                rec(4, 1, {"id": 4, "name": "too big", "balance": 2**63}),
                rec(5, 1, {"id": None, "name": "null key"}),
                rec(6, 1, {"id": 6, "ID": 6, "name": "twice"}),
                rec(7, 1, {"id": 7, "name": "plain again", "balance": 7, "data": None}),
                rec(8, 1, {"id": 8, "name": object()}),
            ]
        )
    assert out[:3] == [Applied.APPLIED] * 3
    assert out[6] is Applied.APPLIED
    assert "integer 9223372036854775808 does not fit in 64 bits" in str(out[3])
    assert "key column 'id' is null" in str(out[4])
    assert "field 'ID' appears twice" in str(out[5])
    assert "field 'name': cannot store a object" in str(out[7])
    assert rows(db, "SELECT id, name, balance, data FROM customers ORDER BY id") == [
        (1, "plain", 1.5, b"\x00\x01"), (2, "1", 2.0, b"ab"), (3, '{"a":[1,null]}', 0.0, None),
        (7, "plain again", 7.0, None),
    ]  # fmt: skip


async def test_sink_writes_only_given_columns_and_skips_identical_rows(tmp_path: Path) -> None:
    """Partial rows leave other columns alone; a newer record with the values the row already
    holds writes nothing (no trigger fires: two-way sync falls silent) but moves the guard."""
    db = tmp_path / "crm.db"
    target(db)
    async with SqliteSink(sink_config(db)) as sink:
        await sink.apply([rec(1, 1, {"id": 1, "name": "Ada", "balance": 1.5})])
        assert await sink.apply([rec(1, 2, {"id": 1, "name": "Ada", "balance": 1.5})]) == [Applied.UNCHANGED]
        assert await sink.apply([rec(1, 3, {"id": 1, "name": "Ada L"})]) == [Applied.APPLIED]
        assert await sink.apply([rec(1, 4, {"id": 1})]) == [Applied.UNCHANGED]
    assert rows(db, "SELECT id, name, balance FROM customers") == [(1, "Ada L", 1.5)]
    assert rows(db, "SELECT op, name FROM write_log") == [("INSERT", "Ada"), ("UPDATE", "Ada L")]
    assert rows(db, "SELECT version FROM _mesh_versions") == [(4,)]


async def test_sink_scopes_versions_and_update_only_records(tmp_path: Path) -> None:
    """Versions compare only within one scope (origin); a record that may not create leaves an
    absent row absent and may not delete."""
    db = tmp_path / "crm.db"
    target(db)
    async with SqliteSink(sink_config(db)) as sink:
        a = rec(1, 100, {"id": 1, "name": "A"})
        a = msgspec.structs.replace(a, origin="erp", scope="erp")
        b = msgspec.structs.replace(rec(1, 5, {"id": 1, "balance": 2.5}), scope="crm", create=False)
        assert await sink.apply([a, b]) == [Applied.APPLIED, Applied.APPLIED]
        ghost = msgspec.structs.replace(b, key="2", row={"id": 2, "balance": 3.0}, version=6)
        assert await sink.apply([ghost]) == [Applied.UNCHANGED]
        gone = msgspec.structs.replace(b, deleted=True, row={}, version=7)
        assert await sink.apply([gone]) == [Applied.UNCHANGED]
    assert rows(db, "SELECT id, name, balance FROM customers") == [(1, "A", 2.5)]
    assert rows(db, "SELECT key, version FROM _mesh_versions ORDER BY key") == [
        ("1\x1fcrm", 7), ("1\x1ferp", 100), ("2\x1fcrm", 6),
    ]  # fmt: skip


async def test_batched_upserts_tell_applied_from_unchanged_rows_and_keep_order(tmp_path: Path) -> None:
    """Same-shaped upserts go as one statement; a run where some rows already held their values
    is written again row by row (each outcome exact, triggers fire once per real write), and a
    delete or a row of another shape splits the run without reordering anything."""
    db = tmp_path / "crm.db"
    target(db)
    async with SqliteSink(sink_config(db)) as sink:
        first = [rec(k, 1, {"id": k, "name": f"n{k}"}) for k in range(1, 6)]
        assert await sink.apply(first) == [Applied.APPLIED] * 5
        A, U, S = Applied.APPLIED, Applied.UNCHANGED, Applied.STALE
        out = await sink.apply(
            [
                rec(1, 2, {"id": 1, "name": "n1"}),  # unchanged
                rec(2, 2, {"id": 2, "name": "m2"}),
                rec(2, 3, {"id": 2, "name": "m2"}),  # the same key again: unchanged now
                rec(3, 2, deleted=True),  # splits the run
                rec(3, 1, {"id": 3, "name": "back"}),  # stale: the tombstone holds
                rec(4, 2, {"id": 4, "name": "m4", "balance": 2.0}),  # another shape
                rec(6, 1, {"id": 6, "name": "n6", "balance": 1.0}),
            ]
        )
        assert out == [U, A, U, A, S, A, A]
        # a failing record sends the batch record by record: the rest still apply
        out = await sink.apply(
            [
                rec(7, 1, {"id": 7, "balance": 3.0}),  # a new row without its NOT NULL name
                rec(5, 2, {"id": 5, "balance": 4.0}),  # a partial row of an existing entity
                rec(8, 1, {"id": 8, "balance": 5.0, "name": "n8"}),
            ]
        )
        assert isinstance(out[0], RejectedRecord)
        assert out[1:] == [A, A]
    assert rows(db, "SELECT id, name, balance FROM customers ORDER BY id") == [
        (1, "n1", None), (2, "m2", None), (4, "m4", 2.0), (5, "n5", 4.0), (6, "n6", 1.0),
        (8, "n8", 5.0),
    ]  # fmt: skip
    assert rows(db, "SELECT op, id, name FROM write_log WHERE rowid > 5") == [
        ("UPDATE", 2, "m2"), ("DELETE", 3, "n3"), ("UPDATE", 4, "m4"), ("INSERT", 6, "n6"),
        ("UPDATE", 5, "n5"), ("INSERT", 8, "n8"),
    ]  # fmt: skip
    assert rows(db, "SELECT key, version FROM _mesh_versions ORDER BY key") == [
        ("1", 2), ("2", 3), ("3", 2), ("4", 2), ("5", 2), ("6", 1), ("8", 1),
    ]  # fmt: skip


async def test_apply_recording_commits_the_handled_ids_with_the_writes(tmp_path: Path) -> None:
    """Every record that did not fail, and the skipped entries, are recorded in the target's
    ``_mesh_inbox`` in the batch's transaction; a refused record is not; a batch that could not
    run records nothing."""
    db = tmp_path / "crm.db"
    target(db)
    async with SqliteSink(sink_config(db, busy_timeout=0.1)) as sink:
        assert sink.keeps_inbox
        await sink.apply([rec(3, 5, {"id": 3, "name": "kept"})])
        skipped = [("echo-id", "customers", "9", 1, "echo")]
        batch = [rec(1, 1, {"id": 1, "name": "a"}), rec(2, 1, {"id": 2, "name": None}), rec(3, 4, {"id": 3})]
        out = await sink.apply_recording(batch, "customers", skipped)
        assert isinstance(out[1], RejectedRecord)
        assert [out[0], out[2]] == [Applied.APPLIED, Applied.STALE]
        assert await sink.handled(["1@1", "2@1", "3@4", "echo-id"]) == {"1@1", "3@4", "echo-id"}
        with write_lock(db), pytest.raises(SystemUnavailable):
            await sink.apply_recording([rec(4, 1, {"id": 4, "name": "d"})], "customers", [])
        assert await sink.handled(["4@1"]) == set()
    assert rows(db, "SELECT id, outcome FROM _mesh_inbox ORDER BY id") == [
        ("1@1", "applied"), ("3@4", "stale"), ("echo-id", "echo"),
    ]  # fmt: skip


async def test_adapter_connections_keep_a_small_page_cache(tmp_path: Path) -> None:
    # The agent holds these connections for its lifetime: the source's 1 MiB of page cache, not
    # 2 MB; the sink's target connection 4 MiB (its inbox and guard B-trees, see _sqlite_sink).
    db = tmp_path / "erp.db"
    target(db)
    async with SqliteSink(sink_config(db)) as sink, SqliteSource(source_config(db)) as source:
        assert sink._conn is not None
        assert source._conn is not None
        assert sink._conn.execute("PRAGMA cache_size").fetchone() == (-4096,)
        async with source._conn.execute("PRAGMA cache_size") as cur:
            assert await cur.fetchone() == (-1024,)
