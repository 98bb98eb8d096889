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
from mesh.mapping import MappingConfig
from mesh.ownership import EntityOwnership

__all__ = [
    "ADAPTERS",
    "SINK_ADAPTERS",
    "SOURCE_ADAPTERS",
    "AgentConfig",
    "AgentSection",
    "ConsumerConfig",
    "CsvColumnType",
    "CsvSinkConfig",
    "CsvSourceConfig",
    "ErrorAction",
    "FlowConfig",
    "NatsConfig",
    "PostgresSinkConfig",
    "PostgresSourceConfig",
    "RelayConfig",
    "RestApiKeyAuth",
    "RestAuth",
    "RestBasicAuth",
    "RestBearerAuth",
    "RestCursorPagination",
    "RestIncremental",
    "RestLinkPagination",
    "RestModifiedSince",
    "RestOAuth2Auth",
    "RestOffsetPagination",
    "RestPagePagination",
    "RestPagination",
    "RestSinkConfig",
    "RestSourceConfig",
    "RestSyncCursor",
    "RetryConfig",
    "SinkConfig",
    "SourceConfig",
    "SqliteSinkConfig",
    "SqliteSourceConfig",
    "StreamsConfig",
    "WebhookSourceConfig",
    "check_flow",
    "load_agent_config",
    "parse_agent_config",
    "resolve_flow_paths",
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


class RestOAuth2Auth(_Config, frozen=True, tag="oauth2", tag_field="type"):
    """OAuth2 client credentials grant (RFC 6749 section 4.4): the client id and secret buy a
    short-lived bearer token at ``token_url``; it is cached until shortly before it expires and
    fetched again once when the API answers 401 (see ``adapters/rest/_auth.py``)."""

    token_url: Annotated[str, msgspec.Meta(pattern=r"^https?://[^/?#@]+(/[^#]*)?$")]
    """The authorization server's token endpoint, e.g. ``https://login.example.com/oauth/token``."""
    client_id: Annotated[str, msgspec.Meta(min_length=1)]
    client_secret_env: _EnvName
    """Name of the environment variable that holds the client secret."""
    scope: str | None = None
    """Space-separated scopes to ask for (default: none sent, the server's default)."""
    audience: str | None = None
    """Sent as ``audience`` (Auth0, Okta and others name the API the token is for this way)."""
    client_auth: Literal["basic", "body"] = "basic"
    """How the client authenticates at the token endpoint: HTTP basic (``client_secret_basic``,
    id and secret form-encoded first as RFC 6749 2.3.1 says) or ``client_id`` and
    ``client_secret`` in the form body (``client_secret_post``)."""
    refresh_margin: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    """Seconds before ``expires_in`` runs out that a new token is fetched (at most a tenth of
    the token's lifetime, so short-lived tokens are still used)."""
    timeout: PositiveFloat = 10.0
    """Seconds a token request may take."""


RestAuth = RestBearerAuth | RestBasicAuth | RestApiKeyAuth | RestOAuth2Auth


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
    """``[flows.sink.auth]`` with ``type = "bearer" | "basic" | "api_key" | "oauth2"``."""
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


# --- CSV files (adapters/files) ---------------------------------------------------------------

CsvColumnType = Literal["string", "int", "decimal", "bool", "date", "datetime"]
"""How a CSV import reads a column. ``string`` keeps the text as is ("00123" stays "00123");
``int`` is a 64-bit integer; ``decimal`` is validated but kept as its exact text (never a
float); ``bool`` accepts true/false, 1/0, yes/no, t/f, y/n; ``date`` and ``datetime`` are
validated ISO-8601 and kept as text. An empty cell of a typed (non-``string``) column is null."""

_Char = Annotated[str, msgspec.Meta(min_length=1, max_length=1)]
_Column = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
_Path = Annotated[str, msgspec.Meta(min_length=1)]


def _check_csv_encoding(encoding: str) -> None:
    """Files are split into lines on the byte ``\\n``: the encoding must keep ASCII as is."""
    import codecs

    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ValueError(f"encoding: unknown encoding {encoding!r}") from None
    probe = "\r\n,;|\t\"'"
    try:
        same = probe.encode(encoding) == probe.encode("ascii")
    except UnicodeError:
        same = False
    if not same:
        raise ValueError(
            f"encoding: {encoding!r} is not ASCII-compatible (expected e.g. utf-8, cp1252, latin-1)"
        )


class CsvSourceConfig(_AdapterConfig, frozen=True, tag="csv", tag_field="adapter"):
    """CSV files as a source: batch import, chunked and resumable (see adapters/files/csv_source.py).

    Exactly one of ``inbox_dir`` (every file matching ``pattern``, oldest first) or ``path``
    (one file, re-imported whenever its content changes). A file is identified by its SHA-256:
    the same content is imported once.
    """

    state_path: _Path
    """The adapter's own SQLite file: run records, rejected rows, files seen."""
    key: _Column | Annotated[list[_Column], msgspec.Meta(min_length=1)]
    """Key column, or several (the key is then their values joined by ``/``, each URL-quoted)."""
    inbox_dir: _Path | None = None
    pattern: _Path = "*.csv"
    path: _Path | None = None
    done_dir: _Path | None = None
    """Move a file here once imported (default: leave it in place; its run is complete)."""
    failed_dir: _Path | None = None
    """Move a file here when its run fails (no header, key column missing, ...)."""
    version_column: _Column | None = None
    """An integer (or ISO-8601 timestamp) column that grows with each change of a key. Default:
    ``run id * 2**32 + line number``, so a later file supersedes an earlier one for the same key
    and a later line supersedes an earlier one within a file."""
    delete_column: _Column | None = None
    """Rows whose value here is true (true/1/yes/t/y) are deletes of their key."""
    columns: dict[_Column, str] = msgspec.field(default_factory=dict)
    """Column types (:data:`CsvColumnType`, default ``string``); a typed column must be in the
    file's header."""
    delimiter: _Char = ","
    quotechar: _Char = '"'
    quoting: Literal["standard", "none"] = "standard"
    """``none``: quote characters are ordinary text."""
    escapechar: _Char | None = None
    doublequote: bool = True
    skipinitialspace: bool = False
    encoding: str = "utf-8"
    """Any ASCII-compatible codec; a UTF-8 byte-order mark is removed."""
    chunk_rows: PositiveInt = 1000
    """Rows read per batch: the unit of progress and of redo after a crash."""
    poll_interval: PositiveFloat = 1.0
    """Seconds between looks for new files when there is nothing to read."""
    settle_time: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    """A file is picked up only once it has not been modified for this many seconds (writers
    should still write under another name and rename into the inbox)."""

    def __post_init__(self) -> None:
        if (self.inbox_dir is None) == (self.path is None):
            raise ValueError("inbox_dir / path: set exactly one of them")
        _check_csv_encoding(self.encoding)
        from typing import get_args

        kinds = get_args(CsvColumnType)
        for name, kind in self.columns.items():
            if kind not in kinds:
                raise ValueError(
                    f"columns.{name}: {kind!r} is not a column type (expected one of: {', '.join(kinds)})"
                )
        keys = [self.key] if isinstance(self.key, str) else self.key
        if len(set(keys)) != len(keys):
            raise ValueError("key: a column is named twice")

    @property
    def key_columns(self) -> list[str]:
        return [self.key] if isinstance(self.key, str) else list(self.key)

    @property
    def batch_size(self) -> int:
        """What the capture loop asks for per read: ``chunk_rows``."""
        return self.chunk_rows

    def resolved(self, resolve: Callable[[str], str]) -> Self:
        def opt(p: str | None) -> str | None:
            return None if p is None else resolve(p)

        return msgspec.structs.replace(
            self,
            state_path=resolve(self.state_path),
            inbox_dir=opt(self.inbox_dir),
            path=opt(self.path),
            done_dir=opt(self.done_dir),
            failed_dir=opt(self.failed_dir),
        )


class CsvSinkConfig(_AdapterConfig, frozen=True, tag="csv", tag_field="adapter"):
    """CSV files as a sink: batch export, one file per flush (see adapters/files/csv_sink.py)."""

    out_dir: _Path
    state_path: _Path
    """The adapter's own SQLite file: version guard, staged records, run records."""
    file_prefix: Token = "export"
    """Files are named ``<file_prefix>-<UTC time>-<run id>.csv``."""
    columns: list[_Column] | None = None
    """The header (default: the fields of the first file's rows, fixed from then on)."""
    key_column: _Column | None = None
    """Write the record key into this column when the row lacks it (a delete carries only its key)."""
    version_column: _Column | None = None
    """Also write each record's version into this column."""
    deletes: Literal["column", "omit"] = "column"
    """``column``: deletes are rows with ``deleted_column`` = true; ``omit``: left out."""
    deleted_column: _Column = "_deleted"
    flush_rows: PositiveInt = 10_000
    """Cut a file as soon as this many rows wait (and at most this many rows per file)."""
    flush_interval: PositiveFloat = 60.0
    """Cut a file when the oldest waiting row has waited this many seconds."""
    delimiter: _Char = ","
    quotechar: _Char = '"'
    quoting: Literal["minimal", "all"] = "minimal"
    line_terminator: Literal["\r\n", "\n"] = "\r\n"
    encoding: str = "utf-8"
    bom: bool = False
    """Start each file with a UTF-8 byte-order mark (for spreadsheet programs)."""

    def __post_init__(self) -> None:
        _check_csv_encoding(self.encoding)
        if self.bom and self.encoding.lower().replace("_", "-") not in ("utf-8", "utf8"):
            raise ValueError("bom: only with encoding = 'utf-8'")
        if self.columns is not None and len(set(self.columns)) != len(self.columns):
            raise ValueError("columns: a column is named twice")

    def resolved(self, resolve: Callable[[str], str]) -> Self:
        return msgspec.structs.replace(
            self, out_dir=resolve(self.out_dir), state_path=resolve(self.state_path)
        )


# --- Webhook receiver (adapters/webhook) --------------------------------------------------------

_FieldPath = Annotated[str, msgspec.Meta(pattern=r"^[^.]+(\.[^.]+)*$", max_length=256)]
"""A dotted path into a JSON event: ``data.object.id``."""


class WebhookSourceConfig(_AdapterConfig, frozen=True, tag="webhook", tag_field="adapter"):
    """Signed inbound HTTP as a source: a SaaS POSTs JSON events (see adapters/webhook/source.py).

    A request is answered 2xx only once its events are committed to the agent's outbox; 503 with
    ``Retry-After`` otherwise (the sender retries, nothing is lost).
    """

    port: Annotated[int, msgspec.Meta(ge=0, le=65535)]
    """TCP port to listen on (0: a free port, logged at start; a sender needs a fixed one)."""
    state_path: Annotated[str, msgspec.Meta(min_length=1)]
    """The source's own SQLite file: delivery ids already captured (relative to this file)."""
    secret_env: _EnvName
    """Name of the environment variable that holds the HMAC-SHA256 signing secret."""
    key_field: _FieldPath
    """Path of the entity key in each event (a string or an integer)."""
    host: str = "127.0.0.1"
    path: Annotated[str, msgspec.Meta(pattern=r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*$")] = "/webhook"
    """The one URL path that accepts POSTs (anything else: 404; other methods: 405)."""
    rotation_secret_envs: list[_EnvName] = msgspec.field(default_factory=list)
    """More secrets accepted while a secret is rotated (the old or the new one)."""
    signature_header: _HeaderName = "Webhook-Signature"
    """``t=<unix seconds>,v1=<hmac>[,v1=<hmac>...]`` (Stripe's scheme), or only the signatures
    when ``timestamp_header`` is set. The HMAC is over ``"<timestamp>." + body``."""
    signature_scheme: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]+$")] = "v1"
    """Name of the signature entries in the header (``v1=...``)."""
    signature_encoding: Literal["hex", "base64"] = "hex"
    timestamp_header: _HeaderName | None = None
    """A header of its own holding the unix timestamp (default: ``t=`` in ``signature_header``)."""
    id_header: _HeaderName | None = "Webhook-Id"
    """Header with the sender's delivery id: a delivery id already captured is answered 200
    ``duplicate`` and not captured again. Requests without one are captured every time."""
    tolerance: PositiveFloat = 300.0
    """Seconds the signed timestamp may differ from our clock (either way) before a 401."""
    version_field: _FieldPath | None = None
    """Path of the event's version: an integer, or an ISO-8601 timestamp (microseconds since the
    epoch). Default: the signed timestamp in microseconds (plus the event's index in a batch)."""
    type_field: _FieldPath | None = None
    """Path of the event type (a string)."""
    delete_types: list[str] = msgspec.field(default_factory=list)
    """Event types that mean the entity was deleted (needs ``type_field``)."""
    accept_types: list[str] | None = None
    """Only these event types become changes; others are answered 200 ``ignored`` (needs
    ``type_field``; default: every type)."""
    row_field: _FieldPath | None = None
    """Path of the object that becomes the row (default: the whole event)."""
    batch: bool = False
    """Also accept a JSON array of events in one request (all captured together, or none)."""
    max_body_bytes: PositiveInt = 1 << 20
    """Larger request bodies are refused with 413."""
    queue_size: PositiveInt = 1000
    """Requests waiting for the agent to capture them; when full: 503 with ``Retry-After``."""
    ack_timeout: PositiveFloat = 10.0
    """Seconds a request waits for its events to reach the outbox before a 503."""
    retry_after: PositiveInt = 5
    """Seconds sent in ``Retry-After`` with every 503."""
    id_retention: PositiveFloat = 7 * 24 * 3600.0
    """Seconds delivery ids are remembered. Keep it longer than the sender retries."""
    batch_size: PositiveInt = 1000
    """Most changes the capture loop takes per outbox transaction."""

    def __post_init__(self) -> None:
        if (self.delete_types or self.accept_types is not None) and self.type_field is None:
            raise ValueError("type_field: required with delete_types or accept_types")
        ts_header = self.timestamp_header
        if ts_header is not None and ts_header.lower() == self.signature_header.lower():
            raise ValueError("timestamp_header: must differ from signature_header")

    def resolved(self, resolve: Callable[[str], str]) -> Self:
        return msgspec.structs.replace(self, state_path=resolve(self.state_path))


# --- REST source (adapters/rest/source.py) --------------------------------------------------------

_ParamName = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class RestPagePagination(_Config, frozen=True, tag="page", tag_field="type"):
    """``?page=N&page_size=S``: page numbers from ``first_page`` up."""

    page_param: _ParamName = "page"
    size_param: _ParamName | None = "page_size"
    """Query parameter of the page size (none: the API's own size; then use ``stop = "empty"``)."""
    size: PositiveInt = 100
    first_page: Annotated[int, msgspec.Meta(ge=0)] = 1
    stop: Literal["short", "empty"] = "short"
    """``short``: a page with fewer than ``size`` records is the last; ``empty``: only an empty
    page ends the listing (for APIs that cap the page size below what was asked)."""


class RestOffsetPagination(_Config, frozen=True, tag="offset", tag_field="type"):
    """``?offset=O&limit=S``: the offset grows by the records actually received."""

    offset_param: _ParamName = "offset"
    size_param: _ParamName | None = "limit"
    size: PositiveInt = 100
    stop: Literal["short", "empty"] = "short"


class RestCursorPagination(_Config, frozen=True, tag="cursor", tag_field="type"):
    """The body names the next page (``meta.next_cursor``); it is sent back in ``cursor_param``.
    A missing, null or empty next cursor ends the listing."""

    cursor_path: _FieldPath
    cursor_param: _ParamName = "cursor"
    size_param: _ParamName | None = None
    size: PositiveInt = 100


class RestLinkPagination(_Config, frozen=True, tag="link", tag_field="type"):
    """RFC 8288 ``Link: <url>; rel="next"`` headers are followed (same origin only) until a page
    has none. ``params`` and ``size_param`` go on the first request; the links carry the rest."""

    size_param: _ParamName | None = None
    size: PositiveInt = 100


RestPagination = RestPagePagination | RestOffsetPagination | RestCursorPagination | RestLinkPagination

_SinceFormat = Literal["integer", "iso8601", "epoch_seconds", "epoch_millis", "http_date"]


class RestModifiedSince(_Config, frozen=True, tag="modified_since", tag_field="type"):
    """Ask only for records changed at or after the high-water mark of ``version_field``, in the
    query parameter ``param`` or the header ``header`` (e.g. ``If-Modified-Since``)."""

    param: _ParamName | None = None
    header: _HeaderName | None = None
    format: _SinceFormat | None = None
    """How the mark is written. Default: ``integer`` for integer versions; ``http_date`` in a
    header and ``iso8601`` (UTC, ``Z``) in a parameter for timestamps; ``epoch_seconds`` /
    ``epoch_millis`` for those version types in a parameter."""

    def __post_init__(self) -> None:
        if (self.param is None) == (self.header is None):
            raise ValueError("param / header: set exactly one of them")


class RestSyncCursor(_Config, frozen=True, tag="cursor_field", tag_field="type"):
    """An API-provided sync cursor: read from ``cursor_path`` in the listing's body (the last
    page that has one wins) and sent in ``param`` on the next poll."""

    cursor_path: _FieldPath
    param: _ParamName


RestIncremental = RestModifiedSince | RestSyncCursor


class RestSourceConfig(_AdapterConfig, frozen=True, tag="rest", tag_field="adapter"):
    """A JSON REST API's list endpoint as a source, polled (see ``adapters/rest/source.py``).

    Versions come from ``version_field``: ``integer`` as is; ``timestamp`` (ISO-8601 text, naive
    read as UTC, or ``/Date(ms+0000)/``), ``epoch_seconds`` and ``epoch_millis`` become integer
    microseconds since the epoch.
    """

    base_url: Annotated[str, msgspec.Meta(pattern=r"^https?://[^/?#@]+(/[^?#]*)?$")]
    """Scheme, host and an optional path prefix; no credentials and no query."""
    path: Annotated[str, msgspec.Meta(pattern=r"^/[^?#]*$")]
    """The list endpoint under ``base_url``, e.g. ``/contacts`` (static query: ``params``)."""
    version_field: _FieldPath
    """Path of each record's version: grows with every change of the record."""
    version_type: Literal["integer", "timestamp", "epoch_seconds", "epoch_millis"] = "integer"
    key_field: _FieldPath = "id"
    """Path of each record's key (a string or an integer)."""
    records_path: _FieldPath | None = None
    """Where the records are in the body (``data``, ``Contacts``, ``result.items``); none: the
    body itself is the list."""
    deleted_field: _FieldPath | None = None
    """A soft-delete flag: a record whose value here is true (or one of ``deleted_values``) is
    captured as a delete."""
    deleted_values: list[str | int] | None = None
    """Values of ``deleted_field`` that mean deleted (e.g. ``["ARCHIVED"]``); default: ``true``."""
    params: dict[str, str] = msgspec.field(default_factory=dict)
    """Static query parameters sent with every listing (filters, ``order``)."""
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    """Static headers sent with every request (no secrets here: use ``auth``)."""
    auth: RestAuth | None = None
    """``[flows.source.auth]`` with ``type = "bearer" | "basic" | "api_key" | "oauth2"``."""
    pagination: RestPagination | None = None
    """``[flows.source.pagination]`` with ``type = "page" | "offset" | "cursor" | "link"``;
    none: one request returns everything."""
    incremental: RestIncremental | None = None
    """``[flows.source.incremental]`` with ``type = "modified_since" | "cursor_field"``; none:
    every poll lists everything and only records above the high-water mark are emitted."""
    lookback: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    """Also re-read records up to this far below the high-water mark (seconds for timestamp
    versions, version units for integers) and emit those not emitted yet: covers records a
    shifting page/offset listing skipped, or an API whose filter is strictly "after". The
    cursor then remembers every key changed within the window."""
    poll_interval: PositiveFloat = 30.0
    """Seconds between the starts of two polls (a poll lists every page)."""
    batch_size: PositiveInt = 1000
    """Most changes handed to the capture loop per outbox transaction."""
    max_pages: PositiveInt = 10_000
    """A listing longer than this many pages is an error (a pagination that never ends)."""
    timeout: PositiveFloat = 10.0
    """Seconds one request may take before it counts as failed."""
    rate_limit: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    """Requests per second (token bucket; 0: no limit)."""
    burst: PositiveInt | None = None
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=20)] = 3
    """Tries per request on 5xx, 408, 429, timeouts and connection errors before the poll fails
    (it is then retried from its start after a backoff)."""
    backoff_initial: PositiveFloat = 0.2
    backoff_max: PositiveFloat = 5.0
    backoff_jitter: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.2
    retry_after_cap: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    """Longest ``Retry-After`` waited for within a poll; a longer one fails the poll, and the
    next one waits until then."""
    breaker_threshold: PositiveInt = 5
    breaker_cooldown: PositiveFloat = 30.0
    """Seconds no request is sent after ``breaker_threshold`` consecutive failures."""

    def __post_init__(self) -> None:
        inc = self.incremental
        if isinstance(inc, RestSyncCursor) and self.lookback:
            raise ValueError("lookback: not used with incremental.type = 'cursor_field'")
        if isinstance(inc, RestModifiedSince) and inc.format is not None and (
            (inc.format == "integer") != (self.version_type == "integer")
        ):
            raise ValueError(
                f"incremental.format: {inc.format!r} does not fit version_type = {self.version_type!r}"
            )
        if self.deleted_values is not None and self.deleted_field is None:
            raise ValueError("deleted_field: required with deleted_values")


