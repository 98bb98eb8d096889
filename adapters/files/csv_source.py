"""CSV import: files dropped into a directory (or one file) become upserts (and deletes), in
chunks, resumable after a crash at the next chunk, with a run record per file.

What a file goes through::

    inbox_dir/*.csv (oldest first, settled) ─► SHA-256 ─► already imported? ─► duplicate run, moved
        └─► run record (running) ─► header ─► chunks of ``chunk_rows`` rows ─► Changes + cursor
            ─► ... ─► last chunk committed ─► rejects file written ─► moved to done_dir ─► complete

Guarantees:

* **No loss, no duplicate (I1, I2).** The cursor names the run, the file and its SHA-256, the
  byte offset and line number after the last row read, and the counts so far. The agent stores
  it in the same transaction as the envelopes; after a crash :meth:`CsvSource.read` seeks to
  that offset and goes on with the next chunk. Versions (and so envelope ids) depend only on
  the run and the line, so a chunk read twice yields the same ids.
* **A file is imported once.** Files are identified by their SHA-256: a file whose content an
  earlier run completed gets a ``duplicate`` run record and is moved away like a done file.
  A file left in place (no ``done_dir``) is remembered by path, size and modification time.
* **Versions.** With ``version_column``, its integer (or ISO-8601 timestamp, in microseconds).
  Otherwise ``run id * 2**32 + line``: run ids grow in the order files are picked up (oldest
  modification time first, then name), so a later file supersedes an earlier one for the same
  key, and a later line an earlier one within a file. The run ids live in the state file:
  deleting it would restart them and make re-imported data look older than what sinks hold.
* **Bad rows do not stop a file.** A row with the wrong number of fields, a missing key, a cell
  its column type refuses, malformed quoting or bytes that are not valid in ``encoding`` is
  counted as failed and kept (line, reason, raw text) in the state file; the rejects file
  ``<state file stem>-rejects/run-NNNNNN.csv`` next to the state file is written when the run
  ends. A file whose header lacks a configured column fails as a whole (``failed`` run, moved
  to ``failed_dir`` if set).
* **Run records** count rows in (read), out (emitted) and failed; the counts follow the
  committed cursor, so after a crash they are exactly what reached the outbox.
* A file that changes or disappears during its import fails its run (what was emitted stays
  emitted). Files are picked up once unmodified for ``settle_time`` seconds; writers should
  still write under a name the pattern does not match and rename.

:meth:`CsvSource.read` blocks, looking for new files every ``poll_interval`` seconds, and is
cancellable while it waits. File and database work runs in worker threads.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

import anyio
import anyio.lowlevel
import anyio.to_thread
import msgspec

from adapters.files._csvio import (
    Record,
    convert,
    fsync_dir,
    is_true,
    read_records,
    reader_options,
    sha256_file,
    start_offset,
    text_encoding,
    version_of,
    write_durably,
)
from adapters.files._state import StateDB, rejects_path
from adapters.files.config import CsvSourceConfig
from mesh.adapters import Change, ChangeBatch, Source
from mesh.errors import ConfigError, SystemUnavailable

__all__ = ["CsvSource"]

log = logging.getLogger(__name__)

_LINE_BITS = 32  # derived version = run id << 32 | line


class _Pos(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where an import stands; the cursor is its JSON."""

    run: int
    sha: str
    file: str
    off: int
    """Byte offset after the last row read."""
    line: int
    """Physical lines up to ``off``."""
    rows: int = 0
    out: int = 0
    failed: int = 0
    eof: bool = False


_POS_ENCODER = msgspec.json.Encoder()
_POS_DECODER = msgspec.json.Decoder(_Pos)


class _Plan(NamedTuple):
    """How one file's header maps onto rows."""

    header: list[str]
    types: list[str]
    keys: list[int]
    version: int | None
    delete: int | None


class _Progress(NamedTuple):
    """Rows were consumed but none became a change; go on from ``pos`` (None: next file)."""

    pos: _Pos | None


class _FileProblem(Exception):
    """This file cannot be imported (its run fails); the source moves on."""


