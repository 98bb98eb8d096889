"""Reconciliation in process: two ReconcileServices over the in-memory transport, real SQLite
files. Drift injected behind the mesh's back is found exactly; a 20k-row table is read in chunks
and only the buckets that differ are drilled into (asserted on request and chunk counts)."""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from mesh.config import AgentConfig, parse_agent_config
from mesh.controlplane.metrics import ControlPlaneMetrics
from mesh.controlplane.settings import settings_from
from mesh.errors import ConfigError
from mesh.reconcile import (
    Difference,
    ReconcileError,
    Reconciler,
    ReconcileRequest,
    ReconcileService,
    reconcile_subject,
)
from mesh.reconcile.schedule import ReconcileSchedule, ReconcileScheduler
from mesh.transport.memory import MemoryBroker, MemoryTransport

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

SCHEMA = (
    "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT, credit_cents INTEGER)"
)
CRM_SCHEMA = (
    "CREATE TABLE accounts (account_id TEXT PRIMARY KEY, company TEXT, email_address TEXT, credit TEXT)"
)


def _config(name: str, system: str, flow: str) -> AgentConfig:
    return parse_agent_config(
        f'[agent]\nname = "{name}"\nsystem = "{system}"\nstate_dir = "/nonexistent"\n{flow}'
    )


def erp_flow(db: Path) -> str:
    return f"""
[[flows]]
name = "customers"
entity = "customer"
[flows.source]
adapter = "sqlite"
path = "{db}"
table = "customers"
key = "id"
[flows.to_canonical.fields]
id = {{ from = "id", convert = "str" }}
name = "name"
"contact.email" = "email"
"credit_limit.amount" = "credit_cents"
"credit_limit.currency" = {{ const = "EUR" }}
"""


def crm_flow(db: Path, ownership: str = "") -> str:
    return f"""
[[flows]]
name = "customers"
entity = "customer"
[flows.sink]
adapter = "sqlite"
path = "{db}"
table = "accounts"
key = "account_id"
[flows.from_canonical.fields]
account_id = "id"
company = "name"
email_address = "contact.email"
credit = {{ from = "credit_limit", convert = "money", currency = "EUR", as_string = true }}
{ownership}"""


def fill(erp: Path, crm: Path, n: int) -> None:
    """``n`` customers in the ERP and, as the mesh would have written them, in the CRM."""
    rows = [(i, f"Customer {i}", f"c{i}@example.com", i * 100 + 5) for i in range(1, n + 1)]
    with sqlite3.connect(erp) as c:
        c.execute(SCHEMA)
        c.executemany("INSERT INTO customers VALUES (?, ?, ?, ?)", rows)
    with sqlite3.connect(crm) as c:
        c.execute(CRM_SCHEMA)
        c.executemany(
            "INSERT INTO accounts VALUES (?, ?, ?, ?)",
            [(str(i), name, email, f"{cents // 100}.{cents % 100:02d}") for i, name, email, cents in rows],
        )


@asynccontextmanager
async def mesh(erp: Path, crm: Path, ownership: str = "") -> AsyncIterator[MemoryTransport]:
    """The two agents' reconcile services on one in-memory broker; yields the operator's client."""
    broker = MemoryBroker()
    agents = [
        _config("erp-agent", "erp", erp_flow(erp)),
        _config("crm-agent", "crm", crm_flow(crm, ownership)),
    ]
    async with anyio.create_task_group() as tg:
        for cfg in agents:
            t = await MemoryTransport(broker, name=cfg.agent.name).__aenter__()
            flows = {f.name: f for f in cfg.flows}
            svc = ReconcileService(cfg.agent.name, cfg.agent.system, flows.get)
            await tg.start(functools.partial(t.serve, reconcile_subject(cfg.agent.name), svc.answer))
        async with MemoryTransport(broker, name="meshctl") as op:
            yield op
        tg.cancel_scope.cancel()


def reconciler(op: MemoryTransport, *, chunk: int = 1000, buckets: int = 1024) -> Reconciler:
    return Reconciler(op, "customers", ["erp-agent", "crm-agent"], timeout=30, chunk=chunk, buckets=buckets)


