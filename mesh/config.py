"""Typed agent configuration, loaded from TOML with msgspec.

Guarantees: an unknown key, a missing required key or a wrong type stops start-up with a
:class:`~mesh.errors.ConfigError` naming the file, the field path (``flows[0].source.table``) and
what was expected. Relative paths in the file are resolved against the file's own directory, so
a config means the same thing whatever the working directory.
"""

from __future__ import annotations

import random
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import msgspec

from mesh import errors as _errors
from mesh.errors import ConfigError, RetryableError

__all__ = [
    "ADAPTERS",
    "SINK_ADAPTERS",
    "SOURCE_ADAPTERS",
    "AgentConfig",
    "AgentSection",
    "ConsumerConfig",
    "ErrorAction",
    "FlowConfig",
    "NatsConfig",
    "RelayConfig",
    "RestApiKeyAuth",
    "RestAuth",
    "RestBasicAuth",
    "RestBearerAuth",
    "RestSinkConfig",
    "RetryConfig",
    "SinkConfig",
    "SourceConfig",
    "SqliteSinkConfig",
    "SqliteSourceConfig",
    "StreamsConfig",
    "check_flow",
    "load_agent_config",
    "parse_agent_config",
]

# Names end up in NATS subjects and consumer names: keep them to one safe token.
_TOKEN = r"^[A-Za-z0-9_-]+$"
Token = Annotated[str, msgspec.Meta(pattern=_TOKEN, min_length=1, max_length=64)]
PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]


class _Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class _AdapterConfig(_Config, frozen=True):
    """Base of every source and sink config (members of :data:`SourceConfig` / :data:`SinkConfig`)."""

    def resolved(self, resolve: Callable[[str], str]) -> Self:
        """This config with its file paths made absolute by ``resolve`` (relative to the config
        file's directory). Adapters with file-path fields override it."""
        return self


class AgentSection(_Config, frozen=True):
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


class NatsConfig(_Config, frozen=True):
    servers: list[str] = msgspec.field(default_factory=lambda: ["nats://127.0.0.1:4222"])
    user: str | None = None
    password_env: str | None = None
    """Name of the environment variable that holds the password (secrets are referenced)."""
    connect_timeout: PositiveFloat = 2.0
    request_timeout: PositiveFloat = 5.0
    """Bound on every publish acknowledgement and JetStream API call."""


class StreamsConfig(_Config, frozen=True):
    replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] = 1
    duplicate_window: PositiveFloat = 120.0
    """Seconds during which JetStream drops a republished Nats-Msg-Id."""
    max_age: float = 7 * 24 * 3600.0
    """Seconds events are kept in MESH_EVENTS (0 = forever)."""
    storage: Literal["file", "memory"] = "file"


class RelayConfig(_Config, frozen=True):
    batch_size: PositiveInt = 1000
    """Outbox rows read per round."""
    window: PositiveInt = 256
    """Publishes in flight at once (each bounded by ``nats.request_timeout``)."""
    idle_interval: PositiveFloat = 0.05
    """Longest the relay sleeps when the outbox is empty before it looks again."""


class ConsumerConfig(_Config, frozen=True):
    batch_size: PositiveInt = 500
    max_deliver: PositiveInt = 10
    ack_wait: PositiveFloat = 30.0
    max_ack_pending: PositiveInt = 20_000
    fetch_timeout: PositiveFloat = 1.0


ErrorAction = Literal["retry", "dead_letter"]


class RetryConfig(_Config, frozen=True):
    """How a flow's sink side treats failures (I6).

    A failed message is nak'ed with an exponential delay (``initial_delay * multiplier**n``,
    capped at ``max_delay``, +/- ``jitter``) until the server has delivered it
    ``consumer.max_deliver`` times; then, or at once for an error whose action is
    ``dead_letter``, it goes to the dead-letter stream and the flow moves on. By default
    retryable errors (SystemUnavailable, TransportError) retry and permanent ones (DecodeError,
    RejectedRecord) are dead-lettered; ``errors`` overrides that per error class, e.g.
    ``RejectedRecord = "retry"`` when a foreign-key miss resolves once the parent arrives.
    """

    initial_delay: PositiveFloat = 0.5
    max_delay: PositiveFloat = 60.0
    multiplier: Annotated[float, msgspec.Meta(ge=1.0)] = 2.0
    jitter: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.2
    errors: dict[str, ErrorAction] = msgspec.field(default_factory=dict)

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


