"""Parent before child with ``after``: a child flow whose source runs ahead of its parent's is
held by the sink (nak'ed, counted ``held``), never attempted against the target's foreign keys
(no IntegrityPending retry ever happens) and never dead-lettered; a parent's delete waits for
its children's deletes. Northwind from PostgreSQL into a PostgreSQL target (orders ->
order_details, Northwind's own foreign keys) and into a SQLite target (customers -> orders,
a declared foreign key: the SQLite sink keys a table by one column, so not order_details).

Phase 1: only the child flow's source runs: every child is held, none reaches the target, the
sink is SIGKILLed meanwhile. Phase 2: the parent's source runs too: the target converges. Phase
3: a parent and its children are deleted at the source; only the parent's flow runs: its delete
is held while its children are still in the target; then the child flow runs and both go.
"""

from __future__ import annotations

import re
import sqlite3
import urllib.request
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Side:
    flow: str
    entity: str
    table: str
    key: list[str]


PG_CASE = (
    Side("orders", "sales_order", "orders", ["order_id"]),
    Side("order_details", "order_line", "order_details", ["order_id", "product_id"]),
    "order_id",
)
SQLITE_CASE = (
    Side("customers", "customer", "customers", ["customer_id"]),
    Side("orders", "sales_order", "orders", ["order_id"]),
    "customer_id",
)


def _toml_key(key: list[str]) -> str:
    return f'"{key[0]}"' if len(key) == 1 else "[" + ", ".join(f'"{k}"' for k in key) + "]"