async def test_clean_then_exactly_the_injected_drift(tmp_path: Path) -> None:
    erp, crm = tmp_path / "erp.db", tmp_path / "crm.db"
    fill(erp, crm, 200)
    async with mesh(erp, crm) as op:
        report = await reconciler(op).compare()
        assert report.clean
        assert (report.targets[0].source_count, report.targets[0].target_count) == (200, 200)
        with sqlite3.connect(crm) as c:
            c.execute("DELETE FROM accounts WHERE account_id = '17'")
            c.execute("UPDATE accounts SET company = 'Renamed' WHERE account_id = '42'")
            c.execute("UPDATE accounts SET credit = '0.00', email_address = NULL WHERE account_id = '150'")
            c.execute("INSERT INTO accounts VALUES ('9001', 'Stranger', NULL, '1.00')")
        report = await reconciler(op).compare()
    assert report.missing == ["17"]
    assert report.extra == ["9001"]
    assert report.different == [Difference("42", ["company"]), Difference("150", ["credit", "email_address"])]


async def test_20k_rows_are_read_in_chunks_and_only_differing_buckets_drilled(tmp_path: Path) -> None:
    erp, crm = tmp_path / "erp.db", tmp_path / "crm.db"
    fill(erp, crm, 20_000)
    with sqlite3.connect(crm) as c:
        c.execute("UPDATE accounts SET company = 'Drifted' WHERE account_id = '12345'")
    async with mesh(erp, crm) as op:
        report = await reconciler(op, chunk=500, buckets=256).compare()
    assert report.different == [Difference("12345", ["company"])]
    t = report.targets[0]
    # one digests request per side, each reading 20000 / 500 = 40 chunks; one bucket differs:
    # one records request per side, each again a chunked scan (40 chunks)
    assert t.requests == {"digests": 2, "records": 2}
    assert t.chunks == 4 * 40


async def test_a_source_agent_must_answer(tmp_path: Path) -> None:
    erp, crm = tmp_path / "erp.db", tmp_path / "crm.db"
    fill(erp, crm, 3)
    async with mesh(erp, crm) as op:
        rec = Reconciler(op, "customers", ["crm-agent", "nobody"], timeout=1)
        with pytest.raises(ReconcileError, match="reconcile needs a source agent"):
            await rec.compare()
        rec = Reconciler(op, "orders", ["erp-agent", "crm-agent"], timeout=1)
        with pytest.raises(ReconcileError, match="reconcile needs a source agent"):
            await rec.compare()


async def test_extras_are_kept_when_ownership_forbids_the_delete(tmp_path: Path) -> None:
    erp, crm = tmp_path / "erp.db", tmp_path / "crm.db"
    fill(erp, crm, 5)
    with sqlite3.connect(crm) as c:
        c.execute("INSERT INTO accounts VALUES ('77', 'CRM-only', NULL, '1.00')")
    ownership = '[flows.ownership]\nsystem_of_record = "crm"\n'
    async with mesh(erp, crm, ownership) as op:
        rec = reconciler(op)
        report = await rec.compare()
        assert report.extra == ["77"]
        done = await rec.repair(report)
    assert done == {"reemitted": 0, "deleted": 0}
    assert report.kept_extra == ["77"]
    with sqlite3.connect(crm) as c:
        assert c.execute("SELECT count(*) FROM accounts WHERE account_id = '77'").fetchone() == (1,)


