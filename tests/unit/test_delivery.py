"""The delivery path's actors on the in-memory transport: no nats-server, real SQLite stores."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from agents.delivery import Apply, Capture, FlowPlan, Relay
from mesh.adapters import Applied, Change, ChangeBatch, Sink, SinkRecord, Source
from mesh.config import FlowConfig, RelayConfig, StreamsConfig, decode_flow
from mesh.envelope import DeadLetter, Envelope, decode, encode, encode_payload, envelope_id
from mesh.errors import RejectedRecord, SystemUnavailable
from mesh.logs import setup_logging
from mesh.metrics import Metrics
from mesh.store import Inbox, Outbox
from mesh.transport import DLQ_STREAM, EVENTS_STREAM, MemoryTransport, OutMessage, Transport

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


def flow(**extra: Any) -> FlowConfig:
    spec: dict[str, Any] = {
        "name": "customers",
        "entity": "customer",
        "source": {"adapter": "sqlite", "path": "unused.db", "table": "t", "key": "id", "batch_size": 2},
        "sink": {"adapter": "sqlite", "path": "unused.db", "table": "t", "key": "id"},
        "consumer": {"max_deliver": 3, "ack_wait": 30, "fetch_timeout": 0.1},
        "retry": {"initial_delay": 0.05, "max_delay": 0.05, "jitter": 0},
        **extra,
    }
    return decode_flow(spec)


class ListSource(Source):
    """Changes from a list; the cursor is the index after the last change returned."""

    def __init__(self, changes: Sequence[Change]) -> None:
        self.changes = list(changes)

    async def read(self, cursor: str | None, limit: int) -> ChangeBatch:
        start = int(cursor or 0)
        if start >= len(self.changes):
            await anyio.sleep_forever()  # blocks, cancellable: never an empty batch
        end = min(len(self.changes), start + limit)
        return ChangeBatch(changes=self.changes[start:end], cursor=str(end))

    async def aclose(self) -> None:
        pass


@dataclass
class ScriptedSink(Sink):
    """Answers each record with ``outcome(record)`` and remembers what it was asked."""

    outcome: Callable[[SinkRecord], Applied | Exception]
    seen: list[SinkRecord]

    async def apply(self, records: Sequence[SinkRecord]) -> list[Applied | Exception]:
        self.seen.extend(records)
        return [self.outcome(r) for r in records]

    async def aclose(self) -> None:
        pass


async def until(check: Callable[[], Any], timeout: float = 10) -> None:
    """Wait, bounded, until ``check()`` (sync or async) is true."""
    with anyio.fail_after(timeout):
        while True:
            got = check()
            if hasattr(got, "__await__"):
                got = await got
            if got:
                return
            await anyio.sleep(0.01)


def envelope(key: str, version: int, *, origin: str = "crm", row: dict[str, Any] | None = None) -> Envelope:
    eid = envelope_id("customers", origin, key, version)
    return Envelope(
        id=eid, kind="customer.upserted", flow="customers", key=key, version=version, origin=origin,
        occurred_at=1, correlation_id=f"corr-{key}", payload=encode_payload(row or {"id": key, "name": "A"}),
    )  # fmt: skip


def event(env: Envelope, msg_id: str | None = None) -> OutMessage:
    return OutMessage(f"evt.customer.upserted.{env.origin}", encode(env), msg_id or env.id)


@pytest.fixture
async def transport() -> AsyncIterator[Transport]:
    async with MemoryTransport(name="unit") as t:
        await t.ensure_streams(StreamsConfig())
        yield t


@pytest.fixture
async def inbox(tmp_path: Path) -> AsyncIterator[Inbox]:
    async with Inbox(tmp_path / "inbox.db") as ib:
        yield ib


def stream(t: Transport, name: str) -> list[Any]:
    assert isinstance(t, MemoryTransport)
    return t.broker.streams[name].messages


class ApplyRunner:
    def __init__(self, transport: Transport, inbox: Inbox, sink: ScriptedSink, cfg: FlowConfig | None = None):
        async def connected() -> Transport:
            return transport

        self.metrics = Metrics()
        self.plan = FlowPlan(cfg or flow(), agent="erp-agent", system="erp")
        self.apply = Apply(self.plan, inbox, connected, self.metrics, lambda: sink)

    def handled(self, outcome: str) -> float:
        return sample(self.metrics, "mesh_consumed_messages_total", flow="customers", outcome=outcome)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


# --- capture ----------------------------------------------------------------------------------------


async def test_capture_commits_cursor_and_envelopes_and_rereads_give_the_same_ids(tmp_path: Path) -> None:
    changes = [Change(key=str(i), version=i + 1, row={"id": i, "name": f"n{i}"}) for i in range(3)]
    plan = FlowPlan(flow(), agent="erp-agent", system="erp")
    async with Outbox(tmp_path / "outbox.db") as outbox:
        capture = Capture(plan, outbox, Metrics(), lambda: ListSource(changes), outbox_max_bytes=10**9)
        async with anyio.create_task_group() as tg:
            await tg.start(capture.run)
            await until(lambda: _eq(outbox.cursor("customers"), "3"))
            tg.cancel_scope.cancel()
        rows = await outbox.peek(10)
    ids = [r.id for r in rows]
    assert ids == [envelope_id("customers", "erp", str(i), i + 1) for i in range(3)]
    assert {r.subject for r in rows} == {"evt.customer.upserted.erp"}
    assert decode(rows[0].data).origin == "erp"
    # A re-read of the same changes (a crash before the commit) makes the same envelopes.
    again, dead = capture.envelopes(ChangeBatch(changes=changes, cursor="3"))
    assert [i for i, _, _ in again] == ids
    assert dead == {}


async def _eq(aw: Any, want: Any) -> bool:
    return bool(await aw == want)


# --- relay ------------------------------------------------------------------------------------------


async def test_relay_removes_only_acked_rows(tmp_path: Path, transport: Transport) -> None:
    async def connected() -> Transport:
        return transport

    metrics = Metrics()
    async with Outbox(tmp_path / "outbox.db") as outbox:
        await outbox.capture(
            "customers", "1", [("a", "evt.customer.upserted.erp", b"A"), ("b", "nowhere.stored", b"B")]
        )
        relay = Relay(outbox, connected, metrics, RelayConfig(batch_size=10), agent="erp-agent")
        async with anyio.create_task_group() as tg:
            await tg.start(relay.run)
            await until(lambda: sample(metrics, "mesh_publish_failures_total") >= 1)
            tg.cancel_scope.cancel()
        left = await outbox.peek(10)
    assert [r.id for r in left] == ["b"]  # no stream took it: it stays for the next round
    assert [m.data for m in stream(transport, EVENTS_STREAM)] == [b"A"]


# --- apply ------------------------------------------------------------------------------------------


async def test_apply_dedupes_through_the_inbox_and_acks(transport: Transport, inbox: Inbox) -> None:
    sink = ScriptedSink(lambda r: Applied.APPLIED, [])
    run = ApplyRunner(transport, inbox, sink)
    env = envelope("1", 1)
    await transport.publish(event(env))
    await transport.publish(event(env, msg_id="republished-after-the-window"))
    async with anyio.create_task_group() as tg:
        await tg.start(run.apply.run)
        await until(lambda: run.handled("applied") + run.handled("duplicate") == 2)
        tg.cancel_scope.cancel()
    assert [r.id for r in sink.seen] == [env.id]
    assert await inbox.seen([env.id]) == {env.id}
    consumer = await transport.pull_consumer(
        durable=run.plan.durable, filter_subject="evt.customer.>", ack_wait=30, max_deliver=3,
        max_ack_pending=100,
    )  # fmt: skip
    assert await consumer.pending() == 0


async def test_stale_and_unchanged_are_recorded_and_acked(transport: Transport, inbox: Inbox) -> None:
    answers = {"1": Applied.STALE, "2": Applied.UNCHANGED}
    sink = ScriptedSink(lambda r: answers[r.key], [])
    run = ApplyRunner(transport, inbox, sink)
    for key in answers:
        await transport.publish(event(envelope(key, 5)))
    async with anyio.create_task_group() as tg:
        await tg.start(run.apply.run)
        await until(lambda: run.handled("stale") == 1 and run.handled("unchanged") == 1)
        tg.cancel_scope.cancel()
    ids = [envelope(k, 5).id for k in answers]
    assert await inbox.seen(ids) == set(ids)


async def test_a_malformed_message_is_dead_lettered_with_its_reason_then_termed(
    transport: Transport, inbox: Inbox
) -> None:
    sink = ScriptedSink(lambda r: Applied.APPLIED, [])
    run = ApplyRunner(transport, inbox, sink)
    seq = await transport.publish(OutMessage("evt.customer.upserted.crm", b"\xc1garbage", "bad-1"))
    async with anyio.create_task_group() as tg:
        await tg.start(run.apply.run)
        await until(lambda: len(stream(transport, DLQ_STREAM)) == 1)
        tg.cancel_scope.cancel()
    [dead] = stream(transport, DLQ_STREAM)
    letter = DeadLetter.from_headers(dead.headers)
    assert dead.subject == "dlq.customers"
    assert dead.data == b"\xc1garbage"
    assert letter.error_class == "DecodeError"
    assert "not a valid envelope" in letter.reason
    assert (letter.permanent, letter.attempts, letter.stage) == (True, 1, "apply")
    assert (letter.flow, letter.agent) == ("customers", "erp-agent")
    assert (letter.original_subject, letter.original_stream_seq, letter.original_msg_id) == (
        "evt.customer.upserted.crm", seq, "bad-1",
    )  # fmt: skip
    assert sink.seen == []
    state = transport.broker.streams[EVENTS_STREAM].consumers[run.plan.durable]  # type: ignore[attr-defined]
    assert state.unsettled == {}  # termed: never delivered again


async def test_a_retryable_error_is_nakked_with_backoff_then_dead_lettered_at_max_deliver(
    transport: Transport, inbox: Inbox
) -> None:
    sink = ScriptedSink(lambda r: SystemUnavailable("erp is down"), [])
    run = ApplyRunner(transport, inbox, sink)
    env = envelope("1", 1)
    await transport.publish(event(env))
    async with anyio.create_task_group() as tg:
        await tg.start(run.apply.run)
        await until(lambda: len(stream(transport, DLQ_STREAM)) == 1)
        tg.cancel_scope.cancel()
    assert len(sink.seen) == 3  # max_deliver
    assert sample(run.metrics, "mesh_retried_messages_total", flow="customers") == 2
    letter = DeadLetter.from_headers(stream(transport, DLQ_STREAM)[0].headers)
    assert (letter.error_class, letter.permanent, letter.attempts) == ("SystemUnavailable", False, 3)
    assert await inbox.seen([env.id]) == set()  # not recorded: a replay must still apply


async def test_a_rejected_record_is_dead_lettered_at_once(transport: Transport, inbox: Inbox) -> None:
    sink = ScriptedSink(lambda r: RejectedRecord("CHECK failed") if r.key == "1" else Applied.APPLIED, [])
    run = ApplyRunner(transport, inbox, sink)
    await transport.publish(event(envelope("1", 1)))
    await transport.publish(event(envelope("2", 1)))
    async with anyio.create_task_group() as tg:
        await tg.start(run.apply.run)
        await until(lambda: len(stream(transport, DLQ_STREAM)) == 1 and run.handled("applied") == 1)
        tg.cancel_scope.cancel()
    assert [r.key for r in sink.seen] == ["1", "2"]
    assert DeadLetter.from_headers(stream(transport, DLQ_STREAM)[0].headers).attempts == 1


async def test_own_origin_events_are_never_applied(transport: Transport, inbox: Inbox) -> None:
    sink = ScriptedSink(lambda r: Applied.APPLIED, [])
    run = ApplyRunner(transport, inbox, sink)
    own, other = envelope("1", 1, origin="erp"), envelope("2", 1, origin="crm")
    await transport.publish(event(own))
    await transport.publish(event(other))
    async with anyio.create_task_group() as tg:
        await tg.start(run.apply.run)
        await until(lambda: run.handled("echo") == 1 and run.handled("applied") == 1)
        tg.cancel_scope.cancel()
    assert [r.id for r in sink.seen] == [other.id]  # I7
    assert await inbox.seen([own.id]) == {own.id}


async def test_ownership_drops_fields_and_deletes_of_non_owners(transport: Transport, inbox: Inbox) -> None:
    cfg = flow(
        ownership={"system_of_record": "erp", "default_owner": "erp", "fields": {"contact.email": "crm"}}
    )
    sink = ScriptedSink(lambda r: Applied.APPLIED, [])
    run = ApplyRunner(transport, inbox, sink, cfg)
    row = {"id": "1", "name": "Crm Name", "contact": {"email": "a@b.example"}}
    await transport.publish(event(envelope("1", 1, row=row)))
    gone = msgspec.structs.replace(
        envelope("2", 1), kind="customer.deleted", payload=encode_payload({"id": "2"})
    )
    await transport.publish(OutMessage("evt.customer.deleted.crm", encode(gone), gone.id))
    async with anyio.create_task_group() as tg:
        await tg.start(run.apply.run)
        await until(lambda: run.handled("applied") == 1 and run.handled("not_owner") == 1)
        tg.cancel_scope.cancel()
    [record] = sink.seen
    assert "name" not in record.row  # crm does not own it
    assert record.row["contact"] == {"email": "a@b.example"}
    assert (record.create, record.scope) == (False, "crm")
    assert sample(run.metrics, "mesh_ownership_dropped_fields_total", flow="customers", origin="crm") >= 1


# --- log context ------------------------------------------------------------------------------------


async def test_log_lines_about_a_message_carry_agent_flow_and_correlation_id(
    transport: Transport, inbox: Inbox
) -> None:
    out = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    setup_logging("info", stream=out, fmt="json")
    try:
        sink = ScriptedSink(lambda r: RejectedRecord("refused"), [])
        run = ApplyRunner(transport, inbox, sink)
        await transport.publish(event(envelope("7", 1)))
        async with anyio.create_task_group() as tg:
            await tg.start(run.apply.run)
            await until(lambda: len(stream(transport, DLQ_STREAM)) == 1)
            tg.cancel_scope.cancel()
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    [dead] = [line for line in lines if "dead-lettering" in line["msg"]]
    assert (dead["agent"], dead["flow"], dead["correlation_id"]) == ("erp-agent", "customers", "corr-7")
    consuming = next(line for line in lines if "consuming as" in line["msg"])
    assert (consuming["agent"], consuming["flow"]) == ("erp-agent", "customers")
    assert "correlation_id" not in consuming  # only lines about one message carry it
