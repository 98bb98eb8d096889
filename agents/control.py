"""A connector agent's side of the control plane: its assignment and its commands.

* :meth:`ControlChannel.watch_assignments` follows key ``agent.<name>`` of KV bucket
  ``mesh_assign`` and hands every new :class:`~mesh.controlplane.models.Assignment` to the
  :class:`~agents.flows.FlowManager`. Only a registered agent (credentials in its state dir)
  follows it; a deleted key (flow deleted, agent revoked or deregistered) means "no assigned
  flows". No KV watcher: its key filter sits in a request body no permission can limit. The
  agent reads its key by a JetStream direct get that names the key in its subject
  (:meth:`~mesh.transport.Transport.read_key`) and learns of changes from a core subscription
  on ``$KV.mesh_assign.agent.<name>`` (every put and delete is published there), reading the
  key again on each. A core subscription misses what is published while the connection is
  away, so the key is read again after every reconnect and every ``resync_every`` seconds (the
  manager ignores an assignment it already runs).
  Security on, the assignment carries the agent's user JWT for exactly its flows: when it
  differs from the one in the agent's creds file (``creds``), the file is rewritten (same seed,
  mode 0600, atomically) and the connection re-established with it **before** the flows are
  synced, so new flows start with the permissions they need.
* :meth:`ControlChannel.serve_commands` answers ``<prefix>.agent.<name>`` requests
  (:class:`~mesh.controlplane.models.AgentCommand`: pause, resume, drain, restart) with a
  :class:`~mesh.controlplane.models.CommandResult`; a malformed request gets a failed result
  naming the problem, never silence. ``preflight`` (``meshctl flow apply --dry-run --connect``)
  checks the flow config it carries exactly as the agent would run it (its path confinement and
  allowed environment variables, then :mod:`mesh.preflight` against the real systems), or the
  flows it runs when it carries none; it changes nothing. Each problem is one failed outcome.
  ``run`` (``meshctl runs start FLOW --agent A``) starts a bulk run of a scheduled flow now
  (:class:`~mesh.runs.bulk.RunTrigger`) and answers with the run's id once it started.
  In the same task group it answers reconciliation
  requests on ``<prefix>.reconcile.<name>`` (:class:`~mesh.reconcile.ReconcileService`) for the
  flows the manager runs.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import anyio
import anyio.to_thread
import msgspec
from anyio.abc import TaskStatus

from agents.flows import FlowManager, flow_from_assignment
from mesh.config import FlowConfig
from mesh.controlplane.client import DEFAULT_PREFIX
from mesh.controlplane.identity import load_credentials
from mesh.controlplane.models import (
    ASSIGN_BUCKET,
    AgentCommand,
    Assignment,
    CommandResult,
    FlowOutcome,
    encode,
)
from mesh.errors import ConfigError, ConfigProblem, TransportError
from mesh.preflight import preflight_flow
from mesh.readiness import Readiness
from mesh.reconcile import ReconcileService, reconcile_subject
from mesh.runs.bulk import RunTrigger
from mesh.security.authority import read_creds, write_creds
from mesh.security.jwt import InvalidToken, UserClaims, decode
from mesh.transport import Entry, Message, Refused, Subscription, Transport

__all__ = ["ControlChannel", "command_subject"]

log = logging.getLogger(__name__)

_assignment = msgspec.json.Decoder(Assignment)
_command = msgspec.json.Decoder(AgentCommand)


def command_subject(agent: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The subject an agent takes commands on."""
    return f"{prefix}.agent.{agent}"


