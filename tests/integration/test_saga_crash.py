"""SIGKILL the orchestrator process (``meshctl orchestrator run``) at each step boundary and in
the middle of each step's call: a new process takes the saga over once the dead one's lease has
expired and finishes it, and no step takes effect twice (the API services count executions by
idempotency key)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import anyio
import httpx
import pytest

from mesh.transport import JetStream
from tests._secure import SecuredNatsServer
from tests.integration._saga import (
    OrchestratorProcess,
    Systems,
    make_layout,
    orchestrator_config,
    publish_trigger,
    wait_saga,
)
from tests.integration.test_saga import APIS, q2c

pytestmark = [pytest.mark.integration, pytest.mark.crash, pytest.mark.anyio, pytest.mark.timeout(120)]

STEPS = {
    "customer": "api.erp.customer.check",
    "order": "api.erp.sales_order.create",
    "invoice": "api.finance.invoice.create",
}
NEXT = {"customer": "order", "order": "invoice"}


@pytest.mark.parametrize(
    ("point", "step"),
    [
        ("after", "customer"),  # customer's completion saved, order's attempt saved and sent
        ("after", "order"),
        ("during", "customer"),  # the call took effect, its reply never came back
        ("during", "order"),
        ("during", "invoice"),
        ("during", "compensation"),  # the cancel of the order took effect, no reply
    ],
)
async def test_sigkill_at_each_step_boundary_finishes_exactly_once(
    nats_server: SecuredNatsServer, tmp_path: Path, point: str, step: str
) -> None:
    make_layout(nats_server)
    config = orchestrator_config(tmp_path / "orch.toml", nats_server, q2c(timeout=30.0), lease=2.0)
    proc = OrchestratorProcess(config, tmp_path / "orchestrator.log")
    admin = JetStream(nats_server.nats_config(), name="test")
    async with Systems.running(nats_server, APIS) as systems, admin as js:
        if step == "compensation":
            systems.default[STEPS["invoice"]] = "reject"
            target = "api.erp.sales_order.cancel"
            systems.script[target] = ["exec_hold"]
        elif point == "after":
            target = STEPS[NEXT[step]]
            systems.script[target] = ["hold"]
        else:
            target = STEPS[step]
            systems.script[target] = ["exec_hold"]
        await anyio.to_thread.run_sync(proc.start)
        try:
            sid = await publish_trigger(
                nats_server, "evt.deal.won.crm", "deal-k", {"deal": 1, "customer": "c", "amount": 5}, "q2c"
            )
            with anyio.fail_after(20):
                while not any(s == target for s, _ in systems.calls):
                    await anyio.sleep(0.02)
            before = await wait_saga(js, sid, lambda r: True, 5, "stored")
            if point == "after":
                assert before.step(step).state == "completed"
                assert before.step(NEXT[step]).state == "running"
            await anyio.to_thread.run_sync(proc.kill)

            await anyio.to_thread.run_sync(proc.start)
            final = "compensated" if step == "compensation" else "completed"
            rec = await wait_saga(js, sid, lambda r: r.state == final, 30, final)
        finally:
            await anyio.to_thread.run_sync(proc.stop)
    assert rec.owner != before.owner, "the new process took the saga over"
    assert systems.effects, "nothing ran"
    assert set(systems.effects.values()) == {1}, f"a step took effect twice: {systems.effects}"
    expected = ["customer", "order"] + (["order:compensate"] if step == "compensation" else ["invoice"])
    assert [k.removeprefix(f"{sid}:") for _, k in systems.effect_log] == expected
    if point == "during":
        key = f"{sid}:order:compensate" if step == "compensation" else f"{sid}:{step}"
        assert [k for _, k in systems.calls].count(key) == 2, "the call was repeated with the same key"


async def test_two_processes_the_survivor_takes_over_a_killed_replicas_saga(
    nats_server: SecuredNatsServer, tmp_path: Path
) -> None:
    make_layout(nats_server)
    config = orchestrator_config(
        tmp_path / "orch.toml", nats_server, q2c(timeout=30.0), lease=2.0, extra="metrics_port = 0"
    )
    procs = [OrchestratorProcess(config, tmp_path / f"orchestrator-{i}.log") for i in range(2)]
    admin = JetStream(nats_server.nats_config(), name="test")
    async with Systems.running(nats_server, APIS) as systems, admin as js:
        systems.script[STEPS["order"]] = ["exec_hold"]
        for p in procs:
            await anyio.to_thread.run_sync(p.start)
        try:
            sid = await publish_trigger(
                nats_server, "evt.deal.won.crm", "deal-2p", {"deal": 2, "customer": "c", "amount": 5}, "q2c"
            )
            rec = await wait_saga(js, sid, lambda r: r.step("order").state == "running", 20, "in step order")
            owner = next(p for p in procs if p.proc is not None and rec.owner.endswith(f"-{p.proc.pid}"))
            survivor = next(p for p in procs if p is not owner)
            await anyio.to_thread.run_sync(owner.kill)
            done = await wait_saga(js, sid, lambda r: r.state == "completed", 30, "completed")
            url = re.search(r"metrics on (http://\S+)/metrics", survivor.log.read_text())
            assert url is not None
            async with httpx.AsyncClient(timeout=5) as http:
                assert (await http.get(f"{url.group(1)}/readyz")).status_code == 200
                exposition = (await http.get(f"{url.group(1)}/metrics")).text
            assert 'mesh_sagas_finished_total{saga="q2c",state="completed"} 1.0' in exposition
            assert 'mesh_saga_steps_total{event="completed",saga="q2c"}' in exposition
        finally:
            for p in procs:
                await anyio.to_thread.run_sync(p.stop)
    assert survivor.proc is not None
    assert done.owner.endswith(f"-{survivor.proc.pid}")
    assert set(systems.effects.values()) == {1}
    assert len(systems.effect_log) == 3


async def test_missing_bucket_is_one_line_and_exit_2(nats_server: SecuredNatsServer, tmp_path: Path) -> None:
    from tests._secure import create_layout

    create_layout(nats_server)  # streams, but no mesh_sagas bucket
    config = orchestrator_config(tmp_path / "orch.toml", nats_server, q2c())
    result = await anyio.run_process(
        [sys.executable, "-m", "mesh", "orchestrator", "run", "--config", str(config)], check=False
    )
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert "KV bucket mesh_sagas does not exist: the control plane creates it" in err
    assert "Traceback" not in err
