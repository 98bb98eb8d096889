"""Control-plane state in JetStream KV: the buckets, compare-and-swap access, and a mirror.

* :func:`ensure_buckets` creates ``mesh_agents``, ``mesh_flows``, ``mesh_assign`` and
  ``mesh_leader`` when missing and is safe to run from many replicas at once.
* :class:`Bucket` is the small interface the control plane needs: ``get``, ``create`` (only if
  absent), ``update`` (only if the revision still matches: compare-and-swap), ``put`` and
  ``delete``. :class:`NatsBucket` implements it on nats-py (every call bounded by the
  connection's request timeout; nats-py's exceptions translated to
  :class:`~mesh.errors.TransportError` and :class:`RevisionConflict`); :class:`MemoryBucket` is
  the same contract in memory, for tests.
* :class:`KvMirror` keeps an in-memory copy of one bucket current through a KV watcher, so reads
  (``/status``, ``agent list``) never wait on NATS. nats-py watchers can silently miss updates
  after a server restart or a reconnect: the mirror re-reads the whole bucket (a fresh watcher)
  after every reconnect and every ``resync_every`` seconds, so it converges whatever happened.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import nats.errors
import nats.js.errors
from anyio.abc import TaskStatus
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from mesh.controlplane.models import AGENTS_BUCKET, ASSIGN_BUCKET, FLOWS_BUCKET, LEADER_BUCKET
from mesh.errors import RetryableError, TransportError
from mesh.transport import JetStream

__all__ = [
    "BUCKETS",
    "Bucket",
    "Entry",
    "KvMirror",
    "MemoryBucket",
    "NatsBucket",
    "RevisionConflict",
    "ensure_buckets",
]

log = logging.getLogger(__name__)

BUCKETS: dict[str, int] = {AGENTS_BUCKET: 1, FLOWS_BUCKET: 5, ASSIGN_BUCKET: 1, LEADER_BUCKET: 1}
"""Bucket name -> history kept per key."""

_NATS_ERRORS = (nats.errors.Error, nats.js.errors.Error, TimeoutError, OSError)


class RevisionConflict(RetryableError):
    """A compare-and-swap lost: the key changed (or exists / is gone) since it was read.
    Read again and decide again."""


@dataclass(frozen=True, slots=True)
class Entry:
    key: str
    value: bytes
    revision: int


class Bucket(Protocol):
    """Compare-and-swap access to one KV bucket. Every method may raise TransportError."""

    name: str

    async def get(self, key: str) -> Entry | None:
        """The current value, or None when absent or deleted."""
        ...

    async def create(self, key: str, value: bytes) -> int:
        """Store only if absent (or deleted). Returns the revision. Raises RevisionConflict."""
        ...

    async def update(self, key: str, value: bytes, revision: int) -> int:
        """Store only if the key is still at ``revision``. Raises RevisionConflict."""
        ...

    async def put(self, key: str, value: bytes) -> int:
        """Store unconditionally. Returns the revision."""
        ...

    async def delete(self, key: str, revision: int | None = None) -> None:
        """Delete (only if still at ``revision`` when given: else RevisionConflict)."""
        ...


class NatsBucket:
    """:class:`Bucket` on a nats-py ``KeyValue``."""

    def __init__(self, kv: KeyValue, name: str) -> None:
        self.kv = kv
        self.name = name

    def __repr__(self) -> str:
        return f"<NatsBucket {self.name}>"

    async def _call(self, what: str, coro: Any) -> Any:
        try:
            return await coro
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise RevisionConflict(f"{self.name}: {what}: {exc.description or 'revision changed'}") from None
        except nats.js.errors.APIError as exc:
            if exc.err_code in (10071, 10164):  # wrong last sequence
                raise RevisionConflict(f"{self.name}: {what}: revision changed") from None
            raise TransportError(f"KV {self.name}: {what}: {exc.description or exc}") from exc
        except _NATS_ERRORS as exc:
            raise TransportError(f"KV {self.name}: {what}: {type(exc).__name__}: {exc}") from exc

    async def get(self, key: str) -> Entry | None:
        async def get() -> Any:
            try:
                return await self.kv.get(key)
            except nats.js.errors.NotFoundError:  # KeyNotFoundError, and deleted keys
                return None

        e = await self._call(f"get {key}", get())
        return None if e is None else Entry(key, bytes(e.value or b""), int(e.revision))

    async def create(self, key: str, value: bytes) -> int:
        return int(await self._call(f"create {key}", self.kv.create(key, value)))

    async def update(self, key: str, value: bytes, revision: int) -> int:
        return int(await self._call(f"update {key}", self.kv.update(key, value, last=revision)))

    async def put(self, key: str, value: bytes) -> int:
        return int(await self._call(f"put {key}", self.kv.put(key, value)))

    async def delete(self, key: str, revision: int | None = None) -> None:
        await self._call(f"delete {key}", self.kv.delete(key, last=revision))


class MemoryBucket:
    """:class:`Bucket` in memory with the same revision rules (one sequence per bucket)."""

    def __init__(self, name: str = "memory") -> None:
        self.name = name
        self.data: dict[str, Entry] = {}
        self.seq = 0

    def __repr__(self) -> str:
        return f"<MemoryBucket {self.name} keys={len(self.data)} seq={self.seq}>"

    def _store(self, key: str, value: bytes) -> int:
        self.seq += 1
        self.data[key] = Entry(key, value, self.seq)
        return self.seq

    async def get(self, key: str) -> Entry | None:
        await anyio.lowlevel.checkpoint()
        return self.data.get(key)

    async def create(self, key: str, value: bytes) -> int:
        await anyio.lowlevel.checkpoint()
        if key in self.data:
            raise RevisionConflict(f"{self.name}: create {key}: exists")
        return self._store(key, value)

    async def update(self, key: str, value: bytes, revision: int) -> int:
        await anyio.lowlevel.checkpoint()
        current = self.data.get(key)
        if current is None or current.revision != revision:
            raise RevisionConflict(f"{self.name}: update {key}: revision changed")
        return self._store(key, value)

    async def put(self, key: str, value: bytes) -> int:
        await anyio.lowlevel.checkpoint()
        return self._store(key, value)

    async def delete(self, key: str, revision: int | None = None) -> None:
        await anyio.lowlevel.checkpoint()
        current = self.data.get(key)
        if revision is not None and (current is None or current.revision != revision):
            raise RevisionConflict(f"{self.name}: delete {key}: revision changed")
        self.seq += 1
        self.data.pop(key, None)


async def ensure_buckets(js: JetStream, *, replicas: int = 1, memory: bool = False) -> dict[str, NatsBucket]:
    """Create the control-plane buckets when missing; return them by name. Idempotent.

    Raises:
        TransportError: NATS unreachable or JetStream refused.
    """
    out: dict[str, NatsBucket] = {}
    for name, history in BUCKETS.items():
        try:
            kv = await js.js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            config = KeyValueConfig(
                bucket=name,
                history=history,
                replicas=replicas,
                storage=StorageType.MEMORY if memory else StorageType.FILE,
                description=f"connector mesh control plane: {name}",
            )
            try:
                kv = await js.js.create_key_value(config)
            except nats.js.errors.APIError:
                kv = await _bound(js.js.key_value(name), f"open bucket {name}")  # created meanwhile
            except _NATS_ERRORS as exc:
                raise TransportError(f"create bucket {name}: {type(exc).__name__}: {exc}") from exc
        except _NATS_ERRORS as exc:
            raise TransportError(f"open bucket {name}: {type(exc).__name__}: {exc}") from exc
        out[name] = NatsBucket(kv, name)
    return out


async def _bound(coro: Any, what: str) -> Any:
    try:
        return await coro
    except _NATS_ERRORS as exc:
        raise TransportError(f"{what}: {type(exc).__name__}: {exc}") from exc


class KvMirror:
    """An in-memory copy of one bucket (key -> :class:`Entry`), eventually consistent.

    ``apply``/``forget`` let the writer put its own successful writes in at once (read your
    writes); an update older than what the mirror holds never overwrites it.
    """

    def __init__(self, js: JetStream, bucket: NatsBucket, *, resync_every: float = 60.0) -> None:
        self.js = js
        self.bucket = bucket
        self.resync_every = resync_every
        self.entries: dict[str, Entry] = {}
        self._gone: dict[str, int] = {}
        self.synced = anyio.Event()
        self.resyncs = 0

    def __repr__(self) -> str:
        return f"<KvMirror {self.bucket.name} keys={len(self.entries)} resyncs={self.resyncs}>"

    def get(self, key: str) -> Entry | None:
        return self.entries.get(key)

    def with_prefix(self, prefix: str) -> dict[str, Entry]:
        """Entries whose key starts with ``prefix``, by the key's remainder."""
        n = len(prefix)
        return {k[n:]: e for k, e in self.entries.items() if k.startswith(prefix)}

    def apply(self, entry: Entry) -> None:
        current = self.entries.get(entry.key)
        if (current is not None and current.revision >= entry.revision) or self._gone.get(
            entry.key, 0
        ) >= entry.revision:
            return
        self.entries[entry.key] = entry
        self._gone.pop(entry.key, None)

    def forget(self, key: str, revision: int) -> None:
        current = self.entries.get(key)
        if current is not None and current.revision > revision:
            return
        self.entries.pop(key, None)
        self._gone[key] = max(revision, self._gone.get(key, 0))

    async def run(self, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Watch the bucket forever; ``started`` once the first full copy is loaded.

        Raises:
            TransportError: the watch could not be (re)created; the supervisor restarts it.
        """
        started = False
        while True:
            reconnects = self.js.reconnects
            watcher = await _bound(self.bucket.kv.watchall(), f"watch {self.bucket.name}")
            try:
                snapshot: dict[str, Entry] = {}
                gone: dict[str, int] = {}
                loaded = False
                until = anyio.current_time() + self.resync_every
                while anyio.current_time() < until and self.js.reconnects == reconnects:
                    try:
                        update = await watcher.updates(timeout=1.0)
                    except (nats.errors.TimeoutError, TimeoutError):
                        continue
                    if update is None:  # end of the initial values: swap in the fresh copy
                        if not loaded:
                            loaded = True
                            self._swap(snapshot, gone)
                            if not started:
                                started = True
                                task_status.started()
                        continue
                    target_entries, target_gone = (self.entries, self._gone) if loaded else (snapshot, gone)
                    rev = int(update.revision or 0)
                    if update.operation in (KV_DEL, KV_PURGE):
                        if target_entries.get(update.key, Entry("", b"", 0)).revision <= rev:
                            target_entries.pop(update.key, None)
                            target_gone[update.key] = rev
                    elif loaded:
                        self.apply(Entry(update.key, bytes(update.value or b""), rev))
                    else:
                        snapshot[update.key] = Entry(update.key, bytes(update.value or b""), rev)
                if self.js.reconnects != reconnects:
                    log.info("KV %s: reconnected; reloading the mirror", self.bucket.name)
                self.resyncs += 1
            finally:
                with (
                    anyio.CancelScope(shield=True),
                    anyio.move_on_after(2),
                    contextlib.suppress(*_NATS_ERRORS, AttributeError),
                ):
                    await watcher.stop()

    def _swap(self, snapshot: dict[str, Entry], gone: dict[str, int]) -> None:
        # Local writes newer than the whole snapshot stay (the watcher delivers them again).
        newest = max((e.revision for e in snapshot.values()), default=0)
        newest = max(newest, *gone.values()) if gone else newest
        for key, e in self.entries.items():
            if e.revision > newest:
                snapshot[key] = e
        self.entries = snapshot
        self._gone = gone
        self.synced.set()
