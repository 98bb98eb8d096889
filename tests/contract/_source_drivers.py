"""Source drivers: every Source adapter with the real system it reads, and how it goes away.

- ``sqlite``: a SQLite file, trigger-fed change table; away = another connection's EXCLUSIVE lock.
- ``sqlite-cursor``: the same file polled by a growing ``rev`` column; away = the same lock.
- ``postgres``: the session's PostgreSQL cluster, change table (no snapshot); away = the
  cluster is stopped (``pg_ctl stop -m fast``) and started again on the same port.
- ``postgres-cursor``: the same, polled by a ``rev`` column fed by a sequence.
- ``rest``: ``tests.fakes.rest_source_api`` over HTTP, paged, ``updated_since``, soft deletes;
  away = its HTTP server is stopped and started again on the same port.
- ``webhook``: a sender that signs and POSTs each change with a delivery id and re-sends it
  until it gets a 2xx; the system pushes, so it cannot be "away" in a way the source sees.
- ``csv``: one file per change renamed into the inbox; away = the inbox directory is moved away.
"""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager, closing
from typing import Any

import anyio
import anyio.to_thread
import httpx

from adapters.files.config import CsvSourceConfig
from adapters.files.csv_source import CsvSource
from adapters.rest.config import RestModifiedSince, RestPagePagination, RestSourceConfig
from adapters.rest.source import RestSource
from adapters.sql.config import PostgresSourceConfig, SqliteSourceConfig
from adapters.sql.postgres import PostgresSource
from adapters.sql.sqlite import SqliteSource
from adapters.webhook.config import WebhookSourceConfig
from adapters.webhook.source import WebhookSource, sign
from mesh.adapters import Source
from mesh.broker import free_port
from tests.contract._base import BOUND, Lack, RestartableServer, SourceCap, SourceDriver
from tests.fakes.rest_source_api import RestSourceApi

__all__ = ["SOURCE_DRIVERS"]

C = SourceCap
_RAISES_INSTEAD = Lack("raises SystemUnavailable while the system is away (see outage_raises)")


# --- SQLite ---------------------------------------------------------------------------------------


class SqliteDriver(SourceDriver):
    name = "sqlite"
    capabilities = frozenset({C.DELETES, C.EVERY_CHANGE, C.REWIND, C.RESUME, C.OUTAGE_RAISES})
    lacks = {C.OUTAGE_RIDDEN_OUT: _RAISES_INSTEAD}
    DDL = "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, city TEXT)"

    async def start(self) -> None:
        self.db = self.env.tmp_path / "source.db"
        self._sql(self.DDL)

    def _sql(self, statement: str, params: tuple[Any, ...] = ()) -> None:
        with closing(sqlite3.connect(self.db)) as db:
            db.execute(statement, params)
            db.commit()

    def config(self) -> SqliteSourceConfig:
        return SqliteSourceConfig(path=str(self.db), table="customers", key="id", poll_interval=0.02)

    def source(self) -> Source:
        return SqliteSource(self.config(), busy_timeout=0.05)

    async def upsert(self, key: str, name: str, city: str) -> None:
        self._sql(
            "INSERT INTO customers (id, name, city) VALUES (?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET name = excluded.name, city = excluded.city",
            (int(key), name, city),
        )

    async def delete(self, key: str) -> None:
        self._sql("DELETE FROM customers WHERE id = ?", (int(key),))

    @asynccontextmanager
    async def outage(self) -> AsyncIterator[None]:
        with closing(sqlite3.connect(self.db, isolation_level=None)) as other:
            other.execute("BEGIN EXCLUSIVE")  # no reader gets past it (rollback journal)
            try:
                yield
            finally:
                other.execute("ROLLBACK")


class SqliteCursorDriver(SqliteDriver):
    name = "sqlite-cursor"
    capabilities = frozenset({C.REWIND, C.RESUME, C.OUTAGE_RAISES})
    lacks = {
        C.DELETES: Lack(
            "cursor mode polls rows by a growing column: a deleted row is simply gone (documented)"
        ),
        C.EVERY_CHANGE: Lack("cursor mode sees each row as it is when polled"),
        C.OUTAGE_RIDDEN_OUT: _RAISES_INSTEAD,
    }
    DDL = "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, city TEXT, rev INTEGER NOT NULL)"

    def config(self) -> SqliteSourceConfig:
        return SqliteSourceConfig(
            path=str(self.db), table="customers", key="id", mode="cursor", cursor_column="rev",
            poll_interval=0.02,
        )  # fmt: skip

    async def upsert(self, key: str, name: str, city: str) -> None:
        self._sql(
            "INSERT INTO customers (id, name, city, rev) "
            "VALUES (?, ?, ?, (SELECT coalesce(max(rev), 0) + 1 FROM customers)) "
            "ON CONFLICT (id) DO UPDATE SET name = excluded.name, city = excluded.city, rev = excluded.rev",
            (int(key), name, city),
        )


# --- PostgreSQL -----------------------------------------------------------------------------------


