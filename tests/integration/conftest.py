from __future__ import annotations

from pathlib import Path

import pytest

# Adapter tests that moved here from tests/unit because they need PostgreSQL: they keep running
# on both event loops, as the unit tests do.
_BOTH_LOOPS = frozenset({"test_pg_cli.py", "test_pg_sink.py", "test_pg_source.py"})


@pytest.fixture
def anyio_backend() -> str:
    """Integration tests run in-process on plain asyncio; agent subprocesses use uvloop."""
    return "asyncio"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "anyio_backend" in metafunc.fixturenames and Path(metafunc.definition.path).name in _BOTH_LOOPS:
        metafunc.parametrize(
            "anyio_backend",
            [("asyncio", {}), ("asyncio", {"use_uvloop": True})],
            ids=["asyncio", "uvloop"],
        )
