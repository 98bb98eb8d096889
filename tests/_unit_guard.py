"""Keeps tests/unit free of servers: no nats-server and no PostgreSQL in a unit test.

A unit test that asks for a server fixture fails before the fixture starts anything. A unit test
that starts one anyway (``NatsServer(...).start()``, ``PgCluster``, a ``subprocess`` running
``nats-server``, ``postgres``, ``pg_ctl`` or ``initdb``) is stopped by an audit hook: the spawn
raises :class:`ServerInUnitTest`, and the test fails even if the code under test caught that.
Such tests belong in tests/integration/. Processes started through uvloop's own spawn bypass
``subprocess`` and are not seen; the fixture check covers the servers the suite provides.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["SERVER_FIXTURES", "SERVER_PROGRAMS", "ServerInUnitTest", "UnitGuard"]

SERVER_FIXTURES = frozenset({"nats_server", "pg_cluster", "pg_db", "northwind_template"})
"""Fixtures (tests/conftest.py, tests/_pg.py) that start a nats-server or PostgreSQL."""
SERVER_PROGRAMS = frozenset({"nats-server", "postgres", "postmaster", "pg_ctl", "pg_ctlcluster", "initdb"})
"""Programs a unit test must not start (matched on the base name of any argument)."""


class ServerInUnitTest(RuntimeError):
    """Raised where a unit test tries to start a server process."""


def _programs(value: Any) -> list[str]:
    if isinstance(value, (str, bytes, os.PathLike)):
        value = [value]
    if not isinstance(value, Sequence):
        return []
    names = []
    for arg in value:
        if isinstance(arg, (str, bytes, os.PathLike)):
            name = os.path.basename(os.fsdecode(arg))
            if name in SERVER_PROGRAMS:
                names.append(name)
    return names


class UnitGuard:
    """One per process: an audit hook that is armed only while a unit test runs."""

    def __init__(self) -> None:
        self.armed = False
        self.started: list[str] = []
        """What the running test tried to start so far."""
        sys.addaudithook(self._audit)

    def arm(self) -> None:
        self.started = []
        self.armed = True

    def disarm(self) -> list[str]:
        """Stop watching; returns (and forgets) what the test tried to start."""
        self.armed = False
        started, self.started = self.started, []
        return started

    def _audit(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.armed or event not in ("subprocess.Popen", "os.posix_spawn", "os.exec", "os.spawn"):
            return
        # subprocess.Popen: (executable, args, cwd, env); os.*: (path, argv, env)
        names = [*_programs(args[0]), *_programs(args[1])] if len(args) > 1 else _programs(args[0])
        if names:
            self.started.append(names[0])
            raise ServerInUnitTest(f"a unit test must not start {names[0]}: move it to tests/integration/")
