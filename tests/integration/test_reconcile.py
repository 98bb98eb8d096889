"""``meshctl reconcile`` against real agents (the dev stack's ``customers`` flow: ERP SQLite ->
canonical customer/1 -> CRM SQLite, other column names and types), a secured nats-server and
least-privilege agent creds: drift made behind the mesh's back (a row deleted, a field changed,
a row added) is reported exactly, ``--repair`` converges through the delivery path (a report
after it is clean), and an agent cannot answer or ask another agent's reconcile subject."""

from __future__ import annotations

import http.server
import json
import re
import sqlite3
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
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

    def drift(self) -> None:
        """Behind the mesh's back: account 7 deleted, 12 changed (two fields), 900 added."""
        self.run("DELETE FROM accounts WHERE account_id = '7'")
        self.run("UPDATE accounts SET company = 'Changed', credit_limit = '1.00' WHERE account_id = '12'")
        self.run("INSERT INTO accounts (account_id, company) VALUES ('900', 'Nobody')")


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


class ListApi(Target):
    """A fake CRM REST API (a real HTTP server on a loopback port, in a thread): ``PUT`` and
    ``DELETE /customers/{key}``, and the list endpoint ``GET /customers?page=N&page_size=S``
    answering ``{"data": [...]}`` in key order. It counts list requests."""

    def __init__(self, tmp: Path) -> None:
        self.records: dict[str, dict[str, Any]] = {}
        self.lists = 0
        self.lock = threading.Lock()
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, doc: object = None) -> None:
                body = b"" if doc is None else json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self) -> None:
                key = urllib.parse.unquote(self.path.removeprefix("/customers/"))
                doc = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with api.lock:
                    api.records[key] = doc
                self._send(200, doc)

            def do_DELETE(self) -> None:
                key = urllib.parse.unquote(self.path.removeprefix("/customers/"))
                with api.lock:
                    gone = api.records.pop(key, None)
                self._send(204 if gone is not None else 404)

            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                q = urllib.parse.parse_qs(url.query)
                page, size = int(q["page"][0]), int(q["page_size"][0])
                with api.lock:
                    api.lists += 1
                    ordered = [api.records[k] for k in sorted(api.records)]
                self._send(200, {"data": ordered[(page - 1) * size : page * size]})

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{self.server.server_address[1]}"
        sink = (
            f'[flows.sink]\nadapter = "rest"\nbase_url = "{url}"\nupsert_path = "/customers/{{key}}"\n'
            f'state_path = "{tmp / "rest-versions.db"}"\nlist_path = "/customers"\n'
            'list_records_path = "data"\nlist_key_field = "account_id"\n'
            '[flows.sink.list_pagination]\ntype = "page"\nsize = 8\n'
        )
        flow = re.sub(r"\[flows\.sink\]\n(.*\n)*?(?=\n)", sink, CRM_FLOW, count=1)
        super().__init__(flow, lambda stmt: [])

    def rows(self) -> dict[object, tuple[object, ...]]:
        with self.lock:
            docs = list(self.records.values())
        fields = ("account_id", "company", "email_address", "credit_limit")
        return {d["account_id"]: tuple(d.get(f) for f in fields) for d in docs}

    def drift(self) -> None:
        with self.lock:
            del self.records["7"]
            self.records["12"] = {**self.records["12"], "company": "Changed", "credit_limit": "1.00"}
            self.records["900"] = {"account_id": "900", "company": "Nobody"}


