"""Rolling upgrade of an agent on the same state dir, with a canonical schema change, while
events flow both ways (ERP <-> CRM customers, field ownership as in test_two_way).

Two real installations of the code: today's build (this checkout) and a second build, a copy of
the packages in a temp dir whose canonical ``Customer`` is ``customer/2`` with a new optional
field ``lei`` (Legal Entity Identifier). Agents run as processes with ``PYTHONPATH`` (and the
working directory) pointing at their build.

The CRM agent starts on today's build; while both sides keep writing, it gets SIGTERM and the
new build starts on the same state dir (outbox, inbox, cursors) with a config that maps and owns
``lei``. The ERP agent stays on today's build meanwhile: an old reader that applies
``customer/2`` events and ignores the field it does not know. Proved: the schema check accepts customer/2 as a
compatible new version; the new build reads the old build's events (the backlog and the ERP's
live ones); nothing lost (both sides end with the same rows), nothing doubled (no version
applied twice, one data write per applied version at most), nothing dead-lettered. Then the
ERP agent is upgraded the same way under load (its config unchanged), and the same holds with
both on the new build.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import nats
import pytest

import mesh
from mesh.canonical.schema import diff_schemas
from mesh.envelope import decode
from tests._secure import SecuredNatsServer as NatsServer
from tests._secure import secure_agent
from tests.integration._harness import AgentProcess, log_tail, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

ROOT = Path(mesh.__file__).resolve().parents[1]
"""Today's build: the checkout the test runs from."""

ERP_SCHEMA = """
CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT,
                        credit_limit_cents INTEGER NOT NULL DEFAULT 0);
"""
CRM_SCHEMA = """
CREATE TABLE accounts (account_id TEXT PRIMARY KEY, company TEXT NOT NULL, email_address TEXT,
                       credit_limit TEXT, lei TEXT);
"""
# Every version-guard move and every write to the data table, logged by triggers (as in
# tests/integration/_harness.py WRITE_LOG), for the "applied once" check.
WRITE_LOG = """
CREATE TABLE IF NOT EXISTS _mesh_versions (tbl TEXT, key TEXT, version INTEGER NOT NULL,
    deleted INTEGER NOT NULL, PRIMARY KEY (tbl, key));
CREATE TABLE version_log (n INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT, version INTEGER);
CREATE TRIGGER vlog_i AFTER INSERT ON _mesh_versions BEGIN
    INSERT INTO version_log (key, version) VALUES (NEW.key, NEW.version);
END;
CREATE TRIGGER vlog_u AFTER UPDATE ON _mesh_versions BEGIN
    INSERT INTO version_log (key, version) VALUES (NEW.key, NEW.version);
END;
CREATE TABLE data_log (n INTEGER PRIMARY KEY AUTOINCREMENT, op TEXT);
CREATE TRIGGER dlog_i AFTER INSERT ON {table} BEGIN INSERT INTO data_log (op) VALUES ('I'); END;
CREATE TRIGGER dlog_u AFTER UPDATE ON {table} BEGIN INSERT INTO data_log (op) VALUES ('U'); END;
CREATE TRIGGER dlog_d AFTER DELETE ON {table} BEGIN INSERT INTO data_log (op) VALUES ('D'); END;
"""

ERP_MAPPING = """
[flows.to_canonical.fields]
id = { from = "id", convert = "str" }
name = "name"
"contact.email" = "email"
"credit_limit.amount" = "credit_limit_cents"
"credit_limit.currency" = { const = "EUR" }
"""
ERP_SINK_MAPPING = """
[flows.from_canonical.fields]
id = { from = "id", convert = "int" }
name = "name"
email = "contact.email"
credit_limit_cents = "credit_limit.amount"
"""
CRM_MAPPING = """
[flows.to_canonical.fields]
id = "account_id"
name = "company"
"contact.email" = "email_address"
credit_limit = {{ from = "credit_limit", convert = "money", currency = "EUR" }}
{lei_in}
"""
CRM_SINK_MAPPING = """
[flows.from_canonical.fields]
account_id = "id"
company = "name"
email_address = "contact.email"
credit_limit = {{ from = "credit_limit", convert = "money", currency = "EUR", as_string = true }}
{lei_out}
"""
OWNERSHIP = """
[flows.ownership]
system_of_record = "erp"
default_owner = "erp"
[flows.ownership.fields]
"contact.email" = "crm"
{lei_owner}
"""


