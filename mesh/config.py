"""Typed agent configuration, loaded from TOML with msgspec.

Guarantees: an unknown key, a missing required key or a wrong type stops start-up with a
:class:`~mesh.errors.ConfigError` naming the file, the field path (``flows[0].source.table``) and
what was expected. Relative paths in the file are resolved against the file's own directory, so
a config means the same thing whatever the working directory.

This module holds the agent's own settings and the base pieces adapter configs build on
(:class:`AdapterConfig`, :data:`Token`, ...). Each adapter's config Struct lives in its own
package and is found through the adapter registry (:mod:`mesh.plugins`): :func:`decode_flow`,
:func:`parse_agent_config` and the control plane decode ``[flows.source]`` / ``[flows.sink]``
by their ``adapter = "..."`` with the tagged unions built from the installed adapters.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, cast

import msgspec

from mesh import errors as _errors
from mesh._api_config import ApiConfig, api_config_type, check_api
from mesh._config_base import (
    AdapterConfig,
    ConfigStruct,
    EnvName,
    FieldPath,
    HeaderName,
    PositiveFloat,
    PositiveInt,
    Token,
)
from mesh._policy_config import PolicyConfig
from mesh.errors import ConfigError, ConfigProblem, PluginError, RetryableError
from mesh.mapping import MappingConfig
from mesh.ownership import EntityOwnership
from mesh.plugins import AdapterRegistry, RoleName, adapter_registry
from mesh.runs.schedule import ScheduleConfig

__all__ = [
    "AdapterConfig",
    "AfterConfig",
    "AgentConfig",
    "AgentSection",
    "ConfigStruct",
    "ConsumerConfig",
    "EnvName",
    "ErrorAction",
    "FieldPath",
    "FlowConfig",
    "HeaderName",
    "NatsConfig",
    "PositiveFloat",
    "PositiveInt",
    "RelayConfig",
    "RetryConfig",
    "StreamsConfig",
    "TelemetryConfig",
    "TlsConfig",
    "Token",
    "TraceConfig",
    "TraceRetention",
    "agent_config_type",
    "check_flow",
    "check_tls_files",
    "decode_adapter_config",
    "decode_flow",
    "expand_credentials_directory",
    "flow_config_type",
    "load_agent_config",
    "parse_agent_config",
    "resolve_flow_paths",
    "validation_problem",
]


class AgentSection(ConfigStruct, frozen=True):
    name: Token
    """Unique name of this agent; also its NATS client name."""
    system: Token
    """The external system this agent fronts: the ``origin`` of what it captures (I7)."""
    state_dir: str
    """Directory of the agent's own SQLite stores (outbox, inbox, cursors) and credentials."""
    site: Token = "default"
    """Where the agent runs (a plant, a region): shown by the control plane."""
    heartbeat_interval: PositiveFloat = 5.0
    """Seconds between heartbeats to the control plane (sent once the agent is registered)."""
    metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] | None = None
    """Serve Prometheus metrics on 127.0.0.1:PORT (0 picks a free port); none when unset."""
    metrics_host: str = "127.0.0.1"
    shutdown_grace: PositiveFloat = 10.0
    """On SIGTERM, seconds in-flight batches get to finish before they are released (nak'ed)."""
    outbox_max_bytes: PositiveInt = 1 << 30
    """Capture pauses while the outbox holds this many bytes of envelopes (the source keeps
    its changes meanwhile); default 1 GiB."""
    outbox_warn_depth: PositiveInt = 100_000
    """Log a warning while more envelopes than this wait in the outbox."""
    outbox_warn_age: PositiveFloat = 300.0
    """Log a warning while the oldest envelope in the outbox is older than this (seconds)."""
    inbox_retention: PositiveFloat = 14 * 24 * 3600.0
    """Seconds the inbox remembers applied ids. Keep it longer than MESH_EVENTS' max_age; older
    redeliveries are still stopped by the sinks' version guards."""
    allowed_paths: list[str] = msgspec.field(default_factory=list)
    """Directories (besides ``state_dir``) whose files flows applied through the control plane
    may use; any other path in an applied flow is refused (``../`` escapes included). Flows in
    this file are the operator's own and are not confined."""
    allowed_env: list[str] = msgspec.field(default_factory=list)
    """Environment variables (names or shell-style patterns such as ``CRM_*``) that flows applied
    through the control plane may reference as secrets (``*_env``, ``headers_env``); any other
    is refused, so whoever can apply a flow cannot make the agent send, say, ``AWS_SECRET_KEY``
    to a URL of their choosing. Flows in this file are not confined."""


