"""Graceful shutdown: SIGTERM finishes or releases in-flight work within the grace period,
leaves no half-applied message, and the next start continues where the last one stopped."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tests._secure import SecuredNatsServer as NatsServer
from tests._secure import issue_agent_creds
from tests.integration._harness import (
    AgentProcess,
    ErpLoad,
    agent_toml,
    assert_effect_once,
    assert_same_rows,
    consumer_settled,
    log_tail,
    make_crm,
    make_erp,
    rows,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

GRACE = 3.0


def test_sigterm_mid_sync_exits_cleanly_and_loses_nothing(tmp_path: Path, security_dir: Path) -> None:
    server = NatsServer(tmp_path / "nats", security_dir, layout=True)
    erp, crm = tmp_path / "erp.db", tmp_path / "crm.db"
    make_erp(erp)
    make_crm(crm)
    agents = {}
    for name, system, kw in (("erp-agent", "erp", {"source": erp}), ("crm-agent", "crm", {"sink": crm})):
        cfg = tmp_path / f"{name}.toml"
        text = agent_toml(name=name, system=system, state=tmp_path / name, url=server.url,
                          creds=tmp_path / f"{name}.creds", **kw)  # type: ignore[arg-type]  # fmt: skip
        # a long ack_wait: a message held by a stopped agent and not released would stall the sync
        text = text.replace("ack_wait = 5.0", "ack_wait = 60.0")
        text = text.replace(
            f'state_dir = "{tmp_path / name}"', f'state_dir = "{tmp_path / name}"\nshutdown_grace = {GRACE}'
        )
        cfg.write_text(text)
        issue_agent_creds(cfg, security_dir)
        agents[name] = AgentProcess(cfg, tmp_path / f"{name}.log")
    source, sink = agents["erp-agent"], agents["crm-agent"]
    load = ErpLoad(erp, seed=7)
    load.insert(5000)
    stop = threading.Event()

    def drive() -> None:
        while not stop.is_set():
            load.mixed(1)
            time.sleep(0.005)

    server.start()
    source.start()  # returns once /readyz says ready: handlers, stores, NATS, command channel
    sink.start()
    loader = threading.Thread(target=drive, daemon=True)
    loader.start()
    stops = []
    try:
        for i in range(6):
            time.sleep(0.8 + 0.3 * i)
            agent = sink if i % 2 == 0 else source
            began = time.monotonic()
            code = agent.terminate(timeout=GRACE + 5)
            stops.append(time.monotonic() - began)
            assert code == 0, f"{agent.config.name} exited with {code}; see {agent.log}"
            agent.start()
        stop.set()
        loader.join()
        # With ack_wait at 60 s, converging well before that shows nothing was left held.
        wait_until(lambda: rows(erp) == rows(crm), 45, "CRM to match ERP")
        wait_until(
            lambda: consumer_settled(server.url, "customers-crm", server.admin_creds),
            10,
            "the consumer to settle",
        )
    finally:
        stop.set()
        source.kill()
        sink.kill()
        server.stop()
    assert max(stops) < GRACE + 5
    assert_same_rows(erp, crm)
    assert_effect_once(crm)
    log = (tmp_path / "crm-agent.log").read_text()
    assert "stopping agent crm-agent" in log
    assert "Traceback" not in log


def test_sigterm_right_after_start_exits_cleanly(tmp_path: Path, security_dir: Path) -> None:
    """A SIGTERM that arrives while the agent is still starting (signal handlers installed, but
    stores, NATS link or command channel not up yet) stops it cleanly with exit 0; /readyz said
    "not ready" until then. The harness sends it as soon as the "signals" check is met."""
    server = NatsServer(tmp_path / "nats", security_dir, layout=True)
    erp = tmp_path / "erp.db"
    make_erp(erp)
    ErpLoad(erp, seed=1).insert(500)
    cfg = tmp_path / "erp-agent.toml"
    cfg.write_text(agent_toml(name="erp-agent", system="erp", state=tmp_path / "erp-agent", url=server.url,
                              source=erp, creds=tmp_path / "erp-agent.creds"))  # fmt: skip
    issue_agent_creds(cfg, security_dir)
    agent = AgentProcess(cfg, tmp_path / "erp-agent.log")
    try:
        # NATS is not running: the agent cannot become ready, and stops cleanly anyway.
        agent.start(wait=False)
        snap = agent.wait_ready(checks=("signals",))
        assert snap["ready"] is False
        assert "nats" in snap["waiting"]  # type: ignore[operator]
        assert agent.terminate() == 0
        server.start()
        for _ in range(3):
            agent.start(wait=False)
            assert agent.terminate() == 0, log_tail(agent.log)
        agent.start()
        assert agent.readyz() == {**agent.wait_ready(), "ready": True}
        assert agent.terminate() == 0
    finally:
        agent.kill()
        server.stop()
    log = agent.log.read_text()
    assert log.count("stopping agent erp-agent") == 5
    assert "Traceback" not in log
