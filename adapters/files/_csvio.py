"""CSV plumbing shared by the source and the sink: reading records with their byte offsets and
line numbers, typed cells, checksums, formatting values for export, durable file writes.

Reading works on bytes: a file is split into lines at ``\\n`` (so the encoding must be
ASCII-compatible, which the config checks), each line is decoded and fed to :mod:`csv`, which
pulls lines one at a time and never reads ahead. After each record we therefore know exactly
how many bytes and lines it used: that offset is what a cursor stores, and a later read seeks
straight to it. A UTF-8 byte-order mark at the start of a file is skipped.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import os
import re
import signal
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import msgspec

from adapters.files.config import CsvSinkConfig, CsvSourceConfig

UTF8_BOM = b"\xef\xbb\xbf"
_RAW_MAX = 2000  # characters of a rejected record kept for the rejects file
_INT_RE = re.compile(r"[+-]?[0-9]+")
_DECIMAL_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_INT64 = range(-(2**63), 2**63)
_TRUE = frozenset({"true", "1", "yes", "t", "y"})
_FALSE = frozenset({"false", "0", "no", "f", "n"})
_JSON = msgspec.json.Encoder()


def text_encoding(encoding: str) -> str:
    """The codec lines are decoded with (a UTF-8 BOM is handled separately)."""
    normal = encoding.lower().replace("_", "-")
    return "utf-8" if normal in ("utf-8-sig", "utf8-sig", "utf-8", "utf8") else encoding


def reader_options(cfg: CsvSourceConfig) -> dict[str, Any]:
    """Keyword arguments for :func:`csv.reader`; ``strict``: a malformed quote is an error."""
    return {
        "delimiter": cfg.delimiter,
        "quotechar": cfg.quotechar,
        "quoting": csv.QUOTE_NONE if cfg.quoting == "none" else csv.QUOTE_MINIMAL,
        "escapechar": cfg.escapechar,
        "doublequote": cfg.doublequote,
        "skipinitialspace": cfg.skipinitialspace,
        "strict": True,
    }


class Record(NamedTuple):
    """One CSV record: where it starts, its fields, or why it cannot be read."""

    line: int
    """Physical line (1 = the file's first line) on which the record starts."""
    fields: list[str]
    error: str | None
    raw: str


class Chunk(NamedTuple):
    records: list[Record]
    offset: int
    """Byte offset right after the last record returned."""
    lines: int
    """Physical lines up to ``offset``."""
    eof: bool
    """Nothing but blank lines follows ``offset``."""


def start_offset(f: BinaryIO) -> int:
    """Where the first record starts: 3 when the file begins with a UTF-8 BOM, else 0."""
    f.seek(0)
    return len(UTF8_BOM) if f.read(len(UTF8_BOM)) == UTF8_BOM else 0


def read_records(
    f: BinaryIO, offset: int, lines: int, limit: int, encoding: str, options: dict[str, Any]
) -> Chunk:
    """Up to ``limit`` non-blank records of ``f`` from byte ``offset`` (``lines`` lines before it).

    Never raises for bad content: a record that is not valid CSV or not valid text in
    ``encoding`` comes back with ``error`` set (an unterminated quote swallows the rest of the
    file into one such record, as any CSV reader would).
    """
    f.seek(offset)
    used = [0, 0]  # bytes, lines consumed from ``offset``
    raw: list[str] = []
    bad = [False]

    def source() -> Iterator[str]:
        while True:
            data = f.readline()
            if not data:
                return
            used[0] += len(data)
            used[1] += 1
            try:
                text = data.decode(encoding)
            except UnicodeDecodeError:
                bad[0] = True
                text = data.decode(encoding, "replace")
            raw.append(text)
            yield text

    reader = csv.reader(source(), **options)
    records: list[Record] = []
    while len(records) < limit:
        first = lines + used[1] + 1
        raw.clear()
        bad[0] = False
        error: str | None = None
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            fields, error = [], f"malformed CSV: {exc}"
        text = "".join(raw).rstrip("\r\n")
        if not fields and error is None:
            continue  # a blank line
        if bad[0] and error is None:
            error = f"not valid {encoding} text"
        records.append(Record(first, fields, error, text[:_RAW_MAX]))
    end = offset + used[0]
    f.seek(end)
    rest = f.read(65536)
    while rest and not rest.strip(b"\r\n"):
        rest = f.read(65536)
    return Chunk(records, end, lines + used[1], eof=not rest.strip(b"\r\n"))


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def convert(text: str, kind: str) -> Any:
    """One cell as its column type says; raises ``ValueError`` with the reason."""
    if kind == "string":
        return text
    value = text.strip()
    if not value:
        return None
    if kind == "int":
        if not _INT_RE.fullmatch(value) or int(value) not in _INT64:
            raise ValueError(f"{text!r} is not a 64-bit integer")
        return int(value)
    if kind == "decimal":
        if not _DECIMAL_RE.fullmatch(value):
            raise ValueError(f"{text!r} is not a decimal number")
        return value  # exact: the text itself, never a float
    if kind == "bool":
        lowered = value.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError(f"{text!r} is not a boolean (true/false, 1/0, yes/no)")
    try:
        if kind == "date":
            date.fromisoformat(value)
        else:
            datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO-8601 {kind}") from None
    return value


def is_true(text: str) -> bool:
    """A delete flag: true/1/yes/t/y (any case) is true, anything else false."""
    return text.strip().lower() in _TRUE


def version_of(text: str) -> int:
    """A version cell: an integer, or an ISO-8601 timestamp as microseconds since the epoch."""
    value = text.strip()
    if _INT_RE.fullmatch(value) and int(value) in _INT64:
        return int(value)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{text!r} is neither an integer nor an ISO-8601 timestamp") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return round(moment.timestamp() * 1_000_000)


# --- export ------------------------------------------------------------------------------------


def cell(value: Any) -> str:
    """How an exported value is written: null empty, booleans ``true``/``false``, floats in their
    shortest round-trip form, bytes base64, lists and objects as JSON, everything else ``str``."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, list | dict):
        return _JSON.encode(value).decode()
    return str(value)


def writer_options(cfg: CsvSinkConfig) -> dict[str, Any]:
    return {
        "delimiter": cfg.delimiter,
        "quotechar": cfg.quotechar,
        "quoting": csv.QUOTE_ALL if cfg.quoting == "all" else csv.QUOTE_MINIMAL,
        "lineterminator": cfg.line_terminator,
    }


def write_durably(path: Path, data: bytes, *, crash_name: str | None = None) -> None:
    """Write ``data`` to ``path`` atomically: a temp name in the same directory, fsync, rename,
    fsync the directory. Readers see the old file or the whole new one, never a part.
    ``crash_name``: the :func:`crash_point` reached between the fsync and the rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if crash_name is not None:
        crash_point(crash_name)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def crash_point(name: str) -> None:
    """Test hook like :func:`mesh.faults.crash_point`, for the CSV adapters' own steps:
    ``MESH_FILES_CRASH_POINTS="csv_sink.after_rename"`` SIGKILLs the process there. Unset (always,
    in production), it costs one environment lookup."""
    spec = os.environ.get("MESH_FILES_CRASH_POINTS")
    if spec and name in (p.strip() for p in spec.split(",")):
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
