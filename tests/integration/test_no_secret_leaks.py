"""Nothing secret leaves the agent: a flow whose REST sink authenticates with a bearer token from
a file and an API key from the environment is applied through the control plane, one record is
refused by the API (whose error body echoes the Authorization header, as careless APIs do) and
dead-lettered; then every place an operator or another agent can read is searched for both
secret values: the ``mesh_flows`` KV record, ``meshctl flow get`` (text and JSON), ``/status``
and the dashboard over HTTP, the status over NATS, the audit trail, and the DLQ message (headers
and body) — and the logs."""

from __future__ import annotations

import base64
import logging
import sqlite3
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import nats
import pytest
from typer.testing import CliRunner

from agents.connector import ConnectorAgent
from agents.control_plane import ControlPlane
from mesh.cli import flow as cli_flow
from mesh.config import parse_agent_config
from mesh.controlplane.audit import tail
from mesh.controlplane.client import ControlPlaneClient, register_agent
from mesh.controlplane.identity import save_credentials
from mesh.controlplane.models import Manifest
from mesh.controlplane.settings import settings_from
from mesh.transport import JetStream
from tests._secure import SecuredNatsServer as NatsServer
from tests.fakes.crm_api import serve_crm_api
from tests.integration._harness import make_erp

pytestmark = [pytest.mark.anyio, pytest.mark.integration, pytest.mark.timeout(120)]

TOKEN = "tok-9f3aQ-LEAKCHECK-bearer"
API_KEY = "key-77c1Z-LEAKCHECK-header"


def _agent_toml(name: str, system: str, state: Path, url: str, allowed: Path, creds: Path) -> str:
    # the control plane assigns these agents their flows: until it issues each one its JWT at
    # registration (enrollment), they connect as the admin
    return f"""
[agent]
name = "{name}"
system = "{system}"
state_dir = "{state}"
allowed_paths = ["{allowed}"]
allowed_env = ["CRM_*"]
heartbeat_interval = 0.5
[nats]
servers = ["{url}"]
request_timeout = 2.0
creds = "{creds}"
"""


def _flow_file(erp_db: Path, api: str) -> str:
    return f"""
[[flows]]
name = "customers"
entity = "customer"
[flows.consumer]
fetch_timeout = 0.2
ack_wait = 5.0
max_deliver = 2
[flows.retry]
initial_delay = 0.1
max_delay = 0.2
[flows.source]
agent = "erp-agent"
adapter = "sqlite"
path = "{erp_db}"
table = "customers"
key = "id"
poll_interval = 0.05
[flows.sink]
agent = "crm-agent"
adapter = "rest"
base_url = "{api}"
upsert_path = "/customers/{{key}}"
state_path = "rest-versions.db"
max_attempts = 1
headers = {{ "X-Tenant" = "acme" }}
headers_env = {{ "X-Api-Key" = "CRM_API_KEY" }}
[flows.sink.auth]
type = "bearer"
token_file = "crm.token"
"""


def _leaks(where: str, text: str | bytes) -> list[str]:
    data = text if isinstance(text, bytes) else text.encode()
    found = []
    for name, secret in (("bearer token", TOKEN), ("API key", API_KEY)):
        for form in (secret.encode(), base64.b64encode(secret.encode())):
            if form in data:
                found.append(f"{name} in {where}")
    return found