class SqliteSourceConfig(_AdapterConfig, frozen=True, tag="sqlite", tag_field="adapter"):
    path: str
    table: Token
    key: Token
    mode: Literal["changes", "cursor"] = "changes"
    """``changes``: triggers feed a change table (inserts, updates and deletes are captured);
    ``cursor``: poll rows whose ``cursor_column`` grew (deletes are not seen)."""
    cursor_column: Token | None = None
    version_column: Token | None = None
    """``cursor`` mode: an integer column that grows with every change of a row (defaults to
    ``cursor_column``)."""
    batch_size: PositiveInt = 1000
    poll_interval: PositiveFloat = 0.05
    """Seconds between looks at the table when there was nothing new (bounds added latency)."""
    install_triggers: bool = True
    """``changes`` mode: create the change table and triggers when missing."""

    def resolved(self, resolve: Callable[[str], str]) -> Self:
        return msgspec.structs.replace(self, path=resolve(self.path))


class SqliteSinkConfig(_AdapterConfig, frozen=True, tag="sqlite", tag_field="adapter"):
    path: str
    table: Token
    key: Token
    create_table: bool = False
    """Create the table from the first row seen when it does not exist."""
    busy_timeout: PositiveFloat = 5.0

    def resolved(self, resolve: Callable[[str], str]) -> Self:
        return msgspec.structs.replace(self, path=resolve(self.path))


