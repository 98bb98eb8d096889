"""Control-plane messages and records: frozen msgspec Structs, JSON on the wire and in KV.

Requests travel by NATS request/reply on ``<prefix>.<kind>.<caller>`` (default prefix
``mesh.cp``; the caller token is the sender's identity, which the control plane records as the
``actor`` whatever a body's ``actor`` field claims); the body is one member of the
:data:`Request` tagged union (``"kind"`` field) and the reply one member of :data:`Reply`. JSON
rather than MessagePack: these messages are few and small, and an operator can read them with
any NATS tool. Guarantees:

* Every field added later gets a default, so an older agent and a newer control plane (or the
  reverse) still understand each other; unknown fields are ignored on decode.
* Secrets never travel back out: a registry :class:`AgentRecord` keeps only SHA-256 digests of
  the agent's identity token and credential, and the read replies (:class:`AgentView`) carry
  neither.
* Encoders and decoders are built once (module level).
"""

from __future__ import annotations

import hashlib
import socket
from typing import Annotated, Any, Literal

import msgspec

from mesh.errors import DecodeError
from mesh.runs.report import RunSummary
from mesh.trace.index import TransactionsView

__all__ = [
    "AGENTS_BUCKET",
    "ASSIGN_BUCKET",
    "FLOWS_BUCKET",
    "HEALTH_STATES",
    "LEADER_BUCKET",
    "READ_KINDS",
    "STATUS_SCHEMA_VERSION",
    "WRITE_KINDS",
    "AgentCommand",
    "AgentRecord",
    "AgentView",
    "Agents",
    "AgentsPage",
    "ApplyFlows",
    "AssignedFlow",
    "Assignment",
    "CommandResult",
    "ControlPlaneInfo",
    "DeleteFlow",
    "Deregister",
    "DesiredState",
    "DlqReason",
    "Done",
    "FlowChange",
    "FlowCommand",
    "FlowKpis",
    "FlowOp",
    "FlowOutcome",
    "FlowPart",
    "FlowReport",
    "FlowSpec",
    "FlowSpecView",
    "FlowView",
    "Flows",
    "FlowsApplied",
    "GetStatus",
    "Health",
    "Heartbeat",
    "HeartbeatAck",
    "HeartbeatPayload",
    "HeartbeatRecord",
    "ListAgents",
    "ListFlows",
    "ListTokens",
    "Manifest",
    "RefusalCode",
    "Refused",
    "Register",
    "Registered",
    "Reply",
    "ReportedHealth",
    "Request",
    "Revoke",
    "StatusReport",
    "SystemView",
    "TokenCreate",
    "TokenCreated",
    "TokenRecord",
    "TokenView",
    "Tokens",
    "decode_reply",
    "decode_request",
    "default_actor",
    "digest",
    "encode",
    "mesh_version",
    "status_schema",
]

AGENTS_BUCKET = "mesh_agents"
"""Registry (``agent.<name>``: :class:`AgentRecord`) and last heartbeats (``heartbeat.<name>``)."""
FLOWS_BUCKET = "mesh_flows"
"""Desired flow specs: ``flow.<name>`` holds a :class:`FlowSpec` (``meshctl flow apply``)."""
ASSIGN_BUCKET = "mesh_assign"
"""Which agent runs what: ``agent.<name>`` holds an :class:`Assignment`, watched by that agent."""
LEADER_BUCKET = "mesh_leader"
"""The control-plane leader lease (key ``leader``)."""

Token = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]+$(?!\n)", min_length=1, max_length=64)]
Secret = Annotated[str, msgspec.Meta(min_length=16, max_length=256)]
ReportedHealth = Literal["ok", "degraded", "failing"]
Health = Literal["healthy", "degraded", "stale", "lost"]
HEALTH_STATES: tuple[Health, ...] = ("healthy", "degraded", "stale", "lost")
STATUS_SCHEMA_VERSION = "mesh-cp-status/1"
RefusalCode = Literal["invalid", "unknown", "revoked", "conflict", "unauthorized", "internal"]


class _Msg(msgspec.Struct, frozen=True, kw_only=True):
    pass


