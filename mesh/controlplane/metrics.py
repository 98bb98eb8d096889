"""Prometheus metrics of one control-plane replica, on an injected registry.

Names follow ``mesh_cp_<noun>_<unit>`` (counters get ``_total`` from the client library; times
are seconds), with fixed label sets, so ``promtool check metrics`` accepts the exposition.
Per-flow gauges are rebuilt on every sweep, so a flow nobody reports any more disappears.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

__all__ = ["ControlPlaneMetrics", "FlowQuantiles"]


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
        self.audit_failures = Counter(
            "mesh_cp_audit_failures", "Audit entries that could not be stored", registry=r
        )
        self.flow_backlog = Gauge(
            "mesh_cp_flow_backlog_messages",
            "Envelopes of a flow still in agent outboxes",
            ["flow"],
            registry=r,
        )
        self.flow_pending = Gauge(
            "mesh_cp_flow_consumer_pending_messages",
            "Messages a flow's sinks have not yet acknowledged",
            ["flow"],
            registry=r,
        )
        self.flow_lag = Gauge(
            "mesh_cp_flow_lag_seconds",
            "Age of a flow's oldest envelope still in an outbox",
            ["flow"],
            registry=r,
        )
        self.reconcile_exceptions = Gauge(
            "mesh_reconcile_exceptions",
            "Records the last scheduled reconciliation of a flow found missing, extra or different"
            " (error: 1 when it could not run)",
            ["flow", "kind"],
            registry=r,
        )
        self.flow_dlq = Gauge(
            "mesh_cp_flow_dead_letters_messages",
            "Messages of a flow in the dead-letter stream MESH_DLQ",
            ["flow"],
            registry=r,
        )
        self.flow_dlq_age = Gauge(
            "mesh_cp_flow_dead_letters_oldest_age_seconds",
            "Age of a flow's oldest message in MESH_DLQ (0 when none)",
            ["flow"],
            registry=r,
        )
        self.agent_heartbeat_age = Gauge(
            "mesh_cp_agent_heartbeat_age_seconds",
            "Seconds since the agent's last accepted heartbeat",
            ["agent", "site"],
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
        self.flow_latency = FlowQuantiles(
            "mesh_cp_flow_latency_seconds",
            "End-to-end latency quantiles of a flow over the last minute, from heartbeat histograms",
            registry=r,
        )
        self.flow_freshness = Gauge(
            "mesh_cp_flow_freshness_seconds",
            "Age of the newest change applied for a flow",
            ["flow"],
            registry=r,
        )
        self.flow_slo_ratio = Gauge(
            "mesh_cp_flow_slo_ratio",
            "Share of a flow's changes applied within its SLO target over the last hour",
            ["flow"],
            registry=r,
        )
