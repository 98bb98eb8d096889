"""End to end with PostgreSQL: Northwind (PostgreSQL source agent) -> real nats-server -> SQLite
sink agent, then updates and deletes on the PostgreSQL side, compared field by field; and a
SQLite source agent -> nats-server -> PostgreSQL sink agent under a mixed load."""

from __future__ import annotations

import json
import sqlite3
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

import anyio
import pytest

from agents.connector import ConnectorAgent
from tests._pg import PgCluster
from tests._secure import SecuredNatsServer as NatsServer
from tests._secure import secure_config
from tests.integration._harness import ErpLoad, agent_toml, make_erp, rows

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

SQLITE_TARGET = """
CREATE TABLE customers (customer_id TEXT PRIMARY KEY, company_name TEXT NOT NULL, contact_name TEXT,
    contact_title TEXT, address TEXT, city TEXT, region TEXT, postal_code TEXT, country TEXT, phone TEXT,
    fax TEXT);
CREATE TABLE order_details (line_key TEXT PRIMARY KEY, order_id INTEGER NOT NULL, product_id INTEGER NOT NULL,
    unit_price REAL NOT NULL, quantity INTEGER NOT NULL, discount REAL NOT NULL);
"""
CONSUMER = """
[flows.consumer]
batch_size = 500
fetch_timeout = 0.2
ack_wait = 10.0
[flows.retry]
initial_delay = 0.2
max_delay = 1.0
"""


def northwind_agents(tmp: Path, url: str, dsn: str, sqlite_db: Path) -> tuple[str, str]:
    head = 'log_level = "info"\n[agent]\nname = "{name}"\nsystem = "{system}"\nstate_dir = "{state}"\n'
    nats = f'[nats]\nservers = ["{url}"]\nrequest_timeout = 2.0\n'
    erp = head.format(name="erp-agent", system="erp", state=tmp / "s-erp") + nats
    crm = head.format(name="crm-agent", system="crm", state=tmp / "s-crm") + nats
    flows = [("customers", "customer", '"customer_id"', "customer_id", ""),
             ("order_details", "order_line", '["order_id", "product_id"]', "line_key",
              'key_field = "line_key"\n')]  # fmt: skip
    for table, entity, pg_key, sqlite_key, extra in flows:
        flow = f'[[flows]]\nname = "{table}"\nentity = "{entity}"\n' + CONSUMER
        erp += (
            flow + f'[flows.source]\nadapter = "postgres"\ndsn = "{dsn}"\ntable = "{table}"\nkey = {pg_key}\n'
            f"install_triggers = true\nsnapshot_chunk = 400\nbatch_size = 500\npoll_interval = 0.05\n{extra}"
        )
        crm += (
            flow
            + f'[flows.sink]\nadapter = "sqlite"\npath = "{sqlite_db}"\ntable = "{table}"\n'
            + f'key = "{sqlite_key}"\n'
        )
    return erp, crm


@asynccontextmanager
async def running(*agents: ConnectorAgent) -> AsyncIterator[None]:
    async with anyio.create_task_group() as tg:
        for a in agents:
            await tg.start(a.run)
        yield
        tg.cancel_scope.cancel()


def float32(value: float) -> float:
    """``value`` rounded to single precision, as a PostgreSQL ``real`` holds it."""
    result: float = struct.unpack("f", struct.pack("f", value))[0]
    return result


def pg_state(
    cluster: PgCluster, dbname: str
) -> tuple[dict[str, tuple[Any, ...]], dict[str, tuple[Any, ...]]]:
    with cluster.connect(dbname) as conn:
        customers = {r[0]: r for r in conn.execute("SELECT * FROM customers").fetchall()}
        lines = {
            json.dumps([r[0], r[1]], separators=(",", ":")): r
            for r in conn.execute(
                "SELECT order_id, product_id, unit_price, quantity, discount FROM order_details"
            )
        }
    return customers, lines


def sqlite_state(path: Path) -> tuple[dict[str, tuple[Any, ...]], dict[str, tuple[Any, ...]]]:
    with closing(sqlite3.connect(path, timeout=30)) as conn:
        customers = {r[0]: r for r in conn.execute("SELECT * FROM customers")}
        lines = {r[0]: r[1:] for r in conn.execute("SELECT * FROM order_details")}
    return customers, lines


def same(cluster: PgCluster, dbname: str, path: Path) -> bool:
    pg_customers, pg_lines = pg_state(cluster, dbname)
    sq_customers, sq_lines = sqlite_state(path)
    if pg_customers != sq_customers or pg_lines.keys() != sq_lines.keys():
        return False
    for key, (order_id, product_id, price, quantity, discount) in pg_lines.items():
        s_order, s_product, s_price, s_quantity, s_discount = sq_lines[key]
        if (order_id, product_id, quantity) != (s_order, s_product, s_quantity):
            return False
        # real travels as the shortest decimal that reads back as the same float4
        if float32(s_price) != float32(price) or float32(s_discount) != float32(discount):
            return False
    return True


async def wait_same(cluster: PgCluster, dbname: str, path: Path, timeout: float = 45) -> None:
    with anyio.fail_after(timeout):
        while not same(cluster, dbname, path):
            await anyio.sleep(0.2)


