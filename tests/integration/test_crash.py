"""Crash tests: SIGKILL the source agent, the sink agent and nats-server at random points during
a sync, restart them, and prove the target ends with exactly the source's rows, no entity was
written twice for the same version, and versions never went backwards.

Each run prints its seed and kill schedule; ``MESH_CRASH_SEED=<seed>`` replays one.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import pytest

from mesh.faults import CRASH_POINTS
from tests._secure import SecuredNatsServer as NatsServer
from tests._secure import issue_agent_creds
from tests.integration._harness import (
    AgentProcess,
    ErpLoad,
    agent_toml,
    assert_effect_once,
    assert_same_rows,
    consumer_settled,
    make_crm,
    make_erp,
    rows,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.crash, pytest.mark.timeout(240)]

KILLS_PER_TARGET = 4


def _setup(tmp: Path, security_dir: Path) -> tuple[NatsServer, Path, Path, AgentProcess, AgentProcess]:
    server = NatsServer(tmp / "nats", security_dir, layout=True)
    erp, crm = tmp / "erp.db", tmp / "crm.db"
    make_erp(erp)
    make_crm(crm)
    procs = []
    for name, system, kw in (("erp-agent", "erp", {"source": erp}), ("crm-agent", "crm", {"sink": crm})):
        cfg = tmp / f"{name}.toml"
        cfg.write_text(agent_toml(name=name, system=system, state=tmp / "state" / name,
                                  url=server.url, creds=tmp / f"{name}.creds", **kw))  # type: ignore[arg-type]  # fmt: skip
        issue_agent_creds(cfg, security_dir)
        procs.append(AgentProcess(cfg, tmp / f"{name}.log"))
    return server, erp, crm, procs[0], procs[1]


@pytest.mark.parametrize(
    "targets",
    [["source"], ["sink"], ["broker"], ["source", "sink", "broker"]],
    ids=["source", "sink", "broker", "all"],
)
def test_sigkill_during_sync(tmp_path: Path, security_dir: Path, targets: list[str]) -> None:
    seed = int(os.environ.get("MESH_CRASH_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    server, erp, crm, source, sink = _setup(tmp_path, security_dir)
    load = ErpLoad(erp, seed=seed)
    load.insert(3000)
    # Waits long enough that agents are past start-up and mid-batch when killed.
    schedule = [(rng.uniform(0.6, 2.0), t, rng.uniform(0.0, 0.6))
                for t in targets for _ in range(KILLS_PER_TARGET)]  # fmt: skip
    rng.shuffle(schedule)
    print(f"seed={seed} schedule={[(round(a, 2), t, round(b, 2)) for a, t, b in schedule]}")

    stop = threading.Event()

    def drive() -> None:
        while not stop.is_set():
            load.mixed(1)
            time.sleep(0.01)

    server.start()
    source.start()
    sink.start()
    loader = threading.Thread(target=drive, daemon=True)
    loader.start()
    try:
        for wait, target, down in schedule:
            time.sleep(wait)
            if target == "source":
                source.kill()
                time.sleep(down)
                source.start()
            elif target == "sink":
                sink.kill()
                time.sleep(down)
                sink.start()
            else:
                server.kill()
                time.sleep(down)
                server.start()
        stop.set()
        loader.join()
        wait_until(lambda: rows(erp) == rows(crm), 90, "CRM to match ERP after the crashes")
        # Redeliveries of messages applied but not acked before a kill arrive after ack_wait:
        # wait for them, since a double effect would show only then.
        wait_until(
            lambda: consumer_settled(server.url, "customers-crm", server.admin_creds),
            30,
            "the consumer to settle",
        )
        wait_until(lambda: rows(erp) == rows(crm), 10, "CRM to match ERP once settled")
        assert source.alive, f"the source agent died on its own; see {source.log}"
        assert sink.alive, f"the sink agent died on its own; see {sink.log}"
        assert source.terminate() == 0
        assert sink.terminate() == 0
    finally:
        stop.set()
        source.kill()
        sink.kill()
        server.stop()
    assert_same_rows(erp, crm)
    assert_effect_once(crm)
    assert len(rows(crm)) > 1000


def test_sigkill_at_every_crash_point(tmp_path: Path, security_dir: Path) -> None:
    """Agents SIGKILL themselves inside the windows that matter (after the sink wrote but before
    the inbox recorded, after the PubAck but before the outbox row went, around the capture
    commit); a watchdog restarts them. The result must still be exact."""
    seed = int(os.environ.get("MESH_CRASH_SEED", random.randrange(1 << 30)))
    print(f"seed={seed}")
    server, erp, crm, source, sink = _setup(tmp_path, security_dir)
    load = ErpLoad(erp, seed=seed)
    load.insert(1000)
    faults = {"MESH_CRASH_POINTS": ",".join(f"{p}:0.03" for p in CRASH_POINTS)}
    server.start()
    deaths = {"source": 0, "sink": 0}
    try:
        # Faults may kill an agent before it is ready: only the watchdog below waits for anything.
        source.start(faults, wait=False)
        sink.start(faults, wait=False)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            load.mixed(3)
            for name, agent in (("source", source), ("sink", sink)):
                if not agent.alive:
                    assert agent.killed_by_sigkill, f"{name} agent exited on its own; see {agent.log}"
                    deaths[name] += 1
                    agent.start(faults, wait=False)
            time.sleep(0.02)
        # Finish without faults.
        for agent in (source, sink):
            agent.kill()
            agent.start()
        wait_until(lambda: rows(erp) == rows(crm), 90, "CRM to match ERP")
        wait_until(
            lambda: consumer_settled(server.url, "customers-crm", server.admin_creds),
            30,
            "the consumer to settle",
        )
        wait_until(lambda: rows(erp) == rows(crm), 10, "CRM to match ERP once settled")
    finally:
        source.kill()
        sink.kill()
        server.stop()
    print(f"deaths={deaths}")
    assert min(deaths.values()) >= 3, f"too few crashes to mean anything: {deaths}"
    assert_same_rows(erp, crm)
    assert_effect_once(crm)
