"""PostgreSQL source and sink (psycopg 3, async).

:class:`PostgresSource` captures a table's changes: a trigger-fed change table read in commit
order with a resumable initial snapshot (``mode = "changes"``), or a compound cursor over
growing columns (``mode = "cursor"``). :class:`PostgresSink` applies records with batched,
set-based upserts under a per-key version guard kept in the target database, so the guard and
the writes commit together. Both translate every ``psycopg`` error into the mesh error tree: a
lost or refused connection is :class:`~mesh.errors.SystemUnavailable` and the adapter
reconnects on its next call. :func:`install_change_capture`, :func:`remove_change_capture` and
:func:`change_capture_status` manage capture outside a running source (``meshctl capture``).

Values travel as JSON in one mapping (see :mod:`adapters.sql._pg_common`): integers as numbers,
numeric and money as decimal strings (never floats), real and double precision as the shortest
number that reads back as the same value, timestamps ISO 8601 (with time zone: in UTC), bytea as
upper-case hex, json/jsonb nested. A composite key travels as the JSON array of its values.
"""

from __future__ import annotations

from typing import Any

import psycopg

from adapters.sql._pg_capture import CaptureStatus, capture_status, ensure_capture, remove_capture
from adapters.sql._pg_common import close_quietly, connect, key_columns, translate, where_of
from adapters.sql._pg_sink import PostgresSink
from adapters.sql._pg_source import PostgresSource
from adapters.sql.config import PostgresSourceConfig

__all__ = [
    "CaptureStatus",
    "PostgresSink",
    "PostgresSource",
    "change_capture_status",
    "install_change_capture",
    "remove_change_capture",
]


async def _with_connection(config: PostgresSourceConfig, action: Any) -> Any:
    where = where_of(config.dsn, config.schema, config.table)
    conn = await connect(
        config.dsn, config.password_env, where=where, password_file=config.password_file,
        connect_timeout=config.connect_timeout, statement_timeout=config.statement_timeout,
    )  # fmt: skip
    try:
        return await action(conn, where)
    except psycopg.Error as exc:
        raise translate(exc, where) from None
    finally:
        await close_quietly(conn)


async def install_change_capture(config: PostgresSourceConfig) -> bool:
    """Install (or bring up to date) change capture for the source's table.

    Idempotent; True when the function and triggers were created or replaced, False when they
    were already current. The change table and its pending changes are kept across updates.

    Raises:
        ConfigError: the table or a key column does not exist, or the key is not unique.
        SystemUnavailable: the server cannot be reached now.
    """
    key = key_columns(config.key)
    return bool(
        await _with_connection(
            config,
            lambda conn, where: ensure_capture(
                conn, config.schema, config.table, key, install=True, where=where
            ),
        )
    )


async def remove_change_capture(config: PostgresSourceConfig, *, keep_changes: bool = False) -> bool:
    """Drop the capture triggers and function and, unless ``keep_changes``, the change table.

    Idempotent; True when anything was removed.

    Raises:
        SystemUnavailable: the server cannot be reached now.
    """
    return bool(
        await _with_connection(
            config,
            lambda conn, where: remove_capture(conn, config.schema, config.table, keep_changes=keep_changes),
        )
    )


async def change_capture_status(config: PostgresSourceConfig) -> CaptureStatus:
    """Whether capture is installed and current, and how many changes wait to be read.

    Raises:
        ConfigError: the table or a key column does not exist, or the key is not unique.
        SystemUnavailable: the server cannot be reached now.
    """
    key = key_columns(config.key)
    status: CaptureStatus = await _with_connection(
        config, lambda conn, where: capture_status(conn, config.schema, config.table, key, where=where)
    )
    return status
