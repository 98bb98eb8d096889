"""Scheduled bulk runs end to end: real agents (processes, SIGKILLed), a secured nats-server,
SQLite source and target; run records in ``mesh_runs`` read back with ``meshctl runs``; and a
hybrid flow where real-time capture and a bulk run of the same table converge."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import msgspec
import pytest

from mesh.runs.records import BulkRun
from mesh.runs.report import RUNS_BUCKET
from tests._secure import SecuredNatsServer as NatsServer
from tests._secure import issue_agent_creds
from tests.integration._harness import AgentProcess, assert_effect_once, log_tail, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

TABLE = (
    "CREATE TABLE IF NOT EXISTS customers "
    "(id INTEGER PRIMARY KEY, name TEXT, credit INTEGER, updated_at INTEGER NOT NULL)"
)
# The version guard's moves and the data writes, logged (as the harness's WRITE_LOG does).
WRITE_LOG = """
CREATE TABLE IF NOT EXISTS _mesh_versions (tbl TEXT, key TEXT, version INTEGER NOT NULL,
    deleted INTEGER NOT NULL, PRIMARY KEY (tbl, key));
CREATE TABLE IF NOT EXISTS version_log (n INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT,
    version INTEGER, deleted INTEGER);
CREATE TRIGGER IF NOT EXISTS vlog_i AFTER INSERT ON _mesh_versions BEGIN
    INSERT INTO version_log (key, version, deleted) VALUES (NEW.key, NEW.version, NEW.deleted); END;
CREATE TRIGGER IF NOT EXISTS vlog_u AFTER UPDATE ON _mesh_versions BEGIN
    INSERT INTO version_log (key, version, deleted) VALUES (NEW.key, NEW.version, NEW.deleted); END;
CREATE TABLE IF NOT EXISTS data_log (n INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT, op TEXT);
CREATE TRIGGER IF NOT EXISTS dlog_i AFTER INSERT ON customers BEGIN
    INSERT INTO data_log (key, op) VALUES (NEW.id, 'I'); END;
CREATE TRIGGER IF NOT EXISTS dlog_u AFTER UPDATE ON customers BEGIN
    INSERT INTO data_log (key, op) VALUES (NEW.id, 'U'); END;
"""


class Versions:
    """Strictly increasing versions: microseconds since the epoch (an ``updated_at``)."""

    def __init__(self) -> None:
        self.last = 0
        self.lock = threading.Lock()

    def __call__(self) -> int:
        with self.lock:
            self.last = max(self.last + 1, time.time_ns() // 1000)
            return self.last


def make_source(path: Path, n: int, versions: Versions) -> None:
    with sqlite3.connect(path) as c:
        c.execute("PRAGMA journal_mode=WAL")
        c.execute(TABLE)
        c.executemany(
            "INSERT INTO customers VALUES (?, ?, ?, ?)",
            [(i, f"c{i}", i, versions()) for i in range(1, n + 1)],
        )


def make_target(path: Path) -> None:
    with sqlite3.connect(path) as c:
        c.execute("PRAGMA journal_mode=WAL")
        c.execute(TABLE)
        c.executescript(WRITE_LOG)


def table(path: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(path, timeout=30) as c:
        return c.execute("SELECT id, name, credit, updated_at FROM customers ORDER BY id").fetchall()


def local_runs(state: Path) -> list[BulkRun]:
    db = state / "runs.db"
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db, timeout=30) as c:
            got = c.execute("SELECT record FROM runs ORDER BY started_at").fetchall()
    except sqlite3.OperationalError:  # the agent has not created the table yet
        return []
    return [msgspec.msgpack.decode(r[0], type=BulkRun) for r in got]


def create_runs_bucket(server: NatsServer) -> None:
    """What the control plane does at start (these tests run agents without one)."""
    from mesh.transport.jetstream import JetStream

    async def main() -> None:
        async with JetStream(server.nats_config(), name="test-runs-bucket") as js:
            await js.key_value(RUNS_BUCKET)

    anyio.run(main)


def agent(
    tmp: Path, server: NatsServer, security_dir: Path, name: str, system: str, flows: str
) -> AgentProcess:
    cfg = tmp / f"{name}.toml"
    cfg.write_text(f"""
