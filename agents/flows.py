"""The flows one connector agent runs, and how they change while it runs.

A flow comes either from the agent's own config file (``origin = "config"``) or from the control
plane (``origin = "assigned"``: ``meshctl flow apply`` stored it, the agent's assignment in KV
``mesh_assign`` names it). :class:`FlowManager` starts, stops, pauses, drains and reconfigures
flows without restarting the agent. Every change goes through one lock, so a command and an
assignment update never interleave.

Guarantees, for every change:

* **Nothing in flight is lost or doubled.** A flow is stopped the way the whole agent stops on
  SIGTERM: the capture loop ends between batches (its outbox transaction is never cut); a fetched
  sink batch finishes (up to ``agent.shutdown_grace`` seconds) and whatever is left is released
  for immediate redelivery. The new configuration then resumes from the stored cursor and the
  same durable consumer, and the inbox and version guards absorb anything seen twice (I1-I5).
* Events already in the outbox are published whatever happens to their flow (the relay is the
  agent's, not the flow's): deleting a flow never drops what it captured.
* **Pause** stops reading from the source and applying to the sink; **resume** starts both again
  where they stopped. **Drain** stops capture, waits until the flow's outbox rows are published
  and its consumer has nothing pending, then stops the flow (state ``drained``). **Restart** stops
  and starts the flow (its adapters are opened afresh).
* A paused assigned flow stays paused when its configuration changes or the agent restarts (the
  desired state is part of the assignment).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import anyio

from mesh.actors import Actor, Supervisor
from mesh.config import FlowConfig, check_flow, decode_flow, resolve_flow_paths
from mesh.controlplane.models import AgentCommand, Assignment, CommandResult, FlowOutcome
from mesh.errors import ConfigError, ConfigProblem
from mesh.flowdata import compile_flow_data
from mesh.secrets import env_problems

__all__ = ["FlowHandle", "FlowManager", "FlowOrigin", "flow_from_assignment"]

log = logging.getLogger(__name__)

FlowOrigin = Literal["config", "assigned"]
ActorFactory = Callable[["FlowHandle"], Sequence[tuple[str, Actor]]]


@dataclass(eq=False)
class FlowHandle:
    """One flow as the agent runs it."""

    cfg: FlowConfig
    origin: FlowOrigin
    generation: int = 0
    state: str = "stopped"
    """``running``, ``paused``, ``draining``, ``drained``, ``stopped`` or ``failing``."""
    detail: str = ""
    draining: bool = False
    """Set while draining: capture ends once caught up with the source, the sink loop once
    nothing is pending."""
    wake_capture: Callable[[], None] | None = None
    """Interrupts the capture loop's wait for new changes (set while it waits)."""
    actors: list[str] = field(default_factory=list)
    problems: dict[str, str] = field(default_factory=dict)
    """Configuration errors found at run time, by role (``capture``, ``apply``): one line each;
    the flow reports ``failing`` while any is set (see :data:`agents.delivery.CONFIG_RETRY`)."""

    @property
    def name(self) -> str:
        return self.cfg.name


def flow_from_assignment(
    config: dict[str, object],
    state_dir: str,
    allowed_paths: Sequence[str] = (),
    allowed_env: Sequence[str] = (),
) -> FlowConfig:
    """Decode one assigned flow's config; relative paths resolve against ``state_dir``, and
    every path must lie inside ``state_dir`` or one of ``allowed_paths``; every environment
    variable it references must match one of ``allowed_env``.

    Raises:
        ConfigError: the config does not validate on this agent (e.g. a newer control plane
            sent a field this version does not know), a path leads outside those directories,
            or it references an environment variable the agent does not allow.
    """
    refused = [ConfigProblem(where, why) for where, why in env_problems(config, allowed_env)]
    if refused:
        raise ConfigError(source="control plane", problems=refused)
    flow = decode_flow(config, source="control plane", path="flow")
    problems = check_flow(flow, "flow")
    if problems:
        raise ConfigError(source="control plane", problems=problems)
    roots = [Path(state_dir), *(Path(p) for p in allowed_paths)]
    flow = resolve_flow_paths(flow, Path(state_dir), confine_to=roots)
    compile_flow_data(flow, source="control plane", path=f"flow {flow.name}")  # checks SQLite lookups
    return flow