class Manifest(_Msg, frozen=True):
    """What an agent can do: its adapter kinds and the system operations it exposes, and where
    flows applied to it may keep files (checked by ``meshctl flow apply`` before storing)."""

    adapters: list[str] = msgspec.field(default_factory=list)
    operations: list[str] = msgspec.field(default_factory=list)
    state_dir: str | None = None
    """The agent's state directory, absolute (None: an agent from before it was reported; then
    only relative paths that stay below it can be checked and are accepted)."""
    allowed_paths: list[str] = msgspec.field(default_factory=list)
    """The agent's ``[agent] allowed_paths``, absolute: other directories applied flows may use."""
    allowed_env: list[str] | None = None
    """The agent's ``[agent] allowed_env``: the environment variables applied flows may name as
    secrets (None: not reported; then only the agent checks)."""
    system: str = ""
    """The system the agent fronts (``[agent] system``): the origin it publishes, the sink
    system in its consumers' names (``<flow>-<system>``)."""
    sources: list[str] = msgspec.field(default_factory=list)
    """Static flows of its config file with a source (it publishes their events)."""
    sinks: list[str] = msgspec.field(default_factory=list)
    """Static flows of its config file with a sink (it consumes ``<flow>-<system>``)."""


class FlowKpis(_Msg, frozen=True):
    """A flow's cumulative counters on one agent since it started (they restart from 0 with the
    agent: readers take deltas per agent incarnation and treat a decrease as a restart)."""

    captured: int = 0
    published: int = 0
    applied: int = 0
    """Changes written at the sink (outcome ``applied``)."""
    duplicates: int = 0
    """Redeliveries the inbox suppressed."""
    not_owner: int = 0
    """Changes refused by the ownership rules."""
    retries: int = 0
    dead_lettered: int = 0
    failures: dict[str, int] = msgspec.field(default_factory=dict)
    """Failed attempts by error class (``transient``, ``integrity``, ``mapping``, ...)."""
    latency_buckets: list[int] = msgspec.field(default_factory=list)
    """Cumulative counts of the end-to-end latency histogram per bound of
    :data:`mesh.metrics.LATENCY_BUCKETS`, then +Inf (empty: none observed)."""
    latency_sum: float = 0.0
    freshness_seconds: float | None = None
    """Age of the newest change applied (None: nothing applied yet)."""
    slo_seconds: float = 5.0
    slo_total: int = 0
    slo_on_time: int = 0


class FlowReport(_Msg, frozen=True):
    """One flow as its agent sees it. ``None`` means "this agent does not run that side"."""

    name: str
    state: str = "running"
    """``running``, ``paused``, ``draining``, ``stopped`` or ``failing``."""
    outbox_depth: int | None = None
    """Envelopes of this flow waiting in the agent's outbox (capture side)."""
    outbox_age_seconds: float | None = None
    """Age of the flow's oldest unpublished envelope (capture side)."""
    consumer_pending: int | None = None
    """Messages the flow's durable consumer has not delivered or not had acked (sink side)."""
    errors: int = 0
    """Failures since the agent started (retried or dead-lettered), cumulative."""
    dead_lettered: int = 0
    """Messages this agent dead-lettered for the flow since it started, cumulative."""
    generation: int = 0
    """The applied generation the agent runs (0: from its own config file)."""
    detail: str = ""
    """Why the flow is not running (paused by whom, the last failure)."""
    kpis: FlowKpis | None = None
    """Cumulative KPI counters (None from agents older than the KPIs)."""


class HeartbeatPayload(_Msg, frozen=True):
    """What an agent's ``collect()`` returns for each heartbeat (see :mod:`mesh.heartbeat`)."""

    health: ReportedHealth = "ok"
    """The agent's own verdict: ``degraded`` while it works but something is off (NATS away,
    backlog over its warning threshold), ``failing`` while a flow cannot make progress."""
    detail: str = ""
    """Why, when ``health`` is not ``ok``."""
    outbox_depth: int = 0
    """Envelopes waiting in the agent's outbox (all flows)."""
    outbox_age_seconds: float = 0.0
    """Age of the oldest envelope in the outbox; 0 when empty."""
    errors: int = 0
    """Errors since the agent started (actor restarts, publish failures, failed messages)."""
    flows: list[FlowReport] = msgspec.field(default_factory=list)


