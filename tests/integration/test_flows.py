"""Flows applied through the control plane against running connector agents (real processes):
`meshctl flow apply` (a bad file refused with every problem, nothing stored), the agents start
the flow without a restart, pause (kept across an agent restart) and resume, a reconfiguration
under load, drain, delete and re-apply — and through all of it no change is lost or applied twice.
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
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mesh.broker import free_port
from mesh.cli import (
    agent_cp as cli_agent_cp,
)
from mesh.cli import (
    audit as cli_audit,
)
from mesh.cli import (
    flow as cli_flow,
)
from mesh.readiness import NotReady, wait_ready
from tests._secure import SecuredNatsServer as NatsServer
from tests._secure import admin_creds, secure_agent
from tests.integration._harness import (
    AgentProcess,
    ErpLoad,
    assert_effect_once,
    assert_same_rows,
    log_tail,
    make_crm,
    make_erp,
    rows,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

runner = CliRunner()

# Until the control plane issues each registered agent its JWT (enrollment: `meshctl agent token
# create`, `meshctl agent register --token`, re-issued on every assignment change), agents whose
# flows the control plane assigns connect with the admin creds here; the operator CLI always does.


@pytest.fixture(autouse=True)
def _admin_cli(security_dir: Path) -> Iterator[None]:
    """Every `meshctl` command of this module runs as the admin (MESH_CREDS)."""
    runner.env = {"MESH_CREDS": str(admin_creds(security_dir))}
    yield
    runner.env = {}


def _cli(app: object, *args: str, code: int = 0) -> str:
    result = runner.invoke(app, list(args))  # type: ignore[arg-type]
    out = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code == code, f"exit {result.exit_code} (expected {code}): {out}"
    assert "Traceback" not in out
    return out


def _agent_config(path: Path, name: str, system: str, url: str, creds: Path, *, adapters: str = "") -> Path:
    path.write_text(
        f"""
log_level = "info"
[agent]
name = "{name}"
system = "{system}"
state_dir = "{path.parent / (name + "-state")}"
allowed_paths = ["{path.parent}"]  # the test's ERP and CRM files sit beside the configs
heartbeat_interval = 0.5
shutdown_grace = 5.0
[nats]
servers = ["{url}"]
request_timeout = 2.0
creds = "{creds}"
inbox_prefix = "_INBOX.{name}"
"""
    )
    return path


def _flow_file(path: Path, erp: Path, crm: Path, *, batch: int = 200) -> Path:
    path.write_text(
        f"""
[[flows]]
name = "customers"
entity = "customer"
[flows.consumer]
batch_size = {batch}
fetch_timeout = 0.2
ack_wait = 5.0
[flows.source]
agent = "erp-agent"
adapter = "sqlite"
path = "{erp}"
table = "customers"
key = "id"
batch_size = 300
poll_interval = 0.02
[flows.sink]
agent = "crm-agent"
adapter = "sqlite"
path = "{crm}"
table = "customers"
key = "id"
"""
    )
    return path


@pytest.fixture
def control_plane(nats_server: NatsServer, tmp_path: Path) -> Iterator[str]:
    """`meshctl control-plane run` as a process; yields its HTTP base URL."""
    port = free_port()
    log = open(tmp_path / "cp.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "mesh", "control-plane", "run", "--nats", nats_server.url,
         "--http", f"127.0.0.1:{port}", "--name", "cp1", "--stale-after", "3", "--lost-after", "6"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "MESH_CREDS": str(nats_server.security_dir / "creds" / "control-plane.creds")},
    )  # fmt: skip
    try:
        try:
            wait_ready(f"http://127.0.0.1:{port}/readyz", timeout=30, alive=lambda: proc.poll() is None)
        except NotReady as exc:
            raise AssertionError(f"control plane: {exc}\n{log_tail(tmp_path / 'cp.log')}") from None
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def _flow_states(url: str) -> dict[str, str]:
    """{agent: state} the agents report for flow customers (via `meshctl flow get --json`)."""
    out = _cli(cli_flow.app, "get", "customers", "--json", "--control-plane", url)
    view = json.loads(out)
    return {r["name"]: r["state"] for r in view["reports"]}


class _Load:
    """ERP changes from a background thread until stopped."""

    def __init__(self, erp: ErpLoad) -> None:
        self.erp = erp
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.rounds = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.erp.mixed(3)
            self.rounds += 1
            time.sleep(0.02)

    def __enter__(self) -> _Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def test_apply_pause_resume_reconfigure_drain_delete(
    nats_server: NatsServer, control_plane: str, tmp_path: Path
) -> None:
    url = nats_server.url
    erp_db, crm_db = tmp_path / "erp.db", tmp_path / "crm.db"
    make_erp(erp_db)
    make_crm(crm_db)
    erp_cfg = _agent_config(tmp_path / "erp-agent.toml", "erp-agent", "erp", url, nats_server.admin_creds)
    crm_cfg = _agent_config(tmp_path / "crm-agent.toml", "crm-agent", "crm", url, nats_server.admin_creds)
    _cli(cli_agent_cp.app, "register", "--config", str(erp_cfg), "--control-plane", url)
    _cli(
        cli_agent_cp.app, "register", "--config", str(crm_cfg), "--adapter", "sqlite", "--control-plane", url
    )
    erp_agent = AgentProcess(erp_cfg, tmp_path / "erp-agent.log")
    crm_agent = AgentProcess(crm_cfg, tmp_path / "crm-agent.log")
    erp_agent.start()
    crm_agent.start()
    load = ErpLoad(erp_db, seed=7)
    try:
        # A bad file: every problem listed with its path, nothing stored.
        bad = tmp_path / "bad.toml"
        bad.write_text(
            f"""
