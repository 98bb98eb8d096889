"""The delivery path's actors, each with only what it uses (no agent object, no broker client).

Capture, per flow with a ``source``::

    source.read(cursor) ─► envelopes ─► Outbox.capture(cursor, envelopes)   (one transaction, I1)

Relay, one per agent::

    Outbox.peek ─► Transport.publish_many (msg id = envelope.id) ─► Outbox.remove(acked)  (I3)

Apply, per flow with a ``sink``::

    fetch ─► decode ─► check ─► Inbox.seen? ─► Sink.apply (version guard) ─► Inbox.record ─► ack

A sink that keeps its own inbox (``Sink.keeps_inbox``: the SQL sinks) is asked instead
(``Sink.handled``) and records the handled ids in the transaction of its writes
(``Sink.apply_recording``): one commit per batch. A flow with ``after`` keeps the agent's inbox,
whose database also holds the parent/child state.

A flow whose configuration turns out wrong at run time (a wrong password, a missing table or key
column, a capture trigger not installed, an empty secret: a :class:`~mesh.errors.ConfigError`
from its adapter or mapping) is marked ``failing`` with a one-line reason (in the log, the
heartbeat's ``FlowReport.detail`` and ``meshctl agent health``), logged without a traceback,
and retried on the slow backoff :data:`CONFIG_RETRY`; once the cause is fixed it recovers by
itself. Tracebacks are for bugs (any other exception, restarted by the supervisor).

A sink flow binds its consumer only while ``MESH_EVENTS`` exists (see :mod:`agents.layout`);
when the stream or its consumer disappears it waits and binds again, without crashing.

Guarantees: nothing is acked before it is durable; a malformed or refused message is
dead-lettered with its reason (a :class:`~mesh.envelope.DeadLetter`) and then termed, and the
flow keeps going (I6); events whose origin is this agent's own system are never applied back to
it (I7). Each actor binds ``agent`` and ``flow`` to its log records, and every log line about
one message carries its ``correlation_id``. With a :class:`~mesh.trace.TraceRecorder` on the
plan, capture, relay and apply record what they did (``captured``, ``published``, ``applied``,
``dead_lettered``) in memory; the recorder publishes them in batches off this path. The actors run on any
:class:`~mesh.transport.Transport`: JetStream in production, memory in unit tests.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import anyio
import anyio.lowlevel
import msgspec
from anyio.abc import TaskStatus

from agents._hold import Hold
from agents.flows import FlowHandle
from agents.layout import StreamCheck
from mesh import telemetry
from mesh.actors import Backoff
from mesh.adapters import Applied, ChangeBatch, Sink, SinkRecord, Source
from mesh.config import AdapterConfig, ConsumerConfig, FlowConfig, RelayConfig, RetryConfig
from mesh.envelope import (
    DeadLetter,
    Envelope,
    decode,
    decode_payload,
    encode,
    encode_payload,
    envelope_id,
    now_ms,
)
from mesh.errors import (
    ConfigError,
    DecodeError,
    IntegrityPending,
    InvalidEnvelope,
    MappingError,
    PermanentError,
    RetryableError,
    TransportError,
)
from mesh.faults import crash_point
from mesh.flowdata import FlowData, compile_flow_data
from mesh.logs import bind, log_context
from mesh.metrics import Metrics
from mesh.runs.bulk import RUN_HEADER
from mesh.store import AppliedKeys, Inbox, InboxEntry, Outbox, OutboxRow
from mesh.trace import CauseLinks, TraceRecord, TraceRecorder, child_traceparent
from mesh.transport import (
    EVENTS_STREAM,
    Consumer,
    Delivery,
    NotFound,
    OutMessage,
    Transport,
    dlq_subject,
    event_subject,
)
from mesh.transport.subjects import consumer_name

__all__ = ["CONFIG_RETRY", "Apply", "Capture", "FlowPlan", "Inflight", "Relay", "RunTally", "TransportSource"]

log = logging.getLogger(__name__)

_ROW_EVENTS = frozenset({"upserted", "deleted"})

TransportSource = Callable[[], Awaitable[Transport]]
"""Waits until the broker link is up and returns its transport."""

RunTally = Callable[[list[tuple[str, str, str]]], Awaitable[None]]
"""Records (run id, envelope id, outcome) of bulk-run envelopes a sink handled (see :mod:`mesh.runs`)."""

Inflight = Callable[[str], AbstractContextManager[anyio.CancelScope]]
"""A shielded scope for one unit of in-flight work of ``owner`` (see ``ConnectorAgent.inflight``)."""


CONFIG_RETRY = Backoff(base=2.0, cap=300.0)
"""How a flow failing on its configuration retries: about 2 s, then doubling (with jitter) up
to 5 minutes between attempts. The count starts again once the flow has worked for longer than
the cap. ``meshctl flow restart`` (or resume) retries at once."""

_FROZEN = False  # gc.freeze() done (Relay.run)

_CONSUMER_CHECK_EVERY = 5.0
"""Seconds between checks, while idle, that the sink's consumer still exists."""


@contextlib.contextmanager
def _shielded(owner: str) -> Iterator[anyio.CancelScope]:
    with anyio.CancelScope(shield=True) as scope:
        yield scope


