"""Shared fixtures: the anyio backend, and real nats-server processes on random loopback ports.

Also marks the slow suites ``slow`` (see :data:`SLOW`): ``pytest -m "not slow"`` is the
developer's loop, plain ``pytest`` (the README's command, CI's) runs everything.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Tests invoke command groups (mesh.cli.dlq.app, ...) directly; meshctl's entry builds the whole
# tree, which gives each command that talks to NATS its --creds/--tls-* options. Build it here so
# a test file run alone sees the same commands as the suite and as meshctl.
import mesh.cli.main  # noqa: F401
from tests._pg import northwind_template, pg_cluster, pg_db  # noqa: F401 - PostgreSQL fixtures
from tests._secure import SecuredNatsServer, init_test_security

TESTS = Path(__file__).resolve().parent
SHARED_DATA = Path(os.environ.get("MESH_DATA_DIR") or TESTS.parents[1] / "shared" / "data")

SLOW = (
    "chaos/",  # 50,000-event syncs under random faults, minutes each
    "integration/test_examples.py",  # each example starts PostgreSQL, nats-server and agents
    "integration/test_crash.py",  # SIGKILL at every crash point and during syncs
    "integration/test_rest_flow.py",  # a REST target misbehaving for a while
    "integration/test_leafnode.py",  # WAN cuts and hub crashes between two brokers
    "integration/test_edge_trace.py",  # trace records across a WAN cut and a hub crash
    "integration/test_cluster.py",  # leader kills in a three-node JetStream cluster under load
)
"""Paths under tests/ whose tests are marked ``slow``: a directory (ending in ``/``) covers every
test in it, now and later; a file every test in that file. Tests marked ``crash`` (SIGKILL of
real processes, then recovery) are slow wherever they are."""


def _is_slow(path: Path) -> bool:
    try:
        rel = path.resolve().relative_to(TESTS).as_posix()
    except ValueError:
        return False
    return any(rel.startswith(p) if p.endswith("/") else rel == p for p in SLOW)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _is_slow(item.path) or item.get_closest_marker("crash") is not None:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, object]]:
    """Async tests run on asyncio with and without uvloop (nats-py is asyncio-only)."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def security_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One mesh security dir (operator, accounts, admin creds) for the whole session."""
    return init_test_security(tmp_path_factory.mktemp("security") / "sec")


@pytest.fixture
def nats_server(tmp_path: Path, security_dir: Path) -> Iterator[SecuredNatsServer]:
    """A real nats-server with JetStream on a random loopback port and a temp store dir, secured:
    operator mode with :func:`security_dir`'s accounts and its own resolver dir; anonymous
    clients are refused. ``nats_server.admin_creds`` / ``nats_server.nats_config()`` connect as
    the admin."""
    server = SecuredNatsServer(tmp_path / "nats", security_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()
