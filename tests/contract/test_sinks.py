"""The Sink contract (mesh/adapters.py), run against every sink driver that can express it.

Always: records apply; a redelivered batch is STALE and writes nothing (also after a restart);
an older or equal version is STALE; a delete leaves a tombstone that an older upsert cannot pass.
By capability: UNCHANGED for identical values, partial rows, update-only records, versions per
scope, a poison record refused in its slot while the others apply, and the system going away
(SystemUnavailable with nothing applied, or the documented ride-out) and coming back.
"""

from __future__ import annotations

import anyio
import pytest

from mesh.adapters import Applied
from mesh.errors import RejectedRecord, SystemUnavailable
from tests.contract._base import BOUND, SinkCap, SinkDriver, eventually, needs, rec, row

pytestmark = pytest.mark.anyio

A, S, U = Applied.APPLIED, Applied.STALE, Applied.UNCHANGED


def held(name: str | None, city: str | None) -> dict[str, str | None]:
    return {"name": name, "city": city}


async def test_applies_records_and_redelivery_is_stale_without_a_second_write(
    sink_driver: SinkDriver,
) -> None:
    d = sink_driver
    batch = [rec("1", 1, row("1", "Ada", "Oslo")), rec("2", 1, row("2", "Bob", "Rome"))]
    async with d.sink() as sink:
        assert await sink.apply(batch) == [A, A]
        assert await d.state(sink) == {"1": held("Ada", "Oslo"), "2": held("Bob", "Rome")}
        writes = await d.writes(sink)
        assert await sink.apply(batch) == [S, S]
        assert await d.writes(sink) == writes
    async with d.sink() as sink:  # the guard is durable: a redelivery after a restart is stale too
        assert await sink.apply(batch) == [S, S]
        assert await d.writes(sink) == writes
        assert await d.state(sink) == {"1": held("Ada", "Oslo"), "2": held("Bob", "Rome")}
    await sink.aclose()  # aclose is idempotent


async def test_older_and_equal_versions_are_stale(sink_driver: SinkDriver) -> None:
    d = sink_driver
    async with d.sink() as sink:
        assert await sink.apply([rec("1", 5, row("1", "Ada", "Oslo"))]) == [A]
        writes = await d.writes(sink)
        out = await sink.apply(
            [rec("1", 3, row("1", "Old", "Oslo")), rec("1", 5, row("1", "Same version", "Oslo"))]
        )
        assert out == [S, S]
        assert await d.writes(sink) == writes
        # records of one key in one batch see the versions applied before them
        out = await sink.apply([rec("1", 7, row("1", "v7", "Oslo")), rec("1", 6, row("1", "v6", "Oslo"))])
        assert out == [A, S]
        assert await d.state(sink) == {"1": held("v7", "Oslo")}


async def test_a_delete_leaves_a_tombstone_no_older_upsert_passes(sink_driver: SinkDriver) -> None:
    d = sink_driver
    async with d.sink() as sink:
        await sink.apply([rec("1", 1, row("1", "Ada", "Oslo")), rec("2", 1, row("2", "Bob", "Rome"))])
        assert await sink.apply([rec("1", 2, deleted=True)]) == [A]
        assert await d.state(sink) == {"2": held("Bob", "Rome")}
        assert await sink.apply([rec("1", 1, row("1", "Ada", "Oslo"))]) == [S]  # no resurrection
        # a delete of a key the target never had still leaves a tombstone
        (gone,) = await sink.apply([rec("9", 4, deleted=True)])
        assert gone in (A, U)
        assert await sink.apply([rec("9", 3, row("9", "Zombie", "Oslo"))]) == [S]
        assert await d.state(sink) == {"2": held("Bob", "Rome")}
        assert await sink.apply([rec("1", 3, row("1", "Ada", "Bergen"))]) == [A]  # newer: back
        assert await d.state(sink) == {"1": held("Ada", "Bergen"), "2": held("Bob", "Rome")}


@needs(SinkCap.UNCHANGED)
async def test_identical_values_are_unchanged_and_write_nothing(sink_driver: SinkDriver) -> None:
    d = sink_driver
    async with d.sink() as sink:
        await sink.apply([rec("1", 1, row("1", "Ada", "Oslo"))])
        writes = await d.writes(sink)
        assert await sink.apply([rec("1", 2, row("1", "Ada", "Oslo"))]) == [U]
        assert await d.writes(sink) == writes
        assert await sink.apply([rec("1", 2, row("1", "Ada", "Oslo"))]) == [S]  # the guard advanced
        assert await sink.apply([rec("1", 3, row("1", "Ada", "Paris"))]) == [A]
        assert await d.writes(sink) == writes + 1


