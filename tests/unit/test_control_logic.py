"""Control logic on the in-memory transport, no broker: the KV mirror and the agent's command
channel."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import msgspec
import pytest

from agents.control import ControlChannel, command_subject
from agents.flows import FlowManager
from mesh.actors import Supervisor
from mesh.controlplane.kv import KvMirror, ensure_buckets
from mesh.controlplane.models import AGENTS_BUCKET, AgentCommand, CommandResult, encode
from mesh.readiness import Readiness
from mesh.transport import MemoryTransport, NoResponders

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


@pytest.fixture
async def transport() -> AsyncIterator[MemoryTransport]:
    async with MemoryTransport(name="unit") as t:
        yield t


async def until(check: object, timeout: float = 10) -> None:
    with anyio.fail_after(timeout):
        while not check():  # type: ignore[operator]
            await anyio.sleep(0.01)


async def test_kv_mirror_follows_the_bucket_and_reloads_after_a_reconnect(transport: MemoryTransport) -> None:
    buckets = await ensure_buckets(transport)
    agents = buckets[AGENTS_BUCKET]
    await agents.put("agent.a", b"1")
    mirror = KvMirror(transport, agents, resync_every=60)
    async with anyio.create_task_group() as tg:
        await tg.start(mirror.run)  # started once the first full copy is in
        assert {k: e.value for k, e in mirror.entries.items()} == {"agent.a": b"1"}
        await agents.put("agent.b", b"2")
        await agents.delete("agent.a")
        await until(lambda: set(mirror.entries) == {"agent.b"})
        transport.disconnect()
        transport.restore()
        await until(lambda: mirror.resyncs >= 1)  # a fresh watch after the reconnect
        await agents.put("agent.c", b"3")
        await until(lambda: set(mirror.entries) == {"agent.b", "agent.c"})
        tg.cancel_scope.cancel()


async def test_command_channel_answers_once_ready(transport: MemoryTransport, tmp_path: Path) -> None:
    readiness = Readiness(["commands"])

    async def connected() -> MemoryTransport:
        return transport

    async with Supervisor("unit") as sup:
        flows = FlowManager(
            "erp-agent", sup, lambda h: [],
            expire_inflight=lambda owner: None, outbox_depth=_zero, state_dir=str(tmp_path),
        )  # fmt: skip
        channel = ControlChannel("erp-agent", tmp_path, connected, flows, readiness=readiness)
        subject = command_subject("erp-agent")
        with pytest.raises(NoResponders):
            await transport.request(subject, b"{}", timeout=1)
        await sup.start("commands", channel.serve_commands)
        with anyio.fail_after(10):
            # The subscription is in place: a command sent now is answered. (The channel also
            # requires "assignments", which its other actor marks; not started here.)
            await readiness.wait("commands")
        reply = await transport.request(subject, encode(AgentCommand(op="pause", flow="nope")), timeout=5)
        result = msgspec.json.decode(reply.data, type=CommandResult)
        assert not result.ok
        assert "runs no flow named 'nope'" in result.message
        bad = msgspec.json.decode(
            (await transport.request(subject, b"not json", timeout=5)).data, type=CommandResult
        )
        assert not bad.ok
        assert "bad command" in bad.message
        sup.cancel()
    assert not readiness.ready


async def _zero(flow: str) -> int:
    return 0
