"""Retry timing for the REST sink: exponential backoff with jitter, ``Retry-After``, a breaker.

Nothing here sends a request; :mod:`adapters.rest.sink` asks these helpers how long to wait and
whether a request may go at all. All clocks are ``anyio.current_time()`` (monotonic), except
that an HTTP-date ``Retry-After`` is necessarily compared with the wall clock.
"""

from __future__ import annotations

import email.utils
import enum
import math
import random
import time

import anyio

from mesh.errors import SystemUnavailable

__all__ = ["CircuitBreaker", "CircuitOpen", "backoff_delay", "parse_retry_after"]


def backoff_delay(attempt: int, *, initial: float, maximum: float, jitter: float) -> float:
    """Seconds to wait after failed try number ``attempt`` (from 1): ``initial * 2**(attempt-1)``,
    capped at ``maximum``, then spread by +/- ``jitter`` (a fraction) so that many clients that
    failed together do not come back together."""
    base = min(maximum, initial * 2 ** min(max(attempt - 1, 0), 32))
    return max(0.0, base * (1 + jitter * (2 * random.random() - 1)))


def parse_retry_after(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks for, or ``None`` when absent or unreadable.

    Accepts delta-seconds (``"120"``; a decimal like ``"1.5"`` is tolerated) and an HTTP-date
    (``"Wed, 21 Oct 2015 07:28:00 GMT"``). A date in the past, or a negative number, means 0.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, moment.timestamp() - time.time())


class CircuitOpen(SystemUnavailable):
    """The target failed too often lately; requests are refused without being sent."""


class _State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class CircuitBreaker:
    """Stops hammering a target that keeps failing.

    *Closed*: every request may go; ``threshold`` consecutive failures open the circuit.
    *Open*: :meth:`acquire` raises :class:`CircuitOpen` at once, for ``cooldown`` seconds.
    *Half-open*: after the cooldown exactly one request (the probe) goes; the others wait for
    its result. Success closes the circuit, failure opens it for another cooldown. A probe that
    ends without a verdict (cancelled, or an answer that says nothing about health) lets the
    next caller probe instead, so no waiter is stuck.
    """

    def __init__(self, threshold: int, cooldown: float) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self._state = _State.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_done: anyio.Event | None = None

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.state} failures={self._failures}/{self.threshold}>"

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half-open`` (an open circuit past its cooldown reads half-open)."""
        if self._state is _State.OPEN and anyio.current_time() >= self._opened_at + self.cooldown:
            return _State.HALF_OPEN.value
        return self._state.value

    def check(self) -> None:
        """Raise :class:`CircuitOpen` while the circuit is open and cooling down; else nothing."""
        if self._state is _State.OPEN:
            left = self._opened_at + self.cooldown - anyio.current_time()
            if left > 0:
                raise CircuitOpen(
                    f"circuit open after {self.threshold} consecutive failures; next probe in {left:.1f}s"
                )

    async def acquire(self) -> bool:
        """Wait until a request may go; return whether it is the half-open probe.

        The caller must report the probe's outcome with :meth:`success`, :meth:`failure` or
        :meth:`release` (in a ``finally``).

        Raises:
            CircuitOpen: the circuit is open (now, or again after the probe failed).
        """
        while True:
            self.check()
            if self._state is _State.CLOSED:
                return False
            if self._state is _State.OPEN or self._probe_done is None:
                self._state = _State.HALF_OPEN
                self._probe_done = anyio.Event()
                return True
            await self._probe_done.wait()

    def success(self) -> None:
        """The target answered in a way that shows it is healthy: close the circuit."""
        self._failures = 0
        self._state = _State.CLOSED
        self._end_probe()

    def failure(self) -> None:
        """A failed request (5xx, 408, timeout, connection error)."""
        self._failures += 1
        if self._state is _State.HALF_OPEN or self._failures >= self.threshold:
            self._state = _State.OPEN
            self._opened_at = anyio.current_time()
            self._failures = 0
            self._end_probe()

    def release(self, probe: bool) -> None:
        """End a request without a verdict; if it was the probe, let the next caller probe."""
        if probe and self._state is _State.HALF_OPEN:
            self._end_probe()

    def _end_probe(self) -> None:
        done, self._probe_done = self._probe_done, None
        if done is not None:
            done.set()
