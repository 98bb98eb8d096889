"""A local request gate: a token bucket plus a shared pause for ``429 Retry-After``.

Every request of one sink passes :meth:`RequestGate.acquire` first. Waiters are served in
arrival order (they queue on one lock), so a steady stream of requests cannot starve an early
one. When the target answers 429 with ``Retry-After``, :meth:`RequestGate.pause_until` holds
*every* request of the sink until then, not just the one that was refused: the limit is the
target's, not one key's.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator

import anyio

__all__ = ["RequestGate"]


class RequestGate:
    """Token bucket of ``rate`` requests per second holding up to ``burst`` tokens (``rate`` 0:
    no limit, only pauses apply). Starts full. Cancellable while waiting."""

    def __init__(self, rate: float, burst: int | None = None) -> None:
        if rate < 0:
            raise ValueError(f"rate must be >= 0, got {rate}")
        self.rate = rate
        self.burst = burst if burst is not None else max(1, math.ceil(rate))
        self._tokens = float(self.burst)
        self._stamp = anyio.current_time()
        self._paused_until = 0.0
        self._lock = anyio.Lock()

    def __repr__(self) -> str:
        limit = f"{self.rate:g}/s burst={self.burst}" if self.rate else "unlimited"
        pause = max(0.0, self._paused_until - anyio.current_time())
        return f"<RequestGate {limit}" + (f" paused={pause:.1f}s>" if pause else ">")

    def pause_until(self, deadline: float) -> None:
        """Let no request through before ``deadline`` (an ``anyio.current_time()`` value)."""
        self._paused_until = max(self._paused_until, deadline)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """No concurrency bound of its own (the adapter's ``concurrency`` applies); the same
        interface as :meth:`mesh.policy.PolicyGate.slot`."""
        yield

    async def acquire(self) -> None:
        """Wait for a pause to end and a token to be free, then take the token."""
        async with self._lock:
            while True:
                now = anyio.current_time()
                wait = self._paused_until - now
                if self.rate:
                    self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
                    self._stamp = now
                    if self._tokens < 1:
                        wait = max(wait, (1 - self._tokens) / self.rate)
                if wait <= 0:
                    if self.rate:
                        self._tokens -= 1
                    return
                await anyio.sleep(wait)