# --- PostgreSQL (adapters/sql/postgres.py) ----------------------------------------------------

_PgName = Annotated[str, msgspec.Meta(pattern=r"^[^\x00]+$", min_length=1, max_length=63)]
# No ``pattern`` here: msgspec 0.22 can segfault at exit with a pattern-constrained str used in
# both ``X | list[X]`` and ``X | list[X] | None`` of one Struct; NULs are refused in __post_init__.
_PgColumnName = Annotated[str, msgspec.Meta(min_length=1, max_length=63)]
_PgColumns = _PgColumnName | Annotated[list[_PgColumnName], msgspec.Meta(min_length=1, max_length=32)]
_PG_PASSWORD = re.compile(r"(?:^|\s)password\s*=|^postgres(?:ql)?://[^/?#@]*:[^/?#@]*@|[?&]password=", re.I)


def _check_pg_columns(value: str | list[str] | None, field: str) -> None:
    for name in [value] if isinstance(value, str) else value or []:
        if "\x00" in name:
            raise ValueError(f"{field}: a column name cannot contain NUL")


def _check_pg_dsn(dsn: str) -> None:
    if _PG_PASSWORD.search(dsn):
        raise ValueError("dsn: must not hold a password (name an environment variable in password_env)")


class PostgresSourceConfig(_AdapterConfig, frozen=True, tag="postgres", tag_field="adapter"):
    """A PostgreSQL table as a source (see adapters/sql/postgres.py for what is guaranteed).

    ``mode = "changes"``: statement triggers feed a change table (inserts, updates, deletes,
    truncates); install them with ``meshctl capture install`` or ``install_triggers = true``.
    The first read takes a resumable snapshot of the existing rows. ``mode = "cursor"``: polls
    rows whose cursor column(s) grew (deletes are not seen).
    """

    dsn: Annotated[str, msgspec.Meta(min_length=1)]
    """libpq connection string or URL without the password: ``host=db port=5432 dbname=erp
    user=mesh`` or ``postgresql://mesh@db:5432/erp``."""
    table: _PgName
    key: _PgColumns
    """The key column, or a list of them (composite key; ``Change.key`` is then the JSON array
    of the values, e.g. ``[10248,11]``)."""
    schema: _PgName = "public"
    password_env: _EnvName | None = None
    """Name of the environment variable that holds the password (none: trust, peer, .pgpass)."""
    mode: Literal["changes", "cursor"] = "changes"
    cursor_column: _PgColumns | None = None
    """``cursor`` mode: the column (or columns, compared as one tuple) that grows with every change."""
    version_column: _PgName | None = None
    """``cursor`` mode: an integer or timestamp column that grows with every change of a row
    (default: the first cursor column)."""
    batch_size: PositiveInt = 1000
    snapshot: bool = True
    """``changes`` mode: on the first read, emit every existing row (in key order, in chunks,
    resumable) before the recorded changes."""
    snapshot_chunk: PositiveInt = 1000
    """Rows per snapshot batch (at most ``batch_size``)."""
    poll_interval: PositiveFloat = 0.2
    """Seconds between looks when there was nothing new (bounds added latency)."""
    install_triggers: bool = False
    """``changes`` mode: create or update the change table and triggers at start."""
    key_field: _PgName | None = None
    """Also put the encoded key into every row under this field name (lets a sink with a single
    key column, such as SQLite, hold a table with a composite key)."""
    connect_timeout: PositiveFloat = 5.0
    statement_timeout: PositiveFloat = 30.0

    def __post_init__(self) -> None:
        _check_pg_dsn(self.dsn)
        _check_pg_columns(self.key, "key")
        _check_pg_columns(self.cursor_column, "cursor_column")


