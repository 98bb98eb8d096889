"""Config of the REST adapters: ``adapter = "rest"`` as source (a polled list endpoint) and as sink,
with their ``auth``, ``pagination`` and ``incremental`` tables (tagged by ``type``)."""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import Annotated, Any, Literal, Self

import msgspec

from adapters.rest._paths import check_path
from mesh.config import (
    AdapterConfig,
    ConfigStruct,
    EnvName,
    FieldPath,
    HeaderName,
    PositiveFloat,
    PositiveInt,
    Token,
)
from mesh.secrets import SecretFile, exactly_one, secret_header_problem

__all__ = [
    "RestApiKeyAuth",
    "RestAuth",
    "RestBasicAuth",
    "RestBearerAuth",
    "RestCursorPagination",
    "RestIncremental",
    "RestLinkPagination",
    "RestLookup",
    "RestModifiedSince",
    "RestOAuth2Auth",
    "RestOffsetPagination",
    "RestOperation",
    "RestPagePagination",
    "RestPagination",
    "RestResults",
    "RestSinkConfig",
    "RestSourceConfig",
    "RestSyncCursor",
]


class RestBearerAuth(ConfigStruct, frozen=True, tag="bearer", tag_field="type"):
    """``Authorization: Bearer <token>``, the token read from an environment variable or a file."""

    token_env: EnvName | None = None
    """Name of the environment variable that holds the token."""
    token_file: SecretFile | None = None
    """Or a file that holds it (e.g. a Kubernetes secret mount; a trailing newline is dropped)."""

    def __post_init__(self) -> None:
        exactly_one(self.token_env, self.token_file, "token")


class RestBasicAuth(ConfigStruct, frozen=True, tag="basic", tag_field="type"):
    """HTTP basic authentication; the password read from an environment variable."""

    user: str
    password_env: EnvName | None = None
    """Name of the environment variable that holds the password."""
    password_file: SecretFile | None = None
    """Or a file that holds it."""

    def __post_init__(self) -> None:
        exactly_one(self.password_env, self.password_file, "password")


class RestApiKeyAuth(ConfigStruct, frozen=True, tag="api_key", tag_field="type"):
    """An API key sent in a header of its own; the key read from an environment variable."""

    key_env: EnvName | None = None
    """Name of the environment variable that holds the key."""
    key_file: SecretFile | None = None
    """Or a file that holds it."""
    header: HeaderName = "X-API-Key"

    def __post_init__(self) -> None:
        exactly_one(self.key_env, self.key_file, "key")


class RestOAuth2Auth(ConfigStruct, frozen=True, tag="oauth2", tag_field="type"):
    """OAuth2 client credentials grant (RFC 6749 section 4.4): the client id and secret buy a
    short-lived bearer token at ``token_url``; it is cached until shortly before it expires and
    fetched again once when the API answers 401 (see ``adapters/rest/_auth.py``)."""

    token_url: Annotated[str, msgspec.Meta(pattern=r"^https?://[^/?#@]+(/[^#]*)?$")]
    """The authorization server's token endpoint, e.g. ``https://login.example.com/oauth/token``."""
    client_id: Annotated[str, msgspec.Meta(min_length=1)]
    client_secret_env: EnvName | None = None
    """Name of the environment variable that holds the client secret."""
    client_secret_file: SecretFile | None = None
    """Or a file that holds it."""
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

    def __post_init__(self) -> None:
        exactly_one(self.client_secret_env, self.client_secret_file, "client_secret")


RestAuth = RestBearerAuth | RestBasicAuth | RestApiKeyAuth | RestOAuth2Auth

_SECRET_FILE_FIELDS = ("token_file", "password_file", "key_file", "client_secret_file")


def _resolve_auth(auth: RestAuth | None, resolve: Callable[[str], str]) -> RestAuth | None:
    """``auth`` with its secret file (if any) made absolute by ``resolve``."""
    if auth is None:
        return None
    for name in _SECRET_FILE_FIELDS:
        value = getattr(auth, name, None)
        if value is not None:
            return msgspec.structs.replace(auth, **{name: resolve(value)})
    return auth


