"""Configuration errors found at run time (a missing table, a wrong password) mark the flow
``failing`` with a one-line reason — in the log, in the heartbeat's FlowReport and in
``meshctl agent health`` — are retried on a backoff without a traceback, and the flow recovers
by itself once the cause is fixed."""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from typer.testing import CliRunner

from agents.connector import ConnectorAgent
from agents.control_plane import ControlPlane
from mesh.actors import Backoff
from mesh.cli import agent_cp as cli_agent_cp
from mesh.controlplane.client import ControlPlaneClient, register_agent
from mesh.controlplane.identity import save_credentials
from mesh.controlplane.models import Manifest
from mesh.controlplane.settings import settings_from
from mesh.metrics import Metrics
from mesh.transport import JetStream
from tests._pg import PASSWORD, PASSWORD_ROLE, PgCluster
from tests._secure import SecuredNatsServer as NatsServer
from tests._secure import secure_config
from tests.integration._harness import CUSTOMERS, agent_toml, make_erp

pytestmark = [pytest.mark.integration, pytest.mark.anyio, pytest.mark.timeout(90)]

FAST_RETRY = Backoff(base=0.2, cap=1.0)  # the policy's shape, at test speed
PW_ENV = "MESH_TEST_CRM_PASSWORD"


def _fast_heartbeats(toml: str) -> str:
    return toml.replace("[agent]\n", "[agent]\nheartbeat_interval = 0.3\n", 1)


@asynccontextmanager
async def _mesh(server: NatsServer, tmp: Path, *tomls: str) -> AsyncIterator[list[ConnectorAgent]]:
    """A control plane and the agents of ``tomls``, registered (so they send heartbeats)."""
    cp_creds = str(server.security_dir / "creds" / "control-plane.creds")
    settings = settings_from(
        {"name": "cp1", "nats": {"servers": [server.url], "request_timeout": 2.0, "creds": cp_creds}}
    )
    cp = ControlPlane(settings)
    # Registered, with their static flows: each its own least-privilege creds (heartbeats go to
    # <prefix>.heartbeat.<its name>, which its permissions allow).
    cfgs = [secure_config(_fast_heartbeats(t), tmp / f"agent-{i}.creds", server) for i, t in enumerate(tomls)]
    agents = [ConnectorAgent(c, metrics=Metrics(), config_retry=FAST_RETRY) for c in cfgs]
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(20):
            await tg.start(lambda task_status: cp.run(task_status=task_status))
            async with JetStream(server.nats_config(request_timeout=2.0), name="test") as js:
                client = ControlPlaneClient(js, timeout=5)
                for c in cfgs:
                    _, creds = await register_agent(
                        client, name=c.agent.name, site="plant-1", state_dir=c.agent.state_dir,
                        manifest=Manifest(adapters=["sqlite", "postgres"], operations=[]), current=None,
                    )  # fmt: skip
                    save_credentials(Path(c.agent.state_dir), creds)
            for a in agents:
                await tg.start(a.run)
        try:
            yield agents
        finally:
            for a in agents:
                a.stop()
            cp.stop()


async def _health(server: NatsServer, name: str) -> tuple[int, dict[str, Any]]:
    """``meshctl agent health NAME --json``: (exit code, the agent's view)."""
    runner = CliRunner()
    env = {"MESH_CONTROL_PLANE": server.url, "MESH_CREDS": str(server.admin_creds)}
    r = await anyio.to_thread.run_sync(
        lambda: runner.invoke(cli_agent_cp.app, ["health", name, "--json"], env=env)
    )
    try:  # exit 2 (the control plane did not answer in time): not an answer, ask again
        views = json.loads(r.output) if r.exit_code in (0, 1) else []
    except ValueError:
        views = []
    return r.exit_code, views[0] if views else {}


async def _until_health(server: NatsServer, name: str, ok: Any, timeout: float = 30) -> dict[str, Any]:
    with anyio.fail_after(timeout):
        while True:
            code, view = await _health(server, name)
            if ok(code, view):
                return view
            await anyio.sleep(0.1)


