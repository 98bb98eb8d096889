"""Health verdicts from heartbeat age and content, and the transitions the tracker reports."""

from __future__ import annotations

import msgspec
import pytest

from mesh.controlplane.health import HealthPolicy, HealthTracker, assess
from mesh.controlplane.models import AgentRecord, FlowReport, HeartbeatPayload, HeartbeatRecord

POLICY = HealthPolicy(stale_after=10, lost_after=30, max_outbox_age=60)
REC = AgentRecord(
    agent_id="a1",
    name="erp",
    site="s",
    host="h",
    version="1",
    identity="i",
    credential="c",
    registered_at=1000.0,
)


def beat(at: float, *, agent_id: str = "a1", delta: int = 0, **payload: object) -> HeartbeatRecord:
    return HeartbeatRecord(
        agent_id=agent_id,
        name="erp",
        seq=1,
        received_at=at,
        sent_at=at,
        interval=5,
        version="1",
        payload=HeartbeatPayload(**payload),
        errors_delta=delta,  # type: ignore[arg-type]
    )


def test_fresh_ok_heartbeat_is_healthy() -> None:
    a = assess(REC, beat(1000), 1005, POLICY)
    assert (a.health, a.reason, a.age) == ("healthy", "", 5)


@pytest.mark.parametrize(
    ("hb", "why"),
    [
        (beat(1000, health="degraded", detail="NATS away"), "agent reports degraded: NATS away"),
        (beat(1000, health="failing"), "agent reports failing"),
        (beat(1000, delta=3), "3 new error(s)"),
        (beat(1000, outbox_depth=7, outbox_age_seconds=61.0), "outbox backlog 7, oldest 61s"),
    ],
)
def test_degraded_by_content(hb: HeartbeatRecord, why: str) -> None:
    a = assess(REC, hb, 1001, POLICY)
    assert a.health == "degraded"
    assert why in a.reason


def test_age_makes_stale_then_lost_and_a_new_beat_heals() -> None:
    hb = beat(1000)
    assert assess(REC, hb, 1010, POLICY).health == "healthy"  # boundary: not yet stale
    stale = assess(REC, hb, 1010.5, POLICY)
    assert stale.health == "stale"
    assert "stale after 10s" in stale.reason
    assert assess(REC, hb, 1030, POLICY).health == "stale"
    lost = assess(REC, hb, 1031, POLICY)
    assert lost.health == "lost"
    assert "lost after 30s" in lost.reason
    assert assess(REC, beat(1031), 1031, POLICY).health == "healthy"


def test_never_beaten_counts_from_registration() -> None:
    a = assess(REC, None, 1001, POLICY)
    assert a.health == "stale"
    assert "no heartbeat yet" in a.reason
    assert assess(REC, None, 1031, POLICY).health == "lost"


def test_heartbeat_of_an_earlier_registration_is_ignored() -> None:
    assert assess(REC, beat(1000, agent_id="old"), 1001, POLICY).health == "stale"


def test_flow_reports_do_not_change_the_verdict_by_themselves() -> None:
    hb = beat(1000, flows=[FlowReport(name="customers", consumer_pending=10_000)])
    assert assess(REC, hb, 1001, POLICY).health == "healthy"


def test_policy_timers_must_be_ordered() -> None:
    with pytest.raises(ValueError, match="stale_after"):
        HealthPolicy(stale_after=10, lost_after=5)
    with pytest.raises(msgspec.ValidationError, match="stale_after"):
        msgspec.convert({"stale_after": 0, "lost_after": 5}, HealthPolicy)


def test_tracker_reports_transitions_once() -> None:
    t = HealthTracker()
    first = t.update([("a", "healthy", ""), ("b", "stale", "x")])
    assert [(c.name, c.before, c.after) for c in first] == [("a", None, "healthy"), ("b", None, "stale")]
    assert t.update([("a", "healthy", ""), ("b", "stale", "x")]) == []
    changed = t.update([("a", "stale", "late"), ("b", "lost", "gone")])
    assert [(c.name, c.before, c.after, c.reason) for c in changed] == [
        ("a", "healthy", "stale", "late"),
        ("b", "stale", "lost", "gone"),
    ]
    t.update([("a", "stale", "late")])
    assert "b" not in t.states
    assert "stale" in repr(t)
