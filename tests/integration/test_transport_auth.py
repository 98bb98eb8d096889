"""The transport against a nats-server that enforces permissions (static users, the same
subject rules the agents' JWTs carry): a refused publish, request, JetStream API call or
subscription raises Refused naming the subject at once (not a request timeout), and a refused
connect is one clear TransportError."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import nkeys
import pytest

from agents.control import ControlChannel
from agents.flows import FlowManager
from mesh.actors import Supervisor
from mesh.broker import NatsServer
from mesh.config import NatsConfig, StreamsConfig
from mesh.controlplane.identity import Credentials, save_credentials
from mesh.controlplane.models import Assignment, encode
from mesh.errors import TransportError
from mesh.readiness import Readiness
from mesh.transport import DLQ_STREAM, JetStream, Message, NoResponders, OutMessage, Refused

pytestmark = [pytest.mark.anyio, pytest.mark.integration, pytest.mark.timeout(60)]

# Long enough that a refusal which only surfaced as a timeout would show as NoReply, not Refused.
TIMEOUT = 10.0

AGENT_PUBLISH = [
    "evt.*.*.erp",
    "mesh.cp.register.erp-agent",
    "mesh.cp.heartbeat.erp-agent",
    "$JS.API.INFO",
    "$JS.API.STREAM.INFO.MESH_EVENTS",
    "$JS.API.DIRECT.GET.KV_mesh_assign.$KV.mesh_assign.agent.erp-agent",
    *(
        subject
        for c in ("f1-erp", "f3-half")
        for subject in (
            f"$JS.API.CONSUMER.CREATE.MESH_EVENTS.{c}",
            f"$JS.API.CONSUMER.CREATE.MESH_EVENTS.{c}.>",
            f"$JS.API.CONSUMER.DURABLE.CREATE.MESH_EVENTS.{c}",
            f"$JS.API.CONSUMER.INFO.MESH_EVENTS.{c}",
        )
    ),
    "$JS.API.CONSUMER.MSG.NEXT.MESH_EVENTS.f1-erp",  # f3-half: created, but no pulling from it
    "$JS.ACK.MESH_EVENTS.f1-erp.>",
]
AGENT_SUBSCRIBE = ["_INBOX.erp-agent.>", "mesh.cp.agent.erp-agent", "$KV.mesh_assign.agent.erp-agent"]


def _list(items: list[str]) -> str:
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[NatsServer]:
    store = tmp_path / "nats"
    store.mkdir()
    conf = tmp_path / "auth.conf"
    conf.write_text(
        f"""
