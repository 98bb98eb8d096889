"""Per-flow time series kept in a control-plane replica's memory, recorded from heartbeats.

Every replica mirrors the ``mesh_agents`` bucket (``heartbeat.<agent>`` keys included), so every
replica records the same series from the heartbeats it sees, and whichever one serves the
dashboard has them; no external database is needed. Heartbeats carry cumulative counters
(:class:`~mesh.controlplane.models.FlowKpis`); :meth:`SeriesStore.observe` takes the growth
since the previous heartbeat of the same agent (a counter that shrinks means the agent
restarted: its new value is the growth) and :meth:`SeriesStore.tick` closes one point per flow.

Guarantees:

* **Bounded memory**: per flow a ring buffer of ``capacity`` points (default one hour at 5 s
  resolution: 720) stored as doubles in one preallocated array (~75 KB), at most ``max_flows``
  flows (the least recently reported is dropped), and latency buckets kept for the last
  ``window`` seconds only.
* Rates, quantiles and SLO sums are summarised once per tick, so ``/status`` over many flows
  costs no more than without the series.
* Points are at least ``resolution`` seconds apart; rates are per second over the point's span.
* Quantiles come from the summed bucket counts by linear interpolation inside the bucket, as
  Prometheus' ``histogram_quantile`` does (so they agree with Grafana on the agents' metrics).
"""

from __future__ import annotations

import math
import time
from array import array
from collections import deque
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import astuple, dataclass, field

from mesh.controlplane.models import AgentView, FlowKpis
from mesh.metrics import LATENCY_BUCKETS

__all__ = ["FlowTotals", "Point", "SeriesStore", "quantile"]

_STEP = 250
"""Agents :meth:`SeriesStore.observe_steps` takes between two yields (a few ms at most)."""


def quantile(q: float, counts: Sequence[int], bounds: Sequence[float] = LATENCY_BUCKETS) -> float | None:
    """The ``q`` quantile (0..1) of a histogram given as per-bucket (not cumulative) counts,
    one per bound then +Inf. None when empty. In the +Inf bucket: the highest finite bound."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
    lower = 0.0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i >= len(bounds):
                return float(bounds[-1])
            upper = float(bounds[i])
            return lower + (upper - lower) * max(0.0, rank - seen) / n
        seen += n
        lower = float(bounds[i]) if i < len(bounds) else lower
    return float(bounds[-1])


@dataclass(slots=True)
class Point:
    """One point of a flow's series: rates per second over ``span`` seconds ending at ``t``."""

    t: float
    span: float
    applied: float
    """Changes applied per second."""
    captured: float
    published: float
    failures: float
    """Failed attempts per second (every error class)."""
    retries: float
    dead_lettered: float
    p50: float | None
    """Latency quantiles (seconds) of the changes applied in this point; None without any."""
    p99: float | None
    backlog: int
    """Outbox depth plus consumer pending (messages) at ``t``."""
    slo_total: int = 0
    slo_on_time: int = 0


_NAN = float("nan")
_NF = 13  # fields of a Point


class _Ring:
    """A fixed-capacity ring of :class:`Point` s stored as doubles (``capacity`` x 13 x 8 bytes,
    allocated once): about 75 KB per flow for an hour at 5 s, instead of ~0.3 MB as objects."""

    __slots__ = ("capacity", "data", "size", "start")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.data = array("d", bytes(8 * capacity * _NF))
        self.start = 0
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def append(self, p: Point) -> None:
        if self.size < self.capacity:
            i = (self.start + self.size) % self.capacity
            self.size += 1
        else:
            i = self.start
            self.start = (self.start + 1) % self.capacity
        values = [(_NAN if v is None else float(v)) for v in astuple(p)]
        self.data[i * _NF : (i + 1) * _NF] = array("d", values)

    def __iter__(self) -> Iterator[Point]:
        d = self.data
        for n in range(self.size):
            i = ((self.start + n) % self.capacity) * _NF
            v = d[i : i + _NF]
            yield Point(
                t=v[0], span=v[1], applied=v[2], captured=v[3], published=v[4], failures=v[5],
                retries=v[6], dead_lettered=v[7], p50=None if math.isnan(v[8]) else v[8],
                p99=None if math.isnan(v[9]) else v[9], backlog=int(v[10]), slo_total=int(v[11]),
                slo_on_time=int(v[12]),
            )  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Summary:
    rates: dict[str, float]
    p50: float | None
    p99: float | None
    slo_total: int
    slo_on_time: int


@dataclass(slots=True)
class FlowTotals:
    """What one flow accumulated between two ticks (sums of per-agent deltas)."""

    captured: int = 0
    published: int = 0
    applied: int = 0
    failures: int = 0
    retries: int = 0
    dead_lettered: int = 0
    slo_total: int = 0
    slo_on_time: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))


def _per_bucket(cumulative: Sequence[int]) -> list[int] | None:
    """Per-bucket counts from cumulative ones; None unless one count per bound plus +Inf."""
    if len(cumulative) != len(LATENCY_BUCKETS) + 1:
        return None
    return [c - (cumulative[i - 1] if i else 0) for i, c in enumerate(cumulative)]


