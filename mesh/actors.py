"""Actors and supervision on anyio task groups.

An *actor* is an async function that loops until cancelled, taking a ``task_status`` it calls
``started()`` on when it is ready. A :class:`Supervisor` owns one task group and runs each actor
in it. Guarantees:

* No orphan tasks: every actor lives inside the supervisor's task group and ends with it.
* A crashing actor (any ``Exception`` other than :class:`~mesh.errors.StopError`) is logged with
  its traceback and restarted after an exponential backoff (reset once it has run stably);
  the other actors keep running.
* A :class:`~mesh.errors.StopError` stops the whole supervisor and is re-raised by its
  ``async with`` block as itself, never wrapped in an ``ExceptionGroup``.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import anyio
from anyio.abc import TaskGroup, TaskStatus

from mesh.errors import RetryableError, StopError

__all__ = ["Actor", "ActorState", "Backoff", "Supervisor"]

log = logging.getLogger(__name__)

Actor = Callable[[TaskStatus[Any]], Awaitable[None]]


@dataclass(slots=True)
class Backoff:
    """Exponential backoff with full jitter: ``min(cap, base * 2**attempt) * U(0.5, 1]``."""

    base: float = 0.1
    cap: float = 30.0

    def delay(self, attempt: int) -> float:
        raw = min(self.cap, self.base * math.pow(2, min(attempt, 30)))
        return raw * (0.5 + random.random() / 2)


@dataclass(slots=True)
class ActorState:
    name: str
    running: bool = False
    restarts: int = 0
    last_error: str | None = None
    scope: anyio.CancelScope | None = None
    done: anyio.Event | None = None
    """Set once the actor has ended for good (finished, stopped or cancelled)."""


class _Status:
    """Forwards ``started()`` to the first caller's task status, once, across restarts."""

    def __init__(self, inner: TaskStatus[Any]) -> None:
        self.inner: TaskStatus[Any] | None = inner

    def started(self, value: Any = None) -> None:
        inner, self.inner = self.inner, None
        if inner is not None:
            inner.started(value)


class Supervisor:
    """Runs actors in one task group and restarts those that crash."""

    def __init__(
        self,
        name: str,
        *,
        backoff: Backoff | None = None,
        reset_after: float = 30.0,
        on_restart: Callable[[str], None] | None = None,
    ) -> None:
        self.name = name
        self.on_restart = on_restart
        self.backoff = backoff or Backoff()
        self.reset_after = reset_after
        self.actors: dict[str, ActorState] = {}
        self._tg: TaskGroup | None = None
        self._fatal: StopError | None = None

    def __repr__(self) -> str:
        running = sum(a.running for a in self.actors.values())
        restarts = sum(a.restarts for a in self.actors.values())
        return f"<Supervisor {self.name} actors={len(self.actors)} running={running} restarts={restarts}>"

    async def __aenter__(self) -> Self:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._tg is not None
        try:
            result = await self._tg.__aexit__(exc_type, exc, tb)
        except BaseExceptionGroup as group:
            # Unwrap a lone exception so callers never see an ExceptionGroup of one.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        finally:
            self._tg = None
        if self._fatal is not None:
            raise self._fatal
        return result

    def cancel(self) -> None:
        """Stop every actor (the ``async with`` block then exits)."""
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    async def start(self, name: str, actor: Actor) -> Any:
        """Run ``actor`` under supervision; return once it has called ``task_status.started()``."""
        if self._tg is None:
            raise RuntimeError("supervisor is not running")
        if name in self.actors:
            raise ValueError(f"actor {name!r} already runs under {self.name}")
        self.actors[name] = ActorState(name, scope=anyio.CancelScope(), done=anyio.Event())
        return await self._tg.start(self._supervise, name, actor)

    def start_soon(self, name: str, actor: Actor) -> None:
        """Run ``actor`` under supervision without waiting for it to start (an actor that cannot
        start yet — its system is down — is retried with backoff meanwhile)."""
        if self._tg is None:
            raise RuntimeError("supervisor is not running")
        if name in self.actors:
            raise ValueError(f"actor {name!r} already runs under {self.name}")
        self.actors[name] = ActorState(name, scope=anyio.CancelScope(), done=anyio.Event())
        self._tg.start_soon(self._supervise, name, actor)

    async def stop(self, name: str) -> None:
        """Cancel one actor and wait until it has ended; its name is free again afterwards.
        Work it shields (see ``ConnectorAgent.inflight``) finishes first. No-op for an unknown name."""
        state = self.actors.get(name)
        if state is None:
            return
        assert state.scope is not None
        assert state.done is not None
        state.scope.cancel()
        await state.done.wait()

    async def wait(self, name: str) -> None:
        """Return once the actor ``name`` has ended for good (at once if there is none)."""
        state = self.actors.get(name)
        if state is not None and state.done is not None:
            await state.done.wait()

    async def _supervise(
        self, name: str, actor: Actor, *, task_status: TaskStatus[Any] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        state = self.actors[name]
        assert state.scope is not None
        assert state.done is not None
        try:
            with state.scope:
                await self._restart_loop(state, actor, _Status(task_status))
        finally:
            if self.actors.get(name) is state:
                del self.actors[name]
            state.done.set()

    async def _restart_loop(self, state: ActorState, actor: Actor, status: _Status) -> None:
        name = state.name
        attempt = 0
        while True:
            began = anyio.current_time()
            state.running = True
            try:
                await actor(status)
                log.info("%s/%s finished", self.name, name)
                return
            except StopError as exc:
                log.error("%s/%s stopped the agent: %s", self.name, name, exc)
                self._fatal = exc
                self.cancel()
                return
            except Exception as exc:
                state.restarts += 1
                state.last_error = f"{type(exc).__name__}: {exc}"
                if anyio.current_time() - began > self.reset_after:
                    attempt = 0
                delay = self.backoff.delay(attempt)
                attempt += 1
                # An expected outage (broker or system away) needs no traceback; a bug does.
                expected = isinstance(exc, RetryableError)
                log.log(
                    logging.WARNING if expected else logging.ERROR,
                    "%s/%s %s (%s); restart %d in %.2fs",
                    self.name, name, "failed" if expected else "crashed", state.last_error,
                    state.restarts, delay,
                    exc_info=None if expected else exc,
                )  # fmt: skip
                if self.on_restart is not None:
                    self.on_restart(name)
            finally:
                state.running = False
            await anyio.sleep(delay)