class PostgresSinkConfig(_AdapterConfig, frozen=True, tag="postgres", tag_field="adapter"):
    """A PostgreSQL table as a sink: batched upserts by key under a version guard kept in
    ``<schema>._mesh_versions`` (see adapters/sql/postgres.py)."""

    dsn: Annotated[str, msgspec.Meta(min_length=1)]
    """libpq connection string or URL without the password (see the source's ``dsn``)."""
    table: _PgName
    key: _PgColumns
    """The key column, or a list of them (``SinkRecord.key`` is then a JSON array of values)."""
    schema: _PgName = "public"
    password_env: _EnvName | None = None
    create_table: bool = False
    """Create the table from the first upserted row (types from the values) when it is missing."""
    connect_timeout: PositiveFloat = 5.0
    statement_timeout: PositiveFloat = 30.0
    """Seconds one statement may run (e.g. waiting for a row lock) before the batch is given back."""

    def __post_init__(self) -> None:
        _check_pg_dsn(self.dsn)
        _check_pg_columns(self.key, "key")


# Every adapter config: add a new one to its union and its tuple (the tag = ``adapter`` value).
SourceConfig = (
    SqliteSourceConfig | CsvSourceConfig | WebhookSourceConfig | RestSourceConfig | PostgresSourceConfig
)
SinkConfig = SqliteSinkConfig | RestSinkConfig | CsvSinkConfig | PostgresSinkConfig
SOURCE_ADAPTERS: tuple[str, ...] = ("sqlite", "csv", "webhook", "rest", "postgres")
SINK_ADAPTERS: tuple[str, ...] = ("sqlite", "rest", "csv", "postgres")
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
    to_canonical: MappingConfig | None = None
    """Capture side: how a system row becomes the canonical ``entity`` (see :mod:`mesh.mapping`);
    without it the flow publishes raw rows (schema ``<entity>/row``)."""
    from_canonical: MappingConfig | None = None
    """Apply side: how a canonical entity becomes the row the sink writes."""
    ownership: EntityOwnership | None = None
    """Apply side: which system may create, delete and write which fields (see
    :mod:`mesh.ownership`); versions are then compared per origin."""


