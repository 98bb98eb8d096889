"""Plumbing shared by the PostgreSQL source, sink and change capture.

Connecting (the password from an environment variable, never from the file; every session in
UTC with ISO dates, ISO 8601 intervals and shortest-exact floats), translating ``psycopg``
errors into the mesh error tree, reading a table's shape from the catalog, the JSON row mapping
(the SQL expressions that turn a row into the JSON the mesh carries) and its inverse for the
sink (a JSON value as text the column's type accepts), and the key encoding.

Key encoding: ``Change.key`` / ``SinkRecord.key`` is the key column's value as text when the key
is one column (``"ALFKI"``, ``"42"``), and the compact JSON array of the key values in key order
when it is several (``[10248,11]``); each value in its JSON mapping (below).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple, Protocol

import anyio
import msgspec
import psycopg
from psycopg import sql

from mesh.errors import ConfigError, MeshError, RejectedRecord, SystemUnavailable
from mesh.secrets import read_secret

# Session settings that make the JSON mapping independent of the server's and the role's
# defaults: timestamptz in UTC, ISO 8601 intervals, floats printed shortest-exact.
SESSION_SETTINGS: tuple[tuple[str, str], ...] = (
    ("TimeZone", "UTC"),
    ("DateStyle", "ISO, YMD"),
    ("IntervalStyle", "iso_8601"),
    ("extra_float_digits", "1"),
)

_JSON_ENCODER = msgspec.json.Encoder()
_JSON_DECODER = msgspec.json.Decoder()
_KEY_DECODER = msgspec.json.Decoder(list[Any])
_HEX_RE = re.compile(r"(?:[0-9A-Fa-f]{2})*")
_INT64 = range(-(2**63), 2**63)
# Connection failures carry no SQLSTATE; these texts of libpq / the server mean "misconfigured".
_CONFIG_TEXTS = (
    "does not exist",
    "password authentication failed",
    "no pg_hba.conf entry",
    "no password supplied",
    "permission denied",
)
# SQLSTATE classes: what the caller does about them.
# Everything else (connection exceptions, shutdown, cancellation, deadlocks, serialization
# failures, resource shortages, internal errors) means "unavailable": retry later.
_CONFIG_CLASSES = frozenset({"28", "3D", "3F", "42", "0A", "2B"})
_RECORD_CLASSES = frozenset({"22", "23", "44"})  # data exception, integrity, WITH CHECK OPTION
FOREIGN_KEY_VIOLATION = "23503"
"""A parent missing (insert, update) or a child still there (delete): IntegrityPending."""


class Name(sql.Identifier):
    """A quoted identifier with ``%`` doubled: every query of these adapters is executed with a
    parameter mapping (possibly empty), so psycopg reads ``%%`` back as ``%``."""

    def as_bytes(self, context: Any = None) -> bytes:
        return super().as_bytes(context).replace(b"%", b"%%")


class Text(sql.Literal):
    """A quoted literal with ``%`` doubled (see :class:`Name`)."""

    def as_bytes(self, context: Any = None) -> bytes:
        return super().as_bytes(context).replace(b"%", b"%%")


def ident(*names: str) -> Name:
    """A (schema-qualified) identifier, safely quoted (see :class:`Name`)."""
    return Name(*names)


async def execute(
    conn: psycopg.AsyncConnection[Any], query: sql.Composed | sql.SQL | str | bytes, params: Any = None
) -> psycopg.AsyncCursor[Any]:
    """``conn.execute`` that always passes parameters, so ``%%`` in names reads as ``%``."""
    return await conn.execute(query, {} if params is None else params)


def where_of(dsn: str, schema: str, table: str) -> str:
    """``host:port/db schema.table`` for messages; never the password."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return f"postgres {schema}.{table}"
    host = params.get("host") or params.get("hostaddr") or "localhost"
    port = params.get("port") or "5432"
    db = params.get("dbname") or params.get("user") or ""
    return f"postgres://{host}:{port}/{db} {schema}.{table}"