[agent]
name = "{name}"
system = "{system}"
state_dir = "{tmp / "state" / name}"
[nats]
servers = ["{server.url}"]
request_timeout = 2.0
creds = "{tmp / f"{name}.creds"}"
inbox_prefix = "_INBOX.{name}"
{flows}
""")
    issue_agent_creds(cfg, security_dir)
    return AgentProcess(cfg, tmp / f"{name}.log")


def bulk_flow(src: Path, *, name: str = "customers", chunk: int = 200) -> str:
    return f"""
[[flows]]
name = "{name}"
entity = "customer"
[flows.source]
adapter = "sqlite"
path = "{src}"
table = "customers"
key = "id"
[flows.schedule]
cron = "0 2 * * *"
timezone = "Europe/Berlin"
first_run = "now"
version_field = "updated_at"
chunk_size = {chunk}
"""


def sink_flow(dst: Path) -> str:
    return f"""
[[flows]]
name = "customers"
entity = "customer"
[flows.consumer]
batch_size = 500
fetch_timeout = 0.2
ack_wait = 5.0
[flows.sink]
adapter = "sqlite"
path = "{dst}"
table = "customers"
key = "id"
"""


def meshctl(server: NatsServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mesh", *args, "--control-plane", server.url],
        capture_output=True, text=True, timeout=60,
        env={"MESH_CREDS": str(server.admin_creds), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


@pytest.mark.crash  # SIGKILLs the source agent (so: slow, see tests/conftest.py)
def test_a_scheduled_sqlite_run_killed_twice_resumes_and_applies_once(
    tmp_path: Path, security_dir: Path
) -> None:
    n = 30_000
    versions = Versions()
    src, dst = tmp_path / "erp.db", tmp_path / "crm.db"
    make_source(src, n, versions)
    make_target(dst)
    server = NatsServer(tmp_path / "nats", security_dir, layout=True)
    server.start()
    try:
        create_runs_bucket(server)
        source = agent(tmp_path, server, security_dir, "erp-agent", "erp", bulk_flow(src))
        sink = agent(tmp_path, server, security_dir, "crm-agent", "crm", sink_flow(dst))
        sink.start()
        source.start()
        state = source.state_dir
        killed_at = []
        for _ in range(2):
            # SIGKILL once the run has committed more chunks than at the last kill, before it ends.
            floor = killed_at[-1] if killed_at else 0
            wait_until(lambda f=floor: any(r.read > f + 2000 for r in local_runs(state)), 60, "run progress")  # type: ignore[misc]
            source.kill()
            run = local_runs(state)[-1]
            assert run.state == "running", f"run ended before the kill: {run}"
            killed_at.append(run.read)
            source.start()
        wait_until(lambda: any(r.state == "completed" for r in local_runs(state)), 120, "run completed")
        wait_until(lambda: len(table(dst)) == n, 120, f"{n} rows in the target\n{log_tail(sink.log)}")
        assert table(dst) == table(src)
        assert_effect_once(dst)
        with sqlite3.connect(dst) as c:
            writes = c.execute("SELECT count(*) FROM data_log").fetchone()[0]
        assert writes == n, f"{writes} data writes for {n} rows: some row was applied twice"
        [run] = local_runs(state)
        assert (run.state, run.read, run.published, run.resumed) == ("completed", n, n, 2)
        assert run.id.startswith("customers-")
        assert run.adapter == "sqlite"
        assert run.agent == "erp-agent"
        print(f"killed at {killed_at} rows; run {run.id} took {run.finished_at - run.started_at:.1f}s")  # type: ignore[operator]

        # The mesh-wide view: the source's record plus the sink's counts (eventually).
        def listed() -> dict[str, object] | None:
            out = meshctl(server, "runs", "list", "--json")
            assert out.returncode == 0, out.stderr
            docs = json.loads(out.stdout)
            return docs[0] if docs and docs[0]["applied"] == n else None

        wait_until(lambda: listed() is not None, 30, "applied counts in mesh_runs")
        doc = listed()
        assert doc is not None
        assert (doc["id"], doc["state"], doc["read"], doc["failed"], doc["checksum"]) == (
            run.id, "completed", n, 0, run.checksum,
        )  # fmt: skip
        shown = meshctl(server, "runs", "show", run.id)
        assert shown.returncode == 0, shown.stderr
        assert f"applied        {n}" in shown.stdout
        assert "sink crm-agent" in shown.stdout
        missing = meshctl(server, "runs", "show", "customers-19700101T000000Z")
        assert missing.returncode == 2
        assert missing.stderr.startswith("error: no run")
        assert "Traceback" not in missing.stderr
        source.terminate()
        sink.terminate()
    finally:
        for p in ("source", "sink"):
            proc = locals().get(p)
            if isinstance(proc, AgentProcess):
                proc.kill()
        server.stop()


def test_hybrid_real_time_and_bulk_on_one_entity_converge_under_concurrent_changes(
    tmp_path: Path, security_dir: Path
) -> None:
    """Real-time capture (cursor on ``updated_at``) and a bulk run of the same table feed one
    target while rows keep changing: every row's version in the target only ever grows (a bulk
    row older than an applied change never overwrites it) and the target ends equal to the source."""
    n = 5_000
    versions = Versions()
    src, dst = tmp_path / "erp.db", tmp_path / "crm.db"
    make_source(src, n, versions)
    make_target(dst)
    server = NatsServer(tmp_path / "nats", security_dir, layout=True)
    server.start()
    stop = threading.Event()
    changed = [0]

    def changes() -> None:  # a busy ERP: updates while the bulk run extracts
        import random

        rng = random.Random(7)
        with sqlite3.connect(src, timeout=30) as c:
            while not stop.is_set():
                key = rng.randrange(1, n + 1)
                c.execute(
                    "UPDATE customers SET name = ?, credit = ?, updated_at = ? WHERE id = ?",
                    (f"c{key}-{changed[0]}", rng.randrange(10**6), versions(), key),
                )
                c.commit()
                changed[0] += 1
                time.sleep(0.001)

    realtime = f"""
