"""The agent's view of the broker layout: the streams it needs exist, or it waits for them.

The control plane owns the streams (it creates them, and re-creates one that goes missing);
an agent needs ``MESH_EVENTS`` (it publishes and consumes events) and ``MESH_DLQ`` (it
dead-letters) and, with per-agent permissions, may only ask ``STREAM.INFO`` about them.
:class:`StreamCheck` asks every ``every`` seconds (and at once when an actor reports a
``NotFound``), keeps the readiness condition ``streams`` (``/readyz`` answers 503 with
"stream MESH_EVENTS missing" while one is), and logs one line when a stream goes missing and
one when it is back. Nothing crashes meanwhile: the relay keeps captured events in the outbox,
and a sink flow waits (:meth:`StreamCheck.wait_present`) before it binds its consumer again.

Who creates a missing stream is ``[streams] manage`` in the agent config:

* unset (default): the agent creates the streams when one is missing, if its NATS permissions
  allow it; a refusal (or any error) just leaves it "missing" until the control plane heals it
  (the agent tries again at most once a minute).
  A standalone agent (tests, examples, no control plane) therefore still works.
* ``true``: the agent also creates or updates the streams at every connect (the behaviour
  before the control plane owned them).
* ``false``: the agent never creates them; it only checks and waits.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence

import anyio
from anyio.abc import TaskStatus

from mesh.config import StreamsConfig
from mesh.errors import TransportError
from mesh.readiness import Readiness
from mesh.transport import DLQ_STREAM, EVENTS_STREAM, NotFound, Transport

__all__ = ["AGENT_STREAMS", "StreamCheck"]

log = logging.getLogger(__name__)

AGENT_STREAMS: tuple[str, ...] = (EVENTS_STREAM, DLQ_STREAM)
"""The streams a connector agent uses (and may ask STREAM.INFO about)."""

_CREATE_RETRY = 60.0
"""Seconds before an agent tries again to create a missing stream after a refusal."""


class StreamCheck:
    """Keeps the readiness condition ``streams``: met while every stream in ``needed`` exists.

    ``missing`` is the set found missing by the last check (empty before the first one).
    """

    def __init__(
        self,
        transport: Callable[[], Awaitable[Transport]],
        cfg: StreamsConfig,
        readiness: Readiness | None = None,
        *,
        every: float = 5.0,
        needed: Sequence[str] = AGENT_STREAMS,
    ) -> None:
        self.transport = transport
        self.cfg = cfg
        self.readiness = readiness
        self.every = every
        self.needed = tuple(needed)
        self.missing: set[str] = set()
        self.checked = anyio.Event()
        """Set once the first check has finished."""
        self._wake = anyio.Event()
        self._changed = anyio.Event()
        self._create_refused = False
        self._next_create = 0.0
        self._checks = 0
        self._checked_again = anyio.Event()

    def __repr__(self) -> str:
        what = ", ".join(sorted(self.missing)) or "none"
        return f"<StreamCheck needed={list(self.needed)} missing={what}>"

    def wake(self) -> None:
        """Check again now (an actor saw ``NotFound``)."""
        self._wake.set()

    async def recheck(self) -> None:
        """Check now and return once that check has finished (or the broker stayed away)."""
        seen = self._checks
        self.wake()
        while self._checks == seen:
            await self._checked_again.wait()

    async def wait_present(self, stream: str) -> None:
        """Return once the last check found ``stream`` present (at once if it did)."""
        await self.checked.wait()
        while stream in self.missing:
            await self._changed.wait()

    async def check(self, js: Transport) -> set[str]:
        """One pass: which needed streams are missing (creating them first when allowed).

        Raises:
            TransportError: the broker did not answer (NATS down): nothing is concluded.
        """
        missing = await self._missing(js)
        if missing and self.cfg.manage is not False and anyio.current_time() >= self._next_create:
            try:
                await js.ensure_streams(self.cfg)
            except TransportError as exc:
                # Refused (no permission) or failed: try again in a minute, not at every check.
                self._next_create = anyio.current_time() + _CREATE_RETRY
                if not self._create_refused:
                    self._create_refused = True
                    log.info(
                        "stream(s) %s missing and this agent may not create them (%s); waiting for "
                        "the control plane to recreate them", ", ".join(sorted(missing)), exc,
                    )  # fmt: skip
            else:
                self._create_refused = False
                log.warning("stream(s) %s were missing; created them", ", ".join(sorted(missing)))
                missing = await self._missing(js)
        return missing

    async def _missing(self, js: Transport) -> set[str]:
        missing = set()
        for name in self.needed:
            try:
                await js.stream_info(name)
            except NotFound:
                missing.add(name)
        return missing

    def _record(self, missing: set[str]) -> None:
        gone, back = missing - self.missing, self.missing - missing
        for name in sorted(gone):
            log.warning("stream %s missing; waiting until it exists again (the control plane recreates it)",
                        name)  # fmt: skip
        for name in sorted(back):
            log.info("stream %s exists again", name)
        self.missing = missing
        if self.readiness is not None:
            detail = "; ".join(f"stream {n} missing" for n in sorted(missing))
            self.readiness.set("streams", not missing, detail)
        if gone or back or not self.checked.is_set():
            self._changed.set()
            self._changed = anyio.Event()
        self.checked.set()

    async def run(self, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Check forever: at start, every ``every`` seconds and when woken."""
        if self.readiness is not None:
            self.readiness.require("streams")
        task_status.started()
        js = await self.transport()
        while True:
            # NATS away: the "nats" condition says so; check again when it is back.
            with contextlib.suppress(TransportError):
                self._record(await self.check(js))
            self._checks += 1
            self._checked_again.set()
            self._checked_again = anyio.Event()
            self._wake = anyio.Event()
            with anyio.move_on_after(self.every):
                await self._wake.wait()
