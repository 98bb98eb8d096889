"""A throwaway PostgreSQL cluster for the tests, started and stopped by the tests themselves.

The session fixture :func:`pg_cluster` runs ``initdb`` and ``pg_ctl`` from
``/usr/lib/postgresql/15/bin`` (or ``$MESH_PG_BIN``) in a temp dir that the cluster's OS user
owns (as root the cluster runs as the ``postgres`` user, through ``runuser``), listening on
127.0.0.1 only, on a random free port, with its unix socket in that temp dir. Without the
binaries the tests that need it skip with the reason, unless ``MESH_REQUIRE_POSTGRES=1``: then
they fail. Authentication is ``trust`` except for the role ``mesh_pw``, which needs its password
(scram-sha-256), so ``password_env`` is exercised for real.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from mesh.broker import free_port

PG_BIN = Path(os.environ.get("MESH_PG_BIN", "/usr/lib/postgresql/15/bin"))
PASSWORD_ROLE = "mesh_pw"
PASSWORD = "s3cret-for-tests"
NORTHWIND = (
    Path(os.environ.get("MESH_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
    / "northwind"
    / "northwind-postgres.sql"
)

_HBA = f"""
local all all trust
host all {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256
host all all 127.0.0.1/32 trust
"""


class PgCluster:
    """One PostgreSQL cluster in a temp dir; ``start``/``stop``/``restart`` keep port and data."""

    def __init__(self, bin_dir: Path = PG_BIN) -> None:
        self.bin = bin_dir
        self.dir = Path(tempfile.mkdtemp(prefix="mesh-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.port = free_port()
        self._as_root = os.geteuid() == 0
        if self._as_root:
            shutil.chown(self.dir, "postgres", "postgres")

    def __repr__(self) -> str:
        return f"<PgCluster 127.0.0.1:{self.port} {self.dir}>"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        cmd = list(args)
        if self._as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, timeout=60, cwd=self.dir)

    def init(self) -> None:
        self._run(
            str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
            "-E", "UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip
        with open(self.data / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write(
                f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.dir}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                "shared_buffers = 32MB\nmax_connections = 60\n"
            )
        (self.data / "pg_hba.conf").write_text(_HBA, encoding="utf-8")

    def start(self) -> None:
        proc = self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30", "start",
            check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            log = self.log.read_text(errors="replace") if self.log.exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {proc.stderr.decode(errors='replace')}\n{log[-2000:]}")

    def stop(self, mode: str = "fast") -> None:
        if not (self.data / "postmaster.pid").exists():
            return
        proc = self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", check=False
        )
        if proc.returncode != 0:
            self._kill()

    def _kill(self) -> None:
        pidfile = self.data / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError):
            os.kill(int(pidfile.read_text().splitlines()[0]), signal.SIGQUIT)
            deadline = time.monotonic() + 10
            while pidfile.exists() and time.monotonic() < deadline:
                time.sleep(0.05)

    def restart(self) -> None:
        self.stop()
        self.start()

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def dsn(self, dbname: str = "postgres", user: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} dbname={dbname} user={user}"

    def connect(self, dbname: str = "postgres", **kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn(dbname), autocommit=True, **kwargs)

    def create_database(self, template: str = "template0") -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return name

    def drop_database(self, name: str) -> None:
        with self.connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def psql_file(self, dbname: str, path: Path) -> None:
        subprocess.run(
            [str(self.bin / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
             "-p", str(self.port), "-U", "postgres", "-d", dbname, "-f", str(path)],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip


def _unavailable(reason: str) -> None:
    if os.environ.get("MESH_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"{reason} (and MESH_REQUIRE_POSTGRES=1)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A running PostgreSQL 15 cluster for the whole session (see the module docstring)."""
    if not (PG_BIN / "initdb").is_file():
        _unavailable(f"PostgreSQL binaries not found in {PG_BIN} (set MESH_PG_BIN)")
    cluster = PgCluster()
    try:
        cluster.init()
        cluster.start()
        with cluster.connect() as conn:
            conn.execute(f"CREATE ROLE {PASSWORD_ROLE} LOGIN SUPERUSER PASSWORD '{PASSWORD}'")
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def pg_db(pg_cluster: PgCluster) -> Iterator[str]:
    """A fresh, empty database of the session cluster for one test; its name."""
    name = pg_cluster.create_database()
    try:
        yield name
    finally:
        pg_cluster.drop_database(name)


@pytest.fixture(scope="session")
def northwind_template(pg_cluster: PgCluster) -> str:
    """A database holding Northwind, loaded once; tests copy it (``CREATE DATABASE ... TEMPLATE``)."""
    if not NORTHWIND.is_file():
        pytest.skip(f"Northwind reference data not found at {NORTHWIND}")
    with pg_cluster.connect() as conn:
        conn.execute("CREATE DATABASE northwind TEMPLATE template0")
    pg_cluster.psql_file("northwind", NORTHWIND)
    return "northwind"
