"""Prometheus metrics of one agent, on an injected registry with fixed label sets.

Names follow ``mesh_<noun>_<unit>`` and Prometheus conventions (counters end in ``_total``,
durations are seconds), so ``promtool check metrics`` accepts the exposition.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """All metrics an agent exports. Pass a fresh ``CollectorRegistry`` per agent (and per test)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.captured = Counter(
            "mesh_captured_messages", "Changes captured into the outbox", ["flow"], registry=r
        )
        self.published = Counter(
            "mesh_published_messages", "Outbox rows acknowledged by JetStream", ["flow"], registry=r
        )
        self.publish_failures = Counter(
            "mesh_publish_failures", "Publishes without a PubAck (retried)", registry=r
        )
        self.handled = Counter(
            "mesh_consumed_messages",
            "Messages a sink settled, by outcome (applied, unchanged, stale, duplicate, echo, not_owner, "
            "dead_lettered, held: nak'ed to wait for a parent or for children, see a flow's after)",
            ["flow", "outcome"],
            registry=r,
        )
        self.ownership_dropped = Counter(
            "mesh_ownership_dropped_fields",
            "Fields of incoming records dropped because their origin does not own them",
            ["flow", "origin"],
            registry=r,
        )
        self.capture_rejected = Counter(
            "mesh_capture_dead_lettered_messages",
            "Captured changes the flow's to_canonical mapping refused (sent to the dead-letter stream)",
            ["flow"],
            registry=r,
        )
        self.retries = Counter(
            "mesh_retried_messages", "Messages nak'ed for a later retry", ["flow"], registry=r
        )
        self.dead_lettered = Counter(
            "mesh_dead_lettered_messages", "Messages sent to the dead-letter stream",
            ["flow", "error"], registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "mesh_end_to_end_latency_seconds",
            "From capture at the source to durable write at the sink",
            ["flow"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.outbox_depth = Gauge("mesh_outbox_depth_messages", "Envelopes waiting in the outbox", registry=r)
        self.outbox_bytes = Gauge(
            "mesh_outbox_size_bytes", "Bytes of envelopes waiting in the outbox", registry=r
        )
        self.outbox_over_threshold = Gauge(
            "mesh_outbox_over_threshold",
            "1 while the outbox depth or oldest age passes its warning threshold",
            registry=r,
        )
        self.capture_paused = Gauge(
            "mesh_capture_paused",
            "1 while a flow's capture waits because the outbox reached outbox_max_bytes",
            ["flow"],
            registry=r,
        )
        self.outbox_age = Gauge(
            "mesh_outbox_oldest_age_seconds", "Age of the oldest envelope in the outbox", registry=r
        )
        self.consumer_pending = Gauge(
            "mesh_consumer_pending_messages", "Messages the flow's consumer has not yet acked",
            ["flow"], registry=r,
        )  # fmt: skip
        self.actor_restarts = Counter(
            "mesh_actor_restarts", "Actors restarted after a crash", ["actor"], registry=r
        )
        self.api_calls = Counter(
            "mesh_api_calls",
            "System API calls answered, by operation and outcome (ok, replayed, or the error code)",
            ["operation", "outcome"],
            registry=r,
        )
        self.api_call_duration = Histogram(
            "mesh_api_call_duration_seconds",
            "From a System API request's arrival to its reply",
            ["operation"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.trace_records = Counter(
            "mesh_trace_records", "Trace records published, or dropped (buffer full, broker away)",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.nats_connected = Gauge(
            "mesh_nats_connected", "1 while the agent's NATS connection is up", registry=r
        )
