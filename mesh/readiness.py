"""Readiness: named conditions a process must meet before it says it is ready.

An agent is *ready* when its signal handlers are installed, its stores are open, its NATS link
is up and its command channel is subscribed; a control plane when its buckets, HTTP endpoint and
request handlers are up. Each part marks its own condition (``readiness.set("nats")``) and clears
it when it goes away (a NATS outage makes the agent unready until the link is back).

Whoever asks — ``GET /readyz`` on the agent's metrics port, ``sd_notify(READY=1)`` under systemd,
the test harness, ``meshctl dev up`` — gets the same answer from :meth:`Readiness.snapshot`.
A process that has never been ready since it started also says so (``ever_ready``), which is
what a supervisor waits for before it sends a signal or a command.
"""

from __future__ import annotations

from collections.abc import Iterable

import anyio

__all__ = ["Readiness"]


class Readiness:
    """A set of required conditions; ready when every one is met. Not thread-safe for writers
    (the event loop sets them); :meth:`snapshot` may be read from another thread."""

    def __init__(self, required: Iterable[str]) -> None:
        self._state: dict[str, bool] = dict.fromkeys(required, False)
        self._detail: dict[str, str] = {}
        self._became_ready: anyio.Event | None = None
        self.ever_ready = False

    def __repr__(self) -> str:
        waiting = self.waiting()
        return f"<Readiness {'ready' if not waiting else 'waiting for ' + ','.join(waiting)}>"

    def require(self, name: str) -> None:
        """Add a condition (not yet met)."""
        self._state.setdefault(name, False)

    def set(self, name: str, ok: bool = True, detail: str = "") -> None:
        """Mark ``name`` met (or not, with ``detail`` saying why)."""
        self._state[name] = ok
        if detail:
            self._detail[name] = detail
        else:
            self._detail.pop(name, None)
        if self.ready:
            self.ever_ready = True
            if self._became_ready is not None:
                self._became_ready.set()

    def clear(self, name: str, detail: str = "") -> None:
        self.set(name, False, detail)

    def waiting(self) -> list[str]:
        """The conditions not met yet, in the order they were declared."""
        return [name for name, ok in self._state.items() if not ok]

    @property
    def ready(self) -> bool:
        return all(self._state.values())

    def snapshot(self) -> dict[str, object]:
        """``{"ready": bool, "checks": {name: {"ok": bool, "detail": str}}}`` (for ``/readyz``)."""
        checks = {n: {"ok": ok, "detail": self._detail.get(n, "")} for n, ok in self._state.items()}
        return {"ready": self.ready, "checks": checks}

    async def wait(self) -> None:
        """Return once every condition is met (at once if they are)."""
        while not self.ready:
            self._became_ready = anyio.Event()
            await self._became_ready.wait()
