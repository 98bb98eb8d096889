"""Every contract driver: the built-in adapters' (``_source_drivers``, ``_sink_drivers``) plus the
ones installed plugin distributions contribute through the ``mesh.contract_drivers`` entry point
group.

A plugin distribution declares ``[project.entry-points."mesh.contract_drivers"] <name> =
"pkg.module:DRIVERS"`` where ``DRIVERS`` is a sequence of :class:`~tests.contract._base.SourceDriver`
and :class:`~tests.contract._base.SinkDriver` subclasses (their ``name`` is the adapter name, or
``<adapter>-<variant>``). A driver name declared twice, or an entry point that does not load,
fails the collection with the entry point and distribution named.
"""

from __future__ import annotations

from importlib import metadata

import pytest

from tests.contract._base import SinkDriver, SourceDriver
from tests.contract._sink_drivers import SINK_DRIVERS as BUILTIN_SINKS
from tests.contract._source_drivers import SOURCE_DRIVERS as BUILTIN_SOURCES

__all__ = ["DRIVER_GROUP", "SINK_DRIVERS", "SOURCE_DRIVERS", "adapter_of"]

DRIVER_GROUP = "mesh.contract_drivers"


def adapter_of(driver_name: str) -> str:
    """The adapter a driver exercises: ``postgres-cursor`` -> ``postgres``."""
    return driver_name.split("-")[0]


def _collect() -> tuple[dict[str, type[SourceDriver]], dict[str, type[SinkDriver]]]:
    sources = dict(BUILTIN_SOURCES)
    sinks = dict(BUILTIN_SINKS)
    for ep in metadata.entry_points(group=DRIVER_GROUP):
        dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist is not None else "unknown distribution"
        where = f"entry point {DRIVER_GROUP}:{ep.name} = {ep.value!r} ({dist})"
        try:
            drivers = list(ep.load())
        except Exception as exc:
            raise pytest.UsageError(f"{where} does not load: {type(exc).__name__}: {exc}") from exc
        for driver in drivers:
            table: dict[str, type[SourceDriver]] | dict[str, type[SinkDriver]]
            if isinstance(driver, type) and issubclass(driver, SourceDriver):
                table = sources
            elif isinstance(driver, type) and issubclass(driver, SinkDriver):
                table = sinks
            else:
                raise pytest.UsageError(f"{where}: {driver!r} is not a SourceDriver or SinkDriver class")
            if driver.name in table:
                raise pytest.UsageError(f"{where}: a driver named {driver.name!r} exists already")
            table[driver.name] = driver  # type: ignore[assignment]
    return sources, sinks


SOURCE_DRIVERS, SINK_DRIVERS = _collect()
"""Every source (sink) driver by name, built-in ones first, in the order tests are generated."""
