"""Config of the SQL adapters: ``adapter = "sqlite"`` and ``adapter = "postgres"``, as source and sink.

Imports only msgspec and :mod:`mesh.config`: the adapter declarations (``adapters.sql.plugin``)
import this module, never the drivers.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Literal, Self

import msgspec

from mesh.config import AdapterConfig, EnvName, PositiveFloat, PositiveInt, Token
from mesh.errors import ConfigProblem
from mesh.secrets import SecretFile

__all__ = ["PostgresSinkConfig", "PostgresSourceConfig", "SqliteSinkConfig", "SqliteSourceConfig"]


class SqliteSourceConfig(AdapterConfig, frozen=True, tag="sqlite"):
    path: str
    table: Token
    key: Token
    mode: Literal["changes", "cursor"] = "changes"
    """``changes``: triggers feed a change table (inserts, updates and deletes are captured);
    ``cursor``: poll rows whose ``cursor_column`` grew (deletes are not seen)."""
    cursor_column: Token | None = None
    version_column: Token | None = None
    """``cursor`` mode: an integer column that grows with every change of a row (defaults to
    ``cursor_column``)."""
    batch_size: PositiveInt = 1000
    poll_interval: PositiveFloat = 0.05
    """Seconds between looks at the table when there was nothing new (bounds added latency)."""
    install_triggers: bool = True
    """``changes`` mode: create the change table and triggers when missing."""

    def resolved(self, resolve: Callable[[str], str]) -> Self:
        return msgspec.structs.replace(self, path=resolve(self.path))

    def problems(self) -> list[ConfigProblem]:
        if self.mode == "cursor" and self.cursor_column is None:
            return [ConfigProblem("cursor_column", 'required when mode = "cursor"')]
        return []


class SqliteSinkConfig(AdapterConfig, frozen=True, tag="sqlite"):
    path: str
    table: Token
    key: Token
    create_table: bool = False
    """Create the table from the first row seen when it does not exist."""
    busy_timeout: PositiveFloat = 5.0

    def resolved(self, resolve: Callable[[str], str]) -> Self:
        return msgspec.structs.replace(self, path=resolve(self.path))


_PgName = Annotated[str, msgspec.Meta(pattern=r"^[^\x00]+$", min_length=1, max_length=63)]
# No ``pattern`` here: msgspec 0.22 can segfault at exit with a pattern-constrained str used in
# both ``X | list[X]`` and ``X | list[X] | None`` of one Struct; NULs are refused in __post_init__.
_PgColumnName = Annotated[str, msgspec.Meta(min_length=1, max_length=63)]
_PgColumns = _PgColumnName | Annotated[list[_PgColumnName], msgspec.Meta(min_length=1, max_length=32)]


def _check_pg_columns(value: str | list[str] | None, field: str) -> None:
    for name in [value] if isinstance(value, str) else value or []:
        if "\x00" in name:
            raise ValueError(f"{field}: a column name cannot contain NUL")


_QUOTED = re.compile(r'(?P<lead>(?:connection option|query parameter:) )?"(?P<text>[^"]*)"')
"""A double-quoted fragment of a libpq error message, and whether it names an option."""


def _hide_quoted(m: re.Match[str]) -> str:
    """A fragment of the DSN in libpq's message, hidden unless it is ``=`` or an option name
    made of letters and ``_`` only (``invalid connection option "colour"``: a typo the operator
    must see; a token with digits or signs may be a password and is hidden)."""
    if m["text"] == "=" or (m["lead"] and re.fullmatch(r"[A-Za-z_]{1,64}", m["text"])):
        return m[0]
    return f'{m["lead"] or ""}"…"'


def _check_pg_dsn(dsn: str) -> None:
    """Refuse a password in any form libpq accepts (``password=``, URL userinfo, ``?password=``,
    percent-encoded keys or values): parsed by libpq itself through psycopg, so what is checked
    is what the driver would use. The message never repeats the DSN."""
    from psycopg import Error as PsycopgError
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(dsn)
    except PsycopgError as exc:
        # libpq quotes the part of the DSN it stumbled on ('missing "=" after "<token>"'), and
        # that part may be a password typed without its key: it is left out (see _hide_quoted).
        reason = " ".join(str(exc).split()) if "password" not in str(exc) else "unparsable"
        reason = _QUOTED.sub(_hide_quoted, reason)
        raise ValueError(f"dsn: not a valid libpq connection string ({reason})") from None
    if params.get("password"):
        raise ValueError(
            "dsn: must not hold a password (name an environment variable in password_env, "
            "or a file in password_file)"
        )


def _check_password_refs(env: str | None, file: str | None) -> None:
    if env is not None and file is not None:
        raise ValueError("password_env / password_file: set at most one of them")


class PostgresSourceConfig(AdapterConfig, frozen=True, tag="postgres"):
    """A PostgreSQL table as a source (see adapters/sql/postgres.py for what is guaranteed).

    ``mode = "changes"``: statement triggers feed a change table (inserts, updates, deletes,
    truncates); install them with ``meshctl capture install`` or ``install_triggers = true``.
    The first read takes a resumable snapshot of the existing rows. ``mode = "cursor"``: polls
    rows whose cursor column(s) grew (deletes are not seen).
    """

    dsn: Annotated[str, msgspec.Meta(min_length=1)]
    """libpq connection string or URL without the password: ``host=db port=5432 dbname=erp
    user=mesh`` or ``postgresql://mesh@db:5432/erp``."""
    table: _PgName
    key: _PgColumns
    """The key column, or a list of them (composite key; ``Change.key`` is then the JSON array
    of the values, e.g. ``[10248,11]``)."""
    schema: _PgName = "public"
    password_env: EnvName | None = None
    """Name of the environment variable that holds the password (none: trust, peer, .pgpass)."""
    password_file: SecretFile | None = None
    """Or a file that holds it (e.g. a Kubernetes secret mount; a trailing newline is dropped)."""
    mode: Literal["changes", "cursor"] = "changes"
    cursor_column: _PgColumns | None = None
    """``cursor`` mode: the column (or columns, compared as one tuple) that grows with every change."""
    version_column: _PgName | None = None
    """``cursor`` mode: an integer or timestamp column that grows with every change of a row
    (default: the first cursor column)."""
    batch_size: PositiveInt = 1000
    snapshot: bool = True
    """``changes`` mode: on the first read, emit every existing row (in key order, in chunks,
    resumable) before the recorded changes."""
    snapshot_chunk: PositiveInt = 1000
    """Rows per snapshot batch (at most ``batch_size``)."""
    poll_interval: PositiveFloat = 0.2
    """Seconds between looks when there was nothing new (bounds added latency)."""
    install_triggers: bool = False
    """``changes`` mode: create or update the change table and triggers at start."""
    key_field: _PgName | None = None
    """Also put the encoded key into every row under this field name (lets a sink with a single
    key column, such as SQLite, hold a table with a composite key)."""
    connect_timeout: PositiveFloat = 5.0
    statement_timeout: PositiveFloat = 30.0

    def __post_init__(self) -> None:
        _check_pg_dsn(self.dsn)
        _check_password_refs(self.password_env, self.password_file)
        _check_pg_columns(self.key, "key")
        _check_pg_columns(self.cursor_column, "cursor_column")

    def resolved(self, resolve: Callable[[str], str]) -> Self:
        if self.password_file is None:
            return self
        return msgspec.structs.replace(self, password_file=resolve(self.password_file))

    def problems(self) -> list[ConfigProblem]:
        if self.mode == "cursor" and self.cursor_column is None:
            return [ConfigProblem("cursor_column", 'required when mode = "cursor"')]
        return []