def translate(exc: psycopg.Error, where: str) -> MeshError:
    """Map a ``psycopg`` error to the mesh error tree.

    Connection loss, shutdown, cancellation, deadlocks, serialization failures and resource
    shortages are :class:`SystemUnavailable` (retry later); an undefined table or column, a
    missing privilege, a wrong password or database is :class:`ConfigError`; refused values
    (data exceptions, constraint violations) outside a per-record context are
    :class:`SystemUnavailable` too, so the caller backs off instead of dropping data over a
    condition it cannot see. Unknown conditions are treated as unavailable.
    """
    state = exc.sqlstate or ""
    text = " ".join(str(exc).split())
    if not state:
        if isinstance(exc, psycopg.OperationalError) and any(t in text for t in _CONFIG_TEXTS):
            return ConfigError(f"cannot connect: {text}", source=where)
        if isinstance(exc, psycopg.ProgrammingError):  # refused by the client library itself
            return ConfigError(f"client error: {text}", source=where)
        return SystemUnavailable(f"PostgreSQL {where} unavailable: {text}")
    if state[:2] in _CONFIG_CLASSES:
        return ConfigError(f"SQL error {state}: {text}", source=where)
    return SystemUnavailable(f"PostgreSQL {where} unavailable ({state}): {text}")


def is_record_error(exc: psycopg.Error) -> bool:
    """Whether ``exc`` refuses one statement's values (bad value, constraint violation)."""
    state = exc.sqlstate or ""
    return state[:2] in _RECORD_CLASSES


def is_connection_error(exc: psycopg.Error) -> bool:
    """Whether ``exc`` leaves the connection unusable (lost, shut down, broken protocol)."""
    state = exc.sqlstate or ""
    return not state or (state[:2] in {"08", "57", "XX"} and state != "57014")


async def connect(
    dsn: str,
    password_env: str | None,
    *,
    where: str,
    password_file: str | None = None,
    connect_timeout: float,
    statement_timeout: float,
) -> psycopg.AsyncConnection[tuple[Any, ...]]:
    """An autocommit connection with the mapping's session settings and a statement timeout.

    Raises:
        ConfigError: ``password_env`` names an unset or empty variable, ``password_file`` an
            unreadable or empty file, the dsn is malformed, or the
            server refuses the database, role or password.
        SystemUnavailable: the server cannot be reached now.
    """
    kwargs: dict[str, Any] = {}
    if password_env is not None or password_file is not None:
        try:
            kwargs["password"] = read_secret(password_env, password_file, field="password", what="PostgreSQL")
        except ConfigError as exc:
            raise ConfigError(str(exc), source=where) from None
    try:
        conn = await psycopg.AsyncConnection.connect(
            dsn,
            autocommit=True,
            prepare_threshold=None,
            connect_timeout=max(1, math.ceil(connect_timeout)),
            application_name="connector-mesh",
            **kwargs,
        )
    except psycopg.ProgrammingError as exc:
        raise ConfigError(f"bad dsn: {' '.join(str(exc).split())}", source=where) from None
    except psycopg.Error as exc:
        raise translate(exc, where) from None
    try:
        settings = [*SESSION_SETTINGS, ("statement_timeout", f"{max(0, round(statement_timeout * 1000))}")]
        await conn.execute(
            sql.SQL("SELECT ") + sql.SQL(", ").join(sql.SQL("set_config(%s, %s, false)") for _ in settings),
            [v for pair in settings for v in pair],
        )
    except psycopg.Error as exc:
        await close_quietly(conn)
        raise translate(exc, where) from None
    except BaseException:
        await close_quietly(conn)
        raise
    return conn


async def close_quietly(conn: psycopg.AsyncConnection[Any]) -> None:
    """Close ``conn``, ignoring errors (the connection may already be gone)."""
    with contextlib.suppress(psycopg.Error):
        await conn.close()


class ConnectSettings(Protocol):
    """What :func:`connect_prepared` reads of a PostgreSQL source or sink config."""

    @property
    def dsn(self) -> str: ...
    @property
    def password_env(self) -> str | None: ...
    @property
    def password_file(self) -> str | None: ...
    @property
    def connect_timeout(self) -> float: ...
    @property
    def statement_timeout(self) -> float: ...