class AgentRecord(_Msg, frozen=True):
    """A registered agent, as stored in ``mesh_agents`` under ``agent.<name>``."""

    agent_id: str
    name: str
    site: str
    host: str
    version: str
    identity: str
    """SHA-256 of the agent's identity token (the token itself never leaves the agent)."""
    credential: str
    """SHA-256 of the credential issued at registration."""
    manifest: Manifest = msgspec.field(default_factory=Manifest)
    registered_at: float = 0.0
    updated_at: float = 0.0
    state: Literal["active", "revoked"] = "active"
    revoked_at: float | None = None
    revoked_by: str | None = None
    revoke_reason: str = ""
    public_key: str = ""
    """The agent's NATS user public key (security on; its seed never leaves the agent)."""
    systems: list[str] = msgspec.field(default_factory=list)
    """The systems its enrollment token granted: it may publish their events, and run its
    static flows only within them."""


class TokenRecord(_Msg, frozen=True):
    """An enrollment token, as stored in ``mesh_agents`` under ``token.<id>`` (the id is the
    token's user public key; the token itself is never stored)."""

    token_id: str
    name: str
    systems: list[str] = msgspec.field(default_factory=list)
    expires: float = 0.0
    created_at: float = 0.0
    created_by: str = ""
    used: bool = False
    used_at: float | None = None


class HeartbeatRecord(_Msg, frozen=True):
    """The last accepted heartbeat of an agent (``mesh_agents`` key ``heartbeat.<name>``)."""

    agent_id: str
    name: str
    seq: int
    received_at: float
    """Wall-clock time the leader accepted it (replicas compare it with their own clocks)."""
    sent_at: float
    interval: float
    version: str
    payload: HeartbeatPayload
    errors_delta: int = 0
    """Growth of ``payload.errors`` since the previous heartbeat of the same agent id."""


# --- requests (tagged union on "kind"; the subject is <prefix>.<kind>) -----------------------


class _Req(_Msg, frozen=True, tag_field="kind"):
    pass


class Register(_Req, frozen=True, tag="register"):
    """Register (or re-register) an agent. Answered by :class:`Registered` or :class:`Refused`."""

    name: Token
    site: Token
    identity: Secret
    """The agent's identity token, generated once and kept in its state dir."""
    version: str
    host: str
    manifest: Manifest = msgspec.field(default_factory=Manifest)
    credential: str | None = None
    """The credential the agent already holds, if any: when it matches, none is reissued."""
    actor: str = ""
    """Who the sender says asked; the control plane replaces it with the caller token of the
    request's subject (the authenticated identity) before anything records it."""
    public_key: str | None = None
    """Security on: the agent's NATS user public key (it keeps the seed); the reply carries
    its user JWT."""
    enrollment: str | None = None
    """Security on: the id of the enrollment token it connected with (a new agent, or a new
    public key, needs a valid unused one)."""


class Deregister(_Req, frozen=True, tag="deregister"):
    """Forget an agent (its name becomes free). Answered by :class:`Done` or :class:`Refused`."""

    name: Token
    actor: str = ""


class Revoke(_Req, frozen=True, tag="revoke"):
    """Refuse an agent from now on: heartbeats, re-registration, assignments."""

    name: Token
    reason: str = ""
    actor: str = ""


class Heartbeat(_Req, frozen=True, tag="heartbeat"):
    """An agent's periodic report. Answered by :class:`HeartbeatAck` or :class:`Refused`."""

    agent_id: str
    name: Token
    credential: str
    seq: int
    sent_at: float
    interval: float
    version: str
    payload: HeartbeatPayload = msgspec.field(default_factory=HeartbeatPayload)


class ListAgents(_Req, frozen=True, tag="agents"):
    """Read: every agent (or the one named) with its health. Any replica answers."""

    name: str | None = None


class GetStatus(_Req, frozen=True, tag="status"):
    """Read: the whole status document (``/status``). Any replica answers."""


