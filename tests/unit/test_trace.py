"""mesh.trace without a broker: status derivation, the transaction index, the recorder (batching,
sampling, bounded buffer), the record points of capture and apply, and the echo link."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from agents.delivery import Apply, Capture, FlowPlan
from mesh.adapters import Applied, Change, ChangeBatch
from mesh.config import StreamsConfig, TraceConfig, parse_agent_config
from mesh.errors import ConfigError, RejectedRecord
from mesh.metrics import Metrics
from mesh.store import Inbox
from mesh.trace import (
    CauseLinks,
    TraceRecord,
    TraceRecorder,
    TxnIndex,
    child_traceparent,
    decode_batch,
    derive_status,
    new_traceparent,
    record,
    use_recorder,
)
from mesh.transport import TRACE_STREAM, MemoryTransport, Transport
from tests.unit.test_delivery import ScriptedSink, envelope, event, flow, until

pytestmark = pytest.mark.anyio


def r(kind: str, at: int, **kw: Any) -> TraceRecord:
    kw.setdefault("agent", "a")
    kw.setdefault("correlation_id", "c1")
    return TraceRecord(kind=kind, at=at, **kw)  # type: ignore[arg-type]


# --- status ---------------------------------------------------------------------------------------


def test_status_follows_the_records() -> None:
    captured = r("captured", 1, envelope_id="e1", system="erp")
    published = r("published", 2, envelope_id="e1", system="erp")
    applied = r("applied", 3, envelope_id="e1", system="crm", outcome="applied")
    dead = r("dead_lettered", 4, envelope_id="e1", system="fin", detail="HTTP 400")
    assert derive_status([]) == ("in_progress", "")
    assert derive_status([captured]) == ("in_progress", "")
    assert derive_status([captured, published]) == ("in_progress", "")
    assert derive_status([captured, published, applied]) == ("completed", "")
    status, reason = derive_status([captured, published, applied, dead])
    assert status == "failed"
    assert "e1 dead-lettered: HTTP 400" in reason
    replayed = r("applied", 5, envelope_id="e1", system="fin", outcome="applied")
    assert derive_status([captured, published, applied, dead, replayed]) == ("completed", "")
    # an echo suppressed by the sink still ends the envelope's journey
    echo = r("applied", 3, envelope_id="e1", system="erp", outcome="not_owner")
    assert derive_status([captured, published, echo])[0] == "completed"


def test_sagas_and_api_calls_decide_too() -> None:
    started = r("saga_step", 1, outcome="saga_started", detail="quote-to-cash")
    step = r("saga_step", 2, outcome="completed", detail="create order")
    assert derive_status([started, step]) == ("in_progress", "")
    assert derive_status([started, step, r("saga_step", 3, outcome="saga_completed")]) == ("completed", "")
    compensated = r("saga_step", 4, outcome="saga_compensated", detail="invoice refused")
    assert derive_status([started, step, compensated]) == ("compensated", "invoice refused")
    assert derive_status([started, r("saga_step", 3, outcome="saga_failed", detail="x")]) == ("failed", "x")
    call = r("api_call", 1, outcome="started", detail="api.erp.sales_order.create")
    assert derive_status([call])[0] == "in_progress"
    assert derive_status([call, r("api_call", 2, outcome="ok")])[0] == "completed"
    assert derive_status([r("api_call", 2, outcome="unavailable")])[0] == "completed"  # retryable
    rejected = r("api_call", 2, outcome="rejected", detail="api.finance.invoice.create")
    assert derive_status([rejected]) == ("failed", "api.finance.invoice.create: rejected")
    # a repeated key answered from the first call's result is a success; a deadline a retry may meet
    replayed = r("api_call", 3, outcome="replayed", detail="api.erp.sales_order.create")
    assert derive_status([call, replayed])[0] == "completed"
    late = r("api_call", 2, outcome="deadline_exceeded", detail="api.erp.sales_order.create")
    assert derive_status([call, late, r("api_call", 3, outcome="started"), replayed])[0] == "completed"
    # a refused call whose saga compensated: the transaction is compensated, not failed
    assert derive_status([started, call, rejected, compensated])[0] == "compensated"


def test_a_saga_trigger_is_consumed_by_its_saga() -> None:
    """A captured event no sink applies but a saga started from: the saga's ``applied`` record
    (outcome ``saga_started``, what mesh.saga.tracing records) ends the event's journey."""
    captured = r("captured", 1, envelope_id="e1", system="crm", business_key="deal:1")
    published = r("published", 2, envelope_id="e1", system="crm")
    taken = r("applied", 3, envelope_id="e1", system="orchestrator", flow="saga-q2c", outcome="saga_started")
    started = r("saga_step", 3, outcome="saga_started", envelope_id="q2c-1", system="orchestrator")
    done = r("saga_step", 9, outcome="saga_completed", envelope_id="q2c-1", system="orchestrator")
    assert derive_status([captured, published, started, done])[0] == "in_progress"
    assert derive_status([captured, published, taken, started])[0] == "in_progress"
    assert derive_status([captured, published, taken, started, done]) == ("completed", "")