def _build_v2(tmp: Path) -> Path:
    """A second installation: the packages copied, ``Customer`` patched to ``customer/2`` with
    a new optional field ``lei``."""
    build = tmp / "build-v2"
    for pkg in ("mesh", "agents", "adapters"):
        shutil.copytree(ROOT / pkg, build / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    entities = build / "mesh" / "canonical" / "entities.py"
    text = entities.read_text(encoding="utf-8")
    head = 'entity_name: ClassVar[str] = "customer"\n    schema_version: ClassVar[int] = 1\n'
    tail = "    tags: list[Code] = []\n\n\nclass Supplier("
    assert text.count(head) == 1, "Customer changed shape: update this test"
    assert text.count(tail) == 1, "Customer changed shape: update this test"
    text = text.replace(head, head.replace("= 1", "= 2")).replace(
        tail,
        '    tags: list[Code] = []\n    lei: Code | None = None\n    """Legal Entity Identifier '
        '(new in customer/2)."""\n\n\nclass Supplier(',
    )
    entities.write_text(text, encoding="utf-8")
    return build


def _run_build(build: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mesh", *args], cwd=build, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(build)},
    )  # fmt: skip


class BuildAgent(AgentProcess):
    """An agent process of one build: ``python -m mesh agent run`` with the build first on
    ``sys.path`` (working directory and ``PYTHONPATH``); the state dir is given, not read from the
    config (today's code cannot load a config that names customer/2's new field)."""

    def __init__(self, config: Path, log: Path, state_dir: Path, build: Path) -> None:
        super().__init__(config, log)
        self.build = build
        self._fixed_state = state_dir

    @property
    def state_dir(self) -> Path:
        return self._fixed_state

    def start(self, env: dict[str, str] | None = None, *, wait: bool = True, timeout: float = 30) -> None:
        self.starts += 1
        self._signals_seen = False
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mesh", "agent", "run", "--config", str(self.config),
                 "--metrics-port", "0"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.build,
                start_new_session=True, env={**os.environ, "PYTHONPATH": str(self.build), **(env or {})},
            )  # fmt: skip
        if wait:
            self.wait_ready(timeout)


def _config(tmp: Path, name: str, system: str, url: str, db: Path, table: str, key: str,
            source_mapping: str, sink_mapping: str, ownership: str, version: str) -> Path:  # fmt: skip
    cfg = tmp / f"{name}.{version}.toml"
    cfg.write_text(
        f"""
log_level = "info"
[agent]
name = "{name}"
system = "{system}"
state_dir = "{tmp / (name + "-state")}"
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
{source_mapping}

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
{sink_mapping}
{ownership}
""",
        encoding="utf-8",
    )
    return cfg