# Names of environment variables that hold secrets (the config references secrets, never holds them).
_EnvName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=128)]
_HeaderName = Annotated[str, msgspec.Meta(pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$", max_length=128)]


class RestBearerAuth(_Config, frozen=True, tag="bearer", tag_field="type"):
    """``Authorization: Bearer <token>``, the token read from an environment variable."""

    token_env: _EnvName
    """Name of the environment variable that holds the token."""


class RestBasicAuth(_Config, frozen=True, tag="basic", tag_field="type"):
    """HTTP basic authentication; the password read from an environment variable."""

    user: str
    password_env: _EnvName
    """Name of the environment variable that holds the password."""


class RestApiKeyAuth(_Config, frozen=True, tag="api_key", tag_field="type"):
    """An API key sent in a header of its own; the key read from an environment variable."""

    key_env: _EnvName
    """Name of the environment variable that holds the key."""
    header: _HeaderName = "X-API-Key"


RestAuth = RestBearerAuth | RestBasicAuth | RestApiKeyAuth


class RestSinkConfig(_AdapterConfig, frozen=True, tag="rest", tag_field="adapter"):
    """A JSON REST API as a sink: one request per record, guarded by a local version table.

    The target needs no version guard of its own: ``state_path`` (a SQLite file the sink owns)
    remembers the highest version applied per key, and records not newer are skipped without a
    request. Every request carries ``Idempotency-Key: <envelope id>`` and ``X-Mesh-Version``.
    """

    base_url: Annotated[str, msgspec.Meta(pattern=r"^https?://[^/?#@]+(/[^?#]*)?$")]
    """``https://crm.example.com/api/v2``: scheme, host and an optional path prefix; no
    credentials and no query (put those in ``auth``)."""
    upsert_path: Annotated[str, msgspec.Meta(min_length=1)]
    """Path template under ``base_url`` for an upsert, e.g. ``/customers/{key}``; ``{key}`` is
    replaced by the URL-encoded record key (omit it to POST to a collection, with ``key_field``)."""
    state_path: Annotated[str, msgspec.Meta(min_length=1)]
    """The sink's own SQLite file: key -> highest applied version (and deleted flag)."""
    method: Literal["PUT", "POST", "PATCH"] = "PUT"
    """HTTP method of an upsert."""
    delete_path: str | None = None
    """Path template for a delete (default: ``upsert_path``)."""
    delete_mode: Literal["delete", "tombstone"] = "delete"
    """``delete``: send DELETE (a 404 counts as deleted); ``tombstone``: PATCH
    ``{tombstone_field: true}`` so the target keeps the record, flagged."""
    tombstone_field: Annotated[str, msgspec.Meta(min_length=1)] = "deleted"
    key_field: str | None = None
    """Put the record key into the JSON body under this name (the target's external id)."""
    fields: list[str] | None = None
    """Send only these fields of the row (default: all of them)."""
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    """Static headers sent with every request (no secrets here: use ``auth``)."""
    auth: RestAuth | None = None
    """``[flows.sink.auth]`` with ``type = "bearer" | "basic" | "api_key"``."""
    timeout: PositiveFloat = 10.0
    """Seconds one request may take (connect, send, wait, read) before it counts as failed."""
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=64)] = 8
    """Requests in flight at once; records of one key are always sent one after another."""
    rate_limit: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    """Requests per second to this target (token bucket; 0: no limit). Keep
    ``consumer.batch_size / rate_limit`` well under ``consumer.ack_wait``."""
    burst: PositiveInt | None = None
    """Token-bucket size: requests that may go at once after a quiet spell (default:
    ``rate_limit`` rounded up)."""
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=20)] = 3
    """Tries per request within one ``apply`` on 5xx, 408, 409, 429, timeouts and connection
    errors; then the batch is given back (the agent naks it with its own backoff)."""
    backoff_initial: PositiveFloat = 0.2
    """Seconds before the second try; doubles with each further try, +/- ``backoff_jitter``."""
    backoff_max: PositiveFloat = 5.0
    backoff_jitter: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.2
    retry_after_cap: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    """Longest ``Retry-After`` waited for inside ``apply``; a longer one gives the batch back."""
    breaker_threshold: PositiveInt = 5
    """Consecutive failed requests (5xx, 408, timeouts, connection errors) that open the circuit."""
    breaker_cooldown: PositiveFloat = 30.0
    """Seconds the open circuit refuses at once before one probe request is let through."""

    def resolved(self, resolve: Callable[[str], str]) -> Self:
        return msgspec.structs.replace(self, state_path=resolve(self.state_path))


# Every adapter config: add a new one to its union and its tuple (the tag = ``adapter`` value).
SourceConfig = SqliteSourceConfig
SinkConfig = SqliteSinkConfig | RestSinkConfig
SOURCE_ADAPTERS: tuple[str, ...] = ("sqlite",)
SINK_ADAPTERS: tuple[str, ...] = ("sqlite", "rest")
ADAPTERS = tuple(dict.fromkeys(SOURCE_ADAPTERS + SINK_ADAPTERS))


class FlowConfig(_Config, frozen=True):
    name: Token
    entity: Token
    """The canonical entity the flow carries (``customer``): names the subjects."""
    source: SourceConfig | None = None
    sink: SinkConfig | None = None
    consumer: ConsumerConfig = msgspec.field(default_factory=ConsumerConfig)
    retry: RetryConfig = msgspec.field(default_factory=RetryConfig)
    accept_origins: list[Token] | None = None
    """Sink side: origins whose events this flow applies (default: every origin but our own)."""


class AgentConfig(_Config, frozen=True):
    agent: AgentSection
    nats: NatsConfig = msgspec.field(default_factory=NatsConfig)
    streams: StreamsConfig = msgspec.field(default_factory=StreamsConfig)
    relay: RelayConfig = msgspec.field(default_factory=RelayConfig)
    flows: list[FlowConfig] = msgspec.field(default_factory=list)
    log_level: Literal["debug", "info", "warning", "error"] = "info"


