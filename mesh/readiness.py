"""Readiness: named conditions a process must meet before it says it is ready.

An agent is *ready* when its signal handlers are installed, its stores are open, its NATS link
is up and its command channel is subscribed; a control plane when its signal handlers, NATS
link, KV buckets and request handlers are up. Each part marks its own condition
(``readiness.set("nats")``) and clears it when it goes away (a NATS outage makes the agent
unready until the link is back). Once the process begins to stop (SIGTERM) it is never ready
again (:meth:`Readiness.stopping`).

Whoever asks — ``GET /readyz`` on the agent's metrics port, ``sd_notify(READY=1)`` under systemd,
the test harness, ``meshctl dev up`` — gets the same answer from :meth:`Readiness.snapshot`.
A process that has never been ready since it started also says so (``ever_ready``), which is
what a supervisor waits for before it sends a signal or a command.

:func:`wait_ready` is the client side: it polls a ``/readyz`` URL until it answers 200 (or
until the named checks are met), with a deadline, and is what the test harness, the examples
and ``meshctl dev up`` use instead of reading logs or sleeping.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable

import anyio

__all__ = ["NotReady", "Readiness", "probe", "wait_ready"]


class Readiness:
    """A set of required conditions; ready when every one is met and the process is not
    stopping. Not thread-safe for writers (the event loop sets them); :meth:`snapshot` and
    :attr:`ready` may be read from another thread (the HTTP probe server's)."""

    def __init__(self, required: Iterable[str]) -> None:
        self._state: dict[str, bool] = dict.fromkeys(required, False)
        self._detail: dict[str, str] = {}
        self._changed: anyio.Event | None = None
        self._stopping: str | None = None
        self.ever_ready = False

    def __repr__(self) -> str:
        if self._stopping is not None:
            return f"<Readiness stopping: {self._stopping}>"
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
        if self._changed is not None:
            self._changed.set()

    def clear(self, name: str, detail: str = "") -> None:
        self.set(name, False, detail)

    def stopping(self, detail: str = "stopping") -> None:
        """The process is stopping: not ready from now on, whatever the conditions say.
        Idempotent (the first ``detail`` is kept)."""
        if self._stopping is None:
            self._stopping = detail

    @property
    def is_stopping(self) -> bool:
        return self._stopping is not None

    def waiting(self) -> list[str]:
        """The conditions not met yet, in the order they were declared."""
        return [name for name, ok in self._state.items() if not ok]

    @property
    def ready(self) -> bool:
        return self._stopping is None and all(self._state.values())

    def snapshot(self) -> dict[str, object]:
        """``{"ready": bool, "stopping": bool, "waiting": [names], "checks": {name: {"ok": bool,
        "detail": str}}}`` (the ``/readyz`` body); ``"detail"`` at the top says why not ready:
        ``waiting for <name> (<its detail>), ...``."""
        checks = {n: {"ok": ok, "detail": self._detail.get(n, "")} for n, ok in list(self._state.items())}
        waiting = [n for n, c in checks.items() if not c["ok"]]
        snap: dict[str, object] = {
            "ready": self._stopping is None and not waiting,
            "stopping": self._stopping is not None,
            "waiting": waiting,
            "checks": checks,
        }
        if self._stopping is not None:
            snap["detail"] = self._stopping
        elif waiting:
            # A condition's own reason says more than its name ("stream MESH_EVENTS missing").
            why = [f"{n} ({d})" if (d := self._detail.get(n)) else n for n in waiting]
            snap["detail"] = "waiting for " + ", ".join(why)
        return snap

    async def wait(self, *names: str) -> None:
        """Return once every condition is met, or just ``names`` when given (at once if they
        are). Waiting for every condition never returns once the process is stopping."""
        while not (all(self._state.get(n, False) for n in names) if names else self.ready):
            if self._changed is None or self._changed.is_set():
                self._changed = anyio.Event()
            await self._changed.wait()


class NotReady(TimeoutError):
    """:func:`wait_ready` gave up: the deadline passed or the process went away.
    ``last`` is the last ``/readyz`` body seen (None if it never answered)."""

    def __init__(self, message: str, last: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.last = last


def probe(url: str, timeout: float = 1.0) -> tuple[int, dict[str, object]] | None:
    """``GET url`` once: ``(status, JSON body)``, or None when nothing answers (refused,
    timed out, not JSON). Blocking (call it from a thread in async code)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except (OSError, ValueError):
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    return (status, doc) if isinstance(doc, dict) else None


def wait_ready(
    url: str | Callable[[], str | None],
    *,
    timeout: float,
    alive: Callable[[], bool] | None = None,
    checks: Iterable[str] | None = None,
    interval: float = 0.05,
) -> dict[str, object]:
    """Poll ``url`` (a ``/readyz`` URL, or a callable returning it once known) until it says
    ready; returns the body. With ``checks``, return as soon as those named checks are met
    (e.g. ``("signals",)``: the process may now be sent SIGTERM) even if others are not.

    Raises:
        NotReady: ``timeout`` seconds passed, or ``alive()`` turned False (the process exited).
    """
    wanted = tuple(checks or ())
    deadline = time.monotonic() + timeout
    last: dict[str, object] | None = None
    while True:
        target = url() if callable(url) else url
        if target is not None:
            answer = probe(target, timeout=max(0.1, min(1.0, deadline - time.monotonic())))
            if answer is not None:
                status, last = answer
                if status == 200 and not wanted:
                    return last
                if wanted and _met(last, wanted):
                    return last
        if alive is not None and not alive():
            raise NotReady(f"the process exited before {target or 'its endpoint'} said ready", last)
        if time.monotonic() >= deadline:
            why = last.get("detail", "not ready") if last else "no answer"
            raise NotReady(f"not ready after {timeout:.0f}s ({target or 'no endpoint yet'}: {why})", last)
        time.sleep(interval)


def _met(snapshot: dict[str, object], wanted: tuple[str, ...]) -> bool:
    checks = snapshot.get("checks")
    if not isinstance(checks, dict):
        return False
    return all(isinstance(checks.get(n), dict) and checks[n].get("ok") is True for n in wanted)
