"""Control logic on the in-memory transport, no broker: the KV mirror and the agent's command
channel."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from agents.control import ControlChannel, command_subject
from agents.flows import FlowManager
from mesh.actors import Supervisor
from mesh.controlplane.identity import Credentials, save_credentials
from mesh.controlplane.kv import KvMirror, ensure_buckets
from mesh.controlplane.models import (
    AGENTS_BUCKET,
    ASSIGN_BUCKET,
    AgentCommand,
    Assignment,
    CommandResult,
    encode,
)
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


class _RecordingFlows(FlowManager):
    """The real manager, remembering every assignment it is handed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[Assignment | None] = []

    async def sync(self, assignment: Assignment | None) -> None:
        self.seen.append(assignment)
        await super().sync(assignment)


async def test_assignment_is_read_by_key_and_followed_by_its_subject(
    transport: MemoryTransport, tmp_path: Path
) -> None:
    buckets = await ensure_buckets(transport)
    assign = buckets[ASSIGN_BUCKET]
    save_credentials(
        tmp_path,
        Credentials(agent_id="a1", name="erp-agent", site="s", token="t" * 32, control_plane="mem",
                    registered_at=0.0),
    )  # fmt: skip
    await assign.put("agent.erp-agent", encode(Assignment(agent="erp-agent", updated_at=1.0)))
    await assign.put("agent.crm-agent", encode(Assignment(agent="crm-agent", updated_at=9.0)))
    readiness = Readiness(["assignments"])

    async def connected() -> MemoryTransport:
        return transport

    async with Supervisor("unit") as sup:
        flows = _RecordingFlows(
            "erp-agent", sup, lambda h: [],
            expire_inflight=lambda owner: None, outbox_depth=_zero, state_dir=str(tmp_path),
        )  # fmt: skip
        channel = ControlChannel(
            "erp-agent", tmp_path, connected, flows, readiness=readiness, resync_every=60, retry_every=0.1
        )
        await sup.start("assignments", channel.watch_assignments)
        with anyio.fail_after(10):
            await readiness.wait("assignments")
        assert [a.updated_at if a else None for a in flows.seen] == [1.0]  # its own key only
        await assign.put("agent.crm-agent", encode(Assignment(agent="crm-agent", updated_at=10.0)))
        await assign.put("agent.erp-agent", encode(Assignment(agent="erp-agent", updated_at=2.0)))
        await until(lambda: len(flows.seen) == 2)
        await assign.delete("agent.erp-agent")
        await until(lambda: len(flows.seen) == 3)
        assert [a.updated_at if a else None for a in flows.seen] == [1.0, 2.0, None]
        # A change published while the connection was away is missed by the subscription;
        # the read after the reconnect catches up.
        transport.disconnect()
        transport.broker.buckets[ASSIGN_BUCKET].store(
            "agent.erp-agent", encode(Assignment(agent="erp-agent", updated_at=3.0))
        )
        transport.restore()
        await until(lambda: len(flows.seen) >= 4)
        assert flows.seen[-1] is not None
        assert flows.seen[-1].updated_at == 3.0
        sup.cancel()
