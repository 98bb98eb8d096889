"""PostgreSQL sink against a real PostgreSQL 15 cluster (tests/_pg.py starts it), and both
adapters across a server stop and restart."""

from __future__ import annotations

import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import anyio
import psycopg
import pytest

from adapters.sql.config import PostgresSinkConfig, PostgresSourceConfig
from adapters.sql.postgres import PostgresSink, PostgresSource
from mesh.adapters import Applied, SinkRecord
from mesh.errors import ConfigError, RejectedRecord, SystemUnavailable
from tests._pg import PgCluster

pytestmark = pytest.mark.anyio

CUSTOMERS = (
    "CREATE TABLE customers (id int PRIMARY KEY, name varchar(20) NOT NULL, "
    "balance numeric(12,2) CHECK (balance >= 0), note text DEFAULT 'n/a', data bytea)"
)


@pytest.fixture
def db(pg_cluster: PgCluster, pg_db: str) -> Iterator[psycopg.Connection[Any]]:
    with pg_cluster.connect(pg_db) as conn:
        yield conn


def config(cluster: PgCluster, dbname: str, **kw: Any) -> PostgresSinkConfig:
    kw.setdefault("table", "customers")
    kw.setdefault("key", "id")
    return PostgresSinkConfig(dsn=cluster.dsn(dbname), **kw)


def rec(
    key: str, version: int, row: dict[str, Any] | None = None, *, deleted: bool = False, scope: str = ""
) -> SinkRecord:
    return SinkRecord(
        id=f"{key}-{version}",
        key=key,
        version=version,
        deleted=deleted,
        row=row or {},
        origin="erp",
        scope=scope,
    )


def rows(db: Any, query: str = "SELECT * FROM customers ORDER BY id") -> list[tuple[Any, ...]]:
    return list(db.execute(query).fetchall())


async def test_version_guard_and_tombstones(pg_cluster: PgCluster, pg_db: str, db: Any) -> None:
    db.execute(CUSTOMERS)
    async with PostgresSink(config(pg_cluster, pg_db)) as sink:
        assert await sink.apply([rec("1", 2, {"id": 1, "name": "Ada"})]) == [Applied.APPLIED]
        assert await sink.apply(
            [rec("1", 1, {"id": 1, "name": "old"}), rec("1", 2, {"id": 1, "name": "same"})]
        ) == [
            Applied.STALE,
            Applied.STALE,
        ]
        assert await sink.apply([rec("1", 5, deleted=True)]) == [Applied.APPLIED]
        assert rows(db) == []
        # an older upsert arriving after the delete cannot resurrect the row
        assert await sink.apply([rec("1", 4, {"id": 1, "name": "zombie"})]) == [Applied.STALE]
        assert await sink.apply([rec("1", 6, deleted=True)]) == [Applied.UNCHANGED]  # nothing left to delete
        assert await sink.apply([rec("1", 7, {"id": 1, "name": "back"})]) == [Applied.APPLIED]
        assert repr(sink).startswith("<PostgresSink public.customers applied=3 unchanged=1 stale=3")
    assert rows(db, "SELECT id, name FROM customers") == [(1, "back")]
    assert rows(db, "SELECT tbl, key, scope, version, deleted FROM _mesh_versions") == [
        ("customers", "1", "", 7, False)
    ]


async def test_versions_are_compared_within_a_scope(pg_cluster: PgCluster, pg_db: str, db: Any) -> None:
    db.execute(CUSTOMERS)
    async with PostgresSink(config(pg_cluster, pg_db)) as sink:
        out = await sink.apply(
            [
                rec("1", 100, {"id": 1, "name": "erp"}, scope="erp"),
                rec("1", 5, {"id": 1, "note": "crm"}, scope="crm"),
            ]
        )
        assert out == [Applied.APPLIED, Applied.APPLIED]
        assert await sink.apply([rec("1", 4, {"id": 1, "note": "old crm"}, scope="crm")]) == [Applied.STALE]
    assert rows(db, "SELECT id, name, note FROM customers") == [(1, "erp", "crm")]


