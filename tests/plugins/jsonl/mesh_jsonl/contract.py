"""Contract-suite drivers of the ``jsonl`` adapter (entry point ``mesh.contract_drivers:jsonl``).

connector-mesh's ``tests/contract`` loads :data:`DRIVERS` and runs the Source and Sink contract
suites on them; this module imports ``tests.contract._base``, so it is only usable from a
connector-mesh checkout (where the suite runs). The adapters are opened through the registry,
as the agent opens them, so the suite also proves the plugin is found.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from mesh.adapters import Sink, Source
from mesh.plugins import adapter_registry
from mesh_jsonl.config import JsonFilesSinkConfig, JsonlSourceConfig
from tests.contract._base import FIELDS, Lack, SinkCap, SinkDriver, SourceCap, SourceDriver, row

__all__ = ["DRIVERS", "JsonFilesDriver", "JsonlDriver"]

_RAISES = Lack("raises SystemUnavailable while the file or directory is away (see outage_raises)")


class JsonlDriver(SourceDriver):
    """A JSON-lines file appended to (each line fsync'ed); away = the file is renamed away."""

    name = "jsonl"
    capabilities = frozenset(
        {
            SourceCap.DELETES,
            SourceCap.EVERY_CHANGE,
            SourceCap.REWIND,
            SourceCap.RESUME,
            SourceCap.OUTAGE_RAISES,
        }
    )
    lacks = {SourceCap.OUTAGE_RIDDEN_OUT: _RAISES}

    async def start(self) -> None:
        self.file = self.env.tmp_path / "changes.jsonl"
        self.file.touch()

    def source(self) -> Source:
        cfg = JsonlSourceConfig(path=str(self.file), deleted_field="_deleted", poll_interval=0.02)
        return adapter_registry().open_source(cfg)

    def _append(self, doc: dict[str, Any]) -> None:
        with open(self.file, "a", encoding="utf-8") as f:
            f.write(json.dumps(doc) + "\n")
            f.flush()
            os.fsync(f.fileno())

    async def upsert(self, key: str, name: str, city: str) -> None:
        self._append({"id": int(key), "name": name, "city": city})

    async def delete(self, key: str) -> None:
        self._append({"id": int(key), "_deleted": True})

    @asynccontextmanager
    async def outage(self) -> AsyncIterator[None]:
        away = self.file.with_suffix(".away")
        os.replace(self.file, away)
        try:
            yield
        finally:
            os.replace(away, self.file)


class JsonFilesDriver(SinkDriver):
    """A directory of ``<key>.json`` files, read back from disk; poison: a NaN the JSON cannot
    hold; away = the directory is renamed away."""

    name = "jsonl"
    capabilities = frozenset(
        {
            SinkCap.UNCHANGED, SinkCap.PARTIAL_ROWS, SinkCap.UPDATE_ONLY, SinkCap.SCOPES, SinkCap.POISON,
            SinkCap.OUTAGE_RAISES,
        }
    )  # fmt: skip
    lacks = {SinkCap.OUTAGE_RIDDEN_OUT: _RAISES}

    async def start(self) -> None:
        self.directory = self.env.tmp_path / "target"

    def sink(self) -> Sink:
        return adapter_registry().open_sink(JsonFilesSinkConfig(directory=str(self.directory)))

    def _docs(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_bytes()) for p in sorted(Path(self.directory).glob("*.json"))]

    async def state(self, sink: Sink) -> dict[str, dict[str, Any]]:
        return {d["key"]: {f: d["row"].get(f) for f in FIELDS} for d in self._docs() if not d["deleted"]}

    async def writes(self, sink: Sink) -> int:
        return sum(int(d["revision"]) for d in self._docs())

    def poison(self, key: str) -> dict[str, Any]:
        return row(key, "Poison", "Nowhere", score=float("nan"))

    @asynccontextmanager
    async def outage(self) -> AsyncIterator[None]:
        away = self.directory.with_name("target.away")
        os.replace(self.directory, away)
        try:
            yield
        finally:
            os.replace(away, self.directory)


DRIVERS = (JsonlDriver, JsonFilesDriver)
"""The drivers this distribution contributes to connector-mesh's contract suites."""
