"""Sagas end to end: a real secured nats-server, system APIs served by real nats.micro services,
the orchestrator with its own least-privilege creds (README "Orchestration (sagas)")."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import anyio
import pytest
from typer.testing import CliRunner

from mesh.cli.main import app
from mesh.saga.definition import load_orchestrator_config
from mesh.saga.engine import Orchestrator
from mesh.transport import DLQ_STREAM, JetStream
from tests._secure import SecuredNatsServer
from tests.integration._saga import Systems, make_layout, orchestrator_config, publish_trigger, wait_saga

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

APIS = {
    "erp": ["customer.check", "sales_order.create", "sales_order.cancel"],
    "finance": ["invoice.create", "invoice.void"],
}

Q2C = """
[[sagas]]
name = "q2c"
trigger = { subject = "evt.deal.won.crm" }

[[sagas.steps]]
name = "customer"
subject = "api.erp.customer.check"
request = { customer = "$trigger.payload.customer" }
timeout = 2.0

[[sagas.steps]]
name = "order"
subject = "api.erp.sales_order.create"
timeout = {timeout}
retry = { attempts = {attempts}, backoff = 0.05 }
[sagas.steps.request]
customer = "$steps.customer.echo.customer"
amount = "$trigger.payload.amount"
note = "deal ${trigger.payload.deal}"
[sagas.steps.compensate]
subject = "api.erp.sales_order.cancel"
request = { order = "$steps.order.id" }
retry = { attempts = 2, backoff = 0.05 }

[[sagas.steps]]
name = "invoice"
subject = "api.finance.invoice.create"
request = { order = "$steps.order.id", amount = "$trigger.payload.amount" }
timeout = {timeout}
retry = { attempts = {attempts}, backoff = 0.05 }
"""


def q2c(timeout: float = 2.0, attempts: int = 3) -> str:
    return Q2C.replace("{timeout}", str(timeout)).replace("{attempts}", str(attempts))


@pytest.fixture
def server(nats_server: SecuredNatsServer) -> SecuredNatsServer:
    make_layout(nats_server)
    return nats_server


@asynccontextmanager
async def orchestrators(config: Path, n: int = 1) -> AsyncIterator[list[Orchestrator]]:
    """``n`` replicas in-process, each on its own connection with the orchestrator's creds;
    on exit they are cancelled first (as on SIGTERM), then their connections closed."""
    cfg = load_orchestrator_config(config)
    async with AsyncExitStack() as stack:
        conns = [await stack.enter_async_context(JetStream(cfg.nats, name=f"orch-{i}")) for i in range(n)]
        async with anyio.create_task_group() as tg:
            out = []
            for i, js in enumerate(conns):
                o = Orchestrator(cfg, js, replica=f"replica-{i}")
                await tg.start(o.run)
                out.append(o)
            yield out
            tg.cancel_scope.cancel()


async def cli(*args: str) -> tuple[int, str]:
    def run() -> tuple[int, str]:
        result = CliRunner().invoke(app, list(args))
        return result.exit_code, result.output

    return await anyio.to_thread.run_sync(run)


async def test_happy_path_runs_each_step_once_and_cli_shows_it(
    server: SecuredNatsServer, tmp_path: Path
) -> None:
    config = orchestrator_config(tmp_path / "orch.toml", server, q2c())
    async with Systems.running(server, APIS) as systems, orchestrators(config):
        sid = await publish_trigger(
            server, "evt.deal.won.crm", "deal-1", {"deal": 1, "customer": "c1", "amount": 10}, "q2c"
        )
        async with JetStream(server.nats_config(), name="test") as js:
            rec = await wait_saga(js, sid, lambda r: r.state == "completed", 20, "completed")
    assert [s.state for s in rec.steps] == ["completed"] * 3
    assert [s.attempts for s in rec.steps] == [1, 1, 1]
    assert systems.effect_log == [
        ("api.erp.customer.check", f"{sid}:customer"),
        ("api.erp.sales_order.create", f"{sid}:order"),
        ("api.finance.invoice.create", f"{sid}:invoice"),
    ]
    order_id = rec.step("order").result["id"]
    assert systems.bodies[f"{sid}:order"] == {"customer": "c1", "amount": 10, "note": "deal 1"}
    assert systems.bodies[f"{sid}:invoice"] == {"order": order_id, "amount": 10}
    auth = ["--creds", str(server.admin_creds), "--server", server.url]
    code, out = await cli("saga", "list", *auth, "--state", "completed")
    assert code == 0, out
    assert sid in out
    assert "q2c" in out
    code, out = await cli("saga", "show", sid, *auth)
    assert code == 0, out
    assert "completed" in out
    assert "invoice" in out
    assert order_id in out
    code, out = await cli("saga", "list", *auth, "--state", "failed")
    assert code == 0
    assert sid not in out
    code, out = await cli("saga", "purge", "--older-than", "1h", *auth)
    assert (code, out.strip()) == (0, "deleted 0 saga(s)")
    code, out = await cli("saga", "purge", "--older-than", "2999-01-01T00:00:00Z", "--state", "failed", *auth)
    assert (code, out.strip()) == (0, "deleted 0 saga(s)")
    code, out = await cli("saga", "purge", "--older-than", "2999-01-01T00:00:00Z", *auth)
    assert (code, out.strip()) == (0, "deleted 1 saga(s)")
    code, out = await cli("saga", "show", sid, *auth)
    assert code == 2
    assert f"no saga {sid!r}" in out


async def test_rejected_step_compensates_completed_steps_in_reverse_order(
    server: SecuredNatsServer, tmp_path: Path
) -> None:
    sagas = """
