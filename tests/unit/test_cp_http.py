"""The HTTP status app with a fake status source: routes, JSON errors, auth, no tracebacks."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter

from mesh.controlplane.http import HttpServer, create_app, render_dashboard
from mesh.controlplane.models import AgentView, ControlPlaneInfo, FlowView, StatusReport

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(20)]


def report(name: str = "erp") -> StatusReport:
    agent = AgentView(
        name=name,
        agent_id="id1",
        site="plant-1",
        host="h",
        version="1",
        state="active",
        health="degraded",
        reason="agent reports degraded",
        registered_at=time.time() - 10,
        last_heartbeat=time.time() - 1,
        heartbeat_age_seconds=1.0,
    )
    flow = FlowView(
        name="customers",
        state="running",
        agents=[name],
        backlog=3,
        consumer_pending=4,
        lag_seconds=1.5,
        dlq_depth=2,
    )
    return StatusReport(
        schema_version="mesh-cp-status/1",
        generated_at=time.time(),
        control_plane=ControlPlaneInfo(
            replica="cp1", leader="cp1", is_leader=True, nats_connected=True, version="1"
        ),
        agents=[agent],
        flows=[flow],
        counts={"healthy": 0, "degraded": 1, "stale": 0, "lost": 0},
    )


class FakeSource:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        Counter("mesh_cp_requests", "requests", registry=self.registry).inc()
        self.reason: str | None = None
        self.fail = False
        self.name = "erp"

    def status(self) -> StatusReport:
        if self.fail:
            raise RuntimeError("secret internals /home/x/file.py line 3")
        return report(self.name)

    async def readiness(self) -> str | None:
        return self.reason


def client(source: FakeSource, token: str | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(source, token=token)), base_url="http://cp"
    )


async def test_routes_and_error_shapes() -> None:
    source = FakeSource()
    async with client(source) as c:
        assert (await c.get("/healthz")).json() == {"status": "alive"}
        assert (await c.get("/readyz")).json() == {"ready": True}
        source.reason = "NATS not connected (nats://x:4222)"
        r = await c.get("/readyz")
        assert r.status_code == 503
        assert r.json() == {"ready": False, "reason": source.reason}
        doc = (await c.get("/status")).json()
        assert doc["flows"][0]["dlq_depth"] == 2
        assert doc["agents"][0]["health"] == "degraded"
        assert "mesh_cp_requests_total 1.0" in (await c.get("/metrics")).text
        assert (await c.get("/status/schema")).json()["$ref"].endswith("StatusReport")
        r = await c.get("/does/not/exist")
        assert r.status_code == 404
        assert r.json() == {"error": "not found", "status": 404}
        r = await c.put("/metrics")
        assert r.status_code == 405
        assert r.json()["status"] == 405
        assert "GET" in r.headers["allow"]
        source.fail = True
        for path in ("/status", "/"):
            r = await c.get(path)
            assert r.status_code == 500
            assert r.json()["status"] == 500
            assert "secret" not in r.text
            assert "Traceback" not in r.text
            assert "file.py" not in r.text


async def test_bearer_token_guards_everything_but_probes_and_the_page_shell() -> None:
    async with client(FakeSource(), token="tok-123") as c:
        assert (await c.get("/healthz")).status_code == 200
        assert (await c.get("/readyz")).status_code == 200
        assert (await c.get("/")).status_code == 200  # the shell, no data (test_cp_dashboard)
        for path in ("/status", "/metrics", "/status/schema", "/nope", "/trace", "/api/series"):
            r = await c.get(path)
            assert r.status_code == 401, path
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert "tok-123" not in r.text
        assert (await c.get("/status", headers={"Authorization": "Bearer tok-1234"})).status_code == 401
        assert (await c.get("/status", headers={"Authorization": "bearer tok-123"})).status_code == 200


def test_dashboard_escapes_what_agents_report() -> None:
    page = render_dashboard(report("<script>alert(1)</script>"))
    assert "<script>" not in page
    assert "&lt;script&gt;" in page
    assert "<table>" in page
    assert "customers" in page
    assert "degraded" in page


async def test_server_binds_serves_and_stops(tmp_path: object) -> None:
    import anyio

    server = HttpServer(create_app(FakeSource()), "127.0.0.1", 0, grace=1)
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.run)
        assert port > 0
        assert server.url.endswith(f":{port}")
        async with httpx.AsyncClient() as c:
            assert (await c.get(f"{server.url}/healthz")).status_code == 200
        busy = HttpServer(create_app(FakeSource()), "127.0.0.1", port)
        from mesh.errors import ConfigError

        with pytest.raises(ConfigError, match=f"cannot serve HTTP on 127.0.0.1:{port}"):
            await busy.run()
        tg.cancel_scope.cancel()
    async with httpx.AsyncClient() as c:
        with pytest.raises(httpx.ConnectError):
            await c.get(f"http://127.0.0.1:{port}/healthz")
