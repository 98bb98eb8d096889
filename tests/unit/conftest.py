"""tests/unit needs no nats-server and no PostgreSQL (see ``tests/_unit_guard.py``).

A unit test that uses a server fixture fails before it starts; one that spawns a server itself is
stopped and fails. Tests that need a server live in tests/integration/.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests._unit_guard import SERVER_FIXTURES, UnitGuard

_GUARD = UnitGuard()


def _check_fixtures(item: pytest.Item) -> None:
    used = sorted(SERVER_FIXTURES & set(getattr(item, "fixturenames", ())))
    if used:
        pytest.fail(
            f"a unit test must not use {', '.join(used)} (a server): move it to tests/integration/",
            pytrace=False,
        )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before any fixture is set up."""
    _check_fixtures(item)
    _GUARD.arm()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    """Disarmed before teardown: the last test of a scope also finalizes session fixtures, such as
    the PostgreSQL cluster of tests that ran before it."""
    started = _GUARD.disarm()
    result = yield
    if started:
        pytest.fail(f"a unit test started {', '.join(started)}: move it to tests/integration/", pytrace=False)
    return result
