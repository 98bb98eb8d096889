"""The request/reply contract between a policy client (an agent) and the coordinator (the
control-plane leader): ``<prefix>.policy.<caller>``, msgspec JSON both ways.

The caller token of the subject is the caller's identity (NATS permissions let an agent publish
only its own), so the coordinator counts concurrency per authenticated caller.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from mesh.policy.config import PolicyConfig
from mesh.security.permissions import DEFAULT_PREFIX, validate_prefix, validate_token

__all__ = ["PolicyGrant", "PolicyRequest", "decode_grant", "decode_request", "encode", "policy_subject"]


class PolicyRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Ask for up to ``want`` tokens of policy ``policy`` (declared as ``spec`` by the caller)."""

    policy: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]+$(?!\n)", min_length=1, max_length=64)]
    want: Annotated[int, msgspec.Meta(ge=1, le=10_000)]
    spec: PolicyConfig


class PolicyGrant(msgspec.Struct, frozen=True, kw_only=True):
    """``tokens`` requests the caller may start within ``ttl`` seconds (the unused ones lapse);
    none granted: ask again after ``wait`` seconds. ``concurrency``: the caller's share of the
    policy's concurrency. ``quota_reset`` (epoch seconds) is set when the daily quota is spent:
    nothing is granted before then. ``error``: the coordinator could not serve the request."""

    tokens: int = 0
    ttl: float = 1.0
    wait: float = 0.0
    concurrency: int = 1
    quota_used: int | None = None
    quota_reset: float | None = None
    error: str = ""


_encoder = msgspec.json.Encoder()
_requests = msgspec.json.Decoder(PolicyRequest)
_grants = msgspec.json.Decoder(PolicyGrant)


def encode(msg: PolicyRequest | PolicyGrant) -> bytes:
    return _encoder.encode(msg)


def decode_request(data: bytes) -> PolicyRequest:
    """Raises msgspec.DecodeError / ValidationError on a malformed request."""
    return _requests.decode(data)


def decode_grant(data: bytes) -> PolicyGrant:
    """Raises msgspec.DecodeError / ValidationError on a malformed reply."""
    return _grants.decode(data)


def policy_subject(caller: str, prefix: str = DEFAULT_PREFIX) -> str:
    """``<prefix>.policy.<caller>``. Raises ConfigError on a bad caller token or prefix."""
    return f"{validate_prefix(prefix)}.policy.{validate_token(caller, 'agent name')}"