@dataclass(eq=False)
class FlowPlan:
    """One flow as its actors need it, compiled once and shared by its capture and apply:
    names, subjects, durable name, retry policy, mapping and ownership."""

    cfg: FlowConfig
    agent: str
    """The agent's name (dead letters and logs name it)."""
    system: str
    """The agent's system: the origin of what it captures; never applied back to it (I7)."""
    _data: FlowData | None = field(default=None, repr=False)
    tracer: TraceRecorder | None = field(default=None, repr=False)
    """Where capture and apply record what happened (README "Tracing business transactions")."""
    links: CauseLinks | None = field(default=None, repr=False)
    """What this agent applied lately, so that the echo it captures keeps its correlation id."""
    is_parent: Callable[[], bool] = field(default=lambda: False, repr=False)
    """Whether another flow of this agent names this one in its ``after`` (asked as it runs)."""

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def entity(self) -> str:
        return self.cfg.entity

    @property
    def durable(self) -> str:
        """The durable consumer's name: one per (flow, sink system), shared by replicas."""
        return consumer_name(self.cfg.name, self.system)

    @property
    def filter_subject(self) -> str:
        return f"evt.{self.cfg.entity}.>"

    @property
    def consumer(self) -> ConsumerConfig:
        return self.cfg.consumer

    @property
    def retry(self) -> RetryConfig:
        return self.cfg.retry

    @property
    def source(self) -> AdapterConfig:
        assert self.cfg.source is not None
        return self.cfg.source

    @property
    def sink(self) -> AdapterConfig:
        assert self.cfg.sink is not None
        return self.cfg.sink

    @property
    def data(self) -> FlowData:
        """The compiled mappings and ownership (:meth:`compile` first)."""
        return self._data if self._data is not None else FlowData()

    async def compile(self) -> FlowData:
        """Compile mappings and ownership on first use and load their lookups; then reuse them.

        Raises:
            ConfigError: the flow's mapping or ownership is invalid.
        """
        if self._data is None:
            data = compile_flow_data(self.cfg, source=f"flow {self.name}", path=self.name)
            await data.open()
            self._data = data
        return self._data

    def accepts(self, origin: str) -> bool:
        """Whether this flow applies an event of ``origin`` (never its own system's: I7)."""
        if origin == self.system:
            return False
        allowed = self.cfg.accept_origins
        return allowed is None or origin in allowed


class Capture:
    """source → outbox, committing each batch's envelopes with its cursor (I1)."""

    def __init__(
        self,
        plan: FlowPlan,
        outbox: Outbox,
        metrics: Metrics,
        source: Callable[[], Source],
        *,
        outbox_max_bytes: int,
        handle: FlowHandle | None = None,
        config_retry: Backoff | None = None,
    ) -> None:
        self.plan = plan
        self.config_retry = config_retry or CONFIG_RETRY
        self.outbox = outbox
        self.metrics = metrics
        self.open_source = source
        """Makes the (not yet opened) Source adapter; called once per run."""
        self.outbox_max_bytes = outbox_max_bytes
        self.handle = handle

    def __repr__(self) -> str:
        return f"<Capture {self.plan.name}>"

    async def _read(self, source: Source, cursor: str | None) -> ChangeBatch | None:
        """The next batch; None once draining and the source has had nothing new for a while
        (caught up). A drain that begins while a read waits interrupts that wait."""
        h = self.handle
        limit = self.plan.source.batch_size
        if h is not None and h.draining:
            quiet = max(0.5, 4 * getattr(self.plan.source, "poll_interval", 0.1))
            with anyio.move_on_after(quiet):
                return await source.read(cursor, limit)
            return None
        if h is None:
            return await source.read(cursor, limit)
        with anyio.CancelScope() as scope:
            h.wake_capture = scope.cancel
            try:
                return await source.read(cursor, limit)
            finally:
                h.wake_capture = None
        return await self._read(source, cursor)  # woken: read again, now as a drain

    async def run(self, task_status: TaskStatus[None]) -> None:
        """Capture until cancelled (or, draining, caught up); ``started`` once the source is open,
        or once it has failed on its configuration (the flow is then ``failing``)."""
        bind(agent=self.plan.agent, flow=self.plan.name)
        guard = _ConfigGuard(self.plan.name, "capture", self.handle, self.config_retry)
        await guard.run(self._run, task_status)

    async def _run(self, task_status: TaskStatus[None], working: Callable[[], None]) -> None:
        plan, outbox = self.plan, self.outbox
        flow = plan.name
        captured = self.metrics.captured.labels(flow)
        paused = self.metrics.capture_paused.labels(flow)
        rejected = self.metrics.capture_rejected.labels(flow)
        max_bytes = self.outbox_max_bytes
        await plan.compile()
        async with self.open_source() as source:
            task_status.started()
            cursor = await outbox.cursor(flow)
            while True:
                if outbox.nbytes >= max_bytes:
                    # Bounded disk: stop reading; the source keeps its changes until we resume.
                    log.warning(
                        "flow %s: outbox holds %d bytes (outbox_max_bytes %d); capture paused until "
                        "the relay drains it",
                        flow, outbox.nbytes, max_bytes,
                    )  # fmt: skip
                    paused.set(1)
                    await outbox.wait_below(max_bytes)
                    paused.set(0)
                    log.info("flow %s: capture resumed", flow)
                batch = await self._read(source, cursor)
                working()
                if batch is None:
                    log.info("flow %s: capture caught up with the source; drained", flow)
                    return
                items, dead = self.envelopes(batch)
                crash_point("capture.before_commit")
                with anyio.CancelScope(shield=True):  # one short transaction: let it finish
                    await outbox.capture(flow, batch.cursor, items, headers=dead)
                if dead and not batch.run:
                    rejected.inc(len(dead))
                elif dead:
                    mapped_out = sum(1 for h in dead.values() if RUN_HEADER not in h)
                    rejected.inc(mapped_out)
                    self.metrics.failures.labels(flow, "mapping").inc(mapped_out)
                crash_point("capture.after_commit")
                captured.inc(len(items))
                cursor = batch.cursor
                await source.committed(cursor)
                del batch, items, dead  # not held while the next batch is read (agent memory)

    def envelopes(self, batch: ChangeBatch) -> tuple[list[tuple[str, str, bytes]], dict[str, dict[str, str]]]:
        """The outbox rows (id, subject, bytes) of a batch, and the dead-letter headers of the
        changes the flow's mapping refused (those rows go to ``dlq.<flow>`` as raw rows)."""
        plan = self.plan
        data, flow, entity, system = plan.data, plan.name, plan.entity, plan.system
        now = now_ms()
        items = []
        dead: dict[str, dict[str, str]] = {}
        id_flow = f"{flow}@{batch.run}" if batch.run else flow  # a bulk run's own ids (mesh.runs.bulk)
        tracer, links = plan.tracer, plan.links
        subjects = {e: event_subject(entity, e, system) for e in ("upserted", "deleted")}
        # Random trace and span ids for the whole batch from one getrandom() call (48 hex digits
        # a change; the same W3C traceparent as new_traceparent() makes, without two syscalls each).
        fresh = os.urandom(24 * len(batch.changes)).hex()
        for n, ch in enumerate(batch.changes):
            event = "deleted" if ch.deleted else "upserted"
            eid = envelope_id(id_flow, system, ch.key, ch.version)
            bkey = f"{entity}:{ch.key}"
            # A new transaction, unless this change is the effect of one this agent applied.
            if ch.correlation_id:  # the source knows the transaction (e.g. a webhook header)
                corr, caused_by, parent = ch.correlation_id, ch.causation_id, ch.traceparent
            elif (cause := links.cause_of(bkey) if links is not None else None) is not None:
                corr, caused_by, parent = cause.correlation_id, cause.envelope_id, cause.traceparent
            else:
                corr, caused_by, parent = eid, ch.causation_id, ch.traceparent
            if telemetry.ON:  # an OpenTelemetry capture span continuing the caller's trace
                traceparent = telemetry.capture(flow, ch, eid, now, parent)
            elif parent:
                traceparent = child_traceparent(parent)
            else:
                at = 48 * n
                traceparent = f"00-{fresh[at : at + 32]}-{fresh[at + 32 : at + 48]}-01"
            subject = subjects[event]
            schema, body = data.schema, ch.row
            if data.to_canonical is not None:
                try:
                    body = {"id": ch.key} if ch.deleted else data.to_canonical.map(ch.row)
                except MappingError as exc:
                    # The change goes to the dead-letter stream (through the outbox, with its
                    # reason) as the raw row; the flow goes on.
                    schema = f"{entity}/row"
                    dead[eid] = DeadLetter(
                        reason=str(exc), error_class=type(exc).__name__, permanent=True, attempts=1,
                        flow=flow, agent=plan.agent, stage="capture", original_subject=subject,
                        original_msg_id=eid,
                    ).to_headers()  # fmt: skip
                    with log_context(correlation_id=eid):
                        log.error("flow %s: key %s v%d not mapped: %s", flow, ch.key, ch.version, exc)
                    subject = dlq_subject(flow)
            env = Envelope(
                id=eid,
                kind=f"{entity}.{event}",
                schema=schema,
                flow=flow,
                key=ch.key,
                version=ch.version,
                origin=system,
                occurred_at=ch.occurred_at or now,
                correlation_id=corr,
                causation_id=caused_by,
                traceparent=traceparent,
                payload=encode_payload(body),
            )
            items.append((eid, subject, encode(env)))
            if batch.run and eid not in dead:
                dead[eid] = {RUN_HEADER: batch.run}  # extra headers by id (dead letters have theirs)
            if tracer is not None:
                tracer.record(
                    "captured", correlation_id=corr, envelope_id=eid, causation_id=caused_by,
                    business_key=bkey, flow=flow, latency_ms=now - env.occurred_at, traceparent=traceparent,
                    outcome="deleted" if ch.deleted else "", at=now,
                )  # fmt: skip
                if "Mesh-Reason" in dead.get(eid, {}):
                    tracer.record(
                        "dead_lettered", correlation_id=corr, envelope_id=eid, business_key=bkey, flow=flow,
                        outcome="capture", detail=dead[eid]["Mesh-Reason"],
                    )  # fmt: skip
        return items, dead


