"""The mesh's NATS layout (DESIGN §4): stream names and subject builders, and subject matching.

Pure functions, no I/O: usable by the CLI, the schema export and both transports.
"""

from __future__ import annotations

__all__ = [
    "AUDIT_STREAM",
    "COMMANDS_STREAM",
    "DLQ_STREAM",
    "EVENTS_STREAM",
    "STREAM_SUBJECTS",
    "TRACE_STREAM",
    "consumer_name",
    "dlq_subject",
    "event_subject",
    "subject_matches",
]

EVENTS_STREAM = "MESH_EVENTS"
COMMANDS_STREAM = "MESH_COMMANDS"
DLQ_STREAM = "MESH_DLQ"
AUDIT_STREAM = "MESH_AUDIT"
TRACE_STREAM = "MESH_TRACE"

STREAM_SUBJECTS: dict[str, str] = {
    EVENTS_STREAM: "evt.>",
    COMMANDS_STREAM: "cmd.>",
    DLQ_STREAM: "dlq.>",
    AUDIT_STREAM: "audit.>",
    TRACE_STREAM: "trace.>",
}
"""Each mesh stream and the subjects it stores."""


def event_subject(entity: str, event: str, origin: str) -> str:
    """``evt.<entity>.<event>.<origin>`` (DESIGN §4)."""
    return f"evt.{entity}.{event}.{origin}"


def dlq_subject(flow: str) -> str:
    """``dlq.<flow>``: where a flow's dead letters go (stream ``MESH_DLQ``)."""
    return f"dlq.{flow}"


def consumer_name(flow: str, system: str) -> str:
    """``<flow>-<sink system>``: the durable consumer on MESH_EVENTS of ``flow`` at the agent
    fronting ``system``. One per (flow, sink system), shared by that agent's replicas; one subject
    token, so an agent's permissions can name exactly its own consumers."""
    return f"{flow}-{system}"


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` matches one token, a final ``>`` one or more."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)
