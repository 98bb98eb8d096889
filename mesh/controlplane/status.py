"""Build the status views (``agent list``, ``/status``, the dashboard) from a replica's mirror.

Everything here reads memory only (the KV mirror and the last dead-letter depths), so a status
request never waits on NATS: the document is as fresh as the mirror, which trails the leader's
writes by the watcher's delivery time (milliseconds on a healthy broker). Decoded records are
cached by KV revision, so a request over N agents decodes only what changed since the last one.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Mapping
from typing import Any, TypeVar

import anyio
import msgspec

from mesh.controlplane.health import HealthPolicy, assess
from mesh.controlplane.kv import Entry, KvMirror
from mesh.controlplane.models import (
    HEALTH_STATES,
    STATUS_SCHEMA_VERSION,
    AgentRecord,
    AgentView,
    ControlPlaneInfo,
    DlqReason,
    FlowPart,
    FlowReport,
    FlowSpec,
    FlowSpecView,
    FlowView,
    HeartbeatRecord,
    StatusReport,
    SystemView,
)
from mesh.controlplane.series import SeriesStore
from mesh.trace import TransactionsView

__all__ = [
    "CONFIG_FILE",
    "DlqInfo",
    "StatusBuilder",
    "config_file_flows",
    "cooperatively",
    "flow_state",
    "flow_views",
    "flow_views_steps",
    "system_views",
]

CONFIG_FILE = "config file"
"""``FlowSpec.source`` of a flow that agents run from their own config files (generation 0):
not applied through the control plane, known only from the agents' heartbeats."""


class DlqInfo(msgspec.Struct, frozen=True):
    """What the control plane last read of one flow's dead letters in ``MESH_DLQ``."""

    oldest_at: float | None = None
    """Unix time the oldest was stored (None when unknown)."""
    top_reasons: list[DlqReason] = msgspec.field(default_factory=list)


_STEP = 250
"""Items built between two yields of a ``*_steps`` generator (a few ms of work at most)."""
T = TypeVar("T")
Steps = Generator[None, None, T]
"""A computation that yields now and then so an event loop can serve requests in between."""


def _drain(steps: Steps[T]) -> T:
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


