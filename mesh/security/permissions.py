"""The mesh's permission table (README "Security"): what each identity may publish and subscribe.

Pure data and functions, no I/O. Each function returns the :class:`~mesh.security.jwt.Permissions`
that go into a user JWT; everything not listed is denied by nats-server. Every name is checked to
be one NATS subject token (letters, digits, ``_``, ``-``), so no name can widen a permission with
``*``, ``>`` or an extra ``.``.

:func:`permission_table` renders the whole table as Markdown for the README.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from mesh.errors import ConfigError
from mesh.security.jwt import Permission, Permissions, ResponsePermission
from mesh.transport.subjects import COMMANDS_STREAM, DLQ_STREAM, EVENTS_STREAM, consumer_name

if TYPE_CHECKING:
    from mesh.config import AgentConfig
    from mesh.saga.definition import OrchestratorConfig

__all__ = [
    "API_RESULTS_BUCKET",
    "ASSIGN_BUCKET",
    "DEFAULT_PREFIX",
    "admin_permissions",
    "agent_permissions",
    "api_permissions",
    "assignment_get_subject",
    "assignment_subject",
    "control_plane_permissions",
    "enrollment_permissions",
    "inbox_prefix",
    "orchestrator_permissions",
    "permission_table",
    "permissions_for_agent",
    "permissions_for_orchestrator",
    "runs_subject",
    "validate_prefix",
    "validate_token",
]

DEFAULT_PREFIX = "mesh.cp"
ASSIGN_BUCKET = "mesh_assign"
API_RESULTS_BUCKET = "mesh_api_results"
RUNS_BUCKET = "mesh_runs"

_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,200}")


def validate_token(value: str, what: str) -> str:
    """``value`` if it is one NATS subject token (letters, digits, ``_``, ``-``; 1-200 of them).

    Raises:
        ConfigError: naming ``what`` and the value.
    """
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise ConfigError(
            f"{what} {value!r} is not a single NATS subject token: use letters, digits, '_' and '-'"
        )
    return value


def validate_prefix(prefix: str) -> str:
    """``prefix`` if it is one or more tokens joined by ``.`` (no wildcards). Raises ConfigError."""
    for token in prefix.split("."):
        if not _TOKEN.fullmatch(token):
            raise ConfigError(f"subject prefix {prefix!r} must be dot-separated tokens without wildcards")
    return prefix


def inbox_prefix(name: str) -> str:
    """``_INBOX.<name>``: the inbox prefix of every connection of agent ``name``."""
    return f"_INBOX.{validate_token(name, 'agent name')}"


def assignment_subject(name: str) -> str:
    """``$KV.mesh_assign.agent.<name>``: where every change of the agent's assignment is published."""
    return f"$KV.{ASSIGN_BUCKET}.agent.{validate_token(name, 'agent name')}"


def assignment_get_subject(name: str) -> str:
    """The JetStream direct-get subject that reads the agent's assignment key (the key is in
    the subject, so a permission can confine it)."""
    return f"$JS.API.DIRECT.GET.KV_{ASSIGN_BUCKET}.{assignment_subject(name)}"


def runs_subject(name: str) -> str:
    """``$KV.mesh_runs.<name>.>``: the agent's own keys of the run-record bucket (a KV put is a
    JetStream publish to ``$KV.<bucket>.<key>``); other agents' keys stay out of reach."""
    return f"$KV.{RUNS_BUCKET}.{validate_token(name, 'agent name')}.>"


def agent_permissions(
    name: str,
    systems: Iterable[str],
    consumers: Iterable[str],
    flows: Iterable[str],
    prefix: str = DEFAULT_PREFIX,
    *,
    apis: Iterable[str] = (),
) -> Permissions:
    """What agent ``name`` may do, with ``systems`` (the origins it publishes), the durable
    consumers of its assigned flows on MESH_EVENTS, the flows whose DLQ it writes, and the
    systems whose System API it serves (:func:`api_permissions`).

    Raises:
        ConfigError: a name that is not one subject token, or a bad prefix.
    """
    validate_token(name, "agent name")
    validate_prefix(prefix)
    pub: list[str] = []
    pub += [f"evt.*.*.{validate_token(s, 'system')}" for s in sorted(set(systems))]
    pub += [f"dlq.{validate_token(f, 'flow')}" for f in sorted(set(flows))]
    pub.append(f"trace.{name}.*")  # trace records about itself only (mesh.trace)
    pub += [
        f"{prefix}.register.{name}",
        f"{prefix}.heartbeat.{name}",
        f"{prefix}.policy.{name}",  # shared API policy tokens (mesh.policy), as itself only
        "$JS.API.INFO",
        f"$JS.API.STREAM.INFO.{EVENTS_STREAM}",
        f"$JS.API.STREAM.INFO.{DLQ_STREAM}",
    ]
    for c in sorted(set(consumers)):
        validate_token(c, "consumer")
        pub += [
            f"$JS.API.CONSUMER.CREATE.{EVENTS_STREAM}.{c}",
            f"$JS.API.CONSUMER.CREATE.{EVENTS_STREAM}.{c}.>",
            f"$JS.API.CONSUMER.DURABLE.CREATE.{EVENTS_STREAM}.{c}",
            f"$JS.API.CONSUMER.INFO.{EVENTS_STREAM}.{c}",
            f"$JS.API.CONSUMER.MSG.NEXT.{EVENTS_STREAM}.{c}",
            f"$JS.ACK.{EVENTS_STREAM}.{c}.>",
        ]
    pub.append(assignment_get_subject(name))
    pub.append(runs_subject(name))
    sub = [
        f"{inbox_prefix(name)}.>",
        f"{prefix}.agent.{name}",
        f"{prefix}.reconcile.{name}",
        assignment_subject(name),
    ]
    api_pub, api_sub = api_permissions(apis)
    pub += api_pub
    sub += api_sub
    return Permissions(pub=Permission(allow=pub), sub=Permission(allow=sub), resp=ResponsePermission(1, 0))