# --- index ----------------------------------------------------------------------------------------


def test_the_index_finds_a_transaction_by_correlation_envelope_and_business_key() -> None:
    idx = TxnIndex()
    idx.add(r("applied", 30, envelope_id="e1", business_key="customer:7", system="crm", outcome="applied"))
    idx.add(r("captured", 10, envelope_id="e1", business_key="customer:7", system="erp"))
    idx.add(r("published", 20, envelope_id="e1", business_key="customer:7", system="erp"))
    idx.add(r("captured", 40, correlation_id="c2", envelope_id="e2", business_key="customer:7"))
    [txn] = idx.find("c1")
    assert [x.at for x in txn.records] == [10, 20, 30]  # time order, whatever the arrival order
    assert idx.find("e1") == [txn]
    assert [t.correlation_id for t in idx.find("customer:7")] == ["c1", "c2"]
    assert idx.find("customer:8") == []
    assert idx.counts() == {"in_progress": 1, "completed": 1, "failed": 0, "compensated": 0}
    assert [s.correlation_id for s in idx.list("in_progress")] == ["c2"]
    assert [s.correlation_id for s in idx.list(since_ms=35)] == ["c2"]
    summary = idx.list("completed")[0]
    assert (summary.systems, summary.business_keys, summary.records) == (["crm", "erp"], ["customer:7"], 3)


def test_a_record_for_another_agent_than_its_subject_is_refused() -> None:
    idx = TxnIndex()
    idx.add(r("applied", 1, agent="crm-agent"), subject_agent="erp-agent")
    assert idx.find("c1") == []
    assert idx.forged == 1


def test_the_index_is_bounded() -> None:
    idx = TxnIndex(max_transactions=3)
    for n in range(5):
        idx.add(r("captured", n, correlation_id=f"c{n}", envelope_id=f"e{n}", business_key=f"k:{n}"))
    assert list(idx.txns) == ["c2", "c3", "c4"]
    assert idx.find("e0") == []
    assert idx.find("k:1") == []
    assert "k:0" not in idx.by_key
    assert idx.counts() == {"in_progress": 3, "completed": 0, "failed": 0, "compensated": 0}


def test_counts_and_the_failed_list_follow_each_record() -> None:
    idx = TxnIndex()
    idx.add(r("captured", 1, envelope_id="e1"))
    idx.add(r("dead_lettered", 2, envelope_id="e1", detail="no"))
    idx.add(r("captured", 3, correlation_id="c2", envelope_id="e2"))
    idx.add(r("dead_lettered", 4, correlation_id="c2", envelope_id="e2", detail="no"))
    assert idx.counts()["failed"] == 2
    assert [s.correlation_id for s in idx.list("failed")] == ["c2", "c1"]
    assert [s.correlation_id for s in idx.list("failed", limit=1)] == ["c2"]
    idx.add(r("applied", 5, envelope_id="e1", outcome="applied"))  # c1 replayed from the DLQ
    assert idx.counts() == {"in_progress": 0, "completed": 1, "failed": 1, "compensated": 0}
    assert [s.correlation_id for s in idx.list("failed")] == ["c2"]


# --- recorder -------------------------------------------------------------------------------------


@pytest.fixture
async def transport() -> AsyncIterator[Transport]:
    async with MemoryTransport(name="unit") as t:
        await t.ensure_streams(StreamsConfig())
        yield t


