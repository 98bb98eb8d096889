"""PostgreSQL source against a real PostgreSQL 15 cluster (tests/_pg.py starts it)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import anyio
import msgspec
import psycopg
import pytest

from adapters.sql.config import PostgresSinkConfig, PostgresSourceConfig
from adapters.sql.postgres import (
    PostgresSink,
    PostgresSource,
    change_capture_status,
    install_change_capture,
    remove_change_capture,
)
from mesh.adapters import Applied, Change, SinkRecord
from mesh.config import parse_agent_config
from mesh.errors import ConfigError
from tests._pg import PASSWORD, PASSWORD_ROLE, PgCluster

pytestmark = pytest.mark.anyio

ORDER_LINES = (
    "CREATE TABLE order_lines (order_id int, line smallint, product text NOT NULL, "
    "qty numeric(12,3) NOT NULL DEFAULT 1, PRIMARY KEY (order_id, line))"
)


@pytest.fixture
def db(pg_cluster: PgCluster, pg_db: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to the test's own database."""
    with pg_cluster.connect(pg_db) as conn:
        yield conn


def config(cluster: PgCluster, dbname: str, **kw: Any) -> PostgresSourceConfig:
    kw.setdefault("table", "order_lines")
    kw.setdefault("key", ["order_id", "line"])
    kw.setdefault("install_triggers", True)
    kw.setdefault("poll_interval", 0.02)
    return PostgresSourceConfig(dsn=cluster.dsn(dbname), **kw)


async def drain(
    source: PostgresSource, cursor: str | None, expect: int, limit: int = 100
) -> tuple[list[Change], str | None]:
    """Read (committing as the agent does) until ``expect`` changes came, then a moment more so
    that an unexpected extra one shows; every change and the last cursor."""
    changes: list[Change] = []

    async def one() -> None:
        nonlocal cursor
        batch = await source.read(cursor, limit)
        changes.extend(batch.changes)
        cursor = batch.cursor
        await source.committed(cursor)

    with anyio.fail_after(20):
        while len(changes) < expect:
            await one()
    with anyio.move_on_after(0.2):
        while True:
            await one()
    return changes, cursor


def summary(changes: list[Change]) -> list[tuple[str, bool, Any]]:
    return [(c.key, c.deleted, c.row.get("product")) for c in changes]


async def test_changes_of_a_composite_key_table_in_order(pg_cluster: PgCluster, pg_db: str, db: Any) -> None:
    db.execute(ORDER_LINES)
    async with PostgresSource(config(pg_cluster, pg_db, snapshot=False)) as source:
        db.execute("INSERT INTO order_lines VALUES (1, 1, 'apple', 2), (1, 2, 'pear', 1)")
        db.execute("UPDATE order_lines SET qty = 3 WHERE order_id = 1 AND line = 1")
        db.execute("UPDATE order_lines SET line = 3 WHERE line = 2")  # key change
        db.execute("DELETE FROM order_lines WHERE line = 1")
        db.execute("INSERT INTO order_lines VALUES (2, 1, 'plum')")
        db.execute("TRUNCATE order_lines")
        changes, _ = await drain(source, None, 9)
    assert summary(changes[:7]) == [
        ("[1,1]", False, "apple"),
        ("[1,2]", False, "pear"),
        ("[1,1]", False, "apple"),
        ("[1,2]", True, "pear"),  # the key change: delete of the old key, then the new key
        ("[1,3]", False, "pear"),
        ("[1,1]", True, "apple"),
        ("[2,1]", False, "plum"),
    ]
    assert sorted(summary(changes[7:])) == [("[1,3]", True, "pear"), ("[2,1]", True, "plum")]  # TRUNCATE
    assert changes[2].row["qty"] == "3.000"
    versions = [c.version for c in changes]
    assert versions == sorted(versions)
    assert len(set(versions)) == len(versions)
    # versions start at the install time in microseconds
    now_us = int(datetime.now(UTC).timestamp() * 1_000_000)
    assert now_us - 600_000_000 < versions[0] < now_us
    assert all(c.occurred_at > 0 for c in changes)