async def cooperatively(steps: Steps[T]) -> T:
    """Run ``steps`` to its result on the event loop, letting other tasks run at each of its
    yields (so building ``/status`` over thousands of agents never blocks the loop for long)."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
        await anyio.lowlevel.checkpoint()


_record = msgspec.json.Decoder(AgentRecord)
_heartbeat = msgspec.json.Decoder(HeartbeatRecord)


class StatusBuilder:
    """Turns the ``mesh_agents`` mirror into :class:`AgentView` s and :class:`StatusReport` s."""

    def __init__(
        self, mirror: KvMirror, policy: HealthPolicy, latest: Mapping[str, HeartbeatRecord] | None = None
    ) -> None:
        """``latest``: heartbeats fresher than the mirror's by agent name (the leader's
        :attr:`~mesh.controlplane.registry.Registry.latest`); one of the agent's current
        registration wins over the mirror's when it was received later."""
        self.mirror = mirror
        self.policy = policy
        self.latest: Mapping[str, HeartbeatRecord] = latest if latest is not None else {}
        self._records: dict[str, tuple[int, AgentRecord]] = {}
        self._heartbeats: dict[str, tuple[int, HeartbeatRecord | None]] = {}

    def __repr__(self) -> str:
        return f"<StatusBuilder agents={len(self._records)}>"

    def _decode_record(self, name: str, e: Entry) -> AgentRecord | None:
        cached = self._records.get(name)
        if cached is not None and cached[0] == e.revision:
            return cached[1]
        try:
            rec = _record.decode(e.value)
        except msgspec.DecodeError:
            return None
        self._records[name] = (e.revision, rec)
        return rec

    def _decode_heartbeat(self, name: str, e: Entry | None) -> HeartbeatRecord | None:
        if e is None:
            return None
        cached = self._heartbeats.get(name)
        if cached is not None and cached[0] == e.revision:
            return cached[1]
        try:
            hb: HeartbeatRecord | None = _heartbeat.decode(e.value)
        except msgspec.DecodeError:
            hb = None
        self._heartbeats[name] = (e.revision, hb)
        return hb

    def agents(self, now: float | None = None) -> list[AgentView]:
        """Every registered agent with its health, sorted by name."""
        return _drain(self.agents_steps(now))

    def agents_steps(self, now: float | None = None) -> Steps[list[AgentView]]:
        """:meth:`agents` as steps (see :func:`cooperatively`); the agents are those of the
        mirror when it starts."""
        now = time.time() if now is None else now
        records = self.mirror.with_prefix("agent.")
        beats = self.mirror.with_prefix("heartbeat.")
        latest = self.latest
        for gone in set(self._records) - set(records):
            del self._records[gone]
        for gone in set(self._heartbeats) - set(beats):
            del self._heartbeats[gone]
        views = []
        for i, name in enumerate(sorted(records), 1):
            if i % _STEP == 0:
                yield
            rec = self._decode_record(name, records[name])
            if rec is None:
                continue
            hb = self._decode_heartbeat(name, beats.get(name))
            if hb is not None and hb.agent_id != rec.agent_id:
                hb = None
            mine = latest.get(name)
            if (
                mine is not None
                and mine.agent_id == rec.agent_id
                and (hb is None or mine.received_at > hb.received_at)
            ):
                hb = mine
            verdict = assess(rec, hb, now, self.policy)
            p = hb.payload if hb is not None else None
            views.append(
                AgentView(
                    name=rec.name,
                    agent_id=rec.agent_id,
                    site=rec.site,
                    host=rec.host,
                    version=hb.version if hb is not None else rec.version,
                    state=rec.state,
                    health=verdict.health,
                    reason=verdict.reason
                    if rec.state == "active"
                    else f"revoked; {verdict.reason}".rstrip("; "),
                    registered_at=rec.registered_at,
                    last_heartbeat=hb.received_at if hb is not None else None,
                    heartbeat_age_seconds=round(verdict.age, 3) if hb is not None else None,
                    reported_health=p.health if p is not None else None,
                    outbox_depth=p.outbox_depth if p is not None else 0,
                    outbox_age_seconds=p.outbox_age_seconds if p is not None else 0.0,
                    errors=p.errors if p is not None else 0,
                    flows=list(p.flows) if p is not None else [],
                    manifest=rec.manifest,
                )
            )
        return views

    def report(
        self,
        info: ControlPlaneInfo,
        dlq_depths: Mapping[str, int],
        now: float | None = None,
        specs: Mapping[str, FlowSpec] | None = None,
        transactions: TransactionsView | None = None,
        *,
        series: SeriesStore | None = None,
        dlq: Mapping[str, DlqInfo] | None = None,
    ) -> StatusReport:
        """The whole ``/status`` document (KPI rates, quantiles and SLO ratios from ``series``,
        dead-letter ages and reasons from ``dlq``, when given)."""
        now = time.time() if now is None else now
        agents = self.agents(now)
        flows = flow_views(agents, dlq_depths, specs, series=series, dlq=dlq, now=now)
        return self.assemble(info, agents, flows, now, transactions, series=series)

    def assemble(
        self,
        info: ControlPlaneInfo,
        agents: list[AgentView],
        flows: list[FlowView],
        now: float,
        transactions: TransactionsView | None = None,
        *,
        series: SeriesStore | None = None,
    ) -> StatusReport:
        """The ``/status`` document from views already built (by :meth:`agents_steps` and
        :func:`flow_views_steps`)."""
        counts: dict[str, int] = dict.fromkeys(HEALTH_STATES, 0)
        for a in agents:
            counts[a.health] += 1
        return StatusReport(
            schema_version=STATUS_SCHEMA_VERSION,
            generated_at=now,
            control_plane=info,
            agents=agents,
            flows=flows,
            counts=counts,
            transactions=transactions,
            systems=system_views(agents, series),
        )


def flow_state(states: list[str]) -> str:
    """One state for a flow from what its fresh agents report (worst first)."""
    if not states:
        return "unknown"
    for s in ("failing", "stopped", "paused", "draining"):
        if s in states:
            return s
    return "running"


