"""``meshctl config check --connect`` on SQLite sources and sinks (real SQLite files, in process):
every problem listed with its config path, exit 1 when any, 2 when the config itself is invalid."""

from __future__ import annotations

import itertools
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mesh.config import load_agent_config
from mesh.preflight import mapped_columns

runner = CliRunner()
_n = itertools.count()


def make_db(path: Path, *statements: str) -> None:
    with closing(sqlite3.connect(path)) as db:
        for statement in statements:
            db.execute(statement)
        db.commit()


def agent_toml(tmp: Path, body: str) -> Path:
    path = tmp / "agent.toml"
    path.write_text('[agent]\nname = "erp-agent"\nsystem = "erp"\nstate_dir = "state"\n' + body)
    return path


SOURCE = """
[[flows]]
name = "customers{n}"
entity = "customer"
[flows.source]
adapter = "sqlite"
path = "{db}"
table = "{table}"
key = "{key}"
install_triggers = false
"""

SINK = """
[[flows]]
name = "customers-out{n}"
entity = "customer"
[flows.sink]
adapter = "sqlite"
path = "{db}"
table = "{table}"
key = "{key}"
[flows.from_canonical.fields]
id = "id"
name = "name"
"address.city" = "name"
"""


def check(config: Path) -> tuple[int, str]:
    from mesh.cli import app

    result = runner.invoke(app, ["config", "check", "--connect", str(config)])
    return result.exit_code, result.output


def test_a_reachable_config_passes(tmp_path: Path) -> None:
    from adapters.sql._sqlite_capture import install_change_capture

    make_db(tmp_path / "erp.db", "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, address TEXT)")
    import anyio

    anyio.run(lambda: install_change_capture(tmp_path / "erp.db", "customers", key="id"))
    config = agent_toml(
        tmp_path,
        SOURCE.format(n=next(_n), db="erp.db", table="customers", key="id")
        + SINK.format(n=next(_n), db="erp.db", table="customers", key="id"),
    )
    code, out = check(config)
    assert code == 0, out
    assert "ok, every source and sink reached (agent erp-agent, 2 flow(s))" in out
    assert "problem" not in out


def test_every_problem_is_listed_with_its_config_path(tmp_path: Path) -> None:
    make_db(
        tmp_path / "erp.db",
        "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)",
        "CREATE TABLE loose (id INTEGER, name TEXT)",  # no unique key: not a sink key
    )
    config = agent_toml(
        tmp_path,
        SOURCE.format(n=next(_n), db="missing.db", table="customers", key="id")  # flows[0]: no such file
        + SOURCE.format(n=next(_n), db="erp.db", table="custs", key="id")  # flows[1]: no such table
        + SOURCE.format(n=next(_n), db="erp.db", table="customers", key="cust_id")  # flows[2]: no key column
        + SOURCE.format(
            n=next(_n), db="erp.db", table="customers", key="id"
        )  # flows[3]: capture not installed
        + SINK.format(
            n=next(_n), db="erp.db", table="customers", key="id"
        )  # flows[4]: column address missing
        + SINK.format(n=next(_n), db="erp.db", table="loose", key="id"),  # flows[5]: key not unique
    )
    code, out = check(config)
    assert code == 1, out
    lines = [line for line in out.splitlines() if line.startswith(f"{config}: flows[")]
    missing = tmp_path / "missing.db"
    erp = tmp_path / "erp.db"
    assert lines == [
        f"{config}: flows[0].source.path: SQLite database file {missing} does not exist",
        f'{config}: flows[1].source.table: table "custs" not found in sqlite {erp}',
        f'{config}: flows[2].source.key: column "cust_id" not found in table "customers" (sqlite {erp})',
        f'{config}: flows[3].source.mode: change capture is not installed on "customers" (sqlite {erp}): '
        "run `meshctl capture install -c CONFIG`, or set install_triggers = true",
        f'{config}: flows[4].sink.table: column "address" (written by the mapping) not found in table '
        f'"customers" (sqlite {erp})',
        f'{config}: flows[5].sink.key: column "id" is neither the primary key of "loose" nor UNIQUE '
        f"(sqlite {erp})",
        f'{config}: flows[5].sink.table: column "address" (written by the mapping) not found in table '
        f'"loose" (sqlite {erp})',
    ]
    assert f"{config}: 7 problem(s) found by --connect (agent erp-agent, 6 flow(s))" in out


def test_an_invalid_config_exits_2_before_connecting(tmp_path: Path) -> None:
    config = agent_toml(
        tmp_path, SOURCE.format(n=next(_n), db="erp.db", table="customers", key="id") + "colour = 1\n"
    )
    code, out = check(config)
    assert code == 2
    assert "colour" in out


def test_without_connect_nothing_is_reached(tmp_path: Path) -> None:
    from mesh.cli import app

    config = agent_toml(tmp_path, SOURCE.format(n=next(_n), db="missing.db", table="customers", key="id"))
    result = runner.invoke(app, ["config", "check", str(config)])
    assert result.exit_code == 0
    assert "ok (agent erp-agent, 1 flow(s))" in result.output


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"id": "id", "address.city": "name", "tax": "tax_number", "address.zip": "name"},
            ["id", "address", "tax"],
        )
    ],
)
def test_mapped_columns_are_the_top_level_targets(
    tmp_path: Path, fields: dict[str, str], expected: list[str]
) -> None:
    body = SINK.format(n=next(_n), db="erp.db", table="customers", key="id").split(
        "[flows.from_canonical.fields]"
    )[0]
    body += "[flows.from_canonical.fields]\n" + "".join(f'"{k}" = "{v}"\n' for k, v in fields.items())
    cfg = load_agent_config(agent_toml(tmp_path, body))
    assert mapped_columns(cfg.flows[0]) == expected
