"""The broker layout the control plane owns, and how it heals.

The control plane creates the streams (``MESH_EVENTS``, ``MESH_COMMANDS``, ``MESH_DLQ``,
``MESH_AUDIT``) and the KV buckets (``mesh_agents``, ``mesh_flows``, ``mesh_assign`` with direct
get, ``mesh_leader``, and ``mesh_api_results`` for System API idempotency, README "System APIs")
at start; agents only check that the streams they use exist. While it
runs, :class:`LayoutKeeper` checks every ``every`` seconds (and at once when woken, e.g. by a
``NotFound`` from a KV operation, see :class:`HealingBucket`) that each one still exists, and
re-creates any that went missing, logging one line per heal. A re-created bucket gets back the
keys this replica's mirror held (the registry, the desired flows, the assignments; not the
leader lease), and the mirror is reloaded, so the desired state survives a deleted bucket.

A KV bucket is the JetStream stream ``KV_<bucket>``, which is what is checked (this needs a
JetStream transport; the in-memory transport's buckets are not streams).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import anyio
from anyio.abc import TaskStatus

from mesh.api import RESULTS_BUCKET, ensure_results_bucket
from mesh.config import StreamsConfig
from mesh.controlplane.kv import BUCKETS, DIRECT_BUCKETS, Bucket, KvMirror, ensure_buckets
from mesh.controlplane.runs_view import ensure_runs_retention
from mesh.errors import TransportError
from mesh.runs.report import DEFAULT_RUNS_MAX_AGE, RUNS_BUCKET
from mesh.transport import (
    AUDIT_STREAM,
    COMMANDS_STREAM,
    DLQ_STREAM,
    EVENTS_STREAM,
    TRACE_STREAM,
    Entry,
    KvWatch,
    NoResponders,
    NotFound,
    Transport,
)

__all__ = ["STREAMS", "HealingBucket", "LayoutKeeper"]

log = logging.getLogger(__name__)

STREAMS: tuple[str, ...] = (EVENTS_STREAM, COMMANDS_STREAM, DLQ_STREAM, AUDIT_STREAM, TRACE_STREAM)
"""The streams the control plane owns."""


class LayoutKeeper:
    """Creates the control plane's streams and buckets, and re-creates any that goes missing.

    ``missing`` lists what the last check found missing (``"stream MESH_EVENTS"``,
    ``"bucket mesh_flows"``) and could not re-create yet.
    """

    def __init__(
        self,
        js: Transport,
        streams: StreamsConfig,
        *,
        every: float = 5.0,
        mirrors: dict[str, KvMirror] | None = None,
        runs_max_age: float = DEFAULT_RUNS_MAX_AGE,
    ) -> None:
        self.js = js
        self.runs_max_age = runs_max_age
        self.streams = streams
        self.every = every
        self.mirrors: dict[str, KvMirror] = mirrors if mirrors is not None else {}
        """Bucket name -> the mirror whose keys restore it (and is reloaded) after a heal."""
        self.missing: list[str] = []
        self.heals = 0
        self._wake = anyio.Event()
        self._lock = anyio.Lock()

    def __repr__(self) -> str:
        return f"<LayoutKeeper every={self.every:g}s heals={self.heals} missing={self.missing}>"

    @property
    def _replicas(self) -> int:
        return self.streams.replicas

    @property
    def _memory(self) -> bool:
        return self.streams.storage == "memory"

    async def ensure(self) -> dict[str, Bucket]:
        """Create (or bring to our config) every stream and bucket; the buckets by name, each
        wrapped in a :class:`HealingBucket`.

        Raises:
            TransportError: NATS unreachable or JetStream refused.
        """
        await self.js.ensure_streams(self.streams)
        buckets = await ensure_buckets(self.js, replicas=self._replicas, memory=self._memory)
        await ensure_runs_retention(self.js, self.runs_max_age)
        await ensure_results_bucket(self.js, replicas=self._replicas, memory=self._memory)
        return {name: HealingBucket(b, self) for name, b in buckets.items()}

    async def find_missing(self) -> list[str]:
        """What is missing now (``"stream X"`` / ``"bucket Y"``), without healing it.

        Raises:
            TransportError: the broker did not answer.
        """
        missing = [f"stream {s}" for s in STREAMS if not await self._exists(s)]
        missing += [f"bucket {b}" for b in (*BUCKETS, RESULTS_BUCKET) if not await self._exists(f"KV_{b}")]
        return missing

    async def _exists(self, stream: str) -> bool:
        try:
            await self.js.stream_info(stream)
        except NotFound:
            return False
        return True

    async def heal(self) -> list[str]:
        """Check now and re-create whatever is missing; what was healed.

        Raises:
            TransportError: the broker did not answer or refused (``missing`` keeps what is left).
        """
        async with self._lock:
            missing = await self.find_missing()
            if not missing:
                self.missing = []
                return []
            self.missing = missing
            if any(m.startswith("stream ") for m in missing):
                await self.js.ensure_streams(self.streams)
            for what in missing:
                if not what.startswith("bucket "):
                    continue
                name = what.removeprefix("bucket ")
                if name == RESULTS_BUCKET:  # System API results: re-created empty (calls claim again)
                    await ensure_results_bucket(self.js, replicas=self._replicas, memory=self._memory)
                    log.warning("healed: KV bucket %s was missing; recreated it (empty)", name)
                    continue
                bucket = await self.js.key_value(
                    name, history=BUCKETS[name], replicas=self._replicas, memory=self._memory,
                    direct=name in DIRECT_BUCKETS,
                )  # fmt: skip
                if name == RUNS_BUCKET:
                    await ensure_runs_retention(self.js, self.runs_max_age)
                restored = await self._restore(name, bucket)
                log.warning(
                    "healed: KV bucket %s was missing; recreated it%s", name,
                    f" and restored {restored} keys from this replica's copy" if restored else "",
                )  # fmt: skip
            for what in missing:
                if what.startswith("stream "):
                    log.warning("healed: %s was missing; recreated it (empty)", what)
            self.heals += len(missing)
            self.missing = await self.find_missing()
            return missing

    async def _restore(self, name: str, bucket: Bucket) -> int:
        mirror = self.mirrors.get(name)
        if mirror is None:
            return 0
        entries: Sequence[Entry] = sorted(mirror.entries.values(), key=lambda e: e.revision)
        for e in entries:
            await bucket.put(e.key, e.value)
        mirror.reload()
        return len(entries)

    def wake(self) -> None:
        """Check (and heal) now rather than at the next period."""
        self._wake.set()

    async def run(self, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Check and heal every ``every`` seconds and when woken, until cancelled."""
        task_status.started()
        while True:
            self._wake = anyio.Event()
            with anyio.move_on_after(self.every):
                await self._wake.wait()
            try:
                await self.heal()
            except TransportError as exc:
                if self.missing:
                    log.warning("cannot heal %s yet: %s", ", ".join(self.missing), exc)


