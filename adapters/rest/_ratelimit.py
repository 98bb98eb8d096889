"""The request gate of a REST sink, source or System API operation.

Without ``policy`` it is a local :class:`~mesh.policy.bucket.RequestGate` (a token bucket of
``rate_limit``/``burst`` plus a shared pause for ``429 Retry-After``), private to the adapter.
With ``policy = "<name>"`` it is the agent's :class:`~mesh.policy.PolicyGate`: the rate,
concurrency and daily quota are shared with every other agent and replica naming the policy
(README "Shared rate limits and quotas (API policy)").
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from mesh.policy import PolicyGate, policy_gate
from mesh.policy.bucket import RequestGate

__all__ = ["RequestGate", "SharedGate", "gate_for"]


class SharedGate:
    """The agent's gate of policy ``name``, looked up at the first request (the adapter may be
    built before the agent installs its policy client, e.g. by a config check)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._gate: PolicyGate | None = None
        self._paused_until = 0.0

    def __repr__(self) -> str:
        return repr(self._gate) if self._gate is not None else f"<SharedGate {self.name} unresolved>"

    def _resolve(self) -> PolicyGate:
        if self._gate is None:
            self._gate = policy_gate(self.name)
            self._gate.pause_until(self._paused_until)
        return self._gate

    def pause_until(self, deadline: float) -> None:
        """Hold every request of the agent under this policy until ``deadline``."""
        if self._gate is None:
            self._paused_until = max(self._paused_until, deadline)
        else:
            self._gate.pause_until(deadline)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of this agent's slots of the policy's concurrency for one request."""
        async with self._resolve().slot():
            yield

    async def acquire(self) -> None:
        """Take one shared token (see :meth:`mesh.policy.PolicyGate.acquire`).

        Raises:
            ConfigError: the agent declares no ``[policies.<name>]`` (or no agent runs here).
            QuotaExhausted: the policy's daily quota is spent (a SystemUnavailable: the batch
                goes back and is retried).
        """
        await self._resolve().acquire()


def gate_for(rate: float, burst: int | None, policy: str | None) -> RequestGate | SharedGate:
    """The shared gate of ``policy`` when one is named, else a local bucket of ``rate``/``burst``."""
    if policy is not None:
        return SharedGate(policy)
    return RequestGate(rate, burst)