class Relay:
    """outbox → broker; a row leaves the outbox only after its publish is acked (I3)."""

    def __init__(
        self,
        outbox: Outbox,
        transport: TransportSource,
        metrics: Metrics,
        cfg: RelayConfig,
        *,
        agent: str = "",
        inflight: Inflight = _shielded,
        streams: StreamCheck | None = None,
        tracer: TraceRecorder | None = None,
    ) -> None:
        self.tracer = tracer
        self.streams = streams
        """Says whether the streams exist: the relay starts publishing once they do (a stream
        deleted later just leaves publishes unacknowledged, retried with backoff)."""
        self.outbox = outbox
        self.transport = transport
        self.metrics = metrics
        self.cfg = cfg
        self.agent = agent
        self.inflight = inflight

    def __repr__(self) -> str:
        return f"<Relay {self.agent} window={self.cfg.window}>"

    async def run(self, task_status: TaskStatus[None]) -> None:
        bind(agent=self.agent or None)
        task_status.started()
        transport = await self.transport()
        if self.streams is not None:
            for stream in self.streams.needed:
                await self.streams.wait_present(stream)
        # The agent is up (one relay per agent): what was built so far lives as long as the
        # process. Keep it out of the cyclic GC's full collections, which otherwise walk the
        # whole startup heap again and again while a backlog drains (as the control plane does).
        # Once per process (a restarted relay has nothing new to freeze).
        global _FROZEN
        if not _FROZEN:
            _FROZEN = True
            gc.freeze()
        cfg, outbox, metrics = self.cfg, self.outbox, self.metrics
        backoff = Backoff(base=0.1, cap=5.0)
        failures = 0
        while True:
            rows = await outbox.peek(cfg.batch_size)
            if not rows:
                await outbox.wait_for_rows(cfg.idle_interval)
                continue
            messages = [OutMessage(r.subject, r.data, r.id, r.headers or {}) for r in rows]
            with self.inflight("relay"):  # finish the round (bounded) even during shutdown
                started = time.time_ns()
                acked = await transport.publish_many(messages, cfg.window)
                acked_at = now_ms()
                crash_point("relay.after_publish")
                done = [r for r, ok in zip(rows, acked, strict=True) if ok]
                await outbox.remove(done)
            if telemetry.ON:
                telemetry.published([r.data for r in done], started, [r.subject for r in done])
            counts: dict[str, int] = {}
            for r in done:
                counts[r.flow] = counts.get(r.flow, 0) + 1
            for flow, n in counts.items():
                metrics.published.labels(flow).inc(n)
            if self.tracer is not None and self.tracer.enabled:
                _trace_published_into(self.tracer, done, acked_at)
            missed = len(rows) - len(done)
            if missed:
                metrics.publish_failures.inc(missed)
                for r, ok in zip(rows, acked, strict=True):
                    if not ok:
                        metrics.failures.labels(r.flow, "transient").inc()
                delay = backoff.delay(failures)
                failures += 1
                log.warning("%d of %d publishes unacknowledged; retrying in %.1fs", missed, len(rows), delay)
                if self.streams is not None:
                    self.streams.wake()  # a deleted stream is one reason: say so in /readyz soon
                await anyio.sleep(delay)
            else:
                failures = 0
            del rows, messages, acked, done  # not held while the next batch is read (agent memory)


