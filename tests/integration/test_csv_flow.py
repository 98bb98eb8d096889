"""CSV batch flows end to end, with real agent processes and a real nats-server.

Import: a 21,550-row order-lines CSV made from Northwind (plus three bad rows) is dropped into an
importing agent's inbox; the agent is SIGKILLed mid-file (by the test, then at random right after
an outbox commit) and restarted. A SQLite sink agent ends with every good row exactly once and
exactly as written (zero-padded ids, exact decimals), the stream holds one event per row, and the
run record is complete with the right counts and the file's SHA-256.

Export: Northwind customers change in a SQLite database (inserts, updates, deletes); a source
agent captures them, an exporting agent cuts CSV files (and is SIGKILLed right after renaming its
first file, before recording it). Replaying the files in run order gives exactly the table, no
(key, version) is in two files, and every file's run record holds its row count and SHA-256.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import os
import signal
import sqlite3
from contextlib import closing
from decimal import Decimal
from pathlib import Path

import anyio
import nats
import pytest

from adapters.files.runs import RunRecord, read_runs
from adapters.sql.sqlite import install_change_capture
from tests._secure import SecuredNatsServer as NatsServer
from tests._secure import write_agent_config
from tests.conftest import SHARED_DATA
from tests.integration._harness import AgentProcess, consumer_settled, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.crash, pytest.mark.timeout(120)]

NORTHWIND = SHARED_DATA / "northwind" / "northwind.sqlite3"
needs_northwind = pytest.mark.skipif(
    not NORTHWIND.exists(), reason=f"Northwind reference data not found at {NORTHWIND}"
)
COPIES = 10  # 2,155 order details x 10 = 21,550 rows


def northwind() -> sqlite3.Connection:
    return sqlite3.connect(f"file:{NORTHWIND}?mode=ro", uri=True)


def make_order_lines(path: Path) -> tuple[list[list[str]], int]:
    """Write the CSV (UTF-8 BOM, CRLF); return its good rows and the number of bad ones."""
    with closing(northwind()) as db:
        details = db.execute(
            "SELECT d.OrderID, o.CustomerID, o.OrderDate, p.ProductName, d.UnitPrice, d.Quantity, "
            'd.Discount FROM "Order Details" d JOIN Orders o ON o.OrderID = d.OrderID '
            "JOIN Products p ON p.ProductID = d.ProductID ORDER BY d.OrderID, d.ProductID"
        ).fetchall()
    good: list[list[str]] = []
    for copy in range(COPIES):
        for order, customer, day, product, price, qty, discount in details:
            line_id = f"{len(good) + 1:06d}"
            price = Decimal(str(price)).quantize(Decimal("0.01")) + Decimal(copy) / 100
            good.append([line_id, str(order), customer, day, product, str(price), str(qty), str(discount)])
    rows: list[list[str]] = list(good)
    bad = [["999998", "1", "X"], ["", "10248", "VINET", "2016-07-04", "Chai", "1.00", "1", "0"],
           ["999999", "10248", "VINET", "2016-07-04", "Chai", "1.00", "one", "0"]]  # fmt: skip
    for i, row in zip((5_000, 12_345, 20_000), bad, strict=True):
        rows.insert(i, row)
    header = ["line_id", "order_id", "customer_id", "order_date", "product", "unit_price", "quantity",
              "discount"]  # fmt: skip
    with open(path, "w", newline="", encoding="utf-8-sig") as f:
        writer = csv.writer(f, lineterminator="\r\n")
        writer.writerow(header)
        writer.writerows(rows)
    return good, len(bad)


def importer_toml(tmp: Path, url: str) -> str:
    return f"""
[agent]
name = "files-agent"
system = "files"
state_dir = "{tmp / "s-files"}"
[nats]
servers = ["{url}"]
request_timeout = 2.0
[[flows]]
name = "order-lines"
entity = "order_line"
[flows.source]
adapter = "csv"
inbox_dir = "{tmp / "inbox"}"
done_dir = "{tmp / "done"}"
state_path = "{tmp / "s-files" / "order-lines.db"}"
key = "line_id"
columns = {{ order_id = "int", quantity = "int", unit_price = "decimal", order_date = "date" }}
chunk_rows = 250
settle_time = 0
poll_interval = 0.05
"""


def sink_toml(tmp: Path, url: str) -> str:
    return f"""