[[sagas]]
name = "three"
trigger = { subject = "evt.deal.won.crm" }
[[sagas.steps]]
name = "a"
subject = "api.erp.customer.check"
compensate = { subject = "api.finance.invoice.void", request = { undo = "a", id = "$steps.a.id" } }
[[sagas.steps]]
name = "b"
subject = "api.erp.sales_order.create"
compensate = { subject = "api.erp.sales_order.cancel", request = { undo = "b", id = "$steps.b.id" } }
[[sagas.steps]]
name = "c"
subject = "api.finance.invoice.create"
compensate = { subject = "api.finance.invoice.void", request = { undo = "c" } }
"""
    config = orchestrator_config(tmp_path / "orch.toml", server, sagas)
    async with Systems.running(server, APIS) as systems, orchestrators(config):
        systems.default["api.finance.invoice.create"] = "reject"
        sid = await publish_trigger(server, "evt.deal.won.crm", "deal-2", {"deal": 2}, "three")
        async with JetStream(server.nats_config(), name="test") as js:
            rec = await wait_saga(js, sid, lambda r: r.state == "compensated", 20, "compensated")
    assert [s.state for s in rec.steps] == ["compensated", "compensated", "failed"]
    assert rec.step("c").attempts == 1  # not retryable: no second attempt
    assert "step c failed" in rec.error
    assert "rejected" in rec.error
    compensations = [(s, k) for s, k in systems.effect_log if k.endswith(":compensate")]
    assert compensations == [
        ("api.erp.sales_order.cancel", f"{sid}:b:compensate"),
        ("api.finance.invoice.void", f"{sid}:a:compensate"),
    ]
    assert systems.bodies[f"{sid}:b:compensate"] == {"undo": "b", "id": rec.step("b").result["id"]}


async def test_retry_policy_retries_retryable_errors_with_one_effect(
    server: SecuredNatsServer, tmp_path: Path
) -> None:
    config = orchestrator_config(tmp_path / "orch.toml", server, q2c(attempts=3))
    async with Systems.running(server, APIS) as systems, orchestrators(config):
        systems.script["api.erp.sales_order.create"] = ["unavailable", "unavailable"]
        sid = await publish_trigger(
            server, "evt.deal.won.crm", "deal-3", {"deal": 3, "customer": "c", "amount": 1}, "q2c"
        )
        async with JetStream(server.nats_config(), name="test") as js:
            rec = await wait_saga(js, sid, lambda r: r.state == "completed", 20, "completed")
        assert rec.step("order").attempts == 3
        assert systems.effects[f"{sid}:order"] == 1

        # retries exhausted: the saga compensates what completed
        systems.default["api.finance.invoice.create"] = "unavailable"
        sid = await publish_trigger(
            server, "evt.deal.won.crm", "deal-4", {"deal": 4, "customer": "c", "amount": 1}, "q2c"
        )
        async with JetStream(server.nats_config(), name="test") as js:
            rec = await wait_saga(js, sid, lambda r: r.state == "compensated", 20, "compensated")
    assert rec.step("invoice").attempts == 3
    assert rec.step("invoice").state == "failed"
    assert rec.step("order").state == "compensated"
    assert systems.executed("api.erp.sales_order.cancel") == [f"{sid}:order:compensate"]


async def test_timeout_retries_with_the_same_key_and_gives_up_after_the_last_attempt(
    server: SecuredNatsServer, tmp_path: Path
) -> None:
    config = orchestrator_config(tmp_path / "orch.toml", server, q2c(timeout=0.5, attempts=2))
    async with Systems.running(server, APIS) as systems, orchestrators(config):
        # executed but answered too late: the second attempt (same key) gets the first result
        systems.script["api.erp.sales_order.create"] = ["late:1.5"]
        sid = await publish_trigger(
            server, "evt.deal.won.crm", "deal-5", {"deal": 5, "customer": "c", "amount": 1}, "q2c"
        )
        async with JetStream(server.nats_config(), name="test") as js:
            rec = await wait_saga(js, sid, lambda r: r.state == "completed", 20, "completed")
        assert rec.step("order").attempts == 2
        assert systems.effects[f"{sid}:order"] == 1
        assert systems.calls.count(("api.erp.sales_order.create", f"{sid}:order")) == 2

        # never answered: both attempts time out, then the order is cancelled
        systems.default["api.finance.invoice.create"] = "hold"
        sid = await publish_trigger(
            server, "evt.deal.won.crm", "deal-6", {"deal": 6, "customer": "c", "amount": 1}, "q2c"
        )
        async with JetStream(server.nats_config(), name="test") as js:
            rec = await wait_saga(js, sid, lambda r: r.state == "compensated", 20, "compensated")
    assert rec.step("invoice").attempts == 2
    assert "within 0.5s" in rec.step("invoice").error
    assert systems.executed("api.erp.sales_order.cancel") == [f"{sid}:order:compensate"]


async def test_failed_compensation_is_dead_lettered_and_saga_retry_resumes_it(
    server: SecuredNatsServer, tmp_path: Path
) -> None:
    config = orchestrator_config(tmp_path / "orch.toml", server, q2c(attempts=1))
    auth = ["--creds", str(server.admin_creds), "--server", server.url]
    async with Systems.running(server, APIS) as systems, orchestrators(config):
        systems.default["api.finance.invoice.create"] = "reject"
        systems.default["api.erp.sales_order.cancel"] = "reject"
        sid = await publish_trigger(
            server, "evt.deal.won.crm", "deal-7", {"deal": 7, "customer": "c", "amount": 1}, "q2c"
        )
        async with JetStream(server.nats_config(), name="test") as js:
            rec = await wait_saga(js, sid, lambda r: r.state == "failed", 20, "failed")
            assert rec.step("order").state == "compensation_failed"
            assert "compensation of step order failed" in rec.error
            letter = await js.get_message(DLQ_STREAM, subject="dlq.saga.q2c", seq=1)
            assert letter is not None
            assert letter.headers["Mesh-Saga-Id"] == sid
            assert letter.headers["Mesh-Error-Class"] == "CompensationFailed"
            code, out = await cli("saga", "list", *auth, "--state", "failed", "--definition", "q2c")
            assert code == 0, out
            assert sid in out

            systems.default["api.erp.sales_order.cancel"] = "ok"
            code, out = await cli("saga", "retry", sid, *auth)
            assert code == 0, out
            rec = await wait_saga(js, sid, lambda r: r.state == "compensated", 20, "compensated")
    assert rec.retries == 1
    assert systems.executed("api.erp.sales_order.cancel") == [f"{sid}:order:compensate"]
    code, out = await cli("saga", "retry", sid, *auth)
    assert code == 2
    assert "only a failed saga can be retried" in out


async def test_two_replicas_never_run_one_saga_twice(server: SecuredNatsServer, tmp_path: Path) -> None:
    config = orchestrator_config(tmp_path / "orch.toml", server, q2c(timeout=5.0))
    n = 12
    async with Systems.running(server, APIS) as systems, orchestrators(config, 2) as replicas:
        for subject in ("api.erp.customer.check", "api.erp.sales_order.create", "api.finance.invoice.create"):
            systems.default[subject] = "late:0.1"
        sids = [
            await publish_trigger(
                server, "evt.deal.won.crm", f"deal-r{i}", {"deal": i, "customer": "c", "amount": i}, "q2c"
            )
            for i in range(n)
        ]
        async with JetStream(server.nats_config(), name="test") as js:
            recs = [
                await wait_saga(js, sid, lambda r: r.state == "completed", 30, "completed") for sid in sids
            ]
        assert all(r.owner in ("replica-0", "replica-1") for r in recs)
        assert replicas[0].running == set()
        assert replicas[1].running == set()
    assert len(systems.effect_log) == 3 * n
    assert set(systems.effects.values()) == {1}
    assert systems.max_in_flight == 1, "one saga's step ran on two replicas at once"
    assert len(systems.calls) == 3 * n, "a step was called twice"


async def test_orchestrator_is_refused_what_its_sagas_do_not_need(
    server: SecuredNatsServer, tmp_path: Path
) -> None:
    from mesh.config import NatsConfig
    from mesh.errors import TransportError
    from mesh.security.authority import Authority, write_creds
    from mesh.security.jwt import new_seed, public_key_of_seed
    from mesh.security.permissions import agent_permissions
    from mesh.transport import OutMessage

    config = orchestrator_config(tmp_path / "orch.toml", server, q2c())
    cfg = load_orchestrator_config(config)
    async with JetStream(cfg.nats, name="orch") as js:
        bucket = await js.key_value("mesh_sagas", create=False)
        await bucket.put("probe", b"{}")  # its own bucket: allowed
        with pytest.raises(TransportError, match="permission denied"):
            await js.publish_ack(OutMessage("evt.deal.won.crm", b"{}", msg_id="forged"))
        with pytest.raises(TransportError, match="permission denied"):
            await js.key_value("mesh_flows", create=False)
        with pytest.raises(TransportError, match="permission denied"):
            await js.publish_ack(OutMessage("dlq.other-flow", b"{}", msg_id="x"))
        with pytest.raises(TransportError, match="permission denied"):
            await js.publish_ack(OutMessage("cmd.erp.anything", b"{}", msg_id="y"))

    # an agent may not touch the saga state
    seed = new_seed("user")
    perms = agent_permissions("erp-agent", ["erp"], ["f-erp"], ["f"])
    creds = write_creds(
        tmp_path / "agent.creds",
        Authority.load(server.security_dir).issue_user("erp-agent", public_key_of_seed(seed), perms),
        seed,
    )
    agent_cfg = NatsConfig(servers=[server.url], creds=str(creds), inbox_prefix="_INBOX.erp-agent")
    async with JetStream(agent_cfg, name="agent") as js:
        with pytest.raises(TransportError, match="permission denied"):
            await js.key_value("mesh_sagas", create=False)
        with pytest.raises(TransportError, match="permission denied"):
            await js.request("api.erp.sales_order.create", b"{}", timeout=2.0)


async def test_publish_await_and_wait_steps(server: SecuredNatsServer, tmp_path: Path) -> None:
    import json

    import nats

    from mesh.transport import OutMessage

    sagas = """
