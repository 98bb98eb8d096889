"""Shared API policies: a target's rate, concurrency and daily quota shared by every agent and
replica that calls it, coordinated by the control-plane leader over NATS (README "Shared rate
limits and quotas (API policy)")."""

from __future__ import annotations

from mesh.policy.client import (
    PolicyClient,
    PolicyGate,
    PolicyMetrics,
    QuotaExhausted,
    current_client,
    install,
    policy_gate,
)
from mesh.policy.config import PolicyConfig
from mesh.policy.wire import PolicyGrant, PolicyRequest, policy_subject

__all__ = [
    "PolicyClient",
    "PolicyConfig",
    "PolicyGate",
    "PolicyGrant",
    "PolicyMetrics",
    "PolicyRequest",
    "QuotaExhausted",
    "current_client",
    "install",
    "policy_gate",
    "policy_subject",
]