def trace_messages(t: Transport) -> list[Any]:
    assert isinstance(t, MemoryTransport)
    return t.broker.streams[TRACE_STREAM].messages


async def test_records_are_published_in_one_message_per_kind(transport: Transport) -> None:
    rec = TraceRecorder("erp-agent", "erp")
    for n in range(500):
        rec.record("applied", correlation_id=f"c{n}", envelope_id=f"e{n}")
    rec.record("dead_lettered", correlation_id="c1", envelope_id="e1", detail="x" * 2000)
    assert await rec.flush(transport) == 501
    msgs = trace_messages(transport)
    assert [m.subject for m in msgs] == ["trace.erp-agent.applied", "trace.erp-agent.dead_lettered"]
    applied = decode_batch(msgs[0].data)
    assert len(applied) == 500
    assert applied[0].system == "erp"
    assert len(decode_batch(msgs[1].data)[0].detail) == 500  # bounded
    assert rec.buffer == []
    assert rec.published == 501


async def test_a_fast_agent_s_records_go_out_in_messages_under_max_payload(transport: Transport) -> None:
    # One message of 10,000 records (a 10,000 events/s drain) exceeded NATS's 1 MB max_payload:
    # it was refused over and over while max_buffer filled and new records were dropped.
    rec = TraceRecorder("erp-agent", "erp", cfg=TraceConfig(max_buffer=20_000))
    long = "k" * 200
    for n in range(10_001):
        rec.record(
            "applied", correlation_id=f"corr-{n}-{long}", envelope_id=f"env-{n}",
            business_key=f"customer:{long}", detail="x" * 600, traceparent=new_traceparent(),
        )  # fmt: skip
    assert await rec.flush(transport) == 10_001
    msgs = trace_messages(transport)
    assert len(msgs) > 1
    assert max(len(m.data) for m in msgs) < 1024 * 1024
    assert [r.envelope_id for m in msgs for r in decode_batch(m.data)] == [f"env-{n}" for n in range(10_001)]
    assert (rec.buffer, rec.published, rec.dropped) == ([], 10_001, 0)


async def test_a_busy_buffer_is_published_in_messages_under_the_broker_s_payload_limit(
    transport: Transport,
) -> None:
    # 0.2 s of a draining agent's records: one message would pass NATS's 1 MiB max_payload, be
    # refused for ever, and every later record would be dropped.
    rec = TraceRecorder("erp-agent", "erp", cfg=TraceConfig(max_buffer=20_000))
    for n in range(6000):
        rec.record("captured", correlation_id=f"c{n}", envelope_id=f"e{n}", detail="x" * 200)
    assert await rec.flush(transport) == 6000
    msgs = trace_messages(transport)
    assert len(msgs) > 1
    assert all(len(m.data) <= 256 * 1024 for m in msgs)
    got = [r.correlation_id for m in msgs for r in decode_batch(m.data)]
    assert got == [f"c{n}" for n in range(6000)]
    assert (rec.buffer, rec.published, rec.dropped) == ([], 6000, 0)


async def test_records_wait_in_memory_while_the_stream_is_missing() -> None:
    metrics = Metrics()
    rec = TraceRecorder("erp-agent", "erp", cfg=TraceConfig(max_buffer=3), counter=metrics.trace_records)
    for n in range(5):
        rec.record("captured", correlation_id=f"c{n}")
    assert (len(rec.buffer), rec.dropped) == (3, 2)
    async with MemoryTransport(name="unit") as t:  # no streams yet
        with pytest.raises(Exception, match="no stream"):
            await rec.flush(t)
        assert len(rec.buffer) == 3
        await t.ensure_streams(StreamsConfig())
        assert await rec.flush(t) == 3

    def count(outcome: str) -> float | None:
        return metrics.registry.get_sample_value("mesh_trace_records_total", {"outcome": outcome})

    assert (count("published"), count("dropped")) == (3, 2)


