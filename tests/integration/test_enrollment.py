"""Enrollment, per-agent credentials issued by the control plane, and revocation, against a real
nats-server with decentralized auth (`meshctl security init`) and `meshctl control-plane run
--security-dir` as a process: a token works once, for one name, until it expires (the server
and the control plane both check); a registered agent's creds allow exactly its part of the
permission table; a flow applied after registration runs under the agent's own creds (re-issued
into its assignment); revocation cuts a running agent off within seconds; the audit trail
records the authenticated caller.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import nats
import nats.errors
import pytest
from nats.aio.client import Client
from typer.testing import CliRunner

from mesh.broker import NatsServer, free_port
from mesh.cli.main import app
from mesh.config import NatsConfig
from mesh.controlplane.audit import tail
from mesh.controlplane.client import ControlPlaneClient
from mesh.controlplane.models import Refused, Register, TokenCreate, TokenCreated
from mesh.readiness import NotReady, wait_ready
from mesh.security.authority import parse_enrollment_token, read_creds, write_creds
from mesh.security.jwt import UserClaims, decode, new_seed, public_key_of_seed
from mesh.transport import JetStream
from tests.integration._harness import AgentProcess, log_tail, make_crm, make_erp, rows, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

DEADLINE = 15.0
runner = CliRunner()


class Mesh:
    """A secured nats-server and a control plane with the security dir, as processes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sec = root / "security"
        port = free_port()
        _cli("security", "init", str(self.sec))
        conf = root / "nats.conf"
        from mesh.security.setup import server_config

        conf.write_text(
            server_config(self.sec, resolver_dir=root / "resolver", store_dir=root / "store", port=port)
        )
        self.server = NatsServer(root / "store", port=port, config_file=conf)
        self.admin = self.sec / "creds" / "admin.creds"
        self.http = free_port()
        self.cp: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def env(self) -> dict[str, str]:
        return {"MESH_NATS_URL": self.url, "MESH_CREDS": str(self.admin), "MESH_ACTOR": "admin"}

    def start(self) -> None:
        self.server.start()
        log = self.root / "cp.log"
        with open(log, "wb") as out:
            self.cp = subprocess.Popen(
                [sys.executable, "-m", "mesh", "control-plane", "run", "--nats", self.url,
                 "--http", f"127.0.0.1:{self.http}", "--name", "cp1", "--security-dir", str(self.sec)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        cp = self.cp
        try:
            wait_ready(f"http://127.0.0.1:{self.http}/readyz", timeout=30, alive=lambda: cp.poll() is None)
        except NotReady as exc:
            raise AssertionError(f"control plane: {exc}\n{log_tail(log)}") from None

    def stop(self) -> None:
        if self.cp is not None and self.cp.poll() is None:
            os.kill(self.cp.pid, signal.SIGTERM)
            try:
                self.cp.wait(10)
            except subprocess.TimeoutExpired:
                self.cp.kill()
                self.cp.wait()
        self.server.stop()

    def cli(self, *args: str, code: int = 0) -> str:
        return _cli(*args, code=code, env=self.env)

    def config(self, name: str, system: str, extra: str = "") -> Path:
        path = self.root / f"{name}.toml"
        path.write_text(
            f"""
log_level = "info"
[agent]
name = "{name}"
system = "{system}"
state_dir = "{self.root / (name + "-state")}"
allowed_paths = ["{self.root}"]
heartbeat_interval = 0.5
[nats]
servers = ["{self.url}"]
request_timeout = 2.0
creds = "{self.root / "creds" / (name + ".creds")}"
{extra}"""
        )
        return path

    def enroll(self, name: str, system: str) -> tuple[Path, Path]:
        """Token (file) + registration; returns (agent config, its creds file)."""
        token = self.root / f"{name}.token"
        self.cli(
            "agent", "token", "create", "--name", name, "--ttl", "10m", "--system", system, "-o", str(token)
        )
        cfg = self.config(name, system)
        self.cli("agent", "register", "--config", str(cfg), "--token-file", str(token))
        return cfg, self.root / "creds" / f"{name}.creds"


def _cli(*args: str, code: int = 0, env: dict[str, str] | None = None) -> str:
    result = runner.invoke(app, list(args), env=env)
    out = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code == code, f"exit {result.exit_code} (expected {code}): {out}"
    assert "Traceback" not in out
    return out


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    m = Mesh(tmp_path_factory.mktemp("enroll"))
    m.start()
    try:
        yield m
    finally:
        m.stop()


class Raw:
    """A raw nats-py connection that records the server's permission errors."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    async def _on_error(self, exc: Exception) -> None:
        self.errors.append(str(exc))

    async def connect(self, url: str, creds: Path, inbox: str) -> Raw:
        self.nc = await nats.connect(
            url,
            user_credentials=str(creds),
            inbox_prefix=inbox,
            allow_reconnect=False,
            error_cb=self._on_error,
            connect_timeout=2,
        )
        return self

    async def refused(self, subject: str) -> None:
        """Publish to ``subject`` and wait (bounded) for the server's permissions violation."""
        await self.nc.publish(subject, b"{}")
        await self.nc.flush()
        with anyio.fail_after(DEADLINE, reason=f"not refused: {subject} (errors: {self.errors})"):
            while not any(f'publish to "{subject.lower()}"' in e.lower() for e in self.errors):
                await anyio.sleep(0.01)


async def _connect_refused(url: str, creds: Path) -> None:
    nc = Client()
    try:
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nc.connect(url, user_credentials=str(creds), allow_reconnect=False, connect_timeout=2)
    finally:
        await nc.close()


def _pub(creds: Path) -> list[str]:
    claims = decode(read_creds(creds).jwt, kind=UserClaims)
    assert isinstance(claims.nats, UserClaims)
    return claims.nats.pub.allow


async def _admin_client(mesh: Mesh) -> tuple[JetStream, ControlPlaneClient]:
    js = JetStream(NatsConfig(servers=[mesh.url], creds=str(mesh.admin), request_timeout=5.0), name="admin")
    await js.connect()
    return js, ControlPlaneClient(js, caller="admin", timeout=10.0)


# --- tokens ------------------------------------------------------------------------------------


def test_a_token_registers_its_agent_once_with_a_0600_least_privilege_creds_file(mesh: Mesh) -> None:
    cfg, creds = mesh.enroll("once", "erp")
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    parsed = read_creds(creds)
    assert parsed.name == "once"
    pub = _pub(creds)
    assert "evt.*.*.erp" in pub
    assert "mesh.cp.register.once" in pub
    assert not any(p in (">", "evt.>", "$JS.API.>") or p.startswith("$JS.API.STREAM.DELETE") for p in pub)
    # the same key re-registers without a token (its own creds)
    out = mesh.cli("agent", "register", "--config", str(cfg))
    assert "already registered" in out
    assert read_creds(creds).public_key == parsed.public_key
    # a new key needs a token, and the used one is refused with a clear reason
    token = (mesh.root / "once.token").read_text().strip()
    creds.unlink()
    out = mesh.cli("agent", "register", "--config", str(cfg), "--token", token, code=1)
    assert "already used" in out
    listed = mesh.cli("agent", "token", "list")
    assert "once" in listed
    assert "used" in listed


def test_a_token_for_one_name_cannot_register_another(mesh: Mesh) -> None:
    token = mesh.cli("agent", "token", "create", "--name", "alpha", "--system", "erp").split()[0]
    cfg = mesh.config("beta", "erp")
    out = mesh.cli("agent", "register", "--config", str(cfg), "--token", token, code=2)
    assert "for agent 'alpha', not 'beta'" in out
    parsed = parse_enrollment_token(token)

    async def main() -> None:
        path = write_creds(mesh.root / "alpha-token.creds", parsed.jwt, parsed.seed)
        raw = await Raw().connect(mesh.url, path, "_INBOX.alpha")
        try:
            await raw.refused("mesh.cp.register.beta")  # the broker: only its own name
            await raw.refused("mesh.cp.flow_apply.alpha")
        finally:
            await raw.nc.close()

    anyio.run(main)


def test_an_expired_token_is_refused_by_the_server_and_the_control_plane(mesh: Mesh) -> None:
    async def main() -> None:
        js, client = await _admin_client(mesh)
        try:
            made = await client.token_create("late", ttl=1.0, systems=["erp"])
            assert isinstance(made, TokenCreated)
            token = parse_enrollment_token(made.token)
            with anyio.fail_after(DEADLINE):
                while time.time() <= made.expires + 1:
                    await anyio.sleep(0.1)
            # the server: the token's JWT has expired
            path = write_creds(mesh.root / "late-token.creds", token.jwt, token.seed)
            await _connect_refused(mesh.url, path)
            # the control plane's own check (a request the broker let through: the admin's)
            seed = new_seed("user")
            req = Register(name="late", site="s", identity="i" * 32, version="1", host="h",
                           public_key=public_key_of_seed(seed), enrollment=token.token_id)  # fmt: skip
            reply = await client.request(req, caller="late")
            assert isinstance(reply, Refused)
            assert "expired" in reply.reason
        finally:
            await js.aclose()

    anyio.run(main)
    cfg = mesh.config("late", "erp")
    token_text = mesh.cli(
        "agent", "token", "create", "--name", "late", "--ttl", "1", "--system", "erp"
    ).split()[0]
    wait_until(
        lambda: time.time() > parse_enrollment_token(token_text, now=0).expires + 1, DEADLINE, "expiry"
    )
    out = mesh.cli("agent", "register", "--config", str(cfg), "--token", token_text, code=2)
    assert "expired" in out
    assert "ask for a new one" in out


def test_security_refuses_a_registration_without_token(mesh: Mesh) -> None:
    async def main() -> None:
        js, client = await _admin_client(mesh)
        try:
            req = Register(name="sneaky", site="s", identity="i" * 32, version="1", host="h",
                           public_key=public_key_of_seed(new_seed("user")))  # fmt: skip
            reply = await client.request(req, caller="sneaky")
            assert isinstance(reply, Refused)
            assert "enrollment token" in reply.reason
        finally:
            await js.aclose()

    anyio.run(main)


# --- what a registered agent's creds refuse ------------------------------------------------------


def test_a_registered_agents_creds_are_refused_everything_else(mesh: Mesh) -> None:
    _, creds = mesh.enroll("spy", "erp")
    mesh.enroll("other", "crm")

    async def main() -> None:
        raw = await Raw().connect(mesh.url, creds, "_INBOX.spy")
        try:
            await raw.refused("evt.customer.created.crm")  # forge another origin
            await raw.refused("$JS.API.STREAM.PURGE.MESH_DLQ")
            await raw.refused("$JS.API.STREAM.DELETE.MESH_EVENTS")
            await raw.refused("$JS.API.STREAM.DELETE.KV_mesh_flows")
            await raw.refused("mesh.cp.flow_apply.admin")
            await raw.refused("mesh.cp.revoke.spy")
            await raw.refused("$JS.API.DIRECT.GET.KV_mesh_assign.$KV.mesh_assign.agent.other")
            # what it may do, it can
            msg = await raw.nc.request(
                "$JS.API.DIRECT.GET.KV_mesh_assign.$KV.mesh_assign.agent.spy", b"", timeout=5
            )
            assert msg.headers is None or msg.headers.get("Status") != "403"
        finally:
            await raw.nc.close()

    anyio.run(main)


# --- re-issue on assignment, revocation, audit ----------------------------------------------------


def _flow_file(path: Path, erp: Path, crm: Path) -> Path:
    path.write_text(
        f"""
[[flows]]
name = "customers"
entity = "customer"
[flows.consumer]
fetch_timeout = 0.2
ack_wait = 5.0
[flows.source]
agent = "erp-agent"
adapter = "sqlite"
path = "{erp}"
table = "customers"
key = "id"
poll_interval = 0.02
[flows.sink]
agent = "crm-agent"
adapter = "sqlite"
path = "{crm}"
table = "customers"
key = "id"
"""
    )
    return path


def test_an_applied_flow_runs_under_reissued_creds_and_revocation_cuts_the_agent_off(mesh: Mesh) -> None:
    erp_cfg, erp_creds = mesh.enroll("erp-agent", "erp")
    crm_cfg, crm_creds = mesh.enroll("crm-agent", "crm")
    consumer = "$JS.API.CONSUMER.CREATE.MESH_EVENTS.customers-crm"
    assert consumer not in _pub(crm_creds)  # registered without flows: it could not consume it
    erp_db, crm_db = mesh.root / "erp.db", mesh.root / "crm.db"
    make_erp(erp_db)
    make_crm(crm_db)
    agents = [AgentProcess(erp_cfg, mesh.root / "erp.log"), AgentProcess(crm_cfg, mesh.root / "crm.log")]
    try:
        for a in agents:
            a.start(timeout=60)
        mesh.cli("flow", "apply", str(_flow_file(mesh.root / "flows.toml", erp_db, crm_db)))
        with sqlite3.connect(erp_db) as c:
            c.execute("INSERT INTO customers (id, name, email) VALUES (1, 'Ada', 'ada@example.com')")
        wait_until(
            lambda: len(rows(crm_db)) == 1, 60, f"the row reached the CRM\n{log_tail(mesh.root / 'crm.log')}"
        )
        assert consumer in _pub(crm_creds)  # the agent rewrote its creds file with the new JWT
        assert stat.S_IMODE(crm_creds.stat().st_mode) == 0o600
        assert "evt.*.*.erp" in _pub(erp_creds)
        # revocation: the server drops the running agent within seconds, and it stays out
        out = mesh.cli("agent", "revoke", "crm-agent", "--reason", "test")
        assert "NATS key revoked" in out
        assert "could not push" not in out
        crm = agents[1]

        def nats_down() -> bool:
            snap = crm.readyz()
            checks = snap.get("checks", {}) if snap else {}
            return isinstance(checks, dict) and checks.get("nats", {}).get("ok") is False

        wait_until(nats_down, DEADLINE, f"crm-agent's /readyz shows NATS down: {crm.readyz()}")
        anyio.run(_connect_refused, mesh.url, crm_creds)
    finally:
        for a in agents:
            a.terminate()

    async def audit() -> list[Any]:
        js = JetStream(NatsConfig(servers=[mesh.url], creds=str(mesh.admin)), name="audit")
        await js.connect()
        try:
            return [r.entry async for r in tail(js, last=200)]
        finally:
            await js.aclose()

    entries = anyio.run(audit)
    who = {(e.kind, e.target): e.who for e in entries}
    assert who[("token_create", "crm-agent")] == "admin"
    assert who[("register", "crm-agent")] == "crm-agent"
    assert who[("revoke", "crm-agent")] == "admin"


def test_the_audit_records_the_caller_not_the_payloads_actor(mesh: Mesh) -> None:
    async def main() -> None:
        js, client = await _admin_client(mesh)
        try:
            req = TokenCreate(name="victim", ttl=60, actor="mallory")  # the body claims mallory
            assert isinstance(await client.request(req, caller="admin"), TokenCreated)
            entries = [r.entry async for r in tail(js, last=50, kind="token_create")]
            mine = [e for e in entries if e.target == "victim"]
            assert mine
            assert all(e.who == "admin" for e in mine)
        finally:
            await js.aclose()

    anyio.run(main)
