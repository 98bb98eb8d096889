"""Helpers for end-to-end tests: demo ERP/CRM databases, agent configs, agent processes,
and the checks that prove the invariants (same rows, no double effect, monotonic versions)."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

CUSTOMERS = """
CREATE TABLE IF NOT EXISTS customers (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    email TEXT,
    country TEXT,
    credit_limit_cents INTEGER NOT NULL DEFAULT 0,
    balance REAL
);
"""

# Every effective sink write moves the version guard exactly once: log each move, and every
# write to the data table, so a test can prove "no entity written twice for the same version".
WRITE_LOG = """
CREATE TABLE IF NOT EXISTS _mesh_versions (tbl TEXT, key TEXT, version INTEGER NOT NULL,
    deleted INTEGER NOT NULL, PRIMARY KEY (tbl, key));
CREATE TABLE IF NOT EXISTS version_log (n INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT,
    version INTEGER, deleted INTEGER);
CREATE TRIGGER IF NOT EXISTS vlog_i AFTER INSERT ON _mesh_versions BEGIN
    INSERT INTO version_log (key, version, deleted) VALUES (NEW.key, NEW.version, NEW.deleted);
END;
CREATE TRIGGER IF NOT EXISTS vlog_u AFTER UPDATE ON _mesh_versions BEGIN
    INSERT INTO version_log (key, version, deleted) VALUES (NEW.key, NEW.version, NEW.deleted);
END;
CREATE TABLE IF NOT EXISTS data_log (n INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT, op TEXT);
CREATE TRIGGER IF NOT EXISTS dlog_i AFTER INSERT ON customers BEGIN
    INSERT INTO data_log (key, op) VALUES (NEW.id, 'I');
END;
CREATE TRIGGER IF NOT EXISTS dlog_u AFTER UPDATE ON customers BEGIN
    INSERT INTO data_log (key, op) VALUES (NEW.id, 'U');
END;
CREATE TRIGGER IF NOT EXISTS dlog_d AFTER DELETE ON customers BEGIN
    INSERT INTO data_log (key, op) VALUES (OLD.id, 'D');
END;
"""


def make_erp(path: Path) -> None:
    with sqlite3.connect(path) as c:
        c.execute("PRAGMA journal_mode=WAL")
        c.executescript(CUSTOMERS)


def make_crm(path: Path) -> None:
    with sqlite3.connect(path) as c:
        c.execute("PRAGMA journal_mode=WAL")
        c.executescript(CUSTOMERS)
        c.executescript(WRITE_LOG)


def agent_toml(
    *,
    name: str,
    system: str,
    state: Path,
    url: str,
    source: Path | None = None,
    sink: Path | None = None,
    extra: str = "",
    creds: Path | None = None,
) -> str:
    """An agent config with one flow ``customers``; with ``creds``, the agent authenticates with
    that file and takes replies on ``_INBOX.<name>`` (issue the file with
    :func:`tests._secure.secure_agent`)."""
    auth = f'creds = "{creds}"\ninbox_prefix = "_INBOX.{name}"\n' if creds is not None else ""
    text = f"""
log_level = "info"
[agent]
name = "{name}"
system = "{system}"
state_dir = "{state}"
[nats]
servers = ["{url}"]
request_timeout = 2.0
{auth}[[flows]]
name = "customers"
entity = "customer"
[flows.consumer]
batch_size = 200
fetch_timeout = 0.2
ack_wait = 5.0
[flows.retry]
initial_delay = 0.2
max_delay = 1.0
"""
    if source is not None:
        text += f"""
[flows.source]
adapter = "sqlite"
path = "{source}"
table = "customers"
key = "id"
batch_size = 500
poll_interval = 0.02
"""
    if sink is not None:
        text += f"""
[flows.sink]
adapter = "sqlite"
path = "{sink}"
table = "customers"
key = "id"
"""
    return text + extra


class ErpLoad:
    """Inserts, updates and deletes customers in the ERP database, like a busy ERP."""

    def __init__(self, db: Path, seed: int = 1) -> None:
        self.db = db
        self.rng = random.Random(seed)
        self.live: list[int] = []
        self.next_id = 1

    def _row(self, i: int) -> tuple[object, ...]:
        r = self.rng
        return (
            i,
            f"Customer {i} \u00e9\u00df",
            f"c{i}@example.com",
            r.choice(["DE", "FR", "US", None]),
            r.randrange(0, 10**9),
            r.random() * 1000,  # full-precision doubles must round-trip
        )

    def insert(self, n: int) -> None:
        rows = [self._row(self.next_id + k) for k in range(n)]
        with sqlite3.connect(self.db, timeout=30) as c:
            c.executemany("INSERT INTO customers VALUES (?, ?, ?, ?, ?, ?)", rows)
        self.live.extend(range(self.next_id, self.next_id + n))
        self.next_id += n

    def update(self, n: int) -> None:
        ids = self.rng.sample(self.live, min(n, len(self.live)))
        with sqlite3.connect(self.db, timeout=30) as c:
            c.executemany(
                "UPDATE customers SET credit_limit_cents = ?, name = name || '+' WHERE id = ?",
                [(self.rng.randrange(0, 10**9), i) for i in ids],
            )

    def delete(self, n: int) -> None:
        ids = self.rng.sample(self.live, min(n, len(self.live)))
        with sqlite3.connect(self.db, timeout=30) as c:
            c.executemany("DELETE FROM customers WHERE id = ?", [(i,) for i in ids])
        gone = set(ids)
        self.live = [i for i in self.live if i not in gone]

    def mixed(self, n: int) -> None:
        for _ in range(n):
            roll = self.rng.random()
            if roll < 0.4 or len(self.live) < 10:
                self.insert(self.rng.randrange(1, 20))
            elif roll < 0.85:
                self.update(self.rng.randrange(1, 20))
            else:
                self.delete(self.rng.randrange(1, 5))


def rows(db: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(db, timeout=30) as c:
        return c.execute("SELECT * FROM customers ORDER BY id").fetchall()


def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def assert_same_rows(erp: Path, crm: Path) -> None:
    a, b = rows(erp), rows(crm)
    assert len(a) == len(b), f"ERP has {len(a)} rows, CRM {len(b)}"
    for ra, rb in zip(a, b, strict=True):
        assert ra == rb, f"row differs: ERP {ra!r} CRM {rb!r}"


def assert_effect_once(crm: Path) -> None:
    """No (key, version) applied twice, versions strictly increasing per key, and one data
    write per version-guard move."""
    with sqlite3.connect(crm, timeout=30) as c:
        log = c.execute("SELECT key, version FROM version_log ORDER BY n").fetchall()
        data_writes = c.execute("SELECT count(*) FROM data_log").fetchone()[0]
    last: dict[str, int] = {}
    for key, version in log:
        assert version > last.get(key, -1), f"key {key}: version {version} after {last.get(key)}"
        last[key] = version
    assert data_writes <= len(log), f"{data_writes} data writes for {len(log)} applied versions"


def consumer_settled(url: str, durable: str, creds: Path, stream: str = "MESH_EVENTS") -> bool:
    """True when the durable consumer has nothing pending and nothing awaiting an ack, so no
    redelivery can still arrive (asked with ``creds``, e.g. the admin's)."""
    import asyncio

    import nats

    async def check() -> bool:
        nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=1, user_credentials=str(creds))
        try:
            info = await nc.jetstream().consumer_info(stream, durable)
        finally:
            await nc.close()
        return info.num_pending == 0 and info.num_ack_pending == 0

    try:
        return asyncio.run(check())
    except Exception:
        return False