def test_records_added_a_batch_at_once_keep_the_buffer_bound() -> None:
    metrics = Metrics()
    rec = TraceRecorder("erp-agent", "erp", cfg=TraceConfig(max_buffer=5), counter=metrics.trace_records)
    rec.record("captured", correlation_id="c0")
    batch = [TraceRecord(kind="applied", at=n, agent="a", correlation_id=f"c{n}") for n in range(1, 7)]
    rec.extend(batch[:2])
    rec.extend([])
    rec.extend(batch[2:])  # room for two of these four
    assert [r.correlation_id for r in rec.buffer] == ["c0", "c1", "c2", "c3", "c4"]
    assert rec.dropped == 2
    assert metrics.registry.get_sample_value("mesh_trace_records_total", {"outcome": "dropped"}) == 2


async def test_the_recorder_runs_in_the_background(transport: Transport) -> None:
    async def connected() -> Transport:
        return transport

    rec = TraceRecorder("erp-agent", "erp", cfg=TraceConfig(flush_interval=0.01), transport=connected)
    async with anyio.create_task_group() as tg:
        await tg.start(rec.run)
        with use_recorder(rec):
            record("saga_step", correlation_id="c9", outcome="saga_started")  # what the saga engine calls
        await until(lambda: rec.published == 1)
        tg.cancel_scope.cancel()
    [msg] = trace_messages(transport)
    assert decode_batch(msg.data)[0].outcome == "saga_started"
    record("saga_step", correlation_id="c9")  # no current recorder: nothing, no error


def test_sampling_is_per_transaction_and_switchable() -> None:
    half = TraceRecorder("a", cfg=TraceConfig(sample=0.5))
    other = TraceRecorder("b", cfg=TraceConfig(sample=0.5))
    kept = [c for c in (f"corr-{n}" for n in range(2000)) if half.sampled(c)]
    assert 800 < len(kept) < 1200
    assert all(other.sampled(c) for c in kept)  # every agent keeps the same transactions
    off = TraceRecorder("a", cfg=TraceConfig(enabled=False))
    off.record("captured", correlation_id="c1")
    assert off.buffer == []


def test_traceparents() -> None:
    parent = new_traceparent()
    child = child_traceparent(parent)
    assert parent.split("-")[1] == child.split("-")[1]
    assert parent.split("-")[2] != child.split("-")[2]
    assert len(child_traceparent("garbage").split("-")[1]) == 32


def test_trace_config_and_retention_are_validated() -> None:
    base = '[agent]\nname = "a"\nsystem = "s"\nstate_dir = "/tmp/x"\n'
    extra = "[trace]\nsample = 0.25\n[streams.trace]\nmax_age = 3600\nmax_bytes = 1000\n"
    cfg = parse_agent_config(base + extra)
    assert cfg.trace.sample == 0.25
    assert cfg.trace.enabled
    assert (cfg.streams.trace.max_age, cfg.streams.trace.max_bytes) == (3600, 1000)
    assert StreamsConfig().trace.max_age == 7 * 24 * 3600
    with pytest.raises(ConfigError, match=r"trace\.sample"):
        parse_agent_config(base + "[trace]\nsample = 2\n")
    with pytest.raises(ConfigError, match=r"trace"):
        parse_agent_config(base + "[trace]\nsampel = 0.5\n")


# --- record points and the echo link ----------------------------------------------------------------


async def test_apply_records_outcomes_and_dead_letters_and_links_the_echo(
    transport: Transport, tmp_path: Path
) -> None:
    rec = TraceRecorder("crm-agent", "crm")
    links = CauseLinks(window=60)

    async def connected() -> Transport:
        return transport

    sink = ScriptedSink(lambda x: RejectedRecord("no") if x.key == "2" else Applied.APPLIED, [])
    plan = FlowPlan(flow(), agent="crm-agent", system="crm", tracer=rec, links=links)
    one, two = envelope("1", 5, origin="erp"), envelope("2", 5, origin="erp")
    one = msgspec.structs.replace(one, traceparent=new_traceparent())
    for env in (one, two):
        await transport.publish(event(env))
    async with Inbox(tmp_path / "inbox.db") as inbox, anyio.create_task_group() as tg:
        await tg.start(Apply(plan, inbox, connected, Metrics(), lambda: sink).run)
        await until(lambda: len(rec.buffer) == 2)
        tg.cancel_scope.cancel()
    by_kind = {x.kind: x for x in rec.buffer}
    assert by_kind["applied"].envelope_id == one.id
    assert by_kind["applied"].correlation_id == "corr-1"
    assert by_kind["applied"].business_key == "customer:1"
    assert by_kind["dead_lettered"].envelope_id == two.id
    assert by_kind["dead_lettered"].detail == "no"

    # The CRM then captures customer 1 again (its own trigger, or the echo of a two-way sync).
    capture = Capture(plan, None, Metrics(), lambda: None, outbox_max_bytes=1)  # type: ignore[arg-type]
    rec.buffer.clear()
    changes = [Change(key="1", version=9), Change(key="3", version=1)]
    items, _ = capture.envelopes(ChangeBatch(changes=changes, cursor="x"))
    echo, fresh = rec.buffer
    assert (echo.correlation_id, echo.causation_id) == ("corr-1", one.id)
    assert echo.traceparent.split("-")[1] == one.traceparent.split("-")[1]
    assert fresh.correlation_id == fresh.envelope_id  # unrelated: a new transaction
    assert fresh.causation_id == ""
    assert len(items) == 2