def _trace_published_into(tracer: TraceRecorder, published: Sequence[OutboxRow], now: int) -> None:
    """``published`` records for acked outbox rows. The row id is the envelope id, which the
    index maps to its transaction (the capture's record names it): no envelope is decoded,
    unless sampling must know the correlation id to decide. ``now``: when the acks came."""
    sampling = tracer.cfg.sample < 1.0
    for row in published:
        corr = ""
        if sampling:
            try:
                corr = decode(row.data).correlation_id
            except DecodeError:
                continue  # a dead-lettered raw row: its capture recorded it
            if not tracer.sampled(corr):
                continue
        elif not row.subject.startswith("evt."):
            continue  # a dead-lettered raw row: its capture recorded it
        tracer.record("published", correlation_id=corr, envelope_id=row.id, flow=row.flow, at=now)


class Apply:
    """consumer → inbox → sink → inbox → ack (I4, I5, I6, I7)."""

    def __init__(
        self,
        plan: FlowPlan,
        inbox: Inbox,
        transport: TransportSource,
        metrics: Metrics,
        sink: Callable[[], Sink],
        *,
        handle: FlowHandle | None = None,
        inflight: Inflight = _shielded,
        consumers: dict[str, Consumer] | None = None,
        streams: StreamCheck | None = None,
        config_retry: Backoff | None = None,
        tally: RunTally | None = None,
        inbox_retention: float = 14 * 24 * 3600.0,
    ) -> None:
        self.plan = plan
        self.tally = tally
        self.inbox_retention = inbox_retention
        """Seconds a sink that keeps its own inbox (``Sink.keeps_inbox``) remembers handled ids."""
        """Told the (run, envelope id, outcome) of envelopes of scheduled bulk runs (their
        ``Mesh-Run`` header) after the sink's write and before the inbox records them."""
        self.streams = streams
        """Says whether MESH_EVENTS exists; without it a missing stream is retried every second."""
        self.config_retry = config_retry or CONFIG_RETRY
        self.inbox = inbox
        self.transport = transport
        self.metrics = metrics
        self.open_sink = sink
        """Makes the (not yet opened) Sink adapter; called once per run."""
        self.handle = handle
        self.inflight = inflight
        self.consumers = consumers if consumers is not None else {}
        """Where the bound consumer is published while it runs (for the pending gauges)."""
        self.hold = Hold(plan.name, plan.cfg.after, plan.is_parent, AppliedKeys(inbox))
        """Parent before child (``after``): which records wait, and what this flow applied."""
        self._subjects: dict[str, tuple[str, str]] = {}
        """Subjects :meth:`check` accepted -> the (kind, origin) they require (bounded)."""

    def __repr__(self) -> str:
        return f"<Apply {self.plan.name} as {self.plan.durable}>"

    async def run(self, task_status: TaskStatus[None]) -> None:
        """Apply until cancelled (or, draining, nothing is pending); ``started`` once the sink is
        open, or once it has failed on its configuration (the flow is then ``failing``)."""
        bind(agent=self.plan.agent, flow=self.plan.name)
        guard = _ConfigGuard(self.plan.name, "apply", self.handle, self.config_retry)
        await guard.run(self._run, task_status)

    async def _run(self, task_status: TaskStatus[None], working: Callable[[], None]) -> None:
        plan = self.plan
        await plan.compile()
        async with self.open_sink() as sink:
            task_status.started()
            transport = await self.transport()
            waiting = False
            while True:
                if self.streams is not None:
                    await self.streams.wait_present(EVENTS_STREAM)
                try:
                    consumer = await transport.pull_consumer(
                        durable=plan.durable,
                        filter_subject=plan.filter_subject,
                        ack_wait=plan.consumer.ack_wait,
                        max_deliver=plan.consumer.max_deliver,
                        max_ack_pending=plan.consumer.max_ack_pending,
                        metadata={"mesh-flow": plan.name, "mesh-sink-system": plan.system},
                    )
                except NotFound as exc:
                    if not waiting:
                        log.warning("flow %s: cannot bind consumer %s (%s); waiting for stream %s",
                                    plan.name, plan.durable, exc, EVENTS_STREAM)  # fmt: skip
                    waiting = True
                    await self._gone()
                    continue
                if waiting:
                    log.info("flow %s: consumer %s bound again", plan.name, plan.durable)
                waiting = False
                working()
                self.consumers[plan.name] = consumer
                try:
                    await self._consume(transport, sink, consumer)
                    return
                except NotFound as exc:
                    log.warning("flow %s: consumer %s or stream %s gone (%s); binding again once it exists",
                                plan.name, plan.durable, EVENTS_STREAM, exc)  # fmt: skip
                    waiting = True
                finally:
                    if self.consumers.get(plan.name) is consumer:
                        del self.consumers[plan.name]
                    with anyio.CancelScope(shield=True), contextlib.suppress(TransportError):
                        await consumer.aclose()
                await self._gone()

    async def _gone(self) -> None:
        """Wait for the next stream check (or a second, without one)."""
        if self.streams is not None:
            await self.streams.recheck()
            await self.streams.wait_present(EVENTS_STREAM)
        else:
            await anyio.sleep(1)

    async def _consume(self, transport: Transport, sink: Sink, consumer: Consumer) -> None:
        """Fetch and apply until cancelled (or drained).

        Raises:
            NotFound: the consumer or its stream no longer exists (bind again).
        """
        ccfg = self.plan.consumer
        log.info("flow %s: consuming as %s", self.plan.name, self.plan.durable)
        verified = anyio.current_time()
        next_forget = 0.0
        while True:
            await anyio.lowlevel.checkpoint()  # where a stop takes effect, between batches
            if sink.keeps_inbox and anyio.current_time() >= next_forget:
                with contextlib.suppress(RetryableError):  # tried again in an hour
                    forgotten = await sink.forget_handled(self.inbox_retention)
                    if forgotten:
                        log.info("flow %s: sink forgot %d handled ids older than the retention",
                                 self.plan.name, forgotten)  # fmt: skip
                next_forget = anyio.current_time() + 3600
            # A fetch and the batch it returns are finished even if a stop begins meanwhile
            # (bounded by the grace period): messages the server handed us are never left
            # unacked. Whatever is still unsettled at the deadline is released (nak'ed), so
            # another replica or the next start gets it at once instead of after ack_wait.
            batch = _Batch([])
            try:
                with self.inflight(self.plan.name):
                    batch = _Batch(await consumer.fetch(ccfg.batch_size, ccfg.fetch_timeout), consumer)
                    if batch.deliveries:
                        await self.apply_batch(transport, sink, batch)
            finally:  # also when the sink failed: what it did not settle is redelivered at once
                with anyio.CancelScope(shield=True):
                    await batch.release()
            if batch.deliveries:
                verified = anyio.current_time()
            elif anyio.current_time() - verified >= _CONSUMER_CHECK_EVERY:
                # An empty fetch cannot tell "nothing new" from "the stream was deleted and
                # recreated under us" (the consumer went with it): ask.
                await consumer.pending()
                verified = anyio.current_time()
            if self.handle is not None and self.handle.draining and not batch.deliveries:
                with contextlib.suppress(TransportError):
                    if await consumer.pending() == 0:
                        log.info("flow %s: drained (nothing pending)", self.plan.name)
                        return

    async def apply_batch(self, transport: Transport, sink: Sink, batch: _Batch) -> None:
        """Apply one fetched batch: every delivery ends acked, nak'ed or dead-lettered and termed
        (or, when interrupted, released by the caller). The batch's outcomes are counted once
        per outcome, after it (also when it was interrupted)."""
        counts: dict[str, int] = {}
        try:
            await self._apply_batch(transport, sink, batch, counts)
        finally:
            handled = self.metrics.handled
            for outcome, n in counts.items():
                handled.labels(self.plan.name, outcome).inc(n)

    async def _apply_batch(
        self, transport: Transport, sink: Sink, batch: _Batch, counts: dict[str, int]
    ) -> None:
        plan = self.plan
        flow = plan.name
        inbox = self.inbox
        decoded: list[tuple[Delivery, Envelope]] = []
        max_version = time.time_ns() // 1000 + int(plan.consumer.max_version_skew * 1_000_000)
        for d in batch.deliveries:
            try:
                env = decode(d.data)
            except DecodeError as exc:
                await self.fail(transport, batch, d, None, exc)
                continue
            try:
                self.check(d.subject, env, max_version)
            except InvalidEnvelope as exc:
                # Never retried, whatever the retry policy says: the same bytes fail again. The
                # inbox, the sink and its version guard never see it (I6).
                self.metrics.failed(flow, exc)
                await self.dead_letter(transport, d, env, exc)
                await batch.term(d)
                continue
            decoded.append((d, env))

        hold = self.hold if self.hold.active else None
        # A SQL sink records what it handled in the target's own transaction (one commit per
        # batch); with ``after`` the agent's inbox database also holds the parent/child state.
        fused = sink.keeps_inbox and hold is None
        ids = [e.id for _, e in decoded]
        if not fused:
            seen = await inbox.seen(ids)
        else:
            try:
                seen = await sink.handled(ids)
            except RetryableError as exc:
                log.warning("flow %s: sink unavailable (%s); %d messages wait", flow, exc, len(decoded))
                for d, env in decoded:
                    await self.fail(transport, batch, d, env, exc)
                return
        todo: list[tuple[Delivery, Envelope, SinkRecord]] = []
        entries: list[InboxEntry] = []
        acks: list[Delivery] = []
        batch_ids: set[str] = set()
        settled: list[Envelope] = []  # for the parent/child state (only with ``after``)
        for d, env in decoded:
            if env.id in seen or env.id in batch_ids:
                counts["duplicate"] = counts.get("duplicate", 0) + 1
                acks.append(d)
                # traced too: after a crash the first apply's record may never have left memory
                self._trace_applied(env, "duplicate")
                continue
            batch_ids.add(env.id)
            if not plan.accepts(env.origin):
                counts["echo"] = counts.get("echo", 0) + 1
                entries.append(InboxEntry(env.id, flow, env.key, env.version, "echo"))
                acks.append(d)
                if hold is not None:
                    settled.append(env)  # it came from this system: it is there
                if env.origin != plan.system:  # its own system's events are not traced
                    self._trace_applied(env, "filtered")  # (not in accept_origins)
                continue
            try:
                record = self._record(env)
            except (DecodeError, MappingError) as exc:
                await self.fail(transport, batch, d, env, exc)
                continue
            if record is None:  # a delete (or create) its origin may not make
                counts["not_owner"] = counts.get("not_owner", 0) + 1
                entries.append(InboxEntry(env.id, flow, env.key, env.version, "not_owner"))
                acks.append(d)
                self._trace_applied(env, "not_owner")
                continue
            todo.append((d, env, record))

        if hold is not None and todo and (blocked := await hold.blocked([env for _, env, _ in todo])):
            for d, env, _ in todo:
                if env.id in blocked:
                    await self._held(transport, batch, d, env, blocked[env.id])
            todo = [t for t in todo if t[1].id not in blocked]
        outcomes: Sequence[Applied | Exception] = []
        spans = telemetry.start_apply([t[1] for t in todo], plan.agent) if telemetry.ON and todo else None
        if todo or (fused and entries):
            records = [t[2] for t in todo]
            try:
                if fused:  # ``entries`` (echoes, not owned) commit with the writes
                    outcomes = await sink.apply_recording(records, flow, entries)
                else:
                    outcomes = await sink.apply(records)
            except RetryableError as exc:
                log.warning("flow %s: sink unavailable (%s); %d messages wait", flow, exc, len(todo))
                for d, env, _ in todo:
                    await self.fail(transport, batch, d, env, exc)
                todo = []
        if self.tally is not None and todo:
            await self._tally(todo, outcomes)
        if spans is not None:
            telemetry.applied(spans, outcomes, [t[1].id for t in todo])
        now = now_ms()
        latencies: list[float] = []  # of the changes applied, for the KPIs (once per batch)
        newest = 0
        tracer = plan.tracer if plan.tracer is not None and plan.tracer.enabled else None
        sampling = tracer is not None and tracer.cfg.sample < 1.0
        traced: list[TraceRecord] = []
        links = plan.links if plan.links is not None and plan.links.window > 0 else None
        entity = plan.entity  # check() made sure every envelope is of the flow's entity
        for (d, env, _), outcome in zip(todo, outcomes, strict=True):
            if isinstance(outcome, Exception):
                await self.fail(transport, batch, d, env, outcome)
                continue
            value = outcome.value
            counts[value] = counts.get(value, 0) + 1
            if not fused:  # (fused: the sink recorded it with the write)
                entries.append(InboxEntry(env.id, flow, env.key, env.version, value))
            acks.append(d)
            if hold is not None:
                settled.append(env)
            occurred = env.occurred_at
            if outcome is Applied.APPLIED:
                latencies.append(max(0, now - occurred) / 1000)
                newest = max(newest, occurred)
            if links is None and tracer is None:
                continue
            # as _trace_applied, without its per-call look-ups
            corr = env.correlation_id or env.id
            bkey = f"{entity}:{env.key}"
            if links is not None and outcome is Applied.APPLIED:
                links.remember(bkey, corr, env.id, env.traceparent, entity)
            if tracer is not None and (not sampling or tracer.sampled(corr)):
                traced.append(TraceRecord(
                    kind="applied", at=now, agent=tracer.agent, system=tracer.system, flow=flow,
                    envelope_id=env.id, correlation_id=corr, causation_id=env.causation_id,
                    business_key=bkey, latency_ms=max(0, now - occurred), outcome=value,
                    traceparent=env.traceparent,
                ))  # fmt: skip
        if tracer is not None:
            tracer.extend(traced)
        self.metrics.applied_many(flow, newest / 1000, latencies, plan.cfg.slo_seconds)
        # The sink's writes are durable; record them, then ack (I4).
        crash_point("apply.after_sink")
        if hold is not None:
            await hold.record(settled)  # before the inbox: a crash between leaves it ahead
        if not fused:  # (fused: recorded in the sink's transaction)
            await inbox.record(entries)
        crash_point("apply.after_inbox")
        await batch.ack_many(acks)

    async def _tally(
        self, todo: Sequence[tuple[Delivery, Envelope, SinkRecord]], outcomes: Sequence[Applied | Exception]
    ) -> None:
        """Count bulk-run envelopes (header ``Mesh-Run``) by outcome, once the sink's writes are
        durable: applied, stale, unchanged, or failed when the failure is final (dead-lettered)."""
        assert self.tally is not None
        policy, max_deliver = self.plan.retry, self.plan.consumer.max_deliver
        ran = []
        for (d, env, _), outcome in zip(todo, outcomes, strict=True):
            run = d.headers.get(RUN_HEADER)
            if run is None:
                continue
            if not isinstance(outcome, Exception):
                ran.append((run, env.id, outcome.value))
            elif policy.action(outcome) != "retry" or d.num_delivered >= max_deliver:
                ran.append((run, env.id, "failed"))
        if ran:
            await self.tally(ran)

    def _trace_applied(self, env: Envelope, outcome: str, now: int | None = None) -> None:
        """Record that ``env`` reached this sink (``outcome``: applied, unchanged, stale, echo,
        not_owner); an applied change is remembered so that its echo stays linked."""
        plan = self.plan
        bkey = f"{env.entity}:{env.key}"
        if plan.links is not None and outcome == Applied.APPLIED.value:
            plan.links.remember(bkey, env.correlation_id or env.id, env.id, env.traceparent, env.entity)
        if plan.tracer is None:
            return
        now = now_ms() if now is None else now
        plan.tracer.record(
            "applied", correlation_id=env.correlation_id or env.id, envelope_id=env.id,
            causation_id=env.causation_id, business_key=bkey, flow=plan.name,
            latency_ms=now - env.occurred_at, outcome=outcome, traceparent=env.traceparent,
        )  # fmt: skip

    def check(self, subject: str, env: Envelope, max_version: int) -> None:
        """Check that ``env`` agrees with the subject it arrived on and with this flow, before
        anything is applied: ``subject`` is ``evt.<entity>.<event>.<origin>`` with the flow's
        entity and event ``upserted`` or ``deleted``; ``kind`` is ``<entity>.<event>`` of the
        subject; ``origin`` is the subject's origin; ``1 <= version <= max_version``.

        Raises:
            InvalidEnvelope: the first check that fails, naming the field and both values.
        """
        expected = self._subjects.get(subject)  # (kind, origin) of a subject that passed
        if expected is None:
            entity = self.plan.entity
            parts = subject.split(".")
            if len(parts) != 4 or parts[0] != "evt":
                raise InvalidEnvelope("subject", subject, f"evt.{entity}.<upserted|deleted>.<origin>")
            _, s_entity, s_event, s_origin = parts
            if s_entity != entity:
                raise InvalidEnvelope("subject entity", s_entity, f"{entity!r} (the flow's entity)")
            if s_event not in _ROW_EVENTS:
                raise InvalidEnvelope("subject event", s_event, "'upserted' or 'deleted'")
            if len(self._subjects) >= 1024:
                self._subjects.clear()
            expected = self._subjects[subject] = (f"{entity}.{s_event}", s_origin)
        kind, s_origin = expected
        if env.kind != kind:
            raise InvalidEnvelope("kind", env.kind, f"{kind} (from subject {subject})")
        if env.origin != s_origin:
            raise InvalidEnvelope("origin", env.origin, f"{s_origin!r} (from subject {subject})")
        if env.version < 1:
            raise InvalidEnvelope("version", env.version, ">= 1")
        if env.version > max_version:
            skew = self.plan.consumer.max_version_skew
            raise InvalidEnvelope(
                "version", env.version, f"<= {max_version} (now in µs + max_version_skew {skew:g}s)"
            )

    def _record(self, env: Envelope) -> SinkRecord | None:
        """The sink's record for ``env``: ownership applied, mapped from the canonical entity.
        None when the origin may not make this change at all (a delete by a non-owner)."""
        deleted = env.is_delete
        row: dict[str, object] = (
            {} if deleted and bytes(env.payload) in (b"", b"\xc0") else decode_payload(env)
        )  # a delete may carry only its key columns, or nothing
        data = self.plan.data
        scope, create = "", True
        if data.ownership is not None:
            decision = data.ownership.decide(self.plan.entity, env.origin, row, deleted=deleted)
            if deleted and not decision.may_delete:
                return None
            if decision.dropped:
                self.metrics.ownership_dropped.labels(self.plan.name, env.origin).inc(len(decision.dropped))
            row, scope, create = dict(decision.fields), env.origin, decision.may_create
        if data.from_canonical is not None and not deleted:
            row = data.from_canonical.map(row)
        return SinkRecord(
            id=env.id, key=env.key, version=env.version, deleted=deleted,
            row=row, origin=env.origin, scope=scope, create=create,
        )  # fmt: skip

    async def _held(
        self, transport: Transport, batch: _Batch, d: Delivery, env: Envelope, reason: str
    ) -> None:
        """Nak a record that waits for its parent (or a parent delete for its children) on the
        integrity schedule, counted as ``held``, not as a retry; dead-letter it once it is still
        held after ``retry.integrity_retry`` (or at once when IntegrityPending is set to
        ``dead_letter`` or the budget is 0)."""
        policy, max_deliver = self.plan.retry, self.plan.consumer.max_deliver
        exc = IntegrityPending(reason)
        if policy.action(exc) == "retry" and policy.integrity_retry > 0 and d.num_delivered < max_deliver:
            self.metrics.handled.labels(self.plan.name, "held").inc()
            with log_context(correlation_id=env.correlation_id):
                log.debug("flow %s: %s", self.plan.name, reason)
            await batch.nak(d, policy.integrity_delay(d.num_delivered, max_deliver))
            return
        exc = IntegrityPending(
            f"{reason}; still held after {d.num_delivered} deliveries over retry.integrity_retry ="
            f" {policy.integrity_retry:g}s"
        )
        await self.dead_letter(transport, d, env, exc)
        await batch.term(d)
        if self.tally is not None and (run := d.headers.get(RUN_HEADER)) is not None:
            await self.tally([(run, env.id, "failed")])

    async def fail(
        self, transport: Transport, batch: _Batch, d: Delivery, env: Envelope | None, exc: Exception
    ) -> None:
        """Retry later (delayed nak) or dead-letter, by the flow's retry policy (I6). The
        attempt count is the server's (``num_delivered``)."""
        self.metrics.failed(self.plan.name, exc)
        policy = self.plan.retry
        max_deliver = self.plan.consumer.max_deliver
        if isinstance(exc, IntegrityPending) and policy.action(exc) == "retry":
            # Its own schedule: the deliveries left are spread over integrity_retry seconds, so a
            # parent that arrives minutes later (another flow, another agent) still counts.
            if policy.integrity_retry > 0 and d.num_delivered < max_deliver:
                self.metrics.retries.labels(self.plan.name).inc()
                await batch.nak(d, policy.integrity_delay(d.num_delivered, max_deliver))
                return
            exc = IntegrityPending(
                f"{exc} (still refused after {d.num_delivered} deliveries over retry.integrity_retry ="
                f" {policy.integrity_retry:g}s)"
            )
        elif policy.action(exc) == "retry" and d.num_delivered < max_deliver:
            self.metrics.retries.labels(self.plan.name).inc()
            await batch.nak(d, policy.delay(d.num_delivered))
            return
        await self.dead_letter(transport, d, env, exc)
        await batch.term(d)

    async def dead_letter(
        self, transport: Transport, d: Delivery, env: Envelope | None, exc: Exception
    ) -> None:
        """Copy the message to the DLQ with its reason; the caller then terms it (I6).

        Raises:
            TransportError: the DLQ did not confirm; the message is not termed (redelivered).
        """
        plan = self.plan
        letter = DeadLetter(
            reason=str(exc), error_class=type(exc).__name__, permanent=isinstance(exc, PermanentError),
            attempts=d.num_delivered, flow=plan.name, agent=plan.agent, stage="apply",
            original_subject=d.subject, original_stream_seq=d.stream_seq,
            original_msg_id=d.headers.get("Nats-Msg-Id", ""),
        )  # fmt: skip
        extra = getattr(exc, "dead_letter_extra", None)  # e.g. an HTTP sink's status and bodies
        if isinstance(extra, dict) and extra:
            known = {k: v for k, v in extra.items() if k in ("http_status", "request_body", "response_body")}
            letter = msgspec.structs.replace(letter, **known)
        headers = letter.to_headers()
        with log_context(correlation_id=env.correlation_id if env else None):
            log.error(
                "flow %s: dead-lettering %s (stream seq %d, delivery %d): %s",
                plan.name, env.id if env else "<undecodable>", d.stream_seq, d.num_delivered,
                headers["Mesh-Reason"],
            )  # fmt: skip
        original = {k: v for k, v in d.headers.items() if not k.startswith("Nats-")}
        msg_id = f"dlq-{plan.durable}-{d.stream_seq}"
        # Written (and acknowledged) before the original is termed: nothing is dropped silently.
        await transport.publish(OutMessage(dlq_subject(plan.name), d.data, msg_id, {**original, **headers}))
        self.metrics.dead_lettered.labels(plan.name, letter.error_class).inc()
        self.metrics.handled.labels(plan.name, "dead_lettered").inc()
        if plan.tracer is not None:
            eid = env.id if env else letter.original_msg_id
            plan.tracer.record(
                "dead_lettered", correlation_id=(env.correlation_id if env else "") or eid, envelope_id=eid,
                causation_id=env.causation_id if env else "",
                business_key=f"{env.entity}:{env.key}" if env else "", flow=plan.name,
                latency_ms=now_ms() - env.occurred_at if env else 0, outcome=letter.error_class,
                detail=letter.reason, traceparent=env.traceparent if env else "",
            )  # fmt: skip
        # Not recorded in the inbox: a replay of the fixed message must still apply.


