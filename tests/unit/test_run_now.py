"""Runs started by hand (``meshctl runs start``: :class:`RunTrigger`) through a real capture actor
into a real outbox, on a hand-moved clock; and the CSV adapters' file runs turned into bulk-run
records for ``mesh_runs`` (:class:`AdapterRunWatcher`, real CSV state files)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio
import msgspec
import pytest

from adapters.files.config import CsvSourceConfig
from adapters.files.csv_source import CsvSource
from agents.delivery import Capture
from mesh.config import load_agent_config
from mesh.metrics import Metrics
from mesh.runs import BulkRun, RunStore
from mesh.runs.adapter_runs import AdapterRunWatcher
from mesh.runs.bulk import Checkpoint, RunTrigger
from mesh.store import Outbox
from tests.unit.test_csv_cli import make_runs
from tests.unit.test_runs import Clock, _state, make_table, plan, scheduled, ts, until

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


async def test_a_run_started_now_runs_at_once_and_leaves_the_schedule_as_it_was(tmp_path: Path) -> None:
    db = tmp_path / "erp.db"
    make_table(db, 10)
    clock = Clock(ts(2026, 12, 3, 15, 0))  # the next scheduled run is tomorrow 02:00
    store = RunStore(tmp_path / "runs.db")
    trigger = RunTrigger()

    def source() -> object:
        src = scheduled(db, store, clock)
        src.trigger = trigger
        return src

    async with Outbox(tmp_path / "outbox.db") as outbox:
        capture = Capture(plan(), outbox, Metrics(), source, outbox_max_bytes=10**9)  # type: ignore[arg-type]
        async with anyio.create_task_group() as tg:
            await tg.start(capture.run)
            ok, run_id = await trigger.run_now(10)
            assert (ok, run_id) == (True, "customers-20261203T150000Z-now")
            await until(lambda: _state(store, run_id, "completed"))
            await until(lambda: trigger.current is None)
            # Again within the same second: a run of its own (own id, own envelope ids).
            assert await trigger.run_now(10) == (True, "customers-20261203T150000Z-now-2")
            await until(lambda: _state(store, "customers-20261203T150000Z-now-2", "completed"))
            # Runs started by hand leave the schedule as it was: no scheduled time marked as done.
            manual = await outbox.cursor("customers")
            assert manual is not None
            assert msgspec.json.decode(manual, type=Checkpoint).last_due == Checkpoint().last_due
            # The schedule's own run is still due at 02:00 tomorrow. (The clock may move before
            # the source looks at it again after the run by hand: the run is not lost for that.)
            clock.now = ts(2026, 12, 4, 2)
            await until(lambda: _state(store, "customers-20261204T020000Z", "completed"))
            tg.cancel_scope.cancel()
        cursor = await outbox.cursor("customers")
    rows_run = await store.get(run_id)
    assert rows_run is not None
    assert (rows_run.read, rows_run.published, rows_run.scheduled_for) == (10, 10, ts(2026, 12, 3, 15))
    assert len(await outbox_ids(tmp_path)) == 30  # three runs of 10 rows, none deduplicated away
    assert cursor is not None
    assert msgspec.json.decode(cursor, type=Checkpoint).last_due == ts(2026, 12, 4, 2)  # the scheduled run's


async def test_a_run_in_progress_is_not_started_again_and_an_idle_source_times_out() -> None:
    trigger = RunTrigger()
    assert await trigger.run_now(0.2) == (
        False, "the flow's source did not start a run within 0.2s (is the flow running?)"
    )  # fmt: skip
    trigger.began("customers-20261203T020000Z")
    assert await trigger.run_now(5) == (False, "run customers-20261203T020000Z is in progress")
    trigger.ended()
    assert trigger.current is None


async def test_csv_file_runs_become_bulk_run_records_reported_once_per_change(tmp_path: Path) -> None:
    config = await make_runs(tmp_path)  # one CSV import (3 rows, 1 rejected) and one export
    cfg = load_agent_config(config)
    reported: list[BulkRun] = []

    async def report(run: BulkRun) -> None:
        reported.append(run)

    sides = [(f.name, side) for f in cfg.flows for side in (f.source, f.sink) if side is not None]
    watcher = AdapterRunWatcher("files-agent", lambda: sides, report)
    assert await watcher.scan() == 2
    runs = {r.id: r for r in reported}
    assert set(runs) == {"orders-in-import-1", "orders-out-export-1"}  # the sqlite sink keeps none
    imp = runs["orders-in-import-1"]
    assert (imp.flow, imp.adapter, imp.agent, imp.state) == ("orders-in", "csv", "files-agent", "completed")
    assert (imp.read, imp.published, imp.failed) == (3, 2, 1)
    assert imp.finished_at is not None
    assert len(imp.checksum) == 64
    assert await watcher.scan() == 0  # nothing changed: nothing reported again
    src = cfg.flows[0].source
    assert isinstance(src, CsvSourceConfig)
    data = tmp_path / "in" / "b.csv"
    data.write_text("id,v\n7,x\n")
    os.utime(data, (time.time() - 5, time.time() - 5))
    async with CsvSource(src) as source:
        batch = await source.read(None, 100)
        await source.committed(batch.cursor)
    assert await watcher.scan() == 1
    assert reported[-1].id == "orders-in-import-2"
    assert (reported[-1].read, reported[-1].state) == (1, "completed")


async def outbox_ids(tmp: Path) -> set[str]:
    async with Outbox(tmp / "outbox.db") as outbox:
        return {r.id for r in await outbox.peek(1000)}


async def test_a_run_killed_before_its_first_chunk_is_not_left_running(tmp_path: Path) -> None:
    """A run started by hand whose start never reached the outbox (SIGKILL) is recorded
    ``interrupted`` when the source starts again, not ``running`` for ever."""
    db = tmp_path / "erp.db"
    make_table(db, 3)
    store = RunStore(tmp_path / "runs.db")
    lost = BulkRun(id="customers-20261203T150000Z-now", flow="customers", adapter="sqlite", started_at=1.0)
    await store.put(lost)
    reports: list[BulkRun] = []
    clock = Clock(ts(2026, 12, 3, 16, 0))
    cursor = msgspec.json.encode(Checkpoint(last_due=ts(2026, 12, 2, 2))).decode()
    async with scheduled(db, store, clock, reports) as src:  # today's 02:00 run is due (missed)
        batch = await src.read(cursor, 100)
    assert batch.run == "customers-20261203T020000Z"
    got = await store.get(lost.id)
    assert got is not None
    assert (got.state, got.detail) == (
        "interrupted",
        "the agent stopped before the run's first chunk was committed",
    )
    assert (reports[0].id, reports[0].state) == (lost.id, "interrupted")  # reported to mesh_runs too


async def test_a_scheduled_time_that_passes_during_a_run_started_by_hand_still_runs(tmp_path: Path) -> None:
    """The race behind a scheduled run that never came: a flow that never ran on schedule counts
    its first scheduled time from when the source began waiting, not from whenever the source
    next looks at the clock. A run started by hand at 01:50 that completes at 02:05 (or the clock
    moving to 02:00 just before the source reads again) must not push tomorrow's 02:00 run to
    the day after: the 02:00 run was due while the run by hand was in progress, so it runs once
    (``missed = "run_once"``) when that run ends."""
    db = tmp_path / "erp.db"
    make_table(db, 3)
    clock = Clock(ts(2026, 12, 4, 1, 50))  # a new flow: its first scheduled run is at 02:00
    store = RunStore(tmp_path / "runs.db")
    trigger = RunTrigger()
    async with scheduled(db, store, clock) as src:
        src.trigger = trigger
        async with anyio.create_task_group() as tg:
            tg.start_soon(trigger.run_now, 10)
            with anyio.fail_after(10):
                batch = await src.read(None, 100)  # waits for 02:00, or a run by hand
        assert (batch.run, len(batch.changes)) == ("customers-20261204T015000Z-now", 3)
        await src.committed(batch.cursor)
        clock.now = ts(2026, 12, 4, 2, 5)  # the run by hand ends after 02:00
        with anyio.fail_after(10):
            done = await src.read(batch.cursor, 100)
        assert (done.run, done.changes) == ("customers-20261204T015000Z-now", [])
        await src.committed(done.cursor)
        assert msgspec.json.decode(done.cursor, type=Checkpoint).last_due is None  # schedule untouched
        with anyio.fail_after(10):  # before the fix: waited for 2026-12-05 02:00
            due = await src.read(done.cursor, 100)
        assert (due.run, len(due.changes)) == ("customers-20261204T020000Z", 3)
    run = await store.get("customers-20261204T020000Z")
    assert run is not None
    assert run.scheduled_for == ts(2026, 12, 4, 2)
