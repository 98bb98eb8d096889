"""Run records of scheduled bulk runs, and the agent's durable store of them.

A :class:`BulkRun` says what one run of a flow did: when it started and ended, its state, how
many rows it read and handed over for publication, how many the sinks applied or failed, and the
checksum of the canonical records it extracted. The source agent keeps its runs in
``<state_dir>/runs.db`` (SQLite, WAL, ``synchronous=FULL``) and reports each change to the
``mesh_runs`` KV bucket, where ``meshctl runs list|show`` reads the runs of every agent and
adapter. The counts are exact with respect to the outbox: they travel inside the checkpoint that
commits with each chunk (see :mod:`mesh.runs.bulk`), and the record is rewritten from the
checkpoint when a run resumes.

``state``: ``running``; ``completed`` (every row extracted and committed to the outbox);
``failed`` (``detail`` says why); ``interrupted`` (the agent stopped mid-run; the run resumes from
its last committed chunk when the flow runs again, and is ``running`` again).

Checksum: the sum modulo 2**128 of the SHA-256 of every extracted record (key, version and
canonical row): independent of chunking and order, so a resumed run has the same checksum as an
uninterrupted one over the same rows.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from pathlib import Path
from typing import Any, Literal

import anyio.to_thread
import msgspec

from mesh.errors import SystemUnavailable

__all__ = ["BulkRun", "RunState", "RunStore", "SinkCounts", "SinkTally", "add_hash", "record_hash", "run_key"]

RunState = Literal["running", "completed", "failed", "interrupted"]

_MOD = 1 << 128
_ENC = msgspec.msgpack.Encoder(order="sorted")


class BulkRun(msgspec.Struct, frozen=True, kw_only=True):
    """One scheduled bulk run of one flow (what ``meshctl runs show`` prints)."""

    id: str
    """``<flow>-<UTC time it was scheduled for>``, e.g. ``customers-20261203T020000Z``."""
    flow: str
    adapter: str
    agent: str = ""
    state: RunState = "running"
    scheduled_for: float = 0.0
    """Seconds since the epoch: the schedule time this run is for."""
    started_at: float = 0.0
    finished_at: float | None = None
    read: int = 0
    """Rows extracted (committed chunks only)."""
    published: int = 0
    """Envelopes committed to the outbox, from which the relay publishes them (I1, I3)."""
    applied: int = 0
    """Sum of what the sinks report (eventually consistent): records written."""
    skipped: int = 0
    """Sum of what the sinks report: records the version guard skipped (stale or unchanged)."""
    failed: int = 0
    """Rows the mapping refused (dead-lettered at capture) plus records the sinks refused."""
    checksum: str = ""
    """Hex sum mod 2**128 of the records' SHA-256 (see the module docstring)."""
    resumed: int = 0
    """How many times the run resumed after a stop or crash."""
    detail: str = ""


def run_key(agent: str, flow: str, run_id: str, role: str) -> str:
    """The ``mesh_runs`` key of one agent's record of a run: ``<agent>.<flow>.<run id>.<role>``
    (``role``: ``source`` or ``sink``). Agents may write only keys that start with their name."""
    return f"{agent}.{flow}.{run_id}.{role}"


def record_hash(key: str, version: int, row: object) -> int:
    """The 128-bit hash of one extracted record (order-independent sums of these make the checksum)."""
    digest = hashlib.sha256(_ENC.encode([key, version, row])).digest()
    return int.from_bytes(digest[:16], "big")


def add_hash(total: int, h: int) -> int:
    return (total + h) % _MOD


_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, flow TEXT NOT NULL, started_at REAL NOT NULL, record BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_flow ON runs (flow, started_at);
"""

_DEC = msgspec.msgpack.Decoder(BulkRun)


class RunStore:
    """``<state_dir>/runs.db``: the run records of this agent's scheduled flows. Each call is
    one short transaction in a worker thread; what it returns as written is durable."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = anyio.Lock()

    def __repr__(self) -> str:
        return f"<RunStore {self.path}>"

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.executescript(_SCHEMA)
        return conn

    def _call(self, sql: str, params: tuple[object, ...]) -> list[tuple[object, ...]]:
        try:
            conn = self._connect()
            try:
                return conn.execute(sql, params).fetchall()
            finally:
                conn.close()
        except (OSError, sqlite3.Error) as exc:
            raise SystemUnavailable(f"run records {self.path}: {exc}") from exc

    async def put(self, run: BulkRun) -> None:
        """Insert or replace ``run``. Raises SystemUnavailable when the file cannot be written."""
        async with self._lock:
            await anyio.to_thread.run_sync(
                self._call,
                "INSERT INTO runs (id, flow, started_at, record) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET record = excluded.record",
                (run.id, run.flow, run.started_at, msgspec.msgpack.encode(run)),
            )

    async def get(self, run_id: str) -> BulkRun | None:
        rows = await anyio.to_thread.run_sync(self._call, "SELECT record FROM runs WHERE id = ?", (run_id,))
        return _DEC.decode(rows[0][0]) if rows else None  # type: ignore[arg-type]

    async def list(self, flow: str | None = None, limit: int = 100) -> list[BulkRun]:
        """The newest ``limit`` runs (of ``flow``), newest first."""
        sql = "SELECT record FROM runs"
        params: tuple[object, ...] = ()
        if flow is not None:
            sql, params = sql + " WHERE flow = ?", (flow,)
        rows = await anyio.to_thread.run_sync(
            self._call, sql + f" ORDER BY started_at DESC LIMIT {int(limit)}", params
        )
        return [_DEC.decode(r[0]) for r in rows]  # type: ignore[arg-type]