def _check_headers(headers: dict[str, str], env: dict[str, str], files: dict[str, str]) -> None:
    for name in headers:
        problem = secret_header_problem(name)
        if problem is not None:
            raise ValueError(f"headers.{name}: {problem}")
    seen: dict[str, str] = {}
    for table, names in (("headers", headers), ("headers_env", env), ("headers_file", files)):
        for name in names:
            other = seen.setdefault(name.lower(), table)
            if other != table:
                raise ValueError(f"{table}.{name}: also set in {other}; set each header once")


_Method = Literal["GET", "POST", "PUT", "PATCH", "DELETE"]
_PathTemplate = Annotated[str, msgspec.Meta(pattern=r"^/[^?#]*$", max_length=1024)]
_ResponsePath = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
"""A path into a JSON answer: names joined by ``.``, ``[n]`` for one list item, ``[]`` for all."""


class RestOperation(ConfigStruct, frozen=True):
    """One operation's request line: ``{method = "POST", path = "/Contacts/{id}"}``. The path
    may name ``{key}`` (the record key, URL-encoded) and ``{id}`` (the id the target assigned,
    from the cross-reference)."""

    path: _PathTemplate
    method: _Method = "POST"
    params: dict[str, str] = msgspec.field(default_factory=dict)
    """Static query parameters (Xero: ``{summarizeErrors = "false"}`` for per-record results)."""


class RestResults(ConfigStruct, frozen=True):
    """Where a 2xx answer says how each record of the request fared, in request order (Xero:
    ``path = "Contacts"``, ``status = "StatusAttributeString"``, ``failed = ["ERROR"]``,
    ``errors = "ValidationErrors[].Message"``, ``id = "ContactID"``)."""

    path: _ResponsePath | None = None
    """The list of per-record results in the answer (default: ``envelope``; without an envelope
    the answer itself is the one record's result)."""
    status: _ResponsePath | None = None
    """A result's status field; a value in ``failed`` makes that record a refusal."""
    failed: list[str] = msgspec.field(default_factory=lambda: ["ERROR"])
    errors: _ResponsePath | None = None
    """A result's error messages (joined into the dead letter's reason)."""
    id: _ResponsePath | None = None
    """A result's id as the target assigned it: stored in the cross-reference, used as ``{id}``."""


class RestLookup(ConfigStruct, frozen=True):
    """How to find a record the target may have created without our seeing the answer (a lost
    or timed-out create): ``GET /Contacts?where=ContactNumber=="{key}"``. An id found is stored
    and the create is not sent again."""

    path: _PathTemplate
    id_path: _ResponsePath
    """Where the found record's id is in the answer, e.g. ``Contacts[0].ContactID``; absent: not
    there (create it)."""
    method: Literal["GET", "POST"] = "GET"
    params: dict[str, str] = msgspec.field(default_factory=dict)
    """Query parameters; ``{key}`` in a value is replaced by the record key."""


_PreflightPath = Annotated[str, msgspec.Meta(pattern=r"^/[^?#]*$")]
"""A path under ``base_url``: starts with ``/``, no query or fragment."""
_ClientStatus = Annotated[int, msgspec.Meta(ge=400, le=499)]


