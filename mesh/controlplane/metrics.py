"""Prometheus metrics of one control-plane replica, on an injected registry.

Names follow ``mesh_cp_<noun>_<unit>`` (counters get ``_total`` from the client library; times
are seconds), with fixed label sets, so ``promtool check metrics`` accepts the exposition.
Per-agent and per-flow gauges are computed when scraped from what the last sweep handed over,
so a flow nobody reports any more disappears.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from mesh.controlplane.models import FlowView

__all__ = ["ControlPlaneMetrics", "FlowGauges", "FlowQuantiles", "HeartbeatAges"]


class FlowQuantiles(Collector):
    """Quantiles per flow exposed as a Prometheus *summary* of quantile samples only
    (``name{flow=...,quantile="0.99"}``): ``promtool check metrics`` refuses a ``quantile``
    label on a gauge. The control plane computes them from the agents' histograms."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.values: dict[tuple[str, str], float] = {}
        registry.register(self)

    def set(self, flow: str, quantile: str, value: float) -> None:
        self.values[(flow, quantile)] = value

    def remove(self, flow: str, quantile: str) -> None:
        """Forget one series. Raises KeyError when it is not there (as a gauge's ``remove``)."""
        del self.values[(flow, quantile)]

    def collect(self) -> Iterator[Metric]:
        family = Metric(self.name, self.documentation, "summary")
        for (flow, q), value in sorted(self.values.items()):
            family.add_sample(self.name, {"flow": flow, "quantile": q}, value)
        yield family


_FLOW_GAUGES: tuple[tuple[str, str, Callable[[FlowView], float]], ...] = (
    ("mesh_cp_flow_backlog_messages", "Envelopes of a flow still in agent outboxes", lambda f: f.backlog),
    (
        "mesh_cp_flow_consumer_pending_messages",
        "Messages a flow's sinks have not yet acknowledged",
        lambda f: f.consumer_pending,
    ),
    (
        "mesh_cp_flow_lag_seconds",
        "Age of a flow's oldest envelope still in an outbox",
        lambda f: f.lag_seconds,
    ),
    (
        "mesh_cp_flow_dead_letters_messages",
        "Messages of a flow in the dead-letter stream MESH_DLQ",
        lambda f: f.dlq_depth,
    ),
    (
        "mesh_cp_flow_dead_letters_oldest_age_seconds",
        "Age of a flow's oldest message in MESH_DLQ (0 when none)",
        lambda f: f.dlq_oldest_age_seconds,
    ),
    (
        "mesh_cp_flow_freshness_seconds",
        "Age of the newest change applied for a flow",
        lambda f: f.freshness_seconds or 0.0,
    ),
    (
        "mesh_cp_flow_slo_ratio",
        "Share of a flow's changes applied within its SLO target over the last hour",
        lambda f: 1.0 if f.slo_ratio is None else f.slo_ratio,
    ),
)
_FLOW_LATENCY = (
    "mesh_cp_flow_latency_seconds",
    "End-to-end latency quantiles of a flow over the last minute, from heartbeat histograms",
)


