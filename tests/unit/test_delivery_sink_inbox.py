"""A sink that keeps its own inbox (the SQLite sink): the handled ids commit with the writes."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import anyio
import pytest

from adapters.sql.config import SqliteSinkConfig
from adapters.sql.sqlite import SqliteSink
from mesh.store import Inbox
from mesh.transport import Transport
from tests.unit.test_delivery import ApplyRunner, envelope, event, inbox, transport, until

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]
__all__ = ["inbox", "transport"]  # the fixtures, re-used


def _rows(db: Path, query: str) -> list[tuple[object, ...]]:
    with closing(sqlite3.connect(db)) as c:
        return c.execute(query).fetchall()


async def test_the_sqlite_sink_records_handled_ids_in_the_target_and_dedupes_from_there(
    tmp_path: Path, transport: Transport, inbox: Inbox
) -> None:
    db = tmp_path / "erp.db"
    with closing(sqlite3.connect(db)) as c:
        c.execute("CREATE TABLE t (id TEXT PRIMARY KEY, name TEXT)")
        c.commit()
    sink = SqliteSink(SqliteSinkConfig(path=str(db), table="t", key="id"))
    run = ApplyRunner(transport, inbox, sink)  # type: ignore[arg-type]  # any Sink
    own, other = envelope("1", 1, origin="erp"), envelope("2", 1, origin="crm")
    await transport.publish(event(own))
    await transport.publish(event(other))
    async with anyio.create_task_group() as tg:
        await tg.start(run.apply.run)
        await until(lambda: run.handled("echo") == 1 and run.handled("applied") == 1)
        # the same envelope again (a redelivery after a crash between commit and ack looks so)
        await transport.publish(event(other, msg_id="again-after-a-crash"))
        await until(lambda: run.handled("duplicate") == 1)
        tg.cancel_scope.cancel()
    assert _rows(db, "SELECT id, name FROM t") == [("2", "A")]
    assert sorted(_rows(db, "SELECT id, flow, key, version, outcome FROM _mesh_inbox")) == sorted(
        [(own.id, "customers", "1", 1, "echo"), (other.id, "customers", "2", 1, "applied")]
    )
    assert await inbox.count() == 0  # one commit per batch: the agent's inbox is not written
    consumer = await transport.pull_consumer(
        durable=run.plan.durable, filter_subject="evt.customer.>", ack_wait=30, max_deliver=3,
        max_ack_pending=100,
    )  # fmt: skip
    assert await consumer.pending() == 0
    # the retention: ids older than it are forgotten, newer ones kept
    async with SqliteSink(SqliteSinkConfig(path=str(db), table="t", key="id")) as again:
        assert await again.handled([own.id, other.id, "unknown"]) == {own.id, other.id}
        assert await again.forget_handled(3600) == 0
        with closing(sqlite3.connect(db)) as c:
            c.execute("UPDATE _mesh_inbox SET applied_at = 0 WHERE id = ?", (own.id,))
            c.commit()
        assert await again.forget_handled(3600) == 1
        assert await again.handled([own.id, other.id]) == {other.id}
