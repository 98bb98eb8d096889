"""TLS against a real nats-server with certificates made in the test (trustme): mutual TLS for
the transport, the agents (``[nats.tls]`` in their TOML) and the CLI (``--tls-*`` / ``MESH_TLS_*``),
one-line reasons for every handshake failure an operator can fix, the extra config block of
:class:`NatsServer` composing with TLS, and the control plane's HTTPS endpoint."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trustme

from mesh.broker import NatsServer as BrokerProcess
from mesh.broker import ServerTls, free_port
from mesh.config import NatsConfig, StreamsConfig, TlsConfig
from mesh.errors import TransportError
from mesh.transport import EVENTS_STREAM, JetStream
from tests._secure import SecuredNatsServer as NatsServer
from tests._secure import create_layout, issue_agent_creds
from tests.integration._harness import (
    AgentProcess,
    agent_toml,
    assert_same_rows,
    log_tail,
    make_crm,
    make_erp,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: Path
    """Server certificate chain + key (one PEM), for 127.0.0.1 and localhost."""
    client: Path
    """Client certificate chain + key (one PEM), signed by ``ca``."""
    other_ca: Path
    """A CA that signed nothing here."""
    elsewhere: Path
    """A server certificate signed by ``ca`` for another host name only."""

    def client_tls(self, *, cert: bool = True) -> TlsConfig:
        c = str(self.client) if cert else None
        return TlsConfig(ca_file=str(self.ca), cert_file=c, key_file=c)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = trustme.CA()
    pki = Pki(
        *(tmp_path / "pki" / n for n in ("ca.pem", "server.pem", "client.pem", "other.pem", "else.pem"))
    )
    pki.ca.parent.mkdir()
    ca.cert_pem.write_to_path(str(pki.ca))
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(str(pki.server))
    ca.issue_cert("agent@mesh.test").private_key_and_cert_chain_pem.write_to_path(str(pki.client))
    ca.issue_cert("nats.elsewhere.test").private_key_and_cert_chain_pem.write_to_path(str(pki.elsewhere))
    trustme.CA().cert_pem.write_to_path(str(pki.other_ca))
    return pki


@pytest.fixture
def mtls_server(pki: Pki, tmp_path: Path, security_dir: Path) -> Iterator[NatsServer]:
    """TLS required, client certificates signed by ``pki.ca`` required (mutual TLS); secured
    (operator mode) like every server of the suite."""
    tls = ServerTls(pki.server, pki.server, ca_file=pki.ca, verify=True)
    with NatsServer(tmp_path / "nats", security_dir, tls=tls, extra_config="max_payload: 65536") as server:
        yield server


def _varz(server: NatsServer) -> dict[str, object]:
    with urllib.request.urlopen(f"{server.monitor_url}/varz", timeout=5) as resp:
        varz: dict[str, object] = json.loads(resp.read())
        return varz


async def _connect_error(cfg: NatsConfig) -> str:
    with pytest.raises(TransportError) as refused:
        async with JetStream(cfg, name="test"):
            pass
    text = str(refused.value)
    assert "\n" not in text
    return text


@pytest.mark.anyio
async def test_mutual_tls_connects_and_the_extra_config_block_composes(
    mtls_server: NatsServer, pki: Pki
) -> None:
    varz = _varz(mtls_server)  # the monitor port stays plain HTTP: the health check still works
    assert varz["tls_required"] is True
    assert varz["tls_verify"] is True
    assert varz["max_payload"] == 65536
    cfg = mtls_server.nats_config(request_timeout=5.0, tls=pki.client_tls())
    async with JetStream(cfg, name="test") as js:
        await js.ensure_streams(StreamsConfig(storage="memory"))
        state = await js.stream_info(EVENTS_STREAM)
        assert state.messages == 0


@pytest.mark.anyio
async def test_each_handshake_failure_is_one_line_that_says_why(mtls_server: NatsServer, pki: Pki) -> None:
    plain = await _connect_error(mtls_server.nats_config())
    assert "the server's certificate is not signed by a CA this host trusts" in plain
    assert "--tls-ca" in plain
    unknown = await _connect_error(mtls_server.nats_config(tls=TlsConfig(ca_file=str(pki.other_ca))))
    assert f"the server's certificate is not signed by {pki.other_ca}" in unknown
    no_cert = await _connect_error(mtls_server.nats_config(tls=pki.client_tls(cert=False)))
    assert "the server requires a client certificate (mutual TLS)" in no_cert


@pytest.mark.anyio
async def test_a_certificate_for_another_host_is_refused_unless_named(
    pki: Pki, tmp_path: Path, security_dir: Path
) -> None:
    with NatsServer(tmp_path / "nats", security_dir, tls=ServerTls(pki.elsewhere, pki.elsewhere)) as server:
        text = await _connect_error(server.nats_config(tls=pki.client_tls(cert=False)))
        assert "the server's certificate does not name the host in the server URL" in text
        named = TlsConfig(ca_file=str(pki.ca), server_name="nats.elsewhere.test")
        async with JetStream(server.nats_config(tls=named), name="test") as js:
            await js.ensure_streams(StreamsConfig(storage="memory"))


@pytest.mark.anyio
async def test_tls_configured_against_a_plaintext_server_is_refused(
    nats_server: NatsServer, pki: Pki
) -> None:
    text = await _connect_error(nats_server.nats_config(tls=pki.client_tls(cert=False)))
    assert "the server does not use TLS but TLS is configured" in text


def _meshctl(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mesh", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_control_plane_and_cli_over_mutual_tls_with_https(
    mtls_server: NatsServer, pki: Pki, tmp_path: Path
) -> None:
    port = free_port()
    tls_env = {"MESH_TLS_CA": str(pki.ca), "MESH_TLS_CERT": str(pki.client), "MESH_TLS_KEY": str(pki.client)}
    cp_env = {**tls_env, "MESH_CREDS": str(mtls_server.security_dir / "creds" / "control-plane.creds")}
    tls_env["MESH_CREDS"] = str(mtls_server.admin_creds)  # the operator's meshctl
    log = tmp_path / "cp.log"
    args = [
        sys.executable, "-m", "mesh", "control-plane", "run", "--nats", mtls_server.url, "--name", "cp-tls",
        "--http", f"127.0.0.1:{port}", "--http-tls-cert", str(pki.server), "--http-tls-key", str(pki.server),
    ]  # fmt: skip
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **cp_env}
        )
    try:

        def ready() -> bool:
            assert proc.poll() is None, log_tail(log)
            try:
                return (
                    httpx.get(
                        f"https://127.0.0.1:{port}/readyz",
                        verify=ssl.create_default_context(cafile=pki.ca),
                        timeout=2,
                    ).status_code
                    == 200
                )
            except httpx.HTTPError:
                return False

        wait_until(ready, 30, f"control plane ready over HTTPS\n{log_tail(log)}")
        # Plain HTTP to the HTTPS port gets no answer.
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)

        ok = _meshctl("control-plane", "status", "--control-plane", mtls_server.url, env=tls_env)
        assert ok.returncode == 0, ok.stderr
        assert "answered by cp-tls" in ok.stdout
        flags = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client), "--tls-key", str(pki.client)]
        listed = _meshctl(
            "agent",
            "list",
            "--control-plane",
            mtls_server.url,
            *flags,
            "--creds",
            str(mtls_server.admin_creds),
        )
        assert listed.returncode == 0, listed.stderr

        no_cert = _meshctl(
            "control-plane", "status", "--control-plane", mtls_server.url, "--tls-ca", str(pki.ca)
        )
        assert no_cert.returncode == 2
        lines = no_cert.stderr.strip().splitlines()
        assert len(lines) == 1, no_cert.stderr
        assert "requires a client certificate" in lines[0]
        assert "Traceback" not in no_cert.stderr
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_agents_read_nats_tls_from_their_config_and_sync_over_mutual_tls(
    mtls_server: NatsServer, pki: Pki, tmp_path: Path
) -> None:
    erp_db, crm_db = tmp_path / "erp.db", tmp_path / "crm.db"
    make_erp(erp_db)
    make_crm(crm_db)
    with sqlite3.connect(erp_db) as c:
        c.executemany(
            "INSERT INTO customers (id, name, email) VALUES (?, ?, ?)",
            [(i, f"name {i}", f"c{i}@example.test") for i in range(1, 21)],
        )
    tls = f'\n[nats.tls]\nca_file = "{pki.ca}"\ncert_file = "{pki.client}"\nkey_file = "{pki.client}"\n'
    procs = []
    for name, system, source, sink in (
        ("erp-agent", "erp", erp_db, None),
        ("crm-agent", "crm", None, crm_db),
    ):
        cfg = tmp_path / f"{name}.toml"
        state = tmp_path / "state" / name
        text = agent_toml(
            name=name,
            system=system,
            state=state,
            url=mtls_server.url,
            source=source,
            sink=sink,
            creds=tmp_path / f"{name}.creds",
        )
        cfg.write_text(text + tls)
        issue_agent_creds(cfg, mtls_server.security_dir)
        procs.append(AgentProcess(cfg, tmp_path / f"{name}.log"))
    create_layout(mtls_server.nats_config(tls=pki.client_tls()))  # the control plane's job
    try:
        for p in procs:
            p.start()
        wait_until(lambda: len(_rows(crm_db)) == 20, 40, "20 customers synced over mutual TLS")
        assert_same_rows(erp_db, crm_db)
    finally:
        for p in procs:
            p.terminate()


def _rows(db: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
        return c.execute("SELECT id FROM customers").fetchall()


def test_dev_up_tls_runs_the_whole_stack_over_mutual_tls(tmp_path: Path) -> None:
    data = tmp_path / "dev"
    proc = subprocess.run(
        [sys.executable, "-m", "mesh", "dev", "up", "--data-dir", str(data), "--tls",
         "--duration", "6", "--records", "200", "--rate", "50"],
        cwd=ROOT, capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "ERP and CRM in sync: yes" in out
    assert "registering" not in out  # `agent register --config` took [nats.tls] from the config
    assert "sample canonical event  evt.customer.upserted.erp" in out  # read over TLS too
    assert f"export MESH_TLS_CA={data / 'tls' / 'ca.pem'}" in out
    conf = (data / "nats" / "nats-server.conf").read_text()
    assert "verify: true" in conf
    assert "[nats.tls]" in (data / "erp-agent.toml").read_text()
    assert "TLS required for client connections" in (data / "nats-server.log").read_text()
    assert (data / "tls" / "client-key.pem").stat().st_mode & 0o777 == 0o600
    assert (data / "tls").stat().st_mode & 0o777 == 0o700


def test_dev_up_without_tls_makes_no_certificates(tmp_path: Path) -> None:
    data = tmp_path / "dev"
    proc = subprocess.run(
        [sys.executable, "-m", "mesh", "dev", "up", "--data-dir", str(data),
         "--duration", "3", "--records", "50", "--rate", "20"],
        cwd=ROOT, capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (data / "tls").exists()
    conf = data / "nats" / "nats-server.conf"  # secured by default: the auth config, no tls block
    assert not conf.exists() or not re.search(r"^\s*tls\s*[:{]", conf.read_text(), re.MULTILINE)
    assert "MESH_TLS_CA" not in proc.stdout


def test_a_config_file_composes_with_tls_and_an_extra_block(pki: Pki, tmp_path: Path) -> None:
    store = tmp_path / "nats"
    conf = tmp_path / "site.conf"
    conf.write_text(f'server_name: "site-a"\njetstream {{\n  store_dir: "{store}"\n}}\n')
    tls = ServerTls(pki.server, pki.server)
    # Only its monitoring endpoint is read (no client connects): the broker's own config composition.
    with BrokerProcess(store, config_file=conf, tls=tls, extra_config="max_payload: 32768") as server:
        varz = _varz(server)
    assert varz["server_name"] == "site-a"
    assert varz["tls_required"] is True
    assert varz["max_payload"] == 32768