def meshctl_reconcile(server: SecuredNatsServer, *args: str) -> tuple[int, dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "mesh", "reconcile", "customers", "--json", "--agent", "erp-agent",
         "--agent", "crm-agent", "--nats", server.url, "--creds", str(server.admin_creds), "--chunk", "7",
         *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


ERP_ROWS = [(i, f"Customer {i}", f"c{i}@example.com", "DE", i * 1000 + 10) for i in range(1, 41)]
ERP_INSERT = "INSERT INTO customers (id, name, email, country, credit_limit_cents) VALUES (?, ?, ?, ?, ?)"


def sqlite_source(tmp: Path) -> str:
    """The dev stack's ERP (40 customers); its flow text."""
    with sqlite3.connect(tmp / "erp.db") as c:
        c.executescript(ERP_SCHEMA)
        c.executemany(ERP_INSERT, ERP_ROWS)
    return ERP_FLOW.replace('path = "erp.db"', f'path = "{tmp / "erp.db"}"')


def postgres_source(cluster: PgCluster, dbname: str) -> str:
    """The same ERP in PostgreSQL (change capture by triggers, initial snapshot); its flow text."""
    with cluster.connect(dbname) as db:
        db.execute(
            "CREATE TABLE customers (id integer PRIMARY KEY, name text NOT NULL, email text, country text,"
            " credit_limit_cents integer NOT NULL DEFAULT 0, updated_at timestamptz NOT NULL DEFAULT now())"
        )
        with db.cursor() as cur:
            cur.executemany(ERP_INSERT.replace("?", "%s"), ERP_ROWS)
    source = (
        f'[flows.source]\nadapter = "postgres"\ndsn = "{cluster.dsn(dbname)}"\ntable = "customers"\n'
        'key = "id"\ninstall_triggers = true\npoll_interval = 0.05\n'
    )
    flow = re.sub(r"\[flows\.source\]\n(.*\n)*?(?=\n)", source, ERP_FLOW, count=1)
    assert 'adapter = "postgres"' in flow
    return flow


def drift_found_and_repaired(
    tmp_path: Path, server: SecuredNatsServer, target: Target, source: str | None = None
) -> None:
    source = source if source is not None else sqlite_source(tmp_path)
    configs = [
        agent_config(tmp_path, "erp-agent", "erp", source, server.url),
        agent_config(tmp_path, "crm-agent", "crm", target.flow, server.url),
    ]
    agents = [AgentProcess(cfg, tmp_path / f"{cfg.stem}.log") for cfg in configs]
    for cfg in configs:
        secure_agent(cfg, server)
    try:
        for a in agents:
            a.start()
        wait_until(lambda: len(target.rows()) == 40, 60, "the CRM to hold the ERP's 40 customers")
        code, report = meshctl_reconcile(server)
        assert (code, report["missing"], report["extra"], report["different"]) == (0, [], [], [])

        before = target.rows()
        target.drift()
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


def test_rest_target_drift_found_and_repaired(tmp_path: Path, nats_server: SecuredNatsServer) -> None:
    api = ListApi(tmp_path)
    try:
        drift_found_and_repaired(tmp_path, nats_server, api)
    finally:
        api.server.shutdown()
        api.server.server_close()
    assert api.lists >= 5 * 6  # 5 pages of 8 per listing (40 records), at least 6 listings


def test_postgres_source_drift_found_and_repaired(
    tmp_path: Path, nats_server: SecuredNatsServer, pg_cluster: PgCluster, pg_db: str
) -> None:
    """Repair re-stamps the rows in the PostgreSQL change table."""
    drift_found_and_repaired(
        tmp_path, nats_server, sqlite_target(tmp_path), postgres_source(pg_cluster, pg_db)
    )


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


@pytest.mark.anyio
async def test_scheduled_reconcile_on_the_control_plane_metrics_and_audit(
    tmp_path: Path, nats_server: SecuredNatsServer
) -> None:
    """The control plane's ``[[reconcile]]`` schedule: its /metrics shows what the last run
    found, and each run leaves an audit entry."""
    import httpx

    from agents.control_plane import ControlPlane
    from mesh.controlplane.audit import tail
    from mesh.controlplane.settings import settings_from

    target = sqlite_target(tmp_path)
    erp = tmp_path / "erp.db"
    with sqlite3.connect(erp) as c:
        c.executescript(ERP_SCHEMA)
        c.executemany(
            "INSERT INTO customers (id, name, email, country, credit_limit_cents) VALUES (?, ?, ?, ?, ?)",
            [(i, f"Customer {i}", f"c{i}@example.com", "FR", i) for i in range(1, 21)],
        )
    configs = [
        agent_config(tmp_path, "erp-agent", "erp", ERP_FLOW, nats_server.url),
        agent_config(tmp_path, "crm-agent", "crm", target.flow, nats_server.url),
    ]
    for cfg in configs:
        secure_agent(cfg, nats_server)
    agents = [AgentProcess(cfg, tmp_path / f"{cfg.stem}.log") for cfg in configs]
    cp_creds = nats_server.security_dir / "creds" / "control-plane.creds"
    settings = settings_from({
        "name": "cp1", "http_port": 0,
        "nats": {"servers": [nats_server.url], "request_timeout": 2.0, "creds": str(cp_creds)},
        "reconcile": [{"flow": "customers", "every": 1, "agents": ["erp-agent", "crm-agent"], "timeout": 10}],
    })  # fmt: skip
    cp = ControlPlane(settings)
    try:
        for a in agents:
            await anyio.to_thread.run_sync(a.start)
        await anyio.to_thread.run_sync(wait_until, lambda: len(target.rows()) == 20, 60, "20 CRM rows")
        target.drift()
        async with anyio.create_task_group() as tg:
            await tg.start(lambda task_status: cp.run(task_status=task_status))
            url = cp.http_url
            assert url is not None

            async def found() -> dict[str, float]:
                async with httpx.AsyncClient() as http:
                    text = (await http.get(f"{url}/metrics")).text
                pattern = r'mesh_reconcile_exceptions\{flow="customers",kind="(\w+)"\} (\S+)'
                return {m[1]: float(m[2]) for m in re.finditer(pattern, text)}

            with anyio.fail_after(30):
                while (got := await found()) != {"missing": 1, "extra": 1, "different": 1, "error": 0}:
                    await anyio.sleep(0.2)
            async with JetStream(nats_server.nats_config(), name="audit-reader") as js:
                entries = [r.entry async for r in tail(js, last=50, kind="reconcile")]
            cp.stop()
        assert got == {"missing": 1, "extra": 1, "different": 1, "error": 0}
        assert entries
        assert (entries[0].target, entries[0].what) == ("customers", "missing 1, extra 1, different 1")
    finally:
        for a in agents:
            a.terminate()


def test_reconcile_that_cannot_run_says_why_in_one_line(
    tmp_path: Path, nats_server: SecuredNatsServer
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mesh", "reconcile", "customers", "--agent", "nobody", "--timeout", "1",
         "--nats", nats_server.url, "--creds", str(nats_server.admin_creds)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: flow customers: reconcile needs a source agent (found none among nobody); "
        "name them with --agent"
    ]
    assert "Traceback" not in done.stderr