[[sagas]]
name = "ship"
trigger = { subject = "evt.deal.won.crm" }
[[sagas.steps]]
name = "order"
subject = "api.erp.sales_order.create"
request = { deal = "$trigger.payload.deal" }
[[sagas.steps]]
name = "shipped"
kind = "publish_await"
subject = "cmd.erp.ship"
request = { order = "$steps.order.id" }
await_event = "evt.shipment.created.*"
match = { "payload.order" = "$steps.order.id" }
timeout = 10.0
[[sagas.steps]]
name = "cool_off"
kind = "wait"
duration = 0.3
"""
    config = orchestrator_config(tmp_path / "orch.toml", server, sagas)
    commands: list[dict[str, object]] = []
    nc = await nats.connect(server.url, user_credentials=str(server.admin_creds))

    async def ship(msg: object) -> None:  # the ERP side: a command in, an event out
        body = json.loads(msg.data)  # type: ignore[attr-defined]
        commands.append(body)
        async with JetStream(server.nats_config(), name="erp") as js:
            other = {"order": "someone-else"}
            await js.publish_ack(
                OutMessage("evt.shipment.created.erp", json.dumps(other).encode(), msg_id="o1")
            )
            await js.publish_ack(
                OutMessage("evt.shipment.created.erp", json.dumps(body).encode(), msg_id="s1")
            )

    await nc.subscribe("cmd.erp.ship", cb=ship)
    try:
        async with Systems.running(server, APIS), orchestrators(config):
            sid = await publish_trigger(server, "evt.deal.won.crm", "deal-s", {"deal": 9}, "ship")
            async with JetStream(server.nats_config(), name="test") as js:
                rec = await wait_saga(js, sid, lambda r: r.state == "completed", 20, "completed")
                cmd = await js.get_message("MESH_COMMANDS", subject="cmd.erp.ship", seq=1)
    finally:
        await nc.close()
    order_id = rec.step("order").result["id"]
    assert commands == [{"order": order_id}]
    assert rec.step("shipped").result["payload"] == {"order": order_id}
    assert cmd is not None
    assert cmd.headers["Nats-Msg-Id"] == f"{sid}:shipped"
    assert cmd.headers["Mesh-Saga-Id"] == sid
    wait = rec.step("cool_off")
    assert wait.wake_at is not None
    assert wait.started_at is not None
    assert wait.wake_at - wait.started_at == pytest.approx(0.3)


async def test_command_trigger_started_by_meshctl_saga_start(
    server: SecuredNatsServer, tmp_path: Path
) -> None:
    from mesh.saga.state import saga_id

    sagas = """