def _rows(db: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(db, timeout=30) as c:
        return c.execute(sql).fetchall()


def _erp_view(db: Path) -> dict[str, tuple[object, ...]]:
    rows = _rows(db, "SELECT id, name, email, credit_limit_cents FROM customers")
    return {str(r[0]): (r[1], r[2], r[3]) for r in rows}


def _crm_view(db: Path) -> dict[str, tuple[object, ...]]:
    rows = _rows(db, "SELECT account_id, company, email_address, credit_limit FROM accounts")
    return {str(r[0]): (r[1], r[2], None if r[3] is None else round(float(str(r[3])) * 100)) for r in rows}


def _stream(url: str, creds: Path) -> list[tuple[str, str, str]]:
    """(subject, schema, origin) of every event in MESH_EVENTS (read with the admin's creds)."""

    async def read() -> list[tuple[str, str, str]]:
        nc = await nats.connect(url, max_reconnect_attempts=1, user_credentials=str(creds))
        try:
            js = nc.jetstream()
            info = await js.stream_info("MESH_EVENTS")
            out = []
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                try:
                    msg = await js.get_msg("MESH_EVENTS", seq)
                except nats.js.errors.NotFoundError:
                    continue
                env = decode(msg.data or b"")
                out.append((msg.subject or "", env.schema, env.origin))
            return out
        finally:
            await nc.close()

    return asyncio.run(read())


def _settled(url: str, creds: Path, quiet: float = 2.0, timeout: float = 60.0) -> None:
    """Wait until no new event appeared for ``quiet`` seconds."""

    def count() -> int:
        async def n() -> int:
            nc = await nats.connect(url, max_reconnect_attempts=1, user_credentials=str(creds))
            try:
                return int((await nc.jetstream().stream_info("MESH_EVENTS")).state.messages)
            finally:
                await nc.close()

        return asyncio.run(n())

    deadline = time.monotonic() + timeout
    last, since = count(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = count()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
    raise AssertionError(f"events kept coming for {timeout}s")


def _assert_applied_once(db: Path, direct_writes: int) -> None:
    """No (key, version) applied twice, versions strictly increasing per key, and no more data
    writes by the sink than applied versions (``direct_writes``: the test's own writes)."""
    with sqlite3.connect(db, timeout=30) as c:
        log = c.execute("SELECT key, version FROM version_log ORDER BY n").fetchall()
        data_writes = c.execute("SELECT count(*) FROM data_log").fetchone()[0]
    last: dict[str, int] = {}
    for key, version in log:
        assert version > last.get(key, -1), f"{db.name}: key {key!r}: version {version} after {last.get(key)}"
        last[key] = version
    sink_writes = data_writes - direct_writes
    assert 0 <= sink_writes <= len(log), f"{db.name}: {sink_writes} sink writes, {len(log)} versions applied"


class Load:
    """Both systems writing at once from a thread: the ERP creates customers and changes names
    and limits (fields it owns); the CRM changes e-mail addresses (the field it owns)."""

    def __init__(self, erp: Path, crm: Path, first_id: int = 1) -> None:
        self.erp, self.crm = erp, crm
        self.rng = random.Random(11 + first_id)
        self.first_id = self.next_id = first_id
        self.writes = {erp: 0, crm: 0}
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def write(self, db: Path, sql: str, *params: object) -> None:
        with sqlite3.connect(db, timeout=30) as c:
            if c.execute(sql, params).rowcount:
                self.writes[db] += 1

    def erp_step(self) -> None:
        r = self.rng
        if self.next_id < 30 or r.random() < 0.3:
            i, self.next_id = self.next_id, self.next_id + 1
            self.write(self.erp, "INSERT INTO customers VALUES (?, ?, NULL, ?)", i, f"Customer {i}", i * 1050)
        else:
            i = r.randrange(1, self.next_id)
            self.write(self.erp, "UPDATE customers SET name = ?, credit_limit_cents = ? WHERE id = ?",
                       f"Customer {i} rev {r.randrange(10**6)}", r.randrange(10**7), i)  # fmt: skip

    def crm_step(self) -> None:
        i = self.rng.randrange(1, max(2, self.next_id))
        self.write(self.crm, "UPDATE accounts SET email_address = ? WHERE account_id = ?",
                   f"c{i}.{self.rng.randrange(10**6)}@crm.example", str(i))  # fmt: skip

    def _run(self) -> None:
        try:
            while not self.stop.wait(0.03):
                self.erp_step()
                self.crm_step()
        except BaseException as exc:  # reported by the test, not swallowed
            self.error = exc

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)
        if self.error is not None:
            raise self.error


def _metric(agent: AgentProcess, name: str, **labels: str) -> float:
    import urllib.request

    from mesh.endpoint import read_endpoint_file

    doc = read_endpoint_file(agent.state_dir)
    assert doc is not None
    text = urllib.request.urlopen(str(doc["metrics"]), timeout=5).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items())
    )


