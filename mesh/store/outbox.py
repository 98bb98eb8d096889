"""The outbox: envelopes waiting to be published, and the source cursors that produced them.

Guarantees (I1, I3):

* :meth:`Outbox.capture` commits a flow's new cursor and the envelopes made from the changes up
  to it in ONE SQLite transaction (WAL, ``synchronous=FULL``): after it returns, nothing is lost
  even if the process, the broker or the machine dies; before it returns, nothing moved, and
  the source is asked again from the old cursor.
* Rows leave the outbox only through :meth:`Outbox.remove`, which the relay calls for rows whose
  PubAck it holds. Rows are read back in capture order.
* Capturing the same envelope id twice keeps one row.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import anyio
import msgspec

from mesh.store._sqlite import SqliteStore, store_errors

_HEADERS = msgspec.json.Encoder()

__all__ = ["Outbox", "OutboxRow"]

_CHUNK = 500  # stay well under SQLite's bound-parameter limit


class OutboxRow(NamedTuple):
    seq: int
    id: str
    flow: str
    subject: str
    data: bytes
    created_at: int
    headers: dict[str, str] | None = None
    """Extra message headers (a capture-side dead letter carries its reason here)."""


class Outbox(SqliteStore):
    """The agent's durable queue of envelopes not yet acknowledged by JetStream."""

    schema = """
        CREATE TABLE IF NOT EXISTS outbox (
            seq        INTEGER PRIMARY KEY AUTOINCREMENT,
            id         TEXT NOT NULL UNIQUE,
            flow       TEXT NOT NULL,
            subject    TEXT NOT NULL,
            data       BLOB NOT NULL,
            created_at INTEGER NOT NULL,
            headers    TEXT
        );
        CREATE TABLE IF NOT EXISTS cursors (
            flow       TEXT PRIMARY KEY,
            cursor     TEXT NOT NULL,
            updated_at INTEGER NOT NULL
        );
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self._added = anyio.Event()
        self._removed = anyio.Event()
        self.nbytes = 0
        """Bytes of envelopes waiting (kept in memory; exact after open)."""

    def __repr__(self) -> str:
        state = f"bytes={self.nbytes}" if self._db else "closed"
        return f"<Outbox {self.path} {state}>"

    async def open(self) -> None:
        await super().open()
        columns = {str(r[1]) for r in await self.db.execute_fetchall("PRAGMA table_info(outbox)")}
        if "headers" not in columns:  # an outbox from before message headers
            async with self.write() as db:
                await db.execute("ALTER TABLE outbox ADD COLUMN headers TEXT")
        await self._count_bytes()

    async def _count_bytes(self) -> None:
        self.nbytes = int(await self.scalar("SELECT coalesce(sum(length(data)), 0) FROM outbox") or 0)

    async def cursor(self, flow: str) -> str | None:
        """The last cursor committed for ``flow`` (None before the first capture)."""
        value = await self.scalar("SELECT cursor FROM cursors WHERE flow = ?", (flow,))
        return None if value is None else str(value)

    async def capture(
        self,
        flow: str,
        cursor: str,
        items: Sequence[tuple[str, str, bytes]],
        *,
        headers: Mapping[str, Mapping[str, str]] | None = None,
    ) -> int:
        """Atomically store ``items`` (envelope id, subject, encoded envelope) and ``cursor``;
        ``headers`` gives extra message headers by envelope id.

        Returns how many rows were new (an id already waiting is kept once).
        """
        now = time.time_ns() // 1_000_000
        extra = headers or {}
        async with self.write() as db:
            before = db.total_changes
            await db.executemany(
                "INSERT INTO outbox (id, flow, subject, data, created_at, headers)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO NOTHING",
                [
                    (i, flow, s, d, now, _HEADERS.encode(extra[i]).decode() if i in extra else None)
                    for i, s, d in items
                ],
            )
            added = db.total_changes - before
            await db.execute(
                "INSERT INTO cursors (flow, cursor, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT(flow) DO UPDATE SET cursor = excluded.cursor,"
                " updated_at = excluded.updated_at",
                (flow, cursor, now),
            )
        if added == len(items):
            self.nbytes += sum(len(d) for _, _, d in items)
        elif added:  # some ids were already waiting: count exactly
            await self._count_bytes()
        if added:
            self._added.set()
            self._added = anyio.Event()
        return added

    async def peek(self, limit: int) -> list[OutboxRow]:
        """The oldest ``limit`` rows, in capture order."""
        with store_errors(self.path):  # one trip to the database thread (not execute, fetch, close)
            rows = await self.db.execute_fetchall(
                "SELECT seq, id, flow, subject, data, created_at, headers FROM outbox ORDER BY seq LIMIT ?",
                (limit,),
            )
        return [
            OutboxRow(r[0], r[1], r[2], r[3], r[4], r[5], msgspec.json.decode(r[6]) if r[6] else None)
            for r in rows
        ]

    async def remove(self, rows: Sequence[OutboxRow]) -> None:
        """Delete rows whose PubAck the caller holds."""
        if not rows:
            return
        seqs = sorted(r.seq for r in rows)
        async with self.write() as db:
            if seqs[-1] - seqs[0] + 1 == len(seqs) == len(set(seqs)):  # a run of seqs: one range
                await db.execute("DELETE FROM outbox WHERE seq BETWEEN ? AND ?", (seqs[0], seqs[-1]))
                seqs = []
            for i in range(0, len(seqs), _CHUNK):
                part = seqs[i : i + _CHUNK]
                await db.execute(f"DELETE FROM outbox WHERE seq IN ({','.join('?' * len(part))})", part)
        self.nbytes = max(0, self.nbytes - sum(len(r.data) for r in rows))
        self._removed.set()
        self._removed = anyio.Event()

    async def wait_below(self, max_bytes: int) -> None:
        """Return once fewer than ``max_bytes`` bytes of envelopes wait (the relay removed some)."""
        while self.nbytes >= max_bytes:
            await self._removed.wait()

    async def wait_for_rows(self, timeout: float) -> None:
        """Return when rows are captured in this process, or after ``timeout``."""
        event = self._added
        with anyio.move_on_after(timeout):
            await event.wait()

    async def stats_by_flow(self) -> dict[str, tuple[int, float]]:
        """Per flow with rows waiting: (rows, age in seconds of its oldest row). One table scan."""
        with store_errors(self.path):
            query = "SELECT flow, count(*), min(created_at) FROM outbox GROUP BY flow"
            async with self.db.execute(query) as cur:
                rows = await cur.fetchall()
        now = time.time()
        return {str(flow): (int(n), max(0.0, now - oldest / 1000)) for flow, n, oldest in rows}

    async def stats(self) -> tuple[int, float]:
        """(rows waiting, age in seconds of the oldest one; 0 when empty)."""
        with store_errors(self.path):
            async with self.db.execute("SELECT count(*), min(created_at) FROM outbox") as cur:
                row = await cur.fetchone()
        assert row is not None
        depth, oldest = int(row[0]), row[1]
        age = 0.0 if oldest is None else max(0.0, time.time() - oldest / 1000)
        return depth, age
