"""The capability matrix: what each adapter declares, pinned so that a change shows in review.

``+`` the contract test for it runs; ``-`` it does not (the system cannot express it, reason in
the driver); ``GAP`` the contract asks for it and the adapter falls short (a known finding).
Run with ``-s`` to see the table.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import pytest

from mesh.plugins import adapter_registry
from tests.contract._base import Lack, SinkCap, SinkDriver, SourceCap, SourceDriver
from tests.contract._drivers import SINK_DRIVERS, SOURCE_DRIVERS, adapter_of

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


def _pinned(table: dict[str, str], pins: dict[str, str]) -> dict[str, str]:
    """The built-in drivers' rows; plugin drivers' rows are computed (every capability declared
    or explained) but pinned in their own distribution, not here."""
    return {name: cells for name, cells in table.items() if name in pins}


def test_source_capability_matrix() -> None:
    _show("sources", SOURCE_DRIVERS, SourceCap)
    assert _pinned(_matrix(SOURCE_DRIVERS, SourceCap), SOURCES) == SOURCES


def test_sink_capability_matrix() -> None:
    _show("sinks", SINK_DRIVERS, SinkCap)
    assert _pinned(_matrix(SINK_DRIVERS, SinkCap), SINKS) == SINKS


def test_every_capability_is_tested_somewhere() -> None:
    """A capability no driver has would generate no test at all: the suite would say nothing."""
    for drivers, caps in ((SOURCE_DRIVERS, SourceCap), (SINK_DRIVERS, SinkCap)):
        for cap in caps:
            assert any(cap in d.capabilities for d in drivers.values()), f"no driver tests {cap}"


@pytest.mark.parametrize("role", ["source", "sink"])
def test_every_registered_adapter_has_a_driver_and_every_driver_an_adapter(role: str) -> None:
    """The matrix is the registry: an installed adapter (built in or a plugin) whose source or
    sink no contract driver exercises fails here, naming the entry point it came from."""
    registry = adapter_registry()
    drivers = SOURCE_DRIVERS if role == "source" else SINK_DRIVERS
    driven = {adapter_of(name) for name in drivers}
    untested = [
        f"{name} ({registry.origins.get(name, 'unknown origin')})"
        for name in registry.names(role)  # type: ignore[arg-type]
        if name not in driven
    ]
    assert not untested, (
        f"installed {role} adapters without a contract driver: {'; '.join(untested)}. Add a driver to "
        f"tests/contract/_{role}_drivers.py, or ship one in the plugin's distribution under the "
        "mesh.contract_drivers entry point group (see tests/contract/_drivers.py)"
    )
    assert driven <= set(registry.names(role)), f"drivers for adapters not installed: {driven}"  # type: ignore[arg-type]