async def test_a_webhook_sender_s_transaction_is_carried_into_the_envelopes(tmp_path: Path) -> None:
    from tests.unit.test_webhook import event as hook_event
    from tests.unit.test_webhook import post, receiver

    parent = new_traceparent()
    sent = {"Mesh-Correlation-Id": "deal:42-won", "Mesh-Causation-Id": "crm-evt-9", "traceparent": parent}
    async with receiver(tmp_path) as (source, client, batches):
        assert (await post(client, source.url or "", hook_event(7, 3), headers=sent)).status_code == 200
        bad = {"Mesh-Correlation-Id": "has spaces; and <tags>", "traceparent": "00-nothex"}
        assert (await post(client, source.url or "", hook_event(8, 1), headers=bad)).status_code == 200
    seven, eight = [c for b in batches for c in b.changes]
    assert (seven.correlation_id, seven.causation_id) == ("deal:42-won", "crm-evt-9")
    assert seven.traceparent == parent
    assert (eight.correlation_id, eight.traceparent) == ("", "")  # invalid: ignored, a new transaction

    rec = TraceRecorder("hook-agent", "shop")
    plan = FlowPlan(flow(), agent="hook-agent", system="shop", tracer=rec, links=CauseLinks())
    capture = Capture(plan, None, Metrics(), lambda: None, outbox_max_bytes=1)  # type: ignore[arg-type]
    items, _ = capture.envelopes(ChangeBatch(changes=[seven, eight], cursor="x"))
    from mesh.envelope import decode

    env7, env8 = (decode(data) for _, _, data in items)
    assert (env7.correlation_id, env7.causation_id) == ("deal:42-won", "crm-evt-9")
    assert env7.traceparent.split("-")[1] == parent.split("-")[1]
    assert env7.traceparent != parent  # a child span
    assert env8.correlation_id == env8.id
    assert [x.correlation_id for x in rec.buffer] == ["deal:42-won", env8.id]


def test_records_of_one_millisecond_follow_the_journey() -> None:
    idx = TxnIndex()
    idx.add(r("applied", 5, envelope_id="e1"))
    idx.add(r("published", 5, envelope_id="e1"))
    idx.add(r("captured", 5, envelope_id="e1"))
    assert [x.kind for x in idx.find("c1")[0].records] == ["captured", "published", "applied"]


# --- HTTP ---------------------------------------------------------------------------------------


