"""Chaos into a REST target: the sink agent's ``[flows.sink] adapter = "rest"`` sends the ERP's
changes to the fake CRM API (:mod:`tests.fakes.crm_api`) running as its own process, which the
faults make answer 500s, 429 storms and slow responses, and SIGKILL (then restart on the same
port and database).

The reconciliation reads the API's SQLite file: ``records`` must equal the ERP's rows, and the
``writes`` log (every *effective* write) must show each (key, version, op) once, versions
increasing per key, and each key's last write at the ERP's last change.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.rest._state import default_target
from mesh.broker import free_port
from tests._secure import write_agent_config
from tests.chaos._chaos import (
    DLQ_STREAM,
    FLOW,
    REST_KINDS,
    SINK_DURABLE,
    TABLE,
    Fault,
    FaultInjector,
    Mesh,
    jetstream_state,
)
from tests.integration._harness import AgentProcess, consumer_settled, rows

REPO = Path(__file__).resolve().parents[2]
TOKEN_ENV = "MESH_CHAOS_CRM_TOKEN"
TOKEN = "chaos-crm-s3cr3t"
COLUMNS = ("id", "name", "email", "country", "credit_limit_cents", "balance")
"""The ERP's columns, all of which the sink sends (no ``fields`` in its config)."""
TIMEOUT = 2.0
"""The sink's per-request timeout; a slow answer waits longer than this."""
SLOW_DELAY = TIMEOUT + 0.75


def rest_sink_toml(*, name: str, state: Path, url: str, api: str) -> str:
    """The sink agent's config: a REST sink into the fake API (bearer token from the
    environment), a consumer that retries an unavailable API instead of dead-lettering it."""
    return f"""
log_level = "info"
[agent]
name = "{name}"
system = "crm"
state_dir = "{state}"
[nats]
servers = ["{url}"]
request_timeout = 2.0
[[flows]]
name = "{FLOW}"
entity = "customer"
[flows.consumer]
batch_size = 200
fetch_timeout = 0.2
ack_wait = 30.0
max_deliver = 1000
[flows.retry]
initial_delay = 0.2
max_delay = 1.0
[flows.sink]
adapter = "rest"
base_url = "{api}"
upsert_path = "/customers/{{key}}"
state_path = "{state / "rest-versions.db"}"
timeout = {TIMEOUT}
max_attempts = 3
retry_after_cap = 2.0
breaker_threshold = 20
breaker_cooldown = 1.0
[flows.sink.auth]
type = "bearer"
token_env = "{TOKEN_ENV}"
"""


class _TokenAgent(AgentProcess):
    """An agent process that always gets the API token in its environment (restarts too)."""

    def start(self, env: dict[str, str] | None = None, *, wait: bool = True, timeout: float = 30) -> None:
        super().start({TOKEN_ENV: TOKEN, **(env or {})}, wait=wait, timeout=timeout)


