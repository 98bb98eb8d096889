"""Dead letters, flow replay and the audit tail on the in-memory transport: no broker at all.

The same code paths the CLI takes against JetStream (tests/integration/test_dlq.py), here on a
:class:`~mesh.transport.MemoryTransport`: list and filter, show, replay (deduplicated inside the
window, the entry deleted after the ack), purge, a flow's consumer moved back, the audit tail.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from mesh.config import StreamsConfig
from mesh.controlplane.audit import AuditLog, tail
from mesh.dlq import DeadLetters, DlqError, DlqFilter, ReplayOutcome, replay_flow, replay_msg_id
from mesh.envelope import DeadLetter, Envelope, encode, encode_payload
from mesh.errors import TransportError
from mesh.transport import DLQ_STREAM, EVENTS_STREAM, MemoryTransport, OutMessage

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

SUBJECT = "evt.customer.upserted.erp"


@pytest.fixture
async def transport() -> AsyncIterator[MemoryTransport]:
    async with MemoryTransport(name="unit") as t:
        await t.ensure_streams(StreamsConfig(storage="memory"))
        yield t


def envelope(key: str, version: int = 1) -> bytes:
    env = Envelope(
        id=f"e-{key}-{version}", kind="customer.upserted", flow="customers", key=key, version=version,
        origin="erp", occurred_at=0, payload=encode_payload({"id": key}),
    )  # fmt: skip
    return encode(env)


async def dead_letter(
    t: MemoryTransport, key: str, *, flow: str = "customers", reason: str = "CHECK failed"
) -> int:
    dl = DeadLetter(
        reason=reason, error_class="RejectedRecord", flow=flow, original_subject=SUBJECT,
        permanent=True, attempts=1, agent="crm-agent", original_msg_id=f"e-{key}-1",
    )  # fmt: skip
    msg = OutMessage(f"dlq.{flow}", envelope(key), f"dlq-{flow}-{key}", dl.to_headers())
    return await t.publish(msg)


async def test_list_show_replay_and_purge_dead_letters_without_a_broker(transport: MemoryTransport) -> None:
    dlq = DeadLetters(transport)
    assert [e async for e in dlq.scan()] == []
    seqs = [await dead_letter(transport, k) for k in ("1", "2")]
    await dead_letter(transport, "3", flow="orders", reason="no such product")

    listed = [e async for e in dlq.scan(DlqFilter(flow="customers"))]
    assert [(e.seq, e.flow, e.reason, e.original_subject) for e in listed] == [
        (seqs[0], "customers", "CHECK failed", SUBJECT),
        (seqs[1], "customers", "CHECK failed", SUBJECT),
    ]
    shown = await dlq.get(seqs[1])
    assert shown.envelope is not None
    assert (shown.envelope.key, shown.error_class, shown.attempts) == ("2", "RejectedRecord", 1)
    with pytest.raises(DlqError, match="no DLQ entry"):
        await dlq.get(99)

    report = await dlq.replay([shown], keep=True)
    assert (report.replayed, report.duplicates, report.failed) == (1, 0, 0)
    again = await dlq.replay([shown])  # the same msg id inside the window: stored once
    assert (again.replayed, again.duplicates, again.deleted) == (1, 1, 1)
    replayed = await transport.get_message(EVENTS_STREAM, subject=SUBJECT, last=True)
    assert replayed is not None
    assert replayed.data == shown.data
    assert replayed.headers["Nats-Msg-Id"] == replay_msg_id(seqs[1])
    assert replayed.headers["Mesh-Replay-Of"] == f"{DLQ_STREAM}:{seqs[1]}"
    assert "Mesh-Reason" not in replayed.headers
    assert (await transport.stream_info(EVENTS_STREAM)).messages == 1

    assert [e.seq async for e in dlq.scan()] == [seqs[0], seqs[1] + 1]
    assert await dlq.purge([e async for e in dlq.scan(DlqFilter(reason="check"))]) == 1
    assert [e.flow async for e in dlq.scan()] == ["orders"]
    assert await dlq.bounds() == (seqs[1] + 1, seqs[1] + 1, 1)


async def test_replay_outcome_of_an_entry_with_no_original_subject_is_skipped(
    transport: MemoryTransport,
) -> None:
    await transport.publish(OutMessage("dlq.customers", b"garbage", "stray", {}))
    dlq = DeadLetters(transport)
    [entry] = [e async for e in dlq.scan()]
    assert entry.decode_error
    assert await dlq.replay_one(entry) is ReplayOutcome.SKIPPED


async def test_flow_replay_moves_the_consumer_back(transport: MemoryTransport) -> None:
    consumer = await transport.pull_consumer(
        durable="customers-crm", filter_subject="evt.customer.>", ack_wait=30, max_deliver=5,
        max_ack_pending=100,
    )  # fmt: skip
    for v in (1, 2, 3):
        await transport.publish(OutMessage(SUBJECT, envelope("7", v), f"e-7-{v}"))
    for d in await consumer.fetch(10, timeout=1):
        await d.ack()

    forward = await replay_flow(transport, "customers", from_seq=5)
    assert not forward.reset
    assert "nothing changed" in forward.note
    done = await replay_flow(transport, "customers", sink_system="crm", from_seq=2)
    assert (done.consumer, done.reset, done.from_seq, done.pending, done.stream_last_seq) == (
        "customers-crm", True, 2, 2, 3,
    )  # fmt: skip
    assert [d.stream_seq for d in await consumer.fetch(10, timeout=1)] == [2, 3]
    with pytest.raises(DlqError, match="no consumer customers-erp"):
        await replay_flow(transport, "customers", sink_system="erp", from_seq=1)
    with pytest.raises(DlqError, match="no consumer for flow 'orders'"):
        await replay_flow(transport, "orders", from_seq=1)


async def test_audit_tail_gives_the_last_entries_then_follows(transport: MemoryTransport) -> None:
    log = AuditLog(transport, "cp-1")
    for i in range(5):
        await log.append("register" if i % 2 == 0 else "revoke", who="alice", target=f"agent-{i}", what="x")
    last3 = [r async for r in tail(transport, last=3)]
    assert [(r.seq, r.entry.target) for r in last3] == [(3, "agent-2"), (4, "agent-3"), (5, "agent-4")]
    revokes = [r async for r in tail(transport, last=5, kind="revoke")]
    assert [r.entry.target for r in revokes] == ["agent-1", "agent-3"]

    followed: list[str] = []
    caught_up = anyio.Event()
    async with anyio.create_task_group() as tg:

        async def follow() -> None:
            async for r in tail(transport, last=1, follow=True):
                followed.append(r.entry.target)
                caught_up.set()
                if len(followed) == 2:
                    tg.cancel_scope.cancel()

        tg.start_soon(follow)
        with anyio.fail_after(10):
            await caught_up.wait()
        await log.append("register", who="bob", target="agent-new", what="x")
    assert followed == ["agent-4", "agent-new"]


async def test_audit_tail_without_the_stream_says_so() -> None:
    async with MemoryTransport(name="empty") as t:
        with pytest.raises(TransportError, match="does not exist"):
            [r async for r in tail(t)]