_ERROR_CLASSES = {
    name
    for name in _errors.__all__
    if isinstance(getattr(_errors, name), type) and issubclass(getattr(_errors, name), _errors.MeshError)
}

_PATH_RE = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")


def _split_validation_message(message: str) -> tuple[str, str]:
    """Turn msgspec's "Expected `int`, got `str` - at `$.a[0].b`" into ("a[0].b", "expected ...")."""
    match = _PATH_RE.search(message)
    if match is None:
        return "", message[:1].lower() + message[1:]
    text = message[: match.start()]
    path = match.group("path")
    if path.endswith(".adapter") and text.startswith("Invalid value"):
        known = SOURCE_ADAPTERS if path.endswith("source.adapter") else SINK_ADAPTERS
        text += f" (expected one of: {', '.join(known)})"
    return path, text[:1].lower() + text[1:]


def check_flow(flow: FlowConfig, path: str) -> list[tuple[str, str]]:
    """Every consistency problem of one flow as (field path, message); types are checked already."""
    problems: list[tuple[str, str]] = []
    if flow.source is None and flow.sink is None:
        problems.append((path, "a flow needs a [source], a [sink] or both"))
    for name in flow.retry.errors:
        if name not in _ERROR_CLASSES:
            problems.append((
                f"{path}.retry.errors.{name}",
                f"unknown error class (expected one of: {', '.join(sorted(_ERROR_CLASSES))})",
            ))  # fmt: skip
    src = flow.source
    cursor_mode = getattr(src, "mode", None) == "cursor"
    if src is not None and cursor_mode and getattr(src, "cursor_column", "") is None:
        problems.append((f"{path}.source.cursor_column", 'required when mode = "cursor"'))
    return problems


def _check(cfg: AgentConfig, source: str) -> None:
    def fail(path: str, message: str) -> None:
        raise ConfigError(f"{path}: {message}", source=source, path=path)

    seen: set[str] = set()
    for i, flow in enumerate(cfg.flows):
        if flow.name in seen:
            fail(f"flows[{i}].name", f"duplicate flow name {flow.name!r}")
        seen.add(flow.name)
        for path, message in check_flow(flow, f"flows[{i}]"):
            fail(path, message)
    if not cfg.nats.servers:
        fail("nats.servers", "expected at least one server URL")


def _resolve_paths(cfg: AgentConfig, base: Path) -> AgentConfig:
    def resolve(p: str) -> str:
        path = Path(p).expanduser()
        return str(path if path.is_absolute() else (base / path).resolve())

    flows = []
    for flow in cfg.flows:
        changes: dict[str, Any] = {}
        if flow.source is not None:
            changes["source"] = flow.source.resolved(resolve)
        if flow.sink is not None:
            changes["sink"] = flow.sink.resolved(resolve)
        flows.append(msgspec.structs.replace(flow, **changes))
    agent = msgspec.structs.replace(cfg.agent, state_dir=resolve(cfg.agent.state_dir))
    return msgspec.structs.replace(cfg, agent=agent, flows=flows)


def parse_agent_config(text: str, *, source: str = "<string>", base: Path | None = None) -> AgentConfig:
    """Parse and validate an agent config from TOML text.

    Raises:
        ConfigError: invalid TOML, unknown or missing keys, wrong types or inconsistent values;
            the message names ``source``, the field path and what was expected.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", source=source) from None
    try:
        cfg = msgspec.convert(raw, AgentConfig)
    except msgspec.ValidationError as exc:
        path, message = _split_validation_message(str(exc))
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}{message}", source=source, path=path or None) from None
    _check(cfg, source)
    return _resolve_paths(cfg, base or Path.cwd())


def load_agent_config(path: str | Path) -> AgentConfig:
    """Load and validate the agent config file at ``path`` (see :func:`parse_agent_config`)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config: {exc.strerror}", source=str(file)) from None
    return parse_agent_config(text, source=str(file), base=file.resolve().parent)
