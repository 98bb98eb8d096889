"""``meshctl security issue-agent`` against a real secured nats-server: an agent process with
the creds it writes syncs its static flow, and the same creds cannot publish another origin."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anyio
import nats
import pytest

from tests._secure import SecuredNatsServer, create_layout
from tests.integration._harness import AgentProcess, ErpLoad, agent_toml, make_crm, make_erp, rows, wait_until

pytestmark = [pytest.mark.integration]


def issue(config: Path, server: SecuredNatsServer) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mesh", "security", "issue-agent", "--config", str(config),
         "--dir", str(server.security_dir)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def configs(tmp: Path, server: SecuredNatsServer) -> tuple[Path, Path, Path, Path]:
    erp, crm = tmp / "erp.db", tmp / "crm.db"
    make_erp(erp)
    make_crm(crm)
    erp_cfg, crm_cfg = tmp / "erp-agent.toml", tmp / "crm-agent.toml"
    erp_cfg.write_text(agent_toml(name="erp-agent", system="erp", state=tmp / "s-erp", url=server.url,
                                  source=erp, creds=tmp / "creds" / "erp-agent.creds"))  # fmt: skip
    crm_cfg.write_text(agent_toml(name="crm-agent", system="crm", state=tmp / "s-crm", url=server.url,
                                  sink=crm, creds=tmp / "creds" / "crm-agent.creds"))  # fmt: skip
    issue(erp_cfg, server)
    issue(crm_cfg, server)
    return erp, crm, erp_cfg, crm_cfg


def test_agent_with_issued_creds_syncs_its_flow(tmp_path: Path, nats_server: SecuredNatsServer) -> None:
    erp, crm, erp_cfg, crm_cfg = configs(tmp_path, nats_server)
    create_layout(nats_server)  # the control plane's job; this mesh runs without one
    ErpLoad(erp).insert(50)
    agents = [AgentProcess(erp_cfg, tmp_path / "erp.log"), AgentProcess(crm_cfg, tmp_path / "crm.log")]
    try:
        for a in agents:
            a.start()
        wait_until(lambda: rows(crm) == rows(erp), 60, "the CRM to hold the ERP's 50 customers")
    finally:
        for a in agents:
            a.terminate()
    assert "Permissions Violation" not in (tmp_path / "erp.log").read_text()


@pytest.mark.anyio
async def test_issued_creds_publish_their_origin_only(tmp_path: Path, nats_server: SecuredNatsServer) -> None:
    await anyio.to_thread.run_sync(configs, tmp_path, nats_server)
    await anyio.to_thread.run_sync(create_layout, nats_server)
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(
        nats_server.url, user_credentials=str(tmp_path / "creds" / "erp-agent.creds"),
        inbox_prefix="_INBOX.erp-agent", allow_reconnect=False, error_cb=on_error,
    )  # fmt: skip
    try:
        js = nc.jetstream()
        ack = await js.publish("evt.customer.upserted.erp", b"own origin", timeout=5)
        assert ack.stream == "MESH_EVENTS"
        await nc.publish("evt.customer.upserted.crm", b"forged origin")
        await nc.flush()
        with anyio.fail_after(10):
            while not any('publish to "evt.customer.upserted.crm"' in e.lower() for e in errors):
                await anyio.sleep(0.02)
    finally:
        await nc.close()
    admin = await nats.connect(nats_server.url, user_credentials=str(nats_server.admin_creds))
    try:
        info = await admin.jetstream().stream_info("MESH_EVENTS", subjects_filter="evt.>")
    finally:
        await admin.close()
    assert info.state.subjects == {"evt.customer.upserted.erp": 1}
