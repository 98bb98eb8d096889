"""The control plane's building blocks: messages, KV state, leader lease, health, HTTP status.

The agent that assembles them is :mod:`agents.control_plane`; the agent-side heartbeat actor is
:mod:`mesh.heartbeat`; the operator commands are :mod:`mesh.cli.agent_cp`, :mod:`mesh.cli.cp` and
:mod:`mesh.cli.audit`.
"""

from __future__ import annotations

from mesh.controlplane.client import ControlPlaneClient, RequestRefused
from mesh.controlplane.health import HealthPolicy
from mesh.controlplane.models import HeartbeatPayload, StatusReport, status_schema
from mesh.controlplane.settings import ControlPlaneSettings

__all__ = [
    "ControlPlaneClient",
    "ControlPlaneSettings",
    "HealthPolicy",
    "HeartbeatPayload",
    "RequestRefused",
    "StatusReport",
    "status_schema",
]
