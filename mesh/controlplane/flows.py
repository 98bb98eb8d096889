"""Flows applied through the control plane: validation, storage, assignments, commands.

A *flow file* is TOML with one or more ``[[flows]]`` tables, each an agent config's flow table
(name, entity, source, sink, consumer, retry, ...) whose sides name the agent that runs them::

    [[flows]]
    name = "customers"
    entity = "customer"
    [flows.source]
    agent = "erp-agent"          # or `agent = ...` on the flow for both sides
    adapter = "sqlite"
    path = "erp.db"              # paths are the agent's: relative ones resolve against its state_dir
    table = "customers"
    key = "id"
    [flows.sink]
    agent = "crm-agent"
    adapter = "rest"
    ...

Guarantees:

* **Nothing is stored unless the whole file is valid**, and a refusal lists every problem with
  its path (``flows.toml: flows[1].sink.table: Expected `str`, got `int```): TOML syntax, unknown
  keys, types, adapters that do not exist, agents that are not registered or revoked, an agent
  whose manifest lacks the adapter, duplicate names, and a file path (any path field of any
  adapter, SQLite lookups) that would resolve outside the agent's ``state_dir`` and its
  ``allowed_paths`` (``../`` escapes, absolute paths elsewhere), with the field path. Dry run
  and real apply run the same validation, so they agree.
* Each flow is one KV entry (``mesh_flows``, key ``flow.<name>``) written by compare-and-swap;
  re-applying an unchanged flow changes nothing (same generation), a changed one bumps the
  generation. An agent's share of every flow is written to its assignment (``mesh_assign``,
  ``agent.<name>``); :meth:`FlowStore.reconcile` recomputes all assignments from the flows and
  the registry and repairs any drift (a leader that died between the two writes, an agent revoked).
* The desired state (``running`` / ``paused``) is part of the flow, so a paused flow stays paused
  across agent restarts and re-applies.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import time
import tomllib
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from mesh.config import FlowConfig, check_flow, decode_adapter_config, decode_flow
from mesh.controlplane.kv import Bucket, Entry, KvMirror, RevisionConflict
from mesh.controlplane.models import (
    AgentRecord,
    ApplyFlows,
    AssignedFlow,
    Assignment,
    DeleteFlow,
    DesiredState,
    Done,
    FlowChange,
    FlowPart,
    FlowsApplied,
    FlowSpec,
    Manifest,
    Refused,
    encode,
)
from mesh.errors import ConfigError
from mesh.flowdata import compile_flow_data
from mesh.plugins import RoleName
from mesh.secrets import env_problems

if TYPE_CHECKING:
    from mesh.controlplane.enroll import Enrollment

__all__ = [
    "FlowStore",
    "ParsedFlow",
    "assignment_key",
    "confinement_problems",
    "flow_key",
    "parse_flow_file",
]

log = logging.getLogger(__name__)

_spec = msgspec.json.Decoder(FlowSpec)
_assignment = msgspec.json.Decoder(Assignment)
_record = msgspec.json.Decoder(AgentRecord)
_ATTEMPTS = 5
_SIDES: tuple[RoleName, ...] = ("source", "sink")

AuditFn = Callable[[str, str, str, str, dict[str, str]], Awaitable[object]]


def flow_key(name: str) -> str:
    return f"flow.{name}"


def assignment_key(agent: str) -> str:
    return f"agent.{agent}"


class ParsedFlow(msgspec.Struct, frozen=True):
    name: str
    entity: str
    parts: list[FlowPart]


def parse_flow_file(
    text: str, source: str, agents: Mapping[str, AgentRecord]
) -> tuple[list[ParsedFlow], list[str]]:
    """Validate a flow file against the registered ``agents``: (flows, problems).

    ``problems`` holds one line per problem, ``<source>: <path>: <what>``; the flows are only
    meaningful when it is empty.
    """
    problems: list[str] = []

    def problem(path: str, message: str) -> None:
        problems.append(f"{source}: {path}: {message}" if path else f"{source}: {message}")

    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        problem("", f"not valid TOML: {exc}")
        return [], problems
    for key in raw:
        if key != "flows":
            problem(key, "unknown key (a flow file holds [[flows]] tables only)")
    tables = raw.get("flows")
    if not isinstance(tables, list) or not tables:
        problem("flows", "expected one or more [[flows]] tables")
        return [], problems
    parsed: list[ParsedFlow] = []
    seen: dict[str, int] = {}
    for i, table in enumerate(tables):
        path = f"flows[{i}]"
        if not isinstance(table, dict):
            problem(path, "expected a table")
            continue
        table = dict(table)
        default_agent = table.pop("agent", None)
        sides: dict[RoleName, tuple[str | None, dict[str, Any]]] = {}
        for side in _SIDES:
            if side not in table:
                continue
            part = table.pop(side)
            if not isinstance(part, dict):
                problem(f"{path}.{side}", "expected a table")
                continue
            part = dict(part)
            agent = part.pop("agent", default_agent)
            sides[side] = (agent, part)
        # The flow's own fields (name, entity, consumer, retry, ...), checked without its sides.
        common: FlowConfig | None
        try:
            common = decode_flow(table, path=path)
        except ConfigError as exc:
            for p, m in exc.problems:
                problem(p, m)
            common = None
        if common is not None:
            if common.name in seen:
                problem(
                    f"{path}.name", f"duplicate flow name {common.name!r} (also flows[{seen[common.name]}])"
                )
            seen[common.name] = i
        if not sides:
            problem(path, "a flow needs a [source], a [sink] or both")
        by_agent: dict[str, dict[str, Any]] = {}
        for side, (agent, part) in sides.items():
            where = f"{path}.{side}"
            try:
                decode_adapter_config(side, part, path=where)
            except ConfigError as exc:
                for p, m in exc.problems:
                    problem(p, m)
            if agent is None:
                problem(f"{where}.agent", "required: the registered agent that runs this side")
                continue
            if not isinstance(agent, str):
                problem(f"{where}.agent", f"expected an agent name, got {type(agent).__name__}")
                continue
            rec = agents.get(agent)
            if rec is None:
                known = ", ".join(sorted(agents)) or "none"
                problem(f"{where}.agent", f"no registered agent named {agent!r} (registered: {known})")
                continue
            if rec.state == "revoked":
                problem(f"{where}.agent", f"agent {agent!r} is revoked")
                continue
            adapter = part.get("adapter")
            if isinstance(adapter, str) and adapter not in rec.manifest.adapters:
                have = ", ".join(rec.manifest.adapters) or "none"
                problem(
                    f"{where}.adapter",
                    f"agent {agent!r} does not support adapter {adapter!r} (its manifest lists: {have})",
                )
            by_agent.setdefault(agent, dict(table))[side] = part
        if common is None:
            continue
        parts = []
        for agent, config in by_agent.items():
            try:
                flow = decode_flow(config, path=path)
            except ConfigError:
                continue  # reported above, side by side
            for p, m in check_flow(flow, path):
                problem(p, m)
            for p, m in confinement_problems(flow, agents[agent].manifest, path):
                problem(p, m)
            allowed_env = agents[agent].manifest.allowed_env
            if allowed_env is not None:
                for p, m in env_problems(config, allowed_env, path):
                    problem(p, m)
            # Mappings and ownership are checked here too, except SQLite lookups: their files
            # are the agent's (it checks them when the flow reaches it and reports failing).
            local = any(
                lk.sqlite
                for m in (flow.to_canonical, flow.from_canonical)
                if m is not None
                for lk in m.lookups.values()
            )
            if not local:
                try:
                    compile_flow_data(flow, source=source, path=path)
                except ConfigError as exc:
                    for p, m in exc.problems:
                        problem(p, m)
            parts.append(FlowPart(agent=agent, config=msgspec.to_builtins(flow)))
        parsed.append(ParsedFlow(name=common.name, entity=common.entity, parts=parts))
    return parsed, list(dict.fromkeys(problems))


_MARK = "\x00mesh-path-{}\x00"


def _path_fields(flow: FlowConfig) -> list[tuple[str, str]]:
    """(field path below the flow, value) of every file path of ``flow``: whatever its adapters'
    ``resolved`` hooks (and the mappings' SQLite lookups) treat as a path, found by marking."""
    values: list[str] = []

    def mark(value: str) -> str:
        values.append(value)
        return _MARK.format(len(values) - 1)

    marked: dict[str, Any] = {}
    for part in ("source", "sink", "to_canonical", "from_canonical"):
        cfg = getattr(flow, part)
        if cfg is not None:
            marked[part] = msgspec.to_builtins(cfg.resolved(mark))
    found: list[tuple[str, str]] = []

    def walk(value: Any, where: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{where}.{k}" if where else str(k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]")
        elif isinstance(value, str) and value.startswith("\x00mesh-path-"):
            found.append((where, values[int(value.strip("\x00").rsplit("-", 1)[1])]))

    walk(marked, "")
    return found


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def confinement_problems(flow: FlowConfig, manifest: Manifest, where: str) -> list[tuple[str, str]]:
    """(field path, message) for every file path of ``flow`` that would resolve outside the
    agent's ``state_dir`` and ``allowed_paths`` (as its manifest reports them).

    The check is lexical (``..`` collapsed): the paths are the agent's, not this machine's. The
    agent checks again with symlinks followed before it runs the flow
    (:func:`agents.flows.flow_from_assignment`), so this is the early refusal, not the only one.
    """
    problems: list[tuple[str, str]] = []
    state_dir = manifest.state_dir
    roots = [posixpath.normpath(r) for r in ([state_dir] if state_dir else []) + manifest.allowed_paths]
    allowed = ", ".join(roots) if roots else "its state_dir"
    for field, value in _path_fields(flow):
        if value.startswith("~"):
            problems.append((f"{where}.{field}", (
                f"path {value!r} names a home directory; use a path relative to the agent's "
                "state_dir or an absolute one inside the directories it allows"
            )))  # fmt: skip
            continue
        if posixpath.isabs(value):
            full = posixpath.normpath(value)
        elif state_dir:
            full = posixpath.normpath(posixpath.join(state_dir, value))
        else:
            full = posixpath.normpath(value)
            if full == ".." or full.startswith("../"):
                problems.append((f"{where}.{field}", (
                    f"path {value!r} leads outside the agent's state_dir (.. escapes are refused)"
                )))  # fmt: skip
            continue
        if not roots or not any(_inside(full, r) for r in roots):
            problems.append((f"{where}.{field}", (
                f"path {value!r} resolves to {full}, outside the directories this agent allows "
                f"for applied flows ({allowed}; see agent.allowed_paths in its config)"
            )))  # fmt: skip
    return problems


def _digest(parts: list[FlowPart]) -> str:
    data = msgspec.json.encode(sorted(parts, key=lambda p: p.agent), order="sorted")
    return hashlib.sha256(data).hexdigest()


def _forget(cache: dict[str, Any], present: Mapping[str, object]) -> None:
    """Drop from ``cache`` the names no longer ``present`` (only when some are gone)."""
    if len(cache) > len(present) or any(name not in present for name in cache):
        for gone in [name for name in cache if name not in present]:
            del cache[gone]


class FlowStore:
    """Leader-side flow operations on ``mesh_flows`` and ``mesh_assign`` (with mirrors of both
    and of ``mesh_agents`` for reads)."""

    def __init__(
        self,
        flows: Bucket,
        assign: Bucket,
        *,
        flows_mirror: KvMirror,
        assign_mirror: KvMirror,
        agents_mirror: KvMirror,
        audit: AuditFn | None = None,
        security: Enrollment | None = None,
    ) -> None:
        """``security``: security on; every registered agent then has an assignment carrying
        its user JWT, re-issued whenever its flows (so its permissions) change."""
        self.security = security
        self.flows = flows
        self.assign = assign
        self.flows_mirror = flows_mirror
        self.assign_mirror = assign_mirror
        self.agents_mirror = agents_mirror
        self._audit = audit
        # Decoded entries and permission digests by KV revision: a registration runs reconcile()
        # over every agent, which would otherwise decode every record and recompute every
        # digest each time (quadratic in a registration storm).
        self._specs: dict[str, tuple[int, FlowSpec]] = {}
        self._records: dict[str, tuple[int, AgentRecord]] = {}
        self._assignments: dict[str, tuple[int, Assignment | None]] = {}
        self._grants: dict[str, tuple[int, bytes, str]] = {}

    def __repr__(self) -> str:
        return f"<FlowStore flows={len(self.specs())}>"

    # --- reads (any replica) -------------------------------------------------------------------

    def specs(self) -> dict[str, FlowSpec]:
        out = {}
        entries = self.flows_mirror.with_prefix("flow.")
        _forget(self._specs, entries)
        for name, e in entries.items():
            cached = self._specs.get(name)
            if cached is not None and cached[0] == e.revision:
                out[name] = cached[1]
                continue
            try:
                spec = _spec.decode(e.value)
            except msgspec.DecodeError:
                log.error("mesh_flows: unreadable entry %s (revision %d)", e.key, e.revision)
                continue
            self._specs[name] = (e.revision, spec)
            out[name] = spec
        return out

    def agents(self) -> dict[str, AgentRecord]:
        out = {}
        entries = self.agents_mirror.with_prefix("agent.")
        _forget(self._records, entries)
        for name, e in entries.items():
            cached = self._records.get(name)
            if cached is not None and cached[0] == e.revision:
                out[name] = cached[1]
                continue
            try:
                rec = _record.decode(e.value)
            except msgspec.DecodeError:
                continue
            self._records[name] = (e.revision, rec)
            out[name] = rec
        return out

    def _assignment(self, agent: str, entry: Entry) -> Assignment | None:
        cached = self._assignments.get(agent)
        if cached is not None and cached[0] == entry.revision:
            return cached[1]
        try:
            found: Assignment | None = _assignment.decode(entry.value)
        except msgspec.DecodeError:
            found = None
        self._assignments[agent] = (entry.revision, found)
        return found

    def _grant(self, rec: AgentRecord, flows: list[AssignedFlow]) -> str:
        """``security.wanted_digest(rec, flows)``, recomputed only when the agent's record (its
        revision) or its flows changed."""
        assert self.security is not None
        revision = self._records[rec.name][0] if rec.name in self._records else -1
        wanted = msgspec.json.encode(flows)
        cached = self._grants.get(rec.name)
        if cached is not None and revision >= 0 and cached[0] == revision and cached[1] == wanted:
            return cached[2]
        digest = self.security.wanted_digest(rec, flows)
        self._grants[rec.name] = (revision, wanted, digest)
        return digest

    # --- writes (leader) -----------------------------------------------------------------------

    async def _audit_entry(self, kind: str, who: str, target: str, what: str, detail: dict[str, str]) -> None:
        if self._audit is not None:
            try:
                await self._audit(kind, who, target, what, detail)
            except Exception as exc:
                log.error("audit: %s (the %s of %s stands)", exc, kind, target)

    async def apply(self, req: ApplyFlows) -> FlowsApplied | Refused:
        parsed, problems = parse_flow_file(req.text, req.source, self.agents())
        if problems:
            n = len(problems)
            return Refused(
                code="invalid",
                reason=f"{req.source}: {n} problem{'s' if n > 1 else ''}; nothing was applied",
                problems=problems,
            )
        changes: list[FlowChange] = []
        for flow in parsed:
            digest = _digest(flow.parts)
            agents = sorted(p.agent for p in flow.parts)
            current = await self.flows.get(flow_key(flow.name))
            old = _spec.decode(current.value) if current is not None else None
            if old is not None and old.digest == digest:
                changes.append(
                    FlowChange(name=flow.name, action="unchanged", generation=old.generation, agents=agents)
                )
                continue
            action: Literal["created", "updated"] = "created" if old is None else "updated"
            generation = 1 if old is None else old.generation + 1
            changes.append(FlowChange(name=flow.name, action=action, generation=generation, agents=agents))
        if req.dry_run:
            return FlowsApplied(changes=changes, dry_run=True)
        by_name = {f.name: f for f in parsed}
        stored: list[FlowChange] = []
        for change in changes:
            if change.action == "unchanged":
                stored.append(change)
                continue
            flow = by_name[change.name]
            result = await self._store(flow, req)
            if isinstance(result, Refused):
                return result
            stored.append(result)
            on = ", ".join(result.agents)
            what = f"{result.action} flow {flow.name} (generation {result.generation}) on {on}"
            detail = {"generation": str(result.generation), "source": req.source, "agents": on}
            await self._audit_entry("flow_apply", req.actor, flow.name, what, detail)
        await self.reconcile()
        return FlowsApplied(changes=stored)

    async def _store(self, flow: ParsedFlow, req: ApplyFlows) -> FlowChange | Refused:
        key = flow_key(flow.name)
        digest = _digest(flow.parts)
        agents = sorted(p.agent for p in flow.parts)
        for _ in range(_ATTEMPTS):
            current = await self.flows.get(key)
            old = _spec.decode(current.value) if current is not None else None
            if old is not None and old.digest == digest:
                return FlowChange(
                    name=flow.name, action="unchanged", generation=old.generation, agents=agents
                )
            spec = FlowSpec(
                name=flow.name,
                entity=flow.entity,
                parts=flow.parts,
                generation=1 if old is None else old.generation + 1,
                desired=old.desired if old is not None else "running",
                digest=digest,
                applied_at=time.time(),
                applied_by=req.actor or "unknown",
                source=req.source,
            )
            value = encode(spec)
            try:
                if current is None:
                    revision = await self.flows.create(key, value)
                else:
                    revision = await self.flows.update(key, value, current.revision)
            except RevisionConflict:
                continue
            self.flows_mirror.apply(Entry(key, value, revision))
            return FlowChange(
                name=flow.name, action="created" if old is None else "updated",
                generation=spec.generation, agents=agents,
            )  # fmt: skip
        return Refused(
            code="internal", reason=f"flow {flow.name} kept changing while being applied; try again"
        )

    async def delete(self, req: DeleteFlow) -> Done | Refused:
        key = flow_key(req.name)
        for _ in range(_ATTEMPTS):
            current = await self.flows.get(key)
            if current is None:
                return Refused(code="unknown", reason=f"no flow named {req.name!r} is applied")
            spec = _spec.decode(current.value)
            try:
                await self.flows.delete(key, revision=current.revision)
            except RevisionConflict:
                continue
            self.flows_mirror.forget(key, current.revision)
            await self.reconcile()
            agents = ", ".join(sorted(p.agent for p in spec.parts))
            what = f"deleted flow {req.name} (generation {spec.generation}; was on {agents})"
            await self._audit_entry(
                "flow_delete", req.actor, req.name, what, {"generation": str(spec.generation)}
            )
            return Done(message=f"{what}; its agents stop it after in-flight work finishes")
        return Refused(
            code="internal", reason=f"flow {req.name} kept changing while being deleted; try again"
        )

    async def set_desired(self, name: str, desired: DesiredState, actor: str) -> FlowSpec | None:
        """Record ``desired`` for an applied flow; None when no flow of that name is applied."""
        key = flow_key(name)
        for _ in range(_ATTEMPTS):
            current = await self.flows.get(key)
            if current is None:
                return None
            spec = _spec.decode(current.value)
            if spec.desired == desired:
                return spec
            new = msgspec.structs.replace(spec, desired=desired)
            value = encode(new)
            try:
                revision = await self.flows.update(key, value, current.revision)
            except RevisionConflict:
                continue
            self.flows_mirror.apply(Entry(key, value, revision))
            await self.reconcile()
            return new
        raise RevisionConflict(f"flow {name} kept changing")

    def credentials_jwt(self, agent: str) -> str | None:
        """The user JWT in ``agent``'s assignment (security on), None when there is none."""
        entry = self.assign_mirror.get(assignment_key(agent))
        if entry is None or not entry.value:
            return None
        try:
            return _assignment.decode(entry.value).credentials_jwt or None
        except msgspec.DecodeError:
            return None

    async def reconcile(self) -> int:
        """Write every agent's assignment from the flows and the registry; returns how many
        assignments changed. Revoked and unregistered agents get none. Security on: every
        active agent with a public key gets one (possibly without flows) with a JWT for exactly
        these flows, re-issued when its permissions change."""
        specs = self.specs()
        agents = self.agents()
        wanted: dict[str, list[AssignedFlow]] = {}
        if self.security is not None:
            wanted = {n: [] for n, r in agents.items() if r.state != "revoked" and r.public_key}
        for spec in specs.values():
            for part in spec.parts:
                rec = agents.get(part.agent)
                if rec is None or rec.state == "revoked":
                    continue
                wanted.setdefault(part.agent, []).append(
                    AssignedFlow(
                        name=spec.name, generation=spec.generation, desired=spec.desired, config=part.config
                    )
                )
        current = {name: e for name, e in self.assign_mirror.with_prefix("agent.").items()}
        _forget(self._assignments, current)
        _forget(self._grants, agents)
        changed = 0
        for agent, flows in wanted.items():
            flows.sort(key=lambda f: f.name)
            entry = current.get(agent)
            rec = agents[agent]
            grant = ""
            if self.security is not None and rec.public_key:
                grant = self._grant(rec, flows)
            old: Assignment | None = None
            if entry is not None:
                old = self._assignment(agent, entry)
                if old is not None and old.flows == flows and old.credentials_for == grant:
                    continue
            jwt = ""
            if grant and old is not None and old.credentials_for == grant and old.credentials_jwt:
                jwt = old.credentials_jwt  # same permissions (a pause, say): no new JWT, no reconnect
            elif grant:
                assert self.security is not None
                jwt, grant = self.security.issue(rec, flows)
            value = encode(
                Assignment(agent=agent, flows=flows, updated_at=time.time(), credentials_jwt=jwt,
                           credentials_for=grant)
            )  # fmt: skip
            revision = await self.assign.put(assignment_key(agent), value)
            self.assign_mirror.apply(Entry(assignment_key(agent), value, revision))
            changed += 1
        for agent, entry in current.items():
            if agent not in wanted:
                await self.assign.delete(assignment_key(agent))
                self.assign_mirror.forget(assignment_key(agent), entry.revision)
                changed += 1
        if changed:
            log.info("assignments: %d agent(s) updated", changed)
        return changed
