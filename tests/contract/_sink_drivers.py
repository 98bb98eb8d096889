"""Sink drivers: every Sink adapter with the real system it writes, read back from that system.

- ``sqlite``: a SQLite file with a write log kept by triggers; poison: an ``email`` that fails a
  CHECK; away = another connection holds the write lock.
- ``postgres``: the session's PostgreSQL cluster, trigger write log; the same poison; away =
  the cluster is stopped and started again.
- ``rest``: ``tests.fakes.crm_api`` over HTTP (its own write log); poison: an ``email`` the API
  answers 400 to; away = its HTTP server is stopped and started again on the same port.
- ``csv``: export files in ``out_dir``, latin-1; poison: a character latin-1 cannot hold; away
  = ``out_dir`` is moved away.

``state`` is what the system holds (for CSV: the files replayed in run order, a delete row
removing its key); ``writes`` counts effective writes (for CSV: rows in files).
"""

from __future__ import annotations

import csv
import json
import os
import re
import sqlite3
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager, closing
from typing import Any

import anyio
import anyio.to_thread

from adapters.files.config import CsvSinkConfig
from adapters.files.csv_sink import CsvSink
from adapters.rest.config import RestSinkConfig
from adapters.rest.sink import RestSink
from adapters.sql.config import PostgresSinkConfig, SqliteSinkConfig
from adapters.sql.postgres import PostgresSink
from adapters.sql.sqlite import SqliteSink
from mesh.adapters import Sink
from mesh.errors import SystemUnavailable
from tests.contract._base import FIELDS, Lack, RestartableServer, SinkCap, SinkDriver, row
from tests.fakes.crm_api import CrmApi

__all__ = ["SINK_DRIVERS"]

C = SinkCap
_RAISES_INSTEAD = Lack("raises SystemUnavailable while the system is away (see outage_raises)")
_EMAIL_POISON = "not-an-email"


