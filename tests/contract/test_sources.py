"""The Source contract (mesh/adapters.py), run against every source driver that can express it.

Always: inserts and updates are captured with versions that grow per key; the same cursor read
twice gives the same changes (a crash before the outbox commit); ``read`` blocks while there is
nothing, is cancellable promptly, and wakes up for a change. By capability: deletes, every change
in order, rewinding to an older uncommitted cursor, resuming after close and reopen, and the
system going away (SystemUnavailable, or the documented ride-out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anyio
import pytest

from mesh.adapters import Change
from mesh.errors import SystemUnavailable
from tests.contract._base import (
    BOUND,
    SourceCap,
    SourceDriver,
    collect,
    fields,
    needs,
    read_once,
    signature,
)

pytestmark = pytest.mark.anyio


@dataclass(frozen=True)
class Op:
    key: str
    name: str | None = None
    city: str | None = None

    @property
    def deleted(self) -> bool:
        return self.name is None

    def expect(self) -> tuple[str, bool, dict[str, Any] | None]:
        return self.key, self.deleted, None if self.deleted else {"name": self.name, "city": self.city}


def seen(change: Change) -> tuple[str, bool, dict[str, Any] | None]:
    return change.key, change.deleted, None if change.deleted else fields(change)


async def run(driver: SourceDriver, ops: list[Op]) -> None:
    for op in ops:
        if op.deleted:
            await driver.delete(op.key)
        else:
            assert op.name is not None
            assert op.city is not None
            await driver.upsert(op.key, op.name, op.city)


def check_phase(driver: SourceDriver, ops: list[Op], got: list[Change]) -> None:
    if SourceCap.EVERY_CHANGE in driver.capabilities:
        assert [seen(c) for c in got] == [op.expect() for op in ops]
    else:  # each key once, in its latest state
        assert len(got) == len({op.key for op in ops})
        assert {c.key: seen(c) for c in got} == {op.key: op.expect() for op in ops}


def expected_count(driver: SourceDriver, ops: list[Op]) -> int:
    return len(ops) if SourceCap.EVERY_CHANGE in driver.capabilities else len({op.key for op in ops})


async def test_captures_changes_with_growing_versions(source_driver: SourceDriver) -> None:
    """Inserts, updates and (where the system has them) deletes, in order for log-based sources,
    latest state per key for polling ones; a key's versions only grow, across a delete too."""
    d = source_driver
    deletes = SourceCap.DELETES in d.capabilities
    phases = [
        [Op("1", "Ada", "Oslo"), Op("2", "Bob", "Rome"), Op("1", "Ada", "Paris"), Op("3", "Cy", "Lima")],
        [Op("2"), Op("3", "Cy", "Quito")] if deletes else [Op("3", "Cy", "Quito")],
        [Op("2", "Bo", "Riga")],  # back after its delete
    ]
    versions: dict[str, list[int]] = {}
    cursor: str | None = None
    async with d.source() as source:
        for ops in phases:
            await run(d, ops)
            got, cursor = await collect(source, cursor, expected_count(d, ops))
            check_phase(d, ops, got)
            for c in got:
                versions.setdefault(c.key, []).append(c.version)
    for key, seq in versions.items():
        assert seq == sorted(set(seq)), f"versions of {key} do not grow: {seq}"


async def test_the_same_cursor_read_twice_gives_the_same_changes(source_driver: SourceDriver) -> None:
    """Redelivery: a crash before the outbox commit makes the agent read from the same cursor
    again, and it must get the same keys and versions (hence the same envelope ids, I2)."""
    d = source_driver
    async with d.source() as source:
        for key in "1234":
            await d.upsert(key, f"n{key}", "Oslo")
        first = await read_once(source, None)
        assert signature((await read_once(source, None)).changes) == signature(first.changes)
        second = await read_once(source, first.cursor)
        assert signature((await read_once(source, first.cursor)).changes) == signature(second.changes)
        assert {c.key for c in first.changes}.isdisjoint(c.key for c in second.changes)