class AgentConfig(_Config, frozen=True):
    agent: AgentSection
    nats: NatsConfig = msgspec.field(default_factory=NatsConfig)
    streams: StreamsConfig = msgspec.field(default_factory=StreamsConfig)
    relay: RelayConfig = msgspec.field(default_factory=RelayConfig)
    flows: list[FlowConfig] = msgspec.field(default_factory=list)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    """``json``: one JSON object per log line (ts, level, logger, msg, agent, flow, correlation_id)."""


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


def _check_data(cfg: AgentConfig, source: str, base: Path) -> None:
    """Compile every flow's mappings and ownership; one error listing every problem."""
    from mesh.flowdata import compile_flow_data

    problems = []
    for i, flow in enumerate(cfg.flows):
        try:
            compile_flow_data(flow, source=source, path=f"flows[{i}]", base=base)
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("\n".join(problems))


def _resolver(base: Path) -> Callable[[str], str]:
    def resolve(p: str) -> str:
        path = Path(p).expanduser()
        return str(path if path.is_absolute() else (base / path).resolve())

    return resolve


def resolve_flow_paths(flow: FlowConfig, base: Path) -> FlowConfig:
    """``flow`` with every file path (source, sink, SQLite lookups) made absolute against ``base``."""
    resolve = _resolver(base)
    changes: dict[str, Any] = {}
    if flow.source is not None:
        changes["source"] = flow.source.resolved(resolve)
    if flow.sink is not None:
        changes["sink"] = flow.sink.resolved(resolve)
    for direction in ("to_canonical", "from_canonical"):
        mapping = getattr(flow, direction)
        if mapping is not None:
            changes[direction] = mapping.resolved(resolve)
    return msgspec.structs.replace(flow, **changes)


def _resolve_paths(cfg: AgentConfig, base: Path) -> AgentConfig:
    flows = [resolve_flow_paths(flow, base) for flow in cfg.flows]
    agent = msgspec.structs.replace(cfg.agent, state_dir=_resolver(base)(cfg.agent.state_dir))
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
    _check_data(cfg, source, base or Path.cwd())
    return _resolve_paths(cfg, base or Path.cwd())


def load_agent_config(path: str | Path) -> AgentConfig:
    """Load and validate the agent config file at ``path`` (see :func:`parse_agent_config`)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config: {exc.strerror}", source=str(file)) from None
    return parse_agent_config(text, source=str(file), base=file.resolve().parent)
