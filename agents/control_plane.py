"""The control-plane agent: agent registry, health, leader election and the HTTP status endpoint.

One process is one *replica*; run several for high availability. Each replica::

    HTTP (/healthz /readyz /status /metrics /)          ◄── operators, probes, Prometheus
    NATS request/reply  <prefix>.agents|status|flows    ◄── every replica (queue group), from its mirror
                        .<caller>
    NATS request/reply  <prefix>.register|deregister|   ◄── the leader only (queue group)
                        revoke|heartbeat|flow_apply|
                        flow_delete|command|policy.<caller>
    KV mesh_agents ──watch──► mirror ──► health sweep, status, metrics
    KV mesh_leader ◄──CAS──► lease (one leader; see mesh.controlplane.lease)
    stream MESH_AUDIT ◄── register / deregister / revoke entries (leader)

Requests arrive on ``<prefix>.<kind>.<caller>``; the caller token is the requester's identity
(NATS permissions decide who may publish there): the audit trail and every ``actor`` record it,
whatever the body says, and a registration or heartbeat naming another agent than its caller is
refused (``unauthorized``).

Guarantees: exactly one replica serves writes at a time, as far as the lease can tell (a leader
that cannot renew steps down before a follower may take over), and every write is a KV
compare-and-swap besides, so an overlap cannot lose an update. Followers answer reads from their
own mirror of KV (eventually consistent, typically within milliseconds). The HTTP endpoint comes
up first and keeps answering while NATS is away (``/readyz`` then says 503 and why). Every loop
is an actor under one supervisor. SIGTERM releases the lease, so a follower takes over at once.

Run it with ``meshctl control-plane run`` or ``python -m agents.control_plane`` (same flags).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import time
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import msgspec
from anyio.abc import TaskStatus

from agents.control import command_subject
from agents.runner import run_until_signalled
from mesh.actors import Backoff, Supervisor
from mesh.controlplane.audit import AuditLog
from mesh.controlplane.enroll import Enrollment
from mesh.controlplane.flows import FlowStore
from mesh.controlplane.health import HealthTracker
from mesh.controlplane.http import HttpServer, StatusEncodings, create_app
from mesh.controlplane.kv import Bucket, KvMirror
from mesh.controlplane.layout import LayoutKeeper
from mesh.controlplane.lease import LeaderLease
from mesh.controlplane.metrics import ControlPlaneMetrics
from mesh.controlplane.models import (
    AGENTS_BUCKET,
    ASSIGN_BUCKET,
    FLOWS_BUCKET,
    LEADER_BUCKET,
    READ_KINDS,
    WRITE_KINDS,
    AgentCommand,
    Agents,
    ApplyFlows,
    CommandResult,
    ControlPlaneInfo,
    DeleteFlow,
    Deregister,
    DesiredState,
    DlqReason,
    FlowCommand,
    FlowOutcome,
    Flows,
    FlowSpecView,
    GetStatus,
    Heartbeat,
    ListAgents,
    ListFlows,
    ListTokens,
    Refused,
    Register,
    Registered,
    Reply,
    Request,
    Revoke,
    StatusReport,
    TokenCreate,
    decode_request,
    encode,
    mesh_version,
)
from mesh.controlplane.policy import PolicyCoordinator
from mesh.controlplane.registry import Registry
from mesh.controlplane.runs_view import RunsView
from mesh.controlplane.series import SeriesStore
from mesh.controlplane.settings import ControlPlaneSettings
from mesh.controlplane.status import (
    DlqInfo,
    StatusBuilder,
    config_file_flows,
    cooperatively,
    flow_views,
    flow_views_steps,
)
from mesh.controlplane.txn import TxnTracker
from mesh.errors import DecodeError, TransportError
from mesh.readiness import Readiness
from mesh.reconcile.schedule import ReconcileScheduler
from mesh.runs.report import RUNS_BUCKET
from mesh.sdnotify import Notifier
from mesh.security.authority import Authority
from mesh.trace import TransactionsView
from mesh.transport import DLQ_STREAM, JetStream, Message, NoReply, NoResponders, NotFound, Transport

__all__ = ["ControlPlane", "run_control_plane_process"]

log = logging.getLogger(__name__)

_CONCURRENCY = 64
SYNC_REBUILD_AGENTS = 500
"""Up to this many agents every status request builds a fresh report (a few ms: as fresh as
the mirror); above, requests get the one the sweep built, and a registry or flow change makes
the sweep rebuild it right away."""


class ControlPlane:
    """One control-plane replica. ``await cp.run()`` until cancelled or :meth:`stop`."""

    def __init__(
        self,
        settings: ControlPlaneSettings,
        *,
        metrics: ControlPlaneMetrics | None = None,
        transport: Transport | None = None,
        heal_every: float = 5.0,
    ) -> None:
        """``transport`` defaults to JetStream on ``settings.nats``; the replica owns (and closes)
        whichever it is given. ``heal_every``: seconds between checks that every stream and
        bucket still exists (a missing one is re-created, see :mod:`mesh.controlplane.layout`)."""
        self.settings = settings
        self.name = settings.name
        self.prefix = settings.subject_prefix
        self.metrics = metrics or ControlPlaneMetrics()
        self.registry = self.metrics.registry
        self.js: Transport = transport or JetStream(settings.nats, name=f"control-plane:{settings.name}")
        self.http: HttpServer | None = None
        self.encodings = StatusEncodings()
        """``/status``'s encodings, warmed by the sweep with each report it builds."""
        self.http_port: int | None = None
        self.buckets: dict[str, Bucket] = {}
        self.layout = LayoutKeeper(
            self.js, settings.streams, every=heal_every, runs_max_age=settings.runs_max_age
        )
        self.txns = TxnTracker(
            self.js, max_transactions=settings.trace_transactions, rebuild=settings.trace_rebuild
        )
        """Business transactions read from MESH_TRACE (``/status``, ``/trace/<id>``)."""
        self.mirror: KvMirror | None = None
        self.runs_view: RunsView | None = None
        """The ``runs`` section of ``/status`` (a mirror of ``mesh_runs``)."""
        self.lease: LeaderLease | None = None
        self.builder: StatusBuilder | None = None
        self.agent_registry: Registry | None = None
        self.flow_store: FlowStore | None = None
        self.authority = Authority.load(settings.security_dir) if settings.security_dir else None
        """Security on (``settings.security_dir``): issues tokens and JWTs, pushes revocations."""
        self.enrollment: Enrollment | None = None
        self.tracker = HealthTracker()
        self.dlq_depths: dict[str, int] = {}
        self.dlq_info: dict[str, DlqInfo] = {}
        """Per flow with dead letters: the oldest one's time and the top reasons."""
        res = settings.series_resolution
        self.series = SeriesStore(resolution=res, capacity=int(3600 / res) + 1)
        """The dashboard's time series, recorded from the heartbeats this replica mirrors."""
        self._dlq_read_depth: dict[str, int] = {}
        self._audit: AuditLog | None = None
        self._flow_series: set[str] = set()
        self._flow_counters: dict[str, tuple[Any, Any, Any]] = {}
        self._reconciled: object = None
        """The inputs of the sweep's last complete assignment reconciliation (see _sweep)."""
        self._reconcile_anyway = 0.0
        self.supervisor: Supervisor | None = None
        self._stopping = False
        self._status: tuple[float, StatusReport] | None = None
        self._wake_sweep = anyio.Event()
        self._version = mesh_version()
        self.conditions = Readiness(("nats", "kv", "handlers"))
        """Met as the parts come up (the process runner adds "signals"); see :meth:`readiness`."""

    def __repr__(self) -> str:
        role = "leader" if self.is_leader else "follower"
        return (
            f"<ControlPlane {self.name} {role} agents={len(self.tracker.states)} nats={self.js.is_connected}>"
        )

    @property
    def is_leader(self) -> bool:
        return self.lease is not None and self.lease.is_leader

    @property
    def http_url(self) -> str | None:
        return self.http.url if self.http is not None and self.http_port is not None else None

    def stop(self) -> None:
        """Stop every actor (the lease is released on the way out). Idempotent."""
        self._stopping = True
        if self.supervisor is not None:
            self.supervisor.cancel()

    # --- StatusSource (HTTP) -----------------------------------------------------------------

    def _info(self) -> ControlPlaneInfo:
        return ControlPlaneInfo(
            replica=self.name,
            leader=self.lease.leader if self.lease else None,
            is_leader=self.is_leader,
            nats_connected=self.js.is_connected,
            version=self._version,
        )

    def _transactions(self) -> TransactionsView | None:
        return self.txns.view() if self.txns.caught_up.is_set() else None

    def _with_runs(self, report: StatusReport) -> StatusReport:
        if self.runs_view is not None:
            report = msgspec.structs.replace(report, runs=self.runs_view.latest(report.generated_at))
        return report

    def _cache_status(self, report: StatusReport) -> StatusReport:
        report = self._with_runs(report)
        self._status = (anyio.current_time(), report)
        return report

    def invalidate_status(self) -> None:
        """A registry or flow change: the sweep rebuilds the cached report at once (a
        registration storm must not rebuild it on every request; a change during a build sets
        this again, so the next build has it)."""
        self._wake_sweep.set()

    def status(self) -> StatusReport:
        """The status document. Up to :data:`SYNC_REBUILD_AGENTS` agents: built now. Above:
        the one the last sweep built (every ``sweep_interval``, and at once after a registry or
        flow change, see :meth:`invalidate_status`; its ``generated_at`` says when), so a
        request over thousands of agents never waits for a rebuild, not even when the machine
        is too busy for the sweep to keep its pace; built now only when there is none yet or
        this replica's role or NATS link changed. The same object is returned until it is
        rebuilt (the HTTP layer caches its encodings and ETags by it)."""
        info = self._info()
        cached = self._status
        small = len(cached[1].agents if cached else ()) <= SYNC_REBUILD_AGENTS
        if cached is not None and not small and cached[1].control_plane == info:
            return cached[1]
        if self.builder is None:
            return StatusReport(
                schema_version="mesh-cp-status/1",
                generated_at=time.time(),
                control_plane=info,
                agents=[],
                flows=[],
                counts={"healthy": 0, "degraded": 0, "stale": 0, "lost": 0},
            )
        specs = self.flow_store.specs() if self.flow_store is not None else None
        report = self.builder.report(
            info, self.dlq_depths, specs=specs, transactions=self._transactions(), series=self.series,
            dlq=self.dlq_info,
        )  # fmt: skip
        return self._cache_status(report)

    async def readiness(self) -> str | None:
        if not self.conditions.ready:
            return str(self.conditions.snapshot()["detail"])
        if not self.js.is_connected:
            return f"NATS not connected ({', '.join(self.settings.nats.servers)})"
        if self.mirror is None or not self.mirror.synced.is_set():
            return "KV not loaded yet"
        try:
            with anyio.fail_after(2):
                missing = await self.layout.find_missing()
        except (TransportError, TimeoutError) as exc:
            return f"streams not readable: {exc or 'timed out'}"
        if missing:
            self.layout.wake()
            return "; ".join(f"{m} missing" for m in missing)
        try:
            with anyio.fail_after(2):
                await self.buckets[LEADER_BUCKET].get("leader")
        except (TransportError, TimeoutError) as exc:
            return f"KV not readable: {exc or 'timed out'}"
        return None

    # --- lifecycle -----------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``started`` once connected, electing and serving requests."""
        s = self.settings
        token = s.http_token()
        async with contextlib.aclosing(self.js), Supervisor(f"control-plane:{self.name}") as sup:
            self.supervisor = sup
            if self._stopping:
                sup.cancel()
            if s.http_port is not None:
                self.http = HttpServer(
                    create_app(self, token=token, series=self.series, encodings=self.encodings),
                    s.http_host,
                    s.http_port,
                    tls_cert_file=s.http_tls_cert_file,
                    tls_key_file=s.http_tls_key_file,
                    open_access=token is None,
                )
                self.http_port = await sup.start("http", self.http.run)
            await self._connect()
            self.conditions.set("nats")
            agents = self.buckets[AGENTS_BUCKET]
            self.mirror = KvMirror(self.js, agents)
            self.builder = StatusBuilder(self.mirror, s.health)
            audit = self._audit = AuditLog(self.js, self.name, timeout=s.nats.request_timeout)

            async def append(kind: str, who: str, target: str, what: str, detail: dict[str, str]) -> None:
                await audit.append(kind, who=who, target=target, what=what, detail=detail)

            if self.authority is not None:
                self.enrollment = Enrollment(
                    self.authority, agents, self.mirror, nats=s.nats, prefix=self.prefix
                )
            self.agent_registry = Registry(
                agents,
                replica=self.name,
                mirror=self.mirror,
                audit=append,
                on_audit_failure=self.metrics.audit_failures.inc,
                security=self.enrollment,
                policy=s.health,
            )
            self.builder.latest = self.agent_registry.latest  # the leader's views: as fresh as its heartbeats
            self.lease = LeaderLease(
                self.buckets[LEADER_BUCKET],
                self.name,
                ttl=s.lease_ttl,
                renew_every=s.lease_renew,
                poll_every=min(0.5, s.lease_renew),
                on_change=self._on_role,
            )
            flows_mirror = KvMirror(self.js, self.buckets[FLOWS_BUCKET])
            assign_mirror = KvMirror(self.js, self.buckets[ASSIGN_BUCKET])
            self.flow_store = FlowStore(
                self.buckets[FLOWS_BUCKET],
                self.buckets[ASSIGN_BUCKET],
                flows_mirror=flows_mirror,
                assign_mirror=assign_mirror,
                agents_mirror=self.mirror,
                audit=append,
                security=self.enrollment,
            )
            await sup.start("mirror", self.mirror.run)
            await sup.start("flows-mirror", flows_mirror.run)
            await sup.start("assign-mirror", assign_mirror.run)
            runs_mirror = KvMirror(self.js, self.buckets[RUNS_BUCKET])
            await sup.start("runs-mirror", runs_mirror.run)
            self.runs_view = RunsView(runs_mirror)
            self.layout.mirrors.update(
                {AGENTS_BUCKET: self.mirror, FLOWS_BUCKET: flows_mirror, ASSIGN_BUCKET: assign_mirror}
            )
            await sup.start("layout", self.layout.run)
            await sup.start("trace", self.txns.run)
            self.conditions.set("kv")
            await sup.start("reads", self._serve_reads)
            await sup.start("lease", self.lease.run)
            await sup.start("writes", self._serve_writes)
            await sup.start("sweep", self._sweep)
            if s.reconcile:
                scheduler = ReconcileScheduler(
                    self.js, s.reconcile, gauge=self.metrics.reconcile_exceptions, audit=append,
                    agents=self._active_agents, is_leader=lambda: self.is_leader, who=f"schedule@{self.name}",
                    prefix=self.prefix,
                )  # fmt: skip
                await sup.start("reconcile", scheduler.run)
            if self.enrollment is not None:
                await sup.start("account-push", self._push_account)
            log.info(
                "control plane %s up: NATS %s, subjects %s.*, HTTP %s",
                self.name,
                ", ".join(s.nats.servers),
                self.prefix,
                self.http_url or "off",
            )
            # Everything built so far lives as long as the process: keep it out of the cyclic
            # GC's full collections (they were the /status p99 tail at 1,000 agents: ~28 ms
            # each, 74 ms max; with the freeze ~3 ms).
            gc.freeze()
            task_status.started()

    async def _connect(self) -> None:
        backoff = Backoff(base=0.25, cap=5.0)
        attempt = 0
        while True:
            try:
                if not self.js.is_connected:
                    await self.js.connect()
                self.buckets = await self.layout.ensure()  # streams too
                self.metrics.nats_connected.set(1)
                return
            except TransportError as exc:
                delay = backoff.delay(attempt)
                attempt += 1
                if attempt == 1 or attempt % 20 == 0:
                    log.warning("control plane %s: NATS not ready (%s); retrying", self.name, exc)
                await anyio.sleep(delay)

    async def _push_account(self, task_status: TaskStatus[None]) -> None:
        """Push the MESH account JWT with the whole revocation list now and after every
        reconnect (a nats-server restarted with an older resolver copy gets the list again)."""
        assert self.enrollment is not None
        task_status.started()
        backoff = Backoff(base=0.5, cap=10.0)
        attempt = 0
        pushed_at = -1
        try:
            while True:
                reconnects = self.js.reconnects
                if reconnects != pushed_at and self.js.is_connected and self.mirror is not None:
                    await self.mirror.synced.wait()
                    if await self.enrollment.push():
                        await anyio.sleep(backoff.delay(attempt))
                        attempt += 1
                        continue
                    pushed_at, attempt = reconnects, 0
                await anyio.sleep(1.0)
        finally:
            with anyio.CancelScope(shield=True):
                await self.enrollment.aclose()

    def _on_role(self, leader: bool) -> None:
        self._reconciled = None  # a new term reconciles at once
        if self.agent_registry is not None:
            self.agent_registry.role_changed()
        self.metrics.is_leader.set(1 if leader else 0)
        self.metrics.leader_changes.inc()

    # --- request/reply -------------------------------------------------------------------------

    async def _serve(self, kinds: tuple[str, ...], group: str, *, task_status: TaskStatus[None]) -> None:
        """Serve ``kinds`` (queue group ``group``, shared with the other replicas) until cancelled.

        Heartbeats and reads are independent of each other: up to _CONCURRENCY at once, so a
        burst (every agent beating in the same second) is not queued behind one KV write at a
        time. Registry changes stay one at a time (they are CAS loops anyway).
        """
        async with anyio.create_task_group() as tg:
            for kind in kinds:
                serial = kind in ("register", "deregister", "revoke")
                quick = self._quick_heartbeat if kind == "heartbeat" else None
                await tg.start(
                    functools.partial(
                        self.js.serve, f"{self.prefix}.{kind}.*", functools.partial(self._handle, kind),
                        queue=f"{self.prefix}.{group}", max_concurrent=1 if serial else _CONCURRENCY,
                        quick=quick,
                    )
                )  # fmt: skip
            task_status.started()

    async def _serve_reads(self, task_status: TaskStatus[None]) -> None:
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(functools.partial(self._serve, READ_KINDS, "readers"))
                self.conditions.set("handlers")  # subscriptions flushed: requests reach us
                task_status.started()
        finally:
            self.conditions.clear("handlers", "request handlers stopped")

    async def _serve_writes(self, task_status: TaskStatus[None]) -> None:
        assert self.lease is not None
        task_status.started()
        while True:
            await self.lease.wait(leader=True)
            async with anyio.create_task_group() as tg:
                await tg.start(functools.partial(self._serve, WRITE_KINDS, "writers"))
                # API policies (mesh.controlplane.policy): a fresh coordinator per leader term.
                await tg.start(PolicyCoordinator(audit=self._audit_policy).serve, self.js, self.prefix)
                await self.lease.wait(leader=False)
                tg.cancel_scope.cancel()

    def _quick_heartbeat(self, msg: Message) -> bytes | None:
        """A heartbeat answered in the serving loop itself, without a task: when it is refused
        or needs no KV write (most of them, see :meth:`Registry.heartbeat_now`); None hands
        it to :meth:`_handle` (which also answers what cannot be decoded)."""
        registry = self.agent_registry
        if registry is None:
            return None
        began = time.perf_counter()
        try:
            req = decode_request(msg.data)
        except DecodeError:
            return None
        if not isinstance(req, Heartbeat) or req.name != msg.subject.rsplit(".", 1)[-1]:
            return None
        reply = registry.heartbeat_now(req)
        if reply is None:
            return None
        self.metrics.served(
            "heartbeat", "refused" if isinstance(reply, Refused) else "ok", time.perf_counter() - began
        )
        return encode(reply)

    async def _handle(self, kind: str, msg: Message) -> bytes:
        began = time.perf_counter()
        outcome = "ok"
        reply: Reply
        caller = msg.subject.rsplit(".", 1)[-1]  # the subject's last token: who sent it
        try:
            req = decode_request(msg.data)
            tag = req.__struct_config__.tag
            if tag != kind:
                reply = Refused(code="invalid", reason=f"a {tag!r} request sent to {msg.subject}")
            elif isinstance(req, Register | Heartbeat) and req.name != caller:
                why = f"{caller!r} may not send a {kind} for agent {req.name!r} (only the agent itself)"
                reply = Refused(code="unauthorized", reason=why)
            else:
                reply = await self._dispatch(_as_caller(req, caller))
        except DecodeError as exc:
            reply = Refused(code="invalid", reason=str(exc))
        except TransportError as exc:
            log.warning("%s request failed: %s", kind, exc)
            reply = Refused(code="internal", reason=f"the control plane could not reach its KV store: {exc}")
            outcome = "error"
        except Exception:
            log.exception("%s request failed", kind)
            reply = Refused(code="internal", reason="internal error (details in the control-plane log)")
            outcome = "error"
        if outcome == "ok" and isinstance(reply, Refused):
            outcome = "refused"
        self.metrics.served(kind, outcome, time.perf_counter() - began)
        return encode(reply)

    async def _dispatch(self, req: Request) -> Reply:
        registry, builder, store = self.agent_registry, self.builder, self.flow_store
        assert registry is not None
        assert builder is not None
        assert store is not None
        if isinstance(req, Heartbeat):
            return await registry.heartbeat(req)
        if isinstance(req, GetStatus | ListFlows | ListAgents | ListTokens):
            return await self._dispatch_request(req)
        try:
            return await self._dispatch_request(req)
        finally:
            self.invalidate_status()  # a registry or flow change (done): the next /status shows it

    async def _dispatch_request(self, req: Request) -> Reply:
        registry, builder, store = self.agent_registry, self.builder, self.flow_store
        assert registry is not None
        assert builder is not None
        assert store is not None
        if isinstance(req, Register):
            reply: Reply = await registry.register(req)
            await store.reconcile()
            if isinstance(reply, Registered) and self.enrollment is not None:
                jwt = store.credentials_jwt(req.name)
                if jwt is None:
                    return Refused(code="internal", reason=f"no credentials could be issued for {req.name}")
                reply = msgspec.structs.replace(reply, jwt=jwt)
            return reply
        if isinstance(req, TokenCreate):
            if self.enrollment is None:
                return Refused(code="invalid", reason=_SECURITY_OFF)
            created = await self.enrollment.create_token(req)
            if not isinstance(created, Refused) and self._audit is not None:
                systems = ",".join(sorted(set(req.systems))) or "none"
                what = f"created an enrollment token for agent {req.name} (systems {systems}, "
                what += f"ttl {req.ttl:g}s)"
                detail = {"token_id": created.token_id, "expires": str(created.expires), "systems": systems}
                try:
                    await self._audit.append("token_create", who=req.actor, target=req.name, what=what,
                                             detail=detail)  # fmt: skip
                except TransportError as exc:
                    log.error("audit: %s (the token for %s stands)", exc, req.name)
                    self.metrics.audit_failures.inc()
            return created
        if isinstance(req, ListTokens):
            if self.enrollment is None:
                return Refused(code="invalid", reason=_SECURITY_OFF)
            return self.enrollment.tokens()
        if isinstance(req, Deregister):
            reply = await registry.deregister(req)
            await store.reconcile()  # its assignment goes: it stops its flows
            return reply
        if isinstance(req, Revoke):
            reply = await registry.revoke(req)
            await store.reconcile()
            return reply
        if isinstance(req, GetStatus):
            return self.status()
        if isinstance(req, ApplyFlows):
            return await store.apply(req)
        if isinstance(req, DeleteFlow):
            return await store.delete(req)
        if isinstance(req, ListFlows):
            return self._flows(req.name)
        if isinstance(req, FlowCommand):
            return await self._command(req)
        assert isinstance(req, ListAgents)
        views = builder.agents()
        if req.name is not None:
            views = [v for v in views if v.name == req.name]
            if not views:
                return Refused(code="unknown", reason=f"no agent named {req.name!r} is registered")
        return Agents(agents=views, served_by=self.name, leader=self.lease.leader if self.lease else None)

    # --- flows and commands --------------------------------------------------------------------

    def _flows(self, name: str | None) -> Flows | Refused:
        assert self.flow_store is not None
        assert self.builder is not None
        specs = self.flow_store.specs()
        agents = self.builder.agents()
        if name is not None:
            if name not in specs:
                static = [v for v in config_file_flows(agents, specs) if v.spec.name == name]
                if static:
                    runners = ", ".join(p.agent for p in static[0].spec.parts)
                    why = f"it runs from the config file of {runners} (`meshctl flow list` shows its state)"
                    return Refused(code="unknown", reason=f"flow {name!r} is not applied: {why}")
                return Refused(code="unknown", reason=f"no flow named {name!r} is applied")
            specs = {name: specs[name]}
        views = {v.name: v for v in flow_views(agents, self.dlq_depths, specs)}
        out = []
        for n, spec in sorted(specs.items()):
            reports = [
                msgspec.structs.replace(f, name=a.name) for a in agents for f in a.flows if f.name == n
            ]
            state = views[n].state if n in views else "pending"
            out.append(FlowSpecView(spec=spec, state=state, reports=reports))
        if name is None:  # and the flows agents run from their config files, marked as such
            out = sorted([*out, *config_file_flows(agents, specs)], key=lambda v: v.spec.name)
        return Flows(flows=out, served_by=self.name)

    async def _command(self, req: FlowCommand) -> CommandResult | Refused:
        """Record the desired state (flow pause/resume), forward the command to every agent
        concerned, and answer with what each of them did."""
        assert self.flow_store is not None
        assert self.builder is not None
        views = {v.name: v for v in self.builder.agents()}
        spec = self.flow_store.specs().get(req.flow) if req.flow is not None else None
        if req.flow is None and req.agent is None:
            return Refused(code="invalid", reason="name a flow, an agent, or both")
        if req.flow is not None:
            targets = {p.agent for p in spec.parts} if spec is not None else set()
            targets |= {n for n, v in views.items() if any(f.name == req.flow for f in v.flows)}
            if req.agent is not None:
                if req.agent not in targets:
                    why = f"flow {req.flow!r} does not run on agent {req.agent!r}"
                    return Refused(code="unknown", reason=why)
                targets = {req.agent}
            if not targets:
                return Refused(
                    code="unknown", reason=f"no flow named {req.flow!r} is applied or reported by any agent"
                )
        else:
            assert req.agent is not None
            if req.agent not in views:
                return Refused(code="unknown", reason=f"no agent named {req.agent!r} is registered")
            targets = {req.agent}
        revoked = sorted(t for t in targets if t in views and views[t].state == "revoked")
        targets -= set(revoked)
        note = ""
        if spec is not None and req.agent is None and req.op in ("pause", "resume"):
            desired: DesiredState = "paused" if req.op == "pause" else "running"
            await self.flow_store.set_desired(spec.name, desired, req.actor)
            note = f"flow {spec.name} is now desired {desired} (kept across restarts)"
        cmd = AgentCommand(op=req.op, flow=req.flow, timeout=req.timeout, actor=req.actor)
        outcomes: list[FlowOutcome] = []

        async def ask(agent: str) -> None:
            outcomes.extend(await self._ask_agent(agent, cmd))

        # A drain goes upstream first: the capture sides catch up and publish, then the sinks
        # apply everything pending. Other commands go to every agent at once.
        phases = [sorted(targets)]
        if req.op == "drain" and req.flow is not None:
            parts = spec.parts if spec is not None else []
            upstream = {p.agent for p in parts if p.config.get("source")}
            upstream |= {
                n for n, v in views.items() for f in v.flows
                if f.name == req.flow and f.outbox_depth is not None  # it captures: upstream
            }  # fmt: skip
            phases = [sorted(targets & upstream), sorted(targets - upstream)]
        for phase in phases:
            async with anyio.create_task_group() as tg:
                for agent in phase:
                    tg.start_soon(ask, agent)
        outcomes.sort(key=lambda o: (o.agent, o.flow))
        ok = bool(outcomes) and all(o.ok for o in outcomes)
        what = f"{req.op} " + (f"flow {req.flow}" if req.flow else f"agent {req.agent}")
        if req.flow and req.agent:
            what += f" on {req.agent}"
        failed = [f"{o.agent}/{o.flow}: {o.message}" for o in outcomes if not o.ok]
        message = "; ".join(filter(None, [note, *failed]))
        await self._audit_command(req, what, ok, message, outcomes)
        return CommandResult(ok=ok, message=message, outcomes=outcomes)

    async def _ask_agent(self, agent: str, cmd: AgentCommand) -> list[FlowOutcome]:
        subject = command_subject(agent, self.prefix)
        flow = cmd.flow or "*"
        try:
            msg = await self.js.request(subject, encode(cmd), timeout=cmd.timeout + 5)
        except NoResponders:
            why = f"agent {agent} is not connected; it gets the flow's desired state when it comes back"
            return [FlowOutcome(agent=agent, flow=flow, ok=False, state="unknown", message=why)]
        except NoReply:
            why = f"agent {agent} did not answer within {cmd.timeout + 5:g}s"
            return [FlowOutcome(agent=agent, flow=flow, ok=False, state="unknown", message=why)]
        except TransportError as exc:
            why = f"could not reach agent {agent}: {exc}"
            return [FlowOutcome(agent=agent, flow=flow, ok=False, state="unknown", message=why)]
        try:
            result = msgspec.json.decode(msg.data, type=CommandResult)
        except msgspec.DecodeError as exc:
            why = f"agent {agent} answered something unreadable: {exc}"
            return [FlowOutcome(agent=agent, flow=flow, ok=False, state="unknown", message=why)]
        if not result.outcomes:
            only = FlowOutcome(agent=agent, flow=flow, ok=result.ok, state="unknown", message=result.message)
            return [only]
        return list(result.outcomes)

    async def _audit_command(
        self, req: FlowCommand, what: str, ok: bool, message: str, outcomes: list[FlowOutcome]
    ) -> None:
        detail = {
            f"{o.agent}/{o.flow}": f"{'ok' if o.ok else 'failed'}: {o.state}: {o.message}" for o in outcomes
        }
        detail["result"] = "ok" if ok else "failed"
        if self._audit is None:
            return
        try:
            await self._audit.append("command", who=req.actor, target=req.flow or req.agent or "", what=what,
                                     detail=detail)  # fmt: skip
        except TransportError as exc:
            log.error("audit: %s (the command %s was carried out)", exc, what)
            self.metrics.audit_failures.inc()

    async def _audit_policy(
        self, kind: str, who: str, target: str, what: str, detail: dict[str, str]
    ) -> None:
        if self._audit is not None:
            await self._audit.append(kind, who=who, target=target, what=what, detail=detail)

    def _active_agents(self) -> list[str]:
        assert self.builder is not None
        return [v.name for v in self.builder.agents() if v.state == "active"]

    # --- health sweep, gauges, dead-letter depths ----------------------------------------------

    async def _sweep(self, task_status: TaskStatus[None]) -> None:
        assert self.builder is not None
        task_status.started()
        next_dlq = next_reconcile = 0.0
        while True:
            store = self.flow_store
            if self.is_leader and store is not None and anyio.current_time() >= next_reconcile:
                # Repairs drift: a leader that died between a flow write and its assignments.
                # Its inputs are the agent records, the flows and the assignments: when none of
                # them changed since the last complete run there is nothing to repair (a pass over
                # every agent without a yield: ~4% of the loop at 5,000 agents); once a minute anyway.
                next_reconcile = anyio.current_time() + max(5.0, self.settings.sweep_interval)
                inputs = (
                    store.agents_mirror.version("agent"),
                    store.flows_mirror.version(),
                    store.assign_mirror.version(),
                )
                if inputs != self._reconciled or anyio.current_time() >= self._reconcile_anyway:
                    with anyio.move_on_after(5), contextlib.suppress(TransportError):
                        await store.reconcile()
                        self._reconciled = inputs
                        self._reconcile_anyway = anyio.current_time() + 60.0
            if anyio.current_time() >= next_dlq:
                next_dlq = anyio.current_time() + max(2.0, self.settings.sweep_interval)
                with anyio.move_on_after(2):
                    self.dlq_depths = await self._dlq_depths()
                with anyio.move_on_after(2):
                    self.dlq_info = await self._dlq_details(self.dlq_depths)
            began = anyio.current_time()
            await self._observe()
            took = anyio.current_time() - began
            with anyio.move_on_after(self.settings.sweep_interval):
                await self._wake_sweep.wait()
            self._wake_sweep = anyio.Event()
            # Woken by changes (a registration storm): rest at least twice what a sweep took
            # (and 0.25 s), so sweeps never take more than a third of the loop.
            interval = self.settings.sweep_interval
            gap = max(min(0.25, interval), 2 * took) - (anyio.current_time() - began - took)
            if gap > 0:
                await anyio.sleep(min(gap, interval))

    async def _observe(self) -> None:
        """One sweep: health transitions, series, metrics, and the cached ``/status`` report,
        built in steps that let requests and heartbeats be served in between."""
        assert self.builder is not None
        m = self.metrics
        m.nats_connected.set(1 if self.js.is_connected else 0)
        now = time.time()
        views = await cooperatively(self.builder.agents_steps(now))
        for t in self.tracker.update((v.name, v.health, v.reason) for v in views):
            if t.before is None:
                continue
            m.transitions.labels(t.after).inc()
            if self.is_leader:
                level = logging.INFO if t.after == "healthy" else logging.WARNING
                log.log(level, "agent %s: %s -> %s %s", t.name, t.before, t.after, t.reason)
        for h in ("healthy", "degraded", "stale", "lost"):
            m.agents.labels(h).set(sum(1 for v in views if v.health == h))
        m.revoked.set(sum(1 for v in views if v.state == "revoked"))
        specs = self.flow_store.specs() if self.flow_store is not None else None
        grown = await cooperatively(self.series.observe_steps(views))
        self.series.tick()
        for name, g in grown.items():
            applied, failures, retries = self._flow_counter(name)
            applied.inc(g.applied)
            failures.inc(g.failures)
            retries.inc(g.retries)
        m.agent_heartbeat_age.replace(
            {(v.name, v.site): v.last_heartbeat for v in views if v.last_heartbeat is not None}
        )
        flows = await cooperatively(
            flow_views_steps(views, self.dlq_depths, specs, series=self.series, dlq=self.dlq_info, now=now)
        )
        report = self._with_runs(
            self.builder.assemble(self._info(), views, flows, now, self._transactions(), series=self.series)
        )
        if self.http is not None and len(views) > SYNC_REBUILD_AGENTS:
            # encoded, hashed and compressed before it is published: no request pays for it
            await self.encodings.warm(report)
        self._status = (anyio.current_time(), report)
        m.flows.replace(flows)  # the per-flow gauges, computed when scraped
        # Counters: a child per flow from its first sweep on (so it shows 0), dropped when the
        # flow is gone; looked up once per flow, not every sweep.
        names = {f.name for f in flows}
        for gone in self._flow_series - names:
            self._flow_counters.pop(gone, None)
            for counter in (m.flow_applied, m.flow_failures, m.flow_retries):
                with contextlib.suppress(KeyError):
                    counter.remove(gone)
        for new in names - self._flow_series:
            self._flow_counter(new)
        self._flow_series = names

    def _flow_counter(self, flow: str) -> tuple[Any, Any, Any]:
        """The (applied, failures, retries) counter children of ``flow``."""
        children = self._flow_counters.get(flow)
        if children is None:
            m = self.metrics
            children = (
                m.flow_applied.labels(flow),
                m.flow_failures.labels(flow),
                m.flow_retries.labels(flow),
            )
            self._flow_counters[flow] = children
        return children

    async def _dlq_depths(self) -> dict[str, int]:
        """Messages per flow in MESH_DLQ (``dlq.<flow>``); the last known on failure."""
        try:
            info = await self.js.stream_info(DLQ_STREAM, subjects_filter="dlq.>")
        except NotFound:
            return {}
        except TransportError as exc:
            log.debug("dead-letter depths: %s", exc)
            return self.dlq_depths
        return {subject.removeprefix("dlq."): n for subject, n in info.subjects.items()}

    async def _dlq_details(self, depths: dict[str, int]) -> dict[str, DlqInfo]:
        """For each flow with dead letters: when the oldest was stored, and the most frequent
        (error class, reason) among its last 200. Re-read only for flows whose depth changed;
        the last known on failure."""
        out: dict[str, DlqInfo] = {}
        for flow, depth in depths.items():
            if depth <= 0:
                continue
            known = self.dlq_info.get(flow)
            if known is not None and self._dlq_read_depth.get(flow) == depth:
                out[flow] = known
                continue
            subject = f"dlq.{flow}"
            try:
                first = await self.js.get_message(DLQ_STREAM, subject=subject, seq=1)
                last = await self.js.get_message(DLQ_STREAM, subject=subject, last=True)
                if first is None or last is None:
                    continue
                counts: dict[tuple[str, str], int] = {}
                async with await self.js.read_stream(
                    DLQ_STREAM, subject=subject, start_seq=max(first.seq, last.seq - 200)
                ) as reader:
                    for _ in range(200):
                        msg = await reader.next(0.5)
                        if msg is None:
                            break
                        key = (msg.headers.get("Mesh-Error-Class", ""), msg.headers.get("Mesh-Reason", ""))
                        counts[key] = counts.get(key, 0) + 1
                        if msg.seq >= last.seq:
                            break
            except (NotFound, TransportError) as exc:
                log.debug("dead letters of %s: %s", flow, exc)
                if known is not None:
                    out[flow] = known
                continue
            by_class: dict[str, tuple[str, int]] = {}
            for (cls, reason), n in counts.items():
                sample, total = by_class.get(cls, (reason, 0))
                by_class[cls] = (sample, total + n)
            top = sorted(by_class.items(), key=lambda kv: -kv[1][1])[:5]
            out[flow] = DlqInfo(
                oldest_at=first.time.timestamp(),
                top_reasons=[DlqReason(error_class=c or "unknown", reason=r, count=n) for c, (r, n) in top],
            )
            self._dlq_read_depth[flow] = depth
        for flow in set(self._dlq_read_depth) - set(out):  # emptied (purged, replayed): read anew
            del self._dlq_read_depth[flow]
        return out