class TlsConfig(ConfigStruct, frozen=True):
    """TLS to the NATS server (``[nats.tls]``): the server's certificate is always verified
    (against ``ca_file``, else the system's CAs) and TLS 1.2 is the least accepted; a client
    certificate (``cert_file`` + ``key_file``) makes it mutual TLS.

    Relative paths in a config file are resolved against the file's directory; every named file
    must exist (checked at load by :func:`check_tls_files`, and again at connect).
    """

    ca_file: str | None = None
    """PEM file of the CA(s) that signed the server's certificate (default: the system's CAs)."""
    cert_file: str | None = None
    """PEM client certificate (mutual TLS); needs ``key_file``."""
    key_file: str | None = None
    """PEM private key of ``cert_file``."""
    server_name: str | None = None
    """The name the server's certificate must carry when it is not the host in the server URL
    (e.g. the URL is an IP address); default: the URL's host."""

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: give both (mutual TLS) or neither")


def check_tls_files(tls: TlsConfig | None, path: str = "nats.tls") -> list[ConfigProblem]:
    """One problem (``<path>.<field>``, what is wrong) per TLS file that is not a readable file."""
    if tls is None:
        return []
    problems = []
    for field in ("ca_file", "cert_file", "key_file"):
        value = getattr(tls, field)
        if value is None:
            continue
        file = Path(value).expanduser()
        if not file.is_file():
            problems.append(ConfigProblem(f"{path}.{field}", f"no such file: {value}"))
    return problems


class NatsConfig(ConfigStruct, frozen=True):
    servers: list[str] = msgspec.field(default_factory=lambda: ["nats://127.0.0.1:4222"])
    user: str | None = None
    password_env: EnvName | None = None
    """Name of the environment variable that holds the password (secrets are referenced)."""
    password_file: str | None = None
    """Or a file that holds it (e.g. a Kubernetes secret mount; a trailing newline is dropped;
    relative to the config file). At most one of ``password_env`` and ``password_file``."""
    creds: str | None = None
    """Path of the .creds file this client authenticates with (NATS decentralized auth)."""
    inbox_prefix: str | None = None
    """Inbox prefix of every connection (agents: ``_INBOX.<agent name>``, the only inbox their
    permissions let them subscribe to)."""
    connect_timeout: PositiveFloat = 2.0
    request_timeout: PositiveFloat = 5.0
    """Bound on every publish acknowledgement and JetStream API call."""
    tls: TlsConfig | None = None
    """TLS to the server (``[nats.tls]``); ``tls://`` server URLs need it or the system's CAs."""

    def __post_init__(self) -> None:
        if self.password_env is not None and self.password_file is not None:
            raise ValueError("password_env / password_file: set at most one of them")


class TraceRetention(ConfigStruct, frozen=True):
    """How long the trace stream ``MESH_TRACE`` keeps its records (``[streams.trace]``)."""

    max_age: Annotated[float, msgspec.Meta(ge=0)] = 7 * 24 * 3600.0
    """Seconds a trace record is kept (0 = no age limit)."""
    max_bytes: Annotated[int, msgspec.Meta(ge=-1)] = 1 << 30
    """Bytes the stream may hold before the oldest records go (-1 = no size limit)."""


class TraceConfig(ConfigStruct, frozen=True):
    """Business transaction tracing (``[trace]``, README "Tracing business transactions")."""

    enabled: bool = True
    """Whether this agent publishes trace records (to ``trace.<agent>.<kind>``)."""
    sample: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 1.0
    """The share of transactions traced, decided per correlation id (so a transaction is traced
    everywhere or nowhere): 1.0 every one, 0.1 one in ten."""
    flush_interval: Annotated[float, msgspec.Meta(gt=0, le=60)] = 0.2
    """Longest a record waits in memory before it is published (records are batched)."""
    max_buffer: PositiveInt = 10_000
    """Records held in memory at most while the broker is away; beyond, new ones are dropped
    (and counted): tracing never slows or blocks the delivery path."""
    link_window: Annotated[float, msgspec.Meta(ge=0)] = 60.0
    """Seconds after this agent applied a change to its system during which a change of the
    same ``entity:key`` captured from that system is taken as caused by it (same correlation
    id, ``causation_id`` = the applied envelope's id): the echo of a two-way sync stays linked."""


