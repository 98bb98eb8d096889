"""The runnable examples in examples/ run as a user runs them and verify what they show.

Each ``run.py`` starts its own nats-server, fake APIs and agent processes (and, but for
quote-to-cash, a PostgreSQL cluster), makes its changes, checks the targets, and stops
everything. These tests run each one briefly and hold it to its contract: exit 0 with its
verification passed and a decoded canonical event shown; exit 2 naming what is missing; on
Ctrl-C exit 130; and in every case no process left behind.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DATA = Path(os.environ.get("MESH_DATA_DIR") or Path(__file__).resolve().parents[3] / "shared" / "data")
NORTHWIND = DATA / "northwind" / "northwind-postgres.sql"
needs_northwind = pytest.mark.skipif(
    not NORTHWIND.is_file(), reason=f"reference data (Northwind) not found at {NORTHWIND}"
)


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd and int(pid) != os.getpid():
            found.append(f"{pid}: {cmd}")
    return found


def _left_behind(out: str, run_dir: Path) -> list[str]:
    """Processes of the run still alive: any whose command line names the run directory, and
    any PID the example printed (PostgreSQL's data directory may live outside the run dir)."""
    left = _processes_mentioning(str(run_dir))
    for pid in {int(p) for p in re.findall(r"\(pid (\d+)", out)}:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except OSError:
            continue
        if state != "Z":
            left.append(f"{pid} (printed by the example)")
    return left


def _run(name: str, run_dir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(EXAMPLES / name / "run.py"), "--data-dir", str(run_dir), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})},
    )  # fmt: skip


@needs_northwind
@pytest.mark.parametrize(
    ("name", "shows"),
    [
        ("erp-to-crm", ["sample event on evt.customer.upserted.erp", '"schema": "customer/1"',
                        '"schema": "product/1"', '"sales_price": {"amount": 1800, "currency": "USD"}']),
        ("deals-to-orders", ["sample event on evt.sales_order.upserted.crm", '"schema": "sales_order/1"',
                             '"unit_price": {"amount": 2100, "currency": "USD"}', "fk_orders_customers"]),
        ("invoices-to-finance", ["sample event on evt.invoice.upserted.erp", '"schema": "invoice/1"',
                                 '"line_amount": {"amount": 16800, "currency": "USD"}', "to the cent"]),
    ],
)  # fmt: skip
def test_example_runs_and_verifies(tmp_path: Path, name: str, shows: list[str]) -> None:
    run_dir = tmp_path / "run"
    proc = _run(name, run_dir, "--duration", "1", "--timeout", "60")
    out, _ = proc.communicate(timeout=110)
    assert proc.returncode == 0, out[-6000:]
    assert "verification passed" in out
    assert "FAIL" not in out
    for text in shows:
        assert text in out, f"{text!r} not shown:\n{out[-4000:]}"
    assert (run_dir / "erp-agent.toml").is_file()  # the rendered config is kept for the user
    assert not _left_behind(out, run_dir), "the example left processes behind"


def test_quote_to_cash_compensates_and_survives_a_sigkill(tmp_path: Path) -> None:
    """SQLite CRM and ERP, a fake finance API, three agents and the orchestrator (no PostgreSQL,
    no reference data): the happy path, a refused invoice compensated, a SIGKILLed orchestrator
    finishing its saga once, and the trace of one transaction across the systems."""
    run_dir = tmp_path / "run"
    proc = _run("quote-to-cash", run_dir, "--timeout", "60")
    out, _ = proc.communicate(timeout=110)
    assert proc.returncode == 0, out[-6000:]
    assert "verification passed" in out
    assert "FAIL" not in out
    for text in [
        "compensation ran: step sales_order undone by api.erp.sales_order.cancel",
        "compensation ran: step deal_processing undone by api.crm.deal.set_status",
        "reason='step invoice failed after 1 attempt(s): api.finance.invoice.create: rejected:",
        "SIGKILLed (mid-saga: step invoice running)",
        "ok   deal 4: exactly one confirmed ERP sales order SO-4",
        "ok   deal 4: exactly one finance invoice",
        "systems: crm -> orchestrator -> erp -> finance",
        "api_call       finance-agent/finance",
        "saga_completed  (quote-to-cash)",
    ]:
        assert text in out, f"{text!r} not shown:\n{out[-4000:]}"
    assert re.search(r"transaction \S+: completed", out), out[-4000:]
    assert (run_dir / "orchestrator.toml").is_file()
    assert not _left_behind(out, run_dir), "the example left processes behind"


@needs_northwind
def test_ctrl_c_stops_everything_it_started(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _run("erp-to-crm", run_dir, "--duration", "30")
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    head = []
    for line in proc.stdout:
        head.append(line)
        if "live changes in the ERP" in line:  # everything is up and data has flowed
            break
        assert time.monotonic() < deadline, "the example did not get going within 60 s"
    assert _processes_mentioning(str(run_dir)), "expected nats-server and the agents to run"
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, rest
    assert "SIGINT: stopping everything" in rest
    assert "stopped; logs and configs kept in" in rest
    assert not _left_behind("".join(head) + rest, run_dir), "Ctrl-C left processes behind"


@needs_northwind
def test_missing_postgres_is_named_and_exits_2(tmp_path: Path) -> None:
    empty = tmp_path / "no-pg-here"
    empty.mkdir()
    proc = _run("deals-to-orders", tmp_path / "run", env={"MESH_PG_BIN": str(empty)})
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    assert "missing: the PostgreSQL server binaries (initdb, pg_ctl, psql) were not found" in out
    assert str(empty) in out
    assert not _left_behind(out, tmp_path / "run"), "left processes behind"


def test_missing_reference_data_is_named_and_exits_2(tmp_path: Path) -> None:
    proc = _run("invoices-to-finance", tmp_path / "run", env={"MESH_DATA_DIR": str(tmp_path / "nowhere")})
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    assert f"missing: {tmp_path / 'nowhere' / 'northwind' / 'northwind-postgres.sql'}" in out
