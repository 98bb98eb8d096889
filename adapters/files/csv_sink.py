"""CSV export: applied records are cut into CSV files in ``out_dir``, one file per flush, each
with a run record (rows, SHA-256).

What a record goes through::

    apply() ─► [state file: version guard + stage, ONE transaction] ─► durable, acked by the agent
    flusher ─► [assign the oldest ``flush_rows`` staged rows to a new export run] ─► write
        .<name>.tmp, fsync, rename to <name>, fsync dir ─► [drop those rows, run complete]

Guarantees (exactly once in effect):

* **Version guard (I5).** The state file keeps the highest version applied per (key, scope)
  (``SinkRecord.scope``); a record not newer is :attr:`~mesh.adapters.Applied.STALE` and staged
  nowhere, so a redelivery never reaches a second file. A delete keeps its version (a tombstone),
  so an older upsert arriving later is stale too.
* **Durable before ack (I4).** :meth:`CsvSink.apply` returns once the guard and the stage have
  committed (WAL, ``synchronous=FULL``); files are cut from the stage afterwards.
* **Each applied record lands in exactly one file** — or in none, when a newer version of its
  key arrives before the file is cut: the stage keeps the latest waiting row per key (a file is
  the state of its keys at cut time, not a change log), and with ``deletes = "omit"`` a delete
  simply removes the waiting row.
* **A crash never yields a second, different file with the same rows.** Rows are assigned to an
  export run, and the run's file name fixed, in one transaction *before* the file is written;
  the file is written under a temp name, fsync'd and renamed atomically. After a crash anywhere
  in between, :meth:`CsvSink.open` rewrites every unfinished run's file from the same rows under
  the same name (same bytes, same SHA-256) and only then completes it. Readers of ``out_dir``
  should ignore dot-files (the temp names).
* **Stable columns.** ``columns``, or else the fields of the first file's rows in first-seen
  order, fixed from then on (kept in the state file); fields outside them are dropped (logged
  once per name). Then ``version_column`` if set, then ``deleted_column`` (``true``/``false``)
  when ``deletes = "column"``. Values: null empty, booleans ``true``/``false``, floats in their
  shortest round-trip form, bytes base64, lists and objects as JSON.

Files are cut when ``flush_rows`` rows wait (at most that many per file) or when the oldest
waiting row has waited ``flush_interval`` seconds, by a flusher task the sink owns (use it as an
``async with`` block: it runs between :meth:`open` and :meth:`aclose`). A failed write (disk
full, ``out_dir`` gone) is logged and retried with backoff; staged rows wait safely meanwhile.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import msgspec
from anyio.abc import TaskStatus

from adapters.files._csvio import UTF8_BOM, cell, crash_point, write_durably, writer_options
from adapters.files._state import StateDB
from adapters.files.config import CsvSinkConfig
from mesh.actors import Backoff
from mesh.adapters import Applied, Sink, SinkRecord
from mesh.errors import ConfigError, RejectedRecord, SystemUnavailable

__all__ = ["CsvSink"]

log = logging.getLogger(__name__)

_ROW = msgspec.msgpack.Encoder()
_ROW_DECODER = msgspec.msgpack.Decoder(dict[str, Any])
_UTF8 = frozenset({"utf-8", "utf8", "utf-8-sig", "utf8-sig"})


class CsvSink(Sink):
    """Exports applied records to CSV files, exactly once in effect (see the module docstring)."""

    def __init__(self, config: CsvSinkConfig) -> None:
        self._cfg = config
        self._db = StateDB(config.state_path)
        self._limiter = anyio.CapacityLimiter(1)
        self._stack: AsyncExitStack | None = None
        self._wake = anyio.Event()
        self._pending = 0
        self._columns: list[str] | None = list(config.columns) if config.columns is not None else None
        self._dropped: set[str] = set()
        self._unfinished = False  # an export run holds rows but its file write failed: redo it first
        self._check_encoding = config.encoding.lower().replace("_", "-") not in _UTF8
        self._applied = self._stale = self._files = 0

    def __repr__(self) -> str:
        state = "" if self._stack is not None else " closed"
        return (
            f"<CsvSink {self._cfg.out_dir} applied={self._applied} stale={self._stale} "
            f"waiting={self._pending} files={self._files}{state}>"
        )

    async def _thread(self, fn: Any, *args: Any) -> Any:
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def open(self) -> None:
        """Open the state file, finish export runs a crash interrupted, start the flusher.

        Raises:
            ConfigError: ``out_dir`` does not exist.
            SystemUnavailable: the state file cannot be opened, or an interrupted file cannot be
                rewritten now.
        """
        if self._stack is not None:
            return
        if not await anyio.Path(self._cfg.out_dir).is_dir():
            raise ConfigError(f"CSV sink out_dir {self._cfg.out_dir} does not exist")
        await self._thread(self._db.open)
        stack = AsyncExitStack()
        try:
            await self._thread(self._recover)
            tg = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(tg.cancel_scope.cancel)
            await tg.start(self._flusher)
        except BaseException:
            await stack.aclose()
            with anyio.CancelScope(shield=True):
                await self._thread(self._db.close)
            raise
        self._stack = stack

    async def aclose(self) -> None:
        """Stop the flusher (a file being written is finished first) and close the state file.
        Rows still waiting stay staged for the next start. Idempotent."""
        stack, self._stack = self._stack, None
        if stack is None:
            return
        try:
            await stack.aclose()
        finally:
            with anyio.CancelScope(shield=True):
                await self._thread(self._db.close)

    async def apply(self, records: Sequence[SinkRecord]) -> list[Applied | Exception]:
        """Stage ``records`` under the version guard, in one transaction, durable on return.

        A record with a value the file ``encoding`` cannot represent gets a
        :class:`~mesh.errors.RejectedRecord` in its slot.

        Raises:
            SystemUnavailable: the state file cannot be written; nothing was staged.
        """
        if self._stack is None:
            raise RuntimeError(f"{self!r} is not open")
        before = self._pending
        outcomes: list[Applied | Exception] = await self._thread(self._apply, list(records))
        if self._pending >= self._cfg.flush_rows or (before == 0 and self._pending > 0):
            self._wake.set()
        return outcomes

    async def flush(self) -> int:
        """Cut files now for every row waiting (``flush_rows`` at most per file), regardless of
        ``flush_interval``; returns how many files were written.

        Raises:
            SystemUnavailable: the state file cannot be used or a file cannot be written now.
        """
        if self._stack is None:
            raise RuntimeError(f"{self!r} is not open")
        files: int = await self._thread(self._flush_all)
        return files

    # --- worker-thread steps -------------------------------------------------------------------

    def _apply(self, records: list[SinkRecord]) -> list[Applied | Exception]:
        cfg = self._cfg
        outcomes: list[Applied | Exception] = []
        now = time.time()
        delta = 0
        latest: dict[tuple[str, str], int] = {}
        with self._db.transaction() as conn:
            for r in records:
                k = (r.key, r.scope)
                if k in latest:
                    current: int | None = latest[k]
                else:
                    found = conn.execute(
                        "SELECT version FROM mesh_csv_versions WHERE key = ? AND scope = ?", k
                    ).fetchone()
                    current = None if found is None else int(found[0])
                if current is not None and r.version <= current:
                    outcomes.append(Applied.STALE)
                    continue
                problem = self._unwritable(r) if self._check_encoding else None
                if problem is not None:
                    outcomes.append(RejectedRecord(problem))
                    continue
                conn.execute(
                    "INSERT INTO mesh_csv_versions (key, scope, version, deleted) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (key, scope) DO UPDATE SET version = excluded.version, "
                    "deleted = excluded.deleted",
                    (*k, r.version, int(r.deleted)),
                )
                latest[k] = r.version
                delta -= conn.execute(
                    "DELETE FROM mesh_csv_stage WHERE key = ? AND scope = ? AND run_id IS NULL", k
                ).rowcount
                if not (r.deleted and cfg.deletes == "omit"):
                    conn.execute(
                        "INSERT INTO mesh_csv_stage (key, scope, version, deleted, row, staged_at) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (*k, r.version, int(r.deleted), _ROW.encode(r.row), now),
                    )
                    delta += 1
                outcomes.append(Applied.APPLIED)
        self._pending += delta
        self._applied += outcomes.count(Applied.APPLIED)
        self._stale += outcomes.count(Applied.STALE)
        return outcomes

    def _unwritable(self, r: SinkRecord) -> str | None:
        encoding = self._cfg.encoding
        for name, value in [("key", r.key), *r.row.items()]:
            try:
                cell(value).encode(encoding)
            except UnicodeEncodeError:
                return f"field {name!r} holds characters that {encoding} cannot represent"
        return None

    def _recover(self) -> None:
        """Finish every export run a crash interrupted (same rows, same name, same bytes)."""
        db = self._db
        if self._columns is None:
            found = db.one("SELECT value FROM mesh_csv_meta WHERE name = 'columns'")
            if found is not None:
                self._columns = list(json.loads(found[0]))
        self._finish_runs()
        counted = db.one("SELECT count(*) FROM mesh_csv_stage WHERE run_id IS NULL")
        self._pending = int(counted[0]) if counted else 0

    def _finish_runs(self) -> int:
        """Write the file of every export run that holds rows but is not complete (a crash, or a
        write that failed: ``out_dir`` gone, disk full): same rows, same name, same bytes."""
        runs = self._db.query(
            "SELECT id, file FROM mesh_file_runs "
            "WHERE direction = 'export' AND status = 'running' ORDER BY id"
        )
        for run, file in runs:
            log.info("export run %d: finishing %s after an interruption", run, file)
            self._write(int(run), Path(file))
        self._unfinished = False
        return len(runs)

    def _flush_due(self) -> float | None:
        """Cut every file that is due; seconds until the next one is, None when nothing waits."""
        cfg = self._cfg
        if self._unfinished:
            self._finish_runs()
        while self._pending > 0:
            if self._pending < cfg.flush_rows:
                oldest = self._db.one(
                    "SELECT staged_at FROM mesh_csv_stage WHERE run_id IS NULL ORDER BY seq LIMIT 1"
                )
                if oldest is None:
                    self._pending = 0
                    break
                wait = float(oldest[0]) + cfg.flush_interval - time.time()
                if wait > 0:
                    return wait
            if not self._cut():
                break
        return None

    def _flush_all(self) -> int:
        files = self._finish_runs() if self._unfinished else 0
        while self._pending > 0 and self._cut():
            files += 1
        return files

    def _cut(self) -> bool:
        """Assign the oldest waiting rows to a new export run and write its file."""
        cfg = self._cfg
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        columns = self._columns
        with self._db.transaction() as conn:
            last = conn.execute(
                "SELECT max(seq), count(*) FROM (SELECT seq FROM mesh_csv_stage WHERE run_id IS NULL "
                "ORDER BY seq LIMIT ?)",
                (cfg.flush_rows,),
            ).fetchone()
            if not last or not last[1]:
                self._pending = 0
                return False
            run = self._db.new_run(conn, "export", "", None)
            path = Path(cfg.out_dir) / f"{cfg.file_prefix}-{stamp}-{run:06d}.csv"
            n = conn.execute(
                "UPDATE mesh_csv_stage SET run_id = ? WHERE run_id IS NULL AND seq <= ?", (run, last[0])
            ).rowcount
            conn.execute("UPDATE mesh_file_runs SET file = ?, rows_in = ? WHERE id = ?", (str(path), n, run))
            if columns is None:
                columns = self._first_columns(conn, run)
                conn.execute(
                    "INSERT OR REPLACE INTO mesh_csv_meta (name, value) VALUES ('columns', ?)",
                    (json.dumps(columns),),
                )
        self._columns = columns
        self._pending -= n
        self._unfinished = True  # until the write below succeeds
        self._write(run, path)
        self._unfinished = False
        return True

    def _first_columns(self, conn: Any, run: int) -> list[str]:
        names: dict[str, None] = {}
        key = self._cfg.key_column
        if key is not None:
            names[key] = None
        for (blob,) in conn.execute("SELECT row FROM mesh_csv_stage WHERE run_id = ? ORDER BY seq", (run,)):
            names.update(dict.fromkeys(_ROW_DECODER.decode(blob)))
        extra = {
            self._cfg.version_column,
            self._cfg.deleted_column if self._cfg.deletes == "column" else None,
        }
        return [n for n in names if n not in extra]

    def _write(self, run: int, path: Path) -> None:
        """Write run ``run``'s file from its staged rows, then complete the run. Idempotent."""
        cfg = self._cfg
        columns = self._columns or []
        rows = self._db.query(
            "SELECT key, version, deleted, row FROM mesh_csv_stage WHERE run_id = ? ORDER BY seq", (run,)
        )
        header = list(columns)
        if cfg.version_column is not None:
            header.append(cfg.version_column)
        if cfg.deletes == "column":
            header.append(cfg.deleted_column)
        buf = io.StringIO()
        writer = csv.writer(buf, **writer_options(cfg))
        writer.writerow(header)
        known = set(columns)
        for key, version, deleted, blob in rows:
            row = _ROW_DECODER.decode(blob)
            if cfg.key_column is not None and row.get(cfg.key_column) is None:
                row[cfg.key_column] = key
            for name in row.keys() - known - self._dropped:
                self._dropped.add(name)
                log.warning(
                    "CSV export to %s: field %r is not among the columns; left out", cfg.out_dir, name
                )
            values = [cell(row.get(c)) for c in columns]
            if cfg.version_column is not None:
                values.append(str(version))
            if cfg.deletes == "column":
                values.append("true" if deleted else "false")
            writer.writerow(values)
        data = (UTF8_BOM if cfg.bom else b"") + buf.getvalue().encode(cfg.encoding)
        try:
            write_durably(path, data, crash_name="csv_sink.before_rename")
        except OSError as exc:
            raise SystemUnavailable(f"CSV export: cannot write {path}: {exc}") from exc
        crash_point("csv_sink.after_rename")
        checksum = hashlib.sha256(data).hexdigest()
        with self._db.transaction() as conn:
            conn.execute("DELETE FROM mesh_csv_stage WHERE run_id = ?", (run,))
            conn.execute(
                "UPDATE mesh_file_runs SET status = 'complete', finished_at = ?, rows_out = ?, checksum = ? "
                "WHERE id = ?",
                (time.time(), len(rows), checksum, run),
            )
        self._files += 1
        log.info("export run %d: %s, %d rows, sha256 %s", run, path, len(rows), checksum[:12])

    # --- the flusher ---------------------------------------------------------------------------

    async def _flusher(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        backoff = Backoff(base=0.5, cap=30.0)
        failures = 0
        while True:
            self._wake = anyio.Event()
            try:
                wait = await self._thread(self._flush_due)
                failures = 0
            except Exception as exc:  # a flusher that died would strand staged rows: keep going
                wait = backoff.delay(failures)
                failures += 1
                log.error("CSV export to %s: %s; retrying in %.1fs", self._cfg.out_dir, exc, wait)
            with anyio.move_on_after(math.inf if wait is None else wait):
                await self._wake.wait()