class StreamsConfig(ConfigStruct, frozen=True):
    replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] = 1
    duplicate_window: PositiveFloat = 120.0
    """Seconds during which JetStream drops a republished Nats-Msg-Id."""
    max_age: float = 7 * 24 * 3600.0
    """Seconds events are kept in MESH_EVENTS (0 = forever)."""
    storage: Literal["file", "memory"] = "file"
    trace: TraceRetention = msgspec.field(default_factory=TraceRetention)
    """Retention of the trace stream ``MESH_TRACE``."""
    manage: bool | None = None
    """Whether an *agent* creates the streams (the control plane always owns them and heals
    them). Unset (the default): create a stream only when it is missing and the agent's NATS
    permissions allow it (a refusal just means "missing": wait for the control plane);
    ``true``: also create/update them at connect (a standalone agent without a control plane);
    ``false``: never create them, only check that they exist."""


class RelayConfig(ConfigStruct, frozen=True):
    batch_size: PositiveInt = 1000
    """Outbox rows read per round."""
    window: PositiveInt = 256
    """Publishes in flight at once (each bounded by ``nats.request_timeout``)."""
    idle_interval: PositiveFloat = 0.05
    """Longest the relay sleeps when the outbox is empty before it looks again."""


class ConsumerConfig(ConfigStruct, frozen=True):
    """A flow's durable pull consumer on the sink side, and the checks its envelopes pass."""

    batch_size: PositiveInt = 500
    max_deliver: PositiveInt = 10
    ack_wait: PositiveFloat = 30.0
    max_ack_pending: PositiveInt = 20_000
    fetch_timeout: PositiveFloat = 1.0
    max_version_skew: PositiveFloat = 86400.0
    """Seconds an envelope's ``version`` may lie ahead of now, read as microseconds since the
    epoch (the largest version a source can produce: time-based versions are epoch µs, counters
    are far smaller). An envelope with ``version > now_µs + max_version_skew * 10**6`` (or below
    1) is dead-lettered as :class:`~mesh.errors.InvalidEnvelope` before it reaches the inbox,
    the sink or its version guard, so a forged huge version cannot lock a key (I5, I6)."""


ErrorAction = Literal["retry", "dead_letter"]


class RetryConfig(ConfigStruct, frozen=True):
    """How a flow's sink side treats failures (I6).

    A failed message is nak'ed with an exponential delay (``initial_delay * multiplier**n``,
    capped at ``max_delay``, +/- ``jitter``) until the server has delivered it
    ``consumer.max_deliver`` times; then, or at once for an error whose action is
    ``dead_letter``, it goes to the dead-letter stream and the flow moves on. By default
    retryable errors (SystemUnavailable, TransportError) retry and permanent ones (DecodeError,
    RejectedRecord) are dead-lettered; ``errors`` overrides that per error class, e.g.
    ``RejectedRecord = "retry"``. An :class:`~mesh.errors.IntegrityPending` refusal (a parent not
    there yet, a child still there) is retried on its own schedule: the ``max_deliver``
    deliveries are spread over ``integrity_retry`` seconds with doubling delays (0: dead-letter
    at once).
    """

    initial_delay: PositiveFloat = 0.5
    max_delay: PositiveFloat = 60.0
    multiplier: Annotated[float, msgspec.Meta(ge=1.0)] = 2.0
    jitter: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.2
    errors: dict[str, ErrorAction] = msgspec.field(default_factory=dict)
    integrity_retry: Annotated[float, msgspec.Meta(ge=0.0)] = 600.0
    """Seconds a record refused for integrity (IntegrityPending) keeps being retried."""

    def integrity_delay(self, attempt: int, max_deliver: int) -> float:
        """Seconds to wait before delivery ``attempt + 1`` of an IntegrityPending record: the
        ``max_deliver - 1`` waits double each time and add up to ``integrity_retry`` (none is
        shorter than ``initial_delay``, so with many deliveries the total may exceed it by at
        most ``initial_delay`` per wait)."""
        waits = min(max(max_deliver - 1, 1), 60)  # beyond 60 doublings the first waits are ~0
        share = 2.0 ** (min(max(attempt, 1), waits) - 1) / (2.0**waits - 1)
        base = max(self.initial_delay, self.integrity_retry * share)
        return max(0.0, base * (1 + self.jitter * (2 * random.random() - 1)))

    def delay(self, attempt: int) -> float:
        """Seconds to wait before delivery ``attempt + 1`` (``attempt`` counts from 1)."""
        base = min(self.max_delay, self.initial_delay * self.multiplier ** min(max(attempt - 1, 0), 64))
        return max(0.0, base * (1 + self.jitter * (2 * random.random() - 1)))

    def action(self, exc: BaseException) -> ErrorAction:
        """``retry`` or ``dead_letter`` for ``exc``: the most specific configured class wins."""
        for cls in type(exc).__mro__:
            if cls.__name__ in self.errors:
                return self.errors[cls.__name__]
        return "retry" if isinstance(exc, RetryableError) else "dead_letter"