class FlowGauges(Collector):
    """The per-flow gauges (``name{flow=...}``) and latency quantiles (a summary of quantile
    samples, see :class:`FlowQuantiles`) of the flows the last sweep built
    (:meth:`replace`), computed when scraped: a sweep over thousands of flows hands over one
    list instead of setting a labelled child per flow and gauge (11 per flow), and a flow no
    longer listed disappears."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.views: list[FlowView] = []
        registry.register(self)

    def replace(self, views: list[FlowView]) -> None:
        self.views = views

    def collect(self) -> Iterator[Metric]:
        views = sorted(self.views, key=lambda f: f.name)
        for name, documentation, value in _FLOW_GAUGES:
            family = Metric(name, documentation, "gauge")
            for f in views:
                family.add_sample(name, {"flow": f.name}, float(value(f)))
            yield family
        name, documentation = _FLOW_LATENCY
        family = Metric(name, documentation, "summary")
        for f in views:
            for q, v in (("0.5", f.latency_p50_seconds), ("0.99", f.latency_p99_seconds)):
                if v is not None:
                    family.add_sample(name, {"flow": f.name, "quantile": q}, v)
        yield family


class HeartbeatAges(Collector):
    """Per agent the seconds since its last accepted heartbeat, as a gauge
    ``name{agent=...,site=...}`` computed when scraped from the heartbeat times the last sweep
    handed over (:meth:`replace`): a sweep over thousands of agents sets one dict instead of a
    labelled child per agent, and a scrape reads ages as of the scrape."""

    def __init__(
        self,
        name: str,
        documentation: str,
        registry: CollectorRegistry,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.beats: dict[tuple[str, str], float] = {}
        """(agent, site) -> wall-clock time of its last accepted heartbeat."""
        self.clock = clock
        registry.register(self)

    def replace(self, beats: dict[tuple[str, str], float]) -> None:
        """The agents to export from now on (an agent not in ``beats`` disappears)."""
        self.beats = beats

    def collect(self) -> Iterator[Metric]:
        family = Metric(self.name, self.documentation, "gauge")
        now = self.clock()
        for (agent, site), at in sorted(self.beats.items()):
            family.add_sample(self.name, {"agent": agent, "site": site}, max(0.0, now - at))
        yield family


class ControlPlaneMetrics:
    """All metrics a control-plane replica exports. Pass a fresh registry per replica (and test)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.is_leader = Gauge("mesh_cp_leader", "1 while this replica holds the leader lease", registry=r)
        self.leader_changes = Counter(
            "mesh_cp_leader_changes", "Times this replica became or stopped being the leader", registry=r
        )
        self.nats_connected = Gauge(
            "mesh_cp_nats_connected", "1 while this replica's NATS connection is up", registry=r
        )
        self.agents = Gauge(
            "mesh_cp_agents",
            "Registered agents by health (healthy, degraded, stale, lost)",
            ["health"],
            registry=r,
        )
        self.revoked = Gauge("mesh_cp_agents_revoked", "Registered agents that are revoked", registry=r)
        self.transitions = Counter(
            "mesh_cp_health_transitions",
            "Agent health changes seen by this replica, by new state",
            ["health"],
            registry=r,
        )
        self.requests = Counter(
            "mesh_cp_requests",
            "Control-plane requests served, by kind and outcome (ok, refused, error)",
            ["kind", "outcome"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "mesh_cp_request_duration_seconds",
            "Time to serve a control-plane request",
            ["kind"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self._served: dict[tuple[str, str], Any] = {}
        self._durations: dict[str, Any] = {}
        self.audit_failures = Counter(
            "mesh_cp_audit_failures", "Audit entries that could not be stored", registry=r
        )
        self.reconcile_exceptions = Gauge(
            "mesh_reconcile_exceptions",
            "Records the last scheduled reconciliation of a flow found missing, extra or different"
            " (error: 1 when it could not run)",
            ["flow", "kind"],
            registry=r,
        )
        self.agent_heartbeat_age = HeartbeatAges(
            "mesh_cp_agent_heartbeat_age_seconds",
            "Seconds since the agent's last accepted heartbeat",
            registry=r,
        )
        self.flow_applied = Counter(
            "mesh_cp_flow_applied",
            "Changes applied at a flow's sinks, grown in heartbeats this replica saw",
            ["flow"],
            registry=r,
        )
        self.flow_failures = Counter(
            "mesh_cp_flow_failures",
            "Failed attempts of a flow, grown in heartbeats this replica saw",
            ["flow"],
            registry=r,
        )
        self.flow_retries = Counter(
            "mesh_cp_flow_retries",
            "Retries of a flow, grown in heartbeats this replica saw",
            ["flow"],
            registry=r,
        )
        self.flows = FlowGauges(r)
        """The per-flow gauges and latency quantiles, from the views the last sweep built."""

    def served(self, kind: str, outcome: str, seconds: float) -> None:
        """Count one request served (``requests``, ``request_seconds``); the labelled children
        are looked up once per label set (a lookup costs more than the increment)."""
        counter = self._served.get((kind, outcome))
        if counter is None:
            counter = self._served[(kind, outcome)] = self.requests.labels(kind, outcome)
        counter.inc()
        histogram = self._durations.get(kind)
        if histogram is None:
            histogram = self._durations[kind] = self.request_seconds.labels(kind)
        histogram.observe(seconds)
