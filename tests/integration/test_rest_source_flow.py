"""End to end out of a REST API: a JSON API (OAuth2, paged, polled with a modified-since mark)
-> an agent running the REST source -> a real nats-server -> an agent with a SQLite sink, while
the API answers 500s, 429 storms, slow and overlapping pages and revokes its tokens, and the
source agent is stopped and started again. Every record arrives with its last values (archived
ones deleted), each version takes effect once, every change is captured once, and the client
secret and tokens never show in the logs."""

from __future__ import annotations

import logging
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio
import nats
import pytest

from agents.connector import ConnectorAgent
from mesh.config import AgentConfig
from mesh.metrics import Metrics
from tests._secure import SecuredNatsServer as NatsServer
from tests._secure import secure_config
from tests.fakes.rest_source_api import OAuthClient, RestSourceApi, serve_rest_source_api

pytestmark = [pytest.mark.anyio, pytest.mark.integration, pytest.mark.timeout(120)]

SECRET = "api-cl1ent-secret"

TARGET = """
CREATE TABLE contacts (id INTEGER PRIMARY KEY, name TEXT, email TEXT, updated_at TEXT,
    version INTEGER, archived INTEGER);
CREATE TABLE _mesh_versions (tbl TEXT, key TEXT, version INTEGER NOT NULL,
    deleted INTEGER NOT NULL, PRIMARY KEY (tbl, key));
CREATE TABLE version_log (n INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT, version INTEGER);
CREATE TRIGGER vlog_i AFTER INSERT ON _mesh_versions BEGIN
    INSERT INTO version_log (key, version) VALUES (NEW.key, NEW.version);
END;
CREATE TRIGGER vlog_u AFTER UPDATE ON _mesh_versions BEGIN
    INSERT INTO version_log (key, version) VALUES (NEW.key, NEW.version);
END;
"""


def api_agent(tmp: Path, server: NatsServer, api_url: str) -> AgentConfig:
    nats_url = server.url
    return secure_config(
        f"""
[agent]
name = "api-agent"
system = "crm"
state_dir = "{tmp / "s-api"}"
[nats]
servers = ["{nats_url}"]
request_timeout = 2.0
[[flows]]
name = "contacts"
entity = "contact"
[flows.source]
adapter = "rest"
base_url = "{api_url}"
path = "/page/contacts"
records_path = "data"
version_field = "updated_at"
version_type = "timestamp"
deleted_field = "archived"
lookback = 30.0
poll_interval = 0.1
batch_size = 40
timeout = 0.5
max_attempts = 3
backoff_initial = 0.05
backoff_max = 0.2
retry_after_cap = 2.0
breaker_threshold = 4
breaker_cooldown = 0.5
[flows.source.pagination]
type = "page"
size = 25
[flows.source.incremental]
type = "modified_since"
param = "updated_since"
[flows.source.auth]
type = "oauth2"
token_url = "{api_url}/oauth/token"
client_id = "mesh-agent"
client_secret_env = "API_CLIENT_SECRET"
""",
        tmp / "api-agent.creds",
        server,
    )


def erp_agent(tmp: Path, server: NatsServer) -> AgentConfig:
    nats_url = server.url
    return secure_config(
        f"""
[agent]
name = "erp-agent"
system = "erp"
state_dir = "{tmp / "s-erp"}"
[nats]
servers = ["{nats_url}"]
[[flows]]
name = "contacts"
entity = "contact"
[flows.consumer]
batch_size = 200
fetch_timeout = 0.2
ack_wait = 10.0
[flows.retry]
initial_delay = 0.2
max_delay = 1.0
[flows.sink]
adapter = "sqlite"
path = "{tmp / "target.db"}"
table = "contacts"
key = "id"
""",
        tmp / "erp-agent.creds",
        server,
    )


def target_rows(db: Path) -> dict[str, tuple[Any, ...]]:
    with closing(sqlite3.connect(db, timeout=30)) as c:
        return {str(r[0]): r for r in c.execute("SELECT id, name, email, version FROM contacts")}


def differences(api: RestSourceApi, db: Path) -> list[str]:
    want = {
        k: (r["id"], r["name"], r["email"], r["version"])
        for k, r in api.records("contacts").items()
        if not r["archived"]
    }
    got = target_rows(db)
    return sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))