async def test_scheduled_reconcile_sets_the_gauge_and_audits(tmp_path: Path) -> None:
    erp, crm = tmp_path / "erp.db", tmp_path / "crm.db"
    fill(erp, crm, 10)
    with sqlite3.connect(crm) as c:
        c.execute("DELETE FROM accounts WHERE account_id IN ('3', '4')")
        c.execute("UPDATE accounts SET company = 'x' WHERE account_id = '5'")
    metrics = ControlPlaneMetrics()
    entries: list[tuple[str, str, str, str, dict[str, str]]] = []
    audited = anyio.Event()

    async def audit(kind: str, who: str, target: str, what: str, detail: dict[str, str]) -> None:
        entries.append((kind, who, target, what, detail))
        audited.set()

    settings = settings_from(
        {"reconcile": [{"flow": "customers", "every": 1, "agents": ["erp-agent", "crm-agent"]}]}
    )
    leader = True
    async with mesh(erp, crm) as op:
        scheduler = ReconcileScheduler(
            op, settings.reconcile, gauge=metrics.reconcile_exceptions, audit=audit,
            agents=lambda: [], is_leader=lambda: leader, who="schedule@cp-1",
        )  # fmt: skip
        async with anyio.create_task_group() as tg:
            await tg.start(scheduler.run)
            with anyio.fail_after(20):
                await audited.wait()
            tg.cancel_scope.cancel()
    assert entries[0][:4] == ("reconcile", "schedule@cp-1", "customers", "missing 2, extra 0, different 1")

    def value(kind: str) -> float | None:
        return metrics.registry.get_sample_value(
            "mesh_reconcile_exceptions", {"flow": "customers", "kind": kind}
        )

    assert (value("missing"), value("extra"), value("different"), value("error")) == (2, 0, 1, 0)


async def test_a_scheduled_run_that_cannot_complete_is_counted_as_error(tmp_path: Path) -> None:
    erp, crm = tmp_path / "erp.db", tmp_path / "crm.db"
    fill(erp, crm, 2)
    metrics = ControlPlaneMetrics()
    entries: list[str] = []

    async def audit(kind: str, who: str, target: str, what: str, detail: dict[str, str]) -> None:
        entries.append(what)

    schedule = ReconcileSchedule(flow="customers", agents=["crm-agent"], timeout=1)
    async with mesh(erp, crm) as op:
        scheduler = ReconcileScheduler(
            op, [schedule], gauge=metrics.reconcile_exceptions, audit=audit,
            agents=lambda: [], is_leader=lambda: True, who="cp",
        )  # fmt: skip
        assert await scheduler.run_once(schedule) is None
    assert entries == [entries[0]]
    assert entries[0].startswith("failed: flow customers: reconcile needs a source agent")
    sample = metrics.registry.get_sample_value(
        "mesh_reconcile_exceptions", {"flow": "customers", "kind": "error"}
    )
    assert sample == 1


def test_settings_refuse_a_bad_schedule() -> None:
    with pytest.raises(ConfigError, match=r"reconcile"):
        settings_from({"reconcile": [{"flow": "customers", "every": 0.1}]})


async def test_fields_the_source_does_not_own_are_not_compared(tmp_path: Path) -> None:
    erp, crm = tmp_path / "erp.db", tmp_path / "crm.db"
    fill(erp, crm, 10)
    with sqlite3.connect(crm) as c:  # the CRM owns the e-mail address: its own edit is no drift
        c.execute("UPDATE accounts SET email_address = 'sales@crm.example' WHERE account_id = '2'")
        c.execute("UPDATE accounts SET company = 'Renamed', email_address = NULL WHERE account_id = '3'")
    ownership = (
        '[flows.ownership]\ndefault_owner = "crm"\n[flows.ownership.fields]\nname = "erp"\n'
        'credit_limit = "erp"\n'
    )
    async with mesh(erp, crm, ownership) as op:
        rec = reconciler(op)
        report = await rec.compare()
    assert rec.sinks["crm-agent"].fields == ["account_id", "company", "credit"]
    assert report.different == [Difference("3", ["company"])]


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_cron_scheduled_reconcile_runs_at_the_scheduled_times(tmp_path: Path) -> None:
    """``schedule = "0 3 * * *"`` in Europe/Berlin, on a clock moved by hand: nothing before 03:00
    Berlin (02:00 UTC in winter), one run at it, the next due a day later; a non-leader never runs."""
    from datetime import datetime, timedelta
    from zoneinfo import ZoneInfo

    erp, crm = tmp_path / "erp.db", tmp_path / "crm.db"
    fill(erp, crm, 4)
    with sqlite3.connect(crm) as c:
        c.execute("DELETE FROM accounts WHERE account_id = '2'")
    berlin = ZoneInfo("Europe/Berlin")
    three = datetime(2026, 12, 4, 3, tzinfo=berlin).timestamp()
    clock = _Clock(three - 3600)
    metrics = ControlPlaneMetrics()
    whats: list[str] = []
    audited = anyio.Event()

    async def audit(kind: str, who: str, target: str, what: str, detail: dict[str, str]) -> None:
        whats.append(what)
        audited.set()

    settings = settings_from({"reconcile": [{
        "flow": "customers", "schedule": "0 3 * * *", "timezone": "Europe/Berlin",
        "agents": ["erp-agent", "crm-agent"],
    }]})  # fmt: skip
    leader = [True]
    async with mesh(erp, crm) as op:
        scheduler = ReconcileScheduler(
            op, settings.reconcile, gauge=metrics.reconcile_exceptions, audit=audit,
            agents=lambda: [], is_leader=lambda: leader[0], who="cp", now=clock, tick=0.01,
        )  # fmt: skip
        async with anyio.create_task_group() as tg:
            await tg.start(scheduler.run)
            with anyio.fail_after(10):
                while scheduler.due.get("customers") is None:
                    await anyio.sleep(0.01)
            assert scheduler.due["customers"] == three
            assert whats == []
            clock.now = three
            with anyio.fail_after(20):
                await audited.wait()
                while scheduler.due["customers"] == three:
                    await anyio.sleep(0.01)
            assert whats == ["missing 1, extra 0, different 0"]
            nxt = datetime(2026, 12, 5, 3, tzinfo=berlin).timestamp()
            assert scheduler.due["customers"] == nxt == three + timedelta(days=1).total_seconds()
            leader[0] = False  # a standby replica lets the time pass
            clock.now = nxt
            with anyio.fail_after(10):
                while scheduler.due["customers"] == nxt:
                    await anyio.sleep(0.01)
            assert scheduler.runs == 1
            tg.cancel_scope.cancel()


