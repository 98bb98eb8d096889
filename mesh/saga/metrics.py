"""Prometheus metrics of one orchestrator replica, on an injected registry with fixed label sets
(names ``mesh_saga...``, counters end in ``_total``, durations in seconds)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["SagaMetrics"]

_STEP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)


class SagaMetrics:
    """What an orchestrator replica counts. Pass a fresh ``CollectorRegistry`` per replica (and
    per test)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.started = Counter("mesh_sagas_started", "Sagas started from a trigger", ["saga"], registry=r)
        self.finished = Counter(
            "mesh_sagas_finished",
            "Sagas that reached an end state here (completed, compensated, failed)",
            ["saga", "state"],
            registry=r,
        )
        self.steps = Counter(
            "mesh_saga_steps",
            "Step outcomes (attempt, completed, failed, compensated, compensation_failed)",
            ["saga", "event"],
            registry=r,
        )
        self.step_seconds = Histogram(
            "mesh_saga_step_duration_seconds",
            "From a step's first attempt to its completion",
            ["saga"],
            buckets=_STEP_BUCKETS,
            registry=r,
        )
        self.trace_records = Counter(
            "mesh_trace_records", "Trace records (saga_step) published or dropped", ["outcome"], registry=r
        )
        self.running = Gauge("mesh_sagas_running", "Sagas this replica runs now", registry=r)