def test_rolling_upgrade_with_customer_v2_both_ways(nats_server: NatsServer, tmp_path: Path) -> None:
    build_v1, build_v2 = ROOT, _build_v2(tmp_path)

    # The compatibility check: the new build's schemas against today's export.
    export_v1, export_v2 = tmp_path / "schemas-v1", tmp_path / "schemas-v2"
    done = _run_build(build_v1, "schema", "export", str(export_v1))
    assert done.returncode == 0, done.stderr
    check = _run_build(build_v2, "schema", "check", str(export_v1))
    assert check.returncode == 0, check.stdout + check.stderr
    assert "customer/2" in check.stdout, check.stdout
    assert "lei" in check.stdout, check.stdout
    assert "BREAKING" not in check.stdout
    assert "cannot be mixed" not in check.stdout, check.stdout
    assert _run_build(build_v2, "schema", "export", str(export_v2)).returncode == 0
    v1 = json.loads((export_v1 / "customer.v1.schema.json").read_text(encoding="utf-8"))
    v2 = json.loads((export_v2 / "customer.v2.schema.json").read_text(encoding="utf-8"))
    changes = [(path, what) for path, what, breaking in diff_schemas(v1, v2) if breaking]
    assert changes == [], f"customer/2 breaks customer/1 readers or writers: {changes}"
    # (The diff does see the new field: it is listed as a compatible change.)
    assert any("lei" in path for path, _, _ in diff_schemas(v1, v2))

    erp_db, crm_db = tmp_path / "erp.db", tmp_path / "crm.db"
    for db, schema, table in ((erp_db, ERP_SCHEMA, "customers"), (crm_db, CRM_SCHEMA, "accounts")):
        with sqlite3.connect(db) as c:
            c.execute("PRAGMA journal_mode=WAL")
            c.executescript(schema)
            c.executescript(WRITE_LOG.format(table=table))
    url = nats_server.url
    ownership_v1 = OWNERSHIP.format(lei_owner="")
    erp_cfg = _config(tmp_path, "erp-agent", "erp", url, erp_db, "customers", "id",
                      ERP_MAPPING, ERP_SINK_MAPPING, ownership_v1, "v1")  # fmt: skip
    crm_v1 = _config(tmp_path, "crm-agent", "crm", url, crm_db, "accounts", "account_id",
                     CRM_MAPPING.format(lei_in=""), CRM_SINK_MAPPING.format(lei_out=""),
                     ownership_v1, "v1")  # fmt: skip
    crm_v2 = _config(tmp_path, "crm-agent", "crm", url, crm_db, "accounts", "account_id",
                     CRM_MAPPING.format(lei_in='lei = "lei"'), CRM_SINK_MAPPING.format(lei_out='lei = "lei"'),
                     OWNERSHIP.format(lei_owner='lei = "crm"'), "v2")  # fmt: skip
    # Same name, same flows: the same permissions for both versions of the CRM agent's config.
    for cfg in (erp_cfg, crm_v1):
        secure_agent(cfg, nats_server)
    # The new build refuses nothing in its own config.
    checked = _run_build(build_v2, "config", "check", str(crm_v2))
    assert checked.returncode == 0, checked.stdout + checked.stderr

    erp = BuildAgent(erp_cfg, tmp_path / "erp.log", tmp_path / "erp-agent-state", build_v1)
    crm_old = BuildAgent(crm_v1, tmp_path / "crm.log", tmp_path / "crm-agent-state", build_v1)
    crm_new = BuildAgent(crm_v2, tmp_path / "crm.log", tmp_path / "crm-agent-state", build_v2)
    erp_new = BuildAgent(erp_cfg, tmp_path / "erp.log", tmp_path / "erp-agent-state", build_v2)
    erp.start()
    crm_old.start()
    try:
        with Load(erp_db, crm_db) as load:
            wait_until(lambda: len(_crm_view(crm_db)) >= 20, 60, "the first customers at the CRM")
            # The upgrade: SIGTERM (graceful: outbox and inbox durable), the new build on the same
            # state dir, while both sides keep writing and the ERP keeps publishing customer/1.
            assert crm_old.terminate() == 0, log_tail(crm_old.log)
            pending_at_upgrade = load.next_id
            wait_until(lambda: load.next_id >= pending_at_upgrade + 5, 30, "ERP writes while the CRM is down")
            crm_new.start()
            wait_until(lambda: load.next_id >= pending_at_upgrade + 20, 60, "writes after the upgrade")
        # New-build writes with the new field (once the load stopped, so they stay the last
        # ones): customer/2 events to the old reader.
        for i in range(1, 11):
            load.write(crm_db, "UPDATE accounts SET lei = ?, email_address = ? WHERE account_id = ?",
                       f"LEI{i:017d}", f"lei{i}@crm.example", str(i))  # fmt: skip
        erp_emails = "SELECT id, email FROM customers WHERE id <= 10 ORDER BY id"
        expected = [(i, f"lei{i}@crm.example") for i in range(1, 11)]
        wait_until(lambda: _rows(erp_db, erp_emails) == expected, 60,
                   "the old reader to apply the CRM's customer/2 changes")  # fmt: skip
        wait_until(lambda: _erp_view(erp_db) == _crm_view(crm_db), 90, "both sides to converge")
        _settled(url, nats_server.admin_creds)
        assert erp.alive, log_tail(erp.log)
        assert crm_new.alive, log_tail(crm_new.log)

        # Nothing lost: every customer on both sides with the same values; the new field stays
        # where it is owned (and is not overwritten by the ERP's customer/1 events).
        erp_rows, crm_rows = _erp_view(erp_db), _crm_view(crm_db)
        assert len(erp_rows) == load.next_id - 1
        assert erp_rows == crm_rows
        leis = _rows(crm_db, "SELECT account_id, lei FROM accounts WHERE lei IS NOT NULL "
                             "ORDER BY CAST(account_id AS INTEGER)")  # fmt: skip
        assert leis == [(str(i), f"LEI{i:017d}") for i in range(1, 11)]
        # Nothing doubled.
        _assert_applied_once(erp_db, load.writes[erp_db])
        _assert_applied_once(crm_db, load.writes[crm_db])
        # Both versions on the wire, both ways: the old build's customer/1 from both systems,
        # the new build's customer/2 from the CRM.
        seen = {(schema, origin) for _, schema, origin in _stream(url, nats_server.admin_creds)}
        assert {("customer/1", "erp"), ("customer/1", "crm"), ("customer/2", "crm")} <= seen, seen
        assert ("customer/2", "erp") not in seen
        # The old reader ignored the field (dropped as not the CRM's, counted), refused nothing.
        assert _metric(erp, "mesh_ownership_dropped_fields_total", flow="customers-in", origin="crm") > 0
        for agent in (erp, crm_new):
            for metric in ("mesh_dead_lettered_messages_total", "mesh_capture_dead_lettered_messages_total"):
                assert _metric(agent, metric) == 0, (metric, log_tail(agent.log))

        # The rest of the rolling upgrade: the ERP agent too, its config unchanged, under load.
        with Load(erp_db, crm_db, first_id=load.next_id) as more:
            wait_until(lambda: more.next_id >= more.first_id + 10, 30, "writes before the ERP upgrade")
            assert erp.terminate() == 0, log_tail(erp.log)
            wait_until(lambda: more.next_id >= more.first_id + 15, 30, "ERP writes while its agent is down")
            erp_new.start()
            wait_until(lambda: more.next_id >= more.first_id + 30, 60, "writes after the ERP upgrade")
        wait_until(lambda: _erp_view(erp_db) == _crm_view(crm_db), 90, "both sides to converge again")
        _settled(url, nats_server.admin_creds)
        erp_rows = _erp_view(erp_db)
        assert len(erp_rows) == more.next_id - 1
        assert erp_rows == _crm_view(crm_db)
        assert _rows(crm_db, "SELECT count(*) FROM accounts WHERE lei IS NOT NULL") == [(10,)]
        _assert_applied_once(erp_db, load.writes[erp_db] + more.writes[erp_db])
        _assert_applied_once(crm_db, load.writes[crm_db] + more.writes[crm_db])
        seen = {(schema, origin) for _, schema, origin in _stream(url, nats_server.admin_creds)}
        assert ("customer/2", "erp") in seen, seen
        for agent in (erp_new, crm_new):
            for metric in ("mesh_dead_lettered_messages_total", "mesh_capture_dead_lettered_messages_total"):
                assert _metric(agent, metric) == 0, (metric, log_tail(agent.log))
    finally:
        codes = [(a.log.name, a.build.name, a.terminate()) for a in (erp, erp_new, crm_old, crm_new)]
    assert all(code in (0, None) for _, _, code in codes), codes
