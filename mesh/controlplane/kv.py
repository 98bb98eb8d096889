"""Control-plane state in JetStream KV: the buckets, compare-and-swap access, and a mirror.

* :func:`ensure_buckets` creates ``mesh_agents``, ``mesh_flows``, ``mesh_assign``,
  ``mesh_leader``, ``mesh_sagas`` (the orchestrators' saga state) and ``mesh_runs`` (run
  records of scheduled bulk runs) when missing and is safe to run from many replicas at once.
* :class:`Bucket` is the small interface the control plane needs: ``get``, ``create`` (only if
  absent), ``update`` (only if the revision still matches: compare-and-swap), ``put`` and
  ``delete`` and ``watch``; it lives in :mod:`mesh.transport` (``NatsBucket`` on JetStream,
  ``MemoryBucket`` in memory) and is re-exported here.
* :class:`KvMirror` keeps an in-memory copy of one bucket current through a KV watcher, so reads
  (``/status``, ``agent list``) never wait on NATS. nats-py watchers can silently miss updates
  after a server restart or a reconnect: the mirror re-reads the whole bucket (a fresh watcher)
  after every reconnect and every ``resync_every`` seconds, so it converges whatever happened.
"""

from __future__ import annotations

import logging

import anyio
from anyio.abc import TaskStatus

from mesh.controlplane.models import AGENTS_BUCKET, ASSIGN_BUCKET, FLOWS_BUCKET, LEADER_BUCKET
from mesh.runs.report import RUNS_BUCKET
from mesh.saga.state import SAGA_BUCKET
from mesh.transport import Bucket, Entry, MemoryBucket, NatsBucket, RevisionConflict, Transport

__all__ = [
    "BUCKETS",
    "DIRECT_BUCKETS",
    "Bucket",
    "Entry",
    "KvMirror",
    "MemoryBucket",
    "NatsBucket",
    "RevisionConflict",
    "ensure_buckets",
]

log = logging.getLogger(__name__)

BUCKETS: dict[str, int] = {
    AGENTS_BUCKET: 1,
    FLOWS_BUCKET: 5,
    ASSIGN_BUCKET: 1,
    LEADER_BUCKET: 1,
    SAGA_BUCKET: 1,  # the orchestrators' saga state (mesh.saga)
    RUNS_BUCKET: 1,  # run records of scheduled bulk runs, written by the agents (mesh.runs.report)
}
"""Bucket name -> history kept per key."""

DIRECT_BUCKETS: frozenset[str] = frozenset({ASSIGN_BUCKET})
"""Buckets created with direct get: an agent reads its own assignment key by a request whose
subject names the key, which a NATS permission can limit (a KV watcher's filter cannot be)."""


async def ensure_buckets(
    transport: Transport, *, replicas: int = 1, memory: bool = False
) -> dict[str, Bucket]:
    """Create the control-plane buckets when missing (``mesh_assign`` with direct get); return
    them by name. Idempotent; :class:`~mesh.controlplane.layout.LayoutKeeper` re-creates one that
    goes missing later.

    Raises:
        TransportError: NATS unreachable or JetStream refused.
    """
    return {
        name: await transport.key_value(
            name, history=history, replicas=replicas, memory=memory, direct=name in DIRECT_BUCKETS
        )
        for name, history in BUCKETS.items()
    }