class ApiProcess:
    """``python -m tests.fakes.crm_api`` as a child process on a fixed port and database."""

    def __init__(self, db: Path, log: Path, port: int) -> None:
        self.db, self.log, self.port = db, log, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout: float = 15.0) -> None:
        """Start it and wait until it accepts connections (retried while the port lingers)."""
        deadline = time.monotonic() + timeout
        while True:
            self.starts += 1
            with open(self.log, "ab") as log:
                log.write(f"--- start {self.starts}\n".encode())
                log.flush()
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "tests.fakes.crm_api", "--port", str(self.port),
                     "--db", str(self.db), "--token-env", TOKEN_ENV],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
                    start_new_session=True, env={**os.environ, TOKEN_ENV: TOKEN},
                )  # fmt: skip
            while self.proc.poll() is None and time.monotonic() < deadline:
                if self._answers():
                    return
                time.sleep(0.05)
            self.kill()
            if time.monotonic() >= deadline:
                raise AssertionError(f"the CRM API did not start on port {self.port}; see {self.log}")
            time.sleep(0.2)

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/_stats", timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def terminate(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return None
        return self.proc.returncode

    def chaos(self, mode: str, **spec: Any) -> None:
        """``POST /_chaos``: misbehave in ``mode`` (see :mod:`tests.fakes.crm_api`)."""
        req = urllib.request.Request(
            f"{self.url}/_chaos",
            data=json.dumps({"mode": mode, **spec}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            answer = json.load(resp)
        if answer.get("mode") != mode:
            raise AssertionError(f"the CRM API did not switch to {mode!r}: {answer}")

    def stats(self) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(f"{self.url}/_stats", timeout=5) as resp:
                stats = dict(json.load(resp))
            stats.pop("by_route", None)  # one entry per key: too long to print
            return stats
        except (OSError, ValueError) as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}


class RestMesh(Mesh):
    """ERP -> source agent -> nats-server -> sink agent (REST sink) -> the fake CRM API process."""

    kinds = REST_KINDS

    def __init__(self, tmp: Path, security_dir: Path) -> None:
        super().__init__(
            tmp, security_dir
        )  # also writes an unused SQLite CRM and its sink config: replaced here
        self.api = ApiProcess(tmp / "crm-api.db", tmp / "crm-api.log", free_port())
        self.api_lock = threading.Lock()
        self.api_db = self.api.db
        state = tmp / "state" / "crm-agent"
        state.mkdir(parents=True, exist_ok=True)
        self.rest_state = state / "rest-versions.db"
        self.rest_target = default_target(self.api.url, "/customers/{key}")
        cfg = tmp / "crm-agent.toml"
        text = rest_sink_toml(name="crm-agent", state=state, url=self.server.url, api=self.api.url)
        write_agent_config(cfg, text, self.server)
        self.agents["sink"] = _TokenAgent(cfg, tmp / "crm-agent.log")
        self.api_chaos: dict[str, float] = defaultdict(float)
        """Seconds of each misbehaviour asked of the API."""

    def start(self) -> None:
        self.api.start()
        super().start()

    def restart_api(self, down: float) -> None:
        with self.api_lock:
            self.api.kill()
            time.sleep(down)
            self.api.start(timeout=30)

    def check_agents(self) -> None:
        """Also restart (and record) an API process that exited without being killed."""
        super().check_agents()
        if not self.api_lock.acquire(blocking=False):
            return
        try:
            if self.api.proc is not None and not self.api.alive:
                self.unexpected_exits.append(
                    f"the CRM API exited on its own (code {self.api.proc.returncode}); see {self.api.log}"
                )
                self.api.start()
        finally:
            self.api_lock.release()

    def stop(self) -> None:
        super().stop()
        with self.api_lock:
            self.api.kill()


class RestFaultInjector(FaultInjector):
    """The base injector, plus the API's faults: misbehave for a while, or SIGKILL and restart."""

    mesh: RestMesh

    def __init__(self, mesh: RestMesh, schedule: list[Fault]) -> None:
        super().__init__(mesh, schedule)
        self.mesh = mesh

    def _inject(self, fault: Fault) -> None:
        mesh, d = self.mesh, fault.duration
        if fault.kind == "kill_api":
            mesh.restart_api(d)
            return
        if not fault.kind.startswith("api_"):
            super()._inject(fault)
            return
        spec: dict[str, Any] = {"seconds": d}
        mode = fault.kind.removeprefix("api_")
        if mode == "429":
            spec["retry_after"] = 1
        elif mode == "slow":
            spec["delay"] = SLOW_DELAY
        with mesh.api_lock:
            mesh.api.chaos(mode, **spec)
        mesh.api_chaos[mode] += d
        # The API ends the misbehaviour itself; hold the resource until then.
        if self.stop.wait(d):
            return
        with mesh.api_lock:
            mesh.api.chaos("ok")


# --------------------------------------------------------------------------------------------
# Reconciliation


def api_records(db: Path) -> dict[str, dict[str, Any]]:
    with closing(sqlite3.connect(db, timeout=30)) as c:
        found = c.execute("SELECT key, body FROM records WHERE collection = ?", (TABLE,)).fetchall()
    return {k: json.loads(b) for k, b in found}


def _as_row(body: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(body.get(c, "<absent>") for c in COLUMNS)


def api_matches(mesh: RestMesh) -> bool:
    """The API holds exactly the ERP's rows (all fields)."""
    try:
        got = api_records(mesh.api_db)
    except sqlite3.Error:
        return False
    want = {str(r[0]): r for r in rows(mesh.erp)}
    return want.keys() == got.keys() and all(_as_row(got[k]) == row for k, row in want.items())


@dataclass
class RestReconciliation:
    erp_rows: int = 0
    api_rows: int = 0
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    different: list[tuple[Any, Any]] = field(default_factory=list)
    writes: int = 0
    writes_by_op: dict[str, int] = field(default_factory=dict)
    double_effects: list[tuple[str, int, str, int]] = field(default_factory=list)
    """(key, version, op, times) that took effect more than once."""
    unordered: list[tuple[str, int, int]] = field(default_factory=list)
    """(key, version, the version before it) where a key's effective writes went backwards."""
    phantoms: list[tuple[str, int]] = field(default_factory=list)
    """(key, version) written that the ERP never produced."""
    last_write_wrong: list[tuple[str, Any, Any]] = field(default_factory=list)
    """(key, ERP's last (version, op), the API's last effective write (version, op))."""
    behind: list[tuple[str, Any, Any]] = field(default_factory=list)
    """(key, ERP's last (version, deleted), the sink's local version store)."""
    writes_without_idempotency_key: int = 0
    captured_events: int = 0
    settled: bool = False
    jetstream: dict[str, Any] = field(default_factory=dict)

    def problems(self, expected_events: int) -> list[str]:
        out = []
        if self.missing:
            out.append(f"{len(self.missing)} ERP rows missing in the API (e.g. keys {self.missing[:10]})")
        if self.extra:
            out.append(f"{len(self.extra)} extra records in the API (e.g. keys {self.extra[:10]})")
        if self.different:
            out.append(f"{len(self.different)} records differ (e.g. ERP/API {self.different[:3]})")
        if self.double_effects:
            out.append(
                f"{len(self.double_effects)} (key, version, op) took effect more than once in the API: "
                f"{self.double_effects[:10]}"
            )
        if self.unordered:
            out.append(
                f"{len(self.unordered)} effective writes went back in version (key, version, after): "
                f"{self.unordered[:10]}"
            )
        if self.phantoms:
            out.append(
                f"{len(self.phantoms)} versions written that the ERP never produced: {self.phantoms[:10]}"
            )
        if self.last_write_wrong:
            out.append(
                f"{len(self.last_write_wrong)} keys' last effective API write is not the ERP's last "
                f"change (key, ERP (version, op), API): {self.last_write_wrong[:10]}"
            )
        if self.behind:
            out.append(
                f"{len(self.behind)} keys' REST sink version store is not at the ERP's last change "
                f"(key, ERP (version, deleted), sink): {self.behind[:10]}"
            )
        if self.writes_without_idempotency_key:
            n = self.writes_without_idempotency_key
            out.append(f"{n} effective writes came without an Idempotency-Key")
        if self.captured_events != expected_events:
            out.append(f"ERP captured {self.captured_events} change events, the load made {expected_events}")
        dlq = self.jetstream.get("dlq")
        if dlq != 0:
            out.append(f"{DLQ_STREAM} holds {dlq} messages: {self.jetstream.get('dlq_samples')}")
        if not self.settled:
            out.append(f"consumer {SINK_DURABLE} not settled: {self.jetstream.get('consumer')}")
        if "error" in self.jetstream:
            out.append(f"JetStream state unreadable: {self.jetstream['error']}")
        return out


def reconcile_rest(mesh: RestMesh) -> RestReconciliation:
    """Compare ERP rows and API records field by field; check the API's write log: no (key,
    version, op) effective twice (the sink's Idempotency-Key and version store must absorb every
    retry, timeout, redelivery and restart), versions increasing per key, none the ERP did not
    produce, each key's last effective write at the ERP's last change (an upsert at its version
    for a live row; for a deleted one, a delete at its version, unless the API never held the
    record: then no write or an earlier delete); the sink's version store at the ERP's last change
    for every key; the captured change count, the DLQ and the consumer."""
    rec = RestReconciliation()
    erp = {str(r[0]): r for r in rows(mesh.erp)}
    api = {k: _as_row(b) for k, b in api_records(mesh.api_db).items()}
    rec.erp_rows, rec.api_rows = len(erp), len(api)
    rec.missing = sorted(erp.keys() - api.keys(), key=int)
    rec.extra = sorted(api.keys() - erp.keys())
    rec.different = [(erp[k], api[k]) for k in sorted(erp.keys() & api.keys(), key=int) if erp[k] != api[k]]
    with closing(sqlite3.connect(mesh.erp, timeout=30)) as c:
        rec.captured_events = c.execute("SELECT count(*) FROM chaos_changes").fetchone()[0]
        produced = set(c.execute("SELECT pk, seq FROM chaos_changes").fetchall())
        # SQLite takes the bare column (op) from the row holding max(seq).
        last = {pk: (seq, op == "D") for pk, seq, op in c.execute(
            "SELECT pk, max(seq), op FROM chaos_changes GROUP BY pk")}  # fmt: skip
    with closing(sqlite3.connect(mesh.api_db, timeout=30)) as c:
        log = c.execute(
            "SELECT key, version, op, idempotency_key FROM writes WHERE collection = ? ORDER BY seq", (TABLE,)
        ).fetchall()
    with closing(sqlite3.connect(mesh.rest_state, timeout=30)) as c:
        found = c.execute(
            "SELECT key, version, deleted FROM mesh_rest_versions WHERE target = ?", (mesh.rest_target,)
        ).fetchall()
    store = {k: (v, bool(d)) for k, v, d in found}
    rec.writes = len(log)
    seen: dict[tuple[str, int, str], int] = defaultdict(int)
    by_op: dict[str, int] = defaultdict(int)
    last_write: dict[str, tuple[int, str]] = {}
    for key, version, op, idem in log:
        seen[(key, version, op)] += 1
        by_op[op] += 1
        if idem is None:
            rec.writes_without_idempotency_key += 1
        before = last_write.get(key)
        if before is not None and version <= before[0]:
            rec.unordered.append((key, version, before[0]))
        last_write[key] = (version, op)
    rec.writes_by_op = dict(by_op)
    rec.double_effects = sorted((k, v, op, n) for (k, v, op), n in seen.items() if n > 1)
    rec.phantoms = sorted({(k, v) for k, v, _, _ in log} - produced)
    for key, (version, deleted) in sorted(last.items()):
        got = last_write.get(key)
        if deleted:
            ok = got is None or (got[1] == "delete" and got[0] <= version)
        else:
            ok = got is not None and got[0] == version and got[1] in ("create", "replace")
        if not ok:
            rec.last_write_wrong.append((key, (version, "delete" if deleted else "upsert"), got))
        if store.get(key) != (version, deleted):
            rec.behind.append((key, (version, deleted), store.get(key)))
    rec.last_write_wrong += [(k, None, w) for k, w in last_write.items() if k not in last]
    rec.behind += [(k, None, v) for k, v in store.items() if k not in last]
    rec.settled = consumer_settled(mesh.sink_url, SINK_DURABLE, mesh.admin_creds)
    rec.jetstream = jetstream_state(mesh.sink_url, mesh.admin_creds)
    return rec