class RestSinkConfig(AdapterConfig, frozen=True, tag="rest"):
    """A JSON REST API as a sink: one request per record, guarded by a local version table.

    The target needs no version guard of its own: ``state_path`` (a SQLite file the sink owns)
    remembers the highest version applied per key, and records not newer are skipped without a
    request. Every request carries ``Idempotency-Key: <envelope id>`` and ``X-Mesh-Version``.
    """

    base_url: Annotated[str, msgspec.Meta(pattern=r"^https?://[^/?#@]+(/[^?#]*)?$")]
    """``https://crm.example.com/api/v2``: scheme, host and an optional path prefix; no
    credentials and no query (put those in ``auth``)."""
    state_path: Annotated[str, msgspec.Meta(min_length=1)]
    """The sink's own SQLite file: key -> highest applied version (and deleted flag), and the
    cross-reference key -> id the target assigned."""
    upsert_path: Annotated[str, msgspec.Meta(min_length=1)] | None = None
    """Path template under ``base_url`` for an upsert, e.g. ``/customers/{key}``; ``{key}`` is
    replaced by the URL-encoded record key (omit it to POST to a collection, with ``key_field``).
    Needed unless ``create`` is set."""
    method: Literal["PUT", "POST", "PATCH"] = "PUT"
    """HTTP method of an upsert."""
    delete_path: str | None = None
    """Path template for a delete (default: ``upsert_path``)."""
    delete_mode: Literal["delete", "tombstone", "update"] = "delete"
    """``delete``: send DELETE (a 404 counts as deleted); ``tombstone``: PATCH
    ``{tombstone_field: true}`` so the target keeps the record, flagged; ``update``: send
    ``delete_body`` with the ``delete`` operation (archive a contact, void an invoice)."""
    delete_body: dict[str, Any] | None = None
    """The body of a ``delete_mode = "update"`` delete, e.g. ``{ContactStatus = "ARCHIVED"}``
    (inside ``envelope``, with ``key_field`` and ``id_field``)."""
    create: RestOperation | None = None
    """The request that creates a record the target has no id for yet (default: ``method`` and
    ``upsert_path``)."""
    update: RestOperation | None = None
    """The request that changes a record the target already has (the cross-reference knows its
    id; default: ``create``)."""
    delete: RestOperation | None = None
    """The request of a delete (default: DELETE / PATCH on ``delete_path``)."""
    envelope: Annotated[str, msgspec.Meta(pattern=r"^[^.\[\]]+$", max_length=128)] | None = None
    """Send the records inside ``{"<envelope>": [record, ...]}`` (Xero: ``Contacts``)."""
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1
    """Up to this many records per request (to a path without ``{key}``/``{id}``; needs
    ``envelope``); never two records of one key in one request."""
    results: RestResults | None = None
    """How to read each record's outcome and id from a 2xx answer."""
    id_field: str | None = None
    """Put the target's id (from the cross-reference) into an update's or delete's body under
    this name (Xero: ``ContactID``)."""
    lookup: RestLookup | None = None
    """Find a record whose create answer was lost before creating it again."""
    error_path: _ResponsePath | None = None
    """Where a refusal's messages are in an error answer (Xero:
    ``Elements[].ValidationErrors[].Message``); default: the start of the body."""
    integrity_statuses: list[_ClientStatus] = msgspec.field(default_factory=list)
    """HTTP statuses that mean "a related record is missing" (e.g. ``[409, 422]`` for an API
    that refuses an invoice whose contact it does not know yet): a record answered with one is
    :class:`~mesh.errors.IntegrityPending`, retried for ``retry.integrity_retry`` seconds before
    it is dead-lettered, instead of a :class:`~mesh.errors.RejectedRecord` dead-lettered at once."""
    preflight_path: _PreflightPath | None = None
    """A cheap authenticated GET under ``base_url`` that ``meshctl config check --connect`` sends
    to check reachability and credentials (Xero: ``/Organisation``); default: a HEAD of
    ``base_url``."""
    omit_nulls: bool = False
    """Leave null fields out of the body instead of sending JSON ``null``."""
    tombstone_field: Annotated[str, msgspec.Meta(min_length=1)] = "deleted"
    key_field: str | None = None
    """Put the record key into the JSON body under this name (the target's external id)."""
    fields: list[str] | None = None
    """Send only these fields of the row (default: all of them)."""
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    """Static headers sent with every request. No credentials here (``Authorization``,
    ``Cookie``, ``X-Api-Key`` and names with token/secret/key/password/auth are refused): use
    ``auth``, ``headers_env`` or ``headers_file``."""
    auth: RestAuth | None = None
    """``[flows.sink.auth]`` with ``type = "bearer" | "basic" | "api_key" | "oauth2"``."""
    headers_env: dict[HeaderName, EnvName] = msgspec.field(default_factory=dict)
    """Secret headers from the environment: header name -> variable (read at start)."""
    headers_file: dict[HeaderName, SecretFile] = msgspec.field(default_factory=dict)
    """Secret headers from files: header name -> file (read at start, a trailing newline dropped;
    e.g. a Kubernetes secret mount)."""
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
    policy: Token | None = None
    """A shared API policy (``[policies.<name>]`` in the agent config): its rate, concurrency
    and daily quota are shared with every agent and replica naming it, coordinated by the
    control plane, instead of ``rate_limit``/``burst`` (README "Shared rate limits and quotas
    (API policy)")."""
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
    # Reconciliation (``meshctl reconcile``, adapters/rest/_reconcile.py): the target's list endpoint.
    list_path: Annotated[str, msgspec.Meta(pattern=r"^/[^?#]*$")] | None = None
    """Path under ``base_url`` that lists the target's records (``/customers``); none: the
    target cannot be reconciled."""
    list_records_path: FieldPath | None = None
    """Where the records are in a listing's body (``data``); none: the body is the list."""
    list_pagination: RestPagination | None = None
    """``[flows.sink.list_pagination]``, as a source's ``pagination``; none: one request."""
    list_key_field: str | None = None
    """The listed records' field that holds the key (default: ``key_field``, else ``id``)."""

    def __post_init__(self) -> None:
        _check_headers(self.headers, self.headers_env, self.headers_file)
        _check_templates(self)

    @property
    def templated(self) -> bool:
        """Whether any request-template option is set (the sink then builds requests from the
        operations, envelope and cross-reference; otherwise it behaves as it always did)."""
        return (
            self.create is not None
            or self.update is not None
            or self.delete is not None
            or self.envelope is not None
            or self.batch_size > 1
            or self.results is not None
            or self.lookup is not None
            or self.id_field is not None
            or self.delete_mode == "update"
        )

    def resolved(self, resolve: Callable[[str], str]) -> Self:
        return msgspec.structs.replace(
            self,
            state_path=resolve(self.state_path),
            auth=_resolve_auth(self.auth, resolve),
            headers_file={k: resolve(v) for k, v in self.headers_file.items()},
        )