async def test_partial_rows_write_only_their_columns_and_unchanged_writes_nothing(
    pg_cluster: PgCluster, pg_db: str, db: Any
) -> None:
    db.execute(CUSTOMERS)
    db.execute("CREATE TABLE writes (n serial, op text)")
    db.execute(
        "CREATE FUNCTION log_write() RETURNS trigger LANGUAGE plpgsql AS "
        "$$BEGIN INSERT INTO writes (op) VALUES (TG_OP); RETURN NEW; END$$"
    )
    db.execute(
        "CREATE TRIGGER log_write BEFORE INSERT OR UPDATE ON customers "
        "FOR EACH ROW EXECUTE FUNCTION log_write()"
    )
    async with PostgresSink(config(pg_cluster, pg_db)) as sink:
        full = {"id": 1, "name": "Ada", "balance": "10.50", "note": "vip", "data": "CAFE", "unknown": 1}
        assert await sink.apply([rec("1", 1, full)]) == [Applied.APPLIED]
        # a partial row (ownership removed fields); key from record.key when absent from the row
        assert await sink.apply([rec("1", 2, {"balance": "11"})]) == [Applied.APPLIED]
        assert rows(db) == [(1, "Ada", Decimal("11.00"), "vip", b"\xca\xfe")]
        # the same values again (11 == 11.00): nothing written, no trigger fires, the guard advances
        assert await sink.apply([rec("1", 3, {"id": "1", "balance": 11.0, "name": "Ada"})]) == [
            Applied.UNCHANGED
        ]
        assert await sink.apply([rec("1", 3, {"id": 1, "name": "Eve"})]) == [Applied.STALE]
        # an insert leaves absent columns at their defaults
        assert await sink.apply([rec("2", 1, {"id": 2, "name": "Bob"})]) == [Applied.APPLIED]
    assert rows(db, "SELECT op FROM writes ORDER BY n") == [("INSERT",), ("UPDATE",), ("INSERT",)]
    assert rows(db, "SELECT id, name, balance, note FROM customers WHERE id = 2") == [(2, "Bob", None, "n/a")]


async def test_records_that_may_not_create_only_update(pg_cluster: PgCluster, pg_db: str, db: Any) -> None:
    db.execute(CUSTOMERS)
    db.execute("INSERT INTO customers (id, name) VALUES (1, 'Ada')")
    async with PostgresSink(config(pg_cluster, pg_db)) as sink:

        def update_only(key: str, version: int, row: dict[str, Any], deleted: bool = False) -> SinkRecord:
            return SinkRecord(
                id=key,
                key=key,
                version=version,
                deleted=deleted,
                row=row,
                origin="crm",
                scope="crm",
                create=False,
            )

        out = await sink.apply(
            [
                update_only("1", 1, {"id": 1, "note": "from crm"}),
                update_only("2", 1, {"id": 2, "name": "never created"}),
                update_only("1", 2, {}, deleted=True),
            ]
        )
        assert out == [Applied.APPLIED, Applied.UNCHANGED, Applied.UNCHANGED]
        assert await sink.apply([update_only("2", 1, {"id": 2, "name": "x"})]) == [Applied.STALE]
    assert rows(db, "SELECT id, name, note FROM customers") == [(1, "Ada", "from crm")]