def test_settings_check_the_cron_schedule() -> None:
    s = settings_from({"reconcile": [{"flow": "a", "schedule": "0 3 * * *"}, {"flow": "b"}]})
    assert [(r.schedule, r.interval) for r in s.reconcile] == [("0 3 * * *", 3600.0), (None, 3600.0)]
    with pytest.raises(ConfigError, match=r"not a valid cron expression"):
        settings_from({"reconcile": [{"flow": "customers", "schedule": "0 3 * *"}]})
    with pytest.raises(ConfigError, match=r"unknown time zone"):
        settings_from(
            {"reconcile": [{"flow": "customers", "schedule": "0 3 * * *", "timezone": "Mars/Base"}]}
        )
    with pytest.raises(ConfigError, match=r"not both"):
        settings_from({"reconcile": [{"flow": "customers", "schedule": "0 3 * * *", "every": 60}]})


def two_way_flow(db: Path) -> str:
    return f"""
[[flows]]
name = "customers"
entity = "customer"
[flows.source]
adapter = "sqlite"
path = "{db}"
table = "customers"
key = "id"
mode = "changes"
[flows.sink]
adapter = "sqlite"
path = "{db}"
table = "customers"
key = "id"
[flows.to_canonical.fields]
id = {{ from = "id", convert = "str" }}
name = "name"
"contact.email" = "email"
[flows.from_canonical.fields]
id = {{ from = "id", convert = "int" }}
name = "name"
email = "contact.email"
"""


@asynccontextmanager
async def two_way_mesh(erp: Path, crm: Path) -> AsyncIterator[MemoryTransport]:
    broker = MemoryBroker()
    agents = [
        _config("erp-agent", "erp", two_way_flow(erp)),
        _config("crm-agent", "crm", two_way_flow(crm)),
    ]
    async with anyio.create_task_group() as tg:
        for cfg in agents:
            t = await MemoryTransport(broker, name=cfg.agent.name).__aenter__()
            flows = {f.name: f for f in cfg.flows}
            svc = ReconcileService(cfg.agent.name, cfg.agent.system, flows.get)
            await tg.start(functools.partial(t.serve, reconcile_subject(cfg.agent.name), svc.answer))
        async with MemoryTransport(broker, name="meshctl") as op:
            yield op
        tg.cancel_scope.cancel()


