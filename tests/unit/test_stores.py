from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from mesh.errors import StopError
from mesh.store import Inbox, InboxEntry, Outbox

pytestmark = pytest.mark.anyio


async def test_capture_commits_rows_and_cursor_together(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    async with Outbox(path) as ob:
        assert await ob.cursor("f") is None
        added = await ob.capture("f", "10", [("a", "evt.c.upserted.erp", b"A"), ("b", "s", b"B")])
        assert added == 2
        assert await ob.cursor("f") == "10"
        # the same ids again (a re-read after a crash) keep one row each
        assert await ob.capture("f", "11", [("b", "s", b"B"), ("c", "s", b"C")]) == 1
        rows = await ob.peek(10)
        assert [r.id for r in rows] == ["a", "b", "c"]
        assert rows[0].subject == "evt.c.upserted.erp"
        assert rows[0].data == b"A"
    # durable across reopen, in order
    async with Outbox(path) as ob:
        assert await ob.cursor("f") == "11"
        assert [r.id for r in await ob.peek(2)] == ["a", "b"]
        depth, age = await ob.stats()
        assert depth == 3
        assert age >= 0


async def test_failed_capture_moves_neither_rows_nor_cursor(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.db") as ob:
        await ob.capture("f", "1", [("a", "s", b"A")])
        with pytest.raises(StopError, match="NOT NULL"):
            # a NULL subject violates NOT NULL half-way through the batch
            await ob.capture("f", "2", [("b", "s", b"B"), ("c", None, b"C")])  # type: ignore[list-item]
        assert await ob.cursor("f") == "1"
        assert [r.id for r in await ob.peek(10)] == ["a"]


async def test_remove_only_named_rows_and_wakeup(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.db") as ob:
        await ob.capture("f", "1", [(str(i), "s", b"x") for i in range(1200)])
        rows = await ob.peek(2000)
        await ob.remove([r for r in rows if int(r.id) % 2 == 0])
        assert ob.nbytes == 600
        left = await ob.peek(2000)
        assert len(left) == 600
        assert all(int(r.id) % 2 == 1 for r in left)

        got: list[float] = []

        async def waiter() -> None:
            start = anyio.current_time()
            await ob.wait_for_rows(5)
            got.append(anyio.current_time() - start)

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.sleep(0.05)
            await ob.capture("f", "2", [("new", "s", b"x")])
        assert got
        assert got[0] < 4


async def test_remove_a_run_of_rows_leaves_the_rows_around_it(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.db") as ob:
        await ob.capture("f", "1", [(str(i), "s", b"x") for i in range(10)])
        rows = await ob.peek(10)
        await ob.remove(list(reversed(rows[3:7])))  # a run of seqs, in any order: one range delete
        assert [r.id for r in await ob.peek(10)] == ["0", "1", "2", "7", "8", "9"]
        await ob.capture("f", "2", [("10", "s", b"x")])
        left = await ob.peek(10)
        # seqs 1-3 and 8-11 are waiting: a range over both would take more than was named
        await ob.remove([left[2], left[3]])
        assert [r.id for r in await ob.peek(10)] == ["0", "1", "8", "9", "10"]
        assert ob.nbytes == 5


async def test_inbox_seen_record_prune(tmp_path: Path) -> None:
    async with Inbox(tmp_path / "inbox.db") as ib:
        ids = [f"id-{i}" for i in range(1500)]
        assert await ib.seen(ids) == set()
        await ib.record([InboxEntry(i, "f", i, 1, "applied") for i in ids[:700]])
        await ib.record([InboxEntry(ids[0], "f", ids[0], 1, "applied")])  # idempotent
        assert await ib.seen(ids) == set(ids[:700])
        assert await ib.count() == 700
        assert await ib.prune(older_than=3600) == 0
        assert await ib.prune(older_than=-1) == 700
        assert await ib.seen(ids) == set()


async def test_stores_keep_a_small_page_cache(tmp_path: Path) -> None:
    # Each connection keeps its page cache for the agent's lifetime: 1 MiB, not SQLite's 2 MB.
    async with Outbox(tmp_path / "o.db") as ob, Inbox(tmp_path / "i.db") as ib:
        assert await ob.scalar("PRAGMA cache_size") == -1024
        assert await ib.scalar("PRAGMA cache_size") == -1024
        assert await ob.scalar("PRAGMA journal_mode") == "wal"
