"""``meshctl reconcile`` against real agents (the dev stack's ``customers`` flow: ERP SQLite ->
canonical customer/1 -> CRM SQLite, other column names and types), a secured nats-server and
least-privilege agent creds: drift made behind the mesh's back (a row deleted, a field changed,
a row added) is reported exactly, ``--repair`` converges through the delivery path (a report
after it is clean), and an agent cannot answer or ask another agent's reconcile subject."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.devtools.dev import CRM_FLOW, CRM_SCHEMA, ERP_FLOW, ERP_SCHEMA
from mesh.transport import Refused
from mesh.transport.jetstream import JetStream
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


def crm_rows(crm: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(crm, timeout=30) as c:
        return c.execute("SELECT account_id, company, email_address, credit_limit FROM accounts").fetchall()


def meshctl_reconcile(server: SecuredNatsServer, *args: str) -> tuple[int, dict[str, object], str]:
    done = subprocess.run(
        [sys.executable, "-m", "mesh", "reconcile", "customers", "--json", "--agent", "erp-agent",
         "--agent", "crm-agent", "--nats", server.url, "--creds", str(server.admin_creds), *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout), done.stderr


def test_reconcile_finds_the_drift_and_repair_converges(
    tmp_path: Path, nats_server: SecuredNatsServer
) -> None:
    erp, crm = tmp_path / "erp.db", tmp_path / "crm.db"
    with sqlite3.connect(erp) as c:
        c.executescript(ERP_SCHEMA)
        c.executemany(
            "INSERT INTO customers (id, name, email, country, credit_limit_cents) VALUES (?, ?, ?, ?, ?)",
            [(i, f"Customer {i}", f"c{i}@example.com", "DE", i * 1000 + 1) for i in range(1, 41)],
        )
    with sqlite3.connect(crm) as c:
        c.executescript(CRM_SCHEMA)
    configs = [
        agent_config(tmp_path, "erp-agent", "erp", ERP_FLOW, nats_server.url),
        agent_config(tmp_path, "crm-agent", "crm", CRM_FLOW, nats_server.url),
    ]
    agents = [AgentProcess(cfg, tmp_path / f"{cfg.stem}.log") for cfg in configs]
    for cfg in configs:
        secure_agent(cfg, nats_server)
    try:
        for a in agents:
            a.start()
        with sqlite3.connect(erp) as c:  # the capture triggers exist now: every row as a change
            c.execute("UPDATE customers SET name = name")
        wait_until(lambda: len(crm_rows(crm)) == 40, 60, "the CRM to hold the ERP's 40 customers")
        code, report, _ = meshctl_reconcile(nats_server)
        assert (code, report["missing"], report["extra"], report["different"]) == (0, [], [], [])

        before = dict((r[0], r) for r in crm_rows(crm))
        with sqlite3.connect(crm) as c:  # behind the mesh's back
            c.execute("DELETE FROM accounts WHERE account_id = '7'")
            c.execute(
                "UPDATE accounts SET company = 'Changed', credit_limit = '1.00' WHERE account_id = '12'"
            )
            c.execute("INSERT INTO accounts (account_id, company) VALUES ('900', 'Nobody')")
        code, report, _ = meshctl_reconcile(nats_server)
        assert code == 1
        assert report["flow"] == "customers"
        assert report["missing"] == ["7"]
        assert report["extra"] == ["900"]
        assert report["different"] == [{"key": "12", "fields": ["company", "credit_limit"]}]

        code, report, _ = meshctl_reconcile(nats_server, "--repair", "--wait", "60")
        assert (code, report["missing"], report["extra"], report["different"]) == (0, [], [], [])
        assert report["repaired"] == {"reemitted": 2, "deleted": 1}
        assert dict((r[0], r) for r in crm_rows(crm)) == before

        code, report, _ = meshctl_reconcile(nats_server)  # and it stays clean
        assert (code, report["missing"], report["extra"], report["different"]) == (0, [], [], [])
    except AssertionError:
        for a in agents:
            print(log_tail(a.log))
        raise
    finally:
        for a in agents:
            a.terminate()


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
