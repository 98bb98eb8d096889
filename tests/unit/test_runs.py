"""Scheduled bulk runs: cron schedules on a hand-moved clock, and the resumable bulk extract of a
real SQLite table through the capture actor into a real outbox."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from adapters.sql._bulk import SqliteExtract
from adapters.sql.config import SqliteSourceConfig
from agents.delivery import Capture, FlowPlan
from mesh.config import decode_flow
from mesh.envelope import decode, envelope_id
from mesh.errors import ConfigError
from mesh.metrics import Metrics
from mesh.runs import BulkRun, RunStore, Schedule, ScheduleConfig
from mesh.runs.bulk import RUN_HEADER, Checkpoint, ScheduledSource, row_version, run_id_for
from mesh.runs.records import SinkTally
from mesh.runs.report import RunEntry, merge_runs
from mesh.store import Outbox

BERLIN = "Europe/Berlin"


def ts(*args: int, tz: str = "UTC") -> float:
    from zoneinfo import ZoneInfo

    return datetime(*args, tzinfo=ZoneInfo(tz)).timestamp()  # type: ignore[misc]


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- the schedule ------------------------------------------------------------------------------


def test_cron_in_a_time_zone_across_daylight_saving() -> None:
    s = Schedule("0 2 * * *", BERLIN, now=Clock(0))
    # 02:00 Berlin is 01:00 UTC in winter, 00:00 UTC in summer; on 2026-03-29 02:00 does not exist.
    assert s.next_after(ts(2026, 1, 10, 12)) == ts(2026, 1, 11, 1)
    assert s.next_after(ts(2026, 3, 28, 12)) == ts(2026, 3, 29, 3, tz=BERLIN)
    assert s.next_after(ts(2026, 3, 29, 12)) == ts(2026, 3, 30, 0)
    # 2026-10-25 02:00 happens twice in Berlin: one run.
    first = s.next_after(ts(2026, 10, 24, 12))
    assert first == ts(2026, 10, 25, 0)
    assert s.next_after(first) == ts(2026, 10, 26, 1)


def test_a_new_flow_waits_for_its_first_time_unless_first_run_is_now() -> None:
    clock = Clock(ts(2026, 12, 3, 15, 30))
    s = Schedule("0 2 * * *", "UTC", now=clock)
    assert s.first_due(None) == ts(2026, 12, 4, 2)
    assert s.first_due(None, first_now=True) == clock.now
    # Counting from when the source began waiting (15:30): once 02:00 has passed (a run by hand
    # was in progress), it is a missed run like any other.
    clock.now = ts(2026, 12, 4, 2, 5)
    since = ts(2026, 12, 3, 15, 30)
    assert s.first_due(None, since=since) == ts(2026, 12, 4, 2)
    assert s.first_due(None, since=since, missed="skip") == ts(2026, 12, 5, 2)
    assert s.first_due(None, since=since, missed="run_once", deadline=60) == ts(2026, 12, 5, 2)
    assert s.first_due(None) == ts(2026, 12, 5, 2)  # counting from now


def test_missed_runs_while_down_run_once_on_start_or_are_skipped() -> None:
    clock = Clock(ts(2026, 12, 3, 15, 30))
    s = Schedule("0 2 * * *", "UTC", now=clock)
    last = ts(2026, 11, 30, 2)  # the agent was down for the runs of Dec 1, 2 and 3
    assert s.first_due(last, missed="run_once") == ts(2026, 12, 3, 2)  # one run, for the latest
    assert s.first_due(last, missed="skip") == ts(2026, 12, 4, 2)
    # A deadline of an hour: the 02:00 run is 13.5 hours late, so it is skipped.
    assert s.first_due(last, missed="run_once", deadline=3600) == ts(2026, 12, 4, 2)
    assert s.first_due(last, missed="run_once", deadline=86400) == ts(2026, 12, 3, 2)
    # Nothing missed: the next time.
    assert s.first_due(ts(2026, 12, 3, 2)) == ts(2026, 12, 4, 2)


def test_schedule_config_errors_name_the_field() -> None:
    base = {
        "name": "f",
        "entity": "customer",
        "source": {"adapter": "sqlite", "path": "x.db", "table": "t", "key": "id"},
    }
    with pytest.raises(ConfigError, match=r"schedule.*cron.*not a valid cron"):
        decode_flow({**base, "schedule": {"cron": "61 * * * *"}})
    with pytest.raises(ConfigError, match=r"timezone.*Mars/Olympus"):
        decode_flow({**base, "schedule": {"cron": "0 2 * * *", "timezone": "Mars/Olympus"}})
    with pytest.raises(ConfigError, match="cronn"):
        decode_flow({**base, "schedule": {"cronn": "0 2 * * *"}})
    flow = decode_flow({**base, "schedule": {"cron": "0 2 * * *", "timezone": BERLIN}})
    assert flow.schedule == ScheduleConfig(cron="0 2 * * *", timezone=BERLIN)


def test_row_versions_are_the_rows_own() -> None:
    assert row_version(42, "v") == 42
    assert row_version("2026-12-03T02:00:00Z", "v") == row_version(datetime(2026, 12, 3, 2, tzinfo=UTC), "v")
    assert row_version("2026-12-03 02:00:00", "v") == int(ts(2026, 12, 3, 2)) * 1_000_000
    with pytest.raises(ConfigError, match="'v' holds 'soon'"):
        row_version("soon", "v")
    # One reading for the bulk runs and the SQL sources' cursor mode (``what`` names the place).
    assert row_version(" +42 ", "v") == row_version(42.0, "v") == 42
    assert row_version("2026-12-03", "v") == int(ts(2026, 12, 3)) * 1_000_000
    with pytest.raises(ConfigError, match=r"^column 'v' holds True: a version must be an integer or an ISO"):
        row_version(True, "v", what="column")
    with pytest.raises(ConfigError, match=r"holds 1\.5"):
        row_version(1.5, "v")
    with pytest.raises(ConfigError, match="holds '\u00b2'"):
        row_version("\u00b2", "v")  # a digit to str.isdigit, not to int()


# --- a bulk run through the capture actor --------------------------------------------------------


def make_table(path: Path, n: int) -> None:
    with closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, updated_at INTEGER NOT NULL)")
        db.executemany(
            "INSERT INTO customers VALUES (?, ?, ?)", [(i, f"n{i}", 1000 + i) for i in range(1, n + 1)]
        )
        db.commit()


def plan() -> FlowPlan:
    cfg = decode_flow(
        {
            "name": "customers", "entity": "customer",
            "source": {"adapter": "sqlite", "path": "unused.db", "table": "customers", "key": "id"},
            "schedule": {"cron": "0 2 * * *", "version_field": "updated_at", "chunk_size": 4},
        }
    )  # fmt: skip
    return FlowPlan(cfg, agent="erp-agent", system="erp")


async def until(check: Callable[[], Any], timeout: float = 30) -> None:
    with anyio.fail_after(timeout):
        while True:
            got = check()
            if hasattr(got, "__await__"):
                got = await got
            if got:
                return
            await anyio.sleep(0.01)


def scheduled(
    db: Path, store: RunStore, clock: Clock, reports: list[BulkRun] | None = None
) -> ScheduledSource:
    p = plan()
    assert p.cfg.schedule is not None

    async def report(run: BulkRun) -> None:
        if reports is not None:
            reports.append(run)

    extract = SqliteExtract(SqliteSourceConfig(path=str(db), table="customers", key="id"))
    return ScheduledSource("customers", "sqlite", p.cfg.schedule, extract, store, agent="erp-agent",
                           now=clock, tick=0.01, report=report)  # fmt: skip


pytestmark_anyio = pytest.mark.anyio


@pytestmark_anyio
async def test_a_run_starts_at_its_time_chunks_and_completes(tmp_path: Path) -> None:
    db = tmp_path / "erp.db"
    make_table(db, 10)
    clock = Clock(ts(2026, 12, 3, 1, 59))
    store = RunStore(tmp_path / "runs.db")
    reports: list[BulkRun] = []
    async with Outbox(tmp_path / "outbox.db") as outbox:
        capture = Capture(
            plan(), outbox, Metrics(), lambda: scheduled(db, store, clock, reports), outbox_max_bytes=10**9
        )
        async with anyio.create_task_group() as tg:
            await tg.start(capture.run)
            await anyio.sleep(0.1)
            assert await outbox.peek(100) == []  # 01:59: not yet
            assert await store.list() == []
            clock.now = ts(2026, 12, 3, 2)
            run_id = run_id_for("customers", clock.now)
            assert run_id == "customers-20261203T020000Z"
            await until(lambda: _state(store, run_id, "completed"))
            tg.cancel_scope.cancel()
        rows = await outbox.peek(100)
    assert len(rows) == 10
    assert [r.id for r in rows] == [
        envelope_id(f"customers@{run_id}", "erp", str(i), 1000 + i) for i in range(1, 11)
    ]
    assert {r.headers[RUN_HEADER] for r in rows if r.headers} == {run_id}
    assert all(r.headers for r in rows)
    assert decode(rows[0].data).version == 1001  # the row's own version, not the time of the run
    run = await store.get(run_id)
    assert run is not None
    assert (run.state, run.read, run.published, run.scheduled_for) == ("completed", 10, 10, clock.now)
    assert run.finished_at is not None
    assert run.checksum
    # running (start), one record per committed chunk of 4, 4, 2, then completed
    assert [(r.state, r.read) for r in reports] == [
        ("running", 0),
        ("running", 4),
        ("running", 8),
        ("running", 10),
        ("completed", 10),
    ]


async def _state(store: RunStore, run_id: str, state: str) -> bool:
    run = await store.get(run_id)
    return run is not None and run.state == state


@pytestmark_anyio
async def test_a_run_stopped_mid_way_resumes_from_its_checkpoint_with_the_same_ids(tmp_path: Path) -> None:
    db = tmp_path / "erp.db"
    make_table(db, 10)
    clock = Clock(ts(2026, 12, 3, 2))
    store = RunStore(tmp_path / "runs.db")
    run_id = run_id_for("customers", ts(2026, 12, 4, 2))
    p = plan()
    async with Outbox(tmp_path / "outbox.db") as outbox:
        # First attempt: two chunks committed, a third read but "crashed" before its commit.
        src = scheduled(db, store, clock)
        clock.now = ts(2026, 12, 4, 2)
        # It ran yesterday (the cursor says so): today's 02:00 run is due.
        cursor = msgspec.json.encode(Checkpoint(last_due=ts(2026, 12, 3, 2))).decode()
        await outbox.capture("customers", cursor, [])
        async with src:
            for _ in range(2):
                batch = await src.read(cursor, 100)
                items, headers = Capture(p, outbox, Metrics(), lambda: src, outbox_max_bytes=10**9).envelopes(
                    batch
                )
                await outbox.capture("customers", batch.cursor, items, headers=headers)
                await src.committed(batch.cursor)
                cursor = batch.cursor
            lost = await src.read(cursor, 100)  # never committed
        interrupted = await store.get(run_id)
        assert interrupted is not None
        assert (interrupted.state, interrupted.read) == ("interrupted", 8)
        # Second attempt, from the committed cursor: the lost chunk comes again, same ids.
        capture = Capture(p, outbox, Metrics(), lambda: scheduled(db, store, clock), outbox_max_bytes=10**9)
        async with scheduled(db, store, clock) as peek:
            again = capture.envelopes(await peek.read(cursor, 100))[0]
        assert [i for i, _, _ in again] == [i for i, _, _ in capture.envelopes(lost)[0]]
        async with anyio.create_task_group() as tg:
            await tg.start(capture.run)
            await until(lambda: _state(store, run_id, "completed"))
            tg.cancel_scope.cancel()
        rows = await outbox.peek(100)
    assert len(rows) == 10
    assert len({r.id for r in rows}) == 10
    run = await store.get(run_id)
    assert run is not None
    assert (run.read, run.resumed) == (10, 1)  # one resume made progress
    # The checksum does not depend on where the run was cut: an uninterrupted run agrees.
    other = tmp_path / "other"
    other.mkdir()
    store2 = RunStore(other / "runs.db")
    async with Outbox(other / "outbox.db") as outbox2:
        await outbox2.capture(
            "customers", msgspec.json.encode(Checkpoint(last_due=ts(2026, 12, 3, 2))).decode(), []
        )
        c2 = Capture(p, outbox2, Metrics(), lambda: scheduled(db, store2, clock), outbox_max_bytes=10**9)
        async with anyio.create_task_group() as tg:
            await tg.start(c2.run)
            await until(lambda: _state(store2, run_id, "completed"))
            tg.cancel_scope.cancel()
    run2 = await store2.get(run_id)
    assert run2 is not None
    assert run2.checksum == run.checksum
    assert run2.resumed == 0


@pytestmark_anyio
async def test_sink_tallies_count_each_envelope_once_and_merge_with_the_source_record(tmp_path: Path) -> None:
    tally = SinkTally(tmp_path / "runs.db")
    assert await tally.record("customers", [("r1", "a", "applied"), ("r1", "b", "stale")]) == {"r1"}
    # A redelivery after a crash: the first outcome stays.
    assert await tally.record("customers", [("r1", "a", "stale"), ("r1", "b", "stale")]) == set()
    counts = await tally.counts("r1", "crm-agent")
    assert counts is not None
    assert (counts.applied, counts.skipped, counts.failed) == (1, 1, 0)
    source = BulkRun(
        id="r1", flow="customers", adapter="sqlite", state="completed", read=2, published=2, started_at=1
    )
    views = merge_runs([RunEntry(role="sink", sink=counts), RunEntry(role="source", source=source)])
    assert [(v.run.id, v.run.applied, v.run.skipped) for v in views] == [("r1", 1, 1)]
    assert msgspec.json.decode(msgspec.json.encode(views[0]))["run"]["applied"] == 1


@pytestmark_anyio
async def test_apply_tallies_bulk_run_envelopes_by_outcome_once(tmp_path: Path) -> None:
    """Envelopes with ``Mesh-Run`` are counted (applied, stale, failed when dead-lettered) after
    the sink's write; a redelivered duplicate is not counted again; other envelopes not at all."""
    from agents.delivery import Apply
    from mesh.adapters import Applied, SinkRecord
    from mesh.config import StreamsConfig
    from mesh.envelope import Envelope, encode, encode_payload
    from mesh.errors import RejectedRecord
    from mesh.store import Inbox
    from mesh.transport import MemoryTransport, OutMessage, Transport
    from tests.unit.test_delivery import ScriptedSink

    def sample(metrics: Metrics, outcome: str) -> float:
        labels = {"flow": "customers", "outcome": outcome}
        return metrics.registry.get_sample_value("mesh_consumed_messages_total", labels) or 0.0

    def env(key: str, version: int) -> Envelope:
        return Envelope(
            id=envelope_id("customers@r1", "crm", key, version), kind="customer.upserted", flow="customers",
            key=key, version=version, origin="crm", occurred_at=1, correlation_id="c",
            payload=encode_payload({"id": key}),
        )  # fmt: skip

    def outcome(r: SinkRecord) -> Applied | Exception:
        return {"1": Applied.APPLIED, "2": Applied.STALE}.get(r.key) or RejectedRecord("CHECK failed")

    tallied: list[tuple[str, str, str]] = []

    async def tally(items: list[tuple[str, str, str]]) -> None:
        tallied.extend(items)

    cfg = decode_flow({
        "name": "customers", "entity": "customer",
        "sink": {"adapter": "sqlite", "path": "unused.db", "table": "t", "key": "id"},
        "consumer": {"max_deliver": 3, "ack_wait": 30, "fetch_timeout": 0.1},
    })  # fmt: skip
    sink = ScriptedSink(outcome, [])
    async with MemoryTransport(name="unit") as t, Inbox(tmp_path / "inbox.db") as inbox:
        await t.ensure_streams(StreamsConfig())

        async def connected() -> Transport:
            return t

        metrics = Metrics()
        plan = FlowPlan(cfg, agent="crm-agent", system="erp")
        apply = Apply(plan, inbox, connected, metrics, lambda: sink, tally=tally)
        envs = [env("1", 1), env("2", 1), env("3", 1)]
        for e in envs:
            await t.publish(OutMessage("evt.customer.upserted.crm", encode(e), e.id, {RUN_HEADER: "r1"}))
        await t.publish(OutMessage("evt.customer.upserted.crm", encode(envs[0]), "again", {RUN_HEADER: "r1"}))
        plain = Envelope(**{**msgspec.structs.asdict(env("4", 1)), "id": "plain-4"})
        await t.publish(OutMessage("evt.customer.upserted.crm", encode(plain), plain.id))
        async with anyio.create_task_group() as tg:
            await tg.start(apply.run)
            await until(lambda: len(sink.seen) == 4 and sample(metrics, "duplicate") == 1)
            tg.cancel_scope.cancel()
    assert sorted(tallied) == sorted([("r1", envs[0].id, "applied"), ("r1", envs[1].id, "stale"),
                                      ("r1", envs[2].id, "failed")])  # fmt: skip