[[sagas]]
name = "by-command"
trigger = { subject = "cmd.orchestrator.go" }
[[sagas.steps]]
name = "order"
subject = "api.erp.sales_order.create"
request = { deal = "$trigger.payload.deal" }
"""
    config = orchestrator_config(tmp_path / "orch.toml", server, sagas)
    auth = ["--creds", str(server.admin_creds), "--server", server.url]
    async with Systems.running(server, APIS) as systems, orchestrators(config):
        code, out = await cli(
            "saga", "start", "cmd.orchestrator.go", "--data", '{"deal": 42}', "--id", "go-1", *auth
        )
        assert code == 0, out
        code, out = await cli(
            "saga", "start", "cmd.orchestrator.go", "--data", '{"deal": 42}', "--id", "go-1", *auth
        )
        assert "duplicate" in out
        sid = saga_id("by-command", "go-1")
        async with JetStream(server.nats_config(), name="test") as js:
            await wait_saga(js, sid, lambda r: r.state == "completed", 20, "completed")
    assert systems.bodies[f"{sid}:order"] == {"deal": 42}
    assert len(systems.effect_log) == 1
    code, out = await cli("saga", "start", "evt.deal.won.crm", *auth)
    assert code == 2
    assert "command subject" in out


async def test_long_waits_park_the_saga_and_a_stopping_replica_hands_its_sagas_back(
    server: SecuredNatsServer, tmp_path: Path
) -> None:
    sagas = """