[agent]
name = "erp-agent"
system = "erp"
state_dir = "{tmp / "s-erp"}"
[nats]
servers = ["{url}"]
request_timeout = 2.0
[[flows]]
name = "order-lines"
entity = "order_line"
[flows.consumer]
batch_size = 1000
fetch_timeout = 0.2
ack_wait = 10.0
[flows.sink]
adapter = "sqlite"
path = "{tmp / "erp.db"}"
table = "order_lines"
key = "line_id"
create_table = true
"""


def import_run(tmp: Path) -> RunRecord | None:
    runs = read_runs(tmp / "s-files" / "order-lines.db", direction="import")
    return runs[0] if runs else None


def target_rows(db: Path) -> list[tuple[object, ...]]:
    if not db.exists():
        return []
    with closing(sqlite3.connect(db, timeout=30)) as c:
        if not c.execute("SELECT 1 FROM sqlite_master WHERE name = 'order_lines'").fetchone():
            return []
        return c.execute(
            "SELECT line_id, order_id, customer_id, order_date, product, unit_price, quantity, discount "
            "FROM order_lines ORDER BY line_id"
        ).fetchall()


def stream_messages(server: NatsServer, stream: str = "MESH_EVENTS") -> int:
    async def count() -> int:
        nc = await nats.connect(
            server.url, connect_timeout=2, max_reconnect_attempts=1, user_credentials=str(server.admin_creds)
        )
        try:
            info = await nc.jetstream().stream_info(stream)
        finally:
            await nc.close()
        return int(info.state.messages)

    return asyncio.run(count())


@needs_northwind
def test_csv_import_survives_sigkill_mid_file(tmp_path: Path, security_dir: Path) -> None:
    server = NatsServer(tmp_path / "nats", security_dir, layout=True)
    server.start()
    (tmp_path / "inbox").mkdir()
    staged = tmp_path / "order_lines.csv"
    good, bad = make_order_lines(staged)
    checksum = hashlib.sha256(staged.read_bytes()).hexdigest()
    importer_cfg, sink_cfg = tmp_path / "files-agent.toml", tmp_path / "erp-agent.toml"
    write_agent_config(importer_cfg, importer_toml(tmp_path, server.url), server)
    write_agent_config(sink_cfg, sink_toml(tmp_path, server.url), server)
    importer = AgentProcess(importer_cfg, tmp_path / "files-agent.log")
    sink = AgentProcess(sink_cfg, tmp_path / "erp-agent.log")
    kills = 0
    try:
        sink.start()
        importer.start()
        os.replace(staged, tmp_path / "inbox" / staged.name)  # dropped whole, as a writer should

        # 1. SIGKILL by the test once a good part of the file has been captured
        def mid_file() -> bool:
            run = import_run(tmp_path)
            return run is not None and run.rows_in >= 4_000

        wait_until(mid_file, 60, "the import to be well under way")
        importer.kill()
        kills += 1
        killed = import_run(tmp_path)
        assert killed is not None
        assert killed.status == "running"
        assert killed.rows_in < len(good)

        def status() -> str:
            return (import_run(tmp_path) or killed).status

        # 2. then at random right after an outbox commit (before the source hears of it)
        # (not waiting for ready: the crash point may fire before /readyz says so)
        importer.start(env={"MESH_CRASH_POINTS": "capture.after_commit:0.15"}, wait=False)
        wait_until(
            lambda: not importer.alive or status() == "complete",
            60, "the importer to crash or finish",
        )  # fmt: skip
        if importer.killed_by_sigkill:
            kills += 1
            importer.start()

        wait_until(lambda: status() == "complete", 60, "the import to complete")
        wait_until(lambda: len(target_rows(tmp_path / "erp.db")) >= len(good), 60, "every row at the sink")
        wait_until(
            lambda: consumer_settled(server.url, "order-lines-erp", server.admin_creds),
            30,
            "the consumer to settle",
        )
    finally:
        importer.terminate()
        sink.terminate()

    assert kills >= 1
    rows = target_rows(tmp_path / "erp.db")
    assert len(rows) == len(good)
    expected = [(r[0], int(r[1]), r[2], r[3], r[4], r[5], int(r[6]), r[7]) for r in good]
    assert rows == expected  # "000123" stays a string, decimals stay their exact text
    assert stream_messages(server) == len(good)  # one event per row: no re-read with another id
    server.stop()

    [run] = read_runs(tmp_path / "s-files" / "order-lines.db")
    assert run.status == "complete"
    assert (run.rows_in, run.rows_out, run.rows_failed) == (len(good) + bad, len(good), bad)
    assert run.checksum == checksum
    assert run.moved_to == str(tmp_path / "done" / staged.name)
    assert hashlib.sha256((tmp_path / "done" / staged.name).read_bytes()).hexdigest() == checksum
    assert run.rejects_file is not None
    with open(run.rejects_file, newline="", encoding="utf-8") as f:
        rejects = list(csv.DictReader(f))
    assert [r["line"] for r in rejects] == ["5002", "12347", "20002"]
    assert [r["reason"] for r in rejects] == [
        "expected 8 fields, found 3",
        "missing key (column 'line_id' is empty)",
        "column 'quantity': 'one' is not a 64-bit integer",
    ]


CUSTOMERS = """
CREATE TABLE customers (
    CustomerID TEXT PRIMARY KEY, CompanyName TEXT, ContactName TEXT, ContactTitle TEXT,
    Address TEXT, City TEXT, Region TEXT, PostalCode TEXT, Country TEXT, Phone TEXT, Fax TEXT
);
"""


def exporter_toml(tmp: Path, url: str) -> str:
    return f"""