class ControlChannel:
    def __init__(
        self,
        name: str,
        state_dir: str | Path,
        nats: Callable[[], Awaitable[Transport]],
        flows: FlowManager,
        *,
        prefix: str = DEFAULT_PREFIX,
        resync_every: float = 30.0,
        retry_every: float = 5.0,
        readiness: Readiness | None = None,
        creds: str | Path | None = None,
        system: str = "",
        run_triggers: Mapping[str, RunTrigger] | None = None,
    ) -> None:
        """``creds``: the agent's ``[nats] creds`` file, rewritten when its assignment brings a
        new JWT (None: security off, JWTs in assignments are ignored). ``run_triggers``: per
        scheduled flow, what the ``run`` command pulls (``meshctl runs start``)."""
        self.run_triggers: Mapping[str, RunTrigger] = run_triggers if run_triggers is not None else {}
        self.creds = Path(creds) if creds is not None else None
        self.system = system
        self.name = name
        self.readiness = readiness
        if readiness is not None:
            readiness.require("assignments")  # met once the assigned flows are loaded (or none can be)
        self.state_dir = Path(state_dir)
        self.nats = nats
        self.flows = flows
        self.prefix = prefix
        self.resync_every = resync_every
        self.retry_every = retry_every

    def __repr__(self) -> str:
        return f"<ControlChannel {self.name}>"

    # --- assignments ---------------------------------------------------------------------------

    async def watch_assignments(self, task_status: TaskStatus[None]) -> None:
        task_status.started()
        transport = await self.nats()
        key = f"agent.{self.name}"
        told = ""
        while True:
            why = await self._why_not(transport)
            if why:
                if self.readiness is not None:
                    self.readiness.set("assignments", detail=f"none: {why}")
                if why != told:
                    log.info("agent %s: no assigned flows for now (%s)", self.name, why)
                    told = why
                await anyio.sleep(self.retry_every)
                continue
            told = ""
            try:
                async with await transport.subscribe(f"$KV.{ASSIGN_BUCKET}.{key}") as sub:
                    await self._follow(transport, sub, key)
            except TransportError as exc:
                # A refusal (credentials that do not cover this agent's key) is the operator's
                # to fix: say it; anything else is a broker that is away for a moment.
                level = logging.WARNING if isinstance(exc, Refused) else logging.DEBUG
                log.log(level, "agent %s: cannot follow its assignment (%s/%s): %s", self.name,
                        ASSIGN_BUCKET, key, exc)  # fmt: skip
                await anyio.sleep(self.retry_every)

    async def _why_not(self, js: Transport) -> str:
        """Why the agent cannot follow its assignment now ("" when it can)."""
        if not js.is_connected:
            return "NATS disconnected"
        try:
            creds = await anyio.to_thread.run_sync(load_credentials, self.state_dir)
        except ConfigError as exc:
            return str(exc)
        if creds is None or creds.name != self.name:
            return "not registered (`meshctl agent register`)"
        return ""

    async def _follow(self, transport: Transport, sub: Subscription, key: str) -> None:
        """Read the key (the subscription is already in place, so no change can slip between),
        then again on every message on its subject, until a reconnect or ``resync_every``.

        Raises:
            TransportError: the key could not be read (the caller retries).
        """
        reconnects = transport.reconnects
        until = anyio.current_time() + self.resync_every
        last = await self._apply(await transport.read_key(ASSIGN_BUCKET, key), None, first=True,
                                 transport=transport)  # fmt: skip
        if self.readiness is not None:
            self.readiness.set("assignments")
        while anyio.current_time() < until and transport.reconnects == reconnects:
            if await sub.next(timeout=1.0) is None:
                continue
            last = await self._apply(await transport.read_key(ASSIGN_BUCKET, key), last, transport=transport)

    async def _renew_creds(self, jwt: str, transport: Transport) -> None:
        """Write ``jwt`` into the creds file (same seed) and reconnect, unless it is the JWT the
        file already holds or not one for this agent's key (then logged, nothing changes).

        Raises:
            TransportError: the reconnect did not complete (the caller retries).
        """
        if self.creds is None or not jwt:
            return
        path = self.creds
        try:
            current = await anyio.to_thread.run_sync(read_creds, path)
            claims = decode(jwt, kind=UserClaims)
        except (ConfigError, InvalidToken) as exc:
            log.error("agent %s: cannot take the JWT of its assignment (%s): %s", self.name, path, exc)
            return
        if current.jwt == jwt:
            return
        if claims.sub != current.public_key or claims.name != self.name:
            log.error("agent %s: its assignment carries a JWT for another key or name (%s, %s); "
                      "register it again", self.name, claims.name, claims.sub[:12])  # fmt: skip
            return
        await anyio.to_thread.run_sync(write_creds, path, jwt, current.seed)
        log.info("agent %s: new NATS credentials for its assigned flows; reconnecting", self.name)
        await transport.reconnect()

    async def _apply(
        self,
        entry: Entry | None,
        last: int | None,
        *,
        first: bool = False,
        transport: Transport | None = None,
    ) -> int | None:
        """Hand the assignment in ``entry`` (None: deleted, no flows) to the flow manager unless
        it is the revision handed over last; returns the revision now in force (0: none)."""
        revision = entry.revision if entry is not None else 0
        if revision == last and not first:
            return last
        if entry is None or not entry.value:
            await self.flows.sync(None)
            return revision
        try:
            assignment = _assignment.decode(entry.value)
        except msgspec.DecodeError as exc:
            log.error("agent %s: unreadable assignment (rev %s): %s", self.name, entry.revision, exc)
            return revision
        if transport is not None:
            await self._renew_creds(assignment.credentials_jwt, transport)
        await self.flows.sync(assignment)
        return revision

    # --- commands ------------------------------------------------------------------------------

    async def serve_commands(self, task_status: TaskStatus[None]) -> None:
        """Answer commands until cancelled; marks readiness "commands" once the broker routes
        them here (the subscription is flushed to the server).

        Raises:
            TransportError: the subscription failed or ended; the supervisor restarts it.
        """
        task_status.started()
        transport = await self.nats()
        subject = command_subject(self.name, self.prefix)
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(functools.partial(transport.serve, subject, self._answer))
                reconcile = ReconcileService(self.name, self.system, self._flow_config)
                # one scan at a time: a reconciliation reads whole tables
                at = reconcile_subject(self.name, self.prefix)
                await tg.start(functools.partial(transport.serve, at, reconcile.answer, max_concurrent=1))
                if self.readiness is not None:
                    self.readiness.set("commands")
        finally:
            if self.readiness is not None:
                self.readiness.clear("commands", "command channel closed")

    def _flow_config(self, name: str) -> FlowConfig | None:
        h = self.flows.flows.get(name)
        return h.cfg if h is not None else None

    async def _answer(self, msg: Message) -> bytes:
        try:
            cmd = _command.decode(msg.data)
        except msgspec.DecodeError as exc:
            result = CommandResult(ok=False, message=f"bad command: {exc}")
        else:
            try:
                if cmd.op == "preflight":
                    result = await self._preflight(cmd)
                elif cmd.op == "run":
                    result = await self._run_now(cmd)
                else:
                    result = await self.flows.command(cmd)
            except Exception as exc:  # an answer, whatever happened: the operator is waiting
                log.exception("command %s failed", cmd.op)
                result = CommandResult(ok=False, message=f"{cmd.op} failed on {self.name}: {exc!r}")
        return encode(result)

    async def _run_now(self, cmd: AgentCommand) -> CommandResult:
        """Start a bulk run of the scheduled flow ``cmd.flow`` now; answers once it started (with
        its id) or why not: no such flow here, not scheduled, a run in progress, or the source did
        not start it within ``cmd.timeout`` (paused, failing)."""
        name = cmd.flow
        if name is None:
            return CommandResult(ok=False, message="run: name the flow (meshctl runs start FLOW --agent A)")
        handle = self.flows.flows.get(name)
        if handle is None or handle.cfg.source is None:
            return CommandResult(ok=False, message=f"agent {self.name} runs no source of flow {name!r}")
        trigger = self.run_triggers.get(name)
        if handle.cfg.schedule is None or trigger is None:
            why = f"flow {name} on agent {self.name} has no [flows.schedule]: its source runs continuously"
            return CommandResult(ok=False, message=why)
        ok, what = await trigger.run_now(cmd.timeout)
        message = f"run {what} started" if ok else what
        outcome = FlowOutcome(agent=self.name, flow=name, ok=ok, state=handle.state, message=message)
        return CommandResult(ok=ok, message=message, outcomes=[outcome])

    async def _preflight(self, cmd: AgentCommand) -> CommandResult:
        """Check ``cmd.config`` (or the flows this agent runs) against the real systems."""
        flows = self.flows
        checks: list[tuple[str, FlowConfig | list[ConfigProblem]]] = []
        if cmd.config is not None:
            name = cmd.flow or str(cmd.config.get("name", "?"))
            try:
                cfg = await anyio.to_thread.run_sync(
                    flow_from_assignment, cmd.config, flows.state_dir, flows.allowed_paths, flows.allowed_env
                )
            except ConfigError as exc:  # it would not even start here
                checks.append((name, list(exc.problems)))
            else:
                checks.append((name, cfg))
        else:
            names = [cmd.flow] if cmd.flow is not None else sorted(flows.flows)
            for name in names:
                handle = flows.flows.get(name)
                missing = [ConfigProblem("flow", f"agent {self.name} runs no flow named {name!r}")]
                checks.append((name, handle.cfg if handle is not None else missing))
        outcomes: list[FlowOutcome] = []
        with anyio.move_on_after(cmd.timeout) as scope:
            for name, check in checks:
                problems = check if isinstance(check, list) else await preflight_flow(check, "flow")
                outcomes += [
                    FlowOutcome(agent=self.name, flow=name, ok=False, state="preflight",
                                message=f"{p.path}: {p.message}" if p.path else p.message)
                    for p in problems
                ] or [FlowOutcome(agent=self.name, flow=name, ok=True, state="preflight",
                                  message="every source and sink reached")]  # fmt: skip
        if scope.cancelled_caught:
            return CommandResult(ok=False, message=f"preflight did not finish within {cmd.timeout:g}s",
                                 outcomes=outcomes)  # fmt: skip
        ok = all(o.ok for o in outcomes)
        return CommandResult(ok=ok, message="" if ok else f"{sum(not o.ok for o in outcomes)} problem(s)",
                             outcomes=outcomes)  # fmt: skip
