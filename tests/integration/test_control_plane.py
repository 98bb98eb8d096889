"""The control plane against a real nats-server: registration, heartbeats and health timers,
revocation, audit, the HTTP endpoint (error cases included), the CLI, and leader failover between
two control-plane processes (SIGKILL)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import pytest
from typer.testing import CliRunner

from agents.control_plane import ControlPlane
from mesh.broker import free_port
from mesh.cli import (
    agent_cp as cli_agent_cp,
)
from mesh.cli import (
    audit as cli_audit,
)
from mesh.cli import (
    cp as cli_cp,
)
from mesh.controlplane.audit import tail
from mesh.controlplane.client import ControlPlaneClient, RequestRefused, register_agent
from mesh.controlplane.identity import Credentials, load_credentials, save_credentials
from mesh.controlplane.models import (
    Done,
    HeartbeatPayload,
    Manifest,
    Refused,
    Revoke,
    StatusReport,
)
from mesh.controlplane.models import (
    Heartbeat as HeartbeatRequest,
)
from mesh.controlplane.settings import settings_from
from mesh.errors import StopError
from mesh.heartbeat import Heartbeat
from mesh.readiness import NotReady, wait_ready
from mesh.transport import JetStream
from tests._secure import SecuredNatsServer as NatsServer
from tests.integration._harness import log_tail

pytestmark = [pytest.mark.integration, pytest.mark.anyio, pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = Manifest(adapters=["sqlite"], operations=[])


def _cp_creds(server: NatsServer) -> Path:
    """The control plane's own identity (``meshctl security init``: creds/control-plane.creds)."""
    return server.security_dir / "creds" / "control-plane.creds"


def _settings(server: NatsServer, name: str = "cp1", **extra: Any) -> Any:
    raw: dict[str, Any] = {
        "name": name,
        "nats": {"servers": [server.url], "request_timeout": 2.0, "creds": str(_cp_creds(server))},
        "http_port": 0,
        "sweep_interval": 0.2,
        "health": {"stale_after": 1.0, "lost_after": 2.5},
        **extra,
    }
    return settings_from(raw)


@asynccontextmanager
async def _control_plane(server: NatsServer, **extra: Any) -> AsyncIterator[ControlPlane]:
    cp = ControlPlane(_settings(server, **extra))
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(15):
            await tg.start(lambda task_status: cp.run(task_status=task_status))
            await cp.lease.wait(leader=True)  # type: ignore[union-attr]
        try:
            yield cp
        finally:
            cp.stop()


@asynccontextmanager
async def _nats(server: NatsServer) -> AsyncIterator[JetStream]:
    async with JetStream(server.nats_config(request_timeout=2.0), name="test") as js:
        yield js


async def _register(client: ControlPlaneClient, name: str, state: Path) -> Credentials:
    _, creds = await register_agent(
        client, name=name, site="plant-1", state_dir=str(state), manifest=MANIFEST, current=None
    )
    save_credentials(state, creds)
    return creds


async def _until(predicate: Any, timeout: float, step: float = 0.05) -> float:
    """Seconds until ``await predicate()`` is true (fails the test after ``timeout``)."""
    began = anyio.current_time()
    with anyio.fail_after(timeout):
        while not await predicate():
            await anyio.sleep(step)
    return anyio.current_time() - began


