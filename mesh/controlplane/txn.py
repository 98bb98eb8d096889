"""The control plane's view of business transactions: ``MESH_TRACE`` read into memory.

:class:`TxnTracker` reads the trace stream with an ordered, ephemeral reader from its first
retained record on, then follows it, into a :class:`~mesh.trace.TxnIndex` (the last
``max_transactions`` transactions). Nothing is stored elsewhere: a restarted replica rebuilds the
index from the stream (bounded by the stream's retention, ``[streams.trace]``), and every replica,
leader or follower, keeps its own. ``/status`` shows the count per status and the latest failed
transactions; ``GET /trace/<id>`` a transaction's records; ``GET /trace?status=&since=`` a list.

At start only the last ``trace_rebuild`` seconds (default one hour) are read back.

A record whose ``agent`` is not the agent named by its subject (``trace.<agent>.<kind>``, which
NATS permissions tie to the publisher) is refused and counted in ``forged``.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import UTC, datetime, timedelta

import anyio
import msgspec
from anyio.abc import TaskStatus

from mesh.errors import TransportError
from mesh.trace import STATUSES, TraceRecord, TransactionsView, TxnIndex, add_message
from mesh.transport import EVENTS_STREAM, TRACE_STREAM, NotFound, Transport

__all__ = ["TraceView", "TxnTracker"]

log = logging.getLogger(__name__)


class TraceView(msgspec.Struct, frozen=True, kw_only=True):
    """One transaction as ``GET /trace/<id>`` returns it."""

    correlation_id: str
    status: str
    reason: str
    records: list[TraceRecord]


class TxnTracker:
    """Follows ``MESH_TRACE`` into a :class:`TxnIndex` (see the module docstring)."""

    def __init__(self, js: Transport, *, max_transactions: int = 20_000, rebuild: float = 3600.0) -> None:
        """``rebuild``: seconds of records read back at start (0: everything the stream retains)."""
        self.js = js
        self.rebuild = rebuild
        self.sinks: dict[str, frozenset[str]] = {}
        """Entity -> the durable consumers on MESH_EVENTS that apply its events (refreshed)."""
        self.index = TxnIndex(max_transactions, expected=self.expected)
        self.caught_up = anyio.Event()
        """Set once everything stored when the tracker started has been read."""

    def __repr__(self) -> str:
        return f"<TxnTracker {self.index!r} seq={self.index.last_seq}>"

    def expected(self, entity: str, origin: str) -> frozenset[str]:
        """The consumers that must apply an ``entity`` event of ``origin`` (not its own system's)."""
        return frozenset(c for c in self.sinks.get(entity, ()) if not c.endswith(f"-{origin}"))

    async def refresh_sinks(self) -> None:
        """Learn which durable consumers apply which entity (``evt.<entity>.>`` filters).

        Raises:
            TransportError: the broker did not answer (the last known sinks stay).
        """
        try:
            consumers = await self.js.consumers(EVENTS_STREAM)
        except NotFound:
            return
        sinks: dict[str, set[str]] = {}
        for c in consumers:
            parts = c.filter_subject.split(".")
            if len(parts) == 3 and parts[0] == "evt" and parts[2] == ">":
                sinks.setdefault(parts[1], set()).add(c.name)
        self.sinks = {entity: frozenset(names) for entity, names in sinks.items()}

    async def _refresh_sinks_loop(self) -> None:
        while True:
            with contextlib.suppress(TransportError):
                await self.refresh_sinks()
            await anyio.sleep(10)

    async def run(self, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Follow the stream until cancelled; waits (without failing) while it is missing.
        Every 10 s it also learns which sinks consume which entity (:meth:`refresh_sinks`)."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._refresh_sinks_loop)
            await self._run(task_status)

    async def _run(self, task_status: TaskStatus[None]) -> None:
        task_status.started()
        warned = False
        while True:
            try:
                await self._follow()
            except NotFound:
                self.index.last_seq = 0  # re-created: its sequence starts again
                await anyio.sleep(1)
            except TransportError as exc:
                if not warned:
                    log.warning("trace stream %s not readable yet: %s", TRACE_STREAM, exc)
                    warned = True
                await anyio.sleep(1)

    async def _follow(self) -> None:
        info = await self.js.stream_info(TRACE_STREAM)
        if info.last_seq < self.index.last_seq:
            self.index.last_seq = 0  # the stream was re-created under us
        end = info.last_seq
        if end <= self.index.last_seq or info.messages == 0:
            self.caught_up.set()
        start = max(self.index.last_seq + 1, info.first_seq, 1)
        if self.index.last_seq == 0 and self.rebuild > 0 and info.messages:
            # A busy mesh keeps days of records: read back only the recent ones (the index
            # holds max_transactions anyway); meshctl trace --since reaches further back.
            since = datetime.now(UTC) - timedelta(seconds=self.rebuild)
            first = await self.js.get_message(TRACE_STREAM, subject="trace.>", since=since)
            start = first.seq if first is not None else end + 1
            if start > end:
                self.caught_up.set()
        async with await self.js.read_stream(TRACE_STREAM, start_seq=start) as reader:
            while True:
                msg = await reader.next(timeout=5.0)
                if msg is None:
                    self.caught_up.set()
                    continue
                add_message(self.index, msg)
                if msg.seq >= end:
                    self.caught_up.set()

    def view(self) -> TransactionsView:
        """The ``transactions`` part of ``/status`` (memory only)."""
        counts = self.index.counts()
        return TransactionsView(
            counts={s: counts.get(s, 0) for s in STATUSES},
            recent_failed=self.index.list("failed", limit=10),
            indexed=len(self.index.txns),
            forged=self.index.forged,
        )

    def trace(self, ident: str) -> list[TraceView]:
        """The transactions ``ident`` names (correlation id, envelope id or business key)."""
        out = []
        for txn in self.index.find(ident):
            status, reason = txn.status()
            out.append(TraceView(correlation_id=txn.correlation_id, status=status, reason=reason,
                                 records=list(txn.records)))  # fmt: skip
        return out