class KvMirror:
    """An in-memory copy of one bucket (key -> :class:`Entry`), eventually consistent.

    ``apply``/``forget`` let the writer put its own successful writes in at once (read your
    writes); an update older than what the mirror holds never overwrites it.
    """

    def __init__(self, js: Transport, bucket: Bucket, *, resync_every: float = 60.0) -> None:
        self.js = js
        self.bucket = bucket
        self.resync_every = resync_every
        self.entries: dict[str, Entry] = {}
        self._gone: dict[str, int] = {}
        self.synced = anyio.Event()
        self.resyncs = 0
        self._reload = False
        self._epoch = 0
        self._versions: dict[str, int] = {}

    def version(self, prefix: str | None = None) -> tuple[int, int]:
        """Changes so far to keys in ``<prefix>.*`` (``prefix``: the key's first token; None:
        every key): equal values mean nothing there changed in between (a reload counts as a
        change of everything)."""
        return self._epoch, self._versions.get("" if prefix is None else prefix, 0)

    def _touch(self, key: str) -> None:
        prefix = key.partition(".")[0]
        self._versions[prefix] = self._versions.get(prefix, 0) + 1
        self._versions[""] = self._versions.get("", 0) + 1

    def __repr__(self) -> str:
        return f"<KvMirror {self.bucket.name} keys={len(self.entries)} resyncs={self.resyncs}>"

    def get(self, key: str) -> Entry | None:
        return self.entries.get(key)

    def with_prefix(self, prefix: str) -> dict[str, Entry]:
        """Entries whose key starts with ``prefix``, by the key's remainder."""
        n = len(prefix)
        return {k[n:]: e for k, e in self.entries.items() if k.startswith(prefix)}

    def reload(self) -> None:
        """Drop this copy and load the bucket afresh now (it was re-created: its revisions
        started again, so nothing held here may be kept as "newer")."""
        self._reload = True

    def apply(self, entry: Entry) -> None:
        current = self.entries.get(entry.key)
        if (current is not None and current.revision >= entry.revision) or self._gone.get(
            entry.key, 0
        ) >= entry.revision:
            return
        self.entries[entry.key] = entry
        self._gone.pop(entry.key, None)
        self._touch(entry.key)

    def forget(self, key: str, revision: int) -> None:
        current = self.entries.get(key)
        if current is not None and current.revision > revision:
            return
        self.entries.pop(key, None)
        self._gone[key] = max(revision, self._gone.get(key, 0))
        self._touch(key)

    async def run(self, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Watch the bucket forever; ``started`` once the first full copy is loaded.

        Raises:
            TransportError: the watch could not be (re)created; the supervisor restarts it.
        """
        started = False
        while True:
            reconnects = self.js.reconnects
            fresh, self._reload = self._reload, False
            async with await self.bucket.watch() as watch:
                snapshot: dict[str, Entry] = {}
                gone: dict[str, int] = {}
                loaded = False
                until = anyio.current_time() + self.resync_every
                while anyio.current_time() < until and self.js.reconnects == reconnects and not self._reload:
                    update = await watch.next(timeout=1.0)
                    if update is None:
                        continue
                    if update.op == "loaded":  # end of the initial values: swap in the fresh copy
                        if not loaded:
                            loaded = True
                            self._swap(snapshot, gone, fresh)
                            if not started:
                                started = True
                                task_status.started()
                        continue
                    target_entries, target_gone = (self.entries, self._gone) if loaded else (snapshot, gone)
                    rev = update.revision
                    if update.op == "delete":
                        if target_entries.get(update.key, Entry("", b"", 0)).revision <= rev:
                            target_entries.pop(update.key, None)
                            target_gone[update.key] = rev
                            if loaded:
                                self._touch(update.key)
                    elif loaded:
                        self.apply(Entry(update.key, update.value, rev))
                    else:
                        snapshot[update.key] = Entry(update.key, update.value, rev)
                if self.js.reconnects != reconnects:
                    log.info("KV %s: reconnected; reloading the mirror", self.bucket.name)
                self.resyncs += 1

    def _swap(self, snapshot: dict[str, Entry], gone: dict[str, int], fresh: bool = False) -> None:
        # Local writes newer than the whole snapshot stay (the watcher delivers them again),
        # unless the bucket was re-created (``fresh``): then every revision held is stale.
        newest = max((e.revision for e in snapshot.values()), default=0)
        newest = max(newest, *gone.values()) if gone else newest
        for key, e in self.entries.items():
            if e.revision > newest and not fresh:
                snapshot[key] = e
        self.entries = snapshot
        self._gone = gone
        self._epoch += 1
        self.synced.set()