async def test_fifty_agents_heartbeat_and_a_stopped_one_goes_stale_then_lost(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async with _control_plane(nats_server) as cp, _nats(nats_server) as js:
        client = ControlPlaneClient(js, timeout=5)
        names = [f"agent-{i:02d}" for i in range(50)]
        with anyio.fail_after(20):
            for name in names:
                await _register(client, name, tmp_path / name)

        async def collect() -> HeartbeatPayload:
            return HeartbeatPayload(outbox_depth=1, outbox_age_seconds=0.5)

        async def provider() -> JetStream:
            return js

        scopes: dict[str, anyio.CancelScope] = {}

        async def beat(name: str, *, task_status: Any) -> None:
            with anyio.CancelScope() as scope:
                scopes[name] = scope
                hb = Heartbeat(name, "plant-1", provider, collect, state_dir=tmp_path / name, interval=0.3)
                await hb.run(task_status)

        async def health() -> dict[str, str]:
            return {a.name: a.health for a in (await client.agents()).agents}

        async with anyio.create_task_group() as agents:
            for name in names:
                await agents.start(beat, name)

            async def all_healthy() -> bool:
                return set((await health()).values()) == {"healthy"}

            await _until(all_healthy, 10)
            report = cp.status()
            assert report.counts["healthy"] == 50

            victim = "agent-07"
            scopes[victim].cancel()
            stopped = anyio.current_time()

            async def victim_is(state: str) -> bool:
                return (await health())[victim] == state

            await _until(lambda: victim_is("stale"), 5)
            stale_after = anyio.current_time() - stopped
            await _until(lambda: victim_is("lost"), 5)
            lost_after = anyio.current_time() - stopped
            # Timers run from the last accepted heartbeat, up to one interval (0.3 s) before the stop.
            assert 0.65 <= stale_after < 2.0, stale_after
            assert 2.15 <= lost_after < 3.6, lost_after
            others = await health()
            assert all(h == "healthy" for n, h in others.items() if n != victim)
            agents.cancel_scope.cancel()
        lost = [a for a in (await client.agents(victim)).agents]
        assert lost[0].health == "lost"
        assert "lost after 2.5s" in lost[0].reason


async def test_registration_rules_revocation_and_audit(nats_server: NatsServer, tmp_path: Path) -> None:
    async with _control_plane(nats_server) as cp, _nats(nats_server) as js:
        client = ControlPlaneClient(js, timeout=5)
        state = tmp_path / "erp-agent"
        creds = await _register(client, "erp-agent", state)
        assert (state / "credentials.json").stat().st_mode & 0o777 == 0o600
        assert (state / "identity").stat().st_mode & 0o777 == 0o600

        # Same identity again: idempotent, same id, credential kept.
        again, kept = await register_agent(
            client, name="erp-agent", site="plant-1", state_dir=str(state), manifest=MANIFEST, current=creds
        )
        assert again.agent_id == creds.agent_id
        assert again.credential is None
        assert not again.created
        assert kept.token == creds.token

        # Same name, another identity: refused with a clear message.
        with pytest.raises(RequestRefused) as refused:
            await _register(client, "erp-agent", tmp_path / "impostor")
        assert refused.value.code == "conflict"
        assert "another identity" in refused.value.reason

        async def provider() -> JetStream:
            return js

        async def collect() -> HeartbeatPayload:
            return HeartbeatPayload()

        hb = Heartbeat("erp-agent", "plant-1", provider, collect, state_dir=state, interval=1)
        assert type(await hb.beat()).__name__ == "HeartbeatAck"

        # Not registered: nothing is sent. A collect() that raises is reported, not swallowed.
        unregistered = Heartbeat("nobody", "plant-1", provider, collect, state_dir=tmp_path / "nobody")
        assert await unregistered.beat() is None
        assert unregistered.sent == 0

        async def broken() -> HeartbeatPayload:
            raise RuntimeError("sqlite is locked")

        failing = Heartbeat("erp-agent", "plant-1", provider, broken, state_dir=state)
        assert type(await failing.beat()).__name__ == "HeartbeatAck"

        async def degraded() -> bool:
            view = (await client.agents("erp-agent")).agents[0]
            return view.health == "degraded" and "sqlite is locked" in view.reason

        await _until(degraded, 5)
        assert type(await hb.beat()).__name__ == "HeartbeatAck"

        # Unknown agents, wrong credentials and heartbeats for another agent are refused.
        ghost = HeartbeatRequest(
            agent_id="x", name="ghost", credential="y" * 20, seq=1, sent_at=0, interval=1, version="0"
        )
        unknown = await client.request(ghost, caller="ghost")
        assert isinstance(unknown, Refused)
        assert unknown.code == "unknown"
        impostor = await client.request(ghost, caller="erp-agent")  # its subject says erp-agent sent it
        assert isinstance(impostor, Refused)
        assert impostor.code == "unauthorized"
        assert "only the agent itself" in impostor.reason
        forged = await client.request(
            HeartbeatRequest(
                agent_id=creds.agent_id,
                name="erp-agent",
                credential="z" * 43,
                seq=1,
                sent_at=0,
                interval=1,
                version="0",
            ),
            caller="erp-agent",
        )
        assert isinstance(forged, Refused)
        assert forged.code == "unauthorized"

        # Revoked: heartbeats refused (the agent stops), re-registration refused.
        # Sent by alice (the subject's caller token), claiming to be mallory in the body: the
        # audit trail records alice.
        done = await client.request(
            Revoke(name="erp-agent", reason="laptop stolen", actor="mallory"), caller="alice"
        )
        assert isinstance(done, Done)
        assert "revoked" in done.message
        with pytest.raises(StopError, match="revoked"):
            await hb.beat()
        lenient = Heartbeat(
            "erp-agent", "plant-1", provider, collect, state_dir=state, stop_when_revoked=False
        )
        reply = await lenient.beat()
        assert isinstance(reply, Refused)
        assert reply.code == "revoked"
        assert "laptop stolen" in reply.reason
        with pytest.raises(RequestRefused) as again_refused:
            await register_agent(
                client,
                name="erp-agent",
                site="plant-1",
                state_dir=str(state),
                manifest=MANIFEST,
                current=creds,
            )
        assert again_refused.value.code == "revoked"
        view = (await client.agents("erp-agent")).agents[0]
        assert view.state == "revoked"

        # Deregistered: the name is free again.
        await client.deregister("erp-agent", actor="alice")
        with pytest.raises(RequestRefused) as gone:
            await client.agents("erp-agent")
        assert gone.value.code == "unknown"
        await _register(client, "erp-agent", tmp_path / "impostor")

        records = [r async for r in tail(js, last=50)]
        kinds = [(r.entry.kind, r.entry.target, r.entry.who) for r in records]
        assert kinds[:2] == [("register", "erp-agent", kinds[0][2]), ("register", "erp-agent", kinds[0][2])]
        assert ("revoke", "erp-agent", "alice") in kinds
        assert all(who != "mallory" for _, _, who in kinds)
        assert ("deregister", "erp-agent", "alice") in kinds
        assert all(r.subject == f"audit.{r.entry.kind}" and r.entry.replica == cp.name for r in records)
        revoke = next(r for r in records if r.entry.kind == "revoke")
        assert revoke.entry.detail["reason"] == "laptop stolen"
        assert revoke.entry.at > 0


async def test_http_endpoints_errors_and_readiness(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CP_TOKEN", "s3cret-token-for-tests")
    async with (
        _control_plane(nats_server, http_token_env="CP_TOKEN") as cp,
        _nats(nats_server) as js,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{cp.http_port}", timeout=5) as http,
    ):
        await _register(ControlPlaneClient(js), "crm-agent", tmp_path / "crm")
        await js.js.publish("dlq.customers", b"x", headers={"Nats-Msg-Id": "d1"})
        await js.js.publish("dlq.customers", b"y", headers={"Nats-Msg-Id": "d2"})
        auth = {"Authorization": "Bearer s3cret-token-for-tests"}
        bodies: list[str] = []

        async def get(
            path: str, method: str = "GET", headers: dict[str, str] | None = None
        ) -> httpx.Response:
            r = await http.request(method, path, headers=headers)
            bodies.append(r.text)
            return r

        assert (await get("/healthz")).json() == {"status": "alive"}
        assert (await get("/readyz")).json() == {"ready": True}
        unauthorized = await get("/status")
        assert unauthorized.status_code == 401
        assert unauthorized.json()["error"]
        assert "s3cret" not in unauthorized.text
        assert (await get("/status", headers={"Authorization": "Bearer wrong"})).status_code == 401

        async def dlq_seen() -> bool:
            doc = (await get("/status", headers=auth)).json()
            return any(f["name"] == "customers" and f["dlq_depth"] == 2 for f in doc["flows"])

        await _until(dlq_seen, 10, 0.2)
        status = await get("/status", headers=auth)
        assert status.headers["content-type"] == "application/json"
        report = msgspec.json.decode(status.content, type=StatusReport)
        assert report.schema_version == "mesh-cp-status/1"
        assert report.control_plane.is_leader
        assert [a.name for a in report.agents] == ["crm-agent"]
        assert "credential" not in status.text
        assert "identity" not in status.text
        schema = (await get("/status/schema", headers=auth)).json()
        assert "$defs" in schema
        assert "StatusReport" in json.dumps(schema)
        metrics = await get("/metrics", headers=auth)
        assert metrics.headers["content-type"].startswith("text/plain")
        for name in (
            "mesh_cp_leader 1.0",
            'mesh_cp_agents{health="stale"}',
            "mesh_cp_flow_dead_letters_messages",
        ):
            assert name in metrics.text
        page = await get("/")  # with a token: the public shell, the script fetches the data
        assert page.headers["content-type"].startswith("text/html")
        assert 'data-auth="token"' in page.text
        assert "crm-agent" not in page.text
        assert (await get("/status", method="HEAD", headers=auth)).status_code == 200

        missing = await get("/nope", headers=auth)
        assert missing.status_code == 404
        assert missing.json() == {"error": "not found", "status": 404}
        wrong = await get("/status", method="POST", headers=auth)
        assert wrong.status_code == 405
        assert wrong.json()["error"] == "method not allowed"
        assert "GET" in wrong.headers["allow"]
        assert (await get("/healthz", method="DELETE")).status_code == 405

        # NATS away: still alive, not ready (503 with the reason); back: ready again.
        nats_server.stop()

        async def not_ready() -> bool:
            return (await get("/readyz")).status_code == 503

        await _until(not_ready, 10, 0.1)
        r = await get("/readyz")
        assert r.json()["ready"] is False
        assert "NATS" in r.json()["reason"]
        assert (await get("/healthz")).status_code == 200
        assert (await get("/status", headers=auth)).json()["control_plane"]["nats_connected"] is False
        nats_server.start()

        async def ready() -> bool:
            return (await get("/readyz")).status_code == 200

        await _until(ready, 15, 0.2)
        await _register(ControlPlaneClient(js, timeout=10), "erp-agent", tmp_path / "erp")

        async def both_listed() -> bool:
            doc = (await get("/status?agents=all", headers=auth)).json()
            return {a["name"] for a in doc["agents"]} == {"crm-agent", "erp-agent"}

        await _until(both_listed, 10, 0.1)
        assert not any("Traceback" in b or 'File "' in b for b in bodies)


async def test_cli_register_list_health_revoke_audit(nats_server: NatsServer, tmp_path: Path) -> None:
    runner = CliRunner()
    env = {
        "MESH_CONTROL_PLANE": nats_server.url,
        "MESH_ACTOR": "bob@ops",
        "MESH_CREDS": str(nats_server.admin_creds),
    }

    async def cli(app: Any, *args: str) -> Any:
        return await anyio.to_thread.run_sync(lambda: runner.invoke(app, list(args), env=env))

    async with _control_plane(nats_server) as cp, _nats(nats_server) as js:
        state = tmp_path / "erp"
        r = await cli(
            cli_agent_cp.app, "register", "--name", "erp", "--site", "plant-1", "--state-dir", str(state)
        )
        assert r.exit_code == 0, r.output
        creds = load_credentials(state)
        assert creds is not None
        assert creds.agent_id in r.output
        r = await cli(
            cli_agent_cp.app, "register", "--name", "erp", "--site", "plant-1", "--state-dir", str(state)
        )
        assert r.exit_code == 0
        assert "already registered" in r.output
        assert creds.agent_id in r.output
        r = await cli(
            cli_agent_cp.app, "register", "--name", "erp", "--site", "x", "--state-dir", str(tmp_path / "o")
        )
        assert r.exit_code == 1
        assert "another identity" in r.output

        # Not healthy before its first heartbeat: exit 1; healthy while it beats: exit 0.
        r = await cli(cli_agent_cp.app, "health", "erp")
        assert r.exit_code == 1
        assert "stale" in r.output

        async def collect() -> HeartbeatPayload:
            return HeartbeatPayload()

        async def provider() -> JetStream:
            return js

        hb = Heartbeat("erp", "plant-1", provider, collect, state_dir=state, interval=0.3)
        async with anyio.create_task_group() as tg:
            await tg.start(hb.run)

            async def healthy() -> bool:
                return (await cli(cli_agent_cp.app, "health", "erp")).exit_code == 0

            await _until(healthy, 5, 0.1)
            r = await cli(cli_agent_cp.app, "list")
            assert r.exit_code == 0
            assert "NAME" in r.output
            assert "healthy" in r.output
            r = await cli(cli_agent_cp.app, "list", "--json")
            docs = json.loads(r.output)
            assert docs[0]["name"] == "erp"
            assert docs[0]["health"] == "healthy"
            r = await cli(cli_agent_cp.app, "health", "--json")
            assert r.exit_code == 0
            assert json.loads(r.output)[0]["health"] == "healthy"
            r = await cli(cli_cp.app, "status")
            assert r.exit_code == 0
            assert "leader: cp1" in r.output
            tg.cancel_scope.cancel()

        r = await cli(cli_agent_cp.app, "health", "nobody")
        assert r.exit_code == 1
        assert "no agent named" in r.output
        r = await cli(cli_agent_cp.app, "revoke", "erp", "--reason", "rotated")
        assert r.exit_code == 0
        assert "revoked" in r.output
        r = await cli(cli_agent_cp.app, "health", "erp")
        assert r.exit_code == 1
        r = await cli(cli_agent_cp.app, "deregister", "erp", "--state-dir", str(state))
        assert r.exit_code == 0
        assert load_credentials(state) is None
        r = await cli(cli_audit.app, "tail", "-n", "3", "--json")
        assert r.exit_code == 0, r.output
        entries = [json.loads(line) for line in r.output.splitlines()]
        assert [e["kind"] for e in entries] == ["register", "revoke", "deregister"]
        # Who: the caller token of the request's subject (the agent itself registers; the
        # operator's MESH_ACTOR, reduced to one subject token, revokes and deregisters).
        assert [e["who"] for e in entries] == ["erp", "bob_ops", "bob_ops"]
        assert all(e["replica"] == cp.name for e in entries)
        r = await cli(cli_audit.app, "tail", "--kind", "revoke")
        assert r.exit_code == 0
        assert "rotated" in r.output
        assert "register " not in r.output


# --- two control-plane processes ------------------------------------------------------------


class _CpProcess:
    def __init__(self, server: NatsServer, name: str, log: Path) -> None:
        self.name = name
        self.port = free_port()
        self.log = log
        args = [
            sys.executable,
            "-m",
            "mesh",
            "control-plane",
            "run",
            "--nats",
            server.url,
            "--name",
            name,
            "--http",
            f"127.0.0.1:{self.port}",
        ]
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                args,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "MESH_CREDS": str(_cp_creds(server))},
            )

    def status(self) -> dict[str, Any] | None:
        try:
            r = httpx.get(f"http://127.0.0.1:{self.port}/status?agents=all", timeout=1)
        except httpx.HTTPError:
            return None
        return r.json() if r.status_code == 200 else None  # type: ignore[no-any-return]

    def wait_ready(self, timeout: float = 30) -> None:
        """Return once ``/readyz`` answers 200 (signal handlers, NATS, KV, request handlers up).

        Raises:
            AssertionError: it exited or the deadline passed (with its log tail).
        """
        try:
            wait_ready(f"http://127.0.0.1:{self.port}/readyz", timeout=timeout,
                       alive=lambda: self.proc.poll() is None)  # fmt: skip
        except NotReady as exc:
            raise AssertionError(f"control plane {self.name}: {exc}\n{log_tail(self.log)}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def two_control_planes(nats_server: NatsServer, tmp_path: Path) -> Iterator[list[_CpProcess]]:
    cps = [_CpProcess(nats_server, name, tmp_path / f"{name}.log") for name in ("cp-a", "cp-b")]
    try:
        for cp in cps:
            cp.wait_ready()
        yield cps
    finally:
        for cp in cps:
            cp.stop()


@pytest.mark.crash
def test_sigkill_the_leader_and_the_other_replica_takes_over(
    two_control_planes: list[_CpProcess], nats_server: NatsServer, tmp_path: Path
) -> None:
    cps = two_control_planes
    deadline = time.monotonic() + 10
    while True:
        docs = [cp.status() for cp in cps]
        leaders = [cp for cp, d in zip(cps, docs, strict=True) if d and d["control_plane"]["is_leader"]]
        if len(leaders) == 1 and all(d and d["control_plane"]["leader"] == leaders[0].name for d in docs):
            break
        assert time.monotonic() < deadline, docs
        time.sleep(0.1)
    leader = leaders[0]
    follower = next(cp for cp in cps if cp is not leader)

    async def register(name: str) -> str:
        async with _nats(nats_server) as js:
            creds = await _register(ControlPlaneClient(js, timeout=15), name, tmp_path / name)
            listed = await ControlPlaneClient(js).agents(name)
            return f"{creds.agent_id} {listed.agents[0].name}"

    assert anyio.run(register, "before")
    # The follower answers reads too (HTTP here; NATS reads go to either through a queue group).
    doc = follower.status()
    assert doc is not None
    assert not doc["control_plane"]["is_leader"]

    leader.proc.send_signal(signal.SIGKILL)
    leader.proc.wait()
    killed = time.monotonic()
    while True:
        doc = follower.status()
        if doc and doc["control_plane"]["is_leader"]:
            break
        assert time.monotonic() - killed < 10, follower.log.read_text()
        time.sleep(0.1)
    took = time.monotonic() - killed
    assert took < 10
    # The new leader serves writes and knows the agents registered under the old one.
    assert "after" in anyio.run(register, "after")
    names = {a["name"] for a in (follower.status() or {}).get("agents", [])}
    assert names == {"before", "after"}, names
    print(f"failover took {took:.2f}s")


async def test_kv_mirror_catches_up_after_a_server_restart(nats_server: NatsServer) -> None:
    """nats-py watchers can miss updates across a server restart: the mirror reloads after a
    reconnect, so a write made while it was away (and one deleted meanwhile) still shows."""
    from mesh.controlplane.kv import KvMirror, ensure_buckets

    async with _nats(nats_server) as js, _nats(nats_server) as writer:
        buckets = await ensure_buckets(js)
        mirror = KvMirror(js, buckets["mesh_agents"], resync_every=60)
        other = (await ensure_buckets(writer))["mesh_agents"]
        await other.put("agent.old", b"1")
        async with anyio.create_task_group() as tg:
            await tg.start(mirror.run)
            assert mirror.get("agent.old") is not None
            await other.put("agent.a", b"1")

            async def has(key: str) -> bool:
                return mirror.get(key) is not None

            await _until(lambda: has("agent.a"), 5)
            nats_server.restart()
            await _until(
                lambda: anyio.to_thread.run_sync(lambda: js.reconnects > 0 and writer.reconnects > 0), 10
            )
            await other.put("agent.b", b"2")
            await other.delete("agent.old")
            await _until(lambda: has("agent.b"), 10)

            async def old_gone() -> bool:
                return mirror.get("agent.old") is None

            await _until(old_gone, 10)
            assert mirror.get("agent.a") is not None
            tg.cancel_scope.cancel()
