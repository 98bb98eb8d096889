"""The capability matrix: what each adapter declares, pinned so that a change shows in review.

``+`` the contract test for it runs; ``-`` it does not (the system cannot express it, reason in
the driver); ``GAP`` the contract asks for it and the adapter falls short (a known finding).
Run with ``-s`` to see the table.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from tests.contract._base import Lack, SinkCap, SinkDriver, SourceCap, SourceDriver
from tests.contract._sink_drivers import SINK_DRIVERS
from tests.contract._source_drivers import SOURCE_DRIVERS

Drivers = dict[str, type[SourceDriver]] | dict[str, type[SinkDriver]]

SOURCES = {
    #                   deletes every_change rewind resume outage_raises outage_ridden_out
    "sqlite":          "+ + + + + -",
    "sqlite-cursor":   "- - + + + -",
    "postgres":        "+ + + + + -",
    "postgres-cursor": "- - + + + -",
    "rest":            "+ - + + - +",
    "webhook":         "+ + + + - -",
    "csv":             "+ + - + - +",
}  # fmt: skip

SINKS = {
    #            unchanged partial_rows update_only scopes poison outage_raises outage_ridden_out
    "sqlite":   "+ + + + + + -",
    "postgres": "+ + + + + + -",
    "rest":     "- - + + + + -",
    "csv":      "- - - + + - +",
}  # fmt: skip


def _cell(cap: Enum, capabilities: frozenset[Any], lacks: dict[Any, Lack]) -> str:
    if cap in capabilities:
        assert cap not in lacks, f"{cap} is both declared and lacking"
        return "+"
    lack = lacks.get(cap)
    assert lack is not None, f"{cap.value}: neither declared nor explained"
    assert lack.reason, f"{cap.value}: a lack needs its reason"
    return "GAP" if lack.gap else "-"


def _matrix(drivers: Drivers, caps: type[Enum]) -> dict[str, str]:
    table = {}
    for name, driver in drivers.items():
        assert driver.name == name
        assert set(driver.lacks) <= set(caps)
        table[name] = " ".join(_cell(cap, driver.capabilities, driver.lacks) for cap in caps)
    return table


def _show(title: str, drivers: Drivers, caps: type[Enum]) -> None:
    print(f"\n{title}: " + " | ".join(c.value for c in caps))
    for name, driver in drivers.items():
        print(f"  {name:16} " + " ".join(_cell(c, driver.capabilities, driver.lacks) for c in caps))
        for cap, lack in driver.lacks.items():
            print(f"      {'GAP' if lack.gap else 'n/a'} {cap.value}: {lack.reason}")


def test_source_capability_matrix() -> None:
    _show("sources", SOURCE_DRIVERS, SourceCap)
    assert _matrix(SOURCE_DRIVERS, SourceCap) == SOURCES


def test_sink_capability_matrix() -> None:
    _show("sinks", SINK_DRIVERS, SinkCap)
    assert _matrix(SINK_DRIVERS, SinkCap) == SINKS


def test_every_capability_is_tested_somewhere() -> None:
    """A capability no driver has would generate no test at all: the suite would say nothing."""
    for drivers, caps in ((SOURCE_DRIVERS, SourceCap), (SINK_DRIVERS, SinkCap)):
        for cap in caps:
            assert any(cap in d.capabilities for d in drivers.values()), f"no driver tests {cap}"


def test_every_adapter_has_a_driver() -> None:
    from agents.connector import SINK_CLASSES, SOURCE_CLASSES

    assert {name.split("-")[0] for name in SOURCE_DRIVERS} == set(SOURCE_CLASSES)
    assert {name.split("-")[0] for name in SINK_DRIVERS} == set(SINK_CLASSES)
