"""Shared fixtures: the anyio backend, and real nats-server processes on random loopback ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.broker import NatsServer
from tests._pg import northwind_template, pg_cluster, pg_db  # noqa: F401 - PostgreSQL fixtures

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, object]]:
    """Async tests run on asyncio with and without uvloop (nats-py is asyncio-only)."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A real nats-server with JetStream on a random loopback port and a temp store dir."""
    server = NatsServer(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()
