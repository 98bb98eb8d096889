"""Config of the CSV adapters: ``adapter = "csv"`` as source (batch import) and sink (batch export)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal, Self

import msgspec

from mesh.config import AdapterConfig, PositiveFloat, PositiveInt, Token

__all__ = ["CsvColumnType", "CsvSinkConfig", "CsvSourceConfig"]


CsvColumnType = Literal["string", "int", "decimal", "bool", "date", "datetime"]
"""How a CSV import reads a column. ``string`` keeps the text as is ("00123" stays "00123");
``int`` is a 64-bit integer; ``decimal`` is validated but kept as its exact text (never a
float); ``bool`` accepts true/false, 1/0, yes/no, t/f, y/n; ``date`` and ``datetime`` are
validated ISO-8601 and kept as text. An empty cell of a typed (non-``string``) column is null."""

_Char = Annotated[str, msgspec.Meta(min_length=1, max_length=1)]
_Column = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
_Path = Annotated[str, msgspec.Meta(min_length=1)]


def _check_csv_encoding(encoding: str) -> None:
    """Files are split into lines on the byte ``\\n``: the encoding must keep ASCII as is."""
    import codecs

    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ValueError(f"encoding: unknown encoding {encoding!r}") from None
    probe = "\r\n,;|\t\"'"
    try:
        same = probe.encode(encoding) == probe.encode("ascii")
    except UnicodeError:
        same = False
    if not same:
        raise ValueError(
            f"encoding: {encoding!r} is not ASCII-compatible (expected e.g. utf-8, cp1252, latin-1)"
        )


class CsvSourceConfig(AdapterConfig, frozen=True, tag="csv"):
    """CSV files as a source: batch import, chunked and resumable (see adapters/files/csv_source.py).

    Exactly one of ``inbox_dir`` (every file matching ``pattern``, oldest first) or ``path``
    (one file, re-imported whenever its content changes). A file is identified by its SHA-256:
    the same content is imported once.
    """

    state_path: _Path
    """The adapter's own SQLite file: run records, rejected rows, files seen."""
    key: _Column | Annotated[list[_Column], msgspec.Meta(min_length=1)]
    """Key column, or several (the key is then their values joined by ``/``, each URL-quoted)."""
    inbox_dir: _Path | None = None
    pattern: _Path = "*.csv"
    path: _Path | None = None
    done_dir: _Path | None = None
    """Move a file here once imported (default: leave it in place; its run is complete)."""
    failed_dir: _Path | None = None
    """Move a file here when its run fails (no header, key column missing, ...)."""
    version_column: _Column | None = None
    """An integer (or ISO-8601 timestamp) column that grows with each change of a key. Default:
    ``run id * 2**32 + line number``, so a later file supersedes an earlier one for the same key
    and a later line supersedes an earlier one within a file."""
    delete_column: _Column | None = None
    """Rows whose value here is true (true/1/yes/t/y) are deletes of their key."""
    columns: dict[_Column, str] = msgspec.field(default_factory=dict)
    """Column types (:data:`CsvColumnType`, default ``string``); a typed column must be in the
    file's header."""
    delimiter: _Char = ","
    quotechar: _Char = '"'
    quoting: Literal["standard", "none"] = "standard"
    """``none``: quote characters are ordinary text."""
    escapechar: _Char | None = None
    doublequote: bool = True
    skipinitialspace: bool = False
    encoding: str = "utf-8"
    """Any ASCII-compatible codec; a UTF-8 byte-order mark is removed."""
    chunk_rows: PositiveInt = 1000
    """Rows read per batch: the unit of progress and of redo after a crash."""
    poll_interval: PositiveFloat = 1.0
    """Seconds between looks for new files when there is nothing to read."""
    settle_time: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    """A file is picked up only once it has not been modified for this many seconds (writers
    should still write under another name and rename into the inbox)."""

    def __post_init__(self) -> None:
        if (self.inbox_dir is None) == (self.path is None):
            raise ValueError("inbox_dir / path: set exactly one of them")
        _check_csv_encoding(self.encoding)
        from typing import get_args

        kinds = get_args(CsvColumnType)
        for name, kind in self.columns.items():
            if kind not in kinds:
                raise ValueError(
                    f"columns.{name}: {kind!r} is not a column type (expected one of: {', '.join(kinds)})"
                )
        keys = [self.key] if isinstance(self.key, str) else self.key
        if len(set(keys)) != len(keys):
            raise ValueError("key: a column is named twice")

    @property
    def key_columns(self) -> list[str]:
        return [self.key] if isinstance(self.key, str) else list(self.key)

    @property
    def batch_size(self) -> int:
        """What the capture loop asks for per read: ``chunk_rows``."""
        return self.chunk_rows

    def resolved(self, resolve: Callable[[str], str]) -> Self:
        def opt(p: str | None) -> str | None:
            return None if p is None else resolve(p)

        return msgspec.structs.replace(
            self,
            state_path=resolve(self.state_path),
            inbox_dir=opt(self.inbox_dir),
            path=opt(self.path),
            done_dir=opt(self.done_dir),
            failed_dir=opt(self.failed_dir),
        )


class CsvSinkConfig(AdapterConfig, frozen=True, tag="csv"):
    """CSV files as a sink: batch export, one file per flush (see adapters/files/csv_sink.py)."""

    out_dir: _Path
    state_path: _Path
    """The adapter's own SQLite file: version guard, staged records, run records."""
    file_prefix: Token = "export"
    """Files are named ``<file_prefix>-<UTC time>-<run id>.csv``."""
    columns: list[_Column] | None = None
    """The header (default: the fields of the first file's rows, fixed from then on)."""
    key_column: _Column | None = None
    """Write the record key into this column when the row lacks it (a delete carries only its key)."""
    version_column: _Column | None = None
    """Also write each record's version into this column."""
    deletes: Literal["column", "omit"] = "column"
    """``column``: deletes are rows with ``deleted_column`` = true; ``omit``: left out."""
    deleted_column: _Column = "_deleted"
    flush_rows: PositiveInt = 10_000
    """Cut a file as soon as this many rows wait (and at most this many rows per file)."""
    flush_interval: PositiveFloat = 60.0
    """Cut a file when the oldest waiting row has waited this many seconds."""
    delimiter: _Char = ","
    quotechar: _Char = '"'
    quoting: Literal["minimal", "all"] = "minimal"
    line_terminator: Literal["\r\n", "\n"] = "\r\n"
    encoding: str = "utf-8"
    bom: bool = False
    """Start each file with a UTF-8 byte-order mark (for spreadsheet programs)."""

    def __post_init__(self) -> None:
        _check_csv_encoding(self.encoding)
        if self.bom and self.encoding.lower().replace("_", "-") not in ("utf-8", "utf8"):
            raise ValueError("bom: only with encoding = 'utf-8'")
        if self.columns is not None and len(set(self.columns)) != len(self.columns):
            raise ValueError("columns: a column is named twice")

    def resolved(self, resolve: Callable[[str], str]) -> Self:
        return msgspec.structs.replace(
            self, out_dir=resolve(self.out_dir), state_path=resolve(self.state_path)
        )
