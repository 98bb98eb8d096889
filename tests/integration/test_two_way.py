"""Two-way CRM <-> ERP customer sync through canonical entities, field ownership and mappings,
with real agent processes and a real nats-server.

The ERP (`customers`: integer id, cents) and the CRM (`accounts`: text id, decimal strings) have
different shapes; each agent maps its rows to the canonical `customer/1` and back. Ownership:
the ERP is the system of record (it creates and deletes customers) and owns name and credit
limit; the CRM owns the e-mail address. The test proves convergence: after one change a bounded
number of events, then silence; after conflicting changes on both sides, each field ends with its
owner's value on both sides; non-owned writes are dropped and counted; a row the mapping cannot
convert is dead-lettered with the field and the reason while the flow goes on.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from typer.testing import CliRunner

from mesh.broker import free_port
from mesh.cli import dlq as cli_dlq
from tests._secure import SecuredNatsServer as NatsServer
from tests._secure import secure_agent
from tests.integration._harness import AgentProcess, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ERP_SCHEMA = """
CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT,
                        credit_limit_cents INTEGER NOT NULL DEFAULT 0);
"""
CRM_SCHEMA = """
CREATE TABLE accounts (account_id TEXT PRIMARY KEY, company TEXT NOT NULL, email_address TEXT,
                       credit_limit TEXT);
"""
OWNERSHIP = """
[flows.ownership]
system_of_record = "erp"
default_owner = "erp"
[flows.ownership.fields]
"contact.email" = "crm"
"""
ERP_TO_CANONICAL = """
[flows.to_canonical.fields]
id = { from = "id", convert = "str" }
name = "name"
"contact.email" = "email"
"credit_limit.amount" = "credit_limit_cents"
"credit_limit.currency" = { const = "EUR" }
"""
ERP_FROM_CANONICAL = """
[flows.from_canonical.fields]
id = { from = "id", convert = "int" }
name = "name"
email = "contact.email"
credit_limit_cents = "credit_limit.amount"
"""
CRM_TO_CANONICAL = """
[flows.to_canonical.fields]
id = "account_id"
name = "company"
"contact.email" = "email_address"
credit_limit = { from = "credit_limit", convert = "money", currency = "EUR" }
"""
CRM_FROM_CANONICAL = """
[flows.from_canonical.fields]
account_id = "id"
company = "name"
email_address = "contact.email"
credit_limit = { from = "credit_limit", convert = "money", currency = "EUR", as_string = true }
"""


def _agent(tmp: Path, name: str, system: str, url: str, db: Path, table: str, key: str, *,
           to_canonical: str, from_canonical: str, metrics_port: int) -> Path:  # fmt: skip
    cfg = tmp / f"{name}.toml"
    cfg.write_text(
        f"""
log_level = "info"
[agent]
name = "{name}"
system = "{system}"
state_dir = "{tmp / (name + "-state")}"
metrics_port = {metrics_port}
[nats]
servers = ["{url}"]
request_timeout = 2.0
creds = "{tmp / name}.creds"
inbox_prefix = "_INBOX.{name}"

[[flows]]
name = "{table}-out"
entity = "customer"
[flows.source]
adapter = "sqlite"
path = "{db}"
table = "{table}"
key = "{key}"
poll_interval = 0.02
{to_canonical}

[[flows]]
name = "{table}-in"
entity = "customer"
[flows.consumer]
fetch_timeout = 0.2
ack_wait = 5.0
[flows.retry]
initial_delay = 0.2
max_delay = 1.0
[flows.sink]
adapter = "sqlite"
path = "{db}"
table = "{table}"
key = "{key}"
{from_canonical}
{OWNERSHIP}
"""
    )
    return cfg


def _rows(db: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(db, timeout=30) as c:
        return c.execute(sql).fetchall()


def _write(db: Path, sql: str, *params: object) -> None:
    with sqlite3.connect(db, timeout=30) as c:
        c.execute(sql, params)


def _events(url: str, creds: Path) -> int:
    async def count() -> int:
        nc = await nats.connect(url, max_reconnect_attempts=1, user_credentials=str(creds))
        try:
            info = await nc.jetstream().stream_info("MESH_EVENTS")
            return int(info.state.messages)
        finally:
            await nc.close()

    return asyncio.run(count())


def _settle(url: str, creds: Path, quiet: float = 2.0, timeout: float = 30.0) -> int:
    """Wait until no new event appeared for ``quiet`` seconds; the stream's message count."""
    deadline = time.monotonic() + timeout
    last, since = _events(url, creds), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = _events(url, creds)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return now
    raise AssertionError(f"events kept coming for {timeout}s: two-way sync does not fall silent")