def api_permissions(systems: Iterable[str]) -> tuple[list[str], list[str]]:
    """(publish, subscribe) subjects to serve the System API of each of ``systems`` (README
    "System APIs"): its endpoints ``api.S.>``, the NATS services discovery subjects of its
    service ``mesh-S``, and compare-and-swap writes and direct gets of its own keys
    ``S.*`` in the ``mesh_api_results`` bucket. Replies go through the response permission.

    Raises:
        ConfigError: a system that is not one subject token.
    """
    pub: list[str] = []
    sub: list[str] = []
    for s in sorted(set(systems)):
        validate_token(s, "system")
        sub += [f"api.{s}.>", "$SRV.*", f"$SRV.*.mesh-{s}", f"$SRV.*.mesh-{s}.>"]
        pub += [
            f"$KV.{API_RESULTS_BUCKET}.{s}.>",
            f"$JS.API.DIRECT.GET.KV_{API_RESULTS_BUCKET}.$KV.{API_RESULTS_BUCKET}.{s}.>",
        ]
    return pub, list(dict.fromkeys(sub))


def permissions_for_agent(cfg: AgentConfig, prefix: str = DEFAULT_PREFIX) -> Permissions:
    """:func:`agent_permissions` for an agent that runs the static flows of its own config
    (``[[flows]]``; no control plane assigns it any): it publishes events of its system when a
    flow has a source, consumes ``<flow>-<its system>`` (:func:`~mesh.transport.subjects.consumer_name`)
    for each flow with a sink, and may dead-letter into ``dlq.<flow>`` for every flow (the
    capture side dead-letters rows its mapping refuses, the apply side failed envelopes).

    Raises:
        ConfigError: a name that is not one subject token, or a bad prefix.
    """
    a = cfg.agent
    systems = [a.system] if any(f.source is not None for f in cfg.flows) else []
    consumers = [consumer_name(f.name, a.system) for f in cfg.flows if f.sink is not None]
    apis = [a.system] if cfg.api is not None and cfg.api.operations else []
    return agent_permissions(a.name, systems, consumers, [f.name for f in cfg.flows], prefix, apis=apis)


_SAGA_BUCKET = "mesh_sagas"
_SUBJECT = re.compile(r"[A-Za-z0-9_-]{1,200}(\.([A-Za-z0-9_-]{1,200}|\*))*(\.>)?")


def _subject(value: str, what: str, root: str) -> str:
    if not _SUBJECT.fullmatch(value) or not value.startswith(f"{root}."):
        raise ConfigError(f"{what} {value!r} is not a {root}.> subject of tokens, '*' and a final '>'")
    return value


