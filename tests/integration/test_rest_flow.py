"""End to end into a REST target: ERP (SQLite) -> agents -> a CRM HTTP API that answers 500s
and 429 storms for a while. Everything arrives, each version takes effect once, nothing is
dead-lettered, and the API's token never shows in the agent's logs."""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import anyio
import nats
import pytest

from agents.connector import ConnectorAgent
from mesh.metrics import Metrics
from tests._secure import SecuredNatsServer as NatsServer
from tests._secure import secure_config
from tests.fakes.crm_api import serve_crm_api
from tests.integration._harness import ErpLoad, agent_toml, make_erp, rows

pytestmark = [pytest.mark.anyio, pytest.mark.integration, pytest.mark.timeout(120)]

TOKEN = "s3cr3t-crm-token"


def crm_agent_toml(tmp: Path, url: str, api: str) -> str:
    return f"""
[agent]
name = "crm-agent"
system = "crm"
state_dir = "{tmp / "s-crm"}"
[nats]
servers = ["{url}"]
[[flows]]
name = "customers"
entity = "customer"
[flows.consumer]
batch_size = 200
fetch_timeout = 0.2
ack_wait = 30.0
max_deliver = 100
[flows.retry]
initial_delay = 0.2
max_delay = 1.0
[flows.sink]
adapter = "rest"
base_url = "{api}"
upsert_path = "/customers/{{key}}"
state_path = "{tmp / "s-crm" / "rest-versions.db"}"
timeout = 2.0
max_attempts = 3
retry_after_cap = 2.0
breaker_threshold = 20
breaker_cooldown = 1.0
[flows.sink.auth]
type = "bearer"
token_env = "CRM_TOKEN"
"""


async def test_rest_target_misbehaving_for_a_while(
    tmp_path: Path, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CRM_TOKEN", TOKEN)
    caplog.set_level(logging.DEBUG)
    erp_db = tmp_path / "erp.db"
    make_erp(erp_db)
    load = ErpLoad(erp_db, seed=3)
    load.insert(1500)
    erp = ConnectorAgent(secure_config(agent_toml(
        name="erp-agent", system="erp", state=tmp_path / "s-erp", url=nats_server.url, source=erp_db,
    ), tmp_path / "erp-agent.creds", nats_server))  # fmt: skip
    metrics = Metrics()
    async with serve_crm_api(tmp_path / "api.db", token=TOKEN) as api:
        crm = ConnectorAgent(
            secure_config(
                crm_agent_toml(tmp_path, nats_server.url, api.url), tmp_path / "crm-agent.creds", nats_server
            ),
            metrics=metrics,
        )
        async with anyio.create_task_group() as tg:
            await tg.start(erp.run)
            await tg.start(crm.run)
            api.chaos("500", seconds=2)
            await anyio.sleep(2.5)
            api.chaos("429", seconds=2, retry_after=1)
            load.update(400)
            load.delete(100)
            await anyio.sleep(2.5)
            api.chaos("ok")
            load.mixed(30)

            def remote() -> dict[str, dict[str, object]]:
                db = sqlite3.connect(tmp_path / "api.db")
                try:
                    found = db.execute("SELECT key, body FROM records WHERE collection = 'customers'")
                    return {k: json.loads(b) for k, b in found}
                finally:
                    db.close()

            def local() -> dict[str, tuple[object, ...]]:
                return {str(r[0]): r for r in rows(erp_db)}

            def differences() -> list[str]:
                want, got = local(), remote()
                if set(want) != set(got):
                    return sorted(set(want) ^ set(got))
                return [
                    k for k, row in want.items()
                    if (got[k]["id"], got[k]["name"], got[k]["email"], got[k]["credit_limit_cents"],
                        got[k]["balance"]) != (row[0], row[1], row[2], row[4], row[5])
                ]  # fmt: skip

            with anyio.fail_after(60):
                while differences():
                    await anyio.sleep(0.2)
            tg.cancel_scope.cancel()
        writes = api.writes()
    assert not differences()
    seen = set()
    for w in writes:  # each (key, version) took effect once
        assert (w.key, w.version, w.op) not in seen, w
        seen.add((w.key, w.version, w.op))
    nc = await nats.connect(nats_server.url, user_credentials=str(nats_server.admin_creds))
    info = await nc.jetstream().stream_info("MESH_DLQ")
    await nc.close()
    assert info.state.messages == 0
    retried = metrics.registry.get_sample_value("mesh_retried_messages_total", {"flow": "customers"})
    assert retried  # the outage was felt, and ridden out
    assert TOKEN not in caplog.text