class AfterConfig(ConfigStruct, frozen=True):
    """A child flow's parent (``after = { flow = "orders", key = "order_id" }``): the sink applies
    a record of this flow only once the parent record it references has been applied by the
    ``flow``'s sink on this agent, and applies a delete of a parent only once the children that
    reference it have been deleted here (README "Parent before child")."""

    flow: Token
    """The parent flow: another flow of this agent with a [sink]."""
    key: str | list[str]
    """The field(s) of this flow's canonical record holding the parent's key (several fields:
    a composite key, in the parent key's column order). A record whose field is null or missing
    references no parent and is not held."""


class FlowConfig(ConfigStruct, frozen=True):
    """One flow: what it carries, its source and/or sink, and how it treats failures.

    ``source`` and ``sink`` are typed as the base :class:`AdapterConfig`; decoding goes through
    :func:`decode_flow` (or :func:`parse_agent_config`), which picks the concrete config from the
    installed adapters by ``adapter = "..."``. ``msgspec.convert(data, FlowConfig)`` only decodes
    a flow without sides.
    """

    name: Token
    entity: Token
    """The canonical entity the flow carries (``customer``): names the subjects."""
    source: AdapterConfig | None = None
    sink: AdapterConfig | None = None
    consumer: ConsumerConfig = msgspec.field(default_factory=ConsumerConfig)
    retry: RetryConfig = msgspec.field(default_factory=RetryConfig)
    accept_origins: list[Token] | None = None
    """Sink side: origins whose events this flow applies (default: every origin but our own)."""
    to_canonical: MappingConfig | None = None
    """Capture side: how a system row becomes the canonical ``entity`` (see :mod:`mesh.mapping`);
    without it the flow publishes raw rows (schema ``<entity>/row``)."""
    from_canonical: MappingConfig | None = None
    """Apply side: how a canonical entity becomes the row the sink writes."""
    ownership: EntityOwnership | None = None
    """Apply side: which system may create, delete and write which fields (see
    :mod:`mesh.ownership`); versions are then compared per origin."""
    schedule: ScheduleConfig | None = None
    """Capture side: run the source as a scheduled bulk extract (:mod:`mesh.runs`) instead of
    continuously; the source's adapter must have the ``bulk`` capability."""
    after: AfterConfig | None = None
    """Apply side: the parent flow whose records this flow's records reference (parent before
    child, deletes child before parent); held records wait up to ``retry.integrity_retry``."""
    slo_seconds: PositiveFloat = 5.0
    """Apply side: the SLO target; a change counts as on time when applied within this many
    seconds of its capture (``mesh_slo_changes_on_time_total``, ``/status`` ``slo_ratio``)."""


class TelemetryConfig(ConfigStruct, frozen=True):
    """OpenTelemetry tracing (README "OpenTelemetry"; needs the ``otel`` extra)."""

    otlp_endpoint: str = ""
    """OTLP/HTTP collector base URL (``http://collector:4318``; spans go to ``/v1/traces``).
    Empty: ``OTEL_EXPORTER_OTLP_ENDPOINT`` if set, else tracing is off."""
    service_name: str = ""
    """The spans' ``service.name``; default ``connector-mesh.<agent name>``."""