class FlowManager:
    """Starts and stops the agent's flows on one supervisor; see the module docstring."""

    def __init__(
        self,
        agent_name: str,
        supervisor: Supervisor,
        make_actors: ActorFactory,
        *,
        expire_inflight: Callable[[str], None],
        outbox_depth: Callable[[str], Awaitable[int]],
        state_dir: str,
        allowed_paths: Sequence[str] = (),
        allowed_env: Sequence[str] = (),
    ) -> None:
        self.agent_name = agent_name
        self.allowed_paths = list(allowed_paths)
        self.allowed_env = list(allowed_env)
        self.sup = supervisor
        self.make_actors = make_actors
        self.expire_inflight = expire_inflight
        self.outbox_depth = outbox_depth
        self.state_dir = state_dir
        self.flows: dict[str, FlowHandle] = {}
        self.lock = anyio.Lock()
        self._conflicts: set[str] = set()

    def __repr__(self) -> str:
        return f"<FlowManager {self.agent_name} {[f'{h.name}:{h.state}' for h in self.flows.values()]}>"

    # --- state seen from outside ---------------------------------------------------------------

    def report_state(self, h: FlowHandle) -> tuple[str, str]:
        """(state, detail) for heartbeats: a running flow whose actor keeps failing (on its
        configuration, or crashing) is ``failing``, with a one-line reason."""
        if h.state in ("running", "draining") and h.problems:
            return "failing", "; ".join(h.problems.values())
        if h.state == "running":
            for name in h.actors:
                st = self.sup.actors.get(name)
                if st is not None and not st.running and st.last_error:
                    return "failing", st.last_error
        return h.state, h.detail

    # --- primitives (callers hold the lock) ----------------------------------------------------

    async def _start(self, h: FlowHandle, *, wait: bool = False) -> None:
        """Start the flow's actors; with ``wait``, return only once they are up (adapters open)."""
        h.draining = False
        h.actors = []
        h.problems.clear()
        for name, actor in self.make_actors(h):
            h.actors.append(name)
            if wait:
                await self.sup.start(name, actor)
            else:
                self.sup.start_soon(name, actor)
        h.state, h.detail = "running", ""

    async def _stop(self, h: FlowHandle, state: str, detail: str = "") -> None:
        self.expire_inflight(h.name)  # in-flight batches get the grace period, then are released
        with anyio.CancelScope(shield=True):
            for name in h.actors:
                await self.sup.stop(name)
        h.actors = []
        h.draining = False
        h.state, h.detail = state, detail

    # --- the agent's own config ----------------------------------------------------------------

    async def add_configured(self, flows: Sequence[FlowConfig]) -> None:
        async with self.lock:
            for cfg in flows:
                h = FlowHandle(cfg, "config")
                self.flows[cfg.name] = h
                await self._start(h, wait=True)

    # --- assignments from the control plane ----------------------------------------------------

    async def sync(self, assignment: Assignment | None) -> None:
        """Make the assigned flows match ``assignment`` (``None``: no flows assigned)."""
        wanted = {f.name: f for f in (assignment.flows if assignment else [])}
        async with self.lock:
            for name, old in list(self.flows.items()):
                if old.origin == "assigned" and name not in wanted:
                    log.info("flow %s: no longer assigned to %s; stopping it", name, self.agent_name)
                    await self._stop(old, "stopped")
                    del self.flows[name]
            for name, a in wanted.items():
                h = self.flows.get(name)
                if h is not None and h.origin == "config":
                    if name not in self._conflicts:
                        self._conflicts.add(name)
                        log.error(
                            "flow %s is assigned by the control plane but also defined in this agent's "
                            "config file; the config file's flow runs", name,
                        )  # fmt: skip
                    continue
                if h is not None and h.generation == a.generation:
                    if a.desired == "paused" and h.state not in ("paused", "stopped", "failing"):
                        await self._stop(h, "paused", "paused by the control plane")
                    elif a.desired == "running" and h.state == "paused":
                        await self._start(h)
                    continue
                try:
                    cfg = flow_from_assignment(a.config, self.state_dir, self.allowed_paths, self.allowed_env)
                except ConfigError as exc:
                    log.error("flow %s (generation %d): %s", name, a.generation, exc)
                    if h is not None:
                        await self._stop(h, "failing", str(exc))
                        h.generation = a.generation
                    else:
                        placeholder = FlowConfig(name=name, entity="invalid")
                        h = FlowHandle(placeholder, "assigned", a.generation, "failing", str(exc))
                        self.flows[name] = h
                    continue
                if h is None:
                    log.info("flow %s: assigned (generation %d); starting", name, a.generation)
                    h = FlowHandle(cfg, "assigned", a.generation)
                    self.flows[name] = h
                else:
                    log.info("flow %s: generation %d -> %d; reconfiguring", name, h.generation, a.generation)
                    if h.actors:
                        await self._stop(h, "stopped")
                    h.cfg, h.generation = cfg, a.generation
                if a.desired == "paused":
                    h.state, h.detail = "paused", "paused by the control plane"
                else:
                    await self._start(h)

    # --- commands ------------------------------------------------------------------------------

    async def command(self, cmd: AgentCommand) -> CommandResult:
        """Carry out ``cmd`` on one flow or all of them; the result says what happened to each."""
        if cmd.flow is not None and cmd.flow not in self.flows:
            known = ", ".join(sorted(self.flows)) or "none"
            return CommandResult(
                ok=False,
                message=f"agent {self.agent_name} runs no flow named {cmd.flow!r} (it runs: {known})",
                outcomes=[FlowOutcome(agent=self.agent_name, flow=cmd.flow, ok=False, state="unknown",
                                      message="no such flow on this agent")],
            )  # fmt: skip
        names = [cmd.flow] if cmd.flow is not None else sorted(self.flows)
        outcomes = []
        with anyio.move_on_after(cmd.timeout + 5):  # a drain bounds itself; this is a backstop
            async with self.lock:
                for name in names:
                    outcomes.append(await self._one(self.flows[name], cmd))
        if len(outcomes) < len(names):
            return CommandResult(ok=False, message=f"{cmd.op} did not finish within {cmd.timeout:g}s",
                                 outcomes=outcomes)  # fmt: skip
        ok = all(o.ok for o in outcomes)
        return CommandResult(ok=ok, message="" if ok else "; ".join(o.message for o in outcomes if not o.ok),
                             outcomes=outcomes)  # fmt: skip

    async def _one(self, h: FlowHandle, cmd: AgentCommand) -> FlowOutcome:
        who = f" by {cmd.actor}" if cmd.actor else ""
        before = h.state

        def outcome(ok: bool, message: str) -> FlowOutcome:
            state, _ = self.report_state(h)
            level = logging.INFO if ok else logging.WARNING
            log.log(level, "flow %s: %s%s: %s", h.name, cmd.op, who, message)
            return FlowOutcome(agent=self.agent_name, flow=h.name, ok=ok, state=state, message=message)

        if cmd.op == "pause":
            if h.state in ("paused", "drained", "stopped"):
                return outcome(True, f"already {h.state}")
            await self._stop(h, "paused", f"paused{who}")
            return outcome(True, f"paused (was {before})")
        if cmd.op == "resume":
            if h.state == "running" and not h.draining:
                return outcome(True, "already running")
            if h.actors:
                await self._stop(h, "stopped")
            await self._start(h)
            return outcome(True, f"running (was {before})")
        if cmd.op == "restart":
            if h.actors:
                await self._stop(h, "stopped")
            await self._start(h)
            return outcome(True, "restarted")
        return await self._drain(h, cmd.timeout, outcome)

    async def _drain(
        self, h: FlowHandle, timeout: float, outcome: Callable[[bool, str], FlowOutcome]
    ) -> FlowOutcome:
        if h.state == "drained":
            return outcome(True, "already drained")
        if not h.actors:  # paused, stopped or failing to configure: run it to drain it
            if h.cfg.source is None and h.cfg.sink is None:
                return outcome(False, f"cannot drain: {h.detail or h.state}")
            await self._start(h)
        h.state, h.detail, h.draining = "draining", "draining", True
        capture = f"capture:{h.name}"
        apply = f"apply:{h.name}"
        with anyio.move_on_after(timeout) as scope:
            if capture in h.actors:
                if h.wake_capture is not None:
                    h.wake_capture()
                await self.sup.wait(capture)  # ends once caught up with the source
                h.actors.remove(capture)
            while True:
                depth = await self.outbox_depth(h.name)
                if not depth:
                    break
                await anyio.sleep(0.1)
            if apply in h.actors:
                await self.sup.wait(apply)  # the sink loop ends once nothing is pending
                h.actors.remove(apply)
        if scope.cancelled_caught:
            depth = await self.outbox_depth(h.name)
            left = f"{depth} envelopes still in the outbox" if depth else "sink still has messages pending"
            h.detail = f"drain incomplete after {timeout:g}s: {left}"
            return outcome(False, f"{h.detail}; still draining (resume to run normally again)")
        await self._stop(h, "drained", "drained: outbox empty, nothing pending")
        return outcome(True, "drained: outbox empty and nothing pending; stopped until resumed")
