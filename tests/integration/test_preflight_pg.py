"""``meshctl config check --connect`` against a real PostgreSQL cluster: wrong DSN, wrong
password, missing table, key column, capture and mapped column, each at its config path."""

from __future__ import annotations

import itertools
from pathlib import Path

from typer.testing import CliRunner

from mesh.broker import free_port
from mesh.cli import app
from tests._pg import PASSWORD, PASSWORD_ROLE, PgCluster

runner = CliRunner()
_n = itertools.count()

HEAD = '[agent]\nname = "erp-agent"\nsystem = "erp"\nstate_dir = "state"\n'


def source(dsn: str, table: str = "orders", key: str = "order_id", extra: str = "") -> str:
    return f"""
[[flows]]
name = "orders{next(_n)}"
entity = "sales_order"
[flows.source]
adapter = "postgres"
dsn = "{dsn}"
table = "{table}"
key = "{key}"
{extra}
"""


def sink(dsn: str, table: str = "customers", key: str = "id") -> str:
    return f"""
[[flows]]
name = "customers{next(_n)}"
entity = "customer"
[flows.sink]
adapter = "postgres"
dsn = "{dsn}"
table = "{table}"
key = "{key}"
[flows.from_canonical.fields]
id = "id"
name = "name"
vat = "tax_number"
"""


def run_check(tmp: Path, body: str, env: dict[str, str] | None = None) -> tuple[int, list[str], str]:
    config = tmp / "agent.toml"
    config.write_text(HEAD + body)
    result = runner.invoke(app, ["config", "check", "--connect", str(config)], env=env)
    prefix = f"{config}: "
    lines = [
        line.removeprefix(prefix) for line in result.output.splitlines() if line.startswith(prefix + "flows[")
    ]
    return result.exit_code, lines, result.output


def schema(pg_cluster: PgCluster, db: str) -> None:
    with pg_cluster.connect(db) as conn:
        conn.execute("CREATE TABLE orders (order_id int PRIMARY KEY, customer text)")
        conn.execute("CREATE TABLE customers (id text PRIMARY KEY, name text)")


def test_a_reachable_postgres_config_passes(tmp_path: Path, pg_cluster: PgCluster, pg_db: str) -> None:
    schema(pg_cluster, pg_db)
    with pg_cluster.connect(pg_db) as conn:
        conn.execute("ALTER TABLE customers ADD COLUMN vat text")
    dsn = pg_cluster.dsn(pg_db, user=PASSWORD_ROLE)
    body = source(dsn, extra='password_env = "PG_PW"\ninstall_triggers = true') + sink(pg_cluster.dsn(pg_db))
    code, lines, out = run_check(tmp_path, body, env={"PG_PW": PASSWORD})
    assert (code, lines) == (0, []), out
    assert "ok, every source and sink reached" in out


def test_every_postgres_problem_is_listed_with_its_path(
    tmp_path: Path, pg_cluster: PgCluster, pg_db: str
) -> None:
    schema(pg_cluster, pg_db)
    good = pg_cluster.dsn(pg_db)
    where = f"postgres://127.0.0.1:{pg_cluster.port}/{pg_db}"
    dead = f"host=127.0.0.1 port={free_port()} dbname={pg_db} user=postgres"
    body = (
        source(dead, extra="connect_timeout = 2")  # flows[0]: nothing listens
        + source(f"host=127.0.0.1 port={pg_cluster.port} dbname=nosuchdb user=postgres")  # flows[1]
        + source(pg_cluster.dsn(pg_db, user=PASSWORD_ROLE), extra='password_env = "PG_PW"')  # flows[2]
        + source(good, table="ordrs")  # flows[3]: no such table
        + source(good, key="id")  # flows[4]: no such key column
        + source(good)  # flows[5]: capture not installed
        + sink(good)  # flows[6]: column vat missing
        + sink(good, table="custs")  # flows[7]: no such table
    )
    code, lines, out = run_check(tmp_path, body, env={"PG_PW": "wrong-password"})
    assert code == 1, out
    by_path = {line.split(": ", 1)[0]: line.split(": ", 1)[1] for line in lines}
    assert list(by_path) == [
        "flows[0].source.dsn",
        "flows[1].source.dsn",
        "flows[2].source.password_env",
        "flows[3].source.table",
        "flows[4].source.key",
        "flows[5].source.mode",
        "flows[6].sink.table",
        "flows[7].sink.table",
    ], out
    assert by_path["flows[0].source.dsn"].startswith("cannot reach postgres://127.0.0.1:")
    assert 'database "nosuchdb" does not exist' in by_path["flows[1].source.dsn"]
    assert "password authentication failed" in by_path["flows[2].source.password_env"]
    assert "wrong-password" not in out
    assert by_path["flows[3].source.table"] == f'table "public.ordrs" not found in {where}'
    assert by_path["flows[4].source.key"] == f'column "id" not found in table "public.orders" ({where})'
    assert by_path["flows[5].source.mode"].startswith(
        f'change capture is not installed on "public.orders" ({where})'
    )
    assert by_path["flows[6].sink.table"] == (
        f'column "vat" (written by the mapping) not found in table "public.customers" ({where})'
    )
    assert by_path["flows[7].sink.table"] == f'table "public.custs" not found in {where}'