async def test_http_trace_routes() -> None:
    import httpx

    from mesh.controlplane.http import create_app
    from mesh.controlplane.txn import TxnTracker
    from tests.unit.test_cp_http import FakeSource

    class Source(FakeSource):
        txns = TxnTracker(MemoryTransport(name="unused"))

    source = Source()
    idx = source.txns.index
    idx.add(r("captured", 10, envelope_id="e1", business_key="customer:1"))
    idx.add(r("dead_lettered", 11, envelope_id="e1", detail="HTTP 400"))
    idx.add(r("captured", 12, correlation_id="c2", envelope_id="e2", business_key="customer:2"))
    app = create_app(source, token="t0ken")
    auth = {"Authorization": "Bearer t0ken"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://cp") as c:
        assert (await c.get("/trace/customer:1")).status_code == 401  # behind the token like /status
        one = (await c.get("/trace/customer:1", headers=auth)).json()
        [txn] = one["transactions"]
        assert (txn["correlation_id"], txn["status"]) == ("c1", "failed")
        assert [x["kind"] for x in txn["records"]] == ["captured", "dead_lettered"]
        assert (await c.get("/trace/e2", headers=auth)).json()["transactions"][0]["status"] == "in_progress"
        missing = await c.get("/trace/customer:9", headers=auth)
        assert missing.status_code == 404
        assert "customer:9" in missing.json()["error"]
        listed = (await c.get("/trace?status=failed", headers=auth)).json()["transactions"]
        assert [t["correlation_id"] for t in listed] == ["c1"]
        assert (await c.get("/trace?status=nope", headers=auth)).status_code == 400
        assert (await c.get("/trace?since=abc", headers=auth)).status_code == 400

    class Plain(FakeSource):
        pass

    app = create_app(Plain())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://cp") as c:
        assert (await c.get("/trace/x")).status_code == 404


def test_a_printed_record_is_one_line() -> None:
    from mesh.trace import format_record

    reason = 'HTTP 400:\n{"error":\r\n \x1b[31mbad}'
    line = format_record(r("dead_lettered", 0, system="fin", detail=reason))
    assert "\n" not in line
    assert "\x1b" not in line
    assert line.endswith('(HTTP 400: {"error": [31mbad})')


def test_meshctl_trace_usage_errors_are_one_line() -> None:
    from typer.testing import CliRunner

    from mesh.cli.main import app

    runner = CliRunner()
    for args, message in (
        (["trace"], "give a transaction ID"),
        (["trace", "--status", "lost"], "--status must be one of in_progress, completed, failed"),
        (["trace", "x", "--since", "yesterday"], "--since: 'yesterday' is neither"),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert message in result.output
        assert "Traceback" not in result.output


def test_completed_waits_for_every_expected_sink() -> None:
    def expected(entity: str, origin: str) -> frozenset[str]:
        consumers = {"customers-crm", "customers-finance", "back-erp"}
        return frozenset(c for c in consumers if entity == "customer" and not c.endswith(f"-{origin}"))

    captured = r("captured", 1, envelope_id="e1", system="erp", business_key="customer:1")
    crm = r("applied", 2, envelope_id="e1", system="crm", flow="customers", outcome="applied")
    fin = r("applied", 3, envelope_id="e1", system="finance", flow="customers", outcome="unchanged")
    assert derive_status([captured, crm]) == ("completed", "")  # no knowledge: one sink is enough
    assert derive_status([captured, crm], expected) == ("in_progress", "")
    assert derive_status([captured, crm, fin], expected) == ("completed", "")
    idx = TxnIndex(expected=expected)
    for x in (captured, crm):
        idx.add(x)
    assert idx.counts()["in_progress"] == 1
    idx.add(fin)
    assert idx.counts()["completed"] == 1


def test_cause_links_keep_only_watched_entities_within_the_window() -> None:
    now = [0.0]
    links = CauseLinks(window=60, max_entries=3, entities=set(), clock=lambda: now[0])
    links.remember("customer:1", "c1", "e1", "tp1", "customer")
    assert links.cause_of("customer:1") is None  # nothing captures customers here: not kept
    links.watch("customer")
    for i in range(1, 5):
        now[0] = float(i)
        links.remember(f"customer:{i}", f"c{i}", f"e{i}", f"tp{i}", "customer")
    assert links.cause_of("customer:1") is None  # the oldest beyond max_entries
    assert [links.cause_of(f"customer:{i}") is not None for i in (2, 3, 4)] == [True, True, True]
    now[0] = 63.5  # customer:2 (at 2.0) and customer:3 (at 3.0) are now older than the window
    links.remember("customer:9", "c9", "e9", "tp9", "customer")
    assert repr(links) == "<CauseLinks window=60s entries=2>"
    link = links.cause_of("customer:4")
    assert link is not None
    assert (link.correlation_id, link.envelope_id, link.traceparent) == ("c4", "e4", "tp4")
    now[0] = 64.5
    assert links.cause_of("customer:4") is None  # expired on lookup too