class TokenCreate(_Req, frozen=True, tag="token_create"):
    """Create a one-time enrollment token for agent ``name`` (leader; security on). Answered by
    :class:`TokenCreated` or :class:`Refused`."""

    name: Token
    ttl: Annotated[float, msgspec.Meta(gt=0, le=30 * 86400)] = 3600.0
    systems: list[Token] = msgspec.field(default_factory=list)
    """The systems the agent may publish events of (and run its static flows within)."""
    actor: str = ""


class ListTokens(_Req, frozen=True, tag="tokens"):
    """Read: every enrollment token recorded (never the token strings)."""


FlowOp = Literal["pause", "resume", "drain", "restart"]
DesiredState = Literal["running", "paused"]


class ApplyFlows(_Req, frozen=True, tag="flow_apply"):
    """Validate a flow file and store its flows (leader). Answered by :class:`FlowsApplied` or
    :class:`Refused` (``invalid``, with every problem in ``problems``)."""

    text: str
    """The TOML file's text: ``[[flows]]`` tables, each side naming its ``agent``."""
    source: str = "<flows>"
    """The file's name, used in error messages."""
    dry_run: bool = False
    """Validate only; store nothing."""
    actor: str = ""


class DeleteFlow(_Req, frozen=True, tag="flow_delete"):
    """Remove a flow: its agents stop it (in-flight work finishes first). Answered by :class:`Done`."""

    name: Token
    actor: str = ""


class ListFlows(_Req, frozen=True, tag="flows"):
    """Read: every applied flow (or the one named) with what its agents report."""

    name: str | None = None


class FlowCommand(_Req, frozen=True, tag="command"):
    """Pause, resume, drain or restart a flow on every agent that runs it, or every flow of one
    agent. The leader records the desired state (pause/resume survive restarts), forwards the
    command to each agent and answers with their results (:class:`CommandResult`)."""

    op: FlowOp
    flow: Token | None = None
    """The flow to act on; ``None`` with ``agent``: every flow of that agent."""
    agent: Token | None = None
    """Only this agent (with ``flow``), or every flow of it (without)."""
    timeout: float = 30.0
    """Seconds each agent gets to carry the command out (drain waits for the backlog)."""
    actor: str = ""


Request = (
    Register
    | Deregister
    | Revoke
    | Heartbeat
    | ListAgents
    | GetStatus
    | ApplyFlows
    | DeleteFlow
    | ListFlows
    | FlowCommand
    | TokenCreate
    | ListTokens
)
WRITE_KINDS = (
    "register",
    "deregister",
    "revoke",
    "heartbeat",
    "flow_apply",
    "flow_delete",
    "command",
    "token_create",
)
"""Request kinds only the leader serves."""
READ_KINDS = ("agents", "status", "flows", "tokens")
"""Request kinds every replica serves (from its KV mirror)."""


# --- replies -------------------------------------------------------------------------------


class _Rep(_Msg, frozen=True, tag_field="kind"):
    pass


class Registered(_Rep, frozen=True, tag="registered"):
    agent_id: str
    name: str
    credential: str | None = None
    """A new credential to store; ``None`` when the one the agent sent is still valid."""
    created: bool = False
    message: str = ""
    jwt: str | None = None
    """Security on: the agent's NATS user JWT (for the public key it sent)."""


class TokenCreated(_Rep, frozen=True, tag="token_created"):
    token: str
    """The token string (``MESHENROLL1.``...): give it to whoever registers the agent."""
    token_id: str
    name: str
    expires: float


class TokenView(_Msg, frozen=True):
    token_id: str
    name: str
    systems: list[str]
    expires: float
    created_at: float
    created_by: str
    used: bool


class Tokens(_Rep, frozen=True, tag="tokens"):
    tokens: list[TokenView]


class Done(_Rep, frozen=True, tag="done"):
    message: str = ""


class Refused(_Rep, frozen=True, tag="refused"):
    code: RefusalCode
    reason: str
    problems: list[str] = msgspec.field(default_factory=list)
    """Every problem found (``file: flows[0].sink.table: ...``) when ``code`` is ``invalid``."""


class HeartbeatAck(_Rep, frozen=True, tag="heartbeat_ack"):
    seq: int
    leader: str = ""


