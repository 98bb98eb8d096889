"""The guard in tests/unit/conftest.py: unit tests start no nats-server and no PostgreSQL."""

from __future__ import annotations

import shutil
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest

from tests._unit_guard import ServerInUnitTest
from tests.unit.conftest import _GUARD, _check_fixtures


def test_asking_for_a_server_fixture_fails_the_test() -> None:
    item: Any = SimpleNamespace(fixturenames=["tmp_path", "nats_server"])
    with pytest.raises(pytest.fail.Exception, match="nats_server"):
        _check_fixtures(item)
    _check_fixtures(SimpleNamespace(fixturenames=["tmp_path"]))  # type: ignore[arg-type]


@pytest.mark.parametrize("program", ["nats-server", "pg_ctl"])
def test_spawning_a_server_is_stopped_and_recorded(program: str) -> None:
    path = shutil.which(program) or f"/nonexistent/{program}"
    with pytest.raises(ServerInUnitTest, match=program):
        subprocess.Popen([path, "--version"])
    assert _GUARD.started == [program]  # the teardown would fail this test on it
    _GUARD.started.clear()


def test_other_processes_are_allowed() -> None:
    assert subprocess.run([sys.executable, "-c", "pass"], check=False).returncode == 0
    assert _GUARD.started == []
