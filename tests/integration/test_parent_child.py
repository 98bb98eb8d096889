"""Parent before child: Northwind customers, orders and order lines, synced by three separate flows
from one PostgreSQL database into another that keeps Northwind's foreign keys
(order_details -> orders -> customers). Lines and orders that arrive before their parent, and
orders and customers deleted while their children are still there, are IntegrityPending and
retried until the other record arrives; the target converges with an empty DLQ, deletes
included, while the sink agent is SIGKILLed mid-sync.

Phase 1 (snapshot, three flows racing, sink SIGKILLed three times), phase 2 (deterministic: the
source agent first publishes only the order lines of new orders and only the deletes of orders
whose lines it has not published yet; the sink must hold them, retrying, with nothing
dead-lettered, and converges once the rest arrives).
"""

from __future__ import annotations

import json
import random
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import pytest

from mesh.endpoint import read_endpoint_file
from tests._pg import PgCluster
from tests._secure import SecuredNatsServer as NatsServer
from tests._secure import issue_agent_creds
from tests.integration._harness import AgentProcess, log_tail, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.crash, pytest.mark.timeout(300)]

TABLES = {  # flow -> (entity, table, key)
    "customers": ("customer", "customers", '"customer_id"'),
    "orders": ("sales_order", "orders", '"order_id"'),
    "order_details": ("order_line", "order_details", '["order_id", "product_id"]'),
}
ORDER = {"customers": "customer_id", "orders": "order_id", "order_details": "order_id, product_id"}


def agent_toml(tmp: Path, name: str, system: str, url: str, flows: str, file: str = "") -> Path:
    path = tmp / f"{file or name}.toml"
    path.write_text(
        f"""
log_level = "info"
[agent]
name = "{name}"
system = "{system}"
state_dir = "{tmp / "state" / name}"
[nats]
servers = ["{url}"]
request_timeout = 2.0
creds = "{tmp / (name + ".creds")}"
inbox_prefix = "_INBOX.{name}"
{flows}"""
    )
    return path


def source_flows(dsn: str, names: list[str]) -> str:
    out = ""
    for flow in names:
        entity, table, key = TABLES[flow]
        out += f"""
[[flows]]
name = "{flow}"
entity = "{entity}"
[flows.source]
adapter = "postgres"
dsn = "{dsn}"
table = "{table}"
key = {key}
install_triggers = true
snapshot_chunk = 300
batch_size = 300
poll_interval = 0.05
"""
    return out


def sink_flows(dsn: str) -> str:
    out = ""
    for flow, (entity, table, key) in TABLES.items():
        out += f"""
[[flows]]
name = "{flow}"
entity = "{entity}"
[flows.consumer]
batch_size = 300
fetch_timeout = 0.2
ack_wait = 10.0
max_deliver = 20
[flows.retry]
initial_delay = 0.2
max_delay = 1.0
integrity_retry = 120.0
[flows.sink]
adapter = "postgres"
dsn = "{dsn}"
table = "{table}"
key = {key}
"""
    return out


def state(cluster: PgCluster, db: str) -> dict[str, list[tuple[Any, ...]]]:
    with cluster.connect(db) as conn:
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY {ORDER[t]}").fetchall() for t in ORDER}


def counts(cluster: PgCluster, db: str) -> dict[str, int]:
    return {t: len(rows) for t, rows in state(cluster, db).items()}


def dlq_depth(server: NatsServer) -> int:
    import nats

    async def main() -> int:
        nc = await nats.connect(server.url, user_credentials=str(server.admin_creds))
        try:
            return (await nc.jetstream().stream_info("MESH_DLQ")).state.messages
        finally:
            await nc.close()

    return anyio.run(main)


def retried(agent: AgentProcess, flow: str = '[^"]+') -> float:
    """``mesh_retried_messages_total`` of the agent's current run (one flow, or all summed)."""
    doc = read_endpoint_file(agent.state_dir, pid=agent.proc.pid if agent.proc else None)
    if doc is None:
        return 0.0
    with urllib.request.urlopen(str(doc["metrics"]), timeout=5) as answer:
        text = answer.read().decode()
    pattern = r'^mesh_retried_messages_total\{flow="' + flow + r'"\} (\S+)$'
    return sum(float(m[1]) for m in re.finditer(pattern, text, re.M))


