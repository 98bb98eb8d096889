"""What the sinks of parent and child flows have applied, per key: the state behind ``after``
(parent before child, README "Parent before child").

One row per (flow, key) with the newest version applied, whether that version was a delete and,
for a child flow, the parent it references. It lives in the inbox's database (same connection,
same write lock) but is not pruned with the inbox: a parent applied months ago is still there.

Guarantees: :meth:`AppliedKeys.record` keeps, per (flow, key), the newest version recorded
(an older one never overwrites it); an upsert sets the parent reference (none: cleared) and a
delete keeps the one its record had.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from mesh.store._sqlite import store_errors
from mesh.store.inbox import Inbox

__all__ = ["AppliedKey", "AppliedKeys"]

_CHUNK = 500

_SCHEMA = """
    CREATE TABLE IF NOT EXISTS applied_keys (
        flow        TEXT NOT NULL,
        key         TEXT NOT NULL,
        version     INTEGER NOT NULL,
        deleted     INTEGER NOT NULL,
        parent_flow TEXT,
        parent_key  TEXT,
        PRIMARY KEY (flow, key)
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS applied_keys_parent ON applied_keys (parent_flow, parent_key)
        WHERE parent_flow IS NOT NULL;
"""


class AppliedKey(NamedTuple):
    flow: str
    key: str
    version: int
    deleted: bool
    parent_flow: str | None = None
    """The parent flow a child record references (None: not a child, or no parent)."""
    parent_key: str | None = None


class AppliedKeys:
    """Per-key applied state of the flows that take part in ``after``, in ``inbox``'s database."""

    def __init__(self, inbox: Inbox) -> None:
        self.inbox = inbox
        self._ready = False

    def __repr__(self) -> str:
        return f"<AppliedKeys {self.inbox.path}>"

    async def _schema(self) -> None:
        if not self._ready:
            with store_errors(self.inbox.path):
                await self.inbox.db.executescript(_SCHEMA)
            self._ready = True

    async def record(self, rows: Iterable[AppliedKey]) -> None:
        """Durably record ``rows`` in one transaction; per (flow, key) the newest version wins.

        Raises:
            SystemUnavailable: the store is busy (retry); StopError: it is unusable.
        """
        params = [(r.flow, r.key, r.version, int(r.deleted), r.parent_flow, r.parent_key) for r in rows]
        if not params:
            return
        await self._schema()
        async with self.inbox.write() as db:
            await db.executemany(
                "INSERT INTO applied_keys (flow, key, version, deleted, parent_flow, parent_key)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (flow, key) DO UPDATE SET"
                " version = excluded.version, deleted = excluded.deleted,"
                " parent_flow = CASE WHEN excluded.deleted THEN parent_flow ELSE excluded.parent_flow END,"
                " parent_key = CASE WHEN excluded.deleted THEN parent_key ELSE excluded.parent_key END"
                " WHERE excluded.version >= applied_keys.version",
                params,
            )

    async def present(self, flow: str, keys: Sequence[str]) -> set[str]:
        """Which of ``keys`` of ``flow`` were applied here and not deleted since."""
        await self._schema()
        found: set[str] = set()
        with store_errors(self.inbox.path):
            for i in range(0, len(keys), _CHUNK):
                part = list(keys[i : i + _CHUNK])
                marks = ",".join("?" * len(part))
                sql = f"SELECT key FROM applied_keys WHERE flow = ? AND deleted = 0 AND key IN ({marks})"
                async with self.inbox.db.execute(sql, [flow, *part]) as cur:
                    found.update(r[0] for r in await cur.fetchall())
        return found

    async def versions(self, flow: str, keys: Sequence[str]) -> dict[str, int]:
        """The newest version recorded for each of ``keys`` of ``flow`` (keys never applied omitted)."""
        await self._schema()
        found: dict[str, int] = {}
        with store_errors(self.inbox.path):
            for i in range(0, len(keys), _CHUNK):
                part = list(keys[i : i + _CHUNK])
                marks = ",".join("?" * len(part))
                sql = f"SELECT key, version FROM applied_keys WHERE flow = ? AND key IN ({marks})"
                async with self.inbox.db.execute(sql, [flow, *part]) as cur:
                    found.update((k, int(v)) for k, v in await cur.fetchall())
        return found

    async def children(
        self, parent_flow: str, parent_keys: Sequence[str]
    ) -> dict[str, list[tuple[str, str]]]:
        """The children still applied here (not deleted) that reference each of ``parent_keys``
        of ``parent_flow``: parent key -> [(child flow, child key)], parents without any omitted."""
        await self._schema()
        out: dict[str, list[tuple[str, str]]] = {}
        with store_errors(self.inbox.path):
            for i in range(0, len(parent_keys), _CHUNK):
                part = list(parent_keys[i : i + _CHUNK])
                marks = ",".join("?" * len(part))
                sql = (
                    "SELECT parent_key, flow, key FROM applied_keys WHERE parent_flow = ?"
                    f" AND parent_key IN ({marks}) AND deleted = 0"
                )
                async with self.inbox.db.execute(sql, [parent_flow, *part]) as cur:
                    for parent_key, flow, key in await cur.fetchall():
                        out.setdefault(parent_key, []).append((flow, key))
        return out
