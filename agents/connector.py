"""The connector agent: runs the flows in its config, in either direction or both.

It owns the stores (outbox, inbox), the NATS link and one supervisor, and wires the delivery
path's actors (:mod:`agents.delivery`: capture and apply per flow, one relay) with only what each
uses. Every loop is an actor under that supervisor: a crash restarts that loop with backoff, the
others keep running. The agent is ready (``readiness``) once stores, NATS link, the streams it
uses (:mod:`agents.layout`; it waits, without crashing, while one is missing) and command
channel are up.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import anyio.lowlevel
import anyio.to_thread
import msgspec
from anyio.abc import TaskStatus

from agents.control import ControlChannel
from agents.delivery import Apply, Capture, FlowPlan, Relay, RunTally
from agents.flows import FlowHandle, FlowManager
from agents.layout import StreamCheck
from mesh.actors import Actor, Backoff, Supervisor
from mesh.adapters import Sink, Source
from mesh.api import RESULTS_BUCKET, ensure_results_bucket
from mesh.api.server import ApiServer
from mesh.config import AdapterConfig, AgentConfig, FlowConfig, NatsConfig
from mesh.controlplane.models import FlowReport, HeartbeatPayload
from mesh.errors import ConfigError, TransportError
from mesh.heartbeat import Heartbeat, flow_kpis, metric_total
from mesh.metrics import Metrics
from mesh.plugins import adapter_registry
from mesh.policy import PolicyClient, PolicyMetrics, install
from mesh.readiness import Readiness
from mesh.redact import redact_urls
from mesh.runs import RunStore
from mesh.runs.adapter_runs import AdapterRunWatcher
from mesh.runs.bulk import RunTrigger, ScheduledSource
from mesh.runs.records import SinkTally
from mesh.runs.report import RunReporter
from mesh.store import Inbox, Outbox, private_dir
from mesh.trace import CauseLinks, TraceRecorder, use_recorder
from mesh.transport import Consumer, JetStream, OutMessage

__all__ = [
    "Apply",
    "Capture",
    "ConnectorAgent",
    "FlowPlan",
    "NatsLink",
    "Relay",
    "agent_nats_config",
    "open_sink",
    "open_source",
]

log = logging.getLogger(__name__)


def agent_nats_config(cfg: AgentConfig) -> NatsConfig:
    """The agent's NATS settings, with its own reply subjects: ``inbox_prefix`` defaults to
    ``_INBOX.<agent name>``, the only inbox its credentials may subscribe to."""
    if cfg.nats.inbox_prefix:
        return cfg.nats
    return msgspec.structs.replace(cfg.nats, inbox_prefix=f"_INBOX.{cfg.agent.name}")


def open_source(cfg: AdapterConfig) -> Source:
    """The Source adapter for a source config (not yet opened), from the installed adapters.

    Raises:
        PluginError: no installed adapter has a source for ``cfg``, or its factory does not load.
    """
    return adapter_registry().open_source(cfg)


def open_sink(cfg: AdapterConfig) -> Sink:
    """The Sink adapter for a sink config (not yet opened); raises like :func:`open_source`."""
    return adapter_registry().open_sink(cfg)


class NatsLink:
    """Connects (retrying forever); the agent closes it last. With ``[streams] manage = true``
    it also creates or updates the streams at connect (otherwise :class:`~agents.layout.StreamCheck`
    only checks them and creates missing ones when permitted).

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
                js = JetStream(agent_nats_config(self.cfg), name=self.cfg.agent.name)
                try:
                    await js.connect()
                    if self.cfg.streams.manage:
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
            log.info("connected to %s", redact_urls(self.cfg.nats.servers))
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