def mutate(api: RestSourceApi, start: int, n: int) -> None:
    """Update, archive and insert a slice of records."""
    for i in range(start, start + n):
        api.put("contacts", i, name=f"c{i} changed", email=f"c{i}.new@example.com")
    for i in range(start + n, start + n + n // 5):
        api.archive("contacts", i)
    for i in range(1000 + start, 1000 + start + n // 2):
        api.put("contacts", i, name=f"new {i}", email=f"n{i}@example.com")


async def test_rest_api_to_sqlite_through_misbehaviour_and_a_restart(
    tmp_path: Path, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("API_CLIENT_SECRET", SECRET)
    caplog.set_level(logging.DEBUG)
    with closing(sqlite3.connect(tmp_path / "target.db")) as c:
        c.executescript(TARGET)
    captured = 0
    async with serve_rest_source_api(OAuthClient("mesh-agent", SECRET, ttl=1.0)) as api:
        api.freeze()
        for i in range(1, 121):  # 120 records at one millisecond: the mark sits among them
            api.put("contacts", i, name=f"c{i}", email=f"c{i}@example.com")
        api.unfreeze()
        for i in range(121, 201):
            api.put("contacts", i, name=f"c{i}", email=f"c{i}@example.com")
        erp = ConnectorAgent(erp_agent(tmp_path, nats_server))
        async with anyio.create_task_group() as tg:
            await tg.start(erp.run)

            async def run_api_agent(
                metrics: Metrics, done: anyio.Event, *, task_status: Any = anyio.TASK_STATUS_IGNORED
            ) -> None:
                agent = ConnectorAgent(api_agent(tmp_path, nats_server, api.url), metrics=metrics)
                try:
                    async with anyio.create_task_group() as inner:
                        await inner.start(agent.run)
                        task_status.started(agent)
                finally:
                    done.set()

            first, stopped = Metrics(), anyio.Event()
            source = await tg.start(run_api_agent, first, stopped)
            api.fault("500", seconds=1.0)
            await anyio.sleep(1.2)
            mutate(api, 1, 30)
            api.fault("429", seconds=1.0, retry_after=0.3)
            await anyio.sleep(1.2)
            api.fault("duplicate", seconds=1.0)  # overlapping pages
            mutate(api, 40, 30)
            await anyio.sleep(1.2)
            source.stop()  # a graceful stop; the next agent resumes from the committed cursor
            with anyio.fail_after(15):
                await stopped.wait()
            captured += int(
                first.registry.get_sample_value("mesh_captured_messages_total", {"flow": "contacts"}) or 0
            )
            mutate(api, 80, 30)  # while no agent reads the API
            second = Metrics()
            await tg.start(run_api_agent, second, anyio.Event())
            with anyio.fail_after(10):
                while not api.expired_hits:  # the next request gets a 401: a new token, once
                    api.revoke_tokens()
                    await anyio.sleep(0.3)
            api.fault("slow", count=3, delay=1.0)  # three answers come after the timeout
            await anyio.sleep(1.5)
            api.freeze()
            mutate(api, 120, 20)  # more records sharing one millisecond
            api.unfreeze()
            with anyio.fail_after(45):
                while differences(api, tmp_path / "target.db"):
                    await anyio.sleep(0.2)
            await anyio.sleep(0.5)  # a few more polls: nothing more may be emitted
            captured += int(
                second.registry.get_sample_value("mesh_captured_messages_total", {"flow": "contacts"}) or 0
            )
            tg.cancel_scope.cancel()
    assert not differences(api, tmp_path / "target.db")
    assert (api.statuses[500] > 0, api.statuses[429] > 0) == (True, True)
    assert len(api.token_requests) >= 3  # expiring every second, and revoked once
    with closing(sqlite3.connect(tmp_path / "target.db")) as c:
        log = c.execute("SELECT key, version FROM version_log ORDER BY n").fetchall()
    last: dict[str, int] = {}
    for key, version in log:  # each version took effect once, in order
        assert version > last.get(key, -1), f"key {key}: version {version} after {last.get(key)}"
        last[key] = version
    nc = await nats.connect(nats_server.url, user_credentials=str(nats_server.admin_creds))
    try:
        js = nc.jetstream()
        events = (await js.stream_info("MESH_EVENTS")).state.messages
        dead = (await js.stream_info("MESH_DLQ")).state.messages
    finally:
        await nc.close()
    assert dead == 0
    assert captured == events  # no change was captured twice (JetStream would have dropped it)
    assert SECRET not in caplog.text
    assert not [t for t in api._tokens if t in caplog.text]