_SECURITY_OFF = (
    "security is off on this control plane (started without --security-dir / MESH_SECURITY_DIR): "
    "it issues no enrollment tokens or NATS credentials"
)


def _as_caller(req: Request, caller: str) -> Request:
    """``req`` with its ``actor`` (who did it, for the audit trail and the records) set to the
    caller token of its subject: the identity the broker authenticated, not the body's claim."""
    claimed = getattr(req, "actor", None)
    if claimed is None or claimed == caller:
        return req
    if claimed:
        tag = req.__struct_config__.tag
        log.debug("%s request from %s claims actor %r; recorded as %s", tag, caller, claimed, caller)
    return msgspec.structs.replace(req, actor=caller)


async def _main(settings: ControlPlaneSettings) -> None:
    cp = ControlPlane(settings)
    cp.conditions.require("signals")
    notifier = Notifier()

    def stop(signame: str) -> None:
        log.info("%s: stopping control plane %s", signame, settings.name)
        cp.stop()

    try:
        await run_until_signalled(cp.run, stop, cp.conditions, notifier, f"control plane {settings.name}")
    finally:
        notifier.close()
    log.info("control plane %s stopped", settings.name)


GC_THRESHOLDS = (50_000, 10, 10)
"""The cyclic collector's thresholds in a control-plane process. Each sweep over thousands of
agents allocates views that live until the next one, so with Python's default (700, 10, 10) the
collector ran full collections over the whole heap every other sweep (in-process at 5,000
agents: 11 in 20 sweeps, up to 29 ms each, 0.4 s in all); with these, two young collections
of at most 5 ms in 20 sweeps. What is collected is only cyclic garbage: the rest is freed as
soon as it is no longer referenced."""


def run_control_plane_process(settings: ControlPlaneSettings) -> None:
    """Run one replica until SIGTERM/SIGINT (uvloop where available), with
    :data:`GC_THRESHOLDS`."""
    gc.set_threshold(*GC_THRESHOLDS)
    backend_options: dict[str, Any] = {}
    try:
        import uvloop  # noqa: F401

        backend_options["use_uvloop"] = True
    except ImportError:
        pass
    anyio.run(_main, settings, backend="asyncio", backend_options=backend_options)