def agent_toml(tmp: Path, name: str, system: str, url: str, flows: str, file: str = "") -> Path:
    path = tmp / f"{file or name}.toml"
    path.write_text(
        f"""
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


def source_flows(dsn: str, sides: list[Side]) -> str:
    return "".join(
        f"""
[[flows]]
name = "{s.flow}"
entity = "{s.entity}"
[flows.source]
adapter = "postgres"
dsn = "{dsn}"
table = "{s.table}"
key = {_toml_key(s.key)}
install_triggers = true
snapshot_chunk = 300
batch_size = 300
poll_interval = 0.05
"""
        for s in sides
    )


def sink_flows(kind: str, target: str, parent: Side, child: Side, ref: str) -> str:
    out = ""
    for s in (parent, child):
        if kind == "postgres":
            sink = f'adapter = "postgres"\ndsn = "{target}"\ntable = "{s.table}"\nkey = {_toml_key(s.key)}'
        else:
            sink = f'adapter = "sqlite"\npath = "{target}"\ntable = "{s.table}"\nkey = "{s.key[0]}"'
        after = f'after = {{ flow = "{parent.flow}", key = "{ref}" }}\n' if s is child else ""
        out += f"""
[[flows]]
name = "{s.flow}"
entity = "{s.entity}"
{after}[flows.consumer]
batch_size = 300
fetch_timeout = 0.2
ack_wait = 10.0
max_deliver = 30
[flows.retry]
initial_delay = 0.2
max_delay = 1.0
integrity_retry = 90.0
[flows.sink]
{sink}
"""
    return out


def metric(agent: AgentProcess, name: str, flow: str, outcome: str = "") -> float:
    """A counter of the agent's current run for one flow (0 before its endpoint is up)."""
    doc = read_endpoint_file(agent.state_dir, pid=agent.proc.pid if agent.proc else None)
    if doc is None:
        return 0.0
    try:
        with urllib.request.urlopen(str(doc["metrics"]), timeout=5) as answer:
            text = answer.read().decode()
    except OSError:
        return 0.0
    labels = f'flow="{flow}"' + (f',outcome="{outcome}"' if outcome else "")
    pattern = r"^" + name + r"\{" + re.escape(labels) + r"\} (\S+)$"
    return sum(float(m[1]) for m in re.finditer(pattern, text, re.M))


def dlq_depth(server: NatsServer) -> int:
    import nats

    async def main() -> int:
        nc = await nats.connect(server.url, user_credentials=str(server.admin_creds))
        try:
            return (await nc.jetstream().stream_info("MESH_DLQ")).state.messages
        finally:
            await nc.close()

    return anyio.run(main)


class Target:
    """The target database: key sets per table, PostgreSQL or SQLite."""

    def __init__(self, cluster: PgCluster, db: str | None, path: Path | None) -> None:
        self.cluster, self.db, self.path = cluster, db, path

    def rows(self, side: Side, columns: list[str]) -> set[tuple[Any, ...]]:
        sql = f"SELECT {', '.join(columns)} FROM {side.table}"
        if self.db is not None:
            with self.cluster.connect(self.db) as conn:
                return {tuple(r) for r in conn.execute(sql).fetchall()}
        assert self.path is not None
        with sqlite3.connect(self.path) as conn:
            return {tuple(r) for r in conn.execute(sql).fetchall()}


_AFFINITY = {"smallint": "INTEGER", "integer": "INTEGER", "bigint": "INTEGER", "real": "REAL"}


def _sqlite_target(
    cluster: PgCluster, source_db: str, path: Path, parent: Side, child: Side, ref: str
) -> None:
    """SQLite tables with the source's columns (typed, so that a key compares with the text
    key of a delete), the child's ``ref`` a foreign key to the parent."""
    with cluster.connect(source_db) as conn:
        cols = {
            s.table: conn.execute(
                "SELECT column_name, data_type FROM information_schema.columns"
                " WHERE table_name = %s ORDER BY ordinal_position",
                (s.table,),
            ).fetchall()
            for s in (parent, child)
        }
    with sqlite3.connect(path) as conn:
        for s in (parent, child):
            defs = [
                f"{c} {_AFFINITY.get(t, 'TEXT')}" + (" PRIMARY KEY" if c == s.key[0] else "")
                for c, t in cols[s.table]
            ]
            if s is child:
                defs.append(f"FOREIGN KEY ({ref}) REFERENCES {parent.table} ({parent.key[0]})")
            conn.execute(f"CREATE TABLE {s.table} ({', '.join(defs)})")


@pytest.mark.parametrize("target_kind", ["postgres", "sqlite"])
def test_after_holds_children_until_their_parent_is_applied_and_parent_deletes_until_children_go(
    tmp_path: Path, security_dir: Path, pg_cluster: PgCluster, northwind_template: str, target_kind: str
) -> None:
    parent, child, ref = PG_CASE if target_kind == "postgres" else SQLITE_CASE
    source_db = pg_cluster.create_database(template=northwind_template)
    target_db: str | None = None
    sqlite_path: Path | None = None
    if target_kind == "postgres":
        target_db = pg_cluster.create_database(template=northwind_template)
        with pg_cluster.connect(target_db) as conn:  # Northwind's foreign keys stay in force
            conn.execute("TRUNCATE orders, order_details")
        target_spec = pg_cluster.dsn(target_db)
    else:
        sqlite_path = tmp_path / "target.db"
        _sqlite_target(pg_cluster, source_db, sqlite_path, parent, child, ref)
        target_spec = str(sqlite_path)
    target = Target(pg_cluster, target_db, sqlite_path)
    source = Target(pg_cluster, source_db, None)
    server = NatsServer(tmp_path / "nats", security_dir, layout=True)
    dsn = pg_cluster.dsn(source_db)
    erp_cfg = agent_toml(tmp_path, "erp-agent", "erp", server.url, source_flows(dsn, [parent, child]))
    crm_cfg = agent_toml(
        tmp_path, "crm-agent", "crm", server.url, sink_flows(target_kind, target_spec, parent, child, ref)
    )
    for cfg in (erp_cfg, crm_cfg):
        issue_agent_creds(cfg, security_dir)
    crm = AgentProcess(crm_cfg, tmp_path / "crm.log")
    child_only = AgentProcess(
        agent_toml(tmp_path, "erp-agent", "erp", server.url, source_flows(dsn, [child]), "erp-child"),
        tmp_path / "child.log",
    )
    parent_only = AgentProcess(
        agent_toml(tmp_path, "erp-agent", "erp", server.url, source_flows(dsn, [parent]), "erp-parent"),
        tmp_path / "parent.log",
    )
    erp = AgentProcess(erp_cfg, tmp_path / "erp.log")
    child_cols = [*child.key, ref]

    def difference() -> str:
        out = []
        for side, cols in ((parent, parent.key), (child, child_cols)):
            a, b = source.rows(side, cols), target.rows(side, cols)
            out.append(f"{side.table}: missing {sorted(a - b)[:5]}, extra {sorted(b - a)[:5]}")
        return "; ".join(out) + f"; DLQ {dlq_depth(server)}\n{log_tail(crm.log)}"

    def converged() -> bool:
        return target.rows(parent, parent.key) == source.rows(parent, parent.key) and target.rows(
            child, child_cols
        ) == source.rows(child, child_cols)

    n_children = len(source.rows(child, child.key))
    server.start()
    try:
        # --- phase 1: only the children are published; every one is held --------------------
        crm.start()
        child_only.start()
        wait_until(
            lambda: metric(crm, "mesh_consumed_messages_total", child.flow, "held") >= n_children,
            90, f"the sink to hold every {child.flow} record\n{log_tail(crm.log)}",
        )  # fmt: skip
        crm.kill()  # mid-hold: the held records are redelivered to the next run
        crm.start()
        wait_until(
            lambda: metric(crm, "mesh_consumed_messages_total", child.flow, "held") > 0,
            60, f"the restarted sink to hold {child.flow} again\n{log_tail(crm.log)}",
        )  # fmt: skip
        assert target.rows(child, child.key) == set()
        assert dlq_depth(server) == 0
        assert child_only.terminate() == 0

        # --- phase 2: the parents arrive; everything converges, nothing reached the FK -------
        erp.start()
        try:
            wait_until(converged, 150, "target = source")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {difference()}") from None
        assert dlq_depth(server) == 0
        # never retried: no child was tried against the target's foreign key before its parent
        assert metric(crm, "mesh_retried_messages_total", child.flow) == 0
        assert erp.terminate() == 0

        # --- phase 3: a parent and its children deleted; the parent's delete goes first ------
        with pg_cluster.connect(source_db) as conn:
            if target_kind == "postgres":
                gone = 10248
                conn.execute("DELETE FROM order_details WHERE order_id = %s", (gone,))
                conn.execute("DELETE FROM orders WHERE order_id = %s", (gone,))
            else:
                gone = "ALFKI"  # type: ignore[assignment]
                ids = [
                    r[0] for r in conn.execute("SELECT order_id FROM orders WHERE customer_id = %s", (gone,))
                ]
                conn.execute("DELETE FROM order_details WHERE order_id = ANY(%s)", (ids,))
                conn.execute("DELETE FROM orders WHERE customer_id = %s", (gone,))
                conn.execute("DELETE FROM customer_customer_demo WHERE customer_id = %s", (gone,))
                conn.execute("DELETE FROM customers WHERE customer_id = %s", (gone,))
        held_before = metric(crm, "mesh_consumed_messages_total", parent.flow, "held")
        parent_only.start()
        wait_until(
            lambda: metric(crm, "mesh_consumed_messages_total", parent.flow, "held") > held_before,
            60, f"the sink to hold the delete of {parent.flow} {gone!r}\n{log_tail(crm.log)}",
        )  # fmt: skip
        assert (gone,) in target.rows(parent, parent.key)
        assert dlq_depth(server) == 0
        assert parent_only.terminate() == 0
        erp.start()
        try:
            wait_until(converged, 150, "target = source after the deletes")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {difference()}") from None
        assert (gone,) not in target.rows(parent, parent.key)
        assert dlq_depth(server) == 0
        assert metric(crm, "mesh_retried_messages_total", parent.flow) == 0
        assert metric(crm, "mesh_retried_messages_total", child.flow) == 0
        assert crm.alive, f"the sink agent died on its own; see {crm.log}"
        assert erp.terminate() == 0
        assert crm.terminate() == 0
    finally:
        for agent in (erp, crm, child_only, parent_only):
            agent.kill()
        server.stop()
        pg_cluster.drop_database(source_db)
        if target_db is not None:
            pg_cluster.drop_database(target_db)
