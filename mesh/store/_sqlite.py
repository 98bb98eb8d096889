"""Shared base of the agent's SQLite stores: opening with the right pragmas, one write
transaction helper, and translating sqlite3 errors into the mesh's error tree."""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiosqlite
import anyio
import anyio.to_thread

from mesh.errors import StopError, SystemUnavailable


@contextmanager
def store_errors(path: Path) -> Iterator[None]:
    """Busy/locked -> SystemUnavailable (retry); anything else (corrupt, full disk) -> StopError."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        text = str(exc).lower()
        if "locked" in text or "busy" in text:
            raise SystemUnavailable(f"store {path} busy: {exc}") from exc
        raise StopError(f"store {path}: {exc}") from exc
    except sqlite3.Error as exc:
        raise StopError(f"store {path}: {exc}") from exc


class SqliteStore:
    """One aiosqlite connection in WAL mode; an async context manager over ``open``/``aclose``.

    Writes go through :meth:`write`: one ``BEGIN IMMEDIATE`` transaction, serialised within the
    process, committed at the end of the block or rolled back (even when cancelled).
    """

    schema = ""
    synchronous = "FULL"
    cache_size = -1024
    """SQLite page cache per connection: negative is KiB (SQLite's default is 2,000 KiB). The
    stores are queues, read at one end and written at the other, so a small cache costs no speed
    and keeps an agent's memory flat whatever its backlog."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db: aiosqlite.Connection | None = None
        self._lock = anyio.Lock()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path} {'open' if self._db else 'closed'}>"

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Open (creating) the store and its schema.

        Raises:
            StopError: the file cannot be opened or is not a usable database.
        """
        try:
            await anyio.to_thread.run_sync(private_file, self.path)
        except OSError as exc:
            raise StopError(f"cannot create store {self.path}: {exc.strerror or exc}") from exc
        try:
            db = await aiosqlite.connect(self.path, isolation_level=None)
        except sqlite3.Error as exc:
            raise StopError(f"cannot open store {self.path}: {exc}") from exc
        try:
            with store_errors(self.path):
                await db.execute("PRAGMA journal_mode=WAL")
                await db.execute(f"PRAGMA synchronous={self.synchronous}")
                await db.execute("PRAGMA busy_timeout=10000")
                await db.execute(f"PRAGMA cache_size={self.cache_size}")
                await db.executescript(self.schema)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await db.close()
            raise
        self._db = db

    async def aclose(self) -> None:
        """Close the connection. Idempotent."""
        db, self._db = self._db, None
        if db is not None:
            # Shielded: an abandoned aiosqlite worker would later call into a closed event loop.
            with anyio.CancelScope(shield=True):
                await db.close()

    @property
    def db(self) -> aiosqlite.Connection:
        assert self._db is not None, f"{self!r} is not open"
        return self._db

    @asynccontextmanager
    async def write(self) -> AsyncIterator[aiosqlite.Connection]:
        """A write transaction: committed when the block ends, rolled back if it raises."""
        async with self._lock:
            with store_errors(self.path):
                db = self.db
                try:
                    await db.execute("BEGIN IMMEDIATE")  # inside: a cancelled BEGIN is rolled back too
                    yield db
                    await db.execute("COMMIT")
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        try:
                            await db.execute("ROLLBACK")
                        except sqlite3.OperationalError:
                            # No transaction: BEGIN failed, or the caller was cancelled while
                            # COMMIT was awaited and the worker thread finished it anyway. Keep
                            # the original exception (a SIGTERM must not turn into a StopError).
                            if db.in_transaction:
                                raise
                    raise

    async def scalar(self, sql: str, params: tuple[object, ...] = ()) -> Any:
        """The first column of the first row of a query (None when there is no row)."""
        with store_errors(self.path):
            async with self.db.execute(sql, params) as cur:
                row = await cur.fetchone()
        return None if row is None else row[0]


def private_dir(path: Path) -> None:
    """Create ``path`` (and its parents) if missing and make it 0700: state dirs hold financial
    records and credentials, readable by the agent's user only, whoever created them."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if stat.S_IMODE(path.stat().st_mode) != 0o700:
        os.chmod(path, 0o700)


def private_file(path: Path) -> None:
    """Create the store file ``path`` 0600 (its directory 0700 if this creates it) and keep it
    0600. SQLite gives the -wal and -shm files the database file's mode."""
    if not path.parent.exists():
        private_dir(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != 0o600:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
