"""``meshctl capture install|remove|status`` for SQLite and PostgreSQL sources."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

from typer.testing import CliRunner

from mesh.cli import app
from tests._pg import PgCluster

runner = CliRunner()


def agent_toml(tmp: Path, dsn: str, sqlite_db: Path) -> Path:
    path = tmp / "agent.toml"
    path.write_text(
        f"""
[agent]
name = "erp-agent"
system = "erp"
state_dir = "state"
[[flows]]
name = "pg-customers"
entity = "customer"
[flows.source]
adapter = "postgres"
dsn = "{dsn}"
table = "customers"
key = "id"
[[flows]]
name = "lite-customers"
entity = "customer"
[flows.source]
adapter = "sqlite"
path = "{sqlite_db.name}"
table = "customers"
key = "id"
[[flows]]
name = "polled"
entity = "customer"
[flows.source]
adapter = "sqlite"
path = "{sqlite_db.name}"
table = "customers"
key = "id"
mode = "cursor"
cursor_column = "id"
"""
    )
    return path


def test_capture_install_status_remove(tmp_path: Path, pg_cluster: PgCluster, pg_db: str) -> None:
    with pg_cluster.connect(pg_db) as db:
        db.execute("CREATE TABLE customers (id int PRIMARY KEY, name text)")
    lite = tmp_path / "erp.db"
    with closing(sqlite3.connect(lite)) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    config = str(agent_toml(tmp_path, pg_cluster.dsn(pg_db), lite))

    result = runner.invoke(app, ["capture", "status", "--config", config])
    assert result.exit_code == 1, result.output
    assert "pg-customers: postgres://127.0.0.1:" in result.output
    assert result.output.count("not installed") == 2
    assert "polled" not in result.output

    result = runner.invoke(app, ["capture", "install", "--config", config])
    assert result.exit_code == 0, result.output
    assert result.output.count("installed (or updated)") == 2
    result = runner.invoke(app, ["capture", "install", "--config", config, "--flow", "pg-customers"])
    assert result.output.strip().endswith("already installed and up to date")

    with pg_cluster.connect(pg_db) as db:
        db.execute("INSERT INTO customers VALUES (1, 'a'), (2, 'b')")
    with closing(sqlite3.connect(lite)) as conn, conn:
        conn.execute("INSERT INTO customers VALUES (1, 'a')")
    result = runner.invoke(app, ["capture", "status", "--config", config])
    assert result.exit_code == 0, result.output
    assert "pg-customers" in result.output
    assert "installed, up to date; 2 changes waiting in public._mesh_changes_customers" in result.output
    assert "lite-customers" in result.output
    assert "installed, up to date; 1 change waiting in _mesh_changes_customers" in result.output

    with pg_cluster.connect(pg_db) as db:
        db.execute("ALTER TABLE customers ADD COLUMN credit numeric")  # needs a mapping the function lacks
    result = runner.invoke(app, ["capture", "status", "--config", config, "--flow", "pg-customers"])
    assert result.exit_code == 1
    assert "OUT OF DATE" in result.output

    result = runner.invoke(app, ["capture", "remove", "--config", config, "--keep-changes"])
    assert result.exit_code == 0
    assert result.output.count(": removed") == 2
    with pg_cluster.connect(pg_db) as db:
        assert db.execute("SELECT count(*) FROM _mesh_changes_customers").fetchone() == (2,)
        assert db.execute("SELECT count(*) FROM pg_trigger WHERE tgname LIKE '_mesh%'").fetchone() == (0,)
    result = runner.invoke(app, ["capture", "remove", "--config", config, "--flow", "pg-customers"])
    assert result.output.strip().endswith("removed")  # the kept change table goes now
    result = runner.invoke(app, ["capture", "remove", "--config", config, "--flow", "pg-customers"])
    assert result.output.strip().endswith("nothing installed")


def test_capture_errors_are_one_line(tmp_path: Path, pg_cluster: PgCluster, pg_db: str) -> None:
    lite = tmp_path / "erp.db"
    config = str(agent_toml(tmp_path, pg_cluster.dsn(pg_db), lite))
    result = runner.invoke(app, ["capture", "install", "--config", config, "--flow", "nope"])
    assert result.exit_code == 2
    assert "no flow named 'nope'" in result.output
    result = runner.invoke(app, ["capture", "install", "--config", config, "--flow", "polled"])
    assert result.exit_code == 2
    assert "cursor mode" in result.output
    result = runner.invoke(app, ["capture", "install", "--config", config])
    assert result.exit_code == 2
    assert "pg-customers: postgres://" in result.output
    assert "table public.customers does not exist" in result.output
    assert "lite-customers: sqlite" in result.output
    assert "does not exist" in result.output
    assert "Traceback" not in result.output
