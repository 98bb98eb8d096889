"""System API operations on SQL databases (SQLite, PostgreSQL): the ``operation`` role of the
``sqlite`` and ``postgres`` adapters (README "System APIs").

``statement`` is one parameterised SQL statement (``INSERT ... RETURNING``, ``SELECT``, or a
stored procedure: ``SELECT * FROM create_order(:customer_id, :total)`` / ``CALL ...``) with named
parameters ``:name``; each takes the request field of the same name, or the dotted request path
``params`` names (objects and lists are passed as JSON text). ``result`` maps the rows back:
``one`` (the first row as an object; no row: ``not_found``), ``many`` (``{"rows": [...]}``) or
``none`` (``{"rowcount": n}``).

Exactly once: with an idempotency key the statement runs in one transaction that also inserts
``(key, result)`` into the table ``mesh_api_calls`` of the same database, and that first looks
the key up there. A second run with the key, even after the agent crashed between the commit and
storing the result in NATS, returns the recorded result instead of executing. A unique-key or
check violation is ``conflict`` / ``rejected`` (the system refused); lock timeouts and lost
connections are ``unavailable``.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Callable
from typing import Annotated, Any, Literal, Self

import anyio
import msgspec

from mesh._config_base import AdapterConfig, EnvName, PositiveFloat
from mesh.api import ApiError, Call, Operation, Replayed
from mesh.errors import ConfigError, ConfigProblem, SystemUnavailable
from mesh.faults import crash_point
from mesh.secrets import SecretFile

__all__ = [
    "PostgresOperation",
    "PostgresOperationConfig",
    "SqliteOperation",
    "SqliteOperationConfig",
]

CALLS_TABLE = "mesh_api_calls"
_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")
ResultMode = Literal["one", "many", "none"]


class SqliteOperationConfig(AdapterConfig, frozen=True, tag="sqlite"):
    path: str
    statement: Annotated[str, msgspec.Meta(min_length=1)]
    result: ResultMode = "one"
    params: dict[str, str] = {}
    """Parameter name -> dotted request path (default: the request field of the same name)."""
    busy_timeout: PositiveFloat = 5.0

    def resolved(self, resolve: Callable[[str], str]) -> Self:
        return msgspec.structs.replace(self, path=resolve(self.path))

    def problems(self) -> list[ConfigProblem]:
        return _statement_problems(self.statement)


class PostgresOperationConfig(AdapterConfig, frozen=True, tag="postgres"):
    dsn: Annotated[str, msgspec.Meta(min_length=1)]
    statement: Annotated[str, msgspec.Meta(min_length=1)]
    result: ResultMode = "one"
    params: dict[str, str] = {}
    password_env: EnvName | None = None
    password_file: SecretFile | None = None
    connect_timeout: PositiveFloat = 5.0
    statement_timeout: PositiveFloat = 30.0

    def resolved(self, resolve: Callable[[str], str]) -> Self:
        if self.password_file is None:
            return self
        return msgspec.structs.replace(self, password_file=resolve(self.password_file))

    def problems(self) -> list[ConfigProblem]:
        return _statement_problems(self.statement)


def _statement_problems(statement: str) -> list[ConfigProblem]:
    if ";" in statement.strip().rstrip(";"):
        return [ConfigProblem("statement", "one statement only (no ';' inside)")]
    return []


def _lookup(request: dict[str, Any], path: str) -> Any:
    value: Any = request
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ApiError("bad_request", f"request: {path}: missing (the statement needs it)", False)
        value = value[part]
    return json.dumps(value) if isinstance(value, dict | list) else value


def _params(statement: str, mapping: dict[str, str], request: dict[str, Any]) -> dict[str, Any]:
    names = dict.fromkeys(_PARAM.findall(statement))
    return {n: _lookup(request, mapping.get(n, n)) for n in names}


def _shape(mode: ResultMode, columns: list[str], rows: list[tuple[Any, ...]], rowcount: int) -> Any:
    objs = [dict(zip(columns, r, strict=False)) for r in rows]
    if mode == "none":
        return {"rowcount": max(rowcount, 0)}
    if mode == "many":
        return {"rows": objs}
    if not objs:
        raise ApiError("not_found", "no such record", False)
    return objs[0]


class SqliteOperation(Operation):
    """One operation on a SQLite file (each call: its own connection, ``BEGIN IMMEDIATE``)."""

    def __init__(self, cfg: SqliteOperationConfig) -> None:
        self.cfg = cfg

    def __repr__(self) -> str:
        return f"<SqliteOperation {self.cfg.path}>"

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.cfg.path, timeout=self.cfg.busy_timeout, isolation_level=None)
        return conn

    async def open(self) -> None:
        def create() -> None:
            conn = self._connect()
            try:
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {CALLS_TABLE}"
                    " (key TEXT PRIMARY KEY, operation TEXT NOT NULL, result TEXT NOT NULL,"
                    " at REAL NOT NULL DEFAULT (julianday('now')))"
                )
            finally:
                conn.close()

        try:
            await anyio.to_thread.run_sync(create)
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot prepare {CALLS_TABLE}: {exc}", source=self.cfg.path) from None

    async def recorded(self, key: str) -> Any | None:
        def read() -> Any | None:
            conn = self._connect()
            try:
                row = conn.execute(f"SELECT result FROM {CALLS_TABLE} WHERE key = ?", (key,)).fetchone()
            finally:
                conn.close()
            return None if row is None else json.loads(row[0])

        try:
            return await anyio.to_thread.run_sync(read)
        except sqlite3.Error as exc:
            raise SystemUnavailable(f"SQLite {self.cfg.path}: {exc}") from None

    async def run(self, request: dict[str, Any], call: Call) -> Any:
        params = _params(self.cfg.statement, self.cfg.params, request)
        return await anyio.to_thread.run_sync(self._run, params, call, abandon_on_cancel=True)

    def _run(self, params: dict[str, Any], call: Call) -> Any:
        try:
            conn = self._connect()
        except sqlite3.Error as exc:
            raise SystemUnavailable(f"SQLite {self.cfg.path}: {exc}") from None
        try:
            conn.execute("BEGIN IMMEDIATE")
            if call.key is not None:
                row = conn.execute(f"SELECT result FROM {CALLS_TABLE} WHERE key = ?", (call.key,)).fetchone()
                if row is not None:
                    conn.execute("ROLLBACK")
                    return Replayed(json.loads(row[0]))
            cur = conn.execute(self.cfg.statement, params)
            columns = [d[0] for d in cur.description or ()]
            rows = cur.fetchall() if columns else []
            result = _shape(self.cfg.result, columns, rows, cur.rowcount)
            if call.key is not None:
                conn.execute(
                    f"INSERT INTO {CALLS_TABLE} (key, operation, result) VALUES (?, ?, ?)",
                    (call.key, call.operation, json.dumps(result, default=str)),
                )
            conn.execute("COMMIT")
            crash_point("api.after_commit")
            return result
        except sqlite3.IntegrityError as exc:
            code = "conflict" if "UNIQUE" in str(exc) else "rejected"
            raise ApiError(code, f"the database refused it: {exc}", False) from None
        except sqlite3.OperationalError as exc:
            text = str(exc)
            if "locked" in text or "busy" in text:
                raise SystemUnavailable(f"SQLite {self.cfg.path}: {text}") from None
            raise ConfigError(f"SQL error: {text}", source=self.cfg.path) from None
        except sqlite3.Error as exc:
            raise ApiError("rejected", f"the database refused it: {exc}", False) from None
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.close()


class PostgresOperation(Operation):
    """One operation on PostgreSQL (each call: its own connection and transaction)."""

    def __init__(self, cfg: PostgresOperationConfig) -> None:
        self.cfg = cfg
        self.where = "postgres operation"

    def __repr__(self) -> str:
        return f"<PostgresOperation {self.where}>"

    async def _connect(self) -> Any:
        from adapters.sql._pg_common import connect, where_of

        self.where = where_of(self.cfg.dsn, "public", CALLS_TABLE)
        return await connect(
            self.cfg.dsn,
            self.cfg.password_env,
            where=self.where,
            password_file=self.cfg.password_file,
            connect_timeout=self.cfg.connect_timeout,
            statement_timeout=self.cfg.statement_timeout,
        )

    async def open(self) -> None:
        import psycopg

        from adapters.sql._pg_common import close_quietly, translate

        conn = await self._connect()
        try:
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {CALLS_TABLE}"
                " (key text PRIMARY KEY, operation text NOT NULL, result jsonb NOT NULL,"
                " at timestamptz NOT NULL DEFAULT now())"
            )
        except psycopg.Error as exc:
            raise translate(exc, self.where) from None
        finally:
            await close_quietly(conn)

    async def recorded(self, key: str) -> Any | None:
        import psycopg

        from adapters.sql._pg_common import close_quietly, translate

        conn = await self._connect()
        try:
            cur = await conn.execute(f"SELECT result FROM {CALLS_TABLE} WHERE key = %s", (key,))
            row = await cur.fetchone()
        except psycopg.Error as exc:
            raise translate(exc, self.where) from None
        finally:
            await close_quietly(conn)
        return None if row is None else row[0]

    async def run(self, request: dict[str, Any], call: Call) -> Any:
        import psycopg
        import psycopg.errors

        from adapters.sql._pg_common import close_quietly, translate

        params = _params(self.cfg.statement, self.cfg.params, request)
        query = _PARAM.sub(lambda m: f"%({m.group(1)})s", self.cfg.statement.replace("%", "%%"))
        conn = await self._connect()
        try:
            async with conn.transaction():
                if call.key is not None:
                    cur = await conn.execute(
                        f"SELECT result FROM {CALLS_TABLE} WHERE key = %s FOR UPDATE", (call.key,)
                    )
                    row = await cur.fetchone()
                    if row is not None:
                        return Replayed(row[0])
                cur = await conn.execute(query, params)
                columns = [d.name for d in cur.description or ()]
                rows = await cur.fetchall() if columns else []
                result = _shape(self.cfg.result, columns, rows, cur.rowcount)
                result = json.loads(json.dumps(result, default=str))
                if call.key is not None:
                    await conn.execute(
                        f"INSERT INTO {CALLS_TABLE} (key, operation, result) VALUES (%s, %s, %s)",
                        (call.key, call.operation, json.dumps(result)),
                    )
            crash_point("api.after_commit")
            return result
        except psycopg.errors.UniqueViolation as exc:
            if call.key is not None and CALLS_TABLE in str(exc.diag.table_name or ""):
                found = await self.recorded(call.key)  # a concurrent run with the key committed first
                if found is not None:
                    return Replayed(found)
            raise ApiError("conflict", f"the database refused it: {_one_line(exc)}", False) from None
        except psycopg.errors.IntegrityError as exc:
            raise ApiError("rejected", f"the database refused it: {_one_line(exc)}", False) from None
        except psycopg.errors.DataError as exc:
            raise ApiError("rejected", f"the database refused it: {_one_line(exc)}", False) from None
        except psycopg.errors.RaiseException as exc:
            raise ApiError("rejected", f"the database refused it: {_one_line(exc)}", False) from None
        except psycopg.Error as exc:
            raise translate(exc, self.where) from None
        finally:
            await close_quietly(conn)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
