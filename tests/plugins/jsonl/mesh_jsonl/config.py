"""Config of the ``jsonl`` adapter, as ``[flows.source]`` and as ``[flows.sink]`` (``adapter = "jsonl"``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Self

import msgspec

from mesh.config import AdapterConfig, PositiveFloat, PositiveInt

__all__ = ["JsonFilesSinkConfig", "JsonlSourceConfig"]

_Path = Annotated[str, msgspec.Meta(min_length=1)]
_Field = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class JsonlSourceConfig(AdapterConfig, frozen=True, tag="jsonl"):
    """A JSON-lines file as a source: each complete line (a JSON object) is one change."""

    path: _Path
    """The file (relative paths resolve against the config file's directory)."""
    key_field: _Field = "id"
    """The field holding the entity key (a string or an integer)."""
    version_field: _Field | None = None
    """An integer field that grows with every change of a key; default: the line's byte offset + 1."""
    deleted_field: _Field | None = None
    """A line whose value here is true is a delete of its key."""
    poll_interval: PositiveFloat = 0.05
    """Seconds between looks at the file when nothing new is there."""
    batch_size: PositiveInt = 1000

    def resolved(self, resolve: Callable[[str], str]) -> Self:
        return msgspec.structs.replace(self, path=resolve(self.path))


class JsonFilesSinkConfig(AdapterConfig, frozen=True, tag="jsonl"):
    """A directory as a sink: one ``<key>.json`` per entity, with its version guard inside."""

    directory: _Path
    create_directory: bool = True
    """Create the directory at start when it is missing (while running, a missing directory
    means the target is away: the batch is given back)."""

    def resolved(self, resolve: Callable[[str], str]) -> Self:
        return msgspec.structs.replace(self, directory=resolve(self.directory))