@pytestmark_anyio
async def test_a_run_that_cannot_version_its_rows_is_failed_with_the_reason(tmp_path: Path) -> None:
    db = tmp_path / "erp.db"
    with closing(sqlite3.connect(db)) as c:
        c.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")  # no updated_at
        c.execute("INSERT INTO customers VALUES (1, 'a')")
        c.commit()
    clock = Clock(ts(2026, 12, 4, 2))
    store = RunStore(tmp_path / "runs.db")
    cursor = msgspec.json.encode(Checkpoint(last_due=ts(2026, 12, 3, 2))).decode()
    with pytest.raises(ConfigError, match="no field 'updated_at'"):
        async with scheduled(db, store, clock) as src:
            await src.read(cursor, 100)
    [run] = await store.list()
    assert (run.state, run.read) == ("failed", 0)
    assert "rows have no field 'updated_at' (schedule.version_field)" in run.detail


@pytestmark_anyio
async def test_meshctl_runs_lists_an_agents_bulk_and_csv_runs_without_nats(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from mesh.cli import app
    from mesh.config import load_agent_config
    from tests.unit.test_csv_cli import make_runs

    config = await make_runs(tmp_path)  # one CSV import (3 rows, 1 rejected) and one export
    state = Path(load_agent_config(config).agent.state_dir)
    bulk = BulkRun(id="other-20261203T020000Z", flow="other", adapter="sqlite", agent="files-agent",
                   state="completed", started_at=time_now(), finished_at=time_now() + 2, read=5, published=5,
                   checksum="ab" * 16)  # fmt: skip
    await RunStore(state / "runs.db").put(bulk)
    await SinkTally(state / "runs.db").record("other", [(bulk.id, "e1", "applied"), (bulk.id, "e2", "stale")])
    runner = CliRunner()

    async def cli(args: list[str]) -> Any:  # meshctl runs its own event loop: another thread
        return await anyio.to_thread.run_sync(runner.invoke, app, args)

    result = await cli(["runs", "list", "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    docs = {d["id"]: d for d in json.loads(result.output)}
    assert set(docs) == {"orders-in-import-1", "orders-out-export-1", bulk.id}
    i = docs["orders-in-import-1"]
    assert (i["adapter"], i["state"], i["read"], i["published"], i["failed"]) == ("csv", "completed", 3, 2, 1)
    assert len(i["checksum"]) == 64
    b = docs[bulk.id]
    assert (b["state"], b["read"], b["applied"], b["skipped"]) == ("completed", 5, 1, 1)
    shown = await cli(["runs", "show", bulk.id, "--state-dir", str(state)])
    assert shown.exit_code == 0, shown.output
    assert "applied        1" in shown.output
    both = await cli(["runs", "list", "--config", str(config), "--state-dir", str(state)])
    assert both.exit_code == 2
    assert "not both" in both.output
    assert "Traceback" not in both.output


def time_now() -> float:
    import time

    return time.time()


@pytestmark_anyio
async def test_sink_tallies_keep_only_the_latest_runs_per_flow(tmp_path: Path) -> None:
    tally = SinkTally(tmp_path / "runs.db", keep_runs=2)
    for n in range(4):
        await tally.record("customers", [(f"r{n}", f"e{n}", "applied")])
        await tally.record("orders", [(f"o{n}", f"e{n}", "applied")]) if n == 0 else None
    assert [await tally.counts(f"r{n}", "a") is not None for n in range(4)] == [False, False, True, True]
    assert await tally.counts("o0", "a") is not None  # another flow's runs are its own


def test_a_schedule_needs_a_source_whose_adapter_can_extract(tmp_path: Path) -> None:
    from mesh.config import load_agent_config

    base = """
[agent]
name = "a"
system = "s"
state_dir = "state"
[[flows]]
name = "f"
entity = "customer"
"""
    config = tmp_path / "agent.toml"
    config.write_text(
        base
        + """
[flows.source]
adapter = "csv"
inbox_dir = "in"
state_path = "state/f.db"
key = "id"
[flows.schedule]
cron = "0 2 * * *"
"""
    )
    with pytest.raises(ConfigError, match=r"flows\[0\]\.schedule.*adapter 'csv' cannot run on a schedule"):
        load_agent_config(config)
    config.write_text(
        base
        + """
[flows.sink]
adapter = "sqlite"
path = "x.db"
table = "t"
key = "id"
[flows.schedule]
cron = "0 2 * * *"
"""
    )
    with pytest.raises(ConfigError, match=r"flows\[0\]\.schedule.*runs the flow.s \[source\]"):
        load_agent_config(config)