async def test_one_refused_record_is_rejected_while_the_rest_apply(
    pg_cluster: PgCluster, pg_db: str, db: Any
) -> None:
    db.execute(CUSTOMERS)
    async with PostgresSink(config(pg_cluster, pg_db)) as sink:
        batch = [
            rec("1", 1, {"id": 1, "name": "Ada"}),
            rec("2", 1, {"id": 2, "name": "x" * 21}),  # too long for varchar(20)
            rec("3", 1, {"id": 3, "name": "Cy", "balance": "-1"}),  # CHECK
            rec("4", 1, {"id": 4, "name": "Di", "balance": "lots"}),  # not a number
            rec("5", 1, {"id": 5, "name": None}),  # NOT NULL
            rec("6", 1, {"id": 6, "name": "Ed", "data": "not hex"}),  # refused before the database
            rec("abc", 1, deleted=True),  # a key that is not an integer
            rec("7", 1, {"id": 7, "name": "Flo"}),
        ]
        out = await sink.apply(batch)
        assert [type(o).__name__ for o in out] == [
            "Applied", "RejectedRecord", "RejectedRecord", "RejectedRecord", "RejectedRecord",
            "RejectedRecord",
            "RejectedRecord", "Applied",
        ]  # fmt: skip
        assert "value too long" in str(out[1])
        assert "customers key '2'" in str(out[1])
        assert "check constraint" in str(out[2])
        # the refused records moved no guard: fixed, they apply at the same version
        assert await sink.apply([rec("2", 1, {"id": 2, "name": "Bea"})]) == [Applied.APPLIED]
    assert rows(db, "SELECT id, name FROM customers ORDER BY id") == [(1, "Ada"), (2, "Bea"), (7, "Flo")]
    assert rows(db, "SELECT key FROM _mesh_versions ORDER BY key") == [("1",), ("2",), ("7",)]


async def test_records_of_one_key_in_a_batch_apply_in_order(
    pg_cluster: PgCluster, pg_db: str, db: Any
) -> None:
    db.execute(CUSTOMERS)
    async with PostgresSink(config(pg_cluster, pg_db)) as sink:
        out = await sink.apply(
            [
                rec("1", 1, {"id": 1, "name": "Ada", "note": "first"}),
                rec("2", 1, {"id": 2, "name": "Bob"}),
                rec("1", 3, deleted=True),
                rec("1", 2, {"id": 1, "name": "stale"}),
                rec("1", 4, {"id": 1, "name": "Ada again"}),
                rec("1", 5, {"id": 1, "balance": "1"}),
            ]
        )
    assert out == [Applied.APPLIED] * 3 + [Applied.STALE] + [Applied.APPLIED] * 2
    assert rows(db, "SELECT id, name, balance, note FROM customers ORDER BY id") == [
        (1, "Ada again", Decimal("1.00"), "n/a"),
        (2, "Bob", None, "n/a"),
    ]


async def test_two_sinks_on_one_table_never_let_an_older_version_win(
    pg_cluster: PgCluster, pg_db: str, db: Any
) -> None:
    db.execute(CUSTOMERS)
    keys = [str(k) for k in range(40)]
    async with PostgresSink(config(pg_cluster, pg_db)) as one, PostgresSink(config(pg_cluster, pg_db)) as two:

        async def feed(sink: PostgresSink, versions: range) -> None:
            for version in versions:  # small batches, keys in opposite orders on the two sinks
                order = keys if version % 2 else keys[::-1]
                await sink.apply([rec(k, version, {"id": int(k), "name": f"v{version}"}) for k in order])

        async with anyio.create_task_group() as tg:
            tg.start_soon(feed, one, range(1, 30, 2))
            tg.start_soon(feed, two, range(2, 31, 2))
    assert rows(db, "SELECT DISTINCT name FROM customers") == [("v30",)]
    assert rows(db, "SELECT DISTINCT version FROM _mesh_versions") == [(30,)]


async def test_columns_changing_between_batches(pg_cluster: PgCluster, pg_db: str, db: Any) -> None:
    db.execute(CUSTOMERS)
    async with PostgresSink(config(pg_cluster, pg_db)) as sink:
        assert await sink.apply([rec("1", 1, {"id": 1, "name": "Ada", "note": "x"})]) == [Applied.APPLIED]
        db.execute("ALTER TABLE customers DROP COLUMN note, ADD COLUMN email text")
        out = await sink.apply([rec("1", 2, {"id": 1, "name": "Ada", "note": "y", "email": "a@b.c"})])
        assert out == [Applied.APPLIED]
        db.execute("DROP TABLE customers")
        with pytest.raises(ConfigError, match="does not exist"):
            await sink.apply([rec("1", 3, {"id": 1, "name": "Ada"})])
    assert rows(db, "SELECT * FROM _mesh_versions WHERE version = 3") == []