def _placeholders(template: str, field: str) -> set[str]:
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ValueError(f"{field}: not a path template: {exc}") from None
    if names - {"key", "id"}:
        unknown = sorted(names - {"key", "id"})
        raise ValueError(f"{field}: unknown placeholder(s) {unknown}: use {{key}} or {{id}}")
    return names


def _check_templates(cfg: RestSinkConfig) -> None:
    """Refuse contradictory request-template options (one line each, naming the field)."""
    if cfg.upsert_path is None and cfg.create is None:
        raise ValueError("upsert_path: set upsert_path, or [create] with its method and path")
    for field, value in (("error_path", cfg.error_path), ("results.path", cfg.results and cfg.results.path),
                         ("results.status", cfg.results and cfg.results.status),
                         ("results.errors", cfg.results and cfg.results.errors),
                         ("results.id", cfg.results and cfg.results.id),
                         ("lookup.id_path", cfg.lookup and cfg.lookup.id_path)):  # fmt: skip
        problem = value and check_path(value)
        if problem:
            raise ValueError(f"{field}: {problem}")
    if cfg.batch_size > 1 and cfg.envelope is None:
        raise ValueError('batch_size: several records per request need an envelope (envelope = "Contacts")')
    if cfg.delete_mode == "update" and cfg.delete_body is None:
        raise ValueError('delete_body: delete_mode = "update" needs a body, e.g. { Status = "VOIDED" }')
    if cfg.delete_body is not None and cfg.delete_mode != "update":
        raise ValueError(f'delete_body: only used with delete_mode = "update" (not {cfg.delete_mode!r})')
    if cfg.delete_mode == "update" and cfg.delete is None:
        raise ValueError('delete: delete_mode = "update" needs [delete] with its method and path')
    if cfg.delete is not None and cfg.delete_path is not None:
        raise ValueError("delete: set delete or delete_path, not both")
    if cfg.delete is not None and cfg.delete_mode == "tombstone":
        raise ValueError('delete: delete_mode = "tombstone" sends its own PATCH; use delete_path with it')
    if cfg.delete is not None and cfg.delete.method == "DELETE" and cfg.delete_mode == "update":
        raise ValueError('delete.method: delete_mode = "update" sends a body: use POST, PUT or PATCH')
    knows_id = (cfg.results is not None and cfg.results.id is not None) or cfg.lookup is not None
    if cfg.id_field is not None and not knows_id:
        raise ValueError("id_field: the target's id is never learnt; set results.id (and/or lookup)")
    if cfg.lookup is not None and (cfg.results is None or cfg.results.id is None):
        raise ValueError("lookup: set results.id too (a create's answer then stores the id)")
    if cfg.lookup is not None:
        for name, value in cfg.lookup.params.items():
            _placeholders(value, f"lookup.params.{name}")
        if "id" in _placeholders(cfg.lookup.path, "lookup.path"):
            raise ValueError("lookup.path: {id} is what the lookup finds; use {key}")
    for field, op in (("create", cfg.create), ("update", cfg.update), ("delete", cfg.delete)):
        if op is None:
            continue
        names = _placeholders(op.path, f"{field}.path")
        if "id" in names and not knows_id:
            raise ValueError(f"{field}.path: {{id}} needs the target's id: set results.id (and lookup)")
        if field == "create" and "id" in names:
            raise ValueError("create.path: a create has no id yet; use {key} or a collection path")


