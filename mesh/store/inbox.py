"""The inbox: ids of envelopes a sink has already applied (or deliberately skipped).

Guarantees (I4): a consumer asks :meth:`Inbox.seen` before applying and calls
:meth:`Inbox.record` after the sink's write is durable and before acking, so a redelivery of an
envelope the inbox knows causes no second effect. Entries older than the retention are pruned;
the sink's version guard covers anything that old.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import NamedTuple, Self

import aiosqlite
import anyio

from mesh.store._sqlite import open_store, store_errors

__all__ = ["Inbox", "InboxEntry"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS inbox (
    id         TEXT PRIMARY KEY,
    flow       TEXT NOT NULL,
    key        TEXT NOT NULL,
    version    INTEGER NOT NULL,
    outcome    TEXT NOT NULL,
    applied_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS inbox_applied_at ON inbox (applied_at);
"""

_CHUNK = 500


class InboxEntry(NamedTuple):
    id: str
    flow: str
    key: str
    version: int
    outcome: str
    """``applied``, ``stale`` (version guard), ``echo`` (own origin) or ``dead`` (dead-lettered)."""


class Inbox:
    """The agent's durable record of envelopes already handled by its sinks."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db: aiosqlite.Connection | None = None
        self._lock = anyio.Lock()

    def __repr__(self) -> str:
        return f"<Inbox {self.path} {'open' if self._db else 'closed'}>"

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
        self._db = await open_store(self.path, synchronous="FULL")
        with store_errors(self.path):
            await self._db.executescript(_SCHEMA)

    async def aclose(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            # Shielded: an abandoned aiosqlite worker would later call into a closed event loop.
            with anyio.CancelScope(shield=True):
                await db.close()

    @property
    def db(self) -> aiosqlite.Connection:
        assert self._db is not None, "inbox is not open"
        return self._db

    async def seen(self, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` were already recorded."""
        found: set[str] = set()
        with store_errors(self.path):
            for i in range(0, len(ids), _CHUNK):
                part = ids[i : i + _CHUNK]
                marks = ",".join("?" * len(part))
                async with self.db.execute(f"SELECT id FROM inbox WHERE id IN ({marks})", part) as cur:
                    found.update(r[0] for r in await cur.fetchall())
        return found

    async def record(self, entries: Iterable[InboxEntry]) -> None:
        """Durably record ``entries`` in one transaction."""
        now = time.time_ns() // 1_000_000
        rows = [(*e, now) for e in entries]
        if not rows:
            return
        async with self._lock:
            with store_errors(self.path):
                await self.db.execute("BEGIN IMMEDIATE")
                try:
                    await self.db.executemany(
                        "INSERT INTO inbox (id, flow, key, version, outcome, applied_at)"
                        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO NOTHING",
                        rows,
                    )
                    await self.db.execute("COMMIT")
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await self.db.execute("ROLLBACK")
                    raise

    async def prune(self, older_than: float) -> int:
        """Forget entries recorded more than ``older_than`` seconds ago; returns how many."""
        cutoff = int((time.time() - older_than) * 1000)
        async with self._lock:
            with store_errors(self.path):
                cur = await self.db.execute("DELETE FROM inbox WHERE applied_at < ?", (cutoff,))
                return int(cur.rowcount)

    async def count(self) -> int:
        with store_errors(self.path):
            async with self.db.execute("SELECT count(*) FROM inbox") as cur:
                row = await cur.fetchone()
        return int(row[0]) if row else 0