def _metric(port: int, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture
def agents(nats_server: NatsServer, tmp_path: Path) -> Iterator[tuple[Path, Path, int, int]]:
    erp_db, crm_db = tmp_path / "erp.db", tmp_path / "crm.db"
    for db, schema in ((erp_db, ERP_SCHEMA), (crm_db, CRM_SCHEMA)):
        with sqlite3.connect(db) as c:
            c.execute("PRAGMA journal_mode=WAL")
            c.executescript(schema)
    erp_port, crm_port = free_port(), free_port()
    url = nats_server.url
    erp = _agent(tmp_path, "erp-agent", "erp", url, erp_db, "customers", "id",
                 to_canonical=ERP_TO_CANONICAL, from_canonical=ERP_FROM_CANONICAL,
                 metrics_port=erp_port)  # fmt: skip
    crm = _agent(tmp_path, "crm-agent", "crm", url, crm_db, "accounts", "account_id",
                 to_canonical=CRM_TO_CANONICAL, from_canonical=CRM_FROM_CANONICAL,
                 metrics_port=crm_port)  # fmt: skip
    for cfg in (erp, crm):
        secure_agent(cfg, nats_server)
    procs = [AgentProcess(erp, tmp_path / "erp.log"), AgentProcess(crm, tmp_path / "crm.log")]
    for p in procs:
        p.start()
    try:
        yield erp_db, crm_db, erp_port, crm_port
    finally:
        for p in procs:
            assert p.terminate() == 0, p.log.read_text()[-3000:]


def test_two_way_sync_converges_and_owners_win(
    nats_server: NatsServer, agents: tuple[Path, Path, int, int]
) -> None:
    erp_db, crm_db, erp_port, crm_port = agents
    url = nats_server.url
    crm_rows = "SELECT account_id, company, email_address, credit_limit FROM accounts ORDER BY account_id"
    erp_rows = "SELECT id, name, email, credit_limit_cents FROM customers ORDER BY id"

    # The system of record creates customers: they appear in the CRM, in the CRM's shape.
    for i in range(1, 21):
        _write(erp_db, "INSERT INTO customers VALUES (?, ?, NULL, ?)", i, f"Customer {i}", i * 10_050)
    wait_until(lambda: len(_rows(crm_db, crm_rows)) == 20, 30, "ERP customers to reach the CRM")
    before = _settle(url, nats_server.admin_creds)
    assert _rows(crm_db, crm_rows)[0] == ("1", "Customer 1", None, "100.50")

    # One change on one side: a bounded number of events (the change, the other side's write
    # captured back), then silence.
    _write(crm_db, "UPDATE accounts SET email_address = 'ada@crm.example' WHERE account_id = '3'")
    email_3 = "SELECT email FROM customers WHERE id = 3"
    wait_until(lambda: _rows(erp_db, email_3) == [("ada@crm.example",)], 30, "CRM e-mail at the ERP")
    after = _settle(url, nats_server.admin_creds)
    assert 1 <= after - before <= 3, f"{after - before} events for one change"

    # Conflicting changes to the same customer on both sides at once: owners win, field by field.
    _write(erp_db, "UPDATE customers SET name = 'ERP name', email = 'erp@erp.example', "
                   "credit_limit_cents = 20000 WHERE id = 5")  # fmt: skip
    _write(crm_db, "UPDATE accounts SET company = 'CRM name', email_address = 'crm@crm.example', "
                   "credit_limit = '300.00' WHERE account_id = '5'")  # fmt: skip
    expected_erp = (5, "ERP name", "crm@crm.example", 20000)
    expected_crm = ("5", "ERP name", "crm@crm.example", "200.00")
    erp_5 = "SELECT id, name, email, credit_limit_cents FROM customers WHERE id = 5"
    crm_5 = "SELECT account_id, company, email_address, credit_limit FROM accounts WHERE account_id = '5'"
    wait_until(lambda: _rows(erp_db, erp_5) == [expected_erp] and _rows(crm_db, crm_5) == [expected_crm], 30,
               "both sides to converge on the owners' values")  # fmt: skip
    settled = _settle(url, nats_server.admin_creds)
    assert settled - after <= 8, f"{settled - after} events for two conflicting changes"
    assert _rows(erp_db, erp_5) == [expected_erp]
    assert _rows(crm_db, crm_5) == [expected_crm]
    # Everything else agrees too (in each side's own shape).
    erp = {str(r[0]): (r[1], r[2], r[3]) for r in _rows(erp_db, erp_rows)}
    crm = {r[0]: (r[1], r[2], round(float(str(r[3])) * 100)) for r in _rows(crm_db, crm_rows)}
    assert erp == crm

    # Non-owned writes were dropped and counted (the CRM's name and limit at the ERP, and so on).
    assert _metric(erp_port, "mesh_ownership_dropped_fields_total", flow="customers-in", origin="crm") > 0
    assert _metric(crm_port, "mesh_ownership_dropped_fields_total", flow="accounts-in", origin="erp") > 0

    # A customer the CRM creates is not the CRM's to create: the ERP does not get it.
    _write(crm_db, "INSERT INTO accounts VALUES ('99', 'Rogue', 'r@crm.example', '1.00')")
    time.sleep(1.5)
    assert _rows(erp_db, "SELECT id FROM customers WHERE id = 99") == []
    assert _metric(erp_port, "mesh_consumed_messages_total", flow="customers-in", outcome="unchanged") > 0

    # A row the mapping cannot convert (more decimals than EUR has) is dead-lettered at capture
    # with the field and the reason; the flow goes on.
    _write(crm_db, "UPDATE accounts SET credit_limit = '12.345' WHERE account_id = '7'")
    _write(crm_db, "UPDATE accounts SET email_address = 'next@crm.example' WHERE account_id = '8'")
    email_8 = "SELECT email FROM customers WHERE id = 8"
    wait_until(lambda: _rows(erp_db, email_8) == [("next@crm.example",)], 30, "the flow going on")
    env = {"MESH_CREDS": str(nats_server.admin_creds)}
    result = CliRunner().invoke(cli_dlq.app, ["list", "--json", "--server", url], env=env)
    assert result.exit_code == 0, result.output
    entries = json.loads(result.output)
    assert len(entries) == 1, entries
    entry = entries[0]
    text = json.dumps(entry)
    assert "credit_limit" in text
    assert "MappingError" in text
    assert "accounts-out" in text
    # Replaying it would only be refused again downstream: replay skips it and says what to do.
    result = CliRunner().invoke(cli_dlq.app, ["replay", "--flow", "accounts-out", "--server", url], env=env)
    out = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert "refused by the capture side's mapping" in out, out
    assert "change the record at its source again" in out
    entries = json.loads(CliRunner().invoke(cli_dlq.app, ["list", "--json", "--server", url], env=env).output)
    assert len(entries) == 1, "a skipped entry stays in the DLQ"