_ParamName = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class RestPagePagination(ConfigStruct, frozen=True, tag="page", tag_field="type"):
    """``?page=N&page_size=S``: page numbers from ``first_page`` up."""

    page_param: _ParamName = "page"
    size_param: _ParamName | None = "page_size"
    """Query parameter of the page size (none: the API's own size; then use ``stop = "empty"``)."""
    size: PositiveInt = 100
    first_page: Annotated[int, msgspec.Meta(ge=0)] = 1
    stop: Literal["short", "empty"] = "short"
    """``short``: a page with fewer than ``size`` records is the last; ``empty``: only an empty
    page ends the listing (for APIs that cap the page size below what was asked)."""


class RestOffsetPagination(ConfigStruct, frozen=True, tag="offset", tag_field="type"):
    """``?offset=O&limit=S``: the offset grows by the records actually received."""

    offset_param: _ParamName = "offset"
    size_param: _ParamName | None = "limit"
    size: PositiveInt = 100
    stop: Literal["short", "empty"] = "short"


class RestCursorPagination(ConfigStruct, frozen=True, tag="cursor", tag_field="type"):
    """The body names the next page (``meta.next_cursor``); it is sent back in ``cursor_param``.
    A missing, null or empty next cursor ends the listing."""

    cursor_path: FieldPath
    cursor_param: _ParamName = "cursor"
    size_param: _ParamName | None = None
    size: PositiveInt = 100


class RestLinkPagination(ConfigStruct, frozen=True, tag="link", tag_field="type"):
    """RFC 8288 ``Link: <url>; rel="next"`` headers are followed (same origin only) until a page
    has none. ``params`` and ``size_param`` go on the first request; the links carry the rest."""

    size_param: _ParamName | None = None
    size: PositiveInt = 100


RestPagination = RestPagePagination | RestOffsetPagination | RestCursorPagination | RestLinkPagination

_SinceFormat = Literal["integer", "iso8601", "epoch_seconds", "epoch_millis", "http_date"]


class RestModifiedSince(ConfigStruct, frozen=True, tag="modified_since", tag_field="type"):
    """Ask only for records changed at or after the high-water mark of ``version_field``, in the
    query parameter ``param`` or the header ``header`` (e.g. ``If-Modified-Since``)."""

    param: _ParamName | None = None
    header: HeaderName | None = None
    format: _SinceFormat | None = None
    """How the mark is written. Default: ``integer`` for integer versions; ``http_date`` in a
    header and ``iso8601`` (UTC, ``Z``) in a parameter for timestamps; ``epoch_seconds`` /
    ``epoch_millis`` for those version types in a parameter."""

    def __post_init__(self) -> None:
        if (self.param is None) == (self.header is None):
            raise ValueError("param / header: set exactly one of them")


