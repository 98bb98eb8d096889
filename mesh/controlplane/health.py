"""Agent health from heartbeats: ``healthy``, ``degraded``, ``stale`` or ``lost``.

The verdict is a pure function of the registry record, the last accepted heartbeat and the
clock (:func:`assess`), so every replica reaches the same one from the same KV contents::

                 heartbeat fresh, agent says ok, no new errors,
                 outbox not older than max_outbox_age
    ┌─────────┐ ───────────────────────────────────────────► ┌──────────┐
    │ degraded│ ◄─────────────────────────────────────────── │ healthy  │
    └─────────┘   agent says degraded/failing, errors grew,  └──────────┘
         │        or outbox older than max_outbox_age             │
         │  no heartbeat for stale_after seconds                  │
         └──────────────────────► ┌────────┐ ◄────────────────────┘
                                  │ stale  │ ── no heartbeat for lost_after ──► lost
                                  └────────┘
    a heartbeat accepted again brings a stale or lost agent straight back to healthy/degraded.

Before its first heartbeat an agent's age counts from its registration, so an agent that
registered and never ran goes stale and then lost like one that stopped. A revoked agent is
refused heartbeats, so it ends up lost as well. :class:`HealthTracker` remembers each agent's last
verdict and reports transitions (for logs and metrics).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import msgspec

from mesh.controlplane.models import AgentRecord, Health, HeartbeatRecord

__all__ = ["Assessment", "HealthPolicy", "HealthTracker", "Transition", "assess"]


class HealthPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The timers and thresholds behind the verdicts (seconds)."""

    stale_after: float = 15.0
    """No heartbeat for this long: ``stale`` (default: three missed 5 s heartbeats)."""
    lost_after: float = 60.0
    """No heartbeat for this long: ``lost``."""
    max_outbox_age: float = 300.0
    """An outbox whose oldest envelope is older than this makes the agent ``degraded``."""

    def __post_init__(self) -> None:
        if not 0 < self.stale_after < self.lost_after:
            raise ValueError(
                f"health timers: need 0 < stale_after ({self.stale_after}) < lost_after ({self.lost_after})"
            )


@dataclass(frozen=True, slots=True)
class Assessment:
    health: Health
    reason: str
    """Empty when healthy; otherwise one line an operator can act on."""
    age: float
    """Seconds since the last heartbeat (since registration before the first one)."""


def assess(
    record: AgentRecord, heartbeat: HeartbeatRecord | None, now: float, policy: HealthPolicy
) -> Assessment:
    """The health of one agent at wall-clock time ``now``. Pure; never raises."""
    if heartbeat is not None and heartbeat.agent_id != record.agent_id:
        heartbeat = None  # left over from an earlier registration under the same name
    since = heartbeat.received_at if heartbeat is not None else record.registered_at
    age = max(0.0, now - since)
    if heartbeat is None:
        what = f"registered {age:.1f}s ago, no heartbeat yet"
        if age > policy.lost_after:
            return Assessment("lost", f"{what} (lost after {policy.lost_after:g}s)", age)
        return Assessment("stale", what, age)
    if age > policy.lost_after:
        return Assessment("lost", f"last heartbeat {age:.1f}s ago (lost after {policy.lost_after:g}s)", age)
    if age > policy.stale_after:
        return Assessment(
            "stale", f"last heartbeat {age:.1f}s ago (stale after {policy.stale_after:g}s)", age
        )
    p = heartbeat.payload
    reasons: list[str] = []
    if p.health != "ok":
        reasons.append(f"agent reports {p.health}" + (f": {p.detail}" if p.detail else ""))
    if heartbeat.errors_delta > 0:
        reasons.append(f"{heartbeat.errors_delta} new error(s) since the previous heartbeat")
    if p.outbox_age_seconds > policy.max_outbox_age:
        reasons.append(
            f"outbox backlog {p.outbox_depth}, oldest {p.outbox_age_seconds:.0f}s "
            f"(over {policy.max_outbox_age:g}s)"
        )
    if reasons:
        return Assessment("degraded", "; ".join(reasons), age)
    return Assessment("healthy", "", age)


@dataclass(frozen=True, slots=True)
class Transition:
    name: str
    before: Health | None
    """``None`` the first time the tracker sees the agent."""
    after: Health
    reason: str


@dataclass(slots=True)
class HealthTracker:
    """Last verdict per agent; :meth:`update` returns what changed since the previous call."""

    states: dict[str, Health] = field(default_factory=dict)

    def __repr__(self) -> str:
        counts: dict[str, int] = {}
        for h in self.states.values():
            counts[h] = counts.get(h, 0) + 1
        return f"<HealthTracker {counts}>"

    def update(self, verdicts: Iterable[tuple[str, Health, str]]) -> list[Transition]:
        """Record the current ``(name, health, reason)`` verdicts (agents not listed are
        forgotten); return the changes."""
        changes: list[Transition] = []
        seen: set[str] = set()
        for name, health, reason in verdicts:
            seen.add(name)
            before = self.states.get(name)
            if before != health:
                changes.append(Transition(name, before, health, reason))
                self.states[name] = health
        for name in set(self.states) - seen:
            del self.states[name]
        return changes
