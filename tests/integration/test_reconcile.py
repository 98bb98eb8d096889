"""``meshctl reconcile`` against real agents (the dev stack's ``customers`` flow: ERP SQLite ->
canonical customer/1 -> CRM SQLite, other column names and types), a secured nats-server and
least-privilege agent creds: drift made behind the mesh's back (a row deleted, a field changed,
a row added) is reported exactly, ``--repair`` converges through the delivery path (a report
after it is clean), and an agent cannot answer or ask another agent's reconcile subject."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mesh.devtools.dev import CRM_FLOW, CRM_SCHEMA, ERP_FLOW, ERP_SCHEMA
from mesh.transport import Refused
from mesh.transport.jetstream import JetStream
from tests._pg import PgCluster
from tests._secure import SecuredNatsServer, secure_agent
from tests.integration._harness import AgentProcess, log_tail, wait_until

pytestmark = [pytest.mark.integration]


def agent_config(tmp: Path, name: str, system: str, flow: str, url: str) -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(f"""
log_level = "info"
[agent]
name = "{name}"
system = "{system}"
state_dir = "{tmp / ("s-" + name)}"
[nats]
servers = ["{url}"]
creds = "{tmp / (name + ".creds")}"
inbox_prefix = "_INBOX.{name}"
{flow}""")
    return path


class Target:
    """The CRM side of the flow: its flow text, and SQL run on it behind the mesh's back."""

    def __init__(self, flow: str, run: Callable[[str], list[tuple[object, ...]]]) -> None:
        self.flow, self.run = flow, run

    def rows(self) -> dict[object, tuple[object, ...]]:
        got = self.run("SELECT account_id, company, email_address, credit_limit FROM accounts")
        return {r[0]: r for r in got}


def sqlite_target(tmp: Path) -> Target:
    crm = tmp / "crm.db"
    with sqlite3.connect(crm) as c:
        c.executescript(CRM_SCHEMA)

    def run(stmt: str) -> list[tuple[object, ...]]:
        with sqlite3.connect(crm, timeout=30) as c:
            return c.execute(stmt).fetchall()

    return Target(CRM_FLOW, run)


def postgres_target(cluster: PgCluster, dbname: str) -> Target:
    with cluster.connect(dbname) as db:
        db.execute(
            "CREATE TABLE accounts (account_id text PRIMARY KEY, company text NOT NULL, email_address text,"
            " country_code text, credit_limit numeric(14, 2), modified_at timestamptz)"
        )
    sink = (
        f'[flows.sink]\nadapter = "postgres"\ndsn = "{cluster.dsn(dbname)}"\ntable = "accounts"\n'
        'key = "account_id"\n'
    )
    flow = re.sub(r"\[flows\.sink\]\n(.*\n)*?(?=\n)", sink, CRM_FLOW, count=1)
    assert 'adapter = "postgres"' in flow

    def run(stmt: str) -> list[tuple[object, ...]]:
        with cluster.connect(dbname) as db:
            cur = db.execute(stmt)
            return [tuple(r) for r in cur.fetchall()] if cur.description else []

    return Target(flow, run)


def meshctl_reconcile(server: SecuredNatsServer, *args: str) -> tuple[int, dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "mesh", "reconcile", "customers", "--json", "--agent", "erp-agent",
         "--agent", "crm-agent", "--nats", server.url, "--creds", str(server.admin_creds), "--chunk", "7",
         *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def drift_found_and_repaired(tmp_path: Path, server: SecuredNatsServer, target: Target) -> None:
    erp = tmp_path / "erp.db"
    with sqlite3.connect(erp) as c:
        c.executescript(ERP_SCHEMA)
        c.executemany(
            "INSERT INTO customers (id, name, email, country, credit_limit_cents) VALUES (?, ?, ?, ?, ?)",
            [(i, f"Customer {i}", f"c{i}@example.com", "DE", i * 1000 + 10) for i in range(1, 41)],
        )
    configs = [
        agent_config(tmp_path, "erp-agent", "erp", ERP_FLOW, server.url),
        agent_config(tmp_path, "crm-agent", "crm", target.flow, server.url),
    ]
    agents = [AgentProcess(cfg, tmp_path / f"{cfg.stem}.log") for cfg in configs]
    for cfg in configs:
        secure_agent(cfg, server)
    try:
        for a in agents:
            a.start()
        with sqlite3.connect(erp) as c:  # the capture triggers exist now: every row as a change
            c.execute("UPDATE customers SET name = name")
        wait_until(lambda: len(target.rows()) == 40, 60, "the CRM to hold the ERP's 40 customers")
        code, report = meshctl_reconcile(server)
        assert (code, report["missing"], report["extra"], report["different"]) == (0, [], [], [])

        before = target.rows()
        # behind the mesh's back: a row deleted, fields changed, a row added
        target.run("DELETE FROM accounts WHERE account_id = '7'")
        target.run("UPDATE accounts SET company = 'Changed', credit_limit = '1.00' WHERE account_id = '12'")
        target.run("INSERT INTO accounts (account_id, company) VALUES ('900', 'Nobody')")
        code, report = meshctl_reconcile(server)
        assert code == 1
        assert report["flow"] == "customers"
        assert report["missing"] == ["7"]
        assert report["extra"] == ["900"]
        assert report["different"] == [{"key": "12", "fields": ["company", "credit_limit"]}]

        code, report = meshctl_reconcile(server, "--repair", "--wait", "60")
        assert (code, report["missing"], report["extra"], report["different"]) == (0, [], [], [])
        assert report["repaired"] == {"reemitted": 2, "deleted": 1}
        assert target.rows() == before

        code, report = meshctl_reconcile(server)  # and it stays clean
        assert (code, report["missing"], report["extra"], report["different"]) == (0, [], [], [])
    except AssertionError:
        for a in agents:
            print(log_tail(a.log))
        raise
    finally:
        for a in agents:
            a.terminate()


def test_sqlite_target_drift_found_and_repaired(tmp_path: Path, nats_server: SecuredNatsServer) -> None:
    drift_found_and_repaired(tmp_path, nats_server, sqlite_target(tmp_path))


def test_postgres_target_drift_found_and_repaired(
    tmp_path: Path, nats_server: SecuredNatsServer, pg_cluster: PgCluster, pg_db: str
) -> None:
    drift_found_and_repaired(tmp_path, nats_server, postgres_target(pg_cluster, pg_db))


@pytest.mark.anyio
async def test_an_agent_cannot_serve_or_ask_another_agents_reconcile_subject(
    tmp_path: Path, nats_server: SecuredNatsServer
) -> None:
    cfg = agent_config(tmp_path, "erp-agent", "erp", ERP_FLOW, nats_server.url)
    secure_agent(cfg, nats_server)
    nc = nats_server.nats_config(creds=str(tmp_path / "erp-agent.creds"), inbox_prefix="_INBOX.erp-agent")
    async with JetStream(nc, name="erp-agent") as js:
        with pytest.raises(Refused, match=r"permission denied: publish to mesh\.cp\.reconcile\.crm-agent"):
            await js.request("mesh.cp.reconcile.crm-agent", b"{}", timeout=2)
        with pytest.raises(Refused, match=r"permission denied: subscribe to mesh\.cp\.reconcile\.crm-agent"):
            async with await js.subscribe("mesh.cp.reconcile.crm-agent") as sub:
                await sub.next(timeout=2)
        async with await js.subscribe("mesh.cp.reconcile.erp-agent"):
            pass  # its own: allowed
