"""Run records of the CSV adapters: one per imported file and one per exported file.

Both adapters keep them in their state file (``state_path``). An import run counts the data rows
it read (``rows_in``), the changes it emitted (``rows_out``) and the rows it rejected
(``rows_failed``, each with its line and reason in ``rejects_file``); an export run counts the
rows it wrote (``rows_in`` = ``rows_out``). ``checksum`` is the file's SHA-256.

``status`` is ``running``, ``complete``, ``failed`` (``detail`` says why) or, for an import,
``duplicate``: a file whose content an earlier run already imported (``detail`` names it).

Reading never writes: :func:`read_runs` opens the file read-only, so it is safe beside a
running agent.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Literal

import msgspec

from adapters.files._state import RUN_COLUMNS
from adapters.files.config import CsvSinkConfig, CsvSourceConfig
from mesh.adapters import RunRecord, RunStatus
from mesh.errors import SystemUnavailable

__all__ = ["RUN_LOG", "CsvRunLog", "RunRecord", "RunStatus", "read_runs"]

def read_runs(
    state_path: str | Path, *, direction: Literal["import", "export"] | None = None, limit: int | None = None
) -> list[RunRecord]:
    """The run records in ``state_path``, newest first (none when the file does not exist yet).

    Raises:
        SystemUnavailable: the file exists but cannot be read.
    """
    file = Path(state_path)
    if not file.exists():
        return []
    sql = f"SELECT {RUN_COLUMNS} FROM mesh_file_runs"
    params: list[object] = []
    if direction is not None:
        sql += " WHERE direction = ?"
        params.append(direction)
    sql += " ORDER BY id DESC"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    try:
        conn = sqlite3.connect(file.absolute().as_uri() + "?mode=ro", uri=True)
        try:
            conn.execute("PRAGMA busy_timeout = 5000")
            exists = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'mesh_file_runs'"
            ).fetchone()
            rows = conn.execute(sql, params).fetchall() if exists else []
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise SystemUnavailable(f"cannot read run records in {file}: {exc}") from exc
    names = [c.strip() for c in RUN_COLUMNS.split(",")]
    return [msgspec.convert(dict(zip(names, r, strict=True)), RunRecord) for r in rows]


class CsvRunLog:
    """The ``runs`` capability of the CSV source and sink: the records in their ``state_path``."""

    def location(self, cfg: CsvSourceConfig | CsvSinkConfig) -> str:
        return cfg.state_path

    def read(self, cfg: CsvSourceConfig | CsvSinkConfig, *, limit: int | None = None) -> list[RunRecord]:
        return read_runs(cfg.state_path, limit=limit)


RUN_LOG = CsvRunLog()