class AgentConfig(ConfigStruct, frozen=True):
    agent: AgentSection
    nats: NatsConfig = msgspec.field(default_factory=NatsConfig)
    streams: StreamsConfig = msgspec.field(default_factory=StreamsConfig)
    relay: RelayConfig = msgspec.field(default_factory=RelayConfig)
    trace: TraceConfig = msgspec.field(default_factory=TraceConfig)
    telemetry: TelemetryConfig = msgspec.field(default_factory=TelemetryConfig)
    flows: list[FlowConfig] = msgspec.field(default_factory=list)
    api: ApiConfig | None = None
    """System API operations this agent serves (README "System APIs")."""
    policies: dict[Token, PolicyConfig] = msgspec.field(default_factory=dict)
    """Shared API policies adapters name (``policy = "<name>"``), README "Shared rate limits
    and quotas (API policy)"."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    """``json``: one JSON object per log line (ts, level, logger, msg, agent, flow, correlation_id)."""


# --- decoding through the adapter registry ---------------------------------------------------

_STRUCT_OPTIONS: dict[str, Any] = {"frozen": True, "kw_only": True, "forbid_unknown_fields": True}


def _registry(registry: AdapterRegistry | None) -> AdapterRegistry:
    return adapter_registry() if registry is None else registry


@functools.cache
def _decoder_types(registry: AdapterRegistry) -> tuple[type[FlowConfig], type[AgentConfig]]:
    source, sink = registry.config_union("source"), registry.config_union("sink")
    flow = msgspec.defstruct(
        "FlowConfig",
        [("source", source | None, None), ("sink", sink | None, None)],
        bases=(FlowConfig,),
        module=__name__,
        **_STRUCT_OPTIONS,
    )
    agent = msgspec.defstruct(
        "AgentConfig",
        [
            ("flows", list[flow], msgspec.field(default_factory=list)),  # type: ignore[valid-type]
            ("api", api_config_type(registry) | None, None),
        ],
        bases=(AgentConfig,),
        module=__name__,
        **_STRUCT_OPTIONS,
    )
    return cast("type[FlowConfig]", flow), cast("type[AgentConfig]", agent)


def flow_config_type(registry: AdapterRegistry | None = None) -> type[FlowConfig]:
    """The :class:`FlowConfig` subclass whose ``source`` / ``sink`` are the tagged unions of the
    installed adapters' configs (built once per registry; what every decoder uses).

    Raises:
        PluginError: an installed adapter plugin is broken (see :func:`mesh.plugins.discover`).
    """
    return _decoder_types(_registry(registry))[0]


def agent_config_type(registry: AdapterRegistry | None = None) -> type[AgentConfig]:
    """The :class:`AgentConfig` subclass whose flows are :func:`flow_config_type` (for decoding and
    the JSON Schema of agent configs)."""
    return _decoder_types(_registry(registry))[1]


_PATH_RE = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")


def validation_problem(
    exc: msgspec.ValidationError, prefix: str = "", registry: AdapterRegistry | None = None
) -> ConfigProblem:
    """msgspec's "Expected `int`, got `str` - at `$.a[0].b`" as ("<prefix>.a[0].b", "expected ...").

    An unknown ``adapter`` value gets the list of the installed adapters that can play that side.
    """
    message = str(exc)
    match = _PATH_RE.search(message)
    path, text = ("", message) if match is None else (match.group("path"), message[: match.start()])
    full = f"{prefix}.{path}" if prefix and path else prefix or path
    if full.endswith(("source.adapter", "sink.adapter")) and text.startswith("Invalid value"):
        role: RoleName = "sink" if full.endswith("sink.adapter") else "source"
        known = _registry(registry).names(role)
        text += (
            f" (expected one of the installed {role} adapters: {', '.join(known)})"
            if known
            else f" (no {role} adapter is installed: the package metadata is missing or stale;"
            " reinstall connector-mesh, e.g. `pip install -e .`)"
        )
    return ConfigProblem(full, text[:1].lower() + text[1:])


def decode_flow(
    data: Mapping[str, Any],
    *,
    source: str | None = None,
    path: str = "",
    registry: AdapterRegistry | None = None,
) -> FlowConfig:
    """Decode one ``[[flows]]`` table (types only: see :func:`check_flow` for consistency).

    Raises:
        ConfigError: the first type problem, at ``path`` + its field path; an unknown
            ``adapter`` lists the installed ones.
    """
    try:
        return msgspec.convert(data, flow_config_type(registry))
    except msgspec.ValidationError as exc:
        raise ConfigError(source=source, problems=[validation_problem(exc, path, registry)]) from None


def decode_adapter_config(
    role: RoleName,
    data: Mapping[str, Any],
    *,
    source: str | None = None,
    path: str = "",
    registry: AdapterRegistry | None = None,
) -> AdapterConfig:
    """Decode one ``[flows.source]`` or ``[flows.sink]`` table by its ``adapter``.

    Raises:
        ConfigError: as :func:`decode_flow`.
    """
    try:
        cfg: AdapterConfig = msgspec.convert(data, _registry(registry).config_union(role))
    except msgspec.ValidationError as exc:
        raise ConfigError(source=source, problems=[validation_problem(exc, path, registry)]) from None
    return cfg


# --- consistency -------------------------------------------------------------------------------

_ERROR_CLASSES = {
    name
    for name in _errors.__all__
    if isinstance(getattr(_errors, name), type) and issubclass(getattr(_errors, name), _errors.MeshError)
}


def check_flow(flow: FlowConfig, path: str) -> list[ConfigProblem]:
    """Every consistency problem of one flow as (field path, message); types are checked already."""
    problems: list[ConfigProblem] = []
    if flow.source is None and flow.sink is None:
        problems.append(ConfigProblem(path, "a flow needs a [source], a [sink] or both"))
    for name in flow.retry.errors:
        if name not in _ERROR_CLASSES:
            problems.append(ConfigProblem(
                f"{path}.retry.errors.{name}",
                f"unknown error class (expected one of: {', '.join(sorted(_ERROR_CLASSES))})",
            ))  # fmt: skip
    for side, cfg in (("source", flow.source), ("sink", flow.sink)):
        if cfg is not None:
            problems.extend(
                ConfigProblem(f"{path}.{side}.{p}" if p else f"{path}.{side}", m) for p, m in cfg.problems()
            )
    if flow.schedule is not None:
        if flow.source is None:
            problems.append(ConfigProblem(f"{path}.schedule", "a schedule runs the flow's [source]: add one"))
        else:
            tag = type(flow.source).__struct_config__.tag
            with contextlib.suppress(PluginError):  # an unknown adapter is reported elsewhere
                if adapter_registry().plugin_of(flow.source).bulk is None:
                    problems.append(ConfigProblem(
                        f"{path}.schedule",
                        f"adapter {tag!r} cannot run on a schedule (it has no bulk extract; "
                        "sqlite, postgres and rest can)",
                    ))  # fmt: skip
    return problems


def _check(cfg: AgentConfig) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    seen: set[str] = set()
    for i, flow in enumerate(cfg.flows):
        if flow.name in seen:
            problems.append(ConfigProblem(f"flows[{i}].name", f"duplicate flow name {flow.name!r}"))
        seen.add(flow.name)
        problems.extend(check_flow(flow, f"flows[{i}]"))
    problems.extend(_check_after(cfg.flows))
    if not cfg.nats.servers:
        problems.append(ConfigProblem("nats.servers", "expected at least one server URL"))
    if cfg.api is not None:
        problems.extend(check_api(cfg.api))
    return problems


def _check_after(flows: Sequence[FlowConfig]) -> list[ConfigProblem]:
    """``after`` names another flow of this agent with a [sink], from a flow with a [sink], and
    the parents do not form a cycle (which would hold every record of the cycle)."""
    problems: list[ConfigProblem] = []
    by_name = {f.name: f for f in flows}
    for i, flow in enumerate(flows):
        if flow.after is None:
            continue
        where = f"flows[{i}].after"
        parent = by_name.get(flow.after.flow)
        if flow.sink is None:
            problems.append(ConfigProblem(where, "`after` orders what a [sink] applies: this flow has none"))
        elif flow.after.flow == flow.name:
            problems.append(ConfigProblem(f"{where}.flow", "a flow cannot come after itself"))
        elif parent is None or parent.sink is None:
            sinks = ", ".join(sorted(f.name for f in flows if f.sink is not None and f.name != flow.name))
            problems.append(ConfigProblem(
                f"{where}.flow",
                f"{flow.after.flow!r} is not a flow of this agent with a [sink]"
                f" (expected one of: {sinks or 'none'})",
            ))  # fmt: skip
        elif isinstance(flow.after.key, list) and not flow.after.key:
            problems.append(ConfigProblem(f"{where}.key", "expected at least one field"))
        else:
            chain: list[str] = [flow.name]
            step: FlowConfig | None = parent
            while step is not None and step.after is not None and step.name not in chain:
                chain.append(step.name)
                step = by_name.get(step.after.flow)
            if step is not None and step.name == flow.name:
                problems.append(ConfigProblem(
                    f"{where}.flow",
                    f"parents form a cycle ({' -> '.join([*chain, flow.name])}): nothing could apply",
                ))  # fmt: skip
    return problems


def _check_data(cfg: AgentConfig, source: str, base: Path) -> list[ConfigProblem]:
    """Compile every flow's mappings and ownership; every problem of every flow."""
    from mesh.flowdata import compile_flow_data

    problems: list[ConfigProblem] = check_tls_files(_resolve_nats(cfg.nats, base).tls)
    for i, flow in enumerate(cfg.flows):
        try:
            compile_flow_data(flow, source=source, path=f"flows[{i}]", base=base)
        except ConfigError as exc:
            problems.extend(exc.problems)
    return problems