[[sagas]]
name = "slow"
trigger = { subject = "evt.deal.won.crm" }
[[sagas.steps]]
name = "nap"
kind = "wait"
duration = 2.5
[[sagas.steps]]
name = "order"
subject = "api.erp.sales_order.create"
timeout = 30.0
"""
    config = orchestrator_config(tmp_path / "orch.toml", server, sagas, lease=1.0)
    async with Systems.running(server, APIS) as systems, JetStream(server.nats_config(), name="test") as js:
        systems.script["api.erp.sales_order.create"] = ["hold"]
        async with orchestrators(config):
            sid = await publish_trigger(server, "evt.deal.won.crm", "deal-p", {}, "slow")
            # a wait longer than the lease holds no lease: parked, claimable when it ends
            parked = await wait_saga(js, sid, lambda r: r.resume_at > 0 and not r.owner, 10, "parked")
            assert parked.resume_at == pytest.approx(parked.step("nap").wake_at)
            rec = await wait_saga(js, sid, lambda r: r.step("order").state == "running", 10, "in step order")
            assert rec.owner == "replica-0"
            with anyio.fail_after(10):
                while not systems.calls:
                    await anyio.sleep(0.02)
        # the replica stopped (cancelled) in the middle of the call: the saga is free at once
        rec = await wait_saga(js, sid, lambda r: True, 5, "stored")
        assert rec.owner == ""
        assert rec.state == "running"
        async with orchestrators(config):  # another replica finishes it (same idempotency key)
            rec = await wait_saga(js, sid, lambda r: r.state == "completed", 10, "completed")
    assert systems.effect_log == [("api.erp.sales_order.create", f"{sid}:order")]


async def test_an_envelope_event_triggers_with_its_fields_and_correlation(
    server: SecuredNatsServer, tmp_path: Path
) -> None:
    from mesh.envelope import Envelope, encode, encode_payload
    from mesh.saga.state import saga_id
    from mesh.transport import OutMessage

    sagas = """