def orchestrator_permissions(
    name: str,
    triggers: Iterable[tuple[str, str]],
    commands: Iterable[str] = (),
    sagas: Iterable[str] = (),
) -> Permissions:
    """What orchestrator ``name`` may do (README "Orchestration (sagas)"): read and write the
    saga bucket ``mesh_sagas`` (compare-and-swap puts, gets, watches), bind its trigger consumers
    ``triggers`` ((stream, durable) pairs, durable ``saga-<saga>``), call any system API
    (``api.>``, per the API contract), publish the ``commands`` of its publish_await steps, read
    MESH_EVENTS through ephemeral consumers (awaited events), and dead-letter into
    ``dlq.saga.<saga>`` for each of ``sagas``, and publish its trace records on
    ``trace.<name>.*`` (stream MESH_TRACE). Nothing else: it cannot publish events or touch
    other buckets.

    Raises:
        ConfigError: a name that is not one subject token, or a command that is not ``cmd.>``.
    """
    validate_token(name, "orchestrator name")
    kv = f"KV_{_SAGA_BUCKET}"
    pub: list[str] = [
        "api.>",
        *sorted({_subject(c, "command subject", "cmd") for c in commands}),
        f"trace.{name}.*",
        *[f"dlq.saga.{validate_token(s, 'saga')}" for s in sorted(set(sagas))],
        f"$KV.{_SAGA_BUCKET}.>",
        "$JS.API.INFO",
        f"$JS.API.STREAM.INFO.{kv}",
        f"$JS.API.STREAM.MSG.GET.{kv}",
        f"$JS.API.DIRECT.GET.{kv}.>",
        f"$JS.API.CONSUMER.CREATE.{kv}",
        f"$JS.API.CONSUMER.CREATE.{kv}.>",
        f"$JS.API.CONSUMER.INFO.{kv}.>",
        f"$JS.API.CONSUMER.DELETE.{kv}.>",
        f"$JS.API.STREAM.INFO.{EVENTS_STREAM}",
        f"$JS.API.CONSUMER.CREATE.{EVENTS_STREAM}",
        f"$JS.API.CONSUMER.CREATE.{EVENTS_STREAM}.>",
        f"$JS.API.CONSUMER.DELETE.{EVENTS_STREAM}.>",
        f"$JS.API.STREAM.INFO.{DLQ_STREAM}",
        "$JS.FC.>",
    ]
    for stream, durable in sorted(set(triggers)):
        if stream not in (EVENTS_STREAM, COMMANDS_STREAM):
            raise ConfigError(f"a saga trigger reads {EVENTS_STREAM} or {COMMANDS_STREAM}, not {stream!r}")
        validate_token(durable, "consumer")
        pub += [
            f"$JS.API.CONSUMER.CREATE.{stream}.{durable}",
            f"$JS.API.CONSUMER.CREATE.{stream}.{durable}.>",
            f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{durable}",
            f"$JS.API.CONSUMER.INFO.{stream}.{durable}",
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
            f"$JS.ACK.{stream}.{durable}.>",
        ]
    sub = [f"{inbox_prefix(name)}.>"]
    return Permissions(pub=Permission(allow=list(dict.fromkeys(pub))), sub=Permission(allow=sub))


def permissions_for_orchestrator(cfg: OrchestratorConfig) -> Permissions:
    """:func:`orchestrator_permissions` for the sagas of an orchestrator config.

    Raises:
        ConfigError: a name that is not one subject token.
    """
    triggers = [
        (COMMANDS_STREAM if s.trigger.subject.startswith("cmd.") else EVENTS_STREAM, f"saga-{s.name}")
        for s in cfg.sagas
    ]
    commands = [st.subject for s in cfg.sagas for st in s.steps if st.kind == "publish_await"]
    return orchestrator_permissions(cfg.orchestrator.name, triggers, commands, [s.name for s in cfg.sagas])


def enrollment_permissions(name: str, prefix: str = DEFAULT_PREFIX) -> Permissions:
    """An enrollment token for agent ``name``: only the registration request and its reply.

    Raises:
        ConfigError: ``name`` is not one subject token, or a bad prefix.
    """
    validate_token(name, "agent name")
    validate_prefix(prefix)
    return Permissions(
        pub=Permission(allow=[f"{prefix}.register.{name}"]),
        sub=Permission(allow=[f"{inbox_prefix(name)}.>"]),
    )


def admin_permissions() -> Permissions:
    """The operator (``meshctl``): everything in the MESH account."""
    return Permissions(pub=Permission(allow=[">"]), sub=Permission(allow=[">"]))


def control_plane_permissions() -> Permissions:
    """The control plane: everything in the MESH account (it owns streams, buckets and JWTs;
    account updates go through a separate SYS-account user)."""
    return Permissions(pub=Permission(allow=[">"]), sub=Permission(allow=[">"]))


def _cell(subjects: Iterable[str]) -> str:
    return "<br>".join(f"`{s}`" for s in subjects) or "(nothing)"


def permission_table(prefix: str = DEFAULT_PREFIX) -> str:
    """The permission table as Markdown, rendered from the functions above with placeholder
    names (agent ``A``, system ``S``, flow ``F``, consumer ``C`` = ``<flow>-<sink system>``)."""
    agent = agent_permissions("A", ["S"], ["C"], ["F"], prefix)
    api_pub, api_sub = api_permissions(["S"])
    api = Permissions(pub=Permission(allow=api_pub), sub=Permission(allow=api_sub))
    enroll = enrollment_permissions("A", prefix)
    admin = admin_permissions()
    cp = control_plane_permissions()
    orch = orchestrator_permissions("O", [(EVENTS_STREAM, "saga-G")], ["cmd.S.op"], ["G"])
    rows = [
        ("agent `A` (one line per system `S`, flow `F`, consumer `C`)", agent),
        ("agent `A` serving the System API of `S` (`[api]` operations), in addition", api),
        ("orchestrator `O` (saga `G` on an event trigger; `cmd.S.op` a publish_await command)", orch),
        ("enrollment token for `A` (expires, one use)", enroll),
        ("admin (`meshctl`)", admin),
        ("control plane (plus a SYS-account user for `$SYS.REQ.CLAIMS.UPDATE`)", cp),
    ]
    out = [
        "| identity | may publish | may subscribe | replies to requests it received |",
        "|---|---|---|---|",
    ]
    for who, perms in rows:
        resp = f"max {perms.resp.max}" if perms.resp is not None else "-"
        out.append(f"| {who} | {_cell(perms.pub.allow)} | {_cell(perms.sub.allow)} | {resp} |")
    return "\n".join(out) + "\n"
