"""The transport against a nats-server that enforces permissions (static users, the same
subject rules the agents' JWTs carry): a refused publish, request, JetStream API call or
subscription raises Refused naming the subject at once (not a request timeout), and a refused
connect is one clear TransportError."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from mesh.broker import NatsServer
from mesh.config import NatsConfig, StreamsConfig
from mesh.errors import TransportError
from mesh.transport import DLQ_STREAM, JetStream, Message, OutMessage, Refused

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
        await js.key_value("mesh_assign", memory=True)
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


async def test_a_control_plane_request_it_may_not_send_is_refused(agent: JetStream) -> None:
    with pytest.raises(Refused, match=r"publish to mesh\.cp\.flow_apply\.admin"):
        await agent.request("mesh.cp.flow_apply.admin", b"{}", timeout=TIMEOUT)
    with pytest.raises(Refused, match=r"publish to mesh\.cp\.register\.crm-agent"):
        await agent.request("mesh.cp.register.crm-agent", b"{}", timeout=TIMEOUT)


async def test_its_own_assignment_key_only(agent: JetStream, admin: JetStream) -> None:
    bucket = await admin.key_value("mesh_assign")
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
