"""The connector agent: runs the flows in its config, in either direction or both.

Capture side, per flow with a ``source``::

    source.read(cursor) ─► envelopes ─► Outbox.capture(cursor, envelopes)   (one transaction, I1)

Relay, one per agent::

    Outbox.peek ─► JetStream.publish_many (Nats-Msg-Id = envelope.id) ─► Outbox.remove(acked)  (I3)

Apply side, per flow with a ``sink``::

    fetch ─► decode ─► Inbox.seen? ─► Sink.apply (version guard) ─► Inbox.record ─► ack   (I4, I5)

Guarantees: nothing is acked before it is durable; a malformed or refused message is
dead-lettered with its reason and then termed, and the flow keeps going (I6); events whose origin
is this agent's own system are never applied back to it (I7). Every loop is an actor under one
supervisor: a crash restarts that loop with backoff, the others keep running.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskStatus

from agents.control import ControlChannel
from agents.flows import FlowHandle, FlowManager
from mesh.actors import Actor, Backoff, Supervisor
from mesh.adapters import Applied, ChangeBatch, Sink, SinkRecord, Source
from mesh.config import AdapterConfig, AgentConfig, FlowConfig
from mesh.controlplane.models import FlowReport, HeartbeatPayload
from mesh.envelope import (
    Envelope,
    decode,
    decode_payload,
    encode,
    encode_payload,
    envelope_id,
    now_ms,
)
from mesh.errors import DecodeError, MappingError, PermanentError, RetryableError, TransportError
from mesh.faults import crash_point
from mesh.flowdata import FlowData, compile_flow_data
from mesh.heartbeat import Heartbeat, metric_total
from mesh.metrics import Metrics
from mesh.plugins import adapter_registry
from mesh.readiness import Readiness
from mesh.store import Inbox, InboxEntry, Outbox
from mesh.transport import Delivery, JetStream, OutMessage, PullConsumer, dlq_subject, event_subject

__all__ = ["Apply", "Capture", "ConnectorAgent", "NatsLink", "Relay", "open_sink", "open_source"]

log = logging.getLogger(__name__)


def open_source(cfg: AdapterConfig) -> Source:
    """The Source adapter for a source config (not yet opened), from the installed adapters.

    Raises:
        PluginError: no installed adapter has a source for ``cfg``, or its factory does not load.
    """
    return adapter_registry().open_source(cfg)


def open_sink(cfg: AdapterConfig) -> Sink:
    """The Sink adapter for a sink config (not yet opened); raises like :func:`open_source`."""
    return adapter_registry().open_sink(cfg)


def _capture_dead_letter(exc: MappingError, subject: str, eid: str, flow: str, agent: str) -> dict[str, str]:
    """Headers of a change the capture side could not map (same names as the sink side's)."""
    return {
        "Mesh-Original-Subject": subject,
        "Mesh-Original-Msg-Id": eid,
        "Mesh-Reason": (" ".join(str(exc).split()) or "MappingError")[:1000],
        "Mesh-Error-Class": type(exc).__name__,
        "Mesh-Permanent": "true",
        "Mesh-Attempts": "1",
        "Mesh-Flow": flow,
        "Mesh-Agent": agent,
        "Mesh-Stage": "capture",
    }


def _row_of(env: Envelope) -> dict[str, Any]:
    """The row carried by an envelope; a delete may carry only its key columns, or nothing."""
    if env.is_delete and bytes(env.payload) in (b"", b"\xc0"):
        return {}
    return decode_payload(env)


class NatsLink:
    """Connects (retrying forever) and ensures the streams; the agent closes it last.

    The connection outlives every actor: it is closed by :meth:`aclose` only after the
    supervisor has stopped, so in-flight batches can still ack or nak during a graceful stop.
    """

    def __init__(self, cfg: AgentConfig, metrics: Metrics, readiness: Readiness | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.readiness = readiness
        self._js: JetStream | None = None
        self._ready = anyio.Event()

    async def wait(self) -> JetStream:
        await self._ready.wait()
        assert self._js is not None
        return self._js

    @property
    def current(self) -> JetStream | None:
        return self._js

    async def run(self, task_status: TaskStatus[None]) -> None:
        task_status.started()  # capture must not wait for the broker
        if self._js is None:
            backoff = Backoff(base=0.25, cap=5.0)
            attempt = 0
            while True:
                js = JetStream(self.cfg.nats, name=self.cfg.agent.name)
                try:
                    await js.connect()
                    await js.ensure_streams(self.cfg.streams)
                except TransportError as exc:
                    await js.aclose()
                    delay = backoff.delay(attempt)
                    attempt += 1
                    if attempt == 1 or attempt % 20 == 0:
                        log.warning("nats not reachable (%s); retrying every few seconds", exc)
                    await anyio.sleep(delay)
                    continue
                except BaseException:
                    await js.aclose()
                    raise
                break
            log.info("connected to %s", self.cfg.nats.servers)
            self._js = js
            self._ready.set()
        while True:
            up = self._js.is_connected
            self.metrics.nats_connected.set(1 if up else 0)
            if self.readiness is not None:
                self.readiness.set("nats", up, "" if up else "NATS disconnected")
            await anyio.sleep(1)

    async def aclose(self) -> None:
        js, self._js = self._js, None
        self.metrics.nats_connected.set(0)
        if js is not None:
            with anyio.CancelScope(shield=True):
                await js.aclose()


class Capture:
    """source → outbox, committing each batch's envelopes with its cursor (I1)."""

    def __init__(self, agent: ConnectorAgent, flow: FlowConfig, handle: FlowHandle | None = None) -> None:
        assert flow.source is not None
        self.agent = agent
        self.flow = flow
        self.handle = handle
        self.source_cfg = flow.source

    async def _read(self, source: Source, cursor: str | None) -> ChangeBatch | None:
        """The next batch; None once draining and the source has had nothing new for a while
        (caught up). A drain that begins while a read waits interrupts that wait."""
        h = self.handle
        limit = self.source_cfg.batch_size
        if h is not None and h.draining:
            quiet = max(0.5, 4 * getattr(self.source_cfg, "poll_interval", 0.1))
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
        outbox = self.agent.outbox
        system = self.agent.cfg.agent.system
        flow, entity = self.flow.name, self.flow.entity
        captured = self.agent.metrics.captured.labels(flow)
        max_bytes = self.agent.cfg.agent.outbox_max_bytes
        paused = self.agent.metrics.capture_paused.labels(flow)
        data = compile_flow_data(self.flow, source=f"flow {flow}", path=flow)
        await data.open()
        agent_name = self.agent.cfg.agent.name
        rejected = self.agent.metrics.capture_rejected.labels(flow)
        async with open_source(self.source_cfg) as source:
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
                if batch is None:
                    log.info("flow %s: capture caught up with the source; drained", flow)
                    return
                now = now_ms()
                items = []
                dead: dict[str, dict[str, str]] = {}
                for ch in batch.changes:
                    event = "deleted" if ch.deleted else "upserted"
                    eid = envelope_id(flow, system, ch.key, ch.version)
                    subject = event_subject(entity, event, system)
                    schema, body = data.schema, ch.row
                    if data.to_canonical is not None:
                        try:
                            body = {"id": ch.key} if ch.deleted else data.to_canonical.map(ch.row)
                        except MappingError as exc:
                            # The change goes to the dead-letter stream (through the outbox, with
                            # its reason) as the raw row; the flow goes on.
                            schema = f"{entity}/row"
                            dead[eid] = _capture_dead_letter(exc, subject, eid, flow, agent_name)
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
                        correlation_id=eid,
                        payload=encode_payload(body),
                    )
                    items.append((eid, subject, encode(env)))
                crash_point("capture.before_commit")
                with anyio.CancelScope(shield=True):  # one short transaction: let it finish
                    await outbox.capture(flow, batch.cursor, items, headers=dead)
                if dead:
                    rejected.inc(len(dead))
                crash_point("capture.after_commit")
                captured.inc(len(items))
                cursor = batch.cursor
                await source.committed(cursor)


class Relay:
    """outbox → JetStream; a row leaves the outbox only after its PubAck (I3)."""

    def __init__(self, agent: ConnectorAgent) -> None:
        self.agent = agent

    async def run(self, task_status: TaskStatus[None]) -> None:
        task_status.started()
        js = await self.agent.link.wait()
        cfg = self.agent.cfg.relay
        outbox = self.agent.outbox
        metrics = self.agent.metrics
        backoff = Backoff(base=0.1, cap=5.0)
        failures = 0
        while True:
            rows = await outbox.peek(cfg.batch_size)
            if not rows:
                await outbox.wait_for_rows(cfg.idle_interval)
                continue
            messages = [OutMessage(r.subject, r.data, r.id, r.headers or {}) for r in rows]
            with self.agent.inflight("relay"):  # finish the round (bounded) even during shutdown
                acked = await js.publish_many(messages, cfg.window)
                crash_point("relay.after_publish")
                done = [r for r, ok in zip(rows, acked, strict=True) if ok]
                await outbox.remove(done)
            counts: dict[str, int] = {}
            for r in done:
                counts[r.flow] = counts.get(r.flow, 0) + 1
            for flow, n in counts.items():
                metrics.published.labels(flow).inc(n)
            missed = len(rows) - len(done)
            if missed:
                metrics.publish_failures.inc(missed)
                delay = backoff.delay(failures)
                failures += 1
                log.warning("%d of %d publishes unacknowledged; retrying in %.1fs", missed, len(rows), delay)
                await anyio.sleep(delay)
            else:
                failures = 0


class Apply:
    """consumer → inbox → sink → inbox → ack (I4, I5, I6, I7)."""

    def __init__(self, agent: ConnectorAgent, flow: FlowConfig, handle: FlowHandle | None = None) -> None:
        assert flow.sink is not None
        self.agent = agent
        self.flow = flow
        self.handle = handle
        self.sink_cfg = flow.sink
        self.system = agent.cfg.agent.system
        self.durable = f"{flow.name}-{self.system}"
        self.metrics = agent.metrics
        self.data = FlowData()

    def _accepts(self, origin: str) -> bool:
        if origin == self.system:
            return False  # I7: never write a change back to the system it came from
        allowed = self.flow.accept_origins
        return allowed is None or origin in allowed

    async def run(self, task_status: TaskStatus[None]) -> None:
        ccfg = self.flow.consumer
        self.data = compile_flow_data(self.flow, source=f"flow {self.flow.name}", path=self.flow.name)
        await self.data.open()
        async with open_sink(self.sink_cfg) as sink:
            task_status.started()
            js = await self.agent.link.wait()
            consumer = await js.pull_consumer(
                durable=self.durable,
                filter_subject=f"evt.{self.flow.entity}.>",
                ack_wait=ccfg.ack_wait,
                max_deliver=ccfg.max_deliver,
                max_ack_pending=ccfg.max_ack_pending,
                metadata={"mesh-flow": self.flow.name, "mesh-sink-system": self.system},
            )
            self.agent.consumers[self.flow.name] = consumer
            try:
                await self._consume(js, sink, consumer)
            finally:
                if self.agent.consumers.get(self.flow.name) is consumer:
                    del self.agent.consumers[self.flow.name]
                await consumer.aclose()

    async def _consume(self, js: JetStream, sink: Sink, consumer: PullConsumer) -> None:
        ccfg = self.flow.consumer
        log.info("flow %s: consuming as %s", self.flow.name, self.durable)
        while True:
            await anyio.lowlevel.checkpoint()  # where a stop takes effect, between batches
            # A fetch and the batch it returns are finished even if a stop begins meanwhile
            # (bounded by the grace period): messages the server handed us are never left
            # unacked. Whatever is still unsettled at the deadline is released (nak'ed), so
            # another replica or the next start gets it at once instead of after ack_wait.
            batch = _Batch([])
            with self.agent.inflight(self.flow.name):
                batch = _Batch(await consumer.fetch(ccfg.batch_size, ccfg.fetch_timeout))
                if batch.deliveries:
                    await self.apply_batch(js, sink, batch)
            with anyio.CancelScope(shield=True):
                await batch.release()
            if self.handle is not None and self.handle.draining and not batch.deliveries:
                with contextlib.suppress(TransportError):
                    if await consumer.pending() == 0:
                        log.info("flow %s: drained (nothing pending)", self.flow.name)
                        return

    async def apply_batch(self, js: JetStream, sink: Sink, batch: _Batch) -> None:
        flow = self.flow.name
        handled = self.metrics.handled
        inbox = self.agent.inbox
        decoded: list[tuple[Delivery, Envelope]] = []
        for d in batch.deliveries:
            try:
                decoded.append((d, decode(d.data)))
            except DecodeError as exc:
                await self.fail(js, batch, d, None, exc)

        seen = await inbox.seen([e.id for _, e in decoded])
        todo: list[tuple[Delivery, Envelope, SinkRecord]] = []
        entries: list[InboxEntry] = []
        acks: list[Delivery] = []
        batch_ids: set[str] = set()
        for d, env in decoded:
            if env.id in seen or env.id in batch_ids:
                handled.labels(flow, "duplicate").inc()
                acks.append(d)
                continue
            batch_ids.add(env.id)
            if not self._accepts(env.origin):
                handled.labels(flow, "echo").inc()
                entries.append(InboxEntry(env.id, flow, env.key, env.version, "echo"))
                acks.append(d)
                continue
            try:
                record = self._record(env)
            except (DecodeError, MappingError) as exc:
                await self.fail(js, batch, d, env, exc)
                continue
            if record is None:  # a delete (or create) its origin may not make
                handled.labels(flow, "not_owner").inc()
                entries.append(InboxEntry(env.id, flow, env.key, env.version, "not_owner"))
                acks.append(d)
                continue
            todo.append((d, env, record))

        outcomes: Sequence[Applied | Exception] = []
        if todo:
            try:
                outcomes = await sink.apply([t[2] for t in todo])
            except RetryableError as exc:
                log.warning("flow %s: sink unavailable (%s); %d messages wait", flow, exc, len(todo))
                for d, env, _ in todo:
                    await self.fail(js, batch, d, env, exc)
                todo = []
        now = now_ms()
        latency = self.metrics.latency.labels(flow)
        for (d, env, _), outcome in zip(todo, outcomes, strict=True):
            if isinstance(outcome, Exception):
                await self.fail(js, batch, d, env, outcome)
                continue
            handled.labels(flow, outcome.value).inc()
            entries.append(InboxEntry(env.id, flow, env.key, env.version, outcome.value))
            acks.append(d)
            if outcome is Applied.APPLIED:
                latency.observe(max(0, now - env.occurred_at) / 1000)
        # The sink's writes are durable; record them, then ack (I4).
        crash_point("apply.after_sink")
        await inbox.record(entries)
        crash_point("apply.after_inbox")
        for d in acks:
            await batch.ack(d)

    def _record(self, env: Envelope) -> SinkRecord | None:
        """The sink's record for ``env``: ownership applied, mapped from the canonical entity.
        None when the origin may not make this change at all (a delete by a non-owner)."""
        row = _row_of(env)
        data = self.data
        scope, create = "", True
        if data.ownership is not None:
            decision = data.ownership.decide(self.flow.entity, env.origin, row, deleted=env.is_delete)
            if env.is_delete and not decision.may_delete:
                return None
            if decision.dropped:
                self.metrics.ownership_dropped.labels(self.flow.name, env.origin).inc(len(decision.dropped))
            row, scope, create = dict(decision.fields), env.origin, decision.may_create
        if data.from_canonical is not None and not env.is_delete:
            row = data.from_canonical.map(row)
        return SinkRecord(
            id=env.id, key=env.key, version=env.version, deleted=env.is_delete,
            row=row, origin=env.origin, scope=scope, create=create,
        )  # fmt: skip

    async def fail(
        self, js: JetStream, batch: _Batch, d: Delivery, env: Envelope | None, exc: Exception
    ) -> None:
        """Retry later (delayed nak) or dead-letter, by the flow's retry policy (I6)."""
        policy = self.flow.retry
        if policy.action(exc) == "retry" and d.num_delivered < self.flow.consumer.max_deliver:
            self.metrics.retries.labels(self.flow.name).inc()
            await batch.nak(d, policy.delay(d.num_delivered))
            return
        await self.dead_letter(js, d, env, exc)
        await batch.term(d)

    async def dead_letter(self, js: JetStream, d: Delivery, env: Envelope | None, exc: Exception) -> None:
        """Copy the message to the DLQ with its reason; the caller then terms it (I6)."""
        reason = " ".join(str(exc).split()) or type(exc).__name__  # one line: it goes in a header
        error = type(exc).__name__
        log.error(
            "flow %s: dead-lettering %s (stream seq %d, delivery %d): %s",
            self.flow.name, env.id if env else "<undecodable>", d.stream_seq, d.num_delivered, reason,
        )  # fmt: skip
        headers = {
            **{k: v for k, v in d.headers.items() if not k.startswith("Nats-")},
            "Mesh-Original-Subject": d.subject,
            "Mesh-Original-Stream-Seq": str(d.stream_seq),
            "Mesh-Original-Msg-Id": d.headers.get("Nats-Msg-Id", ""),
            "Mesh-Reason": reason[:1000],
            "Mesh-Error-Class": error,
            "Mesh-Permanent": "true" if isinstance(exc, PermanentError) else "false",
            "Mesh-Attempts": str(d.num_delivered),
            "Mesh-Flow": self.flow.name,
            "Mesh-Agent": self.agent.cfg.agent.name,
        }
        msg_id = f"dlq-{self.durable}-{d.stream_seq}"
        # Written (and acknowledged) before the original is termed: nothing is dropped silently.
        await js.publish(OutMessage(dlq_subject(self.flow.name), d.data, msg_id, headers))
        self.metrics.dead_lettered.labels(self.flow.name, error).inc()
        self.metrics.handled.labels(self.flow.name, "dead_lettered").inc()
        # Not recorded in the inbox: a replay of the fixed message must still apply.


class _Batch:
    """The deliveries of one fetch and which of them are settled (acked, nak'ed or termed)."""

    def __init__(self, deliveries: Sequence[Delivery]) -> None:
        self.deliveries = deliveries
        self._open = {id(d): d for d in deliveries}

    async def ack(self, d: Delivery) -> None:
        await d.ack()
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


class ConnectorAgent:
    """One agent process: its stores, its NATS link, and an actor per flow direction."""

    def __init__(
        self, cfg: AgentConfig, *, metrics: Metrics | None = None, readiness: Readiness | None = None
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics or Metrics()
        self.readiness = readiness or Readiness([])
        """Ready once stores, NATS link and command channel are up (the runner adds "signals")."""
        for condition in ("stores", "nats", "commands"):
            self.readiness.require(condition)
        state = Path(cfg.agent.state_dir)
        self.outbox = Outbox(state / "outbox.db")
        self.inbox = Inbox(state / "inbox.db")
        self.link = NatsLink(cfg, self.metrics, self.readiness)
        self.consumers: dict[str, Any] = {}
        self.supervisor: Supervisor | None = None
        self.started_at = time.time()
        self._inflight: dict[str, set[anyio.CancelScope]] = {}
        self.flows: FlowManager | None = None
        self._stop_deadline: float | None = None

    @contextlib.contextmanager
    def inflight(self, owner: str = "") -> Iterator[anyio.CancelScope]:
        """A shielded scope for one unit of in-flight work (a sink batch, a relay round).

        A stop does not interrupt it at once: :meth:`stop` (the whole agent) or
        :meth:`expire_inflight` (one flow, ``owner``) gives it ``shutdown_grace`` seconds to
        finish, then cancels it (what it held is then released or redone).
        """
        scope = anyio.CancelScope(shield=True)
        if self._stop_deadline is not None:
            scope.deadline = self._stop_deadline
        scopes = self._inflight.setdefault(owner, set())
        scopes.add(scope)
        try:
            with scope:
                yield scope
        finally:
            scopes.discard(scope)

    def expire_inflight(self, owner: str) -> None:
        """Give ``owner``'s in-flight work ``shutdown_grace`` seconds from now (a flow stopping)."""
        deadline = anyio.current_time() + self.cfg.agent.shutdown_grace
        for scope in self._inflight.get(owner, ()):
            scope.deadline = min(scope.deadline, deadline)

    @property
    def stopping(self) -> bool:
        return self._stop_deadline is not None

    def stop(self) -> None:
        """Begin a graceful stop: in-flight work gets ``shutdown_grace`` seconds, then ``run``
        returns. Idempotent."""
        if self._stop_deadline is None:
            self._stop_deadline = anyio.current_time() + self.cfg.agent.shutdown_grace
            for scopes in self._inflight.values():
                for scope in scopes:
                    scope.deadline = min(scope.deadline, self._stop_deadline)
        if self.supervisor is not None:
            self.supervisor.cancel()

    def __repr__(self) -> str:
        names = list(self.flows.flows) if self.flows else [f.name for f in self.cfg.flows]
        return f"<ConnectorAgent {self.cfg.agent.name} flows={names}>"

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled. Signals ``task_status`` once every actor has started."""
        await anyio.Path(self.cfg.agent.state_dir).mkdir(parents=True, exist_ok=True)
        restarts = self.metrics.actor_restarts
        async with (
            self.outbox,
            self.inbox,
            contextlib.aclosing(self.link),  # closed after every actor has stopped
            Supervisor(self.cfg.agent.name, on_restart=lambda a: restarts.labels(a).inc()) as sup,
        ):
            self.supervisor = sup
            self.readiness.set("stores")
            if self.stopping:
                sup.cancel()
            await sup.start("nats", self.link.run)
            await sup.start("relay", Relay(self).run)  # the agent's, whatever flows come and go
            a = self.cfg.agent
            self.flows = FlowManager(
                a.name, sup, self._flow_actors,
                expire_inflight=self.expire_inflight, outbox_depth=self._outbox_depth, state_dir=a.state_dir,
            )  # fmt: skip
            await self.flows.add_configured(self.cfg.flows)
            await sup.start("gauges", self._gauges)
            heartbeat = Heartbeat(
                a.name, a.site, self.link.wait, self._heartbeat_payload,
                state_dir=a.state_dir, interval=a.heartbeat_interval,
            )  # fmt: skip
            await sup.start("heartbeat", heartbeat.run)
            control = ControlChannel(
                a.name, a.state_dir, self.link.wait, self.flows, readiness=self.readiness
            )
            await sup.start("assignments", control.watch_assignments)
            await sup.start("commands", control.serve_commands)
            log.info("agent %s running %d flow(s)", a.name, len(self.cfg.flows))
            task_status.started()

    def _flow_actors(self, h: FlowHandle) -> list[tuple[str, Actor]]:
        actors: list[tuple[str, Actor]] = []
        if h.cfg.source is not None:
            actors.append((f"capture:{h.name}", Capture(self, h.cfg, h).run))
        if h.cfg.sink is not None:
            actors.append((f"apply:{h.name}", Apply(self, h.cfg, h).run))
        return actors

    async def _outbox_depth(self, flow: str) -> int:
        return (await self.outbox.stats_by_flow()).get(flow, (0, 0.0))[0]

    async def _heartbeat_payload(self) -> HeartbeatPayload:
        """What the control plane hears every heartbeat: health, backlog per flow, errors."""
        by_flow = await self.outbox.stats_by_flow()  # one scan: the totals derive from it
        depth = sum(n for n, _ in by_flow.values())
        age = max((a for _, a in by_flow.values()), default=0.0)
        js = self.link.current
        up = js is not None and js.is_connected
        reg = self.metrics.registry
        flows = []
        handles = list(self.flows.flows.values()) if self.flows else []
        for h in handles:
            f = h.cfg
            pending = None
            if f.sink is not None and f.name in self.consumers and up:
                with contextlib.suppress(TransportError):
                    pending = await self.consumers[f.name].pending()
            dead = metric_total(reg, "mesh_dead_lettered_messages_total", flow=f.name)
            retried = metric_total(reg, "mesh_retried_messages_total", flow=f.name)
            assert self.flows is not None
            state, detail = self.flows.report_state(h)
            f_depth, f_age = by_flow.get(f.name, (0, 0.0))
            flows.append(
                FlowReport(
                    name=f.name,
                    state=state,
                    outbox_depth=f_depth if f.source else None,
                    outbox_age_seconds=f_age if f.source else None,
                    consumer_pending=pending,
                    errors=int(dead + retried),
                    dead_lettered=int(dead),
                    generation=h.generation,
                    detail=detail,
                )
            )
        a = self.cfg.agent
        problems = []
        if not up:
            problems.append("NATS disconnected")
        if depth > a.outbox_warn_depth or age > a.outbox_warn_age:
            problems.append(f"outbox backlog {depth}, oldest {age:.0f}s")
        failing = [f.name for f in flows if f.state == "failing"]
        if failing:
            problems.append(f"failing flows: {', '.join(failing)}")
        errors = int(
            metric_total(reg, "mesh_actor_restarts_total")
            + metric_total(reg, "mesh_publish_failures_total")
            + sum(f.errors for f in flows)
        )
        return HeartbeatPayload(
            health="degraded" if problems else "ok",
            detail="; ".join(problems),
            outbox_depth=depth,
            outbox_age_seconds=age,
            errors=errors,
            flows=flows,
        )

    async def _gauges(self, task_status: TaskStatus[None]) -> None:
        task_status.started()
        next_prune = next_warning = 0.0
        while True:
            if anyio.current_time() >= next_prune:
                pruned = await self.inbox.prune(self.cfg.agent.inbox_retention)
                if pruned:
                    log.info("inbox: forgot %d ids older than the retention", pruned)
                next_prune = anyio.current_time() + 3600
            depth, age = await self.outbox.stats()
            self.metrics.outbox_depth.set(depth)
            self.metrics.outbox_age.set(age)
            self.metrics.outbox_bytes.set(self.outbox.nbytes)
            a = self.cfg.agent
            over = depth > a.outbox_warn_depth or age > a.outbox_warn_age
            self.metrics.outbox_over_threshold.set(1 if over else 0)
            if over and anyio.current_time() >= next_warning:
                log.warning(
                    "outbox backlog: %d envelopes (%.1f MB), oldest %.0fs old (warn at %d / %.0fs); "
                    "is NATS reachable? link %s",
                    depth, self.outbox.nbytes / 1e6, age, a.outbox_warn_depth, a.outbox_warn_age,
                    "up" if self.link.current and self.link.current.is_connected else "down",
                )  # fmt: skip
                next_warning = anyio.current_time() + 60
            js = self.link.current
            if js is not None and js.is_connected:
                for name, consumer in list(self.consumers.items()):
                    with contextlib.suppress(TransportError):
                        self.metrics.consumer_pending.labels(name).set(await consumer.pending())
            await anyio.sleep(1)