async def test_single_column_key_is_plain_text_and_key_field_adds_the_key(
    pg_cluster: PgCluster, pg_db: str, db: Any
) -> None:
    db.execute("CREATE TABLE customers (id varchar(5) PRIMARY KEY, name text)")
    db.execute("CREATE TABLE lines (a int, b text, PRIMARY KEY (a, b))")
    db.execute("INSERT INTO customers VALUES ('ALFKI', 'Alfreds')")
    db.execute("INSERT INTO lines VALUES (7, 'x y')")
    cfg = config(pg_cluster, pg_db, table="customers", key="id")
    async with PostgresSource(cfg) as source:
        (change,) = (await source.read(None, 10)).changes
    assert (change.key, change.row) == ("ALFKI", {"id": "ALFKI", "name": "Alfreds"})
    cfg = config(pg_cluster, pg_db, table="lines", key=["a", "b"], key_field="line_key")
    async with PostgresSource(cfg) as source:
        (change,) = (await source.read(None, 10)).changes
    assert change.key == '[7,"x y"]'
    assert change.row == {"a": 7, "b": "x y", "line_key": '[7,"x y"]'}


EXACT = """
CREATE TABLE exact (
    id bigint PRIMARY KEY,
    amount numeric(30,10), nan numeric, price money, f4 real, f8 double precision, f8_nan double precision,
    at_tz timestamptz, at timestamp(6), day date, span interval, data bytea, doc jsonb, tags int[],
    flag boolean, uid uuid, note text
)
"""
EXACT_ROW = """
INSERT INTO exact VALUES (1, 12345678901234567890.0123456789, 'NaN', 1234.56, 9.80000019,
    0.30000000000000004, 'Infinity', '2024-02-29 13:45:00.123456+02', '2024-02-29 13:45:00.5', '2024-02-29',
    '1 day 2 hours 3.5 seconds', '\\x00ff10', '{"a": [1, 2.5, "x"]}', '{1,2,3}', true,
    'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'Grüße ''quoted'' \\ back')
"""
EXACT_JSON = {
    "id": 1,
    "amount": "12345678901234567890.0123456789",
    "nan": "NaN",
    "price": "1234.56",
    "f4": 9.8,
    "f8": 0.30000000000000004,
    "f8_nan": "Infinity",
    "at_tz": "2024-02-29T11:45:00.123456+00:00",
    "at": "2024-02-29T13:45:00.5",
    "day": "2024-02-29",
    "span": "P1DT2H3.5S",
    "data": "00FF10",
    "doc": {"a": [1, 2.5, "x"]},
    "tags": [1, 2, 3],
    "flag": True,
    "uid": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
    "note": "Grüße 'quoted' \\ back",
}


async def test_values_survive_exactly_in_snapshot_and_changes(
    pg_cluster: PgCluster, pg_db: str, db: Any
) -> None:
    db.execute(EXACT)
    # the writer's own session settings must not change what is captured
    db.execute(
        "SET TimeZone = 'America/New_York'; SET extra_float_digits = 0; SET IntervalStyle = 'sql_standard'"
    )
    db.execute(EXACT_ROW)
    async with PostgresSource(config(pg_cluster, pg_db, table="exact", key="id")) as source:
        snap = await source.read(None, 10)
        db.execute("UPDATE exact SET note = note WHERE id = 1")
        update = await source.read(snap.cursor, 10)
    assert snap.changes[0].row == EXACT_JSON
    assert update.changes[0].row == EXACT_JSON
    f8 = update.changes[0].row["f8"]
    assert isinstance(f8, float)
    assert f8 == 0.1 + 0.2


async def test_values_round_trip_exactly_through_the_sink(pg_cluster: PgCluster, pg_db: str, db: Any) -> None:
    db.execute(EXACT)
    db.execute(EXACT_ROW)
    db.execute("CREATE TABLE exact_copy (LIKE exact INCLUDING ALL)")
    async with PostgresSource(config(pg_cluster, pg_db, table="exact", key="id")) as source:
        (change,) = (await source.read(None, 10)).changes
    sink_cfg = PostgresSinkConfig(dsn=pg_cluster.dsn(pg_db), table="exact_copy", key="id")
    record = SinkRecord(
        id="x", key=change.key, version=change.version, deleted=False, row=change.row, origin="erp"
    )
    async with PostgresSink(sink_cfg) as sink:
        assert await sink.apply([record]) == [Applied.APPLIED]
        again = msgspec.structs.replace(record, version=record.version + 1)
        assert await sink.apply([again]) == [Applied.UNCHANGED]  # every value compares equal
    original = db.execute("SELECT e::text FROM exact AS e").fetchone()
    copy = db.execute("SELECT c::text FROM exact_copy AS c").fetchone()
    assert original == copy