[[sagas]]
name = "won"
trigger = { subject = "evt.deal.won.*" }
[[sagas.steps]]
name = "order"
subject = "api.erp.sales_order.create"
request = { deal = "$trigger.key", amount = "$trigger.payload.amount", origin = "from ${trigger.origin}" }
"""
    config = orchestrator_config(tmp_path / "orch.toml", server, sagas)
    env = Envelope(
        id="env-42", kind="deal.won", flow="deals", key="deal:42", version=3, origin="crm", occurred_at=1,
        correlation_id="corr-42", traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        payload=encode_payload({"amount": 1250}),
    )  # fmt: skip
    async with Systems.running(server, APIS) as systems, orchestrators(config):
        async with JetStream(server.nats_config(), name="crm") as js:
            # a message that is neither an envelope nor JSON is dropped (logged), nothing stops
            await js.publish_ack(OutMessage("evt.deal.won.crm", b"\xc1 not a message", msg_id="junk"))
            await js.publish_ack(OutMessage("evt.deal.won.crm", encode(env), msg_id=env.id))
            sid = saga_id("won", env.id)
            await wait_saga(js, sid, lambda r: r.state == "completed", 20, "completed")
        code, out = await cli(
            "saga", "list", "--since", "1h", "--definition", "won", "--json", *_auth(server)
        )
        assert code == 0, out
        assert sid in out
        code, out = await cli("saga", "list", "--definition", "other", *_auth(server))
        assert code == 0, out
        assert sid not in out
    assert len(systems.effect_log) == 1
    key = f"{sid}:order"
    assert systems.bodies[key] == {"deal": "deal:42", "amount": 1250, "origin": "from crm"}
    headers = systems.headers[key]
    assert headers["Mesh-Idempotency-Key"] == key
    assert headers["Mesh-Correlation-Id"] == "corr-42"
    assert headers["Mesh-Causation-Id"] == "env-42"
    assert headers["traceparent"] == env.traceparent
    assert int(headers["Mesh-Deadline"]) > 0


def _auth(server: SecuredNatsServer) -> list[str]:
    return ["--creds", str(server.admin_creds), "--server", server.url]


async def test_publish_await_without_the_event_times_out_and_compensates(
    server: SecuredNatsServer, tmp_path: Path
) -> None:
    sagas = """
[[sagas]]
name = "ship"
trigger = { subject = "evt.deal.won.crm" }
[[sagas.steps]]
name = "order"
subject = "api.erp.sales_order.create"
compensate = { subject = "api.erp.sales_order.cancel", request = { id = "$steps.order.id" } }
[[sagas.steps]]
name = "shipped"
kind = "publish_await"
subject = "cmd.erp.ship"
request = { order = "$steps.order.id" }
await_event = "evt.shipment.created.erp"
match = { "payload.order" = "$steps.order.id" }
timeout = 0.5
retry = { attempts = 2, backoff = 0.1 }
"""
    config = orchestrator_config(tmp_path / "orch.toml", server, sagas)
    async with Systems.running(server, APIS) as systems, orchestrators(config):
        sid = await publish_trigger(server, "evt.deal.won.crm", "deal-t", {}, "ship")
        async with JetStream(server.nats_config(), name="test") as js:
            rec = await wait_saga(js, sid, lambda r: r.state == "compensated", 20, "compensated")
            first = await js.get_message("MESH_COMMANDS", subject="cmd.erp.ship", seq=1)
            second = await js.get_message(
                "MESH_COMMANDS", subject="cmd.erp.ship", seq=first.seq + 1 if first else 1
            )
    assert rec.step("shipped").attempts == 2
    assert "no evt.shipment.created.erp event matching" in rec.step("shipped").error
    assert systems.executed("api.erp.sales_order.cancel") == [f"{sid}:order:compensate"]
    assert first is not None
    assert second is None, "the second attempt's command was deduplicated (same Nats-Msg-Id)"