async def test_composite_keys(pg_cluster: PgCluster, pg_db: str, db: Any) -> None:
    db.execute(
        "CREATE TABLE lines (order_id smallint, product_id smallint, qty int, "
        "PRIMARY KEY (order_id, product_id))"
    )
    cfg = config(pg_cluster, pg_db, table="lines", key=["order_id", "product_id"])
    async with PostgresSink(cfg) as sink:
        out = await sink.apply(
            [
                rec("[10248,11]", 1, {"order_id": 10248, "product_id": 11, "qty": 12}),
                rec("[10248,42]", 1, {"qty": 10}),  # key columns from the key
                rec("[10249,14]", 1, {"order_id": 10249, "product_id": 14, "qty": 9}),
                rec("[10248]", 1, deleted=True),
            ]
        )
        assert out[:3] == [Applied.APPLIED] * 3
        assert isinstance(out[3], RejectedRecord)
        assert "JSON array of 2" in str(out[3])
        assert await sink.apply([rec("[10249,14]", 2, deleted=True)]) == [Applied.APPLIED]
    assert rows(db, "SELECT * FROM lines ORDER BY 1, 2") == [(10248, 11, 12), (10248, 42, 10)]


async def test_create_table_from_the_first_row(pg_cluster: PgCluster, pg_db: str, db: Any) -> None:
    with pytest.raises(ConfigError, match="create_table"):
        await PostgresSink(config(pg_cluster, pg_db, table="made")).open()
    cfg = config(pg_cluster, pg_db, table="made", create_table=True)
    async with PostgresSink(cfg) as sink:
        row = {"id": 1, "name": "Ada", "score": 1.5, "ok": True, "tags": ["a"], "blob": None}
        assert (
            await sink.apply([rec("1", 1, row), rec("2", 1, {"id": 2, "name": "Bob"})])
            == [Applied.APPLIED] * 2
        )
        assert await sink.apply([rec("2", 2, {"id": 2, "score": 2.25})]) == [Applied.APPLIED]
    types = rows(
        db,
        "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
        "WHERE attrelid = 'made'::regclass AND attnum > 0 ORDER BY attnum",
    )
    assert types == [
        ("id", "bigint"), ("name", "text"), ("score", "double precision"), ("ok", "boolean"),
        ("tags", "jsonb"), ("blob", "text"),
    ]  # fmt: skip
    assert rows(db, "SELECT id, name, score FROM made ORDER BY id") == [(1, "Ada", 1.5), (2, "Bob", 2.25)]


async def test_a_cancelled_batch_rolls_back_and_the_sink_stays_usable(
    pg_cluster: PgCluster, pg_db: str, db: Any
) -> None:
    db.execute(CUSTOMERS)
    db.execute("INSERT INTO customers (id, name) VALUES (1, 'locked')")
    async with PostgresSink(config(pg_cluster, pg_db)) as sink:
        with pg_cluster.connect(pg_db) as other:
            other.execute("BEGIN")
            other.execute("SELECT * FROM customers WHERE id = 1 FOR UPDATE")
            with anyio.move_on_after(0.5) as scope:
                await sink.apply([rec("2", 1, {"id": 2, "name": "Bob"}), rec("1", 1, {"id": 1, "name": "x"})])
            assert scope.cancelled_caught
            other.execute("ROLLBACK")
        assert rows(db, "SELECT id FROM customers") == [(1,)]  # the insert of 2 was rolled back
        assert await sink.apply([rec("2", 1, {"id": 2, "name": "Bob"})]) == [Applied.APPLIED]