class PostgresDriver(SourceDriver):
    name = "postgres"
    capabilities = frozenset({C.DELETES, C.EVERY_CHANGE, C.REWIND, C.RESUME, C.OUTAGE_RAISES})
    lacks = {C.OUTAGE_RIDDEN_OUT: _RAISES_INSTEAD}
    uses_postgres = True

    async def start(self) -> None:
        self._sql("CREATE TABLE customers (id int PRIMARY KEY, name text, city text)")

    def _sql(self, statement: str, params: tuple[Any, ...] = ()) -> None:
        with self.env.pg.connect(self.env.pg_db) as db:
            db.execute(statement, params)

    def source(self) -> Source:
        cfg = PostgresSourceConfig(
            dsn=self.env.pg.dsn(self.env.pg_db), table="customers", key="id", install_triggers=True,
            snapshot=False, poll_interval=0.02, connect_timeout=1,
        )  # fmt: skip
        return PostgresSource(cfg)

    async def upsert(self, key: str, name: str, city: str) -> None:
        self._sql(
            "INSERT INTO customers (id, name, city) VALUES (%s, %s, %s) "
            "ON CONFLICT (id) DO UPDATE SET name = excluded.name, city = excluded.city",
            (int(key), name, city),
        )

    async def delete(self, key: str) -> None:
        self._sql("DELETE FROM customers WHERE id = %s", (int(key),))

    @asynccontextmanager
    async def outage(self) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(self.env.pg.stop)
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(self.env.pg.start)


class PostgresCursorDriver(PostgresDriver):
    name = "postgres-cursor"
    capabilities = SqliteCursorDriver.capabilities
    lacks = SqliteCursorDriver.lacks

    async def start(self) -> None:
        self._sql("CREATE SEQUENCE revs")
        self._sql("CREATE TABLE customers (id int PRIMARY KEY, name text, city text, rev bigint NOT NULL)")

    def source(self) -> Source:
        cfg = PostgresSourceConfig(
            dsn=self.env.pg.dsn(self.env.pg_db), table="customers", key="id", mode="cursor",
            cursor_column="rev", poll_interval=0.02, connect_timeout=1,
        )  # fmt: skip
        return PostgresSource(cfg)

    async def upsert(self, key: str, name: str, city: str) -> None:
        self._sql(
            "INSERT INTO customers (id, name, city, rev) VALUES (%s, %s, %s, nextval('revs')) "
            "ON CONFLICT (id) DO UPDATE SET name = excluded.name, city = excluded.city, rev = excluded.rev",
            (int(key), name, city),
        )


# --- REST API ---------------------------------------------------------------------------------------


class RestDriver(SourceDriver):
    name = "rest"
    capabilities = frozenset({C.DELETES, C.REWIND, C.RESUME, C.OUTAGE_RIDDEN_OUT})
    lacks = {
        C.EVERY_CHANGE: Lack("polls the list endpoint: a poll sees each record's state at that moment"),
        C.OUTAGE_RAISES: Lack("an API that is down is ridden out inside read() (documented)"),
    }

    async def start(self) -> None:
        self.api = RestSourceApi()
        self._stack = AsyncExitStack()
        tg = await self._stack.enter_async_context(anyio.create_task_group())
        self._stack.callback(tg.cancel_scope.cancel)
        self.server = RestartableServer(tg, self.api.run)
        await self.server.up()

    async def stop(self) -> None:
        await self._stack.aclose()

    def source(self) -> Source:
        cfg = RestSourceConfig(
            base_url=f"http://127.0.0.1:{self.server.port}", path="/page/contacts", records_path="data",
            pagination=RestPagePagination(size=2), incremental=RestModifiedSince(param="updated_since"),
            version_field="updated_at", version_type="timestamp", deleted_field="archived",
            poll_interval=0.05, timeout=2.0, backoff_initial=0.01, backoff_max=0.05, breaker_cooldown=0.2,
        )  # fmt: skip
        return RestSource(cfg)

    async def upsert(self, key: str, name: str, city: str) -> None:
        self.api.put("contacts", key, name=name, city=city, archived=False)

    async def delete(self, key: str) -> None:
        self.api.archive("contacts", key)

    @asynccontextmanager
    async def outage(self) -> AsyncIterator[None]:
        await self.server.down()
        try:
            yield
        finally:
            await self.server.up()


# --- webhook ---------------------------------------------------------------------------------------

_SECRET = "whsec_contract_0123456789"