async def test_a_transaction_that_commits_late_is_not_skipped(
    pg_cluster: PgCluster, pg_db: str, db: Any
) -> None:
    db.execute(ORDER_LINES)
    async with PostgresSource(config(pg_cluster, pg_db, snapshot=False)) as source:
        with pg_cluster.connect(pg_db) as slow:
            slow.execute("BEGIN")
            slow.execute("INSERT INTO order_lines VALUES (1, 1, 'early seq, late commit')")
            db.execute("INSERT INTO order_lines VALUES (2, 1, 'later seq, early commit')")
            first = await source.read(None, 10)
            assert [c.key for c in first.changes] == ["[2,1]"]
            await source.committed(first.cursor)
            slow.execute("COMMIT")
        late = await source.read(first.cursor, 10)
    assert [c.key for c in late.changes] == ["[1,1]"]
    assert late.changes[0].version < first.changes[0].version  # drawn first, still delivered


async def test_pages_of_one_window_and_pruning(pg_cluster: PgCluster, pg_db: str, db: Any) -> None:
    db.execute(ORDER_LINES)
    cfg = config(pg_cluster, pg_db, snapshot=False)
    async with PostgresSource(cfg) as source:
        db.execute("INSERT INTO order_lines SELECT 1, g, 'p' || g FROM generate_series(1, 7) AS g")
        first = await source.read(None, 3)
        await source.committed(first.cursor)
        assert db.execute("SELECT count(*) FROM _mesh_changes_order_lines").fetchone() == (4,)
        db.execute("INSERT INTO order_lines VALUES (2, 1, 'after')")
        rest, cursor = await drain(source, first.cursor, 5, limit=3)
        assert [c.key for c in first.changes + rest] == [f"[1,{i}]" for i in range(1, 8)] + ["[2,1]"]
        assert db.execute("SELECT count(*) FROM _mesh_changes_order_lines").fetchone() == (0,)
        status = await change_capture_status(cfg)
        assert (status.installed, status.up_to_date, status.pending) == (True, True, 0)
    # a reopened source from the stored cursor sees only what came after it
    async with PostgresSource(cfg) as source:
        db.execute("UPDATE order_lines SET product = 'x' WHERE order_id = 2")
        again = await source.read(cursor, 10)
    assert [(c.key, c.row["product"]) for c in again.changes] == [("[2,1]", "x")]


async def test_snapshot_resumes_after_a_crash_and_keeps_changes_made_meanwhile(
    pg_cluster: PgCluster, pg_db: str, db: Any
) -> None:
    db.execute(ORDER_LINES)
    db.execute("INSERT INTO order_lines SELECT g / 10, g % 10, 'p' || g FROM generate_series(10, 34) AS g")
    cfg = config(pg_cluster, pg_db, snapshot_chunk=10)
    model: dict[str, tuple[int, dict[str, Any] | None]] = {}  # key -> (version, row or None)

    def apply(changes: list[Change]) -> None:  # what a sink with a version guard ends up with
        for c in changes:
            if c.key not in model or model[c.key][0] < c.version:
                model[c.key] = (c.version, None if c.deleted else c.row)

    async with PostgresSource(cfg) as source:
        first = await source.read(None, 100)
    assert len(first.changes) == 10
    apply(first.changes)
    # changes while the snapshot runs: one row already sent, one not yet, a delete, an insert
    db.execute("UPDATE order_lines SET product = 'sent, then changed' WHERE order_id = 1 AND line = 5")
    db.execute("UPDATE order_lines SET product = 'changed before sent' WHERE order_id = 3 AND line = 2")
    db.execute("DELETE FROM order_lines WHERE order_id = 2 AND line = 7")
    db.execute("INSERT INTO order_lines VALUES (9, 9, 'inserted')")
    # "crash": a new source resumes from the stored cursor
    async with PostgresSource(cfg) as source:
        rest, cursor = await drain(source, first.cursor, 19)
        snapshot_rest = [c for c in rest if c.version == first.changes[0].version]
        assert next(c.key for c in snapshot_rest) == "[2,0]"  # resumed, not restarted
        assert len(snapshot_rest) == 15  # 25 rows - 10 sent - 1 deleted + 1 inserted
        assert all(c.version > first.changes[0].version for c in rest if c not in snapshot_rest)
        apply(rest)
        db.execute("UPDATE order_lines SET qty = 7 WHERE order_id = 9")
        late, _ = await drain(source, cursor, 1)
        apply(late)
    table = {
        f"[{o},{line}]": product
        for o, line, product in db.execute("SELECT order_id, line, product FROM order_lines").fetchall()
    }
    assert {k: r["product"] for k, (_, r) in model.items() if r is not None} == table
    assert model["[9,9]"][1] is not None
    assert model["[9,9]"][1]["qty"] == "7.000"