async def test_northwind_postgres_to_sqlite(
    tmp_path: Path, nats_server: NatsServer, pg_cluster: PgCluster, northwind_template: str
) -> None:
    dbname = pg_cluster.create_database(template=northwind_template)
    target = tmp_path / "crm.db"
    with closing(sqlite3.connect(target)) as conn:
        conn.executescript(SQLITE_TARGET)
    erp_toml, crm_toml = northwind_agents(tmp_path, nats_server.url, pg_cluster.dsn(dbname), target)
    erp = ConnectorAgent(secure_config(erp_toml, tmp_path / "erp-agent.creds", nats_server))
    crm = ConnectorAgent(secure_config(crm_toml, tmp_path / "crm-agent.creds", nats_server))
    try:
        async with running(erp, crm):
            await wait_same(pg_cluster, dbname, target)
            customers, lines = sqlite_state(target)
            assert (len(customers), len(lines)) == (91, 2155)
            assert customers["ALFKI"][1:3] == ("Alfreds Futterkiste", "Maria Anders")
            assert lines["[10248,42]"][2] == 9.8  # real 9.80000019 as the shortest exact decimal
            with pg_cluster.connect(dbname) as db:
                db.execute(
                    "UPDATE customers SET company_name = company_name || ' GmbH', fax = NULL "
                    "WHERE country = 'Germany'"
                )
                db.execute(
                    "UPDATE customers SET customer_id = 'WOLFX' WHERE customer_id = 'FISSA'"
                )  # key change
                db.execute("DELETE FROM customers WHERE customer_id = 'PARIS'")
                db.execute(
                    "INSERT INTO customers (customer_id, company_name, city) "
                    "VALUES ('NEWCO', 'Neu & Co', 'Köln')"
                )
                db.execute(
                    "UPDATE order_details SET quantity = quantity + 1, discount = 0.15 WHERE order_id < 10260"
                )
                db.execute("DELETE FROM order_details WHERE order_id BETWEEN 10300 AND 10310")
                db.execute(
                    "UPDATE order_details SET product_id = 77 WHERE order_id = 10248 AND product_id = 11"
                )
            await wait_same(pg_cluster, dbname, target)
        customers, lines = sqlite_state(target)
        assert "PARIS" not in customers
        assert "FISSA" not in customers
        assert customers["WOLFX"][1] == "FISSA Fabrica Inter. Salchichas S.A."
        assert customers["NEWCO"][1:] == ("Neu & Co", None, None, None, "Köln", None, None, None, None, None)
        assert customers["ALFKI"][1] == "Alfreds Futterkiste GmbH"
        assert customers["ALFKI"][10] is None
        assert "[10248,11]" not in lines
        assert lines["[10248,77]"][3] == 13
        assert not any(10300 <= line[0] <= 10310 for line in lines.values())
        assert len(customers) == 91  # one deleted, one inserted
    finally:
        pg_cluster.drop_database(dbname)


PG_CUSTOMERS = """
CREATE TABLE customers (id bigint PRIMARY KEY, name text NOT NULL, email text, country text,
    credit_limit_cents bigint NOT NULL DEFAULT 0, balance double precision)
"""


def pg_crm_toml(tmp: Path, url: str, dsn: str) -> str:
    return f"""
[agent]
name = "crm-agent"
system = "crm"
state_dir = "{tmp / "s-crm"}"
[nats]
servers = ["{url}"]
request_timeout = 2.0
[[flows]]
name = "customers"
entity = "customer"
{CONSUMER}
[flows.sink]
adapter = "postgres"
dsn = "{dsn}"
table = "customers"
key = "id"
"""


async def test_sqlite_to_postgres(
    tmp_path: Path, nats_server: NatsServer, pg_cluster: PgCluster, pg_db: str
) -> None:
    with pg_cluster.connect(pg_db) as db:
        db.execute(PG_CUSTOMERS)
    erp_db = tmp_path / "erp.db"
    make_erp(erp_db)
    load = ErpLoad(erp_db, seed=7)
    load.insert(1500)
    erp = ConnectorAgent(secure_config(agent_toml(
        name="erp-agent", system="erp", state=tmp_path / "s-erp", url=nats_server.url, source=erp_db,
    ), tmp_path / "erp-agent.creds", nats_server))  # fmt: skip
    crm_toml = pg_crm_toml(tmp_path, nats_server.url, pg_cluster.dsn(pg_db))
    crm = ConnectorAgent(secure_config(crm_toml, tmp_path / "crm-agent.creds", nats_server))

    def pg_rows() -> list[tuple[Any, ...]]:
        with pg_cluster.connect(pg_db) as db:
            return list(db.execute("SELECT * FROM customers ORDER BY id").fetchall())

    async def synced() -> None:
        with anyio.fail_after(45):
            while rows(erp_db) != pg_rows():
                await anyio.sleep(0.2)

    async with running(erp, crm):
        await synced()
        load.update(400)
        load.delete(100)
        load.mixed(30)
        await synced()
    final = pg_rows()
    assert final == rows(erp_db)
    assert len(final) > 1000
    with pg_cluster.connect(pg_db) as db:
        guard = db.execute("SELECT count(*), count(*) FILTER (WHERE deleted) FROM _mesh_versions").fetchone()
    assert guard is not None
    assert guard[0] == load.next_id - 1
    assert guard[1] == guard[0] - len(final)