[[flows]]
name = "customers"
entity = "customer"
[flows.source]
agent = "erp-agnet"
adapter = "sqlite"
path = "{erp_db}"
table = "customers"
key = "id"
batch_size = "many"
[flows.sink]
agent = "crm-agent"
adapter = "rest"
base_url = "http://127.0.0.1:9/api"
upsert_path = "/c/{{key}}"
state_path = "rest.db"
[[flows]]
name = "orders"
entity = "order"
"""
        )
        out = _cli(cli_flow.app, "apply", str(bad), "--control-plane", url, code=1)
        assert "flows[0].source.batch_size" in out
        assert "no registered agent named 'erp-agnet'" in out
        assert "flows[0].sink.adapter: agent 'crm-agent' does not support adapter 'rest'" in out
        assert "flows[1]: a flow needs a [source], a [sink] or both" in out
        assert "nothing was applied" in out
        assert "no flows applied" in _cli(cli_flow.app, "list", "--control-plane", url)

        # Apply: both agents start their side without a restart.
        flows = _flow_file(tmp_path / "flows.toml", erp_db, crm_db)
        out = _cli(cli_flow.app, "apply", str(flows), "--control-plane", url)
        assert "flow customers: created (generation 1) on crm-agent, erp-agent" in out
        assert "unchanged" in _cli(cli_flow.app, "apply", str(flows), "--control-plane", url)
        load.insert(1500)
        wait_until(lambda: len(rows(crm_db)) == 1500, 90, "the applied flow to sync 1,500 rows")
        wait_until(lambda: _flow_states(url) == {"erp-agent": "running", "crm-agent": "running"}, 10,
                   "both agents to report the flow running")  # fmt: skip

        # Pause: acked by both agents; changes stay in the ERP meanwhile.
        out = _cli(cli_flow.app, "pause", "customers", "--control-plane", url)
        assert "erp-agent/customers: ok: paused" in out
        assert "crm-agent/customers: ok: paused" in out
        before = rows(crm_db)
        load.insert(200)
        load.update(100)
        time.sleep(1.5)
        assert rows(crm_db) == before, "a paused flow applied changes"
        # The pause is the flow's desired state: it survives an agent restart.
        assert erp_agent.terminate() == 0
        erp_agent.start()  # ready: command channel up and assigned flows loaded, so commands reach them
        wait_until(
            lambda: _flow_states(url).get("erp-agent") == "paused", 20, "restarted agent: still paused"
        )
        time.sleep(1.0)
        assert rows(crm_db) == before
        listing = _cli(cli_flow.app, "list", "--control-plane", url)
        assert "paused" in listing

        # Resume: everything captured meanwhile arrives.
        out = _cli(cli_flow.app, "resume", "customers", "--control-plane", url)
        assert "erp-agent/customers: ok: running" in out
        wait_until(lambda: rows(crm_db) == rows(erp_db), 30, "catch-up after resume")

        # Reconfigure under load: generation 2, agents switch without a restart.
        with _Load(load):
            time.sleep(0.5)
            out = _cli(
                cli_flow.app,
                "apply",
                str(_flow_file(flows, erp_db, crm_db, batch=50)),
                "--control-plane",
                url,
            )
            assert "flow customers: updated (generation 2)" in out
            time.sleep(1.0)
            # A restart command mid-load too.
            out = _cli(cli_flow.app, "restart", "customers", "--control-plane", url)
            assert "ok: running: restarted" in out
            time.sleep(0.5)
        wait_until(lambda: rows(crm_db) == rows(erp_db), 30, "sync after the reconfiguration")
        view = json.loads(_cli(cli_flow.app, "get", "customers", "--json", "--control-plane", url))
        assert view["spec"]["generation"] == 2
        wait_until(lambda: all(r["generation"] == 2 for r in json.loads(
            _cli(cli_flow.app, "get", "customers", "--json", "--control-plane", url))["reports"]), 30,
            "agents to run generation 2")  # fmt: skip

        # Drain: capture stops, the backlog is published and applied, then the flow stops. The
        # sink side is paused first so there is a backlog to drain.
        out = _cli(cli_flow.app, "pause", "customers", "--agent", "crm-agent", "--control-plane", url)
        assert "crm-agent/customers: ok: paused" in out
        load.insert(400)
        load.update(200)
        load.delete(20)
        out = _cli(cli_flow.app, "drain", "customers", "--control-plane", url)
        assert "erp-agent/customers: ok: drained" in out
        assert "crm-agent/customers: ok: drained" in out
        assert rows(crm_db) == rows(erp_db), "drain returned before everything was applied"
        load.insert(10)
        time.sleep(1.0)
        assert len(rows(crm_db)) == len(rows(erp_db)) - 10, "a drained flow kept capturing"
        _cli(cli_flow.app, "resume", "customers", "--control-plane", url)
        wait_until(lambda: rows(crm_db) == rows(erp_db), 30, "sync after resuming a drained flow")

        # Delete under load, then re-apply: the stored cursor resumes, nothing lost or doubled.
        with _Load(load):
            time.sleep(0.3)
            out = _cli(cli_flow.app, "delete", "customers", "--yes", "--control-plane", url)
            assert "deleted flow customers" in out
            time.sleep(0.5)
        wait_until(lambda: not _cli(cli_agent_cp.app, "list", "--json", "--control-plane", url).count(
            '"name": "customers"'), 30, "agents to drop the deleted flow")  # fmt: skip
        load.insert(50)
        time.sleep(0.8)
        assert len(rows(crm_db)) < len(rows(erp_db))
        out = _cli(cli_flow.app, "apply", str(flows), "--control-plane", url)
        assert "flow customers: created (generation 1)" in out
        wait_until(lambda: rows(crm_db) == rows(erp_db), 30, "sync after re-applying the deleted flow")
        assert_same_rows(erp_db, crm_db)
        assert_effect_once(crm_db)
        with sqlite3.connect(crm_db) as c:
            writes = c.execute("SELECT count(*) FROM version_log").fetchone()[0]
        assert writes >= len(rows(crm_db))

        # Every change and command is in the audit trail.
        audit = _cli(cli_audit.app, "tail", "--lines", "50", "--nats", url)
        for kind in ("flow_apply", "command", "flow_delete"):
            assert kind in audit, audit
        assert "pause flow customers" in audit
    finally:
        for agent in (erp_agent, crm_agent):
            code = agent.terminate()
            assert code == 0, f"{agent.config.name} exited {code}; log: {agent.log.read_text()[-3000:]}"


def test_agent_commands_and_unknown_targets(
    nats_server: NatsServer, control_plane: str, tmp_path: Path
) -> None:
    """`meshctl agent pause|resume NAME` acts on every flow of that agent (flows from its own
    config file included); commands for unknown flows or agents are refused with the reason."""
    from tests.integration._harness import agent_toml

    url = nats_server.url
    erp_db, crm_db = tmp_path / "erp.db", tmp_path / "crm.db"
    make_erp(erp_db)
    make_crm(crm_db)
    erp_cfg = tmp_path / "erp.toml"
    erp_cfg.write_text(
        agent_toml(
            name="erp-agent",
            system="erp",
            state=tmp_path / "es",
            url=url,
            source=erp_db,
            creds=tmp_path / "erp-agent.creds",
        )
    )
    crm_cfg = tmp_path / "crm.toml"
    crm_cfg.write_text(
        agent_toml(
            name="crm-agent",
            system="crm",
            state=tmp_path / "cs",
            url=url,
            sink=crm_db,
            creds=tmp_path / "crm-agent.creds",
        )
    )
    for cfg in (erp_cfg, crm_cfg):  # their own flows: their own least-privilege creds
        secure_agent(cfg, nats_server)
        _cli(cli_agent_cp.app, "register", "--config", str(cfg), "--control-plane", url)
    agents = [AgentProcess(erp_cfg, tmp_path / "erp.log"), AgentProcess(crm_cfg, tmp_path / "crm.log")]
    for a in agents:
        a.start()
    try:
        out = _cli(cli_flow.app, "pause", "nope", "--control-plane", url, code=1)
        assert "no flow named 'nope'" in out
        out = _cli(cli_agent_cp.app, "pause", "ghost", "--control-plane", url, code=1)
        assert "no agent named 'ghost'" in out
        load = ErpLoad(erp_db, seed=3)
        load.insert(100)
        wait_until(lambda: len(rows(crm_db)) == 100, 30, "config-file flow to sync")
        out = _cli(cli_agent_cp.app, "pause", "erp-agent", "--control-plane", url)
        assert "erp-agent/customers: ok: paused" in out
        load.insert(20)
        time.sleep(1.0)
        assert len(rows(crm_db)) == 100
        out = _cli(cli_agent_cp.app, "resume", "erp-agent", "--control-plane", url)
        assert "erp-agent/customers: ok: running" in out
        wait_until(lambda: rows(crm_db) == rows(erp_db), 30, "sync after agent resume")
        # A flow that only agents' config files define: commands reach it by name too.
        out = _cli(cli_flow.app, "restart", "customers", "--control-plane", url)
        assert "crm-agent/customers: ok: running: restarted" in out
        assert "erp-agent/customers: ok: running: restarted" in out
    finally:
        for a in agents:
            assert a.terminate() == 0, a.log.read_text()[-3000:]
