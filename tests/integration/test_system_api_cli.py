"""``meshctl api list`` / ``meshctl api call`` against a real ``meshctl agent run`` process that
serves its system's API with its own least-privilege creds; the agent SIGKILLed and restarted
keeps answering a retried key with the first result (kept in ``mesh_api_results``)."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._secure import SecuredNatsServer, write_agent_config
from tests.integration._harness import AgentProcess, wait_until
from tests.integration.test_system_api import SCHEMA, SQLITE_OPS, order, rows

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def meshctl(server: SecuredNatsServer, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MESH_CREDS": str(server.admin_creds), "MESH_NATS_URL": server.url}
    return subprocess.run(
        [sys.executable, "-m", "mesh", "api", *args], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def erp_agent(tmp_path: Path, nats_server: SecuredNatsServer) -> Iterator[tuple[AgentProcess, Path]]:
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
{SQLITE_OPS.format(db=db)}
"""
    config = write_agent_config(tmp_path / "erp.toml", text, nats_server)
    agent = AgentProcess(config, tmp_path / "erp.log")
    agent.start()
    try:
        yield agent, db
    finally:
        agent.terminate()


def listed(server: SecuredNatsServer) -> list[dict[str, object]]:
    out = meshctl(server, "list", "--json", "--wait", "0.5")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_list_and_call_a_served_api_and_replay_after_sigkill(
    erp_agent: tuple[AgentProcess, Path], nats_server: SecuredNatsServer, tmp_path: Path
) -> None:
    agent, db = erp_agent
    wait_until(lambda: bool(listed(nats_server)), 30, "the ERP agent's API to be discoverable")
    [svc] = listed(nats_server)
    assert (svc["name"], svc["version"], svc["agents"]) == ("mesh-erp", "1.0.0", ["erp-agent"])
    table = meshctl(nats_server, "list")
    assert "mesh-erp 1.0.0  system=erp  agents=erp-agent" in table.stdout
    assert "api.erp.sales_order.create  (write)" in table.stdout

    request = tmp_path / "order.json"
    request.write_text(json.dumps(order("SO-9")))
    first = meshctl(nats_server, "call", "erp.sales_order.create", "--data", f"@{request}", "--key", "deal-9")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == {"order_id": 1, "number": "SO-9"}

    got = meshctl(nats_server, "call", "api.erp.customer.get", "--read", "--data", '{"id": "ALFKI"}')
    assert json.loads(got.stdout)["name"] == "Alfreds Futterkiste"
    missing = meshctl(nats_server, "call", "erp.customer.get", "--read", "--data", '{"id": "X"}')
    assert missing.returncode == 1
    assert missing.stderr.strip() == "error: api.erp.customer.get: not_found (not retryable): no such record"

    agent.kill()
    down = meshctl(nats_server, "call", "erp.sales_order.create", "--data", f"@{request}", "--key", "deal-9",
                   "--timeout", "2")  # fmt: skip
    assert down.returncode == 1
    assert "unavailable (retryable)" in down.stderr
    agent.start()
    wait_until(lambda: bool(listed(nats_server)), 30, "the restarted agent's API")
    again = meshctl(nats_server, "call", "erp.sales_order.create", "--data", f"@{request}", "--key", "deal-9")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == {"order_id": 1, "number": "SO-9"}
    assert "replayed" in again.stderr
    assert rows(db) == [("SO-9", 1250)]