async def test_read_blocks_until_a_change_and_is_cancellable(
    pg_cluster: PgCluster, pg_db: str, db: Any
) -> None:
    db.execute(ORDER_LINES)
    async with PostgresSource(config(pg_cluster, pg_db)) as source:
        with anyio.move_on_after(0.3) as scope:
            await source.read(None, 10)
        assert scope.cancelled_caught
        got: list[str] = []

        async def reader() -> None:
            got.extend(c.key for c in (await source.read(None, 10)).changes)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(reader)
                await anyio.sleep(0.2)
                assert got == []
                db.execute("INSERT INTO order_lines VALUES (5, 1, 'late')")
        assert got == ["[5,1]"]


async def test_cursor_mode_pages_across_equal_cursor_values(
    pg_cluster: PgCluster, pg_db: str, db: Any
) -> None:
    db.execute(
        "CREATE TABLE invoices (region text, no int, changed timestamptz NOT NULL, total numeric, "
        "PRIMARY KEY (region, no))"
    )
    db.execute(
        "INSERT INTO invoices SELECT CASE WHEN g % 2 = 0 THEN 'EU' ELSE 'US' END, g, "
        "'2024-01-01 00:00:00+00'::timestamptz + (g / 4) * interval '1 second', g * 1.5 "
        "FROM generate_series(1, 10) AS g"
    )
    cfg = config(
        pg_cluster, pg_db, table="invoices", key=["region", "no"], mode="cursor", cursor_column="changed"
    )
    async with PostgresSource(cfg) as source:
        seen, cursor = await drain(source, None, 10, limit=3)
        assert sorted(c.row["no"] for c in seen) == list(range(1, 11))  # none lost, none twice
        first = seen[0]
        assert first.version == int(datetime(2024, 1, 1, tzinfo=UTC).timestamp() * 1_000_000)
        assert first.occurred_at == first.version // 1000
        db.execute("UPDATE invoices SET changed = '2024-01-02 00:00:00+00', total = 0 WHERE no IN (3, 4)")
        again, _ = await drain(source, cursor, 2, limit=3)
    assert [(c.key, c.row["total"]) for c in again] == [('["EU",4]', "0"), ('["US",3]', "0")]


async def test_compound_cursor_columns_and_integer_versions(
    pg_cluster: PgCluster, pg_db: str, db: Any
) -> None:
    db.execute(
        "CREATE TABLE t (id int PRIMARY KEY, batch int NOT NULL, pos int NOT NULL, rev bigint NOT NULL)"
    )
    db.execute("INSERT INTO t SELECT g, g % 3, g % 2, 100 + g FROM generate_series(1, 9) AS g")
    cfg = config(
        pg_cluster,
        pg_db,
        table="t",
        key="id",
        mode="cursor",
        cursor_column=["batch", "pos"],
        version_column="rev",
    )
    async with PostgresSource(cfg) as source:
        seen, _ = await drain(source, None, 9, limit=2)
    assert [c.key for c in seen] == ["6", "3", "9", "4", "1", "7", "2", "8", "5"]  # (batch, pos, id)
    assert [c.version for c in seen] == [100 + int(c.key) for c in seen]


async def test_capture_must_be_installed_and_follows_schema_changes(
    pg_cluster: PgCluster, pg_db: str, db: Any
) -> None:
    db.execute(ORDER_LINES)
    cfg = config(pg_cluster, pg_db, install_triggers=False, snapshot=False)
    with pytest.raises(ConfigError, match=r"not installed .*meshctl capture install"):
        await PostgresSource(cfg).open()
    assert await install_change_capture(cfg) is True
    assert await install_change_capture(cfg) is False  # idempotent
    db.execute("INSERT INTO order_lines VALUES (1, 1, 'before the change')")
    db.execute("ALTER TABLE order_lines ADD COLUMN price numeric")
    assert not (await change_capture_status(cfg)).up_to_date
    with pytest.raises(ConfigError, match="out of date"):
        await PostgresSource(cfg).open()
    async with PostgresSource(msgspec.structs.replace(cfg, install_triggers=True)) as source:
        db.execute("INSERT INTO order_lines VALUES (1, 2, 'after', 1, 2.50)")
        changes, _ = await drain(source, None, 2)
    # the pending change survived the re-install; the new column is mapped exactly
    assert [(c.key, c.row.get("price")) for c in changes] == [("[1,1]", None), ("[1,2]", "2.50")]


