"""The SQL adapters' declarations (entry points ``mesh.adapters:sqlite`` and
``mesh.adapters:postgres``). Importing this module imports only their config Structs."""

from __future__ import annotations

from adapters.sql.config import PostgresSinkConfig, PostgresSourceConfig, SqliteSinkConfig, SqliteSourceConfig
from mesh.plugins import AdapterPlugin, Role

__all__ = ["POSTGRES", "SQLITE"]

SQLITE = AdapterPlugin(
    name="sqlite",
    summary="a SQLite table (change capture by triggers, or a cursor column)",
    source=Role(SqliteSourceConfig, "adapters.sql.sqlite:SqliteSource"),
    sink=Role(SqliteSinkConfig, "adapters.sql.sqlite:SqliteSink"),
    capture="adapters.sql._capture:SQLITE_CAPTURE",
    reconcile="adapters.sql._reconcile:SQLITE",
)

POSTGRES = AdapterPlugin(
    name="postgres",
    summary="a PostgreSQL table (change capture by triggers, or a cursor column)",
    source=Role(PostgresSourceConfig, "adapters.sql.postgres:PostgresSource"),
    sink=Role(PostgresSinkConfig, "adapters.sql.postgres:PostgresSink"),
    capture="adapters.sql._capture:POSTGRES_CAPTURE",
    reconcile="adapters.sql._reconcile:POSTGRES",
)
