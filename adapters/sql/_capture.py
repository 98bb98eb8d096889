"""The ``capture`` capability of the SQL sources (``meshctl capture``): trigger-based change
capture of a ``mode = "changes"`` source, installed, removed and inspected on demand."""

from __future__ import annotations

from typing import Any

from adapters.sql.config import PostgresSourceConfig, SqliteSourceConfig


class SqliteCapture:
    """Triggers and a change table in the source's own SQLite file."""

    def applies(self, cfg: SqliteSourceConfig) -> bool:
        return cfg.mode == "changes"

    def where(self, cfg: SqliteSourceConfig) -> str:
        return f"sqlite {cfg.path} {cfg.table}"

    async def install(self, cfg: SqliteSourceConfig) -> bool:
        from adapters.sql import sqlite

        return await sqlite.install_change_capture(cfg.path, cfg.table, key=cfg.key)

    async def remove(self, cfg: SqliteSourceConfig, *, keep_changes: bool) -> bool:
        from adapters.sql import sqlite

        return await sqlite.remove_change_capture(cfg.path, cfg.table, keep_changes=keep_changes)

    async def status(self, cfg: SqliteSourceConfig) -> Any:
        from adapters.sql._sqlite_capture import capture_status

        return await capture_status(cfg.path, cfg.table, key=cfg.key)


class PostgresCapture:
    """Statement triggers and a change table in the source's PostgreSQL schema."""

    def applies(self, cfg: PostgresSourceConfig) -> bool:
        return cfg.mode == "changes"

    def where(self, cfg: PostgresSourceConfig) -> str:
        from adapters.sql._pg_common import where_of

        return where_of(cfg.dsn, cfg.schema, cfg.table)

    async def install(self, cfg: PostgresSourceConfig) -> bool:
        from adapters.sql import postgres

        return await postgres.install_change_capture(cfg)

    async def remove(self, cfg: PostgresSourceConfig, *, keep_changes: bool) -> bool:
        from adapters.sql import postgres

        return await postgres.remove_change_capture(cfg, keep_changes=keep_changes)

    async def status(self, cfg: PostgresSourceConfig) -> Any:
        from adapters.sql import postgres

        return await postgres.change_capture_status(cfg)


SQLITE_CAPTURE = SqliteCapture()
POSTGRES_CAPTURE = PostgresCapture()
