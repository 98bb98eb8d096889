"""Parent before child: a target's foreign-key refusal is IntegrityPending, retried on the flow's
``retry.integrity_retry`` budget and only then dead-lettered (real SQLite files, memory transport)."""

from __future__ import annotations

import itertools
import sqlite3
from contextlib import closing
from pathlib import Path

import anyio
import pytest

from adapters.sql.config import SqliteSinkConfig
from adapters.sql.sqlite import SqliteSink
from mesh.adapters import Applied, SinkRecord
from mesh.config import RetryConfig
from mesh.envelope import DeadLetter
from mesh.errors import IntegrityPending, RejectedRecord, RetryableError
from mesh.store import Inbox
from mesh.transport import DLQ_STREAM, Transport
from tests.unit.test_delivery import (
    ApplyRunner,
    ScriptedSink,
    envelope,
    event,
    flow,
    inbox,
    stream,
    transport,
    until,
)

__all__ = ["inbox", "transport"]  # fixtures shared with test_delivery

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


def test_integrity_pending_is_retryable_and_not_a_rejected_record() -> None:
    assert issubclass(IntegrityPending, RetryableError)
    assert not issubclass(IntegrityPending, RejectedRecord)
    assert RetryConfig().action(IntegrityPending("x")) == "retry"
    override = RetryConfig(errors={"IntegrityPending": "dead_letter"})
    assert override.action(IntegrityPending("x")) == "dead_letter"


def test_integrity_delays_double_and_add_up_to_the_budget() -> None:
    policy = RetryConfig(integrity_retry=600, jitter=0)
    waits = [policy.integrity_delay(n, 10) for n in range(1, 10)]
    assert sum(waits) == pytest.approx(600)
    assert all(b == pytest.approx(2 * a) for a, b in itertools.pairwise(waits))
    assert RetryConfig(integrity_retry=600).integrity_delay(1, 1) <= 600 * 1.2  # one delivery: no crash
    # many deliveries: the first waits do not hammer the target (initial_delay is the floor)
    many = RetryConfig(integrity_retry=60, initial_delay=0.2, jitter=0)
    waits = [many.integrity_delay(n, 20) for n in range(1, 20)]
    assert min(waits) == pytest.approx(0.2)
    assert 60 <= sum(waits) <= 60 + 19 * 0.2


def _parents_and_lines(db: Path) -> None:
    with closing(sqlite3.connect(db)) as conn:
        conn.executescript(
            "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer TEXT);"
            "CREATE TABLE lines (id INTEGER PRIMARY KEY, order_id INTEGER NOT NULL REFERENCES orders(id),"
            " qty INTEGER);"
        )


def _rec(
    key: int, version: int, row: dict[str, object] | None = None, *, deleted: bool = False
) -> SinkRecord:
    return SinkRecord(id=f"{key}@{version}", key=str(key), version=version, deleted=deleted,
                      row=row or {}, origin="erp")  # fmt: skip


async def test_sqlite_sink_reports_a_missing_parent_and_a_remaining_child_as_integrity_pending(
    tmp_path: Path,
) -> None:
    db = tmp_path / "target.db"
    _parents_and_lines(db)
    lines = SqliteSinkConfig(path=str(db), table="lines", key="id")
    orders = SqliteSinkConfig(path=str(db), table="orders", key="id")
    async with SqliteSink(lines) as line_sink, SqliteSink(orders) as order_sink:
        [early] = await line_sink.apply([_rec(1, 1, {"id": 1, "order_id": 10, "qty": 2})])
        assert isinstance(early, IntegrityPending)
        assert "FOREIGN KEY constraint failed" in str(early)
        assert await order_sink.apply([_rec(10, 1, {"id": 10, "customer": "ALFKI"})]) == [Applied.APPLIED]
        assert await line_sink.apply([_rec(1, 1, {"id": 1, "order_id": 10, "qty": 2})]) == [Applied.APPLIED]
        [held] = await order_sink.apply([_rec(10, 2, deleted=True)])
        assert isinstance(held, IntegrityPending)  # a line still refers to it
        assert await line_sink.apply([_rec(1, 2, deleted=True)]) == [Applied.APPLIED]
        assert await order_sink.apply([_rec(10, 2, deleted=True)]) == [Applied.APPLIED]
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (0,)


async def test_an_integrity_refusal_is_retried_until_the_parent_arrives(
    transport: Transport, inbox: Inbox
) -> None:
    parent_there = anyio.Event()

    def outcome(r: SinkRecord) -> Applied | Exception:
        if not parent_there.is_set():
            parent_there.set()  # the parent lands while the child waits
            return IntegrityPending("lines key '1': FOREIGN KEY constraint failed")
        return Applied.APPLIED

    sink = ScriptedSink(outcome, [])
    cfg = flow(consumer={"max_deliver": 5, "ack_wait": 30, "fetch_timeout": 0.1},
               retry={"integrity_retry": 1.0, "initial_delay": 0.05, "jitter": 0})  # fmt: skip
    run = ApplyRunner(transport, inbox, sink, cfg)
    env = envelope("1", 1)
    await transport.publish(event(env))
    async with anyio.create_task_group() as tg:
        await tg.start(run.apply.run)
        await until(lambda: run.handled("applied") == 1)
        tg.cancel_scope.cancel()
    assert len(sink.seen) == 2
    assert stream(transport, DLQ_STREAM) == []
    assert await inbox.seen([env.id]) == {env.id}


async def test_an_integrity_refusal_past_its_budget_is_dead_lettered_with_the_reason(
    transport: Transport, inbox: Inbox
) -> None:
    sink = ScriptedSink(lambda r: IntegrityPending("lines key '1': FOREIGN KEY constraint failed"), [])
    cfg = flow(consumer={"max_deliver": 4, "ack_wait": 30, "fetch_timeout": 0.1},
               retry={"integrity_retry": 0.3, "initial_delay": 0.05, "jitter": 0})  # fmt: skip
    run = ApplyRunner(transport, inbox, sink, cfg)
    await transport.publish(event(envelope("1", 1)))
    async with anyio.create_task_group() as tg:
        await tg.start(run.apply.run)
        await until(lambda: len(stream(transport, DLQ_STREAM)) == 1)
        tg.cancel_scope.cancel()
    assert len(sink.seen) == 4  # every delivery max_deliver allows
    letter = DeadLetter.from_headers(stream(transport, DLQ_STREAM)[0].headers)
    assert (letter.error_class, letter.permanent, letter.attempts) == ("IntegrityPending", False, 4)
    assert "FOREIGN KEY constraint failed" in letter.reason
    assert "retry.integrity_retry = 0.3s" in letter.reason


async def test_integrity_retry_zero_or_a_dead_letter_override_dead_letters_at_once(
    transport: Transport, inbox: Inbox
) -> None:
    sink = ScriptedSink(lambda r: IntegrityPending("missing parent"), [])
    for n, retry in enumerate(({"integrity_retry": 0}, {"errors": {"IntegrityPending": "dead_letter"}}), 1):
        run = ApplyRunner(transport, inbox, sink, flow(retry=retry))
        await transport.publish(event(envelope(str(n), 1)))
        async with anyio.create_task_group() as tg:
            await tg.start(run.apply.run)
            await until(lambda n=n: len(stream(transport, DLQ_STREAM)) == n)  # type: ignore[misc]
            tg.cancel_scope.cancel()
        assert DeadLetter.from_headers(stream(transport, DLQ_STREAM)[-1].headers).attempts == 1