@needs(SourceCap.REWIND)
async def test_an_older_uncommitted_cursor_gives_the_same_changes_again(source_driver: SourceDriver) -> None:
    d = source_driver
    async with d.source() as source:
        for key in "123456":
            await d.upsert(key, f"n{key}", "Oslo")
        first = await read_once(source, None)
        second = await read_once(source, first.cursor)
        await read_once(source, second.cursor)
        assert signature((await read_once(source, None)).changes) == signature(first.changes)
        assert signature((await read_once(source, first.cursor)).changes) == signature(second.changes)


@needs(SourceCap.RESUME)
async def test_resume_from_the_stored_cursor_after_reopen_loses_nothing(source_driver: SourceDriver) -> None:
    """Session 1 commits one batch and reads another that never reaches the outbox (a crash);
    a change happens while no source runs. Session 2, from the stored cursor, gets exactly
    everything after the committed batch, the uncommitted one with the same versions."""
    d = source_driver
    async with d.source() as source:
        for key in "12345":
            await d.upsert(key, f"n{key}", "Oslo")
        committed = await read_once(source, None)
        await source.committed(committed.cursor)
        lost = await read_once(source, committed.cursor)
    await source.aclose()  # aclose is idempotent
    await d.upsert("6", "n6", "Oslo")
    async with d.source() as source:
        rest, _ = await collect(source, committed.cursor, 6 - len(committed.changes))
    keys = [c.key for c in rest]
    assert sorted(keys) == sorted(set("123456") - {c.key for c in committed.changes})
    assert set(signature(lost.changes)) <= set(signature(rest))


async def test_read_blocks_until_a_change_and_is_cancellable(source_driver: SourceDriver) -> None:
    d = source_driver
    async with d.source() as source:
        with anyio.fail_after(BOUND):  # the bound on how promptly a cancelled read returns
            with anyio.move_on_after(0.3) as scope:
                await source.read(None, 10)
        assert scope.cancelled_caught
        got: list[Change] = []

        async def reader() -> None:
            got.extend((await source.read(None, 10)).changes)

        with anyio.fail_after(BOUND):
            async with anyio.create_task_group() as tg:
                tg.start_soon(reader)
                await anyio.sleep(0.2)
                assert got == []
                await d.upsert("7", "Late", "Oslo")
    assert [seen(c) for c in got] == [("7", False, {"name": "Late", "city": "Oslo"})]


@needs(SourceCap.OUTAGE_RAISES)
async def test_system_away_is_unavailable_then_reading_works_again(source_driver: SourceDriver) -> None:
    d = source_driver
    async with d.source() as source:
        await d.upsert("1", "Ada", "Oslo")
        _, cursor = await collect(source, None, 1)
        await d.upsert("2", "Bob", "Rome")
        async with d.outage():
            with anyio.fail_after(BOUND):
                with pytest.raises(SystemUnavailable):
                    await source.read(cursor, 10)
                with pytest.raises(SystemUnavailable):  # still away: trying again fails the same way
                    await source.read(cursor, 10)
        got, _ = await collect(source, cursor, 1)  # the same cursor, the system back
    assert [seen(c) for c in got] == [("2", False, {"name": "Bob", "city": "Rome"})]


@needs(SourceCap.OUTAGE_RIDDEN_OUT)
async def test_system_away_is_ridden_out_and_reading_catches_up(source_driver: SourceDriver) -> None:
    """While the system is away a read neither returns nor fails; once it is back the read
    returns what changed."""
    d = source_driver
    async with d.source() as source:
        await d.upsert("1", "Ada", "Oslo")
        _, cursor = await collect(source, None, 1)
        got: list[Change] = []

        async def reader() -> None:
            got.extend((await source.read(cursor, 10)).changes)

        with anyio.fail_after(BOUND):
            async with anyio.create_task_group() as tg:  # a read that raised would fail the group
                async with d.outage():
                    tg.start_soon(reader)
                    await anyio.sleep(0.5)  # several polls against the missing system
                    assert got == []
                await d.upsert("2", "Bob", "Rome")
    assert [seen(c) for c in got] == [("2", False, {"name": "Bob", "city": "Rome"})]
