"""The production topology: the mesh against a three-node JetStream cluster on loopback
(streams and buckets with 3 replicas, agents and control plane given all three URLs).

During a sync under load, the MESH_EVENTS stream leader, the ``mesh_assign`` and the
``mesh_agents`` KV leaders, then the JetStream meta leader are SIGKILLed and restarted while
the ERP keeps changing: at the end the CRM equals the ERP, every change took effect once, the
DLQ is empty, and the agents and the control plane are still ready (``/readyz``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import nats
import pytest

from agents.connector import ConnectorAgent
from agents.control_plane import ControlPlane
from mesh.controlplane.kv import BUCKETS
from mesh.controlplane.layout import STREAMS
from mesh.controlplane.settings import settings_from
from mesh.endpoint import AgentEndpoint
from mesh.metrics import Metrics
from mesh.readiness import probe
from mesh.transport.subjects import DLQ_STREAM, consumer_name
from tests._cluster import NatsCluster
from tests._secure import with_agent_creds
from tests.integration._harness import (
    ErpLoad,
    agent_toml,
    assert_effect_once,
    assert_same_rows,
    make_crm,
    make_erp,
    rows,
)

pytestmark = [pytest.mark.integration, pytest.mark.anyio, pytest.mark.timeout(240)]

REPLICAS = "\n[streams]\nreplicas = 3\n"
META = "JetStream meta"
"""The JetStream meta leader (stream and consumer placement), the last node killed."""


def _leader(cluster: NatsCluster, target: str) -> str:
    """The running node that leads ``target``: a stream, or the meta group (:data:`META`)."""
    if target != META:
        return cluster.wait_stream_leader(target)
    return cluster.wait_meta_leader()


@pytest.fixture
def cluster(tmp_path: Path, security_dir: Path) -> Iterator[NatsCluster]:
    with NatsCluster(tmp_path / "cluster", security_dir) as c:
        yield c


async def _until_ready(url: str, timeout: float = 60) -> None:
    with anyio.fail_after(timeout):
        while True:
            answer = await anyio.to_thread.run_sync(probe, url)
            if answer is not None and answer[0] == 200:
                return
            await anyio.sleep(0.1)


def _agent_config(cluster: NatsCluster, tmp: Path, **kw: Any) -> Any:
    from mesh.config import parse_agent_config
    from tests._secure import issue_agent_creds

    text = agent_toml(url=cluster.urls[0], extra=REPLICAS, **kw)
    servers = ", ".join(f'"{u}"' for u in cluster.urls)
    text = text.replace(f'servers = ["{cluster.urls[0]}"]', f"servers = [{servers}]")
    cfg = parse_agent_config(with_agent_creds(text, tmp / f"{kw['name']}.creds"))
    issue_agent_creds(cfg, cluster.security_dir)
    return cfg


@asynccontextmanager
async def _mesh(cluster: NatsCluster, tmp: Path, erp: Path, crm: Path) -> AsyncIterator[list[str]]:
    """Control plane and two agents in-process; yields their ``/readyz`` URLs."""
    settings = settings_from(
        {
            "name": "cp1",
            "nats": {
                "servers": cluster.urls,
                "request_timeout": 2.0,
                "creds": str(cluster.security_dir / "creds" / "control-plane.creds"),
            },
            "streams": {"replicas": 3},
            "http_port": 0,
        }
    )
    cp = ControlPlane(settings)
    agents = [
        ConnectorAgent(
            _agent_config(cluster, tmp, name="erp-agent", system="erp", state=tmp / "s-erp", source=erp),
            metrics=Metrics(),
        ),
        ConnectorAgent(
            _agent_config(cluster, tmp, name="crm-agent", system="crm", state=tmp / "s-crm", sink=crm),
            metrics=Metrics(),
        ),
    ]
    endpoints = [AgentEndpoint(a.metrics.registry, a.readiness, "127.0.0.1", 0) for a in agents]
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(60):
            await tg.start(lambda task_status: cp.run(task_status=task_status))
            for a in agents:
                await tg.start(a.run)
        for e in endpoints:
            e.start()
        try:
            assert cp.http_url is not None
            yield [f"{cp.http_url}/readyz", *(f"{e.url}/readyz" for e in endpoints)]
        finally:
            for e in endpoints:
                e.close()
            for a in agents:
                a.stop()
            cp.stop()


async def _stream_state(cluster: NatsCluster, stream: str, durable: str | None = None) -> tuple[int, int]:
    """(messages in ``stream``, pending + unacked of ``durable`` or 0), asked as the admin."""
    nc = await nats.connect(
        servers=cluster.urls, user_credentials=str(cluster.admin_creds), connect_timeout=2
    )
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        busy = 0
        if durable is not None:
            ci = await js.consumer_info(stream, durable)
            busy = ci.num_pending + ci.num_ack_pending
        return info.state.messages, busy
    finally:
        await nc.close()


async def test_leader_kills_during_sync_lose_and_double_nothing(cluster: NatsCluster, tmp_path: Path) -> None:
    erp, crm = tmp_path / "erp.db", tmp_path / "crm.db"
    make_erp(erp)
    make_crm(crm)
    load = ErpLoad(erp, seed=11)
    run = anyio.to_thread.run_sync
    async with _mesh(cluster, tmp_path, erp, crm) as urls:
        for url in urls:
            await _until_ready(url)
        # the control plane's layout: every stream and bucket with [streams] replicas
        for stream in (*STREAMS, *(f"KV_{b}" for b in BUCKETS)):
            assert await run(cluster.stream_replicas, stream) == 3, stream

        await run(load.mixed, 30)
        stop = anyio.Event()
        rounds = 0

        async def busy_erp() -> None:  # the ERP keeps changing through every kill and restart
            nonlocal rounds
            while not stop.is_set() and rounds < 2000:
                await run(load.mixed, 2)
                rounds += 1

        async with anyio.create_task_group() as tg:
            tg.start_soon(busy_erp)
            for target in ("MESH_EVENTS", "KV_mesh_assign", "KV_mesh_agents", META):
                leader = await run(_leader, cluster, target)
                await run(cluster.kill, leader)
                new = await run(_leader, cluster, target)
                assert new != leader, (target, leader, new)
                await run(cluster.restart, leader)
            stop.set()
        assert rounds > 0
        await run(load.mixed, 10)

        durable = consumer_name("customers", "crm")
        with anyio.fail_after(120):
            while True:
                if await run(rows, erp) == await run(rows, crm):
                    _, busy = await _stream_state(cluster, "MESH_EVENTS", durable)
                    if busy == 0:
                        break
                await anyio.sleep(0.2)
        assert_same_rows(erp, crm)
        assert_effect_once(crm)
        dead, _ = await _stream_state(cluster, DLQ_STREAM)
        assert dead == 0, f"{dead} dead letters"
        for url in urls:
            await _until_ready(url, timeout=30)