_SYSTEMD_DIR_REF = re.compile(r"\$\{(CREDENTIALS_DIRECTORY|STATE_DIRECTORY)(?::-([^}]*))?\}")


def expand_credentials_directory(p: str, environ: Mapping[str, str] | None = None) -> str:
    """``p`` with ``${CREDENTIALS_DIRECTORY}`` and ``${STATE_DIRECTORY}`` (each also as
    ``${VAR:-default}``) expanded.

    systemd's ``LoadCredential=`` puts a service's credentials in a private directory and names
    it in ``$CREDENTIALS_DIRECTORY`` (``StateDirectory=``: ``$STATE_DIRECTORY``); a config path
    written as ``${CREDENTIALS_DIRECTORY:-/etc/mesh/credentials}/erp.creds`` is that file when
    the agent runs under its unit, and the file ``LoadCredential=`` reads from when an operator
    runs ``meshctl agent register`` or ``config check`` by hand. Only these two variables are
    expanded (an applied flow must not name the agent's other environment variables); unset
    and no default leaves the text as written, so the error names it.
    """
    env = os.environ if environ is None else environ

    def sub(m: re.Match[str]) -> str:
        value = env.get(m.group(1), "")
        if value:
            return value
        return m.group(2) if m.group(2) is not None else m.group(0)

    return _SYSTEMD_DIR_REF.sub(sub, p)


