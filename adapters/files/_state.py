"""The CSV adapters' own SQLite state file (``state_path``): run records, rejected rows, files
seen, and the sink's version guard and stage.

One plain ``sqlite3`` connection in WAL mode with ``synchronous=FULL``, used from worker threads
one call at a time (the owner serialises calls with a capacity limiter). Every write goes
through :meth:`StateDB.transaction` (``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on any
error), so what a caller sees as done is durable. ``sqlite3`` errors become
:class:`~mesh.errors.SystemUnavailable` (disk full, locked, unreadable): the caller retries.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from mesh.errors import SystemUnavailable

SCHEMA = """
CREATE TABLE IF NOT EXISTS mesh_file_runs (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    direction    TEXT NOT NULL,            -- 'import' | 'export'
    file         TEXT NOT NULL,
    checksum     TEXT,                     -- SHA-256 (hex) of the file
    status       TEXT NOT NULL,            -- running | complete | failed | duplicate
    started_at   REAL NOT NULL,
    finished_at  REAL,
    rows_in      INTEGER NOT NULL DEFAULT 0,
    rows_out     INTEGER NOT NULL DEFAULT 0,
    rows_failed  INTEGER NOT NULL DEFAULT 0,
    detail       TEXT NOT NULL DEFAULT '',
    rejects_file TEXT,
    moved_to     TEXT
);
CREATE INDEX IF NOT EXISTS mesh_file_runs_checksum ON mesh_file_runs (direction, checksum);
CREATE TABLE IF NOT EXISTS mesh_file_rejects (
    run_id INTEGER NOT NULL, line INTEGER NOT NULL, reason TEXT NOT NULL, raw TEXT NOT NULL,
    PRIMARY KEY (run_id, line)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS mesh_file_seen (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    checksum TEXT NOT NULL, run_id INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS mesh_csv_versions (
    key TEXT NOT NULL, scope TEXT NOT NULL, version INTEGER NOT NULL, deleted INTEGER NOT NULL,
    PRIMARY KEY (key, scope)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS mesh_csv_stage (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    key       TEXT NOT NULL,
    scope     TEXT NOT NULL,
    version   INTEGER NOT NULL,
    deleted   INTEGER NOT NULL,
    row       BLOB NOT NULL,                -- msgpack of the record's row
    staged_at REAL NOT NULL,
    run_id    INTEGER                       -- NULL: waiting; else the export run it belongs to
);
CREATE INDEX IF NOT EXISTS mesh_csv_stage_run ON mesh_csv_stage (run_id, seq);
CREATE INDEX IF NOT EXISTS mesh_csv_stage_waiting ON mesh_csv_stage (key, scope) WHERE run_id IS NULL;
CREATE TABLE IF NOT EXISTS mesh_csv_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
"""

RUN_COLUMNS = (
    "id, direction, file, checksum, status, started_at, finished_at, rows_in, rows_out, "
    "rows_failed, detail, rejects_file, moved_to"
)


class StateDB:
    """The state file at ``path``; created (with its directory) by :meth:`open`."""

    def __init__(self, path: str, *, busy_timeout: float = 10.0) -> None:
        self.path = path
        self._busy_timeout = busy_timeout
        self._conn: sqlite3.Connection | None = None

    def __repr__(self) -> str:
        return f"<StateDB {self.path}{'' if self._conn else ' closed'}>"

    def open(self) -> None:
        """Open or create the file and its tables.

        Raises:
            SystemUnavailable: the file cannot be created, opened or written now.
        """
        if self._conn is not None:
            return
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise SystemUnavailable(f"CSV adapter state {self.path}: {exc}") from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {round(self._busy_timeout * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.executescript(SCHEMA)
        except sqlite3.Error as exc:
            conn.close()
            raise SystemUnavailable(f"CSV adapter state {self.path}: {exc}") from exc
        self._conn = conn

    def close(self) -> None:
        """Close the file. Idempotent."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with suppress(sqlite3.Error):
                conn.close()

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"{self!r} is not open")
        return self._conn

    @contextmanager
    def errors(self) -> Iterator[None]:
        """Translate ``sqlite3`` errors raised in the block into :class:`SystemUnavailable`."""
        try:
            yield
        except sqlite3.Error as exc:
            raise SystemUnavailable(f"CSV adapter state {self.path}: {exc}") from exc

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (durable when the block ends); rolled back if it raises."""
        conn = self.conn
        with self.errors():
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                with suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self.errors():
            return [tuple(r) for r in self.conn.execute(sql, params).fetchall()]

    def one(self, sql: str, params: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def new_run(self, conn: sqlite3.Connection, direction: str, file: str, checksum: str | None,
                status: str = "running", detail: str = "") -> int:  # fmt: skip
        """Insert a run record (inside the caller's transaction) and return its id."""
        cur = conn.execute(
            "INSERT INTO mesh_file_runs (direction, file, checksum, status, started_at, detail) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (direction, file, checksum, status, time.time(), detail),
        )
        assert cur.lastrowid is not None
        return int(cur.lastrowid)


def rejects_path(state_path: str, run_id: int) -> Path:
    """Where the rejected rows of import run ``run_id`` are written: next to the state file."""
    state = Path(state_path)
    return state.parent / f"{state.stem}-rejects" / f"run-{run_id:06d}.csv"