class PostgresSinkConfig(AdapterConfig, frozen=True, tag="postgres"):
    """A PostgreSQL table as a sink: batched upserts by key under a version guard kept in
    ``<schema>._mesh_versions`` (see adapters/sql/postgres.py)."""

    dsn: Annotated[str, msgspec.Meta(min_length=1)]
    """libpq connection string or URL without the password (see the source's ``dsn``)."""
    table: _PgName
    key: _PgColumns
    """The key column, or a list of them (``SinkRecord.key`` is then a JSON array of values)."""
    schema: _PgName = "public"
    password_env: EnvName | None = None
    password_file: SecretFile | None = None
    """Or a file that holds the password (see the source's ``password_file``)."""
    create_table: bool = False
    """Create the table from the first upserted row (types from the values) when it is missing."""
    connect_timeout: PositiveFloat = 5.0
    statement_timeout: PositiveFloat = 30.0
    """Seconds one statement may run (e.g. waiting for a row lock) before the batch is given back."""

    def __post_init__(self) -> None:
        _check_pg_dsn(self.dsn)
        _check_password_refs(self.password_env, self.password_file)
        _check_pg_columns(self.key, "key")

    def resolved(self, resolve: Callable[[str], str]) -> Self:
        if self.password_file is None:
            return self
        return msgspec.structs.replace(self, password_file=resolve(self.password_file))