class _ConfigGuard:
    """Runs an actor body, turning a :class:`ConfigError` into a ``failing`` flow retried on a
    slow backoff (see the module docstring); any other exception goes to the supervisor."""

    def __init__(self, flow: str, role: str, handle: FlowHandle | None, backoff: Backoff) -> None:
        self.flow = flow
        self.role = role
        self.handle = handle
        self.backoff = backoff
        self.attempt = 0
        self.failed_at: float | None = None

    async def run(
        self,
        body: Callable[[TaskStatus[None], Callable[[], None]], Awaitable[None]],
        task_status: TaskStatus[None],
    ) -> None:
        status = _Once(task_status)
        while True:
            try:
                await body(status, self.working)
                return
            except ConfigError as exc:
                reason = "; ".join(exc.lines())
                delay = self.backoff.delay(self.attempt)
                self.attempt += 1
                self.failed_at = anyio.current_time()
                if self.handle is not None:
                    self.handle.problems[self.role] = reason
                log.warning(
                    "flow %s: %s failing: %s; retrying in %.1fs (it recovers by itself once fixed)",
                    self.flow, self.role, reason, delay,
                )  # fmt: skip
            status.started()  # the flow is up, as failing: the agent does not wait for it
            await anyio.sleep(delay)

    def working(self) -> None:
        """The body made progress: the flow is not failing (any more)."""
        if self.handle is not None and self.handle.problems.pop(self.role, None) is not None:
            log.info("flow %s: %s recovered", self.flow, self.role)
        if self.failed_at is not None and anyio.current_time() - self.failed_at > self.backoff.cap:
            self.attempt, self.failed_at = 0, None


