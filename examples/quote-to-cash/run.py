"""Quote to cash: a CRM deal won becomes an ERP sales order and a finance invoice, by saga.

    python examples/quote-to-cash/run.py [--timeout 90] [--data-dir DIR]

Starts a nats-server (secured), a CRM and an ERP as SQLite databases, a fake finance REST API,
three connector agents (crm-agent.toml: captures won deals, serves api.crm.deal.set_status;
erp-agent.toml: serves api.erp.customer.get/create and api.erp.sales_order.create/cancel;
finance-agent.toml: serves api.finance.invoice.create as a REST call) and the orchestrator
(orchestrator.toml: the quote-to-cash saga). Then it shows three things:

1. the happy path: two deals won, one for a customer the ERP knows, one for a new customer
   (created through the ERP's API), each ending with one sales order, one invoice and the deal
   marked ``invoiced``;
2. the finance API refusing an invoice (a customer on credit hold): the saga compensates, the
   sales order is cancelled and the deal shows ``failed`` with the reason;
3. the orchestrator SIGKILLed while a saga's invoice call is in flight: a new orchestrator
   process takes the saga over and finishes it, with exactly one order and one invoice.

It prints each compensation run, then ``meshctl trace`` of a transaction that crossed the CRM,
the orchestrator, the ERP and finance. Needs no PostgreSQL and no reference data. See README.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import anyio
from _common import AgentProcess, Failed, Stack, fill, main, new_secret
from fake_finance import FakeFinance

HERE = Path(__file__).resolve().parent
SAGA = "quote-to-cash"

CRM_SCHEMA = """
CREATE TABLE deals (
    id INTEGER PRIMARY KEY,
    title TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    customer_name TEXT NOT NULL,
    amount_minor INTEGER NOT NULL,
    currency TEXT NOT NULL,
    stage TEXT NOT NULL DEFAULT 'open',
    status TEXT NOT NULL DEFAULT '',
    status_reason TEXT NOT NULL DEFAULT ''
);
-- The won-deal feed the CRM agent captures: one row per deal, written when it is won.
CREATE TABLE deals_won (
    deal_id INTEGER PRIMARY KEY,
    customer_id TEXT NOT NULL,
    customer_name TEXT NOT NULL,
    amount_minor INTEGER NOT NULL,
    currency TEXT NOT NULL
);
CREATE TRIGGER deal_won AFTER UPDATE OF stage ON deals
WHEN NEW.stage = 'won' AND OLD.stage <> 'won'
BEGIN
    INSERT OR IGNORE INTO deals_won VALUES
        (NEW.id, NEW.customer_id, NEW.customer_name, NEW.amount_minor, NEW.currency);
END;
INSERT INTO deals (id, title, customer_id, customer_name, amount_minor, currency) VALUES
    (1, 'Alfreds: 40 seats', 'ALFKI', 'Alfreds Futterkiste', 480000, 'EUR'),
    (2, 'Blauer See: support plan', 'BLAUS', 'Blauer See Delikatessen', 125000, 'EUR'),
    (3, 'Chop-suey: rollout', 'CHOPS', 'Chop-suey Chinese', 910000, 'CHF'),
    (4, 'Drachenblut: pilot', 'DRACD', 'Drachenblut Delikatessen', 75050, 'EUR');