class AgentView(_Msg, frozen=True):
    """One agent as the control plane sees it (no secrets)."""

    name: str
    agent_id: str
    site: str
    host: str
    version: str
    state: Literal["active", "revoked"]
    """``revoked`` agents are refused; they stay listed until deregistered."""
    health: Health
    """``healthy``, ``degraded``, ``stale`` or ``lost`` (see :mod:`mesh.controlplane.health`)."""
    reason: str
    """Why the agent is not healthy (empty when it is)."""
    registered_at: float
    """Unix time of the first registration."""
    last_heartbeat: float | None
    """Unix time the last accepted heartbeat arrived; ``null`` before the first."""
    heartbeat_age_seconds: float | None
    reported_health: ReportedHealth | None = None
    """The agent's own verdict in its last heartbeat."""
    outbox_depth: int = 0
    outbox_age_seconds: float = 0.0
    errors: int = 0
    """Errors the agent counted since it started (from its last heartbeat)."""
    flows: list[FlowReport] = msgspec.field(default_factory=list)
    manifest: Manifest = msgspec.field(default_factory=Manifest)


class FlowView(_Msg, frozen=True):
    """One flow across every agent that reports it, plus its dead-letter depth."""

    name: str
    state: str
    """``running`` when every reporting agent runs it and is fresh; ``paused``, ``failing`` or
    ``draining`` when one reports so; ``unknown`` when no fresh agent reports it."""
    agents: list[str]
    """Agents whose heartbeats mention the flow."""
    backlog: int
    """Envelopes of the flow still in outboxes (not yet acknowledged by JetStream)."""
    consumer_pending: int
    """Messages in JetStream the flow's sinks have not yet acknowledged."""
    lag_seconds: float
    """Age of the oldest envelope of the flow still in an outbox (capture-to-publish lag)."""
    dlq_depth: int
    """Messages in stream ``MESH_DLQ`` on subject ``dlq.<flow>``."""
    errors: int = 0
    dead_lettered: int = 0
    desired: str = ""
    """For a flow applied through the control plane: ``running`` or ``paused`` (empty for flows
    that only agents' config files define)."""
    generation: int = 0
    """The applied generation (0 for flows from agents' config files)."""
    applied: int = 0
    """Changes applied at the sinks, summed over the reporting agents' current incarnations."""
    captured: int = 0
    duplicates: int = 0
    """Redeliveries the sinks' inboxes suppressed."""
    not_owner: int = 0
    """Changes refused by the ownership rules."""
    retries: int = 0
    failures: dict[str, int] = msgspec.field(default_factory=dict)
    """Failed attempts by error class (``transient``, ``integrity``, ``mapping``, ...)."""
    applied_per_second: float = 0.0
    """Rates over the last minute (from heartbeats; 0 until two have arrived)."""
    captured_per_second: float = 0.0
    failures_per_second: float = 0.0
    retries_per_second: float = 0.0
    latency_p50_seconds: float | None = None
    """End-to-end latency (capture to effect) of the changes applied in the last minute."""
    latency_p99_seconds: float | None = None
    freshness_seconds: float | None = None
    """Age of the newest change applied at any sink (None: nothing applied yet)."""
    dlq_oldest_age_seconds: float = 0.0
    """Age of the flow's oldest message in ``MESH_DLQ`` (0 when none)."""
    dlq_top_reasons: list[DlqReason] = msgspec.field(default_factory=list)
    """The most frequent reasons among the flow's recent dead letters, most frequent first."""
    slo_seconds: float | None = None
    """The flow's SLO target (from its sinks' heartbeats)."""
    slo_ratio: float | None = None
    """Share of the changes applied within ``slo_seconds`` over the last hour (None: none)."""


class DlqReason(_Msg, frozen=True):
    """One reason dead letters of a flow share: its error class, a sample reason, how many."""

    error_class: str
    reason: str
    count: int


class SystemView(_Msg, frozen=True):
    """One system (an agent's ``[agent] system``) across the agents fronting it."""

    name: str
    agents: list[str]
    sites: list[str]
    health: str
    """The worst health of its agents."""
    flows: list[str]
    applied_per_second: float = 0.0
    """Changes applied into the system per second (last minute)."""
    captured_per_second: float = 0.0
    failures_per_second: float = 0.0
    backlog: int = 0
    """Envelopes captured from the system still in outboxes."""