def flow_views(
    agents: list[AgentView],
    dlq_depths: Mapping[str, int],
    specs: Mapping[str, FlowSpec] | None = None,
    *,
    series: SeriesStore | None = None,
    dlq: Mapping[str, DlqInfo] | None = None,
    now: float | None = None,
) -> list[FlowView]:
    """See :func:`flow_views_steps` (the same, at once)."""
    return _drain(flow_views_steps(agents, dlq_depths, specs, series=series, dlq=dlq, now=now))


def flow_views_steps(
    agents: list[AgentView],
    dlq_depths: Mapping[str, int],
    specs: Mapping[str, FlowSpec] | None = None,
    *,
    series: SeriesStore | None = None,
    dlq: Mapping[str, DlqInfo] | None = None,
    now: float | None = None,
) -> Steps[list[FlowView]]:
    """Aggregate the flows agents report (fresh or not), those applied (``specs``) and those
    with dead letters. An applied flow no fresh agent reports yet is ``pending``. Cumulative
    KPIs are sums over the reporting agents; rates, quantiles and the SLO ratio come from
    ``series`` (absent: zero or None)."""
    specs = specs or {}
    dlq = dlq or {}
    now = time.time() if now is None else now
    # One pass over the reports, grouped by flow: a scan of every report per flow is quadratic,
    # and this runs on every /status and every sweep (bin/bench-cp: 48 ms a call at 1000 agents).
    by_flow: dict[str, list[tuple[AgentView, FlowReport]]] = {}
    for a in agents:
        for f in a.flows:
            by_flow.setdefault(f.name, []).append((a, f))
    names = set(by_flow) | set(dlq_depths) | set(specs)
    views = []
    for i, name in enumerate(sorted(names), 1):
        if i % _STEP == 0:
            yield
        reporting = by_flow.get(name, [])
        fresh = [f.state for a, f in reporting if a.health in ("healthy", "degraded") and a.state == "active"]
        spec = specs.get(name)
        state = flow_state(fresh)
        if spec is not None and state == "unknown":
            state = "pending"
        views.append(
            FlowView(
                name=name,
                state=state,
                agents=sorted(
                    {a.name for a, _ in reporting} | {p.agent for p in spec.parts}
                    if spec
                    else {a.name for a, _ in reporting}
                ),
                backlog=sum(f.outbox_depth or 0 for _, f in reporting),
                consumer_pending=sum(f.consumer_pending or 0 for _, f in reporting),
                lag_seconds=max((f.outbox_age_seconds or 0.0 for _, f in reporting), default=0.0),
                dlq_depth=int(dlq_depths.get(name, 0)),
                errors=sum(f.errors for _, f in reporting),
                dead_lettered=sum(f.dead_lettered for _, f in reporting),
                desired=spec.desired if spec else "",
                generation=spec.generation if spec else 0,
                **_kpis(name, reporting, series, dlq.get(name), now),
            )
        )
    return views