class CsvSource(Source):
    """Imports CSV files as changes, chunked and resumable (see the module docstring)."""

    def __init__(self, config: CsvSourceConfig) -> None:
        self._cfg = config
        self._db = StateDB(config.state_path)
        self._limiter = anyio.CapacityLimiter(1)
        self._options = reader_options(config)
        self._encoding = text_encoding(config.encoding)
        self._bom = self._encoding == "utf-8"
        self._plans: dict[int, _Plan] = {}
        self._verified: dict[int, tuple[int, int]] = {}  # run -> (size, mtime_ns) checked
        self._synced: _Pos | None = None
        self._pos: _Pos | None = None
        self._open = False

    def __repr__(self) -> str:
        where = self._cfg.path or f"{self._cfg.inbox_dir}/{self._cfg.pattern}"
        pos = self._pos
        at = f" run={pos.run} line={pos.line}" if pos is not None else ""
        return f"<CsvSource {where}{at}{'' if self._open else ' closed'}>"

    async def _thread(self, fn: Any, *args: Any) -> Any:
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def open(self) -> None:
        """Open the state file; check the inbox; create ``done_dir`` / ``failed_dir``.

        Raises:
            ConfigError: ``inbox_dir`` (or the directory of ``path``) does not exist.
            SystemUnavailable: the state file cannot be opened or a directory created.
        """
        if self._open:
            return
        cfg = self._cfg
        inbox = cfg.inbox_dir if cfg.inbox_dir is not None else str(Path(cfg.path or ".").parent)
        if not await anyio.Path(inbox).is_dir():
            raise ConfigError(f"CSV source directory {inbox} does not exist")
        for d in (cfg.done_dir, cfg.failed_dir):
            if d is not None:
                try:
                    await anyio.Path(d).mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise SystemUnavailable(f"cannot create {d}: {exc}") from exc
        await self._thread(self._db.open)
        self._open = True

    async def aclose(self) -> None:
        """Close the state file. Idempotent."""
        if self._open:
            self._open = False
            with anyio.CancelScope(shield=True):
                await self._thread(self._db.close)

    async def read(self, cursor: str | None, limit: int) -> ChangeBatch:
        """Up to ``limit`` rows' changes after ``cursor``; blocks until there is at least one.

        Raises:
            SystemUnavailable: the state file or an inbox file cannot be read now; retry from
                the same cursor.
            ConfigError: ``cursor`` is not a cursor of a CSV source.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        if not self._open:
            raise RuntimeError(f"{self!r} is not open")
        pos = self._decode(cursor)
        committed = True
        while True:
            result = await self._thread(self._step, pos, committed, limit)
            if isinstance(result, ChangeBatch):
                return result
            if isinstance(result, _Progress):
                pos, committed = result.pos, False
                await anyio.lowlevel.checkpoint()
            else:
                await anyio.sleep(self._cfg.poll_interval)

    async def committed(self, cursor: str) -> None:
        """The run record takes the cursor's counts; the last chunk of a file completes its run
        (rejects file, move to ``done_dir``).

        Raises:
            SystemUnavailable: the state file cannot be written now (the next read redoes it).
        """
        pos = self._decode(cursor)
        if pos is not None:
            await self._thread(self._sync, pos)

    # --- the steps (worker thread) ---------------------------------------------------------------

    def _decode(self, cursor: str | None) -> _Pos | None:
        if cursor is None:
            return None
        try:
            return _POS_DECODER.decode(cursor)
        except msgspec.DecodeError:
            raise ConfigError(f"{cursor!r} is not a cursor of a CSV source") from None

    def _step(self, pos: _Pos | None, committed: bool, limit: int) -> ChangeBatch | _Progress | None:
        try:
            if pos is not None:
                pos = self._sync(pos) if committed else pos
            if pos is None:
                pos = self._next_file()
                if pos is None:
                    return None
            self._pos = pos
            return self._read_chunk(pos, limit)
        except OSError as exc:
            raise SystemUnavailable(f"CSV source: {exc}") from exc

    def _sync(self, pos: _Pos) -> _Pos | None:
        """Bring the run record up to the committed ``pos``; None when that run is over."""
        db = self._db
        found = db.one("SELECT status FROM mesh_file_runs WHERE id = ?", (pos.run,))
        if found is None:  # the state file was replaced: adopt the agent's cursor
            with db.transaction() as conn:
                conn.execute(
                    "INSERT INTO mesh_file_runs (id, direction, file, checksum, status, started_at, detail)"
                    " VALUES (?, 'import', ?, ?, 'running', ?, 'run record re-created from the cursor')",
                    (pos.run, pos.file, pos.sha, time.time()),
                )
            found = ("running",)
        if found[0] != "running":
            return None
        if pos.eof:
            self._finish(pos)
            return None
        if pos.run not in self._verified:
            log.info("import run %d: resuming %s after line %d", pos.run, pos.file, pos.line)
        if pos != self._synced:
            with db.transaction() as conn:
                conn.execute(
                    "UPDATE mesh_file_runs SET rows_in = ?, rows_out = ?, rows_failed = ? "
                    "WHERE id = ? AND status = 'running'",
                    (pos.rows, pos.out, pos.failed, pos.run),
                )
            self._synced = pos
        return pos

    def _candidates(self) -> list[tuple[Path, os.stat_result]]:
        cfg = self._cfg
        ripe = time.time() - cfg.settle_time
        if cfg.path is not None:
            paths = [Path(cfg.path)]
        else:
            avoid = [Path(d) for d in (cfg.done_dir, cfg.failed_dir) if d is not None]
            avoid.append(rejects_path(cfg.state_path, 0).parent)
            paths = [
                p for p in Path(cfg.inbox_dir or ".").glob(cfg.pattern)
                if not p.name.startswith(".") and not any(p.is_relative_to(a) for a in avoid)
            ]  # fmt: skip
        found = []
        for p in paths:
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            if p.is_file() and st.st_mtime <= ripe:
                found.append((p, st))
        found.sort(key=lambda item: (item[1].st_mtime_ns, item[0].name))
        return found

    def _next_file(self) -> _Pos | None:
        """Start (or restart) the run of the oldest file not imported yet; None: nothing to do."""
        db = self._db
        for path, st in self._candidates():
            stat = (st.st_size, st.st_mtime_ns)
            seen = db.one(
                "SELECT s.size, s.mtime_ns, s.checksum, s.run_id, r.status, r.moved_to "
                "FROM mesh_file_seen s LEFT JOIN mesh_file_runs r ON r.id = s.run_id WHERE s.path = ?",
                (str(path),),
            )
            if seen is not None and (seen[0], seen[1]) == stat and seen[5] is None:
                status = seen[4]
                if status == "running":  # begun, but no chunk of it was committed
                    pos = self._begin(path, stat, seen[2], seen[3])
                    if pos is not None:
                        return pos
                elif status in ("failed", "duplicate"):
                    self._move_finished(seen[3], path, status)
                continue
            try:
                sha = sha256_file(path)
                after = path.stat()
                if (after.st_size, after.st_mtime_ns) != stat:
                    continue  # still being written
            except FileNotFoundError:
                continue
            with db.transaction() as conn:
                prev = conn.execute(
                    "SELECT id, status, file FROM mesh_file_runs WHERE direction = 'import' "
                    "AND checksum = ? AND status IN ('running', 'complete') ORDER BY id LIMIT 1",
                    (sha,),
                ).fetchone()
                if prev is not None and prev[1] == "complete":
                    run = db.new_run(conn, "import", str(path), sha, status="duplicate",
                                     detail=f"same content as run {prev[0]} ({prev[2]})")  # fmt: skip
                    conn.execute("UPDATE mesh_file_runs SET finished_at = ? WHERE id = ?", (time.time(), run))
                else:
                    run = prev[0] if prev is not None else db.new_run(conn, "import", str(path), sha)
                    conn.execute("UPDATE mesh_file_runs SET file = ? WHERE id = ?", (str(path), run))
                conn.execute(
                    "INSERT OR REPLACE INTO mesh_file_seen (path, size, mtime_ns, checksum, run_id) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (str(path), *stat, sha, run),
                )
            if prev is not None and prev[1] == "complete":
                log.info("%s: same content as import run %d; not imported again (run %d)", path, prev[0], run)
                self._move_finished(run, path, "duplicate")
                continue
            pos = self._begin(path, stat, sha, run)
            if pos is not None:
                return pos
        return None

    def _begin(self, path: Path, stat: tuple[int, int], sha: str, run: int) -> _Pos | None:
        self._verified[run] = stat
        try:
            plan, off, lines = self._header(path)
        except _FileProblem as exc:
            self._end(run, path, "failed", str(exc), None)
            return None
        self._plans[run] = plan
        log.info("import run %d: %s (sha256 %s)", run, path, sha[:12])
        return _Pos(run=run, sha=sha, file=str(path), off=off, line=lines)

    def _header(self, path: Path) -> tuple[_Plan, int, int]:
        cfg = self._cfg
        with open(path, "rb") as f:
            start = start_offset(f) if self._bom else 0
            chunk = read_records(f, start, 0, 1, self._encoding, self._options)
        if not chunk.records:
            raise _FileProblem("no header row (the file is empty)")
        first = chunk.records[0]
        if first.error is not None:
            raise _FileProblem(f"header (line {first.line}): {first.error}")
        header = [h.strip() for h in first.fields]
        twice = sorted({h for h in header if header.count(h) > 1})
        if twice:
            raise _FileProblem(f"header names {', '.join(map(repr, twice))} more than once")
        wanted = [*cfg.key_columns, *filter(None, (cfg.version_column, cfg.delete_column)), *cfg.columns]
        missing = [c for c in dict.fromkeys(wanted) if c not in header]
        if missing:
            raise _FileProblem(
                f"header lacks configured column(s) {', '.join(map(repr, missing))} "
                f"(it has {', '.join(map(repr, header))})"
            )
        index = {h: i for i, h in enumerate(header)}
        plan = _Plan(
            header=header,
            types=[cfg.columns.get(h, "string") for h in header],
            keys=[index[k] for k in cfg.key_columns],
            version=None if cfg.version_column is None else index[cfg.version_column],
            delete=None if cfg.delete_column is None else index[cfg.delete_column],
        )
        return plan, chunk.offset, chunk.lines

    def _verify(self, pos: _Pos) -> tuple[int, int]:
        """The file's (size, mtime_ns), once it is known to still hold ``pos.sha``."""
        try:
            st = os.stat(pos.file)
        except FileNotFoundError:
            raise _FileProblem("the file disappeared before its import finished") from None
        stat = (st.st_size, st.st_mtime_ns)
        if self._verified.get(pos.run) == stat:
            return stat
        seen = self._db.one("SELECT size, mtime_ns, checksum FROM mesh_file_seen WHERE path = ?", (pos.file,))
        known = seen is not None and (seen[0], seen[1]) == stat and seen[2] == pos.sha
        if not known and sha256_file(pos.file) != pos.sha:
            raise _FileProblem("the file changed while it was being imported")
        self._verified[pos.run] = stat
        return stat

    def _read_chunk(self, pos: _Pos, limit: int) -> ChangeBatch | _Progress:
        try:
            stat = self._verify(pos)
            plan = self._plans.get(pos.run)
            if plan is None:
                plan = self._plans[pos.run] = self._header(Path(pos.file))[0]
            with open(pos.file, "rb") as f:
                chunk = read_records(f, pos.off, pos.line, limit, self._encoding, self._options)
                st = os.fstat(f.fileno())
            if (st.st_size, st.st_mtime_ns) != stat:
                raise _FileProblem("the file changed while it was being imported")
        except _FileProblem as exc:
            self._end(pos.run, Path(pos.file), "failed", str(exc), pos)
            return _Progress(None)
        changes, rejects = self._convert(pos.run, plan, chunk.records)
        if rejects:
            with self._db.transaction() as conn:
                conn.executemany(
                    "INSERT OR REPLACE INTO mesh_file_rejects (run_id, line, reason, raw) "
                    "VALUES (?, ?, ?, ?)",
                    [(pos.run, line, reason, raw) for line, reason, raw in rejects],
                )
        new = msgspec.structs.replace(
            pos,
            off=chunk.offset,
            line=chunk.lines,
            rows=pos.rows + len(chunk.records),
            out=pos.out + len(changes),
            failed=pos.failed + len(rejects),
            eof=chunk.eof,
        )
        if changes:
            return ChangeBatch(changes=changes, cursor=_POS_ENCODER.encode(new).decode())
        if new.eof:  # the rest of the file held no change: nothing left for a cursor to carry
            self._finish(new)
            return _Progress(None)
        return _Progress(new)

    def _convert(
        self, run: int, plan: _Plan, records: list[Record]
    ) -> tuple[list[Change], list[tuple[int, str, str]]]:
        changes: list[Change] = []
        rejects: list[tuple[int, str, str]] = []
        width = len(plan.header)
        single = len(plan.keys) == 1
        for rec in records:
            if rec.error is not None:
                rejects.append((rec.line, rec.error, rec.raw))
                continue
            fields = rec.fields
            if len(fields) != width:
                rejects.append((rec.line, f"expected {width} fields, found {len(fields)}", rec.raw))
                continue
            row: dict[str, Any] = {}
            try:
                for name, kind, text in zip(plan.header, plan.types, fields, strict=True):
                    try:
                        row[name] = convert(text, kind)
                    except ValueError as exc:
                        raise ValueError(f"column {name!r}: {exc}") from None
                parts = []
                for i in plan.keys:
                    value = row[plan.header[i]]
                    if value is None or (isinstance(value, str) and not value.strip()):
                        raise ValueError(f"missing key (column {plan.header[i]!r} is empty)")
                    parts.append(value if isinstance(value, str) else str(value))
                if plan.version is not None:
                    try:
                        version = version_of(fields[plan.version])
                    except ValueError as exc:
                        raise ValueError(f"column {plan.header[plan.version]!r}: {exc}") from None
                elif rec.line >= 1 << _LINE_BITS:
                    raise ValueError("line number too large for a derived version")
                else:
                    version = (run << _LINE_BITS) | rec.line
            except ValueError as exc:
                rejects.append((rec.line, str(exc), rec.raw))
                continue
            deleted = plan.delete is not None and is_true(fields[plan.delete])
            key = parts[0] if single else "/".join(quote(p, safe="") for p in parts)
            changes.append(Change(key=key, version=version, deleted=deleted, row=row))
        return changes, rejects

    # --- the end of a run --------------------------------------------------------------------------

    def _finish(self, pos: _Pos) -> None:
        self._end(pos.run, Path(pos.file), "complete", "", pos)

    def _end(self, run: int, path: Path, status: str, detail: str, pos: _Pos | None) -> None:
        """Finish run ``run`` as ``status``: rejects file, move, record. Idempotent."""
        found = self._db.one("SELECT status FROM mesh_file_runs WHERE id = ?", (run,))
        if found is None or found[0] != "running":
            return
        failed = pos.failed if pos is not None else 0
        rejects = self._write_rejects(run) if failed else None
        target = self._cfg.done_dir if status == "complete" else self._cfg.failed_dir
        moved = self._move(path, target, run)
        with self._db.transaction() as conn:
            conn.execute(
                "UPDATE mesh_file_runs SET status = ?, finished_at = ?, detail = ?, rows_in = ?, "
                "rows_out = ?, rows_failed = ?, rejects_file = ?, moved_to = ? "
                "WHERE id = ? AND status = 'running'",
                (status, time.time(), detail, pos.rows if pos else 0, pos.out if pos else 0, failed,
                 rejects, moved, run),
            )  # fmt: skip
        self._plans.pop(run, None)
        self._verified.pop(run, None)
        if status == "complete":
            assert pos is not None
            log.info(
                "import run %d complete: %s: %d rows in, %d out, %d failed%s",
                run, path, pos.rows, pos.out, failed, f" (rejects: {rejects})" if rejects else "",
            )  # fmt: skip
        else:
            log.error("import run %d failed: %s: %s", run, path, detail)

    def _move_finished(self, run: int, path: Path, status: str) -> None:
        """Move a duplicate (to ``done_dir``) or failed file (to ``failed_dir``) out of the inbox."""
        target = self._cfg.done_dir if status == "duplicate" else self._cfg.failed_dir
        moved = self._move(path, target, run)
        if moved is not None:
            with self._db.transaction() as conn:
                conn.execute("UPDATE mesh_file_runs SET moved_to = ? WHERE id = ?", (moved, run))

    def _move(self, path: Path, target: str | None, run: int) -> str | None:
        """Move ``path`` into ``target`` (keeping its name unless taken); where it went, or None."""
        if target is None:
            return None
        directory = Path(target)
        primary = directory / path.name
        other = directory / f"{path.stem}.run-{run:06d}{path.suffix}"
        if not path.exists():  # moved before a crash, not yet recorded
            return str(other) if other.exists() else str(primary) if primary.exists() else None
        dest = other if primary.exists() else primary
        shutil.move(path, dest)
        fsync_dir(directory)
        fsync_dir(path.parent)
        return str(dest)

    def _write_rejects(self, run: int) -> str:
        rows = self._db.query(
            "SELECT line, reason, raw FROM mesh_file_rejects WHERE run_id = ? ORDER BY line", (run,)
        )
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["line", "reason", "raw"])
        writer.writerows(rows)
        path = rejects_path(self._cfg.state_path, run)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_durably(path, buf.getvalue().encode("utf-8"))
        return str(path)
