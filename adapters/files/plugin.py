"""The CSV adapters' declaration (entry point ``mesh.adapters:csv``). Importing this module
imports only their config Structs."""

from __future__ import annotations

from adapters.files.config import CsvSinkConfig, CsvSourceConfig
from mesh.plugins import AdapterPlugin, Role

__all__ = ["CSV"]

CSV = AdapterPlugin(
    name="csv",
    summary="CSV files (batch import from an inbox directory, batch export), with run records",
    source=Role(CsvSourceConfig, "adapters.files.csv_source:CsvSource"),
    sink=Role(CsvSinkConfig, "adapters.files.csv_sink:CsvSink"),
    runs="adapters.files.runs:RUN_LOG",
)