class ControlPlaneInfo(_Msg, frozen=True):
    replica: str
    """Name of the replica that answered."""
    leader: str | None
    """Name of the replica holding the lease (as this replica last saw it)."""
    is_leader: bool
    nats_connected: bool
    version: str


class AgentsPage(_Msg, frozen=True):
    """Which agents a ``/status`` document lists (``GET /status?agents=...``)."""

    mode: Literal["summary", "all"]
    """``summary`` (the default): the agents that are not healthy and active; ``all``: every
    agent. Either narrowed by ``site`` and ``health``."""
    total: int
    """Agents that match the mode and filters (``agents`` holds ``limit`` of them from ``offset``)."""
    offset: int = 0
    limit: int | None = None
    """None: no limit."""
    sites: int = 0
    """Sites with at least one agent (``sites`` of the document may list fewer: in ``summary``
    mode only those with an agent that is not healthy)."""


class StatusReport(_Rep, frozen=True, tag="status"):
    """The ``/status`` document (schema: ``GET /status/schema``, or :func:`status_schema`)."""

    schema_version: str
    """``mesh-cp-status/1``; bumped only on incompatible changes (fields are only added)."""
    generated_at: float
    """Unix time the document was built."""
    control_plane: ControlPlaneInfo
    agents: list[AgentView]
    flows: list[FlowView]
    counts: dict[str, int]
    """Agents by health: ``healthy``, ``degraded``, ``stale``, ``lost`` (always all four)."""
    transactions: TransactionsView | None = None
    """Business transactions by status and the latest failed ones (README "Tracing business
    transactions"); None before the trace stream has been read."""
    systems: list[SystemView] = msgspec.field(default_factory=list)
    """KPIs per system (empty from control planes older than the KPIs)."""
    runs: list[RunSummary] = []
    """The latest bulk run of each flow that has run records in ``mesh_runs`` (scheduled SQL and
    REST runs, CSV file runs): state, counts and age (README "Schedules, bulk runs and hybrid
    sync")."""
    agents_page: AgentsPage | None = None
    """How ``agents`` was chosen over HTTP (``/status?agents=summary|all&site=&health=&limit=
    &offset=``); None in the NATS ``status`` reply, which lists every agent."""
    sites: dict[str, dict[str, int]] = {}
    """Agents by site and health, over HTTP (see ``agents_page.sites``)."""


class Agents(_Rep, frozen=True, tag="agents"):
    agents: list[AgentView]
    served_by: str = ""
    leader: str | None = None


class FlowPart(_Msg, frozen=True):
    """One agent's share of a flow: the :class:`~mesh.config.FlowConfig` it runs (as JSON)."""

    agent: str
    config: dict[str, Any]
    """A ``FlowConfig`` table: name, entity, and the source and/or sink this agent runs."""


class FlowSpec(_Msg, frozen=True):
    """An applied flow, as stored in ``mesh_flows`` under ``flow.<name>``."""

    name: str
    entity: str
    parts: list[FlowPart]
    generation: int = 1
    """Grows by one whenever an apply changes the flow's configuration."""
    desired: DesiredState = "running"
    """``paused`` after ``flow pause`` until ``flow resume``: agents keep it stopped, even after
    a restart."""
    digest: str = ""
    """SHA-256 of the parts: an apply that changes nothing keeps the generation."""
    applied_at: float = 0.0
    applied_by: str = ""
    source: str = ""
    """The file it came from."""


class AssignedFlow(_Msg, frozen=True):
    name: str
    generation: int
    desired: DesiredState
    config: dict[str, Any]


class Assignment(_Msg, frozen=True):
    """What one agent runs, as stored in ``mesh_assign`` under ``agent.<name>`` (the agent watches
    this key and starts, stops or reconfigures its flows to match)."""

    agent: str
    flows: list[AssignedFlow] = msgspec.field(default_factory=list)
    updated_at: float = 0.0
    credentials_jwt: str = ""
    """Security on: the agent's user JWT for these flows (re-issued whenever they change); the
    agent writes it to its creds file (same seed) and reconnects before it starts them."""
    credentials_for: str = ""
    """Digest of the public key and permissions ``credentials_jwt`` was issued for."""


