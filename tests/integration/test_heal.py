"""The broker layout heals: streams and buckets deleted under a running mesh are reported by
``/readyz`` (503, naming them) on the agents and the control plane, re-created by the control
plane (agents with ``[streams] manage = false`` never create them), and delivery resumes."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import nats
import pytest

from agents.connector import ConnectorAgent
from agents.control_plane import ControlPlane
from mesh.controlplane.settings import settings_from
from mesh.endpoint import AgentEndpoint
from mesh.metrics import Metrics
from mesh.readiness import probe
from tests._secure import SecuredNatsServer as NatsServer
from tests._secure import secure_config
from tests.integration._harness import agent_toml, make_crm, make_erp

pytestmark = [pytest.mark.integration, pytest.mark.anyio, pytest.mark.timeout(90)]

NO_MANAGE = "\n[streams]\nmanage = false\n"


async def _probe(url: str) -> tuple[int, dict[str, Any]]:
    answer = await anyio.to_thread.run_sync(probe, url)
    return answer if answer is not None else (0, {})


async def _until_status(url: str, status: int, timeout: float = 20) -> dict[str, Any]:
    """The first ``/readyz`` body answered with ``status`` (fails the test after ``timeout``)."""
    with anyio.fail_after(timeout):
        while True:
            code, body = await _probe(url)
            if code == status:
                return body
            await anyio.sleep(0.05)


def _names(db: Path) -> dict[int, str]:
    with sqlite3.connect(db) as c:
        return dict(c.execute("SELECT id, name FROM customers").fetchall())


async def _delivered(crm: Path, key: int, name: str, timeout: float = 20) -> None:
    with anyio.fail_after(timeout):
        while _names(crm).get(key) != name:
            await anyio.sleep(0.05)


def _insert(erp: Path, key: int, name: str) -> None:
    with sqlite3.connect(erp) as c:
        c.execute("INSERT INTO customers (id, name) VALUES (?, ?)", (key, name))


def _cp_creds(server: NatsServer) -> str:
    return str(server.security_dir / "creds" / "control-plane.creds")


@asynccontextmanager
async def _mesh(server: NatsServer, tmp: Path, erp: Path, crm: Path) -> AsyncIterator[dict[str, Any]]:
    settings = settings_from(
        {
            "name": "cp1",
            "nats": {"servers": [server.url], "request_timeout": 2.0, "creds": _cp_creds(server)},
            "http_port": 0,
        }
    )
    cp = ControlPlane(settings, heal_every=3600)  # heals on demand only: the 503 stays visible
    url = server.url
    cfgs = [
        agent_toml(name="erp-agent", system="erp", state=tmp / "s-erp", url=url, source=erp, extra=NO_MANAGE),
        agent_toml(name="crm-agent", system="crm", state=tmp / "s-crm", url=url, sink=crm, extra=NO_MANAGE),
    ]
    agents = [
        ConnectorAgent(
            secure_config(c, tmp / f"agent-{i}.creds", server), metrics=Metrics(), stream_check_every=0.2
        )
        for i, c in enumerate(cfgs)
    ]
    endpoints = [AgentEndpoint(a.metrics.registry, a.readiness, "127.0.0.1", 0) for a in agents]
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(20):
            await tg.start(lambda task_status: cp.run(task_status=task_status))
            for a in agents:
                await tg.start(a.run)
        for e in endpoints:
            e.start()
        try:
            assert cp.http_url is not None
            yield {"cp": f"{cp.http_url}/readyz", "agents": [f"{e.url}/readyz" for e in endpoints]}
        finally:
            for e in endpoints:
                e.close()
            for a in agents:
                a.stop()
            cp.stop()


async def test_deleted_stream_and_bucket_make_readyz_503_then_heal_and_delivery_resumes(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    erp, crm = tmp_path / "erp.db", tmp_path / "crm.db"
    make_erp(erp)
    make_crm(crm)
    async with _mesh(nats_server, tmp_path, erp, crm) as urls:
        for url in [urls["cp"], *urls["agents"]]:
            await _until_status(url, 200)
        _insert(erp, 1, "before")
        await _delivered(crm, 1, "before")

        nc = await nats.connect(nats_server.url, user_credentials=str(nats_server.admin_creds))
        try:
            js = nc.jetstream()
            await js.delete_stream("MESH_EVENTS")
            await js.delete_key_value("mesh_flows")

            for url in urls["agents"]:  # both agents need MESH_EVENTS; neither may create it
                body = await _until_status(url, 503)
                assert "stream MESH_EVENTS missing" in body["detail"], body
            body = await _until_status(urls["cp"], 503)  # this probe also wakes the healer
            reason = str(body.get("reason", body))
            assert "stream MESH_EVENTS missing" in reason, body
            assert "bucket mesh_flows missing" in reason, body

            for url in [urls["cp"], *urls["agents"]]:
                await _until_status(url, 200)
            await js.stream_info("MESH_EVENTS")  # raises if it was not re-created
            await js.key_value("mesh_flows")
        finally:
            await nc.close()

        _insert(erp, 2, "after the heal")
        await _delivered(crm, 2, "after the heal")


async def test_the_control_plane_heals_a_missing_stream_and_bucket_by_itself(nats_server: NatsServer) -> None:
    settings = settings_from(
        {
            "name": "cp1",
            "nats": {"servers": [nats_server.url], "request_timeout": 2.0, "creds": _cp_creds(nats_server)},
        }
    )
    cp = ControlPlane(settings, heal_every=0.2)
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(20):
            await tg.start(lambda task_status: cp.run(task_status=task_status))
        nc = await nats.connect(nats_server.url, user_credentials=str(nats_server.admin_creds))
        try:
            js = nc.jetstream()
            kv = await js.key_value("mesh_assign")
            await kv.put("agent.erp-agent", b'{"flows": []}')
            mirror = cp.layout.mirrors["mesh_assign"]
            with anyio.fail_after(20):
                while mirror.get("agent.erp-agent") is None:
                    await anyio.sleep(0.05)

            await js.delete_stream("MESH_DLQ")
            await js.delete_key_value("mesh_assign")
            with anyio.fail_after(20):
                while cp.layout.heals < 2:
                    await anyio.sleep(0.05)
            await js.stream_info("MESH_DLQ")
            info = await js.stream_info("KV_mesh_assign")
            assert info.config.allow_direct  # the agents read their assignment key by direct get
            # The desired state survives: the keys come back from the control plane's copy.
            entry = await (await js.key_value("mesh_assign")).get("agent.erp-agent")
            assert entry.value == b'{"flows": []}'
        finally:
            await nc.close()
            cp.stop()