async def test_a_two_way_flow_is_compared_in_both_directions(tmp_path: Path) -> None:
    """Each agent runs the flow's source AND sink: one (source, sink) pair per direction, never an
    agent against itself; drift shows from both sides (a row only the CRM has is extra there and
    missing in the ERP)."""
    erp, crm = tmp_path / "erp.db", tmp_path / "crm.db"
    for db in (erp, crm):
        with sqlite3.connect(db) as c:
            c.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, email TEXT)")
            c.executemany(
                "INSERT INTO customers VALUES (?, ?, ?)", [(i, f"C{i}", f"c{i}@x") for i in range(1, 11)]
            )
    async with two_way_mesh(erp, crm) as op:
        rec = reconciler(op)
        assert (await rec.compare()).clean
        assert sorted((p.source, p.sink) for p in rec.pairs) == [
            ("crm-agent", "erp-agent"), ("erp-agent", "crm-agent"),
        ]  # fmt: skip
        with sqlite3.connect(crm) as c:
            c.execute("DELETE FROM customers WHERE id = 3")
            c.execute("INSERT INTO customers VALUES (99, 'CRM only', NULL)")
        with sqlite3.connect(erp) as c:
            c.execute("UPDATE customers SET name = 'Renamed' WHERE id = 5")
        report = await reconciler(op).compare()
    by_pair = {(t.source, t.agent): t for t in report.targets}
    to_crm, to_erp = by_pair[("erp-agent", "crm-agent")], by_pair[("crm-agent", "erp-agent")]
    assert (to_crm.missing, to_crm.extra, to_crm.different) == (["3"], ["99"], [Difference("5", ["name"])])
    assert (to_erp.missing, to_erp.extra, to_erp.different) == (["99"], ["3"], [Difference("5", ["name"])])
    assert (to_crm.source_count, to_crm.target_count) == (10, 10)
    assert (report.missing, report.extra) == (["3", "99"], ["3", "99"])
    assert report.different == [Difference("5", ["name"])]


async def test_a_side_the_agent_does_not_run_is_refused_by_name(tmp_path: Path) -> None:
    erp, crm = tmp_path / "erp.db", tmp_path / "crm.db"
    fill(erp, crm, 2)
    async with mesh(erp, crm) as op:
        rec = reconciler(op)
        with pytest.raises(ReconcileError, match=r"^agent crm-agent runs no source of flow 'customers'$"):
            await rec.ask("crm-agent", ReconcileRequest(op="digests", flow="customers", side="source"))


async def test_a_two_way_repair_sends_each_key_one_way_and_deletes_nothing_a_source_holds(
    tmp_path: Path,
) -> None:
    """A key that differs both ways is re-emitted by the first agent named only (else the two
    re-emissions would swap the values); a row only the CRM has is sent to the ERP, not deleted
    as the CRM's "extra" of the other direction; a row the CRM lost comes back from the ERP."""
    from adapters.sql._sqlite_capture import change_table, install_change_capture

    erp, crm = tmp_path / "erp.db", tmp_path / "crm.db"
    for db in (erp, crm):
        with sqlite3.connect(db) as c:
            c.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, email TEXT)")
            c.executemany(
                "INSERT INTO customers VALUES (?, ?, ?)", [(i, f"C{i}", f"c{i}@x") for i in range(1, 11)]
            )
    with sqlite3.connect(crm) as c:
        c.execute("DELETE FROM customers WHERE id = 3")
        c.execute("INSERT INTO customers VALUES (99, 'CRM only', NULL)")
    with sqlite3.connect(erp) as c:
        c.execute("UPDATE customers SET name = 'Renamed' WHERE id = 5")
    for db in (erp, crm):
        await install_change_capture(db, "customers")
    async with two_way_mesh(erp, crm) as op:
        rec = reconciler(op)  # agents in this order: erp-agent first
        report = await rec.compare()
        done = await rec.repair(report)
    assert done == {"reemitted": 3, "deleted": 0}

    def restamped(db: Path) -> list[int]:
        with sqlite3.connect(db) as c:
            rows = c.execute(f"SELECT pk FROM {change_table('customers')} WHERE op = 'U' ORDER BY pk")
            return [int(r[0]) for r in rows.fetchall()]

    assert restamped(erp) == [3, 5]
    assert restamped(crm) == [99]
    with sqlite3.connect(crm) as c:
        assert c.execute("SELECT count(*) FROM customers WHERE id = 99").fetchone() == (1,)