"""

ERP_SCHEMA = """
CREATE TABLE customers (id TEXT PRIMARY KEY, name TEXT NOT NULL, currency TEXT NOT NULL);
CREATE TABLE sales_orders (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    number TEXT NOT NULL UNIQUE,
    deal_id INTEGER NOT NULL,
    customer_id TEXT NOT NULL REFERENCES customers (id),
    total_minor INTEGER NOT NULL CHECK (total_minor >= 0),
    currency TEXT NOT NULL,
    status TEXT NOT NULL,
    cancel_reason TEXT
);
INSERT INTO customers VALUES ('ALFKI', 'Alfreds Futterkiste', 'EUR');
"""

CREDIT_HOLD = {"CHOPS"}


def _db(path: Path, script: str | None = None) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=10, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    if script:
        conn.executescript(script)
    return conn


def _rows(path: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with contextlib.closing(_db(path)) as conn:
        return conn.execute(sql, args).fetchall()


@dataclass
class OrchestratorProcess(AgentProcess):
    """``meshctl orchestrator run`` as a child process (SIGKILLed in step 3)."""

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mesh", "orchestrator", "run", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env},
                start_new_session=True,
            )
        self.ready = False
        self._terminated = False

    def counts(self) -> str:
        m = self.metrics()
        if not m:
            return "starting" if self.alive() else "down"
        return (
            f"sagas started={m.get('mesh_sagas_started_total', 0):.0f}"
            f" finished={m.get('mesh_sagas_finished_total', 0):.0f}"
        )


class QuoteToCash:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.crm_db = stack.root / "crm.db"
        self.erp_db = stack.root / "erp.db"
        self.token = new_secret()
        self.finance = FakeFinance(self.token, CREDIT_HOLD)
        self.orchestrator: OrchestratorProcess | None = None

    # -- setting up --------------------------------------------------------------------------

    def databases(self) -> None:
        for db, script in ((self.crm_db, CRM_SCHEMA), (self.erp_db, ERP_SCHEMA)):
            for stale in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
                stale.unlink(missing_ok=True)
            _db(db, script).close()
        self.stack.info(f"CRM  {self.crm_db} (deals, deals_won)")
        self.stack.info(f"ERP  {self.erp_db} (customers: ALFKI only; sales_orders)")

    async def buckets(self) -> None:
        """The saga state and API results buckets, with the admin creds (the control plane's job)."""
        from mesh.api import ensure_results_bucket
        from mesh.saga.state import SAGA_BUCKET

        async with self.admin() as js:
            await ensure_results_bucket(js)
            await js.key_value(SAGA_BUCKET)

    def admin(self) -> Any:
        from mesh.config import NatsConfig
        from mesh.transport import JetStream

        assert self.stack.nats_server is not None
        cfg = NatsConfig(servers=[self.stack.nats_server.url], creds=str(self.stack.admin_creds))
        return JetStream(cfg, name="example-q2c")

    def start_orchestrator(self) -> OrchestratorProcess:
        """Write orchestrator.toml with its own least-privilege creds and start it."""
        from mesh.broker import free_port
        from mesh.saga.definition import load_orchestrator_config
        from mesh.security.authority import Authority, write_creds
        from mesh.security.jwt import new_seed, public_key_of_seed
        from mesh.security.permissions import permissions_for_orchestrator

        stack = self.stack
        assert stack.nats_server is not None
        config = stack.root / "orchestrator.toml"
        creds = stack.root / "creds" / "q2c-orchestrator.creds"
        if self.orchestrator is None:
            port = free_port()
            values = {"metrics_port": port, "nats_url": stack.nats_server.url}
            text = fill((HERE / "orchestrator.toml").read_text(encoding="utf-8"), lambda n: values[n])
            auth = f'creds = "{creds}"\ninbox_prefix = "_INBOX.q2c-orchestrator"\n'
            text = text.replace("\n[nats]\n", f"\n[nats]\n{auth}", 1)
            config.write_text(f"# Written by quote-to-cash/run.py from orchestrator.toml\n{text}", "utf-8")
            cfg = load_orchestrator_config(config)
            seed = new_seed("user")
            jwt = Authority.load(stack.root / "security").issue_user(
                cfg.orchestrator.name, public_key_of_seed(seed), permissions_for_orchestrator(cfg)
            )
            write_creds(creds, jwt, seed)
            proc = OrchestratorProcess("q2c-orchestrator", config, stack.root / "q2c-orchestrator.log", port)
            stack.agents.append(proc)
            self.orchestrator = proc
        proc = self.orchestrator
        proc.start()
        stack.info(
            f"orchestrator q2c-orchestrator (pid {proc.proc.pid if proc.proc else None}): config"
            f" {config}, log {proc.log}, metrics {proc.metrics_url}"
        )
        return proc

    # -- looking -------------------------------------------------------------------------------

    def deal(self, deal_id: int) -> tuple[str, str]:
        [(status, reason)] = _rows(
            self.crm_db, "SELECT status, status_reason FROM deals WHERE id = ?", deal_id
        )
        return status, reason

    def win(self, deal_id: int) -> None:
        with contextlib.closing(_db(self.crm_db)) as conn:
            conn.execute("UPDATE deals SET stage = 'won' WHERE id = ?", (deal_id,))
        [(title,)] = _rows(self.crm_db, "SELECT title FROM deals WHERE id = ?", deal_id)
        self.stack.info(f"CRM: deal {deal_id} '{title}' won")

    async def sagas(self) -> dict[int, Any]:
        """Saga records by the deal that started them."""
        from mesh.saga.state import SAGA_BUCKET, decode_record

        out = {}
        async with self.admin() as js:
            bucket = await js.key_value(SAGA_BUCKET, create=False)
            async with await bucket.watch() as watch:
                while True:
                    update = await watch.next(timeout=5.0)
                    if update is None or update.op == "loaded":
                        break
                    if update.op == "delete":
                        continue
                    rec = decode_record(update.value)
                    deal = (rec.trigger.get("payload") or {}).get("deal_id")
                    if isinstance(deal, int):
                        out[deal] = rec
        return out

    async def wait_deal(
        self, deal_id: int, statuses: set[str], what: str, timeout: float | None = None
    ) -> None:
        async def done() -> bool:
            return self.deal(deal_id)[0] in statuses

        async def status() -> str:
            orders = _rows(self.erp_db, "SELECT count(*) FROM sales_orders")[0][0]
            return f"ERP orders={orders} | finance invoices={len(self.finance.invoices)}"

        await self.stack.wait_until(done, what, status=status, timeout=timeout)

    def show_deal(self, deal_id: int) -> None:
        status, reason = self.deal(deal_id)
        self.stack.info(f"CRM: deal {deal_id} status={status!r} reason={reason!r}")

    async def meshctl(self, *args: str, may_fail: bool = False) -> str:
        assert self.stack.nats_server is not None
        proc = await anyio.run_process(
            [sys.executable, "-m", "mesh", *args],
            check=False,
            env={
                **os.environ,
                "MESH_CREDS": str(self.stack.admin_creds),
                "MESH_NATS_URL": self.stack.nats_server.url,
                "COLUMNS": "200",
            },
        )
        out = proc.stdout.decode(errors="replace")
        if proc.returncode != 0 and not may_fail:
            raise Failed(f"meshctl {' '.join(args)} failed: {proc.stderr.decode(errors='replace').strip()}")
        return out


async def scenario(stack: Stack) -> bool:
    q = QuoteToCash(stack)
    stack.step(
        "starting nats-server, the CRM and ERP databases, the finance API, three agents and the orchestrator"
    )
    stack.nats()
    await q.buckets()
    q.databases()
    finance_url = await stack.serve(q.finance.app(), "fake finance API")
    crm = stack.agent(HERE / "crm-agent.toml", "crm-agent", crm_db=q.crm_db)
    erp = stack.agent(HERE / "erp-agent.toml", "erp-agent", erp_db=q.erp_db)
    fin = stack.agent(
        HERE / "finance-agent.toml", "finance-agent", env={"FINANCE_TOKEN": q.token}, finance_url=finance_url
    )
    q.start_orchestrator()
    for a in (crm, erp, fin, q.orchestrator):
        assert a is not None
        await a.wait_ready(stack.timeout)
    listing = await q.meshctl("api", "list")
    for line in listing.strip().splitlines():
        stack.info(line)

    # 1. the happy path ---------------------------------------------------------------------
    stack.step("1. happy path: deal 1 (a customer the ERP knows) and deal 2 (a new customer) are won")
    q.win(1)
    q.win(2)
    await q.wait_deal(1, {"invoiced", "failed"}, "deal 1 to be invoiced")
    await q.wait_deal(2, {"invoiced", "failed"}, "deal 2 to be invoiced")
    await stack.sample_event("evt.deal.upserted.crm", "1")
    q.show_deal(1)
    q.show_deal(2)

    # 2. finance refuses: compensation -------------------------------------------------------
    stack.step("2. the finance API refuses deal 3's invoice (customer CHOPS is on credit hold)")
    q.win(3)
    await q.wait_deal(3, {"failed", "invoiced"}, "deal 3's saga to compensate")
    sagas = await q.sagas()
    rec3 = sagas.get(3)
    compensations: list[str] = []
    if rec3 is not None:
        async with q.admin() as js:  # the state is saved before the deal's status is written
            from mesh.saga.state import SAGA_BUCKET, decode_record

            bucket = await js.key_value(SAGA_BUCKET, create=False)
            deadline = time.monotonic() + stack.timeout
            while rec3.state not in ("compensated", "failed") and time.monotonic() < deadline:
                await anyio.sleep(0.1)
                entry = await bucket.get(rec3.id)
                rec3 = decode_record(entry.value) if entry is not None else rec3
        stack.info(f"saga {rec3.id}: {rec3.state}; {rec3.error}")
        done = sorted((s for s in rec3.steps if s.compensated_at), key=lambda s: s.compensated_at or 0)
        for s in done:
            comp = next(d for d in rec3.definition.steps if d.name == s.name).compensate
            assert comp is not None
            line = f"compensation ran: step {s.name} undone by {comp.subject}"
            compensations.append(s.name)
            stack.info(line)
    q.show_deal(3)

    # 3. SIGKILL mid-saga ---------------------------------------------------------------------
    stack.step("3. deal 4 is won; the orchestrator is SIGKILLed while the invoice call is in flight")
    arrived = q.finance.hold("SO-4")
    q.win(4)
    with anyio.fail_after(stack.timeout):
        await arrived.wait()
    orch = q.orchestrator
    assert orch is not None
    assert orch.proc is not None
    rec4 = (await q.sagas()).get(4)
    at = [f"{s.name}={s.state}" for s in rec4.steps] if rec4 is not None else []
    stack.info(f"finance received the invoice POST for SO-4; saga steps: {', '.join(at)}")
    old_pid = orch.proc.pid
    orch.proc.kill()
    orch.proc.wait(10)
    stack.info(f"orchestrator pid {old_pid} SIGKILLed (mid-saga: step invoice running)")
    q.finance.release("SO-4")  # the finance call the dead orchestrator made now completes
    q.start_orchestrator()
    await q.wait_deal(4, {"invoiced", "failed"}, "deal 4's saga to be finished by the new orchestrator")
    q.show_deal(4)
    rec4 = (await q.sagas()).get(4)

    # verification ----------------------------------------------------------------------------
    stack.step("verification")
    ok = True
    sql = "SELECT deal_id, number, status, count(*) OVER (PARTITION BY deal_id) FROM sales_orders"
    orders = {d: (n, s, c) for d, n, s, c in _rows(q.erp_db, sql)}
    customers = {i: n for i, n in _rows(q.erp_db, "SELECT id, name FROM customers")}
    for d in (1, 2, 4):
        status, reason = q.deal(d)
        ok &= stack.check(
            status == "invoiced" and f"SO-{d}" in reason,
            f"deal {d} is invoiced ({reason})",
            f"status {status!r}, reason {reason!r}",
        )
        n = orders.get(d)
        ok &= stack.check(
            n is not None and n[1] == "confirmed" and n[2] == 1,
            f"deal {d}: exactly one confirmed ERP sales order SO-{d}",
            f"{n}",
        )
        ok &= stack.check(
            q.finance.count(f"SO-{d}") == 1,
            f"deal {d}: exactly one finance invoice",
            f"{q.finance.count(f'SO-{d}')} invoices",
        )
    ok &= stack.check(
        customers.get("ALFKI") == "Alfreds Futterkiste", "ERP customer ALFKI was found, left as it was"
    )
    ok &= stack.check(
        customers.get("BLAUS") == "Blauer See Delikatessen" and customers.get("DRACD") is not None,
        "ERP customers BLAUS and DRACD were created through api.erp.customer.create",
        f"{customers}",
    )
    status3, reason3 = q.deal(3)
    ok &= stack.check(
        status3 == "failed" and "credit hold" in reason3,
        "deal 3 is failed and shows the finance API's reason",
        f"{status3!r} {reason3!r}",
    )
    n3 = orders.get(3)
    ok &= stack.check(
        n3 is not None and n3[1] == "cancelled" and n3[2] == 1,
        "deal 3: its one sales order SO-3 was cancelled (compensation)",
        f"{n3}",
    )
    ok &= stack.check(
        q.finance.count("SO-3") == 0 and "SO-3" in q.finance.refused,
        "deal 3: finance refused the invoice and holds none",
    )
    ok &= stack.check(
        compensations == ["sales_order", "deal_processing"],
        "compensations ran in reverse order: sales_order, then deal_processing",
        f"{compensations}",
    )
    attempts = rec4.step("invoice").attempts if rec4 is not None else 0
    ok &= stack.check(
        rec4 is not None and rec4.state == "completed" and attempts == 2,
        f"deal 4: the new orchestrator took the saga over and repeated the invoice step"
        f" (attempt {attempts}) with the same idempotency key: answered from the first"
        f" call's result (finance saw {q.finance.posts['SO-4']} POST(s) for SO-4)",
        f"{rec4}",
    )

    # the trace of one transaction -------------------------------------------------------------
    stack.step("meshctl trace deal:2 (one transaction: CRM -> orchestrator -> ERP -> finance -> CRM)")
    want = {"crm", "erp", "finance", "orchestrator"}

    async def traced(ident: str, status: str) -> tuple[str, dict[str, Any]]:
        deadline = time.monotonic() + 15
        while True:
            found = json.loads(await q.meshctl("trace", ident, "--json", may_fail=True) or "{}")
            txn = (found.get("transactions") or [{}])[-1]
            systems = {r.get("system") for r in txn.get("records", [])}
            if (want <= systems and txn.get("status") == status) or time.monotonic() > deadline:
                return await q.meshctl("trace", ident), txn
            await anyio.sleep(0.3)

    text, txn2 = await traced("deal:2", "completed")
    for line in text.rstrip().splitlines():
        stack.info(line)
    systems2 = {r.get("system") for r in txn2.get("records", [])}
    ok &= stack.check(
        want <= systems2 and txn2.get("status") == "completed",
        "deal 2's transaction crossed crm, orchestrator, erp and finance and is completed",
        f"{txn2.get('status')} {sorted(s for s in systems2 if s)}",
    )
    _, txn3 = await traced("deal:3", "compensated")
    ok &= stack.check(
        txn3.get("status") == "compensated",
        "deal 3's transaction is compensated",
        f"{txn3.get('status')}: {txn3.get('reason')}",
    )
    return ok


if __name__ == "__main__":
    main(
        "quote-to-cash",
        "CRM deal won -> ERP sales order -> finance invoice, by saga (SQLite + REST)",
        scenario,
    )
