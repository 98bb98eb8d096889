"""Saga definitions (README "Orchestration (sagas)"): the orchestrator's TOML, typed and checked.

An ``orchestrator.toml`` holds ``[orchestrator]`` (the replica's identity and lease), ``[nats]``
and one ``[[sagas]]`` table per saga: a ``trigger`` (an event or command subject, consumed by the
durable consumer ``saga-<name>``) and ``steps``. Each step is one of

* ``call``: a request to a system API (``api.<system>.<entity>.<operation>``) with a JSON body
  built from ``request``;
* ``publish_await``: publish a command (``cmd.>``) built from ``request``, then wait for an event
  on ``await_event`` whose fields equal ``match``;
* ``wait``: until ``duration`` seconds after the step starts, or until ``until`` (a template
  that yields unix seconds or an ISO-8601 time).

Every step has a per-attempt ``timeout``, a ``retry`` policy (attempts, backoff) and optionally a
``compensate`` call run when a later step fails.

Templates: a string that is exactly ``"$<path>"`` is replaced by the value at ``path`` (any
type); ``"${<path>}"`` inside a longer string is replaced by the value's text. Paths start at
``trigger`` (the triggering event: ``id``, ``key``, ``kind``, ``correlation_id``, ``payload``...),
``steps.<earlier step>`` (that step's result) or ``saga`` (``id``, ``name``, ``error``: why it
compensates, for a compensation's request). :func:`load_orchestrator_config`
checks every path's root and step name, so a typo is a config error naming file and field.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from mesh._config_base import ConfigStruct, PositiveFloat, PositiveInt, Token
from mesh.config import NatsConfig, TraceConfig, validation_problem
from mesh.errors import ConfigError, ConfigProblem

__all__ = [
    "CompensateDef",
    "OrchestratorConfig",
    "OrchestratorSettings",
    "RetryPolicy",
    "SagaDef",
    "StepDef",
    "TriggerDef",
    "load_orchestrator_config",
    "parse_orchestrator_config",
    "render",
    "resolve_path",
]

_PATH = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_EMBEDDED = re.compile(r"\$\{([^}]*)\}")
_ROOTS = ("trigger", "steps", "saga")


class RetryPolicy(ConfigStruct, frozen=True):
    """``attempts`` in all (1: no retry); the n-th retry waits ``backoff * multiplier**(n-1)``
    seconds, at most ``max_backoff``."""

    attempts: PositiveInt = 3
    backoff: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    multiplier: Annotated[float, msgspec.Meta(ge=1)] = 2.0
    max_backoff: PositiveFloat = 60.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return float(min(self.max_backoff, self.backoff * self.multiplier ** max(0, attempt - 1)))


class CompensateDef(ConfigStruct, frozen=True):
    """The call that undoes a completed step (idempotency key ``<saga id>:<step>:compensate``)."""

    subject: str
    request: dict[str, Any] = msgspec.field(default_factory=dict)
    timeout: PositiveFloat = 10.0
    retry: RetryPolicy = RetryPolicy(attempts=5)


class StepDef(ConfigStruct, frozen=True):
    """One step of a saga (see the module docstring for the kinds and templates)."""

    name: Token
    kind: Literal["call", "publish_await", "wait"] = "call"
    subject: str = ""
    """call: the API subject; publish_await: the command subject (``cmd.>``)."""
    request: dict[str, Any] = msgspec.field(default_factory=dict)
    await_event: str = ""
    """publish_await: the event subject to wait on (wildcards allowed)."""
    match: dict[str, Any] = msgspec.field(default_factory=dict)
    """publish_await: event path -> template; every one must be equal."""
    duration: Annotated[float, msgspec.Meta(ge=0)] | None = None
    until: str | None = None
    timeout: PositiveFloat = 10.0
    """Seconds per attempt (call: the API deadline; publish_await: the wait for the event)."""
    retry: RetryPolicy = RetryPolicy()
    compensate: CompensateDef | None = None


class TriggerDef(ConfigStruct, frozen=True):
    """What starts a saga: each message on ``subject`` (an ``evt.>`` event or a ``cmd.>``
    command) starts one, with a saga id derived from the message (a redelivered message starts
    no second saga)."""

    subject: str


class SagaDef(ConfigStruct, frozen=True):
    name: Token
    trigger: TriggerDef
    steps: list[StepDef]
    description: str = ""


class OrchestratorSettings(ConfigStruct, frozen=True):
    name: Token = "orchestrator"
    """The NATS identity (its creds allow the inbox ``_INBOX.<name>``)."""
    replica: str = ""
    """This replica's id in saga leases (default: ``<name>-<host>-<pid>``)."""
    lease: PositiveFloat = 15.0
    """Seconds a claimed saga stays this replica's without a heartbeat; a dead replica's sagas
    are taken over after it."""
    metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] | None = None
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on this port (0: a free one)."""
    metrics_host: str = "127.0.0.1"
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"


class OrchestratorConfig(ConfigStruct, frozen=True):
    orchestrator: OrchestratorSettings = OrchestratorSettings()
    nats: NatsConfig = NatsConfig()
    sagas: list[SagaDef] = msgspec.field(default_factory=list)
    trace: TraceConfig = TraceConfig()
    """``saga_step`` records to ``trace.<orchestrator name>.saga_step`` (``link_window`` unused)."""

    def saga(self, name: str) -> SagaDef | None:
        return next((s for s in self.sagas if s.name == name), None)


def resolve_path(ctx: dict[str, Any], path: str) -> Any:
    """The value at dotted ``path`` in ``ctx`` (list items by index).

    Raises:
        KeyError: a part of the path is missing (the message names the path).
    """
    value: Any = ctx
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise KeyError(f"${path}: no {part!r} there")
    return value


def render(template: Any, ctx: dict[str, Any]) -> Any:
    """``template`` with every ``"$path"`` / ``"${path}"`` replaced from ``ctx`` (recursively
    through dicts and lists). Raises KeyError naming a missing path."""
    if isinstance(template, dict):
        return {k: render(v, ctx) for k, v in template.items()}
    if isinstance(template, list):
        return [render(v, ctx) for v in template]
    if isinstance(template, str):
        if template.startswith("$") and not template.startswith("${") and _PATH.match(template[1:]):
            return resolve_path(ctx, template[1:])
        return _EMBEDDED.sub(lambda m: str(resolve_path(ctx, m.group(1))), template)
    return template


def _paths(template: Any) -> list[str]:
    if isinstance(template, dict):
        return [p for v in template.values() for p in _paths(v)]
    if isinstance(template, list):
        return [p for v in template for p in _paths(v)]
    if isinstance(template, str):
        if template.startswith("$") and not template.startswith("${"):
            return [template[1:]]
        return _EMBEDDED.findall(template)
    return []


def _check_paths(template: Any, where: str, known_steps: set[str]) -> list[ConfigProblem]:
    problems = []
    for path in _paths(template):
        root = path.split(".")[0]
        if not _PATH.match(path):
            problems.append(ConfigProblem(where, f"${path}: a path is dot-separated names"))
        elif root not in _ROOTS:
            problems.append(ConfigProblem(where, f"${path}: a path starts with trigger, steps or saga"))
        elif root == "steps":
            parts = path.split(".")
            if len(parts) < 2 or parts[1] not in known_steps:
                name = parts[1] if len(parts) > 1 else ""
                problems.append(
                    ConfigProblem(where, f"${path}: no earlier step {name!r} (known: {sorted(known_steps)})")
                )
    return problems


def _check_saga(saga: SagaDef, at: str) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    if not saga.steps:
        problems.append(ConfigProblem(f"{at}.steps", "a saga needs at least one step"))
    if not saga.trigger.subject.startswith(("evt.", "cmd.")):
        problems.append(
            ConfigProblem(f"{at}.trigger.subject", "must be an event (evt.>) or a command (cmd.>) subject")
        )
    seen: set[str] = set()
    for i, step in enumerate(saga.steps):
        where = f"{at}.steps[{i}]"
        if step.name in seen:
            problems.append(ConfigProblem(f"{where}.name", f"step {step.name!r} is declared twice"))
        if step.kind == "call" and not step.subject.startswith("api."):
            problems.append(ConfigProblem(f"{where}.subject", "a call step needs an api.> subject"))
        if step.kind == "publish_await":
            if not step.subject.startswith("cmd."):
                problems.append(ConfigProblem(f"{where}.subject", "publish_await publishes a cmd.> subject"))
            if not step.await_event.startswith("evt."):
                problems.append(
                    ConfigProblem(f"{where}.await_event", "publish_await awaits an evt.> subject")
                )
            if not step.match:
                problems.append(
                    ConfigProblem(f"{where}.match", "publish_await needs a match (event path = value)")
                )
        if step.kind == "wait" and (step.duration is None) == (step.until is None):
            problems.append(ConfigProblem(where, "a wait step needs exactly one of duration and until"))
        if step.kind != "wait" and (step.duration is not None or step.until is not None):
            problems.append(ConfigProblem(where, f"duration/until only apply to wait steps, not {step.kind}"))
        problems += _check_paths(step.request, f"{where}.request", seen)
        problems += _check_paths(step.match, f"{where}.match", seen)
        problems += _check_paths(step.until, f"{where}.until", seen)
        seen.add(step.name)
        if step.compensate is not None:
            if not step.compensate.subject.startswith("api."):
                problems.append(
                    ConfigProblem(f"{where}.compensate.subject", "a compensation calls an api.> subject")
                )
            problems += _check_paths(step.compensate.request, f"{where}.compensate.request", seen)
    return problems


def parse_orchestrator_config(
    text: str, *, source: str = "<string>", base: Path | None = None
) -> OrchestratorConfig:
    """Parse and check an orchestrator config from TOML text.

    Raises:
        ConfigError: invalid TOML, unknown keys, wrong types, or inconsistent sagas; every
            problem names ``source`` and the field path.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", source=source) from None
    try:
        cfg = msgspec.convert(raw, OrchestratorConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(source=source, problems=[validation_problem(exc)]) from None
    problems: list[ConfigProblem] = []
    names: set[str] = set()
    for i, saga in enumerate(cfg.sagas):
        if saga.name in names:
            problems.append(ConfigProblem(f"sagas[{i}].name", f"saga {saga.name!r} is declared twice"))
        names.add(saga.name)
        problems += _check_saga(saga, f"sagas[{i}]")
    if problems:
        raise ConfigError(source=source, problems=problems)
    if cfg.nats.creds is not None and base is not None:
        creds = Path(cfg.nats.creds).expanduser()
        nats = msgspec.structs.replace(cfg.nats, creds=str(creds if creds.is_absolute() else base / creds))
        cfg = msgspec.structs.replace(cfg, nats=nats)
    return cfg


def load_orchestrator_config(path: str | Path) -> OrchestratorConfig:
    """Load and check the orchestrator config file at ``path`` (relative paths in it are
    relative to the file). Raises ConfigError (see :func:`parse_orchestrator_config`)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config: {exc.strerror}", source=str(file)) from None
    return parse_orchestrator_config(text, source=str(file), base=file.resolve().parent)