async def test_a_locked_row_times_out_as_unavailable(pg_cluster: PgCluster, pg_db: str, db: Any) -> None:
    db.execute(CUSTOMERS)
    db.execute("INSERT INTO customers (id, name) VALUES (1, 'locked')")
    async with PostgresSink(config(pg_cluster, pg_db, statement_timeout=0.3)) as sink:
        with pg_cluster.connect(pg_db) as other:
            other.execute("BEGIN")
            other.execute("SELECT * FROM customers WHERE id = 1 FOR UPDATE")
            with pytest.raises(SystemUnavailable, match="57014"):
                await sink.apply([rec("1", 1, {"id": 1, "name": "x"})])
            other.execute("ROLLBACK")
        assert await sink.apply([rec("1", 1, {"id": 1, "name": "x"})]) == [Applied.APPLIED]


async def test_ten_thousand_rows_in_one_apply(pg_cluster: PgCluster, pg_db: str, db: Any) -> None:
    db.execute(CUSTOMERS)
    batch = [
        rec(str(i), 1, {"id": i, "name": f"c{i}", "balance": f"{i}.25", "note": "x" * 40})
        for i in range(10_000)
    ]
    async with PostgresSink(config(pg_cluster, pg_db)) as sink:
        started = time.perf_counter()
        assert await sink.apply(batch) == [Applied.APPLIED] * 10_000
        inserted = time.perf_counter() - started
        again = [rec(r.key, 2, r.row) for r in batch]
        started = time.perf_counter()
        assert await sink.apply(again) == [Applied.UNCHANGED] * 10_000
        unchanged = time.perf_counter() - started
        changed = [rec(r.key, 3, {**r.row, "note": "y"}) for r in batch]
        started = time.perf_counter()
        assert await sink.apply(changed) == [Applied.APPLIED] * 10_000
        updated = time.perf_counter() - started
    print(
        f"\n10,000-record apply: insert {10_000 / inserted:,.0f}/s, unchanged {10_000 / unchanged:,.0f}/s, "
        f"update {10_000 / updated:,.0f}/s"
    )
    assert rows(db, "SELECT count(*), sum(balance), min(note), max(note) FROM customers") == [
        (10_000, Decimal("49997500.00"), "y", "y")
    ]


async def test_server_stop_is_unavailable_and_both_adapters_recover(pg_cluster: PgCluster) -> None:
    cluster = PgCluster()  # its own cluster: this test stops it
    try:
        cluster.init()
        cluster.start()
        with cluster.connect() as db:
            db.execute(CUSTOMERS)
            db.execute("CREATE TABLE target (LIKE customers INCLUDING ALL)")
        src_cfg = PostgresSourceConfig(
            dsn=cluster.dsn(), table="customers", key="id", install_triggers=True, snapshot=False,
            poll_interval=0.02,
            connect_timeout=1,
        )  # fmt: skip
        async with (
            PostgresSource(src_cfg) as source,
            PostgresSink(config(cluster, "postgres", table="target")) as sink,
        ):
            with cluster.connect() as db:
                db.execute("INSERT INTO customers (id, name) VALUES (1, 'Ada')")
            first = await source.read(None, 10)
            assert await sink.apply([rec("1", 1, first.changes[0].row)]) == [Applied.APPLIED]
            cluster.stop()
            with pytest.raises(SystemUnavailable):
                await source.read(first.cursor, 10)
            with pytest.raises(SystemUnavailable):  # reconnecting fails too while it is down
                await source.read(first.cursor, 10)
            with pytest.raises(SystemUnavailable):
                await sink.apply([rec("2", 1, {"id": 2, "name": "Bob"})])
            assert "disconnected" in repr(source)
            assert "disconnected" in repr(sink)
            cluster.start()
            with cluster.connect() as db:
                db.execute("INSERT INTO customers (id, name) VALUES (2, 'Bob')")
            again = await source.read(first.cursor, 10)  # the same cursor, a new connection
            assert [c.key for c in again.changes] == ["2"]
            assert await sink.apply([rec("2", 1, again.changes[0].row)]) == [Applied.APPLIED]
        with cluster.connect() as db:
            assert rows(db, "SELECT id, name FROM target ORDER BY id") == [(1, "Ada"), (2, "Bob")]
    finally:
        cluster.destroy()