class ConnectorAgent:
    """One agent process: its stores, its NATS link, and an actor per flow direction."""

    def __init__(
        self,
        cfg: AgentConfig,
        *,
        metrics: Metrics | None = None,
        readiness: Readiness | None = None,
        stream_check_every: float = 5.0,
        config_retry: Backoff | None = None,
    ) -> None:
        """``stream_check_every``: seconds between checks that the streams exist;
        ``config_retry``: the backoff of a flow failing on its configuration (see
        :data:`agents.delivery.CONFIG_RETRY`)."""
        self.cfg = cfg
        self.config_retry = config_retry
        self.metrics = metrics or Metrics()
        self.readiness = readiness or Readiness([])
        """Ready once stores, NATS link, the streams it needs and the command channel are up (the
        runner adds "signals")."""
        for condition in ("stores", "nats", "streams", "commands"):
            self.readiness.require(condition)
        state = Path(cfg.agent.state_dir)
        self.outbox = Outbox(state / "outbox.db")
        self.inbox = Inbox(state / "inbox.db")
        self.runs = RunStore(state / "runs.db")
        """Run records of this agent's scheduled flows (:mod:`mesh.runs`)."""
        self.tally = SinkTally(state / "runs.db")
        """What this agent's sinks did with the envelopes of bulk runs."""
        self.link = NatsLink(cfg, self.metrics, self.readiness)
        self.policies = PolicyClient(
            cfg.agent.name,
            cfg.policies,
            lambda: self.link.current,
            metrics=PolicyMetrics(self.metrics.registry),
        )
        """Shared API policies (README "Shared rate limits and quotas (API policy)"); installed
        for this process's adapters (one agent per process)."""
        install(self.policies)
        self.run_reports = RunReporter(cfg.agent.name, self._publish)
        self.run_triggers: dict[str, RunTrigger] = {}
        """Per scheduled flow: starts a run now (``meshctl runs start``, :mod:`agents.control`)."""
        self.streams = StreamCheck(self.link.wait, cfg.streams, self.readiness, every=stream_check_every)
        self.api_server: ApiServer | None = None
        """The System API service (README "System APIs"), once serving."""
        self.tracer = TraceRecorder(
            cfg.agent.name, cfg.agent.system, cfg=cfg.trace, transport=self.link.wait,
            counter=self.metrics.trace_records,
        )  # fmt: skip
        """Trace records of this agent (``mesh.trace.record`` in its tasks records here too)."""
        self.links = CauseLinks(cfg.trace.link_window, entities=set())
        """Applied changes of the entities this agent captures (an echo's cause)."""
        self.consumers: dict[str, Consumer] = {}
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
        with use_recorder(self.tracer):  # inherited by every task the agent starts
            await self._run(task_status)

    async def _run(self, task_status: TaskStatus[None]) -> None:
        await anyio.to_thread.run_sync(private_dir, Path(self.cfg.agent.state_dir))
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
            await sup.start("streams", self.streams.run)
            relay = Relay(
                self.outbox, self.link.wait, self.metrics, self.cfg.relay,
                agent=self.cfg.agent.name, inflight=self.inflight, streams=self.streams, tracer=self.tracer,
            )  # fmt: skip
            await sup.start("trace", self.tracer.run)
            await sup.start("relay", relay.run)  # the agent's, whatever flows come and go
            await sup.start("run-reports", self.run_reports.run)
            a = self.cfg.agent
            self.flows = FlowManager(
                a.name, sup, self._flow_actors,
                expire_inflight=self.expire_inflight, outbox_depth=self._outbox_depth, state_dir=a.state_dir,
                allowed_paths=a.allowed_paths,
                allowed_env=a.allowed_env,
            )  # fmt: skip
            await self.flows.add_configured(self.cfg.flows)
            adapter_runs = AdapterRunWatcher(a.name, self._flow_sides, self.run_reports.report)
            await sup.start("adapter-runs", adapter_runs.run)
            await sup.start("gauges", self._gauges)
            heartbeat = Heartbeat(
                a.name, a.site, self.link.wait, self._heartbeat_payload,
                state_dir=a.state_dir, interval=a.heartbeat_interval,
            )  # fmt: skip
            await sup.start("heartbeat", heartbeat.run)
            control = ControlChannel(
                a.name, a.state_dir, self.link.wait, self.flows, readiness=self.readiness,
                creds=self.cfg.nats.creds, system=a.system, run_triggers=self.run_triggers,
            )  # fmt: skip
            await sup.start("assignments", control.watch_assignments)
            await sup.start("commands", control.serve_commands)
            if self.cfg.api is not None and self.cfg.api.operations:
                await sup.start("api", self._serve_api)
            log.info("agent %s running %d flow(s)", a.name, len(self.cfg.flows))
            task_status.started()

    async def _serve_api(self, task_status: TaskStatus[None]) -> None:
        """Serve the System API (README "System APIs") once NATS is up; creates the results
        bucket when it is missing and this agent may (standalone), else the control plane does."""
        task_status.started()
        api = self.cfg.api
        assert api is not None
        js = await self.link.wait()
        try:
            await ensure_results_bucket(js, replicas=self.cfg.streams.replicas, ttl=api.result_ttl)
        except TransportError as exc:
            log.info("System API: %s not created here (%s); the control plane does", RESULTS_BUCKET, exc)
        self.api_server = ApiServer(
            js, api, system=self.cfg.agent.system, agent=self.cfg.agent.name, metrics=self.metrics
        )
        await self.api_server.run()

    def _flow_actors(self, h: FlowHandle) -> list[tuple[str, Actor]]:
        a = self.cfg.agent
        plan = FlowPlan(
            h.cfg, agent=a.name, system=a.system, tracer=self.tracer, links=self.links,
            is_parent=lambda: self._is_parent(h.name),
        )  # fmt: skip
        self.metrics.track_flow(h.cfg.name, h.cfg.slo_seconds)
        actors: list[tuple[str, Actor]] = []
        if h.cfg.source is not None:
            self.links.watch(h.cfg.entity)
            capture = Capture(
                plan, self.outbox, self.metrics, self._source_maker(h.cfg),
                outbox_max_bytes=a.outbox_max_bytes, handle=h, config_retry=self.config_retry,
            )  # fmt: skip
            actors.append((f"capture:{h.name}", capture.run))
        if (sink_cfg := h.cfg.sink) is not None:
            apply = Apply(
                plan, self.inbox, self.link.wait, self.metrics, lambda: open_sink(sink_cfg),
                handle=h, inflight=self.inflight, consumers=self.consumers, streams=self.streams,
                config_retry=self.config_retry, tally=self._tally_of(h.name),
                inbox_retention=self.cfg.agent.inbox_retention,
            )  # fmt: skip
            actors.append((f"apply:{h.name}", apply.run))
        return actors

    def _is_parent(self, name: str) -> bool:
        """Whether a flow of this agent names ``name`` in its ``after`` (parent before child)."""
        flows = [h.cfg for h in self.flows.flows.values()] if self.flows else self.cfg.flows
        return any(f.after is not None and f.after.flow == name for f in flows)

    def _source_maker(self, flow: FlowConfig) -> Callable[[], Source]:
        """Opens the flow's source: continuous, or a scheduled bulk run (:mod:`mesh.runs`)."""
        source_cfg, schedule = flow.source, flow.schedule
        assert source_cfg is not None
        if schedule is None:
            return lambda: open_source(source_cfg)
        trigger = self.run_triggers.setdefault(flow.name, RunTrigger())

        tag = str(type(source_cfg).__struct_config__.tag)

        def scheduled() -> Source:
            maker = adapter_registry().bulk_of(source_cfg)
            if maker is None:
                why = f"adapter {tag!r} cannot run on a schedule (it has no bulk extract)"
                raise ConfigError(f"flow {flow.name}: {why}")
            return ScheduledSource(
                flow.name, tag, schedule, maker(source_cfg), self.runs,
                agent=self.cfg.agent.name, report=self.run_reports.report, trigger=trigger,
            )  # fmt: skip

        return scheduled

    def _flow_sides(self) -> list[tuple[str, object]]:
        """(flow, source or sink config) of every flow side this agent runs now."""
        flows = self.flows.flows.values() if self.flows is not None else ()
        return [(h.name, side) for h in flows for side in (h.cfg.source, h.cfg.sink) if side is not None]

    async def _publish(self, subject: str, data: bytes, msg_id: str) -> None:
        js = await self.link.wait()
        await js.publish(OutMessage(subject, data, msg_id))

    def _tally_of(self, flow: str) -> RunTally:
        async def tally(outcomes: list[tuple[str, str, str]]) -> None:
            changed = await self.tally.record(flow, outcomes)
            if changed:
                await self.run_reports.tallied(self.tally, flow, changed)

        return tally

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
        kpis = flow_kpis(self.metrics)
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
                    kpis=kpis.get(f.name),
                )
            )
        a = self.cfg.agent
        problems = []
        if not up:
            problems.append("NATS disconnected")
        if depth > a.outbox_warn_depth or age > a.outbox_warn_age:
            problems.append(f"outbox backlog {depth}, oldest {age:.0f}s")
        problems += self.policies.problems()  # degraded to the local share, quota spent
        for report in flows:  # the reason too: `meshctl agent health` shows this line as WHY
            if report.state == "failing":
                why = f": {report.detail}" if report.detail else ""
                problems.append(f"flow {report.name} failing{why}")
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
            by_flow = await self.outbox.stats_by_flow()
            depth = sum(n for n, _ in by_flow.values())
            age = max((a for _, a in by_flow.values()), default=0.0)
            for h in list(self.flows.flows.values()) if self.flows else []:
                if h.cfg.source is not None:
                    f_depth, f_age = by_flow.get(h.cfg.name, (0, 0.0))
                    self.metrics.flow_outbox_depth.labels(h.cfg.name).set(f_depth)
                    self.metrics.flow_outbox_age.labels(h.cfg.name).set(f_age)
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