async def test_versions_keep_growing_after_remove_and_reinstall(
    pg_cluster: PgCluster, pg_db: str, db: Any
) -> None:
    db.execute(ORDER_LINES)
    cfg = config(pg_cluster, pg_db, snapshot=False)
    async with PostgresSource(cfg) as source:
        db.execute("INSERT INTO order_lines VALUES (1, 1, 'a')")
        (before,) = (await source.read(None, 10)).changes
    assert await remove_change_capture(cfg) is True
    assert await remove_change_capture(cfg) is False
    assert db.execute("SELECT to_regclass('_mesh_changes_order_lines')").fetchone() == (None,)
    db.execute("UPDATE order_lines SET product = 'not captured'")
    async with PostgresSource(cfg) as source:  # installs again
        db.execute("UPDATE order_lines SET product = 'b'")
        (after,) = (await source.read(None, 10)).changes
    assert after.version > before.version
    async with PostgresSource(msgspec.structs.replace(cfg, snapshot=True)) as source:
        snap = (await source.read(None, 10)).changes
    assert snap[0].version > before.version  # a new snapshot also outranks the old install


async def test_config_errors(pg_cluster: PgCluster, pg_db: str, db: Any) -> None:
    db.execute("CREATE TABLE nokey (id int, name text)")
    with pytest.raises(ConfigError, match="does not exist"):
        await PostgresSource(config(pg_cluster, pg_db, table="missing", key="id")).open()
    with pytest.raises(ConfigError, match="primary key nor a UNIQUE"):
        await PostgresSource(config(pg_cluster, pg_db, table="nokey", key="id")).open()
    with pytest.raises(ConfigError, match="no column 'nope'"):
        await PostgresSource(config(pg_cluster, pg_db, table="nokey", key="nope")).open()
    # libpq's own parser checks the DSN when the config is built, long before a connection.
    refused = r'not a valid libpq connection string \(invalid connection option "colour"'
    with pytest.raises(ValueError, match=refused):
        PostgresSourceConfig(dsn="host=127.0.0.1 colour=red", table="t", key="id")
    with pytest.raises(ConfigError, match='database "nope" does not exist'):
        await PostgresSource(PostgresSourceConfig(dsn=pg_cluster.dsn("nope"), table="t", key="id")).open()
    with pytest.raises(ConfigError, match="password"):
        parse_agent_config(
            """
[agent]
name = "a"
system = "erp"
state_dir = "/tmp/x"
[[flows]]
name = "f"
entity = "customer"
[flows.source]
adapter = "postgres"
dsn = "postgresql://mesh:hunter2@db/erp"
table = "customers"
key = "id"
""",
            source="agent.toml",
        )


async def test_password_from_the_environment(
    pg_cluster: PgCluster, pg_db: str, db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    db.execute(ORDER_LINES)
    db.execute("INSERT INTO order_lines VALUES (1, 1, 'x')")
    cfg = config(pg_cluster, pg_db, password_env="MESH_TEST_PG_PASSWORD")
    cfg = msgspec.structs.replace(cfg, dsn=pg_cluster.dsn(pg_db, user=PASSWORD_ROLE))
    with pytest.raises(ConfigError, match="MESH_TEST_PG_PASSWORD"):
        await PostgresSource(cfg).open()
    monkeypatch.setenv("MESH_TEST_PG_PASSWORD", "wrong")
    with pytest.raises(ConfigError, match="password authentication failed"):
        await PostgresSource(cfg).open()
    monkeypatch.setenv("MESH_TEST_PG_PASSWORD", PASSWORD)
    async with PostgresSource(cfg) as source:
        assert [c.key for c in (await source.read(None, 10)).changes] == ["[1,1]"]
    assert PASSWORD not in repr(cfg)
