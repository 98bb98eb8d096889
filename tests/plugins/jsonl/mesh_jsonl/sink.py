"""One JSON file per key as a Sink, with the version guard inside each file.

``<directory>/<url-quoted key>.json`` holds ``{"key", "row", "deleted", "versions", "revision",
"id"}``: ``versions`` maps each scope to the highest version applied (I5: a record not newer
than its scope's version is STALE); a delete keeps the file as a tombstone so no older upsert
brings the key back; ``revision`` counts the writes that changed the data (a record that changes
nothing is UNCHANGED and only advances the guard). Every file is written to a temporary name,
fsync'ed and renamed over the old one, then the directory is fsync'ed: a crash leaves the old or
the new file, never half of one. A row that cannot be JSON (NaN, infinity) is a
:class:`~mesh.errors.RejectedRecord` in its slot; the directory missing is
:class:`~mesh.errors.SystemUnavailable` and nothing of the batch is written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio.to_thread

from mesh.adapters import Applied, Sink, SinkRecord
from mesh.errors import RejectedRecord, SystemUnavailable
from mesh_jsonl.config import JsonFilesSinkConfig

__all__ = ["JsonFilesSink"]


class JsonFilesSink(Sink):
    def __init__(self, config: JsonFilesSinkConfig) -> None:
        self.config = config
        self.directory = Path(config.directory)

    def __repr__(self) -> str:
        return f"<JsonFilesSink {self.directory}>"

    async def open(self) -> None:
        if self.config.create_directory:
            await anyio.to_thread.run_sync(lambda: self.directory.mkdir(parents=True, exist_ok=True))

    def file_of(self, key: str) -> Path:
        return self.directory / f"{quote(key, safe='')}.json"

    def _load(self, key: str) -> dict[str, Any] | None:
        try:
            doc: dict[str, Any] = json.loads(self.file_of(key).read_bytes())
        except FileNotFoundError:
            return None
        return doc

    def _store(self, key: str, doc: dict[str, Any]) -> None:
        data = json.dumps(doc, allow_nan=False, sort_keys=True).encode()
        target = self.file_of(key)
        tmp = target.with_name(f".{target.name}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _apply_one(self, r: SinkRecord) -> Applied | Exception:
        doc = self._load(r.key)
        versions: dict[str, int] = dict(doc["versions"]) if doc else {}
        held = versions.get(r.scope)
        if held is not None and r.version <= held:
            return Applied.STALE
        exists = doc is not None and not doc["deleted"]
        old_row: dict[str, Any] = dict(doc["row"]) if doc is not None and exists else {}
        versions[r.scope] = r.version
        new = {
            "key": r.key, "row": old_row, "deleted": not exists, "versions": versions,
            "revision": doc["revision"] if doc else 0, "id": r.id,
        }  # fmt: skip
        if not r.create and (not exists or r.deleted):
            result = Applied.UNCHANGED  # may not create or delete: nothing happens to the data
            if doc is None:
                return result  # and there is no file to keep a guard in
        elif r.deleted:
            result = Applied.APPLIED if exists else Applied.UNCHANGED
            new.update(row=None, deleted=True)
        else:
            row = {**old_row, **r.row}
            result = Applied.UNCHANGED if exists and row == old_row else Applied.APPLIED
            new.update(row=row, deleted=False)
        if result is Applied.APPLIED:
            new["revision"] += 1
        try:
            self._store(r.key, new)
        except ValueError as exc:  # not representable as JSON
            return RejectedRecord(f"key {r.key!r}: the row cannot be written as JSON: {exc}")
        return result

    def _apply(self, records: Sequence[SinkRecord]) -> list[Applied | Exception]:
        if not self.directory.is_dir():
            raise SystemUnavailable(f"{self.directory}: the directory is not there")
        try:
            return [self._apply_one(r) for r in records]
        except OSError as exc:
            raise SystemUnavailable(f"{self.directory}: {exc.strerror}") from None

    async def apply(self, records: Sequence[SinkRecord]) -> list[Applied | Exception]:
        return await anyio.to_thread.run_sync(self._apply, records)

    async def aclose(self) -> None:
        pass