async def test_no_secret_in_kv_flow_get_status_audit_dlq_or_logs(
    tmp_path: Path, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("CRM_API_KEY", API_KEY)
    url = nats_server.url
    erp_db = tmp_path / "erp.db"
    make_erp(erp_db)
    states = {"erp-agent": tmp_path / "s-erp", "crm-agent": tmp_path / "s-crm"}
    for state in states.values():
        state.mkdir(mode=0o700)
    (states["crm-agent"] / "crm.token").write_text(TOKEN + "\n")
    settings = settings_from({
        "name": "cp1", "nats": {"servers": [url], "request_timeout": 2.0,
                 "creds": str(nats_server.security_dir / "creds" / "control-plane.creds")}, "http_port": 0,
        "sweep_interval": 0.2, "health": {"stale_after": 5.0, "lost_after": 10.0},
    })  # fmt: skip
    cp = ControlPlane(settings)
    outputs: dict[str, str | bytes] = {}
    async with (
        serve_crm_api(tmp_path / "api.db", token=TOKEN) as api,
        anyio.create_task_group() as tg,
    ):
        with anyio.fail_after(15):
            await tg.start(lambda task_status: cp.run(task_status=task_status))
            await cp.lease.wait(leader=True)  # type: ignore[union-attr]
        async with JetStream(nats_server.nats_config(request_timeout=2.0), name="test") as js:
            client = ControlPlaneClient(js, timeout=5)
            agents = {}
            for (name, state), system in zip(states.items(), ("erp", "crm"), strict=True):
                manifest = Manifest(
                    adapters=["sqlite", "rest"], state_dir=str(state), allowed_paths=[str(tmp_path)]
                )
                _, creds = await register_agent(
                    client, name=name, site="s", state_dir=str(state), manifest=manifest, current=None
                )
                save_credentials(state, creds)
                cfg = parse_agent_config(
                    _agent_toml(name, system, state, url, tmp_path, nats_server.admin_creds), base=tmp_path
                )
                agents[name] = ConnectorAgent(cfg)
                await tg.start(agents[name].run)
            applied = await client.apply_flows(_flow_file(erp_db, api.url), source="flows.toml")
            assert [c.action for c in applied.changes] == ["created"]

            with sqlite3.connect(erp_db) as db:  # the fake API refuses an email without "@" (400)
                db.execute(
                    "INSERT INTO customers (id, name, email, credit_limit_cents, balance) "
                    "VALUES (1, 'Ann', 'ann@example.com', 100, 1.0), (2, 'Bob', 'no-at-sign', 100, 1.0)"
                )
            with anyio.fail_after(60):
                while (await js.stream_info("MESH_DLQ")).messages < 1 or api.record("customers", "1") is None:
                    await anyio.sleep(0.1)
            assert api.record("customers", "1") is not None  # the token did authenticate

            nc = await nats.connect(url, user_credentials=str(nats_server.admin_creds))
            try:
                kv = await nc.jetstream().key_value("mesh_flows")
                for key in await kv.keys():
                    entry = await kv.get(key)
                    outputs[f"KV mesh_flows {key}"] = entry.value or b""
                dlq = await nc.jetstream().stream_info("MESH_DLQ")
                for seq in range(dlq.state.first_seq, dlq.state.last_seq + 1):
                    msg = await nc.jetstream().get_msg("MESH_DLQ", seq)
                    outputs[f"DLQ #{seq} headers"] = msgspec.json.encode(msg.headers or {})
                    outputs[f"DLQ #{seq} body"] = msg.data or b""
            finally:
                await nc.close()
            outputs["status over NATS"] = msgspec.json.encode(await client.status())
            outputs["flows over NATS"] = msgspec.json.encode(await client.flows("customers"))
            outputs["audit"] = b"\n".join([msgspec.json.encode(e) async for e in tail(js, last=200)])
            async with httpx.AsyncClient() as http:
                base = f"http://127.0.0.1:{cp.http_port}"
                for path in ("/status", "/", "/metrics"):
                    outputs[f"HTTP {path}"] = (await http.get(base + path)).content

            def cli(*args: str) -> str:
                result = CliRunner().invoke(
                    cli_flow.app,
                    [*args, "--control-plane", url],
                    env={"MESH_CREDS": str(nats_server.admin_creds)},
                )
                assert result.exit_code == 0, result.output
                return result.output

            outputs["meshctl flow get"] = await anyio.to_thread.run_sync(cli, "get", "customers")
            outputs["meshctl flow get --json"] = await anyio.to_thread.run_sync(
                cli, "get", "customers", "--json"
            )
        for agent in agents.values():
            agent.stop()
        cp.stop()
        tg.cancel_scope.cancel()
    outputs["logs"] = caplog.text

    # Positive controls: the places searched hold the flow, its references and the failure.
    assert b"CRM_API_KEY" in _bytes(outputs["KV mesh_flows flow.customers"])
    assert "crm.token" in str(outputs["meshctl flow get"])
    assert any(b"flow_apply" in _bytes(v) for k, v in outputs.items() if k == "audit")
    # the API echoed the Authorization header into its error: it reached the DLQ masked
    assert any(k.startswith("DLQ") and b"Bearer ***" in _bytes(v) for k, v in outputs.items())
    leaks = [leak for where, text in outputs.items() for leak in _leaks(where, text)]
    assert leaks == []


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()