def _delta(new: int, old: int | None) -> int:
    if old is None:
        return 0  # first sight of this agent: its history predates our series
    return new - old if new >= old else new  # shrank: the agent restarted


_COUNTS = ("captured", "published", "applied", "retries", "dead_lettered", "slo_total", "slo_on_time")


class SeriesStore:
    """Ring buffers of :class:`Point` per flow (see the module docstring)."""

    def __init__(
        self,
        *,
        resolution: float = 5.0,
        capacity: int = 720,
        max_flows: int = 200,
        window: float = 60.0,
    ) -> None:
        if resolution <= 0 or capacity < 1 or max_flows < 1:
            raise ValueError("resolution, capacity and max_flows must be positive")
        self.resolution = resolution
        self.capacity = capacity
        self.max_flows = max_flows
        self.window = window
        self.series: dict[str, _Ring] = {}
        self._pending: dict[str, FlowTotals] = {}
        self._last: dict[tuple[str, str], tuple[float, FlowKpis]] = {}
        """(agent_id, flow) -> (received_at, kpis) of the last heartbeat taken."""
        self._recent: dict[str, deque[tuple[float, float, FlowTotals]]] = {}
        """Per flow: the closed totals of the last ``window`` seconds (for quantiles, SLO)."""
        self._summary: dict[str, _Summary] = {}
        self._backlog: dict[str, int] = {}
        self._last_tick: float | None = None
        self._seen_at: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"<SeriesStore flows={len(self.series)} every {self.resolution:g}s x{self.capacity}>"

    def observe(self, agents: Iterable[AgentView], now: float | None = None) -> dict[str, FlowTotals]:
        """Take the growth of every flow's counters from heartbeats not seen before (an agent's
        heartbeat is new when its ``last_heartbeat`` changed), and the current backlogs.
        Returns the growth taken now, per flow (for monotonic counters)."""
        steps = self.observe_steps(agents, now)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def observe_steps(
        self, agents: Iterable[AgentView], now: float | None = None
    ) -> Generator[None, None, dict[str, FlowTotals]]:
        """:meth:`observe` in steps: yields every :data:`_STEP` agents so an event loop can
        serve in between (see :func:`mesh.controlplane.status.cooperatively`). The backlogs and
        the agents forgotten are those of the whole pass, applied at its end; readers in between
        see the growth taken so far, which :meth:`tick` closes as usual. Do not run two at once."""
        grown: dict[str, FlowTotals] = {}
        now = time.time() if now is None else now
        backlog: dict[str, int] = {}
        listed: set[tuple[str, str]] = set()
        for i, a in enumerate(agents, 1):
            if i % _STEP == 0:
                yield
            for f in a.flows:
                listed.add((a.agent_id, f.name))
                backlog[f.name] = backlog.get(f.name, 0) + (f.outbox_depth or 0) + (f.consumer_pending or 0)
                self._seen_at[f.name] = now
                k = f.kpis
                if k is None or a.last_heartbeat is None:
                    continue
                key = (a.agent_id, f.name)
                prev = self._last.get(key)
                if prev is not None and prev[0] == a.last_heartbeat:
                    continue
                self._last[key] = (a.last_heartbeat, k)
                old = prev[1] if prev is not None else None
                tot = self._pending.setdefault(f.name, FlowTotals())
                now_grown = grown.setdefault(f.name, FlowTotals())
                for name in _COUNTS:
                    d = _delta(getattr(k, name), getattr(old, name) if old is not None else None)
                    setattr(tot, name, getattr(tot, name) + d)
                    setattr(now_grown, name, getattr(now_grown, name) + d)
                for cls, n in k.failures.items():
                    d = _delta(n, old.failures.get(cls, 0) if old is not None else None)
                    tot.failures += d
                    now_grown.failures += d
                new_b = _per_bucket(k.latency_buckets)
                old_b = _per_bucket(old.latency_buckets) if old is not None else None
                if new_b is not None and old is not None:
                    restarted = old_b is not None and sum(new_b) < sum(old_b)
                    for i, n in enumerate(new_b):
                        tot.buckets[i] += n if old_b is None or restarted else max(0, n - old_b[i])
        self._backlog = backlog
        # forget agents no longer listed
        for key in set(self._last) - listed:
            del self._last[key]
        return grown

    def tick(self, now: float | None = None) -> bool:
        """Close one point per known flow when ``resolution`` seconds passed since the last.
        Returns whether it did."""
        now = time.time() if now is None else now
        if self._last_tick is None:
            self._last_tick = now
            self._pending.clear()  # growth before the first tick has no span to divide by
            return False
        span = now - self._last_tick
        if span < self.resolution:
            return False
        self._last_tick = now
        horizon = self.capacity * self.resolution
        for name in list(self._seen_at):
            if now - self._seen_at[name] > horizon:
                self._drop(name)
        flows = set(self._seen_at)
        if len(flows) > self.max_flows:
            # The least recently seen go, found with one sort (a min() per dropped flow was
            # quadratic: a third of the control plane's CPU at 5,000 flows).
            by_age = sorted(flows, key=self._seen_at.__getitem__)
            for oldest in by_age[: len(flows) - self.max_flows]:
                flows.discard(oldest)
                self._drop(oldest)
        for name in flows:
            tot = self._pending.pop(name, None) or FlowTotals()
            per_bucket = tot.buckets
            recent = self._recent.setdefault(name, deque())
            recent.append((now, span, tot))
            while recent and now - recent[0][0] > self.window:
                recent.popleft()
            ring = self.series.get(name)
            if ring is None:
                ring = self.series[name] = _Ring(self.capacity)
            ring.append(
                Point(
                    t=now, span=span,
                    applied=tot.applied / span, captured=tot.captured / span,
                    published=tot.published / span, failures=tot.failures / span,
                    retries=tot.retries / span, dead_lettered=tot.dead_lettered / span,
                    p50=quantile(0.5, per_bucket), p99=quantile(0.99, per_bucket),
                    backlog=self._backlog.get(name, 0),
                    slo_total=tot.slo_total, slo_on_time=tot.slo_on_time,
                )
            )  # fmt: skip
            self._summarise(name, recent, ring)
        return True

    def _summarise(self, name: str, recent: deque[tuple[float, float, FlowTotals]], ring: _Ring) -> None:
        """Rates and quantiles over the window, SLO sums over the ring: computed once a tick, so
        a status request (or a sweep) over many flows reads them in O(1)."""
        span = sum(sp for _, sp, _ in recent) or 1.0
        counts = [0] * (len(LATENCY_BUCKETS) + 1)
        sums = FlowTotals()
        for _, _, tot in recent:
            for i, n in enumerate(tot.buckets):
                counts[i] += n
            for field_name in ("applied", "captured", "published", "failures", "retries", "dead_lettered"):
                setattr(sums, field_name, getattr(sums, field_name) + getattr(tot, field_name))
        d = ring.data  # unused slots are zeros: the sums need no bounds
        self._summary[name] = _Summary(
            rates={k: getattr(sums, k) / span for k in ("applied", "captured", "published", "failures",
                                                         "retries", "dead_lettered")},
            p50=quantile(0.5, counts), p99=quantile(0.99, counts),
            slo_total=int(sum(d[11::_NF])), slo_on_time=int(sum(d[12::_NF])),
        )  # fmt: skip

    def _drop(self, name: str) -> None:
        self._seen_at.pop(name, None)
        self.series.pop(name, None)
        self._recent.pop(name, None)
        self._summary.pop(name, None)
        self._pending.pop(name, None)

    def flows(self) -> list[str]:
        return sorted(self.series)

    def points(self, flow: str, minutes: float = 60.0, now: float | None = None) -> list[Point]:
        """The flow's points of the last ``minutes`` (oldest first); [] for an unknown flow."""
        now = time.time() if now is None else now
        since = now - minutes * 60
        return [p for p in self.series.get(flow, ()) if p.t >= since]

    def latency(self, flow: str) -> tuple[float | None, float | None]:
        """p50 and p99 (seconds) of the changes applied over the last ``window`` seconds (as of
        the last tick)."""
        summary = self._summary.get(flow)
        return (summary.p50, summary.p99) if summary is not None else (None, None)

    def rate(self, flow: str, what: str = "applied") -> float:
        """Per-second rate of a counter (``applied``, ``captured``, ``published``, ``failures``,
        ``retries``, ``dead_lettered``) over the last ``window`` seconds (as of the last tick)."""
        summary = self._summary.get(flow)
        return summary.rates[what] if summary is not None else 0.0

    def slo(self, flow: str) -> tuple[int, int]:
        """(changes applied, of them on time) over the series (one hour at the control plane's
        capacity)."""
        summary = self._summary.get(flow)
        return (summary.slo_total, summary.slo_on_time) if summary is not None else (0, 0)

    def as_json(self, flow: str, minutes: float = 60.0, now: float | None = None) -> dict[str, object]:
        """The ``/api/series`` document of one flow: parallel arrays, uPlot's data layout."""
        pts = self.points(flow, minutes, now)

        def col(name: str) -> list[float | None]:
            out: list[float | None] = []
            for p in pts:
                v = getattr(p, name)
                out.append(None if v is None or (isinstance(v, float) and math.isnan(v)) else round(v, 6))
            return out

        return {
            "flow": flow,
            "resolution_seconds": self.resolution,
            "t": [round(p.t, 3) for p in pts],
            "applied_per_second": col("applied"),
            "captured_per_second": col("captured"),
            "published_per_second": col("published"),
            "failures_per_second": col("failures"),
            "retries_per_second": col("retries"),
            "dead_lettered_per_second": col("dead_lettered"),
            "latency_p50_seconds": col("p50"),
            "latency_p99_seconds": col("p99"),
            "backlog_messages": col("backlog"),
        }
