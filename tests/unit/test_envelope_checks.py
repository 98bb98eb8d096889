"""The sink side's envelope checks (issue 10): an envelope that contradicts its subject or its flow,
or whose version no source could have produced, is dead-lettered before the inbox, the sink and
the version guard see it, and the flow keeps going. In-memory transport, real SQLite inbox."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from mesh.adapters import Applied, SinkRecord
from mesh.config import ConsumerConfig, StreamsConfig
from mesh.envelope import DeadLetter, Envelope, encode, envelope_id
from mesh.errors import InvalidEnvelope, PermanentError
from mesh.store import Inbox
from mesh.transport import DLQ_STREAM, EVENTS_STREAM, MemoryTransport, OutMessage, Transport
from tests.unit.test_delivery import ApplyRunner, ScriptedSink, envelope, event, flow, stream, until

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


@pytest.fixture
async def transport() -> AsyncIterator[Transport]:
    async with MemoryTransport(name="unit") as t:
        await t.ensure_streams(StreamsConfig())
        yield t


@pytest.fixture
async def inbox(tmp_path: Path) -> AsyncIterator[Inbox]:
    async with Inbox(tmp_path / "inbox.db") as ib:
        yield ib


def forged(key: str, version: int, **fields: Any) -> Envelope:
    """An envelope from "crm" for ``key``, with ``fields`` replaced (the id follows origin)."""
    env = msgspec.structs.replace(envelope(key, version), **fields)
    return msgspec.structs.replace(env, id=envelope_id("customers", env.origin, key, version))


def now_us() -> int:
    return time.time_ns() // 1000


HOUR_AHEAD = 3600 * 1_000_000

# (what is wrong, subject, envelope, words the reason must contain)
CASES: list[tuple[str, str, Envelope, tuple[str, ...]]] = [
    ("origin differs from the subject's", "evt.customer.upserted.billing", forged("k", 3),
     ("origin", "'crm'", "'billing'")),
    ("claims another system to dodge I7", "evt.customer.upserted.erp", forged("k", 3),
     ("origin", "'crm'", "'erp'")),
    ("kind's event differs from the subject's", "evt.customer.upserted.crm",
     forged("k", 3, kind="customer.deleted"), ("kind", "'customer.deleted'", "customer.upserted")),
    ("kind of another entity", "evt.customer.upserted.crm", forged("k", 3, kind="invoice.upserted"),
     ("kind", "'invoice.upserted'", "customer.upserted")),
    ("an event that is no row change", "evt.customer.merged.crm", forged("k", 3, kind="customer.merged"),
     ("subject event", "'merged'", "upserted")),
    ("a subject with an extra token", "evt.customer.upserted.crm.x", forged("k", 3),
     ("subject", "evt.customer.upserted.crm.x")),
    ("version 0", "evt.customer.upserted.crm", forged("k", 0), ("version", "0", ">= 1")),
    ("a negative version", "evt.customer.upserted.crm", forged("k", -5), ("version", "-5", ">= 1")),
    ("version 2**62", "evt.customer.upserted.crm", forged("k", 2**62),
     ("version", str(2**62), "max_version_skew 86400s")),
]  # fmt: skip


@pytest.mark.parametrize(("case", "subject", "bad", "words"), CASES, ids=[c[0] for c in CASES])
async def test_an_invalid_envelope_is_dead_lettered_before_inbox_and_sink_and_the_flow_goes_on(
    transport: Transport, inbox: Inbox, case: str, subject: str, bad: Envelope, words: tuple[str, ...]
) -> None:
    sink = ScriptedSink(lambda r: Applied.APPLIED, [])
    run = ApplyRunner(transport, inbox, sink)
    seq = await transport.publish(OutMessage(subject, encode(bad), bad.id))
    good = envelope("k", 2)  # same key, lower version than the forged one: must still apply
    await transport.publish(event(good))
    async with anyio.create_task_group() as tg:
        await tg.start(run.apply.run)
        await until(lambda: len(stream(transport, DLQ_STREAM)) == 1 and run.handled("applied") == 1)
        tg.cancel_scope.cancel()
    [dead] = stream(transport, DLQ_STREAM)
    letter = DeadLetter.from_headers(dead.headers)
    assert (letter.error_class, letter.permanent, letter.attempts, letter.stage) == (
        "InvalidEnvelope", True, 1, "apply",
    )  # fmt: skip
    for word in words:
        assert word in letter.reason, (word, letter.reason)
    assert (letter.original_subject, letter.original_stream_seq) == (subject, seq)
    assert dead.data == encode(bad)
    assert [(r.id, r.version) for r in sink.seen] == [(good.id, 2)]  # the forged one never reached it
    assert await inbox.seen([bad.id, good.id]) == {good.id}
    state = transport.broker.streams[EVENTS_STREAM].consumers[run.plan.durable]  # type: ignore[attr-defined]
    assert state.unsettled == {}  # termed: never delivered again


async def test_a_huge_version_does_not_lock_the_key_against_later_changes(
    transport: Transport, inbox: Inbox
) -> None:
    """The attack of issue 10: version 2**62 first, then the real changes of that key."""
    latest: dict[str, int] = {}

    def guard(r: SinkRecord) -> Applied:  # a version guard, as the real sinks keep one
        if r.version <= latest.get(r.key, 0):
            return Applied.STALE
        latest[r.key] = r.version
        return Applied.APPLIED

    sink = ScriptedSink(guard, [])
    run = ApplyRunner(transport, inbox, sink)
    bad = forged("7", 2**62)
    await transport.publish(OutMessage("evt.customer.upserted.crm", encode(bad), bad.id))
    for version in (1, 2):
        await transport.publish(event(envelope("7", version)))
    async with anyio.create_task_group() as tg:
        await tg.start(run.apply.run)
        await until(lambda: len(stream(transport, DLQ_STREAM)) == 1 and run.handled("applied") == 2)
        tg.cancel_scope.cancel()
    assert latest == {"7": 2}
    assert run.handled("stale") == 0


async def test_max_version_skew_bounds_versions_from_now(transport: Transport, inbox: Inbox) -> None:
    sink = ScriptedSink(lambda r: Applied.APPLIED, [])
    cfg = flow(consumer={"max_deliver": 3, "fetch_timeout": 0.1, "max_version_skew": 60})
    run = ApplyRunner(transport, inbox, sink, cfg)
    now = now_us()
    ahead, current = forged("1", now + HOUR_AHEAD), envelope("2", now)  # epoch-µs versions
    await transport.publish(event(ahead))
    await transport.publish(event(current))
    async with anyio.create_task_group() as tg:
        await tg.start(run.apply.run)
        await until(lambda: len(stream(transport, DLQ_STREAM)) == 1 and run.handled("applied") == 1)
        tg.cancel_scope.cancel()
    assert [r.key for r in sink.seen] == ["2"]
    reason = DeadLetter.from_headers(stream(transport, DLQ_STREAM)[0].headers).reason
    assert str(now + HOUR_AHEAD) in reason
    assert "max_version_skew 60s" in reason


async def test_an_invalid_envelope_is_never_retried_whatever_the_retry_policy(
    transport: Transport, inbox: Inbox
) -> None:
    sink = ScriptedSink(lambda r: Applied.APPLIED, [])
    cfg = flow(retry={"initial_delay": 0.05, "jitter": 0, "errors": {"PermanentError": "retry"}})
    run = ApplyRunner(transport, inbox, sink, cfg)
    bad = forged("1", 0)
    await transport.publish(event(bad))
    async with anyio.create_task_group() as tg:
        await tg.start(run.apply.run)
        await until(lambda: len(stream(transport, DLQ_STREAM)) == 1)
        tg.cancel_scope.cancel()
    assert DeadLetter.from_headers(stream(transport, DLQ_STREAM)[0].headers).attempts == 1
    assert sink.seen == []


def test_invalid_envelope_is_permanent_and_names_field_and_both_values() -> None:
    exc = InvalidEnvelope("origin", "crm", "'erp'")
    assert isinstance(exc, PermanentError)
    assert (exc.field, exc.got, exc.expected) == ("origin", "crm", "'erp'")
    assert str(exc) == "envelope origin 'crm': expected 'erp'"


def test_max_version_skew_defaults_to_a_day_and_must_be_positive() -> None:
    assert ConsumerConfig().max_version_skew == 86400
    assert msgspec.convert({"max_version_skew": 5}, ConsumerConfig).max_version_skew == 5
    for bad in (0, -1):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert({"max_version_skew": bad}, ConsumerConfig)
