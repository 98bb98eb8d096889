"""The trace recorder: records what happened to messages, off the delivery path.

:meth:`TraceRecorder.record` only appends to an in-memory buffer (no I/O, no await): the
delivery path pays a few microseconds per record. A background task (:meth:`TraceRecorder.run`,
owned by the agent's supervisor) publishes the buffer every ``[trace] flush_interval`` seconds
as one :class:`~mesh.trace.records.TraceBatch` per kind on ``trace.<agent>.<kind>`` (stream
``MESH_TRACE``), so a delivered batch of 500 messages costs one small publish, not 500.

Guarantees: tracing never blocks, slows or fails the delivery path. It is best effort: records
buffered when the process dies are lost, and beyond ``[trace] max_buffer`` (the broker away for
long) new records are dropped and counted (``dropped``). Sampling (``[trace] sample``) is decided
per correlation id with a stable hash, so every agent keeps or skips the same transactions.

Other components (the system API server, the saga engine) call :func:`record`, which records to
the recorder of the current task (:func:`use_recorder`), or build their own
:class:`TraceRecorder`.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import uuid
import zlib
from collections.abc import Awaitable, Callable, Iterator, Sequence

import anyio
from anyio.abc import TaskStatus
from prometheus_client import Counter

from mesh.config import TraceConfig
from mesh.envelope import now_ms
from mesh.errors import TransportError
from mesh.trace.records import TraceKind, TraceRecord, encode_batch, trace_subject
from mesh.transport import OutMessage, Transport

__all__ = ["TraceRecorder", "current_recorder", "record", "use_recorder"]

log = logging.getLogger(__name__)


_current: contextvars.ContextVar[TraceRecorder | None] = contextvars.ContextVar(
    "mesh_trace_recorder", default=None
)


class TraceRecorder:
    """Buffers :class:`TraceRecord` s of one agent and publishes them in batches (see the module
    docstring). ``published`` and ``dropped`` count records."""

    def __init__(
        self,
        agent: str,
        system: str = "",
        *,
        cfg: TraceConfig | None = None,
        transport: Callable[[], Awaitable[Transport]] | None = None,
        counter: Counter | None = None,
    ) -> None:
        """``counter``: a Prometheus counter labelled ``outcome`` (``published``, ``dropped``)."""
        self.agent = agent
        self.system = system
        self.cfg = cfg or TraceConfig()
        self.transport = transport
        """Waits for the broker link and returns it; None: records stay in memory (tests)."""
        self.buffer: list[TraceRecord] = []
        self.published = 0
        self.dropped = 0
        self._published_count = counter.labels("published") if counter is not None else None
        self._dropped_count = counter.labels("dropped") if counter is not None else None
        self._ready = anyio.Event()
        self._threshold = int(self.cfg.sample * 2**32)
        self._warned = False

    def __repr__(self) -> str:
        return (
            f"<TraceRecorder {self.agent} enabled={self.cfg.enabled} buffered={len(self.buffer)} "
            f"published={self.published} dropped={self.dropped}>"
        )

    @property
    def enabled(self) -> bool:
        return self.cfg.enabled and self.cfg.sample > 0

    def sampled(self, correlation_id: str) -> bool:
        """Whether the transaction ``correlation_id`` is traced (the same answer everywhere)."""
        if not self.enabled:
            return False
        if self.cfg.sample >= 1.0 or not correlation_id:
            return True
        return zlib.crc32(correlation_id.encode()) < self._threshold

    def record(
        self,
        kind: TraceKind,
        *,
        correlation_id: str,
        envelope_id: str = "",
        causation_id: str = "",
        business_key: str = "",
        flow: str = "",
        latency_ms: int = 0,
        outcome: str = "",
        detail: str = "",
        traceparent: str = "",
        system: str | None = None,
        at: int | None = None,
    ) -> None:
        """Buffer one record (never blocks, never raises); ``system`` defaults to the agent's."""
        cfg = self.cfg
        if not (cfg.enabled and cfg.sample >= 1.0) and not self.sampled(correlation_id):
            return  # (everything is sampled at 1.0: skip the call, this runs per message)
        if len(self.buffer) >= cfg.max_buffer:
            self.dropped += 1
            if self._dropped_count is not None:
                self._dropped_count.inc()
            if not self._warned:
                self._warned = True
                log.warning("trace: %d records buffered (max_buffer); dropping new ones", len(self.buffer))
            return
        self.buffer.append(
            TraceRecord(
                kind=kind, at=now_ms() if at is None else at, agent=self.agent,
                system=self.system if system is None else system, flow=flow, envelope_id=envelope_id,
                correlation_id=correlation_id, causation_id=causation_id, business_key=business_key,
                latency_ms=max(0, latency_ms), outcome=outcome, detail=detail[:500], traceparent=traceparent,
            )
        )  # fmt: skip
        ready = self._ready
        if not ready.is_set():
            ready.set()

    def extend(self, records: Sequence[TraceRecord]) -> None:
        """Buffer records the caller built (and sampled, see :meth:`sampled`), as :meth:`record`
        does one at a time, for a batch's worth at once: never blocks, never raises; those
        beyond ``max_buffer`` are dropped and counted."""
        if not records:
            return
        room = max(0, self.cfg.max_buffer - len(self.buffer))
        if room < len(records):
            lost = len(records) - room
            self.dropped += lost
            if self._dropped_count is not None:
                self._dropped_count.inc(lost)
            if not self._warned:
                self._warned = True
                log.warning("trace: %d records buffered (max_buffer); dropping new ones", len(self.buffer))
            records = records[:room]
        if records:
            self.buffer.extend(records)
            self._ready.set()

    async def flush(self, transport: Transport) -> int:
        """Publish what is buffered, one message per kind (more when it would pass
        ``_CHUNK_BYTES``); the number of records published.

        Raises:
            TransportError: a publish was not acknowledged (its records stay buffered).
        """
        records, self.buffer = self.buffer, []
        self._ready = anyio.Event()
        by_kind: dict[str, list[TraceRecord]] = {}
        for r in records:
            by_kind.setdefault(r.kind, []).append(r)
        done = 0
        try:
            for kind, batch in by_kind.items():
                subject = trace_subject(self.agent, kind)
                while batch:
                    n, data = _first_chunk(batch)
                    await transport.publish(OutMessage(subject, data, uuid.uuid4().hex, {}))
                    done += n
                    batch = by_kind[kind] = batch[n:]
        finally:
            left = [r for batch in by_kind.values() for r in batch]
            if left:
                self.buffer[:0] = left[: max(0, self.cfg.max_buffer - len(self.buffer))]
                self._ready.set()
            self.published += done
            if done and self._published_count is not None:
                self._published_count.inc(done)
        if done:
            self._warned = False
        return done

    async def run(self, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Publish buffered records until cancelled; a last flush (bounded) on the way out."""
        task_status.started()
        if self.transport is None or not self.enabled:
            await anyio.sleep_forever()
        assert self.transport is not None
        transport = await self.transport()
        failures = 0
        try:
            while True:
                await self._ready.wait()
                await anyio.sleep(self.cfg.flush_interval)  # let a batch's records gather
                try:
                    await self.flush(transport)
                    failures = 0
                except TransportError as exc:
                    failures += 1
                    if failures == 1:
                        log.warning("trace: records not published yet (%s); retrying", exc)
                    await anyio.sleep(min(5.0, 0.2 * 2**failures))
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2), contextlib.suppress(TransportError):
                if self.buffer:
                    await self.flush(transport)


_CHUNK_BYTES = 256 * 1024
"""Bound of one trace message: far below NATS's max_payload (1 MiB by default), which a busy
agent's 0.2 s of records can pass (the whole buffer in one message was refused, and kept
buffered, so every later record was dropped)."""


def _first_chunk(batch: list[TraceRecord]) -> tuple[int, bytes]:
    """How many records from the start of ``batch`` go in the next message, and its bytes
    (at most ``_CHUNK_BYTES`` unless a single record is larger)."""
    n = len(batch)
    data = encode_batch(batch)
    while len(data) > _CHUNK_BYTES and n > 1:
        n = max(1, min(n // 2, n * _CHUNK_BYTES // len(data)))
        data = encode_batch(batch[:n])
    return n, data


def current_recorder() -> TraceRecorder | None:
    """The recorder of the current task (set by :func:`use_recorder`), if any."""
    return _current.get()


@contextlib.contextmanager
def use_recorder(recorder: TraceRecorder | None) -> Iterator[None]:
    """Make ``recorder`` the current task's (and the tasks it starts) for :func:`record`."""
    token = _current.set(recorder)
    try:
        yield
    finally:
        _current.reset(token)


def record(kind: TraceKind, *, correlation_id: str, **fields: object) -> None:
    """Record to :func:`current_recorder` (nothing happens without one); fields as for
    :meth:`TraceRecorder.record`. Never blocks, never raises on a missing recorder."""
    rec = _current.get()
    if rec is not None:
        rec.record(kind, correlation_id=correlation_id, **fields)  # type: ignore[arg-type]