class SinkCounts(msgspec.Struct, frozen=True, kw_only=True):
    """What one sink agent did with the envelopes of one run (reported under its own key)."""

    run: str
    flow: str
    agent: str
    applied: int = 0
    skipped: int = 0
    failed: int = 0


_SINK_SCHEMA = """
CREATE TABLE IF NOT EXISTS sink_outcomes (
    run TEXT NOT NULL, flow TEXT NOT NULL, id TEXT NOT NULL, outcome TEXT NOT NULL,
    PRIMARY KEY (run, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sink_runs (run TEXT PRIMARY KEY, flow TEXT NOT NULL, first_seen REAL NOT NULL);
CREATE INDEX IF NOT EXISTS sink_runs_flow ON sink_runs (flow, first_seen);
"""

KEEP_RUNS = 20
"""Per flow, the sink keeps the per-envelope outcomes of this many most recent runs; older runs'
outcomes are dropped (their last counts stay in ``mesh_runs``), so the file does not grow."""


class SinkTally:
    """``<state_dir>/runs.db`` on the sink side: the outcome of every envelope of a run, by id,
    written once (``INSERT OR IGNORE``) after the sink's write and before the inbox records it.

    So a redelivery never counts twice, and ``applied + skipped + failed`` is exact; a crash
    between the sink's write and this record may count that batch as ``skipped`` (the version
    guard's answer on redelivery) instead of ``applied``.
    """

    def __init__(self, path: str | Path, *, keep_runs: int = KEEP_RUNS) -> None:
        self.path = Path(path)
        self.keep_runs = keep_runs
        self._lock = anyio.Lock()

    def __repr__(self) -> str:
        return f"<SinkTally {self.path} keep_runs={self.keep_runs}>"

    def _run(self, work: Any) -> Any:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None)
            try:
                conn.execute("PRAGMA busy_timeout = 5000")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = FULL")
                conn.executescript(_SINK_SCHEMA)
                return work(conn)
            finally:
                conn.close()
        except (OSError, sqlite3.Error) as exc:
            raise SystemUnavailable(f"run records {self.path}: {exc}") from exc

    async def record(self, flow: str, outcomes: list[tuple[str, str, str]]) -> set[str]:
        """Record (run, envelope id, outcome) triples; return the runs that changed."""

        def work(conn: sqlite3.Connection) -> set[str]:
            runs = {run for run, _, _ in outcomes}
            conn.execute("BEGIN IMMEDIATE")
            try:
                before = conn.total_changes
                conn.executemany(
                    "INSERT OR IGNORE INTO sink_outcomes (run, flow, id, outcome) VALUES (?, ?, ?, ?)",
                    [(run, flow, i, o) for run, i, o in outcomes],
                )
                changed = conn.total_changes != before
                new = conn.total_changes
                conn.executemany(
                    "INSERT OR IGNORE INTO sink_runs (run, flow, first_seen) VALUES (?, ?, ?)",
                    [(run, flow, time.time()) for run in sorted(runs)],
                )
                if conn.total_changes != new:  # a new run: forget the outcomes of old ones
                    old = [r for (r,) in conn.execute(
                        "SELECT run FROM sink_runs WHERE flow = ? "
                        "ORDER BY first_seen DESC, rowid DESC LIMIT -1 OFFSET ?",
                        (flow, self.keep_runs),
                    )]  # fmt: skip
                    conn.executemany("DELETE FROM sink_outcomes WHERE run = ?", [(r,) for r in old])
                    conn.executemany("DELETE FROM sink_runs WHERE run = ?", [(r,) for r in old])
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return runs if changed else set()

        async with self._lock:
            changed: set[str] = await anyio.to_thread.run_sync(self._run, work)
            return changed

    async def counts(self, run: str, agent: str) -> SinkCounts | None:
        def work(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            return conn.execute(
                "SELECT flow, outcome, count(*) FROM sink_outcomes WHERE run = ? GROUP BY flow, outcome",
                (run,),
            ).fetchall()

        rows = await anyio.to_thread.run_sync(self._run, work)
        if not rows:
            return None
        by = {o: n for _, o, n in rows}
        return SinkCounts(
            run=run, flow=rows[0][0], agent=agent, applied=by.get("applied", 0), failed=by.get("failed", 0),
            skipped=sum(n for o, n in by.items() if o not in ("applied", "failed")),
        )  # fmt: skip
