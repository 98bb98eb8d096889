"""Generates every contract test once per capable driver, and builds the drivers.

A test taking ``source_driver`` (``sink_driver``) runs for every source (sink) driver (built in,
or contributed by an installed plugin distribution: see ``_drivers.py``) whose
capabilities include all the ones the test declares with ``@needs(...)``; the others do not get
the test at all (no skips). Drivers that use PostgreSQL get the session cluster and a fresh
database from ``tests/_pg.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.contract._base import Env, SinkCap, SinkDriver, SourceCap, SourceDriver
from tests.contract._drivers import SINK_DRIVERS, SOURCE_DRIVERS


@pytest.fixture
def anyio_backend() -> str:
    """Plain asyncio: the adapters' own unit tests cover uvloop; this keeps the suite short."""
    return "asyncio"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    needed: frozenset[SourceCap | SinkCap] = getattr(metafunc.function, "contract_needs", frozenset())
    for argname, drivers in (("source_driver", SOURCE_DRIVERS), ("sink_driver", SINK_DRIVERS)):
        if argname not in metafunc.fixturenames:
            continue
        names = [name for name, d in drivers.items() if needed <= d.capabilities]
        if not names:  # an empty parameter set would be a silent skip
            raise pytest.UsageError(
                f"{metafunc.function.__name__}: no {argname} has {sorted(c.value for c in needed)}"
            )
        metafunc.parametrize(argname, names, indirect=True)


@pytest.fixture
def driver_env(request: pytest.FixtureRequest, tmp_path: Path) -> Env:
    """The driver's environment, resolved before the (async) driver fixture starts it."""
    params = request.node.callspec.params
    driver: type[SourceDriver] | type[SinkDriver] = (
        SOURCE_DRIVERS[params["source_driver"]]
        if "source_driver" in params
        else SINK_DRIVERS[params["sink_driver"]]
    )
    if not driver.uses_postgres:
        return Env(tmp_path)
    return Env(tmp_path, pg=request.getfixturevalue("pg_cluster"), pg_db=request.getfixturevalue("pg_db"))


@pytest.fixture
async def source_driver(request: pytest.FixtureRequest, driver_env: Env) -> AsyncIterator[SourceDriver]:
    async with SOURCE_DRIVERS[request.param](driver_env) as driver:
        yield driver


@pytest.fixture
async def sink_driver(request: pytest.FixtureRequest, driver_env: Env) -> AsyncIterator[SinkDriver]:
    async with SINK_DRIVERS[request.param](driver_env) as driver:
        yield driver