server_name: auth-test
jetstream {{ store_dir: "{store}" }}
authorization {{
  users = [
    {{user: admin, password: "admin-pw"}}
    {{user: erp, password: "erp-pw", permissions: {{
        publish: {{allow: {_list(AGENT_PUBLISH)}}}
        subscribe: {{allow: {_list(AGENT_SUBSCRIBE)}}}
        allow_responses: {{max: 1}}
    }}}}
  ]
}}
"""
    )
    server = NatsServer(store, config_file=conf)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _config(server: NatsServer, user: str, env: str, **extra: object) -> NatsConfig:
    return NatsConfig(
        servers=[server.url],
        user=user,
        password_env=env,
        request_timeout=TIMEOUT,
        **extra,  # type: ignore[arg-type]
    )


@pytest.fixture
async def admin(secured: NatsServer, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[JetStream]:
    monkeypatch.setenv("MESH_TEST_ADMIN_PW", "admin-pw")
    async with JetStream(_config(secured, "admin", "MESH_TEST_ADMIN_PW"), name="admin") as js:
        await js.ensure_streams(StreamsConfig(storage="memory"))
        await js.key_value("mesh_assign", memory=True, direct=True)
        yield js


@pytest.fixture
async def agent(
    secured: NatsServer, admin: JetStream, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[JetStream]:
    monkeypatch.setenv("MESH_TEST_ERP_PW", "erp-pw")
    cfg = _config(secured, "erp", "MESH_TEST_ERP_PW", inbox_prefix="_INBOX.erp-agent")
    async with JetStream(cfg, name="erp-agent") as js:
        yield js


async def test_allowed_publishes_and_api_calls_go_through(agent: JetStream) -> None:
    seq = await agent.publish(OutMessage("evt.customer.upserted.erp", b"x", "ok-1"))
    assert seq >= 1
    info = await agent.stream_info("MESH_EVENTS")
    assert info.messages == 1


async def test_an_event_of_another_origin_is_refused_at_once(agent: JetStream) -> None:
    with pytest.raises(Refused, match=r"^permission denied: publish to evt\.customer\.upserted\.crm$"):
        await agent.publish(OutMessage("evt.customer.upserted.crm", b"x", "forged-1"))
    assert agent.is_connected  # a refusal does not cost the connection
    assert await agent.publish(OutMessage("evt.customer.upserted.erp", b"x", "ok-2")) >= 1


async def test_refused_jetstream_api_calls_name_their_subject(agent: JetStream) -> None:
    with pytest.raises(Refused, match=r"permission denied: publish to \$JS\.API\.STREAM\.PURGE\.MESH_DLQ"):
        await agent.purge(DLQ_STREAM, up_to_seq=10)
    with pytest.raises(Refused, match=r"publish to \$JS\.API\.STREAM\.INFO\.MESH_DLQ"):
        await agent.stream_info(DLQ_STREAM)
    with pytest.raises(Refused, match=r"publish to \$JS\.API\.STREAM\.DELETE\.MESH_EVENTS"):
        await agent.js.delete_stream("MESH_EVENTS")


async def test_its_own_consumers_only(agent: JetStream) -> None:
    await agent.publish(OutMessage("evt.customer.upserted.erp", b"x", "c-1"))
    own = await agent.pull_consumer(
        durable="f1-erp", filter_subject="evt.customer.>", ack_wait=30, max_deliver=3, max_ack_pending=10
    )
    got = await own.fetch(5, timeout=5)
    assert [d.data for d in got] == [b"x"]
    await got[0].ack()
    with pytest.raises(Refused, match=r"publish to \$JS\.API\.CONSUMER\..*MESH_EVENTS\.f2-crm"):
        await agent.pull_consumer(
            durable="f2-crm", filter_subject="evt.>", ack_wait=30, max_deliver=3, max_ack_pending=10
        )
    half = await agent.pull_consumer(
        durable="f3-half", filter_subject="evt.>", ack_wait=30, max_deliver=3, max_ack_pending=10
    )
    with pytest.raises(
        Refused, match=r"^permission denied: publish to \$JS\.API\.CONSUMER\.MSG\.NEXT\.MESH_EVENTS\.f3-half$"
    ):
        await half.fetch(1, timeout=TIMEOUT)  # not an empty batch after the timeout: refused


async def test_a_control_plane_request_it_may_not_send_is_refused(agent: JetStream) -> None:
    with pytest.raises(Refused, match=r"publish to mesh\.cp\.flow_apply\.admin"):
        await agent.request("mesh.cp.flow_apply.admin", b"{}", timeout=TIMEOUT)
    with pytest.raises(Refused, match=r"publish to mesh\.cp\.register\.crm-agent"):
        await agent.request("mesh.cp.register.crm-agent", b"{}", timeout=TIMEOUT)


async def test_its_own_assignment_key_only(agent: JetStream, admin: JetStream) -> None:
    bucket = await admin.key_value("mesh_assign", direct=True)
    rev = await bucket.put("agent.erp-agent", b"mine")
    await bucket.put("agent.crm-agent", b"theirs")
    own = await agent.read_key("mesh_assign", "agent.erp-agent")
    assert own is not None
    assert (own.value, own.revision) == (b"mine", rev)
    with pytest.raises(
        Refused,
        match=r"publish to \$JS\.API\.DIRECT\.GET\.KV_mesh_assign\.\$KV\.mesh_assign\.agent\.crm-agent",
    ):
        await agent.read_key("mesh_assign", "agent.crm-agent")
    async with await agent.subscribe("$KV.mesh_assign.agent.erp-agent") as sub:
        refused = r"^permission denied: subscribe to \$KV\.mesh_assign\.agent\.crm-agent$"
        with pytest.raises(Refused, match=refused):
            await agent.subscribe("$KV.mesh_assign.agent.crm-agent")
        await bucket.put("agent.erp-agent", b"changed")
        got = await sub.next(timeout=TIMEOUT)
        assert got is not None
        assert got.data == b"changed"


async def test_serving_another_agents_commands_is_refused(agent: JetStream) -> None:
    async def answer(m: Message) -> bytes:
        return b"hijacked"

    with pytest.raises(Refused, match=r"^permission denied: subscribe to mesh\.cp\.agent\.crm-agent$"):
        await agent.serve("mesh.cp.agent.crm-agent", answer)


async def test_replies_need_the_agents_own_inbox(
    secured: NatsServer, admin: JetStream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESH_TEST_ERP_PW", "erp-pw")
    async with JetStream(_config(secured, "erp", "MESH_TEST_ERP_PW"), name="no-prefix") as js:
        with pytest.raises(Refused, match=r"permission denied: subscribe to _INBOX\."):
            await js.stream_info("MESH_EVENTS")
        with pytest.raises(Refused, match=r"permission denied: subscribe to _INBOX\."):
            await js.stream_info("MESH_EVENTS")  # and every later request, at once


async def test_a_refused_connect_is_one_clear_error(
    secured: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESH_TEST_BAD_PW", "wrong")
    js = JetStream(_config(secured, "erp", "MESH_TEST_BAD_PW"), name="intruder")
    with pytest.raises(TransportError) as caught:
        await js.connect()
    text = str(caught.value)
    assert "authorization violation" in text
    assert secured.url in text
    assert "\n" not in text
    assert not js.is_connected
    await js.aclose()
    with pytest.raises(TransportError, match=r"authorization violation .*an anonymous connection"):
        async with JetStream(NatsConfig(servers=[secured.url]), name="anonymous"):
            pass


# --- a rewritten creds file takes effect at reconnect() -------------------------------------------
# A minimal operator -> account -> user chain of our own (the JWT format nats-server reads), so this
# test needs nothing from mesh.security.


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(signer: nkeys.KeyPair, subject: str, name: str, nats_claims: dict[str, object]) -> str:
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    claims = {"iat": int(time.time()), "iss": signer.public_key.decode(), "name": name, "sub": subject,
              "nats": {**nats_claims, "version": 2}}  # fmt: skip
    claims["jti"] = (
        base64.b32encode(hashlib.sha256(json.dumps(claims).encode()).digest()).decode().rstrip("=")
    )
    body = _b64(json.dumps(claims).encode())
    signature = _b64(signer.sign(f"{header}.{body}".encode()))
    return f"{header}.{body}.{signature}"


def _keypair(prefix: int) -> nkeys.KeyPair:
    return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))


def _creds(jwt: str, seed: bytes) -> str:
    return (
        f"-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{seed.decode()}\n------END USER NKEY SEED------\n"
    )


async def test_reconnect_takes_a_rewritten_creds_file(tmp_path: Path) -> None:
    operator = _keypair(nkeys.PREFIX_BYTE_OPERATOR)
    account = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    user = _keypair(nkeys.PREFIX_BYTE_USER)
    op_pub, acc_pub, user_pub = (k.public_key.decode() for k in (operator, account, user))
    unlimited = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True,
                 "conn": -1, "leaf": -1}  # fmt: skip
    op_jwt = _jwt(operator, op_pub, "test-operator", {"type": "operator"})
    acc_jwt = _jwt(operator, acc_pub, "MESH", {"type": "account", "limits": unlimited})
    system = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    sys_pub = system.public_key.decode()
    sys_jwt = _jwt(operator, sys_pub, "SYS", {"type": "account", "limits": unlimited})

    def user_jwt(publish: list[str]) -> str:
        perms = {"pub": {"allow": publish}, "sub": {"allow": ["_INBOX.erp-agent.>"]}}
        return _jwt(
            account, user_pub, "erp-agent", {"type": "user", "subs": -1, "data": -1, "payload": -1, **perms}
        )

    store = tmp_path / "nats"
    store.mkdir()
    conf = tmp_path / "operator.conf"
    conf.write_text(
        f'server_name: jwt-test\njetstream {{ store_dir: "{store}" }}\noperator: {op_jwt}\n'
        f"system_account: {sys_pub}\nresolver: MEMORY\n"
        f"resolver_preload: {{ {acc_pub}: {acc_jwt}, {sys_pub}: {sys_jwt} }}\n"
    )
    creds = tmp_path / "erp-agent.creds"
    creds.write_text(_creds(user_jwt(["svc.a"]), user.seed))
    with NatsServer(store, config_file=conf) as server:
        cfg = NatsConfig(
            servers=[server.url], creds=str(creds), inbox_prefix="_INBOX.erp-agent", request_timeout=TIMEOUT
        )
        async with JetStream(cfg, name="erp-agent") as js:
            with pytest.raises(NoResponders):  # allowed: nobody serves it
                await js.request("svc.a", b"", timeout=TIMEOUT)
            with pytest.raises(Refused, match=r"^permission denied: publish to svc\.b$"):
                await js.request("svc.b", b"", timeout=TIMEOUT)
            creds.write_text(_creds(user_jwt(["svc.a", "svc.b"]), user.seed))  # same seed, new JWT
            await js.reconnect()
            with pytest.raises(NoResponders):  # allowed now
                await js.request("svc.b", b"", timeout=TIMEOUT)


async def test_the_control_channel_follows_its_assignment_with_agent_permissions(
    agent: JetStream, admin: JetStream, tmp_path: Path
) -> None:
    bucket = await admin.key_value("mesh_assign", direct=True)
    await bucket.put("agent.erp-agent", encode(Assignment(agent="erp-agent", updated_at=1.0)))
    save_credentials(
        tmp_path,
        Credentials(agent_id="a1", name="erp-agent", site="s", token="t" * 32, control_plane="x",
                    registered_at=0.0),
    )  # fmt: skip
    readiness = Readiness(["assignments"])
    seen: list[float | None] = []

    class Recording(FlowManager):
        async def sync(self, assignment: Assignment | None) -> None:
            seen.append(assignment.updated_at if assignment else None)
            await super().sync(assignment)

    async def connected() -> JetStream:
        return agent

    async def zero(flow: str) -> int:
        return 0

    async with Supervisor("auth") as sup:
        flows = Recording(
            "erp-agent", sup, lambda h: [], expire_inflight=lambda owner: None, outbox_depth=zero,
            state_dir=str(tmp_path),
        )  # fmt: skip
        channel = ControlChannel(
            "erp-agent", tmp_path, connected, flows, readiness=readiness, retry_every=0.2
        )
        await sup.start("assignments", channel.watch_assignments)
        with anyio.fail_after(TIMEOUT):
            await readiness.wait("assignments")
            assert seen == [1.0]
            await bucket.put("agent.erp-agent", encode(Assignment(agent="erp-agent", updated_at=2.0)))
            while seen[-1] != 2.0:
                await anyio.sleep(0.02)
            # Each change is read back by key; the agent converges on the last one.
            await bucket.delete("agent.erp-agent")
            while seen[-1] is not None:
                await anyio.sleep(0.02)
        assert seen == [1.0, 2.0, None]
        sup.cancel()
