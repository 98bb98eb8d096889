"""The inbox: ids of envelopes a sink has already applied (or deliberately skipped).

Guarantees (I4): a consumer asks :meth:`Inbox.seen` before applying and calls
:meth:`Inbox.record` after the sink's write is durable and before acking, so a redelivery of an
envelope the inbox knows causes no second effect. Entries older than the retention are pruned;
the sink's version guard covers anything that old.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from mesh.store._sqlite import SqliteStore, store_errors

__all__ = ["Inbox", "InboxEntry"]

_CHUNK = 500


class InboxEntry(NamedTuple):
    id: str
    flow: str
    key: str
    version: int
    outcome: str
    """``applied``, ``stale`` (version guard) or ``echo`` (own origin)."""


class Inbox(SqliteStore):
    """The agent's durable record of envelopes already handled by its sinks."""

    schema = """
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
        async with self.write() as db:
            await db.executemany(
                "INSERT INTO inbox (id, flow, key, version, outcome, applied_at)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO NOTHING",
                rows,
            )

    async def prune(self, older_than: float) -> int:
        """Forget entries recorded more than ``older_than`` seconds ago; returns how many."""
        cutoff = int((time.time() - older_than) * 1000)
        async with self.write() as db:
            cur = await db.execute("DELETE FROM inbox WHERE applied_at < ?", (cutoff,))
            return int(cur.rowcount)

    async def count(self) -> int:
        return int(await self.scalar("SELECT count(*) FROM inbox") or 0)