def log_tail(path: Path, chars: int = 3000) -> str:
    """The last ``chars`` characters of a process log (for failure messages)."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"(no log: {exc})"


class AgentProcess:
    """`meshctl agent run` as a child process that a test can SIGKILL and restart.

    The agent always serves its endpoint: on the port its config names, or (none named) on a
    free port the agent picks (``--metrics-port 0``) and writes to ``<state_dir>/endpoint.json``.
    :meth:`start` waits for ``GET /readyz`` to answer 200 (stores, NATS link, command channel
    and signal handlers up), and :meth:`terminate` never sends SIGTERM before the signal handlers
    are installed, so neither a command nor a SIGTERM can arrive too early.
    """

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._signals_seen = False
        self._state_dir: Path | None = None

    @property
    def state_dir(self) -> Path:
        """The agent's state dir, as its config file says (read at each start)."""
        if self._state_dir is None:
            from mesh.config import load_agent_config

            self._state_dir = Path(load_agent_config(self.config).agent.state_dir)
        return self._state_dir

    def start(self, env: dict[str, str] | None = None, *, wait: bool = True, timeout: float = 30) -> None:
        """Start the agent; with ``wait`` (the default) return once it is ready.

        Raises:
            AssertionError: it exited or was not ready within ``timeout`` (with its log tail).
        """
        from mesh.config import load_agent_config

        self.starts += 1
        self._signals_seen = False
        agent = load_agent_config(self.config).agent
        self._state_dir = Path(agent.state_dir)
        extra = [] if agent.metrics_port is not None else ["--metrics-port", "0"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mesh", "agent", "run", "--config", str(self.config), *extra],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env={**os.environ, **(env or {})},
            )  # fmt: skip
        if wait:
            self.wait_ready(timeout)

    @property
    def readyz_url(self) -> str | None:
        """The agent's ``/readyz`` URL once this run of it has written its endpoint file."""
        from mesh.endpoint import read_endpoint_file

        if self.proc is None:
            return None
        doc = read_endpoint_file(self.state_dir, pid=self.proc.pid)
        return str(doc["readyz"]) if doc else None

    def readyz(self) -> dict[str, object] | None:
        """The current ``/readyz`` body, or None while nothing answers."""
        from mesh.readiness import probe

        url = self.readyz_url
        answer = probe(url) if url else None
        return answer[1] if answer else None

    def wait_ready(self, timeout: float = 30, checks: tuple[str, ...] | None = None) -> dict[str, object]:
        """Wait until ``/readyz`` says ready (or just the named ``checks`` are met).

        Raises:
            AssertionError: the agent exited or the deadline passed (with its log tail).
        """
        from mesh.readiness import NotReady, wait_ready

        try:
            snap = wait_ready(
                lambda: self.readyz_url, timeout=timeout, alive=lambda: self.alive, checks=checks
            )
        except NotReady as exc:
            raise AssertionError(
                f"agent {self.config.name}: {exc}; last /readyz {exc.last}\n"
                f"--- {self.log} (tail) ---\n{log_tail(self.log)}"
            ) from None
        self._signals_seen = True
        return snap

    @property
    def killed_by_sigkill(self) -> bool:
        return self.proc is not None and self.proc.poll() == -signal.SIGKILL

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def terminate(self, timeout: float = 10) -> int | None:
        """SIGTERM (once the agent's handlers are installed) and wait; the exit code.

        Raises:
            AssertionError: the agent ignored SIGTERM for ``timeout`` seconds (it is then killed),
                or its signal handlers never came up.
        """
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            if not self._signals_seen:
                with contextlib.suppress(AssertionError):  # it may exit meanwhile: handled below
                    self.wait_ready(timeout=30, checks=("signals",))
            if self.proc.poll() is None:
                self.proc.terminate()
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired as exc:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"agent {self.config.name} ignored SIGTERM for {timeout}s") from exc
        return self.proc.returncode

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None