def _resolver(base: Path) -> Callable[[str], str]:
    def resolve(p: str) -> str:
        path = Path(expand_credentials_directory(p)).expanduser()
        return str(path if path.is_absolute() else (base / path).resolve())

    return resolve


def _nul_problem(where: str, p: str) -> ConfigProblem:
    # The OS cannot take such a path (Path.resolve raises ValueError): refused like any bad value.
    return ConfigProblem(where, f"path {p!r} contains a NUL character")


def resolve_flow_paths(
    flow: FlowConfig, base: Path, *, confine_to: Sequence[Path] | None = None, source: str = "control plane"
) -> FlowConfig:
    """``flow`` with every file path (source, sink, SQLite lookups) made absolute against ``base``.

    With ``confine_to``, every path must resolve (symlinks and ``..`` followed) inside one of
    those directories.

    Raises:
        ConfigError: a path leads outside ``confine_to`` or holds a NUL character; one problem
            per side, with the path; ``source`` names where the flow came from.
    """
    problems: list[ConfigProblem] = []
    roots = [Path(r).resolve() for r in confine_to] if confine_to is not None else None

    def resolver(side: str) -> Callable[[str], str]:
        plain = _resolver(base)

        def resolve(p: str) -> str:
            if "\x00" in p:
                problems.append(_nul_problem(f"flows.{flow.name}.{side}", p))
                return p
            resolved = plain(p)
            if roots is not None:
                real = Path(resolved).resolve()
                if not any(real == r or real.is_relative_to(r) for r in roots):
                    where = ", ".join(str(r) for r in roots)
                    problems.append(ConfigProblem(
                        f"flows.{flow.name}.{side}",
                        f"path {p!r} resolves to {real}, outside the directories this agent allows "
                        f"for applied flows ({where}; see agent.allowed_paths)",
                    ))  # fmt: skip
            return resolved

        return resolve

    changes: dict[str, Any] = {}
    if flow.source is not None:
        changes["source"] = flow.source.resolved(resolver("source"))
    if flow.sink is not None:
        changes["sink"] = flow.sink.resolved(resolver("sink"))
    for direction in ("to_canonical", "from_canonical"):
        mapping = getattr(flow, direction)
        if mapping is not None:
            changes[direction] = mapping.resolved(resolver(direction))
    if problems:
        raise ConfigError(source=source, problems=problems)
    return msgspec.structs.replace(flow, **changes)


