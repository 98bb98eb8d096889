"""Prometheus metrics of one agent, on an injected registry with fixed label sets.

Names follow ``mesh_<noun>_<unit>`` and Prometheus conventions (counters end in ``_total``,
durations are seconds), so ``promtool check metrics`` accepts the exposition.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mesh.errors import (
    DecodeError,
    InvalidEnvelope,
    MappingError,
    PermanentError,
    RejectedRecord,
    RetryableError,
)

__all__ = ["DEFAULT_SLO_SECONDS", "LATENCY_BUCKETS", "Metrics", "error_class_of"]

LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
    0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
)  # fmt: skip
"""Upper bounds (seconds) of the end-to-end latency histogram, fine enough to read a 5 ms p99.
Fixed: heartbeats carry the cumulative count per bound (plus +Inf) in this order."""

DEFAULT_SLO_SECONDS = 5.0
"""A flow's default SLO target: a change counts as on time when applied within it."""


def error_class_of(exc: BaseException) -> str:
    """The ``error_class`` label of a failure: ``transient`` (retryable: the system or NATS was
    unavailable), ``integrity`` (undecodable or inconsistent envelope), ``mapping``,
    ``rejected`` (the target system refused the record), ``permanent`` (other permanent
    errors) or ``other`` (an exception the adapter did not classify)."""
    if isinstance(exc, RetryableError):
        return "transient"
    if isinstance(exc, DecodeError | InvalidEnvelope):
        return "integrity"
    if isinstance(exc, MappingError):
        return "mapping"
    if isinstance(exc, RejectedRecord):
        return "rejected"
    if isinstance(exc, PermanentError):
        return "permanent"
    return "other"


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
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.failures = Counter(
            "mesh_failures",
            "Failed apply or publish attempts, by error class (transient, integrity, mapping, "
            "rejected, permanent, other)",
            ["flow", "error_class"],
            registry=r,
        )
        self.freshness = Gauge(
            "mesh_flow_freshness_seconds",
            "Age of the newest change applied at the sink (now minus its capture time); 0 before any",
            ["flow"],
            registry=r,
        )
        self.slo_target = Gauge(
            "mesh_slo_target_seconds", "The flow's SLO target (slo_seconds)", ["flow"], registry=r
        )
        self.slo_changes = Counter(
            "mesh_slo_changes", "Changes applied at the sink (SLO denominator)", ["flow"], registry=r
        )
        self.slo_on_time = Counter(
            "mesh_slo_changes_on_time",
            "Changes applied within the flow's SLO target from capture",
            ["flow"],
            registry=r,
        )
        self.flow_outbox_depth = Gauge(
            "mesh_flow_outbox_depth_messages", "Envelopes of the flow waiting in the outbox",
            ["flow"], registry=r,
        )  # fmt: skip
        self.flow_outbox_age = Gauge(
            "mesh_flow_outbox_oldest_age_seconds", "Age of the flow's oldest envelope in the outbox",
            ["flow"], registry=r,
        )  # fmt: skip
        self.newest_applied: dict[str, float] = {}
        """Per flow: capture time (Unix seconds) of the newest change applied."""
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
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.trace_records = Counter(
            "mesh_trace_records", "Trace records published, or dropped (buffer full, broker away)",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.nats_connected = Gauge(
            "mesh_nats_connected", "1 while the agent's NATS connection is up", registry=r
        )

    def track_flow(self, flow: str, slo_seconds: float = DEFAULT_SLO_SECONDS) -> None:
        """Create the flow's KPI series at zero (so rates exist before the first change) and set
        its SLO target. Idempotent."""
        self.slo_target.labels(flow).set(slo_seconds)
        self.slo_changes.labels(flow)
        self.slo_on_time.labels(flow)
        self.latency.labels(flow)
        self.freshness.labels(flow).set_function(lambda: self.freshness_of(flow))

    def freshness_of(self, flow: str, now: float | None = None) -> float:
        """Seconds since the capture of the newest change applied for ``flow``; 0 before any."""
        newest = self.newest_applied.get(flow)
        if newest is None:
            return 0.0
        return max(0.0, (time.time() if now is None else now) - newest)

    def applied(self, flow: str, occurred_at: float, latency: float, slo_seconds: float) -> None:
        """Record one change applied at the sink: latency histogram, SLO counters, freshness.
        ``occurred_at`` is its capture time (Unix seconds), ``latency`` capture to effect."""
        self.latency.labels(flow).observe(latency)
        self.slo_changes.labels(flow).inc()
        if latency <= slo_seconds:
            self.slo_on_time.labels(flow).inc()
        if occurred_at > self.newest_applied.get(flow, 0.0):
            self.newest_applied[flow] = occurred_at

    def applied_many(
        self, flow: str, newest_occurred_at: float, latencies: Sequence[float], slo_seconds: float
    ) -> None:
        """:meth:`applied` for the changes of one batch at once (the same samples): ``latencies``
        one per change (seconds, capture to effect), ``newest_occurred_at`` the newest capture
        time among them (Unix seconds). Each series is looked up once per batch, not per change."""
        if not latencies:
            return
        _observe_many(self.latency.labels(flow), latencies)
        self.slo_changes.labels(flow).inc(len(latencies))
        on_time = sum(1 for latency in latencies if latency <= slo_seconds)
        if on_time:
            self.slo_on_time.labels(flow).inc(on_time)
        if newest_occurred_at > self.newest_applied.get(flow, 0.0):
            self.newest_applied[flow] = newest_occurred_at

    def failed(self, flow: str, exc: BaseException) -> None:
        """Count one failed attempt of ``flow`` by :func:`error_class_of`."""
        self.failures.labels(flow, error_class_of(exc)).inc()


def _observe_many(histogram: Any, values: Sequence[float]) -> None:
    """``histogram.observe(v)`` for every ``v`` (a labelled prometheus_client Histogram child):
    each bucket and the sum are added to once, with the counts ``observe`` would have added one
    by one (a value goes to the first bucket whose upper bound is >= it). Falls back to
    ``observe`` per value if the client's histogram is not as expected."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if not isinstance(bounds, list) or not isinstance(buckets, list) or len(bounds) != len(buckets):
        bounds = None
    if bounds is None or buckets is None or total is None:
        for value in values:
            histogram.observe(value)
        return
    histogram._raise_if_not_observable()
    counts = [0] * len(bounds)
    where = bisect.bisect_left
    for value in values:
        counts[where(bounds, value)] += 1
    total.inc(sum(values))
    for bucket, n in zip(buckets, counts, strict=True):
        if n:
            bucket.inc(n)