def test_orders_and_lines_converge_through_foreign_keys_with_an_empty_dlq(
    tmp_path: Path, security_dir: Path, pg_cluster: PgCluster, northwind_template: str
) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"seed={seed}")
    source_db = pg_cluster.create_database(template=northwind_template)
    target_db = pg_cluster.create_database(template=northwind_template)
    with pg_cluster.connect(target_db) as conn:  # Northwind's own foreign keys stay in force
        conn.execute("TRUNCATE customers, orders, order_details, customer_customer_demo")
    server = NatsServer(tmp_path / "nats", security_dir, layout=True)
    everything = source_flows(pg_cluster.dsn(source_db), list(TABLES))
    erp_cfg = agent_toml(tmp_path, "erp-agent", "erp", server.url, everything)
    crm_cfg = agent_toml(tmp_path, "crm-agent", "crm", server.url, sink_flows(pg_cluster.dsn(target_db)))
    for cfg in (erp_cfg, crm_cfg):
        issue_agent_creds(cfg, security_dir)
    erp = AgentProcess(erp_cfg, tmp_path / "erp.log")
    crm = AgentProcess(crm_cfg, tmp_path / "crm.log")

    def converged() -> bool:
        return state(pg_cluster, source_db) == state(pg_cluster, target_db)

    def difference() -> str:
        src, tgt = state(pg_cluster, source_db), state(pg_cluster, target_db)
        out = []
        for table in ORDER:
            a, b = set(src[table]), set(tgt[table])
            missing, extra = sorted(a - b), sorted(b - a)
            out.append(f"{table}: missing {missing[:5]} ({len(missing)}), extra {extra[:5]} ({len(extra)})")
        return "; ".join(out) + f"; DLQ {dlq_depth(server)}"

    server.start()
    try:
        # --- phase 1: the snapshot of three racing flows, the sink SIGKILLed mid-sync -------------
        crm.start()
        erp.start()
        for _ in range(3):
            time.sleep(rng.uniform(0.5, 2.0))
            crm.kill()
            time.sleep(rng.uniform(0.0, 0.5))
            crm.start()
        wait_until(converged, 120, f"target = source after the snapshot\n{log_tail(crm.log)}")
        assert counts(pg_cluster, target_db) == {"customers": 91, "orders": 830, "order_details": 2155}
        assert dlq_depth(server) == 0

        # --- phase 2: children first, then parents ----------------------------------------------
        erp.terminate()
        with pg_cluster.connect(source_db) as conn:
            conn.execute("INSERT INTO customers (customer_id, company_name) VALUES ('NEWCO', 'Neu & Co')")
            conn.execute(
                "INSERT INTO orders (order_id, customer_id, employee_id, ship_via) VALUES "
                "(20001, 'NEWCO', 1, 1), (20002, 'NEWCO', 2, 2)"
            )
            conn.execute(
                "INSERT INTO order_details VALUES (20001, 11, 14, 12, 0), (20001, 42, 9.8, 10, 0), "
                "(20002, 72, 34.8, 5, 0.1)"
            )
            # a customer with orders goes, children first (the source's keys demand it)
            alfki = [r[0] for r in conn.execute("SELECT order_id FROM orders WHERE customer_id = 'ALFKI'")]
            conn.execute("DELETE FROM order_details WHERE order_id = ANY(%s)", (alfki,))
            conn.execute("DELETE FROM orders WHERE customer_id = 'ALFKI'")
            conn.execute("DELETE FROM customer_customer_demo WHERE customer_id = 'ALFKI'")
            conn.execute("DELETE FROM customers WHERE customer_id = 'ALFKI'")
        # 2a. Only the lines flow runs: the new lines wait for their orders; ALFKI's lines go.
        lines_only = source_flows(pg_cluster.dsn(source_db), ["order_details"])
        part = AgentProcess(
            agent_toml(tmp_path, "erp-agent", "erp", server.url, lines_only, "erp-lines"), tmp_path / "a.log"
        )
        part.start()
        wait_until(
            lambda: retried(crm) > 0, 30, f"the sink to retry lines without orders\n{log_tail(crm.log)}"
        )
        wait_until(lambda: not set(alfki) & _order_ids(pg_cluster, target_db), 30, "ALFKI's lines deleted")
        assert _new_lines(pg_cluster, target_db) == 0
        part.terminate()
        # 2b. Order 10248 goes with its lines at the source; only the orders flow runs: the
        # delete of 10248 waits for its lines (still in the target), NEWCO's orders wait for
        # NEWCO, ALFKI's orders (lines gone in 2a) go.
        with pg_cluster.connect(source_db) as conn:
            conn.execute("DELETE FROM order_details WHERE order_id = 10248")
            conn.execute("DELETE FROM orders WHERE order_id = 10248")
        orders_only = source_flows(pg_cluster.dsn(source_db), ["orders"])
        part = AgentProcess(
            agent_toml(tmp_path, "erp-agent", "erp", server.url, orders_only, "erp-orders"),
            tmp_path / "b.log",
        )
        before = retried(crm, "orders")
        part.start()
        wait_until(
            lambda: not set(alfki) & _order_ids(pg_cluster, target_db, "orders"), 30, "ALFKI's orders deleted"
        )
        wait_until(lambda: retried(crm, "orders") >= before + 3, 30, "the sink to retry 10248, 20001, 20002")
        held = _order_ids(pg_cluster, target_db, "orders")
        assert 10248 in held  # its delete waits: its lines are still there
        assert not {20001, 20002} & held  # they wait for NEWCO
        assert _new_lines(pg_cluster, target_db) == 0  # and their lines for them
        assert dlq_depth(server) == 0
        part.terminate()
        # 2c. Everything runs again, the sink SIGKILLed once more mid-way: 10248's lines go, then it.
        erp.start()
        time.sleep(rng.uniform(0.2, 1.0))
        crm.kill()
        crm.start()
        try:
            wait_until(converged, 120, "target = source after children first")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {difference()}\n{log_tail(crm.log)}") from None
        assert dlq_depth(server) == 0
        assert _new_lines(pg_cluster, target_db) == 3
        assert 10248 not in _order_ids(pg_cluster, target_db, "orders")
        with pg_cluster.connect(target_db) as conn:
            assert conn.execute("SELECT count(*) FROM customers WHERE customer_id = 'ALFKI'").fetchone() == (
                0,
            )
        assert crm.alive, f"the sink agent died on its own; see {crm.log}"
        assert erp.terminate() == 0
        assert crm.terminate() == 0
    finally:
        erp.kill()
        crm.kill()
        server.stop()
        pg_cluster.drop_database(source_db)
        pg_cluster.drop_database(target_db)
    print(json.dumps({"seed": seed}))


def _order_ids(cluster: PgCluster, db: str, table: str = "order_details") -> set[int]:
    with cluster.connect(db) as conn:
        return {r[0] for r in conn.execute(f"SELECT DISTINCT order_id FROM {table}")}


def _new_lines(cluster: PgCluster, db: str) -> int:
    with cluster.connect(db) as conn:
        row = conn.execute("SELECT count(*) FROM order_details WHERE order_id > 20000").fetchone()
        return int(row[0]) if row else 0
