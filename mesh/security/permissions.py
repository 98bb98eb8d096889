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
from mesh.transport.subjects import DLQ_STREAM, EVENTS_STREAM, consumer_name

if TYPE_CHECKING:
    from mesh.config import AgentConfig

__all__ = [
    "ASSIGN_BUCKET",
    "DEFAULT_PREFIX",
    "admin_permissions",
    "agent_permissions",
    "assignment_get_subject",
    "assignment_subject",
    "control_plane_permissions",
    "enrollment_permissions",
    "inbox_prefix",
    "permission_table",
    "permissions_for_agent",
    "validate_prefix",
    "validate_token",
]

DEFAULT_PREFIX = "mesh.cp"
ASSIGN_BUCKET = "mesh_assign"

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


def agent_permissions(
    name: str,
    systems: Iterable[str],
    consumers: Iterable[str],
    flows: Iterable[str],
    prefix: str = DEFAULT_PREFIX,
) -> Permissions:
    """What agent ``name`` may do, with ``systems`` (the origins it publishes), the durable
    consumers of its assigned flows on MESH_EVENTS and the flows whose DLQ it writes.

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
    sub = [f"{inbox_prefix(name)}.>", f"{prefix}.agent.{name}", assignment_subject(name)]
    return Permissions(pub=Permission(allow=pub), sub=Permission(allow=sub), resp=ResponsePermission(1, 0))


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
    return agent_permissions(a.name, systems, consumers, [f.name for f in cfg.flows], prefix)


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
    enroll = enrollment_permissions("A", prefix)
    admin = admin_permissions()
    cp = control_plane_permissions()
    rows = [
        ("agent `A` (one line per system `S`, flow `F`, consumer `C`)", agent),
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