class RestSyncCursor(ConfigStruct, frozen=True, tag="cursor_field", tag_field="type"):
    """An API-provided sync cursor: read from ``cursor_path`` in the listing's body (the last
    page that has one wins) and sent in ``param`` on the next poll."""

    cursor_path: FieldPath
    param: _ParamName


RestIncremental = RestModifiedSince | RestSyncCursor


class RestSourceConfig(AdapterConfig, frozen=True, tag="rest"):
    """A JSON REST API's list endpoint as a source, polled (see ``adapters/rest/source.py``).

    Versions come from ``version_field``: ``integer`` as is; ``timestamp`` (ISO-8601 text, naive
    read as UTC, or ``/Date(ms+0000)/``), ``epoch_seconds`` and ``epoch_millis`` become integer
    microseconds since the epoch.
    """

    base_url: Annotated[str, msgspec.Meta(pattern=r"^https?://[^/?#@]+(/[^?#]*)?$")]
    """Scheme, host and an optional path prefix; no credentials and no query."""
    path: Annotated[str, msgspec.Meta(pattern=r"^/[^?#]*$")]
    """The list endpoint under ``base_url``, e.g. ``/contacts`` (static query: ``params``)."""
    version_field: FieldPath
    """Path of each record's version: grows with every change of the record."""
    version_type: Literal["integer", "timestamp", "epoch_seconds", "epoch_millis"] = "integer"
    key_field: FieldPath = "id"
    """Path of each record's key (a string or an integer)."""
    preflight_path: _PreflightPath | None = None
    """A cheap authenticated GET under ``base_url`` that ``meshctl config check --connect`` sends
    to check reachability and credentials (Xero: ``/Organisation``); default: the first page of
    ``path``."""
    records_path: FieldPath | None = None
    """Where the records are in the body (``data``, ``Contacts``, ``result.items``); none: the
    body itself is the list."""
    deleted_field: FieldPath | None = None
    """A soft-delete flag: a record whose value here is true (or one of ``deleted_values``) is
    captured as a delete."""
    deleted_values: list[str | int] | None = None
    """Values of ``deleted_field`` that mean deleted (e.g. ``["ARCHIVED"]``); default: ``true``."""
    params: dict[str, str] = msgspec.field(default_factory=dict)
    """Static query parameters sent with every listing (filters, ``order``)."""
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    """Static headers sent with every request. No credentials here (``Authorization``,
    ``Cookie``, ``X-Api-Key`` and names with token/secret/key/password/auth are refused): use
    ``auth``, ``headers_env`` or ``headers_file``."""
    auth: RestAuth | None = None
    """``[flows.source.auth]`` with ``type = "bearer" | "basic" | "api_key" | "oauth2"``."""
    headers_env: dict[HeaderName, EnvName] = msgspec.field(default_factory=dict)
    """Secret headers from the environment: header name -> variable (read at start)."""
    headers_file: dict[HeaderName, SecretFile] = msgspec.field(default_factory=dict)
    """Secret headers from files: header name -> file (read at start, a trailing newline dropped;
    e.g. a Kubernetes secret mount)."""
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

    def resolved(self, resolve: Callable[[str], str]) -> Self:
        return msgspec.structs.replace(
            self,
            auth=_resolve_auth(self.auth, resolve),
            headers_file={k: resolve(v) for k, v in self.headers_file.items()},
        )

    def __post_init__(self) -> None:
        _check_headers(self.headers, self.headers_env, self.headers_file)
        inc = self.incremental
        if isinstance(inc, RestSyncCursor) and self.lookback:
            raise ValueError("lookback: not used with incremental.type = 'cursor_field'")
        if (
            isinstance(inc, RestModifiedSince)
            and inc.format is not None
            and ((inc.format == "integer") != (self.version_type == "integer"))
        ):
            raise ValueError(
                f"incremental.format: {inc.format!r} does not fit version_type = {self.version_type!r}"
            )
        if self.deleted_values is not None and self.deleted_field is None:
            raise ValueError("deleted_field: required with deleted_values")