[[flows]]
name = "customers-rt"
entity = "customer"
[flows.source]
adapter = "sqlite"
path = "{src}"
table = "customers"
key = "id"
mode = "cursor"
cursor_column = "updated_at"
version_column = "updated_at"
batch_size = 200
poll_interval = 0.02
"""
    driver = threading.Thread(target=changes)
    try:
        create_runs_bucket(server)
        source = agent(
            tmp_path,
            server,
            security_dir,
            "erp-agent",
            "erp",
            realtime + bulk_flow(src, name="customers-bulk", chunk=50),
        )
        sink = agent(tmp_path, server, security_dir, "crm-agent", "crm", sink_flow(dst))
        sink.start()
        driver.start()
        source.start()
        state = source.state_dir
        wait_until(lambda: any(r.state == "completed" for r in local_runs(state)), 120, "bulk run completed")
        during = changed[0]
        stop.set()
        driver.join()
        [run] = local_runs(state)
        assert run.read == n
        assert during > 100, f"only {during} changes were made while the bulk run extracted"
        wait_until(lambda: table(dst) == table(src), 120, f"target equal to source\n{log_tail(sink.log)}")
        assert_effect_once(dst)  # versions only grew: no bulk row overwrote a newer change
        print(f"{during} concurrent changes; bulk run {run.id} read {run.read} rows in "
              f"{run.finished_at - run.started_at:.1f}s")  # type: ignore[operator]  # fmt: skip
        source.terminate()
        sink.terminate()
    finally:
        stop.set()
        if driver.is_alive():
            driver.join()
        for p in ("source", "sink"):
            proc = locals().get(p)
            if isinstance(proc, AgentProcess):
                proc.kill()
        server.stop()


class FakeCustomersApi:
    """A real local HTTP server: ``GET /customers?page=N&page_size=S`` lists ``records`` (JSON
    ``{"data": [...]}``), sorted by an unrelated field so key order is the extract's job; it
    counts the listings it served."""

    def __init__(self, records: list[dict[str, object]]) -> None:
        import http.server
        import urllib.parse

        self.records = records
        self.pages = 0
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                q = dict(urllib.parse.parse_qsl(url.query))
                if url.path != "/customers":
                    self.send_error(404)
                    return
                page, size = int(q.get("page", "1")), int(q.get("page_size", "100"))
                rows = sorted(api.records, key=lambda r: str(r["name"]))[(page - 1) * size : page * size]
                body = json.dumps({"data": rows}).encode()
                api.pages += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> FakeCustomersApi:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_scheduled_rest_run_extracts_every_record_with_its_own_version(
    tmp_path: Path, security_dir: Path
) -> None:
    n = 1_000
    records: list[dict[str, object]] = [
        {"id": i, "name": f"z{(i * 7919) % n:04d}", "credit": i, "updated_at": 5_000_000 + i}
        for i in range(1, n + 1)
    ]
    dst = tmp_path / "crm.db"
    make_target(dst)
    server = NatsServer(tmp_path / "nats", security_dir, layout=True)
    server.start()
    source = sink = None
    try:
        create_runs_bucket(server)
        with FakeCustomersApi(records) as api:
            flow = f"""
