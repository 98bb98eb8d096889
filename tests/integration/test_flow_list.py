"""`meshctl flow list` shows every flow the agents run: applied ones and those from the agents'
own config files (marked ``config file``); and an agent started without a control plane says
once, at info level, what that means — then joins one without a restart.

A real control plane process, a real agent process, a real (secured) nats-server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mesh.broker import free_port
from mesh.cli import agent_cp as cli_agent_cp
from mesh.cli import flow as cli_flow
from mesh.readiness import NotReady, wait_ready
from tests._secure import SecuredNatsServer as NatsServer
from tests._secure import admin_creds
from tests.integration._harness import AgentProcess, log_tail, make_erp, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

runner = CliRunner()
STANDALONE = "runs without a control plane"


def _cli(app: object, *args: str, code: int = 0) -> str:
    result = runner.invoke(app, list(args))  # type: ignore[arg-type]
    out = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code == code, f"exit {result.exit_code} (expected {code}): {out}"
    assert "Traceback" not in out
    return out


@pytest.fixture
def control_plane(nats_server: NatsServer, tmp_path: Path, security_dir: Path) -> Iterator[str]:
    """`meshctl control-plane run` as a process; the operator CLI runs as the admin."""
    runner.env = {"MESH_CREDS": str(admin_creds(security_dir))}
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
        runner.env = {}
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def _agent_config(tmp: Path, url: str, creds: Path, erp_db: Path) -> Path:
    cfg = tmp / "erp-agent.toml"
    cfg.write_text(
        f"""
log_level = "info"
[agent]
name = "erp-agent"
system = "erp"
state_dir = "{tmp / "erp-agent-state"}"
allowed_paths = ["{tmp}"]
heartbeat_interval = 0.5
[nats]
servers = ["{url}"]
request_timeout = 2.0
creds = "{creds}"
inbox_prefix = "_INBOX.erp-agent"

[[flows]]
name = "customers"
entity = "customer"
[flows.source]
adapter = "sqlite"
path = "{erp_db}"
table = "customers"
key = "id"
poll_interval = 0.05
""",
        encoding="utf-8",
    )
    return cfg


def _listed(url: str) -> dict[str, dict[str, object]]:
    out = _cli(cli_flow.app, "list", "--json", "--control-plane", url)
    return {v["spec"]["name"]: v for v in json.loads(out)}


def test_flow_list_shows_config_file_flows_and_a_standalone_agent_says_so_once(
    nats_server: NatsServer, control_plane: str, tmp_path: Path
) -> None:
    url = nats_server.url
    erp_db = tmp_path / "erp.db"
    make_erp(erp_db)
    cfg = _agent_config(tmp_path, url, nats_server.admin_creds, erp_db)
    agent = AgentProcess(cfg, tmp_path / "erp-agent.log")

    # Started before it is registered: it runs its flow, and says once what standalone means.
    agent.start()
    try:
        wait_until(lambda: STANDALONE in agent.log.read_text(), 10, "the standalone note")
        assert "no flows applied" in _cli(cli_flow.app, "list", "--control-plane", url)

        # Registered while it runs: heartbeats start without a restart, and its config-file flow
        # is listed, marked as such.
        _cli(cli_agent_cp.app, "register", "--config", str(cfg), "--control-plane", url)
        wait_until(lambda: _listed(url).get("customers", {}).get("state") == "running", 20,
                   "the config-file flow in `flow list`")  # fmt: skip
        view = _listed(url)["customers"]
        spec = view["spec"]
        assert isinstance(spec, dict)
        assert spec["source"] == "config file"
        assert spec["generation"] == 0
        assert spec["parts"] == [{"agent": "erp-agent", "config": {"name": "customers", "sides": ["source"]}}]
        table = _cli(cli_flow.app, "list", "--control-plane", url)
        header, *rows = table.splitlines()
        head = ["NAME", "FROM", "ENTITY", "GEN", "DESIRED", "STATE", "AGENTS", "APPLIED", "BY"]
        assert header.split() == head
        row = ["customers", "config", "file", "-", "-", "-", "running", "erp-agent", "-", "-"]
        assert rows[0].split() == row

        # An applied flow is listed beside it, as applied.
        flows = tmp_path / "flows.toml"
        flows.write_text(
            f"""
[[flows]]
name = "products"
entity = "product"
[flows.sink]
agent = "erp-agent"
adapter = "sqlite"
path = "{tmp_path / "products.db"}"
table = "products"
key = "id"
create_table = true
""",
            encoding="utf-8",
        )
        _cli(cli_flow.app, "apply", str(flows), "--control-plane", url)
        wait_until(lambda: _listed(url).get("products", {}).get("state") == "running", 20, "the applied flow")
        listed = _listed(url)
        assert sorted(listed) == ["customers", "products"]
        products = listed["products"]["spec"]
        assert isinstance(products, dict)
        assert products["source"] != "config file"
        assert products["generation"] == 1
        rows = _cli(cli_flow.app, "list", "--control-plane", url).splitlines()[1:]
        assert [r.split()[:2] for r in rows] == [["customers", "config"], ["products", "apply"]]
        # `flow get` is about applied flows; of a config-file flow it says where it comes from.
        _cli(cli_flow.app, "get", "products", "--control-plane", url)
        out = _cli(cli_flow.app, "get", "customers", "--control-plane", url, code=1)
        assert "flow 'customers' is not applied: it runs from the config file of erp-agent" in out
    finally:
        code = agent.terminate()
    text = agent.log.read_text()
    assert code == 0, log_tail(agent.log)
    assert text.count(STANDALONE) == 1, text
    assert "no heartbeats and takes no remote commands" in text
    assert "is registered now: heartbeats start" in text
    standalone = next(line for line in text.splitlines() if STANDALONE in line)
    assert " info " in standalone, standalone
    assert not [line for line in text.splitlines() if "mesh.heartbeat" in line and " warning " in line], text