class AgentCommand(_Msg, frozen=True):
    """What the leader (or the operator's ``meshctl``) sends an agent on ``<prefix>.agent.<name>``
    (request/reply)."""

    op: FlowOp | Literal["preflight", "run"]
    """``run`` (``meshctl runs start``): start a bulk run of the scheduled ``flow`` now."""
    flow: str | None = None
    """``None``: every flow the agent runs (``run`` needs one)."""
    timeout: float = 30.0
    actor: str = ""
    config: dict[str, Any] | None = None
    """``preflight``: the flow config to check as this agent would run it (a :class:`FlowPart`
    config); None: the flows it runs. Each problem comes back as a failed :class:`FlowOutcome`
    whose message is ``<path>: <what>`` (paths start with ``flow.``)."""


class FlowOutcome(_Msg, frozen=True):
    """What one agent did with a command for one flow."""

    agent: str
    flow: str
    ok: bool
    state: str
    """The flow's state afterwards: ``running``, ``paused``, ``drained``, ``failing``, ..."""
    message: str = ""


class CommandResult(_Rep, frozen=True, tag="command_result"):
    """The answer to a :class:`FlowCommand` (and an agent's answer to an :class:`AgentCommand`)."""

    ok: bool
    """True when every agent carried the command out."""
    message: str = ""
    outcomes: list[FlowOutcome] = msgspec.field(default_factory=list)


class FlowChange(_Msg, frozen=True):
    name: str
    action: Literal["created", "updated", "unchanged"]
    generation: int
    agents: list[str]


class FlowsApplied(_Rep, frozen=True, tag="flows_applied"):
    changes: list[FlowChange]
    dry_run: bool = False


class FlowSpecView(_Msg, frozen=True):
    """An applied flow with the state its agents report."""

    spec: FlowSpec
    state: str
    """From the agents' heartbeats (see :class:`FlowView`); ``pending`` while no agent reports it."""
    reports: list[FlowReport] = msgspec.field(default_factory=list)
    """Each reporting agent's view, in ``spec.parts`` order (``agent`` named in ``name``)."""


class Flows(_Rep, frozen=True, tag="flows"):
    flows: list[FlowSpecView]
    served_by: str = ""


Reply = (
    Registered
    | Done
    | Refused
    | HeartbeatAck
    | Agents
    | StatusReport
    | CommandResult
    | FlowsApplied
    | Flows
    | TokenCreated
    | Tokens
)


_encoder = msgspec.json.Encoder()
_request_decoder = msgspec.json.Decoder(Request)
_reply_decoder = msgspec.json.Decoder(Reply)


def encode(msg: msgspec.Struct) -> bytes:
    """JSON bytes of any control-plane Struct."""
    return _encoder.encode(msg)


def decode_request(data: bytes) -> Request:
    """Decode a request body.

    Raises:
        DecodeError: not JSON, an unknown ``kind`` or a field of the wrong type (the message
            names the field).
    """
    try:
        return _request_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise DecodeError(f"bad control-plane request: {exc}") from None


def decode_reply(data: bytes) -> Reply:
    """Decode a reply body (any member of :data:`Reply`).

    Raises:
        DecodeError: not a control-plane reply.
    """
    try:
        return _reply_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise DecodeError(f"bad control-plane reply: {exc}") from None


def status_schema() -> dict[str, Any]:
    """JSON Schema of the ``/status`` document (:class:`StatusReport`)."""
    return msgspec.json.schema(StatusReport)


def digest(secret: str) -> str:
    """SHA-256 hex digest of a secret token: what the registry stores instead of the token."""
    return hashlib.sha256(secret.encode()).hexdigest()


def mesh_version() -> str:
    """The installed connector-mesh version (``0+unknown`` from a bare checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("connector-mesh")
    except PackageNotFoundError:
        return "0+unknown"


def default_actor() -> str:
    """Who is acting, for the audit trail: ``$MESH_ACTOR`` or ``user@host``."""
    import getpass
    import os

    actor = os.environ.get("MESH_ACTOR")
    if actor:
        return actor
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"