class WebhookDriver(SourceDriver):
    """The system is a sender (a SaaS) that POSTs each change as a signed event with a delivery
    id and, like Stripe, re-sends it until it gets a 2xx (503 while we are closed or stopping,
    connection refused while nobody listens)."""

    name = "webhook"
    capabilities = frozenset({C.DELETES, C.EVERY_CHANGE, C.REWIND, C.RESUME})
    lacks = {
        C.OUTAGE_RAISES: Lack("push: when the sender is away nothing arrives, which is no error"),
        C.OUTAGE_RIDDEN_OUT: Lack("push: when the sender is away nothing arrives, which is no error"),
    }

    async def start(self) -> None:
        self.port = free_port()  # fixed: the sender re-sends to the same URL after a restart
        self._stack = AsyncExitStack()
        self._client = await self._stack.enter_async_context(httpx.AsyncClient(timeout=httpx.Timeout(None)))
        self._tg = await self._stack.enter_async_context(anyio.create_task_group())
        self._stack.callback(self._tg.cancel_scope.cancel)
        self._versions: dict[str, int] = {}
        self._ids = itertools.count(1)
        self._current: WebhookSource | None = None

    async def stop(self) -> None:
        await self._stack.aclose()

    def source(self) -> Source:
        cfg = WebhookSourceConfig(
            port=self.port, state_path=str(self.env.tmp_path / "webhook.db"), secret_env="HOOK_SECRET",
            key_field="data.id", version_field="data.version", type_field="type",
            delete_types=["customer.deleted"], row_field="data", ack_timeout=60.0,
        )  # fmt: skip
        self._current = WebhookSource(cfg, environ={"HOOK_SECRET": _SECRET})
        return self._current

    async def upsert(self, key: str, name: str, city: str) -> None:
        await self._send(key, "customer.updated", {"name": name, "city": city})

    async def delete(self, key: str) -> None:
        await self._send(key, "customer.deleted", {})

    async def _send(self, key: str, kind: str, data: dict[str, Any]) -> None:
        """Start sending one event; return once the receiver holds it (so changes keep their
        order), or at once when no receiver is open (the sender keeps trying)."""
        version = self._versions[key] = self._versions.get(key, 0) + 1
        body = json.dumps({"type": kind, "data": {"id": key, "version": version, **data}}).encode()
        delivery = f"evt-{next(self._ids)}"
        accepted = anyio.Event()
        receiver = self._current if self._current is not None and self._current.url is not None else None
        before = receiver.waiting if receiver is not None else 0
        self._tg.start_soon(self._deliver, body, delivery, accepted)
        if receiver is not None:
            with anyio.fail_after(BOUND):
                while receiver.waiting <= before and not accepted.is_set():
                    await anyio.sleep(0.005)

    async def _deliver(self, body: bytes, delivery: str, accepted: anyio.Event) -> None:
        url = f"http://127.0.0.1:{self.port}/webhook"
        while True:
            headers = {
                "Content-Type": "application/json",
                "Webhook-Signature": sign(_SECRET, body),  # re-signed per attempt, as senders do
                "Webhook-Id": delivery,
            }
            try:
                response = await self._client.post(url, content=body, headers=headers)
            except httpx.TransportError:
                pass  # nobody listens right now
            else:
                if response.status_code == 200:
                    accepted.set()
                    return
                assert response.status_code == 503, f"{delivery}: {response.status_code} {response.text}"
            await anyio.sleep(0.05)


# --- CSV files -----------------------------------------------------------------------------------


class CsvDriver(SourceDriver):
    """Every change is one file with one row, renamed into the inbox (as writers should)."""

    name = "csv"
    capabilities = frozenset({C.DELETES, C.EVERY_CHANGE, C.RESUME, C.OUTAGE_RIDDEN_OUT})
    lacks = {
        C.REWIND: Lack(
            "read(cursor) takes the cursor as committed: a file read to its end completes its run, "
            "so an older cursor no longer reaches it (the agent only reads from committed cursors)"
        ),
        C.OUTAGE_RAISES: Lack("a missing inbox directory is waited out (read keeps looking for files)"),
    }

    async def start(self) -> None:
        self.inbox = self.env.tmp_path / "inbox"
        self.inbox.mkdir()
        self._files = itertools.count(1)

    def source(self) -> Source:
        cfg = CsvSourceConfig(
            inbox_dir=str(self.inbox), state_path=str(self.env.tmp_path / "csv-source.db"), key="id",
            delete_column="deleted", settle_time=0, poll_interval=0.05,
        )  # fmt: skip
        return CsvSource(cfg)

    def _drop(self, line: str) -> None:
        name = f"{next(self._files):06d}.csv"  # same mtime: the name orders them
        staging = self.inbox / f".{name}.tmp"
        staging.write_text(f"id,name,city,deleted\n{line}\n", encoding="utf-8")
        os.replace(staging, self.inbox / name)

    async def upsert(self, key: str, name: str, city: str) -> None:
        self._drop(f"{key},{name},{city},false")

    async def delete(self, key: str) -> None:
        self._drop(f"{key},,,true")

    @asynccontextmanager
    async def outage(self) -> AsyncIterator[None]:
        away = self.inbox.with_name("inbox.away")
        os.rename(self.inbox, away)
        try:
            yield
        finally:
            os.rename(away, self.inbox)


SOURCE_DRIVERS: dict[str, type[SourceDriver]] = {
    d.name: d
    for d in (
        SqliteDriver, SqliteCursorDriver, PostgresDriver, PostgresCursorDriver, RestDriver, WebhookDriver,
        CsvDriver,
    )
}  # fmt: skip
"""Every source driver by name, in the order the tests are generated."""