[[flows]]
name = "customers"
entity = "customer"
[flows.source]
adapter = "rest"
base_url = "{api.url}"
path = "/customers"
records_path = "data"
version_field = "updated_at"
[flows.source.pagination]
type = "page"
size = 100
[flows.schedule]
cron = "*/5 * * * *"
first_run = "now"
chunk_size = 64
"""
            source = agent(tmp_path, server, security_dir, "api-agent", "api", flow)
            sink = agent(tmp_path, server, security_dir, "crm-agent", "crm", sink_flow(dst))
            sink.start()
            source.start()
            state = source.state_dir
            wait_until(lambda: any(r.state == "completed" for r in local_runs(state)), 60,
                       f"run completed\n{log_tail(source.log)}")  # fmt: skip
            wait_until(lambda: len(table(dst)) == n, 60, f"{n} rows in the target\n{log_tail(sink.log)}")
            assert api.pages == n // 100 + 1  # one listing (the last page is short... or empty)
        want = [
            (r["id"], r["name"], r["credit"], r["updated_at"]) for r in sorted(records, key=lambda r: r["id"])
        ]  # type: ignore[arg-type, return-value]
        assert table(dst) == want
        assert_effect_once(dst)
        [run] = local_runs(state)
        assert (run.state, run.adapter, run.read, run.published) == ("completed", "rest", n, n)
        source.terminate()
        sink.terminate()
    finally:
        for proc in (source, sink):
            if isinstance(proc, AgentProcess):
                proc.kill()
        server.stop()


def test_agents_write_only_their_own_run_records(tmp_path: Path, security_dir: Path) -> None:
    """``mesh_runs``: an agent's credentials (from the permission table) put its own keys and
    are refused another agent's; the control plane's bucket is otherwise out of reach."""
    from mesh.runs.records import run_key
    from mesh.transport import OutMessage, Refused
    from mesh.transport.jetstream import JetStream

    server = NatsServer(tmp_path / "nats", security_dir, layout=True)
    server.start()
    try:
        before = meshctl(server, "runs", "list")  # no control plane yet: no bucket
        assert before.returncode == 2
        assert before.stderr.startswith("error: cannot read the mesh_runs bucket")
        assert len(before.stderr.strip().splitlines()) == 1
        assert "Traceback" not in before.stderr
        create_runs_bucket(server)
        erp = agent(tmp_path, server, security_dir, "erp-agent", "erp", bulk_flow(tmp_path / "erp.db"))
        creds = str(tmp_path / "erp-agent.creds")
        del erp

        async def main() -> None:
            cfg = server.nats_config(creds=creds, inbox_prefix="_INBOX.erp-agent")
            async with JetStream(cfg, name="erp-agent") as js:
                own = f"$KV.{RUNS_BUCKET}.{run_key('erp-agent', 'customers', 'customers-1', 'source')}"
                assert await js.publish(OutMessage(own, b"{}", "own-1")) >= 1
                other = f"$KV.{RUNS_BUCKET}.{run_key('crm-agent', 'customers', 'customers-1', 'sink')}"
                with pytest.raises(
                    Refused, match=r"^permission denied: publish to \$KV\.mesh_runs\.crm-agent\."
                ):
                    await js.publish(OutMessage(other, b"{}", "forged-1"))
                with pytest.raises(
                    Refused, match=r"permission denied: publish to \$JS\.API\.STREAM\.PURGE\.KV_mesh_runs"
                ):
                    await js.purge(f"KV_{RUNS_BUCKET}", up_to_seq=10)

        anyio.run(main)
    finally:
        server.stop()