def _resolve_paths(cfg: AgentConfig, base: Path, source: str) -> AgentConfig:
    agent_paths = [("agent.state_dir", cfg.agent.state_dir)]
    agent_paths += [(f"agent.allowed_paths[{i}]", p) for i, p in enumerate(cfg.agent.allowed_paths)]
    problems = [_nul_problem(where, p) for where, p in agent_paths if "\x00" in p]
    if problems:
        raise ConfigError(source=source, problems=problems)
    flows = [resolve_flow_paths(flow, base, source=source) for flow in cfg.flows]
    resolve = _resolver(base)
    agent = msgspec.structs.replace(
        cfg.agent,
        state_dir=resolve(cfg.agent.state_dir),
        allowed_paths=[resolve(p) for p in cfg.agent.allowed_paths],
    )
    api = cfg.api
    if api is not None:
        ops = [msgspec.structs.replace(op, run=op.run.resolved(resolve)) for op in api.operations]
        api = msgspec.structs.replace(api, operations=ops)
    return msgspec.structs.replace(cfg, agent=agent, flows=flows, api=api, nats=_resolve_nats(cfg.nats, base))


def _resolve_nats(nats: NatsConfig, base: Path) -> NatsConfig:
    """``nats`` with its TLS and creds file paths made absolute against ``base``."""
    resolve = _resolver(base)
    tls = nats.tls
    if tls is not None:
        files = {f: getattr(tls, f) for f in ("ca_file", "cert_file", "key_file")}
        resolved = {f: None if v is None else resolve(v) for f, v in files.items()}
        tls = msgspec.structs.replace(tls, **resolved)
    creds = None if nats.creds is None else resolve(nats.creds)
    password_file = None if nats.password_file is None else resolve(nats.password_file)
    return msgspec.structs.replace(nats, tls=tls, creds=creds, password_file=password_file)


def _type_problems(raw: dict[str, Any], registry: AdapterRegistry | None) -> list[ConfigProblem]:
    """The first type problem of the agent's own tables and of each flow (msgspec stops at the
    first one of a document; an operator wants to see one per flow at least)."""
    flows = raw.get("flows")
    if not isinstance(flows, list):
        return []
    problems = []
    try:
        msgspec.convert({k: v for k, v in raw.items() if k not in ("flows", "api")}, AgentConfig)
    except msgspec.ValidationError as exc:
        problems.append(validation_problem(exc, "", registry))
    if "api" in raw:
        try:
            msgspec.convert(raw["api"], api_config_type(_registry(registry)))
        except msgspec.ValidationError as exc:
            problems.append(validation_problem(exc, "api", registry))
    flow_type = flow_config_type(registry)
    for i, flow in enumerate(flows):
        try:
            msgspec.convert(flow, flow_type)
        except msgspec.ValidationError as exc:
            problems.append(validation_problem(exc, f"flows[{i}]", registry))
    return problems


def parse_agent_config(
    text: str, *, source: str = "<string>", base: Path | None = None, registry: AdapterRegistry | None = None
) -> AgentConfig:
    """Parse and validate an agent config from TOML text, with the installed adapters (or
    ``registry``).

    Raises:
        ConfigError: invalid TOML, unknown or missing keys and wrong types (the first of the
            agent's own tables and of each flow), or else every inconsistent value, mapping and
            ownership problem; each names ``source``, the field path and what was expected.
        PluginError: an installed adapter plugin is broken.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", source=source) from None
    try:
        cfg = msgspec.convert(raw, agent_config_type(registry))
    except msgspec.ValidationError as exc:
        problems = _type_problems(raw, registry) or [validation_problem(exc, "", registry)]
        raise ConfigError(source=source, problems=problems) from None
    problems = _check(cfg)
    if not problems:
        problems = _check_data(cfg, source, base or Path.cwd())
    if problems:
        raise ConfigError(source=source, problems=problems)
    return _resolve_paths(cfg, base or Path.cwd(), source)


def load_agent_config(path: str | Path, *, registry: AdapterRegistry | None = None) -> AgentConfig:
    """Load and validate the agent config file at ``path`` (see :func:`parse_agent_config`)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config: {exc.strerror}", source=str(file)) from None
    return parse_agent_config(text, source=str(file), base=file.resolve().parent, registry=registry)
