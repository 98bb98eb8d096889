"""The REST source: a JSON API's list endpoint, polled, becomes the changes of a flow.

Configured, not coded (:class:`~adapters.rest.config.RestSourceConfig`): where the records are in the
body, which fields hold the key, the version and a soft-delete flag, how the listing pages, and
how a poll asks only for what changed.

**A poll** lists every page of the endpoint (``pagination``: page numbers, offset/limit, a next
cursor in the body, or RFC 8288 ``Link rel="next"``; it ends at an empty page, a short page
(``stop = "short"``), or when there is no next cursor/link), turns each record into a change and
keeps those not emitted yet. A record seen twice in one poll (the API shifted while we paged)
is kept once per ``(key, version)``. The changes are then handed out in ``(version, key)`` order,
``limit`` at a time; only when they are all handed out does the next poll start, no sooner than
``poll_interval`` after the previous one started. A whole poll is held in memory.

**Versions** come from ``version_field``: ``integer`` as is; ``timestamp`` (ISO-8601 text, naive
read as UTC, or Microsoft's ``/Date(1573755038314+0000)/``), ``epoch_seconds`` and
``epoch_millis`` become integer microseconds since the epoch (the SQLite source's cursor mode
does the same), which also gives each change its ``occurred_at``.

**The high-water mark.** The cursor (JSON) holds ``since``, the highest version emitted, and
``seen``, the keys emitted at versions from ``since - lookback`` up with their versions. A poll
keeps a record when its version is at least ``since - lookback`` and greater than the version
``seen`` holds for its key. Records *at* the mark are therefore never lost (the filter is ``>=``)
and never emitted twice (``seen``), and a crash between two batches of one poll resumes exactly
after the last committed one. With ``incremental.type = "modified_since"`` the mark minus
``lookback`` is also sent to the API (a query parameter, or a header such as
``If-Modified-Since``; an HTTP date is rounded down to the second and sent one second early,
since that header means "strictly after", and epoch seconds or milliseconds are rounded down:
both only widen the answer; a 304 means nothing changed); without ``incremental`` every poll lists everything
and the mark filters on our side. Limits, as for any high-water mark: a record whose version is
below the mark when it first appears (written with an old timestamp, or skipped by an offset
listing that shifted under us) is only caught if it is within ``lookback`` of the mark; set
``lookback`` to at least the longest a poll takes when page/offset listings change while they
are read.

**An API sync cursor** (``incremental.type = "cursor_field"``): the poll sends the cursor the
API gave last time and reads the next one from the body (the last page that has one); while a
poll's changes are handed out, the cursor holds the poll's sync cursor plus the mark above, so
a resumed poll skips what was already emitted; after the last batch it holds only the new sync
cursor. A listing without a sync cursor at ``cursor_path`` is a :class:`~mesh.errors.ConfigError`.

**Failures.** Requests pass the same token bucket, ``Retry-After`` pause and circuit breaker as
the REST sink's (:mod:`adapters.rest._ratelimit`, :mod:`adapters.rest._retry`); 5xx, 408, 429,
timeouts and connection errors are retried ``max_attempts`` times per request. A poll that
still fails (or meets an open circuit) is not an error of :meth:`RestSource.read`: it is logged
and retried from its start after a backoff (at least until the circuit's cooldown ends or the
``Retry-After`` passes), so ``read`` keeps blocking, cancellable, while the API is down.
401/403/407 (after OAuth2's one refresh) raise :class:`~mesh.errors.SystemUnavailable` out of
``read``, so the agent restarts the capture loop and reads the secrets again; a 3xx, any other
4xx, a body that is not JSON or not shaped as configured raises :class:`~mesh.errors.ConfigError`
naming the request and the field.
"""

from __future__ import annotations

import email.utils
import logging
import math
import re
from collections import deque
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
import msgspec

from adapters.rest._auth import Credentials
from adapters.rest._paths import MISSING, dotted
from adapters.rest._ratelimit import RequestGate
from adapters.rest._retry import CircuitBreaker, backoff_delay
from adapters.rest._send import send_with_retries
from adapters.rest.config import (
    RestCursorPagination,
    RestLinkPagination,
    RestModifiedSince,
    RestOffsetPagination,
    RestPagePagination,
    RestSourceConfig,
    RestSyncCursor,
)
from mesh.adapters import Change, ChangeBatch, Source
from mesh.errors import ConfigError, SystemUnavailable