async def connect_prepared(
    cfg: ConnectSettings,
    where: str,
    prepare: Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]],
) -> psycopg.AsyncConnection[Any]:
    """A new connection (:func:`connect` with ``cfg``'s settings) once ``prepare`` has checked
    or set up what the adapter needs on it. Nothing is left open when it fails or is cancelled.

    Raises:
        ConfigError, SystemUnavailable: as :func:`connect`, or ``prepare``'s psycopg error
            translated (:func:`translate`); whatever else ``prepare`` raises.
    """
    conn = await connect(
        cfg.dsn, cfg.password_env, where=where, password_file=cfg.password_file,
        connect_timeout=cfg.connect_timeout, statement_timeout=cfg.statement_timeout,
    )  # fmt: skip
    try:
        await prepare(conn)
    except psycopg.Error as exc:
        with anyio.CancelScope(shield=True):
            await close_quietly(conn)
        raise translate(exc, where) from None
    except BaseException:
        with anyio.CancelScope(shield=True):
            await close_quietly(conn)
        raise
    return conn


# -- table shape -------------------------------------------------------------------------------


class Column(NamedTuple):
    """One column of a table, as the JSON mapping and the sink's casts need it."""

    name: str
    type_name: str
    """``format_type`` of the column's type without its modifier (``character varying``)."""
    base: str
    """Name of the base type (a domain's underlying type), e.g. ``numeric``, ``bytea``."""
    category: str
    """``pg_type.typcategory`` of the base type (``A`` arrays, ``N`` numeric, ...)."""


class Table(NamedTuple):
    """A table's columns (in order) and its unique keys (sets of column names)."""

    columns: dict[str, Column]
    unique_keys: list[frozenset[str]]

    def find(self, name: str) -> Column | None:
        """The column called ``name``: exactly, else case-insensitively when that is unique."""
        column = self.columns.get(name)
        if column is not None:
            return column
        lowered = [c for n, c in self.columns.items() if n.lower() == name.lower()]
        return lowered[0] if len(lowered) == 1 else None


_SHAPE_SQL = """
SELECT a.attname, format_type(a.atttypid, NULL), bt.typname, bt.typcategory
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
JOIN pg_type bt ON bt.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
WHERE a.attrelid = %(rel)s::regclass AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""
_KEYS_SQL = """
SELECT array_agg(a.attname ORDER BY a.attname)
FROM pg_index i
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
WHERE i.indrelid = %(rel)s::regclass AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL
  AND i.indisvalid
