"""Saga transitions reach MESH_TRACE through the orchestrator's own recorder (README "Tracing
business transactions"): a real secured nats-server, the orchestrator with its own
least-privilege creds (which may publish ``trace.<its name>.*`` and nothing of another's), system
APIs served by real nats.micro services."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

from agents.orchestrator import run_orchestrator
from mesh.errors import TransportError
from mesh.saga.definition import load_orchestrator_config
from mesh.trace import TraceRecord, TxnIndex, encode_batch, load_index
from mesh.transport import JetStream, OutMessage
from tests._secure import SecuredNatsServer
from tests.integration._saga import Systems, make_layout, orchestrator_config, publish_trigger, wait_saga

pytestmark = [pytest.mark.integration, pytest.mark.anyio, pytest.mark.timeout(90)]

APIS = {"erp": ["sales_order.create", "sales_order.cancel"], "finance": ["invoice.create"]}

SAGA = """
[[sagas]]
name = "q2c"
trigger = { subject = "evt.deal.won.crm" }

[[sagas.steps]]
name = "order"
subject = "api.erp.sales_order.create"
request = { deal = "$trigger.payload.deal" }
timeout = 2.0
[sagas.steps.compensate]
subject = "api.erp.sales_order.cancel"
request = { order = "$steps.order.id", reason = "${saga.error}" }

[[sagas.steps]]
name = "invoice"
subject = "api.finance.invoice.create"
request = { order = "$steps.order.id" }
timeout = 2.0
retry = { attempts = 1 }
"""


@pytest.fixture
def server(nats_server: SecuredNatsServer) -> SecuredNatsServer:
    make_layout(nats_server)
    return nats_server


async def _index_when(server: SecuredNatsServer, corr: str, outcome: str, timeout: float = 20.0) -> TxnIndex:
    deadline = time.monotonic() + timeout
    async with JetStream(server.nats_config(), name="test-trace") as js:
        while True:
            index = await load_index(js)
            found = index.find(corr)
            if found and any(r.outcome == outcome for r in found[0].records):
                return index
            if time.monotonic() > deadline:
                shown = [(r.kind, r.outcome, r.detail) for t in found for r in t.records]
                raise AssertionError(f"no {outcome} record for {corr} within {timeout}s: {shown}")
            await anyio.sleep(0.1)


async def test_a_compensated_saga_makes_its_transaction_compensated(
    server: SecuredNatsServer, tmp_path: Path
) -> None:
    config = orchestrator_config(tmp_path / "orch.toml", server, SAGA, name="q2c-orch")
    cfg = load_orchestrator_config(config)
    async with Systems.running(server, APIS) as systems, anyio.create_task_group() as tg:
        systems.default["api.finance.invoice.create"] = "reject"
        tg.start_soon(run_orchestrator, cfg)
        sid = await publish_trigger(server, "evt.deal.won.crm", "deal-9", {"deal": 9}, "q2c")
        async with JetStream(server.nats_config(), name="test") as js:
            await wait_saga(js, sid, lambda r: r.state == "compensated", 20, "compensated")
        # a JSON trigger without a correlation id: the saga id names the transaction
        index = await _index_when(server, sid, "saga_compensated")
        tg.cancel_scope.cancel()
    [txn] = index.find(sid)
    [taken] = [r for r in txn.records if r.kind == "applied"]
    assert (taken.envelope_id, taken.outcome, taken.detail) == ("deal-9", "saga_started", sid)
    assert (taken.agent, taken.flow) == ("q2c-orch", "saga-q2c")
    assert index.find("deal-9") == [txn], "the trigger's id finds the transaction"
    records = [r for r in txn.records if r.kind == "saga_step"]
    steps = [(r.outcome, r.detail.split(":")[0]) for r in records]
    assert steps == [
        ("saga_started", "q2c"),
        ("started", "q2c/order attempt 1"),
        ("completed", "q2c/order"),
        ("started", "q2c/invoice attempt 1"),
        ("failed", "q2c/invoice"),
        ("compensated", "q2c/order"),
        ("saga_compensated", "q2c"),
    ]
    assert {(r.agent, r.system, r.envelope_id) for r in records} == {("q2c-orch", "orchestrator", sid)}
    assert "api.finance.invoice.create" in records[4].detail
    status, reason = txn.status()
    assert status == "compensated"
    assert "step invoice failed" in reason
    assert systems.executed("api.erp.sales_order.cancel") == [f"{sid}:order:compensate"]
    cancel = systems.bodies[f"{sid}:order:compensate"]
    assert cancel["reason"].startswith("step invoice failed after 1 attempt(s): api.finance.invoice.create")


async def test_the_orchestrator_may_trace_only_under_its_own_name(
    server: SecuredNatsServer, tmp_path: Path
) -> None:
    config = orchestrator_config(tmp_path / "orch.toml", server, SAGA, name="q2c-orch")
    cfg = load_orchestrator_config(config)
    batch = encode_batch([TraceRecord(kind="saga_step", at=1, agent="q2c-orch", correlation_id="c")])
    async with JetStream(cfg.nats, name="orch") as js:
        await js.publish_ack(OutMessage("trace.q2c-orch.saga_step", batch, msg_id="own"))
        with pytest.raises(TransportError, match="permission denied"):
            await js.publish_ack(OutMessage("trace.erp-agent.saga_step", batch, msg_id="forged"))
        with pytest.raises(TransportError, match="permission denied"):
            await js.publish_ack(OutMessage("trace.q2c-orch.saga_step.x", batch, msg_id="deeper"))
    without = orchestrator_config(tmp_path / "other.toml", server, SAGA, name="other-orch")
    async with JetStream(load_orchestrator_config(without).nats, name="other") as js:
        with pytest.raises(TransportError, match="permission denied"):
            await js.publish_ack(OutMessage("trace.q2c-orch.saga_step", batch, msg_id="not-mine"))