[agent]
name = "export-agent"
system = "files"
state_dir = "{tmp / "s-export"}"
[nats]
servers = ["{url}"]
request_timeout = 2.0
[[flows]]
name = "customers"
entity = "customer"
[flows.consumer]
batch_size = 25
fetch_timeout = 0.2
ack_wait = 2.0
[flows.sink]
adapter = "csv"
out_dir = "{tmp / "out"}"
state_path = "{tmp / "s-export" / "customers-export.db"}"
file_prefix = "customers"
key_column = "CustomerID"
version_column = "_version"
flush_rows = 40
flush_interval = 0.3
"""


def source_toml(tmp: Path, url: str) -> str:
    return f"""
[agent]
name = "erp-agent"
system = "erp"
state_dir = "{tmp / "s-erp"}"
[nats]
servers = ["{url}"]
request_timeout = 2.0
[[flows]]
name = "customers"
entity = "customer"
[flows.source]
adapter = "sqlite"
path = "{tmp / "erp.db"}"
table = "customers"
key = "CustomerID"
batch_size = 30
poll_interval = 0.02
"""


def replay_exports(out: Path, runs: list[RunRecord]) -> dict[str, dict[str, str]]:
    """The table the exported files describe, applying them in run order."""
    state: dict[str, dict[str, str]] = {}
    seen: set[tuple[str, str]] = set()
    for run in sorted(runs, key=lambda r: r.id):
        with open(run.file, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                stamp = (row["CustomerID"], row["_version"])
                assert stamp not in seen, f"{stamp} exported twice"
                seen.add(stamp)
                if row.pop("_deleted") == "true":
                    state.pop(row["CustomerID"], None)
                else:
                    row.pop("_version")
                    state[row["CustomerID"]] = row
    return state


def customers(db: Path) -> dict[str, dict[str, str]]:
    with closing(sqlite3.connect(db, timeout=30)) as c:
        cur = c.execute("SELECT * FROM customers")
        names = [d[0] for d in cur.description]
        table = [dict(zip(names, ("" if v is None else str(v) for v in r), strict=True)) for r in cur]
    return {r["CustomerID"]: r for r in table}


@needs_northwind
def test_sqlite_changes_export_to_csv_files_exactly_once(tmp_path: Path, security_dir: Path) -> None:
    erp = tmp_path / "erp.db"
    with closing(sqlite3.connect(erp)) as c:
        c.execute("PRAGMA journal_mode=WAL")
        c.executescript(CUSTOMERS)
    anyio.run(lambda: install_change_capture(erp, "customers"))
    (tmp_path / "out").mkdir()
    server = NatsServer(tmp_path / "nats", security_dir, layout=True)
    server.start()
    exporter_cfg, source_cfg = tmp_path / "export-agent.toml", tmp_path / "erp-agent.toml"
    write_agent_config(exporter_cfg, exporter_toml(tmp_path, server.url), server)
    write_agent_config(source_cfg, source_toml(tmp_path, server.url), server)
    exporter = AgentProcess(exporter_cfg, tmp_path / "export-agent.log")
    source = AgentProcess(source_cfg, tmp_path / "erp-agent.log")
    state = tmp_path / "s-export" / "customers-export.db"
    try:
        # The exporter dies right after renaming its first file, before recording it.
        exporter.start(env={"MESH_FILES_CRASH_POINTS": "csv_sink.after_rename"})
        source.start()
        with closing(northwind()) as nw, closing(sqlite3.connect(erp, timeout=30)) as c:
            rows = nw.execute("SELECT * FROM Customers ORDER BY CustomerID").fetchall()
            c.executemany(f"INSERT INTO customers VALUES ({', '.join('?' * 11)})", rows)
            c.commit()
        wait_until(lambda: not exporter.alive, 60, "the exporter to crash after its first rename")
        assert exporter.proc is not None
        assert exporter.proc.returncode == -signal.SIGKILL
        [interrupted] = read_runs(state)
        assert interrupted.status == "running"
        assert Path(interrupted.file).exists()
        exporter.start()
        with closing(sqlite3.connect(erp, timeout=30)) as c:
            c.execute("UPDATE customers SET ContactName = ContactName || ' (new)' WHERE Country = 'Germany'")
            c.execute("UPDATE customers SET Fax = NULL WHERE Country = 'France'")
            c.execute("DELETE FROM customers WHERE Country = 'Mexico'")
            c.commit()
        final = customers(erp)

        def converged() -> bool:
            runs = read_runs(state)
            if any(r.status != "complete" for r in runs):
                return False
            return replay_exports(tmp_path / "out", runs) == final

        wait_until(converged, 60, "the exported files to describe the table")
    finally:
        exporter.terminate()
        source.terminate()
        server.stop()

    runs = sorted(read_runs(state), key=lambda r: r.id)
    assert runs[0].file == interrupted.file  # finished under its own name, not cut again
    files = sorted((tmp_path / "out").iterdir())
    assert [p.name for p in files] == sorted(Path(r.file).name for r in runs)  # no temp files
    for run in runs:
        assert run.status == "complete"
        data = Path(run.file).read_bytes()
        assert run.checksum == hashlib.sha256(data).hexdigest()
        assert run.rows_out == run.rows_in == data.count(b"\r\n") - 1
        assert run.rows_out <= 40
    assert sum(r.rows_out for r in runs) >= len(final)