@needs(SinkCap.PARTIAL_ROWS)
async def test_partial_rows_keep_the_other_fields(sink_driver: SinkDriver) -> None:
    d = sink_driver
    async with d.sink() as sink:
        await sink.apply([rec("1", 1, row("1", "Ada", "Oslo"))])
        assert await sink.apply([rec("1", 2, {"id": 1, "city": "Paris"})]) == [A]
        assert await sink.apply([rec("1", 3, {"id": 1, "name": "Ada L"})]) == [A]
        assert await d.state(sink) == {"1": held("Ada L", "Paris")}


@needs(SinkCap.UPDATE_ONLY)
async def test_update_only_records_never_create_or_delete(sink_driver: SinkDriver) -> None:
    d = sink_driver
    async with d.sink() as sink:
        await sink.apply([rec("1", 1, row("1", "Ada", "Oslo"))])
        out = await sink.apply(
            [
                rec("1", 2, row("1", "Ada", "Paris"), create=False),
                rec("2", 1, row("2", "Ghost", "Rome"), create=False),
            ]
        )
        assert out == [A, U]
        assert await sink.apply([rec("1", 3, deleted=True, create=False)]) == [U]
        assert await d.state(sink) == {"1": held("Ada", "Paris")}


@needs(SinkCap.SCOPES)
async def test_versions_are_compared_within_a_scope_only(sink_driver: SinkDriver) -> None:
    d = sink_driver
    async with d.sink() as sink:
        out = await sink.apply(
            [
                rec("1", 100, row("1", "ERP", "Oslo"), scope="erp"),
                rec("1", 5, row("1", "CRM", "Rome"), scope="crm"),
            ]
        )
        assert out == [A, A]
        assert await d.state(sink) == {"1": held("CRM", "Rome")}
        out = await sink.apply(
            [
                rec("1", 4, row("1", "old CRM", "x"), scope="crm"),
                rec("1", 50, row("1", "old ERP", "x"), scope="erp"),
            ]
        )
        assert out == [S, S]
        assert await sink.apply([rec("1", 101, row("1", "ERP", "Bergen"), scope="erp")]) == [A]
        assert await d.state(sink) == {"1": held("ERP", "Bergen")}


@needs(SinkCap.POISON)
async def test_a_poison_record_is_rejected_in_its_slot_while_the_others_apply(
    sink_driver: SinkDriver,
) -> None:
    d = sink_driver
    async with d.sink() as sink:
        out = await sink.apply(
            [
                rec("1", 1, row("1", "Ada", "Oslo")),
                rec("2", 1, d.poison("2")),
                rec("3", 1, row("3", "Cy", "Lima")),
            ]
        )
        assert out[0] is A
        assert out[2] is A
        assert isinstance(out[1], RejectedRecord), out[1]
        assert await d.state(sink) == {"1": held("Ada", "Oslo"), "3": held("Cy", "Lima")}
        # the refusal did not move the guard: the fixed record (a newer version) applies
        assert await sink.apply([rec("2", 2, row("2", "Bob", "Rome"))]) == [A]
        assert await d.state(sink) == {
            "1": held("Ada", "Oslo"),
            "2": held("Bob", "Rome"),
            "3": held("Cy", "Lima"),
        }


@needs(SinkCap.OUTAGE_RAISES)
async def test_system_away_is_unavailable_applies_nothing_then_works_again(sink_driver: SinkDriver) -> None:
    d = sink_driver
    async with d.sink() as sink:
        await sink.apply([rec("1", 1, row("1", "Ada", "Oslo"))])
        writes = await d.writes(sink)
        batch = [rec("2", 1, row("2", "Bob", "Rome")), rec("1", 2, row("1", "Ada", "Paris"))]
        async with d.outage():
            with anyio.fail_after(BOUND), pytest.raises(SystemUnavailable):
                await sink.apply(batch)
        assert await d.state(sink) == {"1": held("Ada", "Oslo")}
        assert await d.writes(sink) == writes
        assert await eventually(lambda: sink.apply(batch)) == [A, A]
        assert await d.state(sink) == {"1": held("Ada", "Paris"), "2": held("Bob", "Rome")}


@needs(SinkCap.OUTAGE_RIDDEN_OUT)
async def test_system_away_is_ridden_out_and_the_records_arrive_later(sink_driver: SinkDriver) -> None:
    d = sink_driver
    async with d.sink() as sink:
        await sink.apply([rec("1", 1, row("1", "Ada", "Oslo"))])
        batch = [rec("2", 1, row("2", "Bob", "Rome")), rec("1", 2, row("1", "Ada", "Paris"))]
        async with d.outage():
            assert await sink.apply(batch) == [A, A]  # durable on our side
            assert not await d.deliver(sink)  # the system is away
        assert await d.state(sink) == {"1": held("Ada", "Paris"), "2": held("Bob", "Rome")}
        assert await sink.apply(batch) == [S, S]
