"""A System API call survives SIGKILL of the agent serving it: killed after the SQL commit
(before the result reached ``mesh_api_results``), the retry with the same key, served by the
restarted agent once the dead claim expired, returns the committed result from the ERP's own
``mesh_api_calls`` row and inserts nothing; killed after claiming (before running), the retry
executes it once."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests._secure import SecuredNatsServer, write_agent_config
from tests.integration._harness import AgentProcess, wait_until
from tests.integration.test_system_api import SCHEMA, SQLITE_OPS, order, rows

pytestmark = [pytest.mark.integration, pytest.mark.crash, pytest.mark.timeout(120)]


def meshctl(server: SecuredNatsServer, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MESH_CREDS": str(server.admin_creds), "MESH_NATS_URL": server.url}
    return subprocess.run(
        [sys.executable, "-m", "mesh", "api", *args], env=env, capture_output=True, text=True, timeout=60
    )


def served(server: SecuredNatsServer) -> bool:
    out = meshctl(server, "list", "--json", "--wait", "0.3")
    return out.returncode == 0 and bool(json.loads(out.stdout))


@pytest.mark.parametrize(
    ("point", "executed_before_crash"), [("api.after_commit", True), ("api.after_claim", False)]
)
def test_a_call_killed_mid_way_takes_effect_once(
    point: str, executed_before_crash: bool, tmp_path: Path, nats_server: SecuredNatsServer
) -> None:
    db = tmp_path / "erp.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.executescript(SCHEMA)
    text = f"""
[agent]
name = "erp-agent"
system = "erp"
state_dir = "{tmp_path / "state"}"

[nats]
servers = ["{nats_server.url}"]

[api]
claim_timeout = 1.0
{SQLITE_OPS.format(db=db)}
"""
    agent = AgentProcess(write_agent_config(tmp_path / "erp.toml", text, nats_server), tmp_path / "erp.log")
    request = tmp_path / "order.json"
    request.write_text(json.dumps(order("SO-5")))
    call = ["call", "erp.sales_order.create", "--data", f"@{request}", "--key", "saga-5/step-1"]
    agent.start(env={**os.environ, "MESH_CRASH_POINTS": f"{point}:1.0"})
    try:
        wait_until(lambda: served(nats_server), 30, "the agent's API")
        lost = meshctl(nats_server, *call, "--timeout", "3")
        assert lost.returncode == 1
        assert "timeout (retryable)" in lost.stderr, lost.stderr
        wait_until(lambda: agent.killed_by_sigkill, 10, f"SIGKILL at {point}")
        assert rows(db) == ([("SO-5", 1250)] if executed_before_crash else [])

        agent.start()  # no crash points this time
        wait_until(lambda: served(nats_server), 30, "the restarted agent's API")
        retry = meshctl(nats_server, *call, "--timeout", "20")
        assert retry.returncode == 0, retry.stderr
        assert json.loads(retry.stdout) == {"order_id": 1, "number": "SO-5"}
        assert ("replayed" in retry.stderr) is executed_before_crash
        again = meshctl(nats_server, *call, "--timeout", "5")
        assert json.loads(again.stdout) == {"order_id": 1, "number": "SO-5"}
        assert "replayed" in again.stderr
    finally:
        agent.terminate()
    assert rows(db) == [("SO-5", 1250)]
