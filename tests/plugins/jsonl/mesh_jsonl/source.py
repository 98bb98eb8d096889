"""A JSON-lines file as a Source: every complete line appended to the file is one change.

Guarantees (the Source contract, mesh/adapters.py): the cursor is the byte offset after the last
line returned, so reading again from a cursor gives the same lines, hence the same keys and
versions (I2); a line is returned only once it ends in a newline (a half-written line waits);
``read`` blocks, polling every ``poll_interval``, and is cancellable. The file missing is the
system being away: :class:`~mesh.errors.SystemUnavailable`. A line that is not a JSON object
with a key is a :class:`~mesh.errors.ConfigError` naming the file and line offset: the file
must be fixed, nothing is skipped silently.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import anyio.to_thread

from mesh.adapters import Change, ChangeBatch, Source
from mesh.errors import ConfigError, SystemUnavailable
from mesh_jsonl.config import JsonlSourceConfig

__all__ = ["JsonlSource"]


class JsonlSource(Source):
    def __init__(self, config: JsonlSourceConfig) -> None:
        self.config = config
        self._closed = False

    def __repr__(self) -> str:
        return f"<JsonlSource {self.config.path}>"

    async def open(self) -> None:
        await anyio.to_thread.run_sync(self._chunk, 0, 1)  # the file is there (or SystemUnavailable)

    def _chunk(self, offset: int, limit: int) -> tuple[list[tuple[int, bytes]], int]:
        """Up to ``limit`` complete lines from ``offset``: (offset of each line, line), end offset."""
        try:
            with open(self.config.path, "rb") as f:
                f.seek(offset)
                lines: list[tuple[int, bytes]] = []
                pos = offset
                while len(lines) < limit:
                    line = f.readline()
                    if not line.endswith(b"\n"):
                        break  # end of file, or a line still being written
                    if line.strip():
                        lines.append((pos, line))
                    pos += len(line)
                return lines, pos
        except FileNotFoundError:
            raise SystemUnavailable(f"{self.config.path}: the file is not there") from None
        except OSError as exc:
            raise SystemUnavailable(f"{self.config.path}: {exc.strerror}") from None

    def _change(self, offset: int, line: bytes) -> Change:
        cfg = self.config
        where = f"line at byte {offset}"
        try:
            doc: Any = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"{where} is not JSON: {exc}", source=cfg.path) from None
        if not isinstance(doc, dict):
            raise ConfigError(f"{where} is not a JSON object", source=cfg.path)
        key = doc.get(cfg.key_field)
        if isinstance(key, bool) or not isinstance(key, str | int) or key == "":
            raise ConfigError(f"{where}: {cfg.key_field!r} is not a string or integer key", source=cfg.path)
        version = offset + 1
        if cfg.version_field is not None:
            value = doc.get(cfg.version_field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{where}: {cfg.version_field!r} is not an integer", source=cfg.path)
            version = value
        deleted = cfg.deleted_field is not None and bool(doc.pop(cfg.deleted_field, False))
        row = {cfg.key_field: doc[cfg.key_field]} if deleted else doc
        return Change(key=str(key), version=version, deleted=deleted, row=row)

    async def read(self, cursor: str | None, limit: int) -> ChangeBatch:
        offset = int(cursor) if cursor else 0
        while True:
            lines, end = await anyio.to_thread.run_sync(self._chunk, offset, limit)
            if lines:
                return ChangeBatch(changes=[self._change(o, line) for o, line in lines], cursor=str(end))
            await anyio.sleep(self.config.poll_interval)

    async def aclose(self) -> None:
        self._closed = True