def _kpis(
    name: str,
    reporting: list[tuple[AgentView, FlowReport]],
    series: SeriesStore | None,
    dlq: DlqInfo | None,
    now: float,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    failures: dict[str, int] = {}
    applied = captured = duplicates = not_owner = retries = 0
    freshness: float | None = None
    slo: float | None = None
    for a, f in reporting:
        k = f.kpis
        if k is None:
            continue
        applied += k.applied
        captured += k.captured
        duplicates += k.duplicates
        not_owner += k.not_owner
        retries += k.retries
        for cls, n in k.failures.items():
            failures[cls] = failures.get(cls, 0) + n
        if k.freshness_seconds is not None:
            age = k.freshness_seconds + max(0.0, now - (a.last_heartbeat or now))
            freshness = age if freshness is None else min(freshness, age)
        if f.consumer_pending is not None or k.slo_total:
            slo = k.slo_seconds if slo is None else max(slo, k.slo_seconds)
    out.update(
        applied=applied, captured=captured, duplicates=duplicates, not_owner=not_owner,
        retries=retries, failures=failures, freshness_seconds=_r(freshness), slo_seconds=slo,
    )  # fmt: skip
    if series is not None:
        p50, p99 = series.latency(name)
        total, on_time = series.slo(name)
        out.update(
            applied_per_second=_r(series.rate(name, "applied")),
            captured_per_second=_r(series.rate(name, "captured")),
            failures_per_second=_r(series.rate(name, "failures")),
            retries_per_second=_r(series.rate(name, "retries")),
            latency_p50_seconds=_r(p50, 6), latency_p99_seconds=_r(p99, 6),
            slo_ratio=_r(on_time / total, 6) if total else None,
        )  # fmt: skip
    if dlq is not None:
        if dlq.oldest_at is not None:
            out["dlq_oldest_age_seconds"] = round(max(0.0, now - dlq.oldest_at), 3)
        out["dlq_top_reasons"] = list(dlq.top_reasons)
    return out


def _r(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


_WORST = ("lost", "stale", "degraded", "healthy")


def system_views(agents: list[AgentView], series: SeriesStore | None = None) -> list[SystemView]:
    """KPIs per system: the agents fronting it (by their manifest's ``system``), their worst
    health, the flows they run, rates into and out of it, and the backlog captured from it."""
    by_system: dict[str, list[AgentView]] = {}
    for a in agents:
        if a.manifest.system:
            by_system.setdefault(a.manifest.system, []).append(a)
    sinks: dict[str, int] = {}
    sources: dict[str, int] = {}
    every: dict[str, int] = {}
    for a in agents:
        for f in a.flows:
            every[f.name] = every.get(f.name, 0) + 1
            if f.consumer_pending is not None:
                sinks[f.name] = sinks.get(f.name, 0) + 1
            if f.outbox_depth is not None:
                sources[f.name] = sources.get(f.name, 0) + 1
    views = []
    for name in sorted(by_system):
        members = by_system[name]
        healths = {a.health for a in members}
        applied = captured = failures = 0.0
        flows = sorted({f.name for a in members for f in a.flows})
        if series is not None:
            for a in members:
                for f in a.flows:
                    # split a flow's rate by side: sinks apply into the system, sources capture
                    if f.consumer_pending is not None:
                        applied += series.rate(f.name, "applied") / sinks.get(f.name, 1)
                    if f.outbox_depth is not None:
                        captured += series.rate(f.name, "captured") / sources.get(f.name, 1)
                    failures += series.rate(f.name, "failures") / every.get(f.name, 1)
        views.append(
            SystemView(
                name=name,
                agents=sorted(a.name for a in members),
                sites=sorted({a.site for a in members}),
                health=next((h for h in _WORST if h in healths), "healthy"),
                flows=flows,
                applied_per_second=round(applied, 3),
                captured_per_second=round(captured, 3),
                failures_per_second=round(failures, 3),
                backlog=sum(f.outbox_depth or 0 for a in members for f in a.flows),
            )
        )
    return views


def config_file_flows(agents: list[AgentView], applied: Mapping[str, FlowSpec]) -> list[FlowSpecView]:
    """The flows agents run from their own config files (reported with generation 0) and that
    are not applied, as :class:`FlowSpecView` s with ``spec.source`` = :data:`CONFIG_FILE`,
    ``spec.generation`` 0 and one part per reporting agent (``config``: the flow's name and the
    sides that agent runs, as its manifest says). State as in :func:`flow_views` (``unknown``
    while no reporting agent is fresh). Sorted by name."""
    by_flow: dict[str, list[tuple[AgentView, FlowReport]]] = {}
    for a in agents:
        for f in a.flows:
            if f.generation == 0 and f.name not in applied:
                by_flow.setdefault(f.name, []).append((a, f))
    out = []
    for name, reporting in sorted(by_flow.items()):
        fresh = [f.state for a, f in reporting if a.health in ("healthy", "degraded") and a.state == "active"]
        parts = []
        for a, _ in sorted(reporting, key=lambda r: r[0].name):
            sides = [s for s, runs in (("source", a.manifest.sources), ("sink", a.manifest.sinks))
                     if name in runs]  # fmt: skip
            parts.append(FlowPart(agent=a.name, config={"name": name, "sides": sides}))
        spec = FlowSpec(name=name, entity="", parts=parts, generation=0, source=CONFIG_FILE)
        reports = [msgspec.structs.replace(f, name=a.name) for a, f in reporting]
        out.append(FlowSpecView(spec=spec, state=flow_state(fresh), reports=reports))
    return out