class HealingBucket(Bucket):
    """A :class:`Bucket` that, when its bucket has gone missing, has the keeper re-create it and
    tries the operation once more (a write to a deleted bucket finds no stream: ``NoResponders``
    or ``NotFound``)."""

    def __init__(self, inner: Bucket, keeper: LayoutKeeper) -> None:
        self.inner = inner
        self.keeper = keeper
        self.name = inner.name

    def __repr__(self) -> str:
        return f"<HealingBucket {self.inner!r}>"

    async def _healed(self) -> bool:
        try:
            return bool(await self.keeper.heal())
        except TransportError:
            return False

    async def get(self, key: str) -> Entry | None:
        try:
            return await self.inner.get(key)
        except (NotFound, NoResponders):
            if not await self._healed():
                raise
            return await self.inner.get(key)

    async def create(self, key: str, value: bytes) -> int:
        try:
            return await self.inner.create(key, value)
        except (NotFound, NoResponders):
            if not await self._healed():
                raise
            return await self.inner.create(key, value)

    async def update(self, key: str, value: bytes, revision: int) -> int:
        try:
            return await self.inner.update(key, value, revision)
        except (NotFound, NoResponders):
            if not await self._healed():
                raise
            return await self.inner.update(key, value, revision)

    async def put(self, key: str, value: bytes) -> int:
        try:
            return await self.inner.put(key, value)
        except (NotFound, NoResponders):
            if not await self._healed():
                raise
            return await self.inner.put(key, value)

    async def put_many(self, items: Sequence[tuple[str, bytes]]) -> list[int | None]:
        """The inner bucket's (items not stored are None; a missing bucket is re-created by
        the keeper's periodic check, not here)."""
        return await self.inner.put_many(items)

    async def delete(self, key: str, revision: int | None = None) -> None:
        try:
            await self.inner.delete(key, revision)
        except (NotFound, NoResponders):
            if not await self._healed():
                raise
            await self.inner.delete(key, revision)

    async def watch(self, keys: str = ">") -> KvWatch:
        return await self.inner.watch(keys)
