"""The SQL adapters' declarations (entry points ``mesh.adapters:sqlite`` and
``mesh.adapters:postgres``). Importing this module imports only their config Structs."""

from __future__ import annotations

from adapters.sql._api import PostgresOperationConfig, SqliteOperationConfig
from adapters.sql.config import PostgresSinkConfig, PostgresSourceConfig, SqliteSinkConfig, SqliteSourceConfig
from mesh.plugins import AdapterPlugin, Role

__all__ = ["POSTGRES", "SQLITE"]

SQLITE = AdapterPlugin(
    name="sqlite",
    summary="a SQLite table (change capture by triggers, or a cursor column)",
    source=Role(SqliteSourceConfig, "adapters.sql.sqlite:SqliteSource"),
    sink=Role(SqliteSinkConfig, "adapters.sql.sqlite:SqliteSink"),
    capture="adapters.sql._capture:SQLITE_CAPTURE",
    preflight="adapters.sql._preflight:sql_preflight",
    operation=Role(SqliteOperationConfig, "adapters.sql._api:SqliteOperation"),
    bulk="adapters.sql._bulk:sqlite_extract",
    reconcile="adapters.sql._reconcile:SQLITE",
)

POSTGRES = AdapterPlugin(
    name="postgres",
    summary="a PostgreSQL table (change capture by triggers, or a cursor column)",
    source=Role(PostgresSourceConfig, "adapters.sql.postgres:PostgresSource"),
    sink=Role(PostgresSinkConfig, "adapters.sql.postgres:PostgresSink"),
    capture="adapters.sql._capture:POSTGRES_CAPTURE",
    preflight="adapters.sql._preflight:sql_preflight",
    operation=Role(PostgresOperationConfig, "adapters.sql._api:PostgresOperation"),
    bulk="adapters.sql._bulk:postgres_extract",
    reconcile="adapters.sql._reconcile:POSTGRES",
)
