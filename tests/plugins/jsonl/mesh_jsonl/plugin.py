"""The declaration connector-mesh loads through the ``mesh.adapters`` entry point ``jsonl``.

Importing it imports the config Structs only; the source and sink are imported when a flow uses them.
"""

from __future__ import annotations

from mesh.plugins import AdapterPlugin, Role
from mesh_jsonl.config import JsonFilesSinkConfig, JsonlSourceConfig

__all__ = ["JSONL"]

JSONL = AdapterPlugin(
    name="jsonl",
    summary="JSON-lines file (source), one JSON file per key (sink) — an example plugin",
    source=Role(JsonlSourceConfig, "mesh_jsonl.source:JsonlSource"),
    sink=Role(JsonFilesSinkConfig, "mesh_jsonl.sink:JsonFilesSink"),
)