__all__ = ["RestSource"]

log = logging.getLogger(__name__)

_EXCERPT = 200
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_MS_DATE = re.compile(r"^/Date\((-?\d+)([+-]\d{4})?\)/$")


class _Mark(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """The source cursor (JSON): where the next poll starts and what it must not emit again."""

    since: int | None = None
    """The high-water mark: the highest version emitted."""
    seen: dict[str, int] = msgspec.field(default_factory=dict)
    """Keys emitted at versions >= ``since - lookback``, with the highest version emitted."""
    sync: str | None = None
    """The API's sync cursor the current poll started from (``cursor_field`` mode)."""

    def admits(self, key: str, version: int, lookback: int) -> bool:
        if self.since is not None and version < self.since - lookback:
            return False
        last = self.seen.get(key)
        return last is None or version > last

    def advanced(self, changes: Sequence[Change], lookback: int) -> _Mark:
        """The mark after ``changes`` (sorted by version) were emitted."""
        since = self.since
        seen = dict(self.seen)
        for ch in changes:
            since = ch.version if since is None else max(since, ch.version)
            if seen.get(ch.key, ch.version - 1) < ch.version:
                seen[ch.key] = ch.version
        assert since is not None
        floor = since - lookback
        return _Mark(since=since, seen={k: v for k, v in seen.items() if v >= floor}, sync=self.sync)


_MARK_DECODER = msgspec.json.Decoder(_Mark)
_MARK_ENCODER = msgspec.json.Encoder()


class _CredentialsRefused(SystemUnavailable):
    """401/403/407: not ridden out inside ``read`` (the agent restarts capture, rereading secrets)."""


class RestSource(Source):
    """Polls a JSON REST API's list endpoint (see the module doc for what is guaranteed).

    ``transport`` replaces httpx's network transport (tests); the source closes it with itself.
    """

    def __init__(
        self, config: RestSourceConfig, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        _validate(config)
        self._config = config
        self._transport = transport
        self._key_path = _split(config.key_field)
        self._version_path = _split(config.version_field)
        self._records_path = None if config.records_path is None else _split(config.records_path)
        self._deleted_path = None if config.deleted_field is None else _split(config.deleted_field)
        inc = config.incremental
        self._sync_path = _split(inc.cursor_path) if isinstance(inc, RestSyncCursor) else None
        self._timestamps = config.version_type != "integer"
        unit = 1_000_000 if self._timestamps else 1
        self._lookback = math.ceil(config.lookback * unit)
        self._since_format = _since_format(config)
        self._origin = _origin(httpx.URL(config.base_url))
        self._gate = RequestGate(config.rate_limit, config.burst)
        self._breaker = CircuitBreaker(config.breaker_threshold, config.breaker_cooldown)
        self._reopens_at = 0.0
        self._credentials: Credentials | None = None
        self._client: httpx.AsyncClient | None = None
        # Poll state: the changes of the current poll not yet handed out, the mark in front of
        # them, the cursor last returned (a read with another cursor starts afresh).
        self._pending: deque[Change] = deque()
        self._mark = _Mark()
        self._next_sync: str | None = None
        self._last_cursor: str | None = None
        self._next_poll = 0.0
        self._failures = 0
        self._counts = dict.fromkeys(("polls", "requests", "retries", "failed_polls", "emitted"), 0)

    def __repr__(self) -> str:
        cfg = self._config
        paging = "none" if cfg.pagination is None else cfg.pagination.__struct_config__.tag
        inc = "full" if cfg.incremental is None else cfg.incremental.__struct_config__.tag
        counts = " ".join(f"{k}={v}" for k, v in self._counts.items())
        state = "" if self._client is not None else " closed"
        return (
            f"<RestSource GET {cfg.base_url.rstrip('/')}{cfg.path} pagination={paging} incremental={inc} "
            f"since={self._mark.since} buffered={len(self._pending)} breaker={self._breaker.state} "
            f"{counts}{state}>"
        )

    async def open(self) -> None:
        """Read the credentials and create the HTTP client (no request is sent yet).

        Raises:
            ConfigError: a secret's environment variable is unset or empty.
        """
        if self._client is not None:
            return
        cfg = self._config
        self._credentials = Credentials(
            cfg.auth, what="REST source", headers_env=cfg.headers_env, headers_file=cfg.headers_file
        )
        self._client = httpx.AsyncClient(
            base_url=cfg.base_url,
            headers={"Accept": "application/json", **cfg.headers, **self._credentials.headers},
            timeout=httpx.Timeout(cfg.timeout),
            follow_redirects=False,
            transport=self._transport,
            auth=self._credentials.auth,
        )
        self._credentials.bind(self._client)

    def _require(self) -> tuple[httpx.AsyncClient, Credentials]:
        if self._client is None or self._credentials is None:
            raise RuntimeError(f"{self!r} is not open")
        return self._client, self._credentials

    async def read(self, cursor: str | None, limit: int) -> ChangeBatch:
        """Return up to ``limit`` changes after ``cursor``; block (polling) until there is one.

        Cancellable while it waits or polls. An API that is down, throttling or slow is ridden
        out here (logged, retried with backoff and the circuit breaker), not raised.

        Raises:
            SystemUnavailable: the API refuses our credentials (401, 403, 407).
            ConfigError: ``cursor`` is not a cursor of a REST source; the API answered a 3xx or
                another 4xx, or a body that is not JSON or not shaped as configured; the OAuth2
                token endpoint refused the grant; the listing did not end within ``max_pages``.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self._require()
        if cursor is None or cursor != self._last_cursor:
            self._pending.clear()  # a first read or a resume: start from what the cursor says
            self._mark = _decode_cursor(cursor)
            self._next_sync = None
        sync_mode = isinstance(self._config.incremental, RestSyncCursor)
        while not self._pending:
            delay = self._next_poll - anyio.current_time()
            if delay > 0:
                await anyio.sleep(delay)
            self._next_poll = anyio.current_time() + self._config.poll_interval
            try:
                changes, sync = await self._poll(self._mark)
            except _CredentialsRefused:
                raise
            except SystemUnavailable as exc:
                self._poll_failed(exc)
                continue
            self._failures = 0
            if sync_mode and not changes:
                self._mark = _Mark(sync=sync)  # nothing new: the next poll starts from here
            self._next_sync = sync
            self._pending.extend(changes)
        batch = [self._pending.popleft() for _ in range(min(limit, len(self._pending)))]
        if sync_mode and not self._pending:
            self._mark = _Mark(sync=self._next_sync)
        else:
            self._mark = self._mark.advanced(batch, self._lookback)
        self._last_cursor = _MARK_ENCODER.encode(self._mark).decode()
        self._counts["emitted"] += len(batch)
        return ChangeBatch(changes=batch, cursor=self._last_cursor)

    def _poll_failed(self, exc: SystemUnavailable) -> None:
        cfg = self._config
        self._failures += 1
        self._counts["failed_polls"] += 1
        now = anyio.current_time()
        wait = backoff_delay(
            self._failures, initial=cfg.backoff_initial, maximum=cfg.backoff_max, jitter=cfg.backoff_jitter
        )
        wait = max(wait, self._reopens_at - now)
        _, credentials = self._require()
        log.warning(
            "%s%s: poll failed (%s); next poll in %.1fs",
            self._config.base_url.rstrip("/"), self._config.path, credentials.redact(str(exc)), wait,
        )  # fmt: skip
        self._next_poll = now + wait

    async def _poll(self, mark: _Mark) -> tuple[list[Change], str | None]:
        """List every page once; the changes ``mark`` admits (sorted) and the new sync cursor.

        Raises:
            SystemUnavailable: a request failed for good (attempts, Retry-After cap, circuit).
        """
        cfg = self._config
        self._counts["polls"] += 1
        params = dict(cfg.params)
        headers: dict[str, str] = {}
        inc = cfg.incremental
        if isinstance(inc, RestModifiedSince) and mark.since is not None:
            value = _format_since(mark.since - self._lookback, self._since_format)
            if inc.param is not None:
                params[inc.param] = value
            elif inc.header is not None:
                headers[inc.header] = value
        elif isinstance(inc, RestSyncCursor) and mark.sync is not None:
            params[inc.param] = mark.sync
        found: dict[tuple[str, int], Change] = {}
        sync: str | None = None
        pager = _Pager(cfg, self._origin)
        url: str = cfg.path
        query: dict[str, str] | None = pager.first(params)
        for _ in range(cfg.max_pages):
            response = await self._fetch(url, query, headers)
            if response.status_code == 304:
                break  # nothing modified since the mark
            what = f"GET {response.url}"
            body = _decode_body(response, what)
            records = self._records(body, what)
            for i, record in enumerate(records):
                change = self._change(record, f"{what}: record {i}")
                if mark.admits(change.key, change.version, self._lookback):
                    found.setdefault((change.key, change.version), change)
            if self._sync_path is not None:
                token = dotted(body, self._sync_path)
                if token is not MISSING and token is not None and token != "":
                    sync = str(token)
            step = pager.next(response, body, len(records), what)
            if step is None:
                break
            url, query = step
        else:
            raise ConfigError(
                f"GET {cfg.path}: the listing did not end after {cfg.max_pages} pages "
                "(check pagination and its stop rule, or raise max_pages)",
                path="source.pagination",
            )
        if isinstance(inc, RestSyncCursor) and sync is None:
            raise ConfigError(
                f"GET {cfg.path}: no sync cursor at {inc.cursor_path!r} in the listing",
                path="source.incremental.cursor_path",
            )
        return sorted(found.values(), key=lambda c: (c.version, c.key)), sync

    def _records(self, body: Any, what: str) -> list[Any]:
        if self._records_path is None:
            if not isinstance(body, list):
                raise ConfigError(
                    f"{what}: the body is {_kind(body)}, not a list of records (set records_path)",
                    path="source.records_path",
                )
            return body
        found = dotted(body, self._records_path)
        if found is None:
            return []  # some APIs send null for an empty page
        if not isinstance(found, list):
            missing = "nothing" if found is MISSING else _kind(found)
            raise ConfigError(
                f"{what}: records_path {self._config.records_path!r} holds {missing}, not a list",
                path="source.records_path",
            )
        return found

    def _change(self, record: Any, what: str) -> Change:
        cfg = self._config
        if not isinstance(record, dict):
            raise ConfigError(f"{what} is {_kind(record)}, not an object", path="source.records_path")
        key = dotted(record, self._key_path)
        if isinstance(key, bool) or not isinstance(key, str | int) or key == "":
            found = "nothing" if key is MISSING else repr(key)
            raise ConfigError(
                f"{what}: key_field {cfg.key_field!r} holds {found} (expected a string or an integer)",
                path="source.key_field",
            )
        raw = dotted(record, self._version_path)
        version = _version(raw, cfg.version_type)
        if version is None:
            found = "nothing" if raw is MISSING else repr(raw)
            raise ConfigError(
                f"{what} (key {key!r}): version_field {cfg.version_field!r} holds {found} "
                f"(expected {_EXPECTED[cfg.version_type]})",
                path="source.version_field",
            )
        return Change(
            key=str(key),
            version=version,
            deleted=self._is_deleted(record),
            row=record,
            occurred_at=version // 1000 if self._timestamps else 0,
        )

    def _is_deleted(self, record: dict[str, Any]) -> bool:
        if self._deleted_path is None:
            return False
        value = dotted(record, self._deleted_path)
        values = self._config.deleted_values
        if values is None:
            return value is True or (isinstance(value, str) and value.lower() == "true")
        return any(type(value) is type(v) and value == v for v in values)

    async def _fetch(
        self, url: str, params: dict[str, str] | None, headers: dict[str, str]
    ) -> httpx.Response:
        """One page, retried within the bounds. Returns a 2xx or 304 response.

        Raises:
            SystemUnavailable: attempts used up, Retry-After over the cap, or the circuit open.
            _CredentialsRefused: 401, 403, 407.
            ConfigError: a 3xx, or a 4xx that says the request is wrong.
        """
        client, credentials = self._require()
        what = f"GET {url}"

        async def answered(response: httpx.Response) -> httpx.Response:
            return response

        def refused(what: str, response: httpx.Response) -> httpx.Response:
            excerpt = credentials.redact(_excerpt(response.content))
            raise ConfigError(
                f"{what}: HTTP {response.status_code}: {excerpt} (check path, params, pagination and "
                "incremental)",
                path="source.path",
            )

        def credentials_refused(what: str, status: int) -> Exception:
            return _CredentialsRefused(
                f"{what}: HTTP {status}: the API refuses our credentials "
                "(check the source's auth and its secret)"
            )

        def redirected(what: str, response: httpx.Response) -> Exception:
            return ConfigError(
                f"{what}: HTTP {response.status_code} redirect to {response.headers.get('Location')!r}: "
                "check base_url and path",
                path="source.base_url",
            )

        return await send_with_retries(
            lambda: what, lambda: client.get(url, params=params, headers=headers),
            cfg=self._config, breaker=self._breaker, gate=self._gate, counts=self._counts,
            redact=credentials.redact, final=lambda status: 200 <= status < 300 or status == 304,
            answered=answered, refused=refused, credentials_refused=credentials_refused,
            redirected=redirected, failed=self._failed_request, slot=False, wait_over_cap=True, log=log,
        )  # fmt: skip

    def _failed_request(self) -> None:
        self._breaker.failure()
        if self._breaker.state == "open":
            self._reopens_at = anyio.current_time() + self._breaker.cooldown

    async def aclose(self) -> None:
        """Close the HTTP client (and the transport). Idempotent; the source may be opened again."""
        client, self._client = self._client, None
        self._credentials = None
        if client is not None:
            with anyio.CancelScope(shield=True):
                await client.aclose()


class _Pager:
    """The requests of one listing: the first, then each next one from the last answer."""

    def __init__(self, cfg: RestSourceConfig, origin: tuple[str, str, int]) -> None:
        self.cfg = cfg
        self.style = cfg.pagination
        self.origin = origin
        self.params: dict[str, str] = {}
        self.position = 0
        self.cursors: set[str] = set()

    def first(self, params: dict[str, str]) -> dict[str, str]:
        style = self.style
        self.params = dict(params)
        if isinstance(style, RestPagePagination):
            self.position = style.first_page
            return {
                **self.params,
                **self._size(style.size_param, style.size),
                style.page_param: str(self.position),
            }
        if isinstance(style, RestOffsetPagination):
            return {**self.params, **self._size(style.size_param, style.size), style.offset_param: "0"}
        if isinstance(style, RestCursorPagination | RestLinkPagination):
            self.params.update(self._size(style.size_param, style.size))
        return dict(self.params)

    @staticmethod
    def _size(param: str | None, size: int) -> dict[str, str]:
        return {} if param is None else {param: str(size)}

    def next(
        self, response: httpx.Response, body: Any, count: int, what: str
    ) -> tuple[str, dict[str, str] | None] | None:
        """The next request (url, query), or None when the listing has ended."""
        style = self.style
        path = self.cfg.path
        if isinstance(style, RestPagePagination | RestOffsetPagination):
            if count == 0 or (style.stop == "short" and count < style.size):
                return None
            size = self._size(style.size_param, style.size)
            if isinstance(style, RestPagePagination):
                self.position += 1
                return path, {**self.params, **size, style.page_param: str(self.position)}
            self.position += count
            return path, {**self.params, **size, style.offset_param: str(self.position)}
        if isinstance(style, RestCursorPagination):
            token = dotted(body, _split(style.cursor_path))
            if token is MISSING or token is None or token == "":
                return None
            token = str(token)
            if token in self.cursors:
                raise ConfigError(
                    f"{what}: the next cursor {token[:40]!r} was already followed (the listing loops)",
                    path="source.pagination.cursor_path",
                )
            self.cursors.add(token)
            return path, {**self.params, style.cursor_param: token}
        if isinstance(style, RestLinkPagination):
            link = response.links.get("next", {}).get("url")
            if not link:
                return None
            url = response.url.join(link)
            if _origin(url) != self.origin:
                raise ConfigError(
                    f"{what}: the next link leads to another origin ({url.scheme}://{url.host}); "
                    "credentials are only sent to base_url's",
                    path="source.pagination",
                )
            if str(url) in self.cursors:
                raise ConfigError(
                    f"{what}: the next link {url} was already followed", path="source.pagination"
                )
            self.cursors.add(str(url))
            return str(url), None
        return None


_EXPECTED = {
    "integer": "an integer",
    "timestamp": "an ISO-8601 timestamp or /Date(ms)/",
    "epoch_seconds": "seconds since the epoch",
    "epoch_millis": "milliseconds since the epoch",
}


def _origin(url: httpx.URL) -> tuple[str, str, int]:
    return url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80)


def _split(path: str) -> tuple[str, ...]:
    return tuple(path.split("."))


def _kind(value: Any) -> str:
    if value is MISSING:
        return "nothing"
    return {dict: "an object", list: "a list", str: "a string", type(None): "null"}.get(
        type(value), f"a {type(value).__name__}"
    )


def _decode_body(response: httpx.Response, what: str) -> Any:
    try:
        return msgspec.json.decode(response.content)
    except msgspec.DecodeError:
        raise ConfigError(
            f"{what}: HTTP {response.status_code} answer is not JSON: {_excerpt(response.content)}",
            path="source.path",
        ) from None


def _excerpt(content: bytes) -> str:
    text = " ".join(content[: _EXCERPT * 4].decode("utf-8", "replace").split())
    return (text[:_EXCERPT] + "...") if len(text) > _EXCERPT else (text or "(empty body)")


def _decimal(value: Any) -> Decimal | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def _version(value: Any, kind: str) -> int | None:
    """A version as an integer (timestamps: microseconds since the epoch), or None if unreadable."""
    if kind == "integer":
        number = _decimal(value)
        return int(number) if number is not None and number == number.to_integral_value() else None
    if kind == "timestamp":
        if not isinstance(value, str):
            return None
        text = value.strip()
        match = _MS_DATE.match(text)
        if match is not None:
            return int(match.group(1)) * 1000  # the milliseconds are UTC; the offset is display only
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return (moment - _EPOCH) // _MICROSECOND
    number = _decimal(value)
    if number is None:
        return None
    scale = 1_000_000 if kind == "epoch_seconds" else 1000
    return int((number * scale).to_integral_value())


def _since_format(cfg: RestSourceConfig) -> str:
    inc = cfg.incremental
    if not isinstance(inc, RestModifiedSince):
        return "integer"
    if inc.format is not None:
        return inc.format
    if cfg.version_type == "integer":
        return "integer"
    if inc.header is not None:
        return "http_date"
    return {"epoch_seconds": "epoch_seconds", "epoch_millis": "epoch_millis"}.get(cfg.version_type, "iso8601")


def _format_since(mark: int, fmt: str) -> str:
    """The high-water mark as the API reads it; coarser formats round down (a wider answer)."""
    if fmt == "integer":
        return str(mark)
    if fmt == "epoch_seconds":
        return str(mark // 1_000_000)
    if fmt == "epoch_millis":
        return str(mark // 1000)
    moment = _EPOCH + mark * _MICROSECOND
    if fmt == "http_date":
        # If-Modified-Since means "strictly after, to the second" (RFC 9110 13.1.3): one second
        # earlier still brings back the records at the mark.
        moment = moment.replace(microsecond=0) - timedelta(seconds=1)
        return email.utils.format_datetime(moment, usegmt=True)
    spec = "microseconds" if moment.microsecond else "seconds"
    return moment.isoformat(timespec=spec).replace("+00:00", "Z")


def _decode_cursor(cursor: str | None) -> _Mark:
    if cursor is None:
        return _Mark()
    try:
        return _MARK_DECODER.decode(cursor)
    except msgspec.DecodeError:
        shown = cursor if len(cursor) <= 60 else cursor[:60] + "..."
        raise ConfigError(f"{shown!r} is not a cursor of a REST source") from None


def _validate(cfg: RestSourceConfig) -> None:
    """What the config's types cannot say (and what a hand-built config may get wrong).

    Raises:
        ConfigError: naming the field.
    """
    url = urlsplit(cfg.base_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(
            "source.base_url: expected an http:// or https:// URL with a host", path="source.base_url"
        )
    if url.username is not None or url.password is not None or url.query or url.fragment:
        raise ConfigError(
            "source.base_url: must contain no credentials (use [auth]), query or fragment (use params)",
            path="source.base_url",
        )