def _failing(reason: str) -> Any:
    def check(code: int, view: dict[str, Any]) -> bool:
        flows = {f["name"]: f for f in view.get("flows", [])}
        f = flows.get("customers")
        return code == 1 and f is not None and f["state"] == "failing" and reason in f["detail"]

    return check


def _running(code: int, view: dict[str, Any]) -> bool:
    flows = {f["name"]: f for f in view.get("flows", [])}
    f = flows.get("customers")
    return f is not None and f["state"] == "running" and not f["detail"]


def _no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    assert "Traceback" not in caplog.text
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []


async def _until(predicate: Any, timeout: float = 30) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.05)


async def test_missing_sink_table_fails_the_flow_until_it_is_created(
    nats_server: NatsServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    erp, crm = tmp_path / "erp.db", tmp_path / "crm.db"
    make_erp(erp)
    with sqlite3.connect(erp) as c:
        c.execute("INSERT INTO customers (id, name) VALUES (1, 'Ada')")
    with sqlite3.connect(crm) as c:
        c.execute("CREATE TABLE unrelated (x)")  # the database exists, the table does not
    url = nats_server.url
    erp_toml = agent_toml(name="erp-agent", system="erp", state=tmp_path / "s-erp", url=url, source=erp)
    crm_toml = agent_toml(name="crm-agent", system="crm", state=tmp_path / "s-crm", url=url, sink=crm)
    async with _mesh(nats_server, tmp_path, erp_toml, crm_toml):
        view = await _until_health(nats_server, "crm-agent", _failing("does not exist"))
        assert "flow customers failing" in view["reason"]
        assert "customers" in view["reason"]
        (detail,) = [f["detail"] for f in view["flows"] if f["name"] == "customers"]
        assert "\n" not in detail
        assert any("failing" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)

        with sqlite3.connect(crm) as c:  # the operator fixes it; nobody restarts anything
            c.executescript(CUSTOMERS)
        await _until(lambda: _rows(crm) == {1: "Ada"})
        await _until_health(nats_server, "crm-agent", _running)
    _no_tracebacks(caplog)


def _rows(db: Path) -> dict[int, str]:
    with sqlite3.connect(db) as c:
        return dict(c.execute("SELECT id, name FROM customers").fetchall())


async def test_wrong_postgres_password_fails_the_flow_until_it_is_fixed(
    nats_server: NatsServer,
    tmp_path: Path,
    pg_cluster: PgCluster,
    pg_db: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO)
    with pg_cluster.connect(pg_db) as db:
        db.execute(
            "CREATE TABLE customers (id bigint PRIMARY KEY, name text NOT NULL, email text, country text, "
            "credit_limit_cents bigint NOT NULL DEFAULT 0, balance double precision)"
        )
    erp = tmp_path / "erp.db"
    make_erp(erp)
    with sqlite3.connect(erp) as c:
        c.execute("INSERT INTO customers (id, name) VALUES (7, 'Grace')")
    monkeypatch.setenv(PW_ENV, "not-the-password")
    dsn = pg_cluster.dsn(pg_db, user=PASSWORD_ROLE)
    url = nats_server.url
    erp_toml = agent_toml(name="erp-agent", system="erp", state=tmp_path / "s-erp", url=url, source=erp)
    crm_toml = (
        agent_toml(name="crm-agent", system="crm", state=tmp_path / "s-crm", url=url)
        + f"""
[flows.sink]
adapter = "postgres"
dsn = "{dsn}"
password_env = "{PW_ENV}"
table = "customers"
key = "id"
"""
    )
    async with _mesh(nats_server, tmp_path, erp_toml, crm_toml):
        view = await _until_health(nats_server, "crm-agent", _failing("password authentication failed"))
        assert "not-the-password" not in json.dumps(view)
        assert "not-the-password" not in caplog.text

        monkeypatch.setenv(PW_ENV, PASSWORD)  # fixed where the secret lives; read at the next retry

        def applied() -> bool:
            with pg_cluster.connect(pg_db) as db:
                return db.execute("SELECT name FROM customers WHERE id = 7").fetchall() == [("Grace",)]

        await _until(applied)
        await _until_health(nats_server, "crm-agent", _running)
    _no_tracebacks(caplog)