def test_a_role_without_write_privileges_is_reported(
    tmp_path: Path, pg_cluster: PgCluster, pg_db: str
) -> None:
    schema(pg_cluster, pg_db)
    with pg_cluster.connect(pg_db) as conn:
        conn.execute("ALTER TABLE customers ADD COLUMN vat text")
        conn.execute("DROP ROLE IF EXISTS mesh_reader")
        conn.execute("CREATE ROLE mesh_reader LOGIN")
        conn.execute("GRANT SELECT ON customers TO mesh_reader")
    try:
        code, lines, out = run_check(tmp_path, sink(pg_cluster.dsn(pg_db, user="mesh_reader")))
        where = f"postgres://127.0.0.1:{pg_cluster.port}/{pg_db}"
        assert code == 1, out
        lacks = 'lacks INSERT, UPDATE, DELETE on table "public.customers"'
        assert lines == [f"flows[0].sink.table: role mesh_reader {lacks} ({where})"]
    finally:
        with pg_cluster.connect(pg_db) as conn:
            conn.execute("DROP OWNED BY mesh_reader")
            conn.execute("DROP ROLE mesh_reader")


def test_install_triggers_needs_the_table_owner(tmp_path: Path, pg_cluster: PgCluster, pg_db: str) -> None:
    schema(pg_cluster, pg_db)
    with pg_cluster.connect(pg_db) as conn:
        conn.execute("DROP ROLE IF EXISTS mesh_capturer")
        conn.execute("CREATE ROLE mesh_capturer LOGIN")
        conn.execute("GRANT SELECT ON orders TO mesh_capturer")
    where = f"postgres://127.0.0.1:{pg_cluster.port}/{pg_db}"
    try:
        as_reader = source(pg_cluster.dsn(pg_db, user="mesh_capturer"), extra="install_triggers = true")
        code, lines, out = run_check(tmp_path, as_reader)
        assert code == 1, out
        assert [line.split(": ", 1)[0] for line in lines] == ["flows[0].source.install_triggers",
                                                               "flows[0].source.schema"], out  # fmt: skip
        assert lines[0].endswith(
            f'role mesh_capturer does not own "public.orders" ({where}) and cannot create its capture '
            "triggers: install them as the owner (`meshctl capture install`) and set install_triggers = false"
        )
        assert (
            lines[1]
            == f'flows[0].source.schema: role mesh_capturer lacks CREATE on schema "public" ({where})'
        )
        # the owner may: no problem
        code, lines, out = run_check(tmp_path, source(pg_cluster.dsn(pg_db), extra="install_triggers = true"))
        assert (code, lines) == (0, []), out
    finally:
        with pg_cluster.connect(pg_db) as conn:
            conn.execute("DROP OWNED BY mesh_capturer")
            conn.execute("DROP ROLE mesh_capturer")