class _Once:
    """Forwards ``started()`` once (a retried body calls it again)."""

    def __init__(self, inner: TaskStatus[None]) -> None:
        self.inner: TaskStatus[None] | None = inner

    def started(self, value: None = None) -> None:
        inner, self.inner = self.inner, None
        if inner is not None:
            inner.started(value)


class _Batch:
    """The deliveries of one fetch and which of them are settled (acked, nak'ed or termed)."""

    def __init__(self, deliveries: Sequence[Delivery], consumer: Consumer | None = None) -> None:
        self.deliveries = deliveries
        self.consumer = consumer
        """Whose :meth:`~mesh.transport.Consumer.ack_many` acks several at once (None: one by one)."""
        self._open = {id(d): d for d in deliveries}

    async def ack(self, d: Delivery) -> None:
        await d.ack()
        self._open.pop(id(d), None)

    async def ack_many(self, ds: Sequence[Delivery]) -> None:
        """Ack ``ds``: through the consumer, in one write where the transport can."""
        if self.consumer is None:
            for d in ds:
                await self.ack(d)
            return
        await self.consumer.ack_many(ds)
        for d in ds:
            self._open.pop(id(d), None)

    async def nak(self, d: Delivery, delay: float | None = None) -> None:
        await d.nak(delay=delay)
        self._open.pop(id(d), None)

    async def term(self, d: Delivery) -> None:
        await d.term()
        self._open.pop(id(d), None)

    async def release(self) -> None:
        """Nak (without delay) whatever is still unsettled, best effort and bounded."""
        if not self._open:
            return
        log.info("releasing %d unsettled messages for immediate redelivery", len(self._open))
        with anyio.move_on_after(2):
            for d in list(self._open.values()):
                with contextlib.suppress(TransportError):
                    await self.nak(d)