class SqliteDriver(SinkDriver):
    name = "sqlite"
    capabilities = frozenset(
        {C.UNCHANGED, C.PARTIAL_ROWS, C.UPDATE_ONLY, C.SCOPES, C.POISON, C.OUTAGE_RAISES}
    )
    lacks = {C.OUTAGE_RIDDEN_OUT: _RAISES_INSTEAD}

    async def start(self) -> None:
        self.db = self.env.tmp_path / "target.db"
        with closing(sqlite3.connect(self.db)) as db:
            db.executescript(
                """
                CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, city TEXT,
                    email TEXT CHECK (email LIKE '%@%'));
                CREATE TABLE write_log (n INTEGER PRIMARY KEY, op TEXT);
                CREATE TRIGGER log_i AFTER INSERT ON customers BEGIN INSERT INTO write_log (op) VALUES ('I');
                END;
                CREATE TRIGGER log_u AFTER UPDATE ON customers BEGIN INSERT INTO write_log (op) VALUES ('U');
                END;
                CREATE TRIGGER log_d AFTER DELETE ON customers BEGIN INSERT INTO write_log (op) VALUES ('D');
                END;
                """
            )

    def sink(self) -> Sink:
        return SqliteSink(SqliteSinkConfig(path=str(self.db), table="customers", key="id", busy_timeout=0.05))

    def _query(self, sql: str) -> list[tuple[Any, ...]]:
        with closing(sqlite3.connect(self.db)) as db:
            return db.execute(sql).fetchall()

    async def state(self, sink: Sink) -> dict[str, dict[str, Any]]:
        return {
            str(k): {"name": n, "city": c} for k, n, c in self._query("SELECT id, name, city FROM customers")
        }

    async def writes(self, sink: Sink) -> int:
        return int(self._query("SELECT count(*) FROM write_log")[0][0])

    def poison(self, key: str) -> dict[str, Any]:
        return row(key, "Poison", "Nowhere", email=_EMAIL_POISON)

    @asynccontextmanager
    async def outage(self) -> AsyncIterator[None]:
        with closing(sqlite3.connect(self.db, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")  # holds the write lock (WAL readers still read)
            try:
                yield
            finally:
                other.execute("ROLLBACK")


class PostgresDriver(SinkDriver):
    name = "postgres"
    capabilities = SqliteDriver.capabilities
    lacks = {C.OUTAGE_RIDDEN_OUT: _RAISES_INSTEAD}
    uses_postgres = True

    async def start(self) -> None:
        with self.env.pg.connect(self.env.pg_db) as db:
            db.execute(
                "CREATE TABLE customers (id int PRIMARY KEY, name text, city text, "
                "email text CHECK (email LIKE '%@%'))"
            )
            db.execute("CREATE TABLE write_log (n serial PRIMARY KEY, op text)")
            db.execute(
                "CREATE FUNCTION log_write() RETURNS trigger LANGUAGE plpgsql AS "
                "$$BEGIN INSERT INTO write_log (op) VALUES (TG_OP); RETURN NULL; END$$"
            )
            db.execute(
                "CREATE TRIGGER log_write AFTER INSERT OR UPDATE OR DELETE ON customers "
                "FOR EACH ROW EXECUTE FUNCTION log_write()"
            )

    def sink(self) -> Sink:
        cfg = PostgresSinkConfig(
            dsn=self.env.pg.dsn(self.env.pg_db), table="customers", key="id", connect_timeout=1,
            statement_timeout=5,
        )  # fmt: skip
        return PostgresSink(cfg)

    def _query(self, sql: str) -> list[tuple[Any, ...]]:
        with self.env.pg.connect(self.env.pg_db) as db:
            return list(db.execute(sql).fetchall())

    async def state(self, sink: Sink) -> dict[str, dict[str, Any]]:
        return {
            str(k): {"name": n, "city": c} for k, n, c in self._query("SELECT id, name, city FROM customers")
        }

    async def writes(self, sink: Sink) -> int:
        return int(self._query("SELECT count(*) FROM write_log")[0][0])

    def poison(self, key: str) -> dict[str, Any]:
        return row(key, "Poison", "Nowhere", email=_EMAIL_POISON)

    @asynccontextmanager
    async def outage(self) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(self.env.pg.stop)
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(self.env.pg.start)


class RestDriver(SinkDriver):
    name = "rest"
    capabilities = frozenset({C.UPDATE_ONLY, C.SCOPES, C.POISON, C.OUTAGE_RAISES})
    lacks = {
        C.UNCHANGED: Lack("a PUT is sent for every newer version: the sink does not read the target first"),
        C.PARTIAL_ROWS: Lack("PUT replaces the resource (the method the target's API offers for upserts)"),
        C.OUTAGE_RIDDEN_OUT: _RAISES_INSTEAD,
    }

    async def start(self) -> None:
        self.api = CrmApi(self.env.tmp_path / "crm.db")
        self._stack = AsyncExitStack()
        self._stack.callback(self.api.close)
        tg = await self._stack.enter_async_context(anyio.create_task_group())
        self._stack.callback(tg.cancel_scope.cancel)
        self.server = RestartableServer(tg, self.api.run)
        await self.server.up()

    async def stop(self) -> None:
        await self._stack.aclose()

    def sink(self) -> Sink:
        cfg = RestSinkConfig(
            base_url=f"http://127.0.0.1:{self.server.port}", upsert_path="/customers/{key}",
            state_path=str(self.env.tmp_path / "rest-versions.db"), timeout=2.0, backoff_initial=0.01,
            backoff_max=0.05, breaker_cooldown=0.2,
        )  # fmt: skip
        return RestSink(cfg)

    async def state(self, sink: Sink) -> dict[str, dict[str, Any]]:
        with closing(sqlite3.connect(self.api.db_path)) as db:
            found = db.execute("SELECT key, body FROM records WHERE collection = 'customers'").fetchall()
        return {key: {f: json.loads(body).get(f) for f in FIELDS} for key, body in found}

    async def writes(self, sink: Sink) -> int:
        return len(self.api.writes())

    def poison(self, key: str) -> dict[str, Any]:
        return row(key, "Poison", "Nowhere", email=_EMAIL_POISON)

    @asynccontextmanager
    async def outage(self) -> AsyncIterator[None]:
        await self.server.down()
        try:
            yield
        finally:
            await self.server.up()


_RUN = re.compile(r"-(\d+)\.csv$")


class CsvDriver(SinkDriver):
    name = "csv"
    capabilities = frozenset({C.SCOPES, C.POISON, C.OUTAGE_RIDDEN_OUT})
    lacks = {
        C.UNCHANGED: Lack(
            "an export writes every newer version (each file is the state of its keys at cut time)"
        ),
        C.PARTIAL_ROWS: Lack(
            "a file row holds only the record's fields; there is no stored row to merge into"
        ),
        C.UPDATE_ONLY: Lack(
            "an export has no target rows to look up: it cannot tell whether an entity exists"
        ),
        C.OUTAGE_RAISES: Lack("apply only stages (durably); files are cut when out_dir is back (documented)"),
    }

    async def start(self) -> None:
        self.out = self.env.tmp_path / "out"
        self.out.mkdir()

    def sink(self) -> Sink:
        cfg = CsvSinkConfig(
            out_dir=str(self.out), state_path=str(self.env.tmp_path / "csv-sink.db"),
            columns=["id", *FIELDS, "email"], key_column="id", encoding="latin-1", flush_interval=3600.0,
        )  # fmt: skip
        return CsvSink(cfg)

    async def deliver(self, sink: Sink) -> bool:
        assert isinstance(sink, CsvSink)
        try:
            await sink.flush()
        except SystemUnavailable:
            return False
        return True

    def _rows(self) -> list[dict[str, str]]:
        files = sorted(self.out.glob("*.csv"), key=lambda p: int(_RUN.search(p.name).group(1)))  # type: ignore[union-attr]
        rows: list[dict[str, str]] = []
        for path in files:
            with open(path, newline="", encoding="latin-1") as f:
                rows += list(csv.DictReader(f))
        return rows

    async def state(self, sink: Sink) -> dict[str, dict[str, Any]]:
        assert await self.deliver(sink), "out_dir is unusable"
        found: dict[str, dict[str, Any]] = {}
        for r in self._rows():
            if r["_deleted"] == "true":
                found.pop(r["id"], None)
            else:
                found[r["id"]] = {f: r[f] or None for f in FIELDS}
        return found

    async def writes(self, sink: Sink) -> int:
        assert await self.deliver(sink), "out_dir is unusable"
        return len(self._rows())

    def poison(self, key: str) -> dict[str, Any]:
        return row(key, "Snowman \u2603", "Nowhere")

    @asynccontextmanager
    async def outage(self) -> AsyncIterator[None]:
        away = self.out.with_name("out.away")
        os.rename(self.out, away)
        try:
            yield
        finally:
            os.rename(away, self.out)


SINK_DRIVERS: dict[str, type[SinkDriver]] = {
    d.name: d for d in (SqliteDriver, PostgresDriver, RestDriver, CsvDriver)
}
"""Every sink driver by name, in the order the tests are generated."""