GROUP BY i.indexrelid
"""
_EXISTS_SQL = "SELECT to_regclass(%(rel)s) IS NOT NULL"


def regclass(schema: str, table: str) -> str:
    """The quoted ``schema.table`` text that ``::regclass`` understands (a parameter value)."""
    return sql.Identifier(schema, table).as_string(None)


async def read_table(conn: psycopg.AsyncConnection[Any], schema: str, table: str) -> Table | None:
    """The shape of ``schema.table``; None when it does not exist."""
    rel = regclass(schema, table)
    cur = await conn.execute(_EXISTS_SQL, {"rel": rel})
    row = await cur.fetchone()
    if row is None or not row[0]:
        return None
    cur = await conn.execute(_SHAPE_SQL, {"rel": rel})
    columns = {
        name: Column(name, type_name, base, category)
        for name, type_name, base, category in await cur.fetchall()
    }
    cur = await conn.execute(_KEYS_SQL, {"rel": rel})
    keys = [frozenset(names) for (names,) in await cur.fetchall()]
    return Table(columns, keys)


def resolve_key(shape: Table, key: Sequence[str], *, where: str, what: str = "key") -> list[Column]:
    """The key columns, in key order; they must exist and be the table's PK or a UNIQUE key.

    Raises:
        ConfigError: a column does not exist, or no unique index covers exactly these columns.
    """
    columns = []
    for name in key:
        column = shape.find(name)
        if column is None:
            raise ConfigError(f"table has no column {name!r} ({what})", source=where)
        columns.append(column)
    names = frozenset(c.name for c in columns)
    if len(names) != len(columns):
        raise ConfigError(f"{what} names a column twice", source=where)
    if names not in shape.unique_keys:
        raise ConfigError(
            f"{what} ({', '.join(c.name for c in columns)}) is neither the table's primary key nor a "
            "UNIQUE key (a full unique index on exactly these columns)",
            source=where,
        )
    return columns


def key_columns(key: str | Sequence[str]) -> list[str]:
    """The configured key as a list of column names."""
    return [key] if isinstance(key, str) else list(key)


# -- the JSON mapping: PostgreSQL value -> JSON --------------------------------------------------
#
#   smallint, integer, bigint   number                 numeric, decimal, money  string "12.50"
#   real, double precision      number (shortest text that reads back as the same value);
#                               NaN and +-Infinity as the strings "NaN", "Infinity", "-Infinity"
#   boolean                     true / false           text, varchar, char(n)   string
#   bytea                       string, upper-case hex  json, jsonb             the JSON itself
#   date                        "2024-02-29"            time [with time zone]   "13:45:00[.ffffff][+02]"
#   timestamp                   "2024-02-29T13:45:00[.ffffff]"
#   timestamp with time zone    "2024-02-29T12:45:00[.ffffff]+00:00" (always UTC)
#   interval                    ISO 8601 duration "P1DT2H"
#   arrays                      JSON arrays (elements mapped as to_jsonb maps them)
#   anything else (uuid, inet, enums, ...)  its text


def _override(ref: sql.Composable, column: Column) -> sql.Composable | None:
    """The JSON expression of a column whose ``to_jsonb`` is not the mapping; None if it is."""
    col = sql.SQL("{}.{}").format(ref, ident(column.name))
    if column.base == "numeric":
        return sql.SQL("{}::text").format(col)
    if column.base == "money":
        return sql.SQL("{}::numeric::text").format(col)
    if column.base == "bytea":
        return sql.SQL("upper(encode({}, 'hex'))").format(col)
    return None


def value_json(ref: sql.Composable, column: Column) -> sql.Composable:
    """The JSON value (jsonb) of one column of the row ``ref``."""
    special = _override(ref, column)
    if special is not None:
        return sql.SQL("to_jsonb({})").format(special)
    return sql.SQL("to_jsonb({}.{})").format(ref, ident(column.name))


def row_json(ref: sql.Composable, columns: Sequence[Column]) -> sql.Composable:
    """The JSON object (jsonb) of the row ``ref`` under the mapping (needs the session settings)."""
    pairs = [(c, o) for c in columns if (o := _override(ref, c)) is not None]
    expr: sql.Composable = sql.SQL("to_jsonb({})").format(ref)
    # jsonb_build_object takes at most 100 arguments: 50 pairs per call.
    for start in range(0, len(pairs), 50):
        chunk = pairs[start : start + 50]
        args = sql.SQL(", ").join(sql.SQL("{}, {}").format(Text(c.name), o) for c, o in chunk)
        expr = sql.SQL("{} || jsonb_build_object({})").format(expr, args)
    return sql.SQL("({})").format(expr)


def key_json(ref: sql.Composable, columns: Sequence[Column]) -> sql.Composable:
    """The JSON array (jsonb) of the key values of the row ``ref``."""
    return sql.SQL("jsonb_build_array({})").format(sql.SQL(", ").join(value_json(ref, c) for c in columns))


def decode_row(text: str) -> dict[str, Any]:
    row = _JSON_DECODER.decode(text)
    if not isinstance(row, dict):
        raise SystemUnavailable(f"change row is not a JSON object: {text[:80]!r}")
    return row


def encode_key(values: Sequence[Any]) -> str:
    """``Change.key`` from the key values in their JSON mapping (see the module docstring)."""
    if len(values) == 1:
        value = values[0]
        return value if isinstance(value, str) else _JSON_ENCODER.encode(value).decode()
    return _JSON_ENCODER.encode(list(values)).decode()


def decode_key(key: str, count: int) -> list[Any]:
    """The key values of ``key`` (inverse of :func:`encode_key`).

    Raises:
        RejectedRecord: a composite key that is not a JSON array of ``count`` scalars.
    """
    if count == 1:
        return [key]
    try:
        values = _KEY_DECODER.decode(key)
    except msgspec.DecodeError:
        values = []
    if len(values) != count or any(v is None or isinstance(v, dict | list) for v in values):
        raise RejectedRecord(f"key {key!r} is not a JSON array of {count} key values")
    return values


def encode_json(value: Any) -> str:
    return _JSON_ENCODER.encode(value).decode()


# -- the inverse: JSON value -> text the column's type reads ------------------------------------


def cast_expr(param: sql.Composable, column: Column) -> sql.Composable:
    """SQL turning the text ``param`` into a value of the column's type (typmod left to
    assignment, so a too-long varchar is refused instead of silently cut)."""
    if column.base == "bytea":
        return sql.SQL("decode({}, 'hex')").format(param)
    return sql.SQL("{}::{}").format(param, sql.SQL(column.type_name))


def compare_expr(value: sql.Composable, column: Column) -> sql.Composable:
    """SQL for ``value`` of this column that has an equality operator (for IS DISTINCT FROM)."""
    if column.base == "json":
        return sql.SQL("{}::jsonb").format(value)
    if (
        column.base in ("xml", "point", "line", "lseg", "box", "path", "polygon", "circle")
        or column.category == "A"
    ):
        return sql.SQL("{}::text").format(value)
    return value


def to_text(value: Any, column: Column) -> str | None:
    """A JSON value as the text :func:`cast_expr` reads for ``column``.

    Raises:
        RejectedRecord: the value cannot be given to this column (wrong kind, bad hex, an
            integer beyond 64 bits for an integer column).
    """
    if value is None:
        return None
    base = column.base
    if base == "bytea":
        if isinstance(value, bytes | bytearray | memoryview):
            return bytes(value).hex().upper()
        if isinstance(value, str):
            text = value[2:] if value.startswith("\\x") else value
            if _HEX_RE.fullmatch(text):
                return text
            raise RejectedRecord(f"column {column.name!r}: {value[:40]!r} is not hex")
        raise RejectedRecord(f"column {column.name!r}: bytea needs hex text, got {type(value).__name__}")
    if base in ("json", "jsonb"):
        # JSON text as is (SQLite and CSV sources carry JSON as text); anything else encoded.
        return value if isinstance(value, str) else encode_json(value)
    if column.category == "A":
        if isinstance(value, list | tuple):
            return _array_literal(value)
        if isinstance(value, str):
            return value
        raise RejectedRecord(f"column {column.name!r}: an array needs a list, got {type(value).__name__}")
    return _scalar_text(value, column)


def _scalar_text(value: Any, column: Column) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if column.base in ("int2", "int4", "int8") and value not in _INT64:
            raise RejectedRecord(f"column {column.name!r}: integer {value} does not fit in 64 bits")
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        if column.base in ("int2", "int4", "int8") and value.is_integer():
            return str(int(value))
        return repr(value)  # shortest text that reads back as the same double
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex().upper()
    if isinstance(value, dict | list | tuple):
        return encode_json(value)
    raise RejectedRecord(f"column {column.name!r}: cannot store a {type(value).__name__}")


def _array_literal(items: Sequence[Any]) -> str:
    parts = []
    for item in items:
        if item is None:
            parts.append("NULL")
        elif isinstance(item, list | tuple):
            parts.append(_array_literal(item))
        else:
            if isinstance(item, bool):
                text = "true" if item else "false"
            elif isinstance(item, float):
                text = (
                    repr(item)
                    if math.isfinite(item)
                    else ("NaN" if math.isnan(item) else ("Infinity" if item > 0 else "-Infinity"))
                )
            elif isinstance(item, dict):
                text = encode_json(item)
            else:
                text = str(item)
            parts.append('"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"')
    return "{" + ",".join(parts) + "}"
