"""The REST sink: records become JSON requests to any HTTP API, effect-once under redelivery.

Why httpx: DESIGN names it for ``adapters/rest``; it is async on top of anyio (so it lives in our
task groups and is cancellable), has per-phase timeouts, connection pooling with limits, and a
pluggable transport: tests hand the sink an ``httpx.AsyncBaseTransport`` (STYLE 9) instead of
patching anything, and production gets the same code path with the default transport.

What one record becomes::

    upsert  {method} {base_url}{upsert_path}   body: the row as JSON (``fields``, ``key_field``)
    delete  DELETE {base_url}{delete_path}      (or PATCH {"<tombstone_field>": true})
    headers Idempotency-Key: <envelope id>, X-Mesh-Version: <version>, auth, static headers

Guarantees:

* **Version guard (I5) without help from the target.** A local SQLite file (``state_path``,
  :mod:`adapters.rest._state`) holds the highest version the target acknowledged per key. A
  record whose version is not greater is :attr:`~mesh.adapters.Applied.STALE` and sends no
  request. The version is recorded only after a 2xx, so a crash between the 2xx and the record
  means the message is redelivered and the *same* request goes again with the *same*
  ``Idempotency-Key``: an API that honours the key (or an idempotent PUT) makes it one effect (I4).
  A record with a ``scope`` is guarded per (key, scope), as in the SQL sinks: versions of
  different origins are never compared.
  The file also records, before each request goes out, the newest version *sent* per key: a
  request may take effect without the answer being seen (a timeout, a kill, a batch given back),
  so a version older than one already sent is STALE too and is never sent after it. (If that
  newer version is then refused for good, it is dead-lettered; the older one it superseded is
  not sent.)
* **Order per key.** Records of one key are sent strictly one after another, in batch order;
  different keys go concurrently (at most ``concurrency`` at once), started in batch order.
* **Bounded retries.** 5xx, 408, 409, 429, timeouts and connection errors are tried up to
  ``max_attempts`` times per request with exponential backoff and jitter; ``Retry-After``
  (seconds or HTTP date, on 429 and 5xx) is honoured and pauses *all* requests of the sink, but a
  ``Retry-After`` above ``retry_after_cap`` or running out of attempts gives the batch back at
  once: :meth:`RestSink.apply` raises :class:`~mesh.errors.SystemUnavailable` (or, when some
  records were already applied, puts that error in the slots of those that were not), and the
  agent naks them with its own backoff instead of blocking the flow.
* **Circuit breaker.** ``breaker_threshold`` consecutive failed requests open the circuit for
  ``breaker_cooldown`` seconds, during which ``apply`` raises ``SystemUnavailable`` without
  sending anything; then one probe request decides whether it closes again.
* **Refusals are per record.** Any other 4xx becomes a :class:`~mesh.errors.RejectedRecord` in
  that record's slot, with the status and a short excerpt of the response body, while the others
  apply. A 404 or 410 answering a delete counts as deleted. 401, 403 and 407 are *not* refusals
  of a record but of our credentials, so they give the batch back (``SystemUnavailable``) rather
  than dead-lettering every record while a token is expired; 3xx (a wrong ``base_url``) likewise.
* **Request templates** (``create``/``update``/``delete`` operations, ``envelope``,
  ``batch_size``, ``results``, ``lookup``, ``delete_mode = "update"``; see ``config.templated``):
  the k-th record of each key in a batch goes in round k, so a request never holds one key twice
  and a key's records stay in order; records to the same method and path without ``{key}`` or
  ``{id}`` share a request of up to ``batch_size``, and ``results`` gives each its own outcome
  (a failed one is a RejectedRecord alone). The id the target assigns (``results.id``) is stored
  with the record's version in one transaction (:mod:`adapters.rest._state`) and fills ``{id}``
  later. A create is durably marked *pending* before it is sent; when its answer is lost
  (timeout, connection dropped after sending, the agent killed) the next try runs ``lookup``
  first and, if the target has the record, stores its id instead of creating it again.
* **Readable refusals.** A refusal carries, for the dead letter (``dead_letter_extra``), the
  status, the refused record's request body and the response body, each bounded to 4 KiB with
  every secret value masked; its reason comes from ``results.errors`` or ``error_path``.
* **Secrets stay secret.** Credentials come from environment variables named in the config
  (:mod:`adapters.rest._auth`); no repr, error message or log line contains a header, and body
  excerpts are scrubbed of every secret value before use.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote, urlsplit

import anyio
import httpx
import msgspec

from adapters.rest._auth import Credentials
from adapters.rest._ratelimit import gate_for
from adapters.rest._retry import CircuitBreaker
from adapters.rest._send import (
    SINK_BUSY,
    batch_outcomes,
    send_with_retries,
    sink_credentials_refused,
    sink_redirected,
)
from adapters.rest._state import VersionStore, default_target
from adapters.rest._template import guard_key, refusal, refusal_reason
from adapters.rest._templated import TemplatedApply
from adapters.rest.config import RestSinkConfig
from mesh import telemetry
from mesh.adapters import Applied, Sink, SinkRecord
from mesh.errors import ConfigError, IntegrityPending, RejectedRecord

__all__ = ["RestSink"]

log = logging.getLogger(__name__)

_JSON = msgspec.json.Encoder()
_GONE = frozenset({404, 410})  # a delete that finds nothing has had its effect


class RestSink(TemplatedApply, Sink):
    """Applies records to a JSON REST API, one idempotent request per record (see module doc).

    ``transport`` replaces httpx's network transport (tests pass ``httpx.MockTransport`` or an
    ASGI transport); the sink closes it with itself. ``apply`` calls are serialised.
    """

    def __init__(self, config: RestSinkConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        _validate(config)
        self._config = config
        self._transport = transport
        main = config.upsert_path if config.upsert_path is not None else config.create.path  # type: ignore[union-attr]
        self._upsert_path = main
        self._delete_path = config.delete_path or main
        self._store = VersionStore(config.state_path, default_target(config.base_url, main))
        self._templated = config.templated
        self._xref = config.results is not None and config.results.id is not None
        self._refused_creates: list[str] = []  # their pending marks go at the end of the round
        self._gate = gate_for(config.rate_limit, config.burst, config.policy)
        self._breaker = CircuitBreaker(config.breaker_threshold, config.breaker_cooldown)
        self._credentials: Credentials | None = None
        self._client: httpx.AsyncClient | None = None
        self._lock = anyio.Lock()
        self._counts = dict.fromkeys(
            ("requests", "retries", "applied", "stale", "rejected", "lookups", "found"), 0
        )

    def __repr__(self) -> str:
        cfg = self._config
        counts = " ".join(f"{k}={v}" for k, v in self._counts.items())
        state = "" if self._client is not None else " closed"
        return (
            f"<RestSink {cfg.method} {cfg.base_url.rstrip('/')}{self._upsert_path} "
            f"breaker={self._breaker.state} {counts}{state}>"
        )

    async def open(self) -> None:
        """Read the credentials, open the local version file and the HTTP client.

        Raises:
            ConfigError: a secret's environment variable is unset or empty, or the directory
                of ``state_path`` does not exist.
            SystemUnavailable: the local version file cannot be opened now.
        """
        if self._client is not None:
            return
        cfg = self._config
        self._credentials = Credentials(
            cfg.auth, what="REST sink", headers_env=cfg.headers_env, headers_file=cfg.headers_file
        )
        await self._store.open()
        self._client = httpx.AsyncClient(
            base_url=cfg.base_url,
            headers={**cfg.headers, **self._credentials.headers},
            timeout=httpx.Timeout(cfg.timeout),
            limits=httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency),
            follow_redirects=False,
            transport=self._transport,
            auth=self._credentials.auth,  # OAuth2: a token per request, refreshed once on a 401
        )
        self._credentials.bind(self._client)

    def _require(self) -> tuple[httpx.AsyncClient, Credentials]:
        if self._client is None or self._credentials is None:
            raise RuntimeError(f"{self!r} is not open")
        return self._client, self._credentials

    async def apply(self, records: Sequence[SinkRecord]) -> list[Applied | Exception]:
        """Send each record whose version is newer than the last one acknowledged for its key.

        Returns one outcome per record: ``APPLIED`` (2xx, version recorded), ``STALE`` (no
        request sent), a :class:`~mesh.errors.RejectedRecord` (the target refused it), or, when
        the batch was given back after some records had been applied, a
        :class:`~mesh.errors.SystemUnavailable` for each record that was not.

        Raises:
            SystemUnavailable: the circuit is open, the target is down, throttling beyond
                ``retry_after_cap``, refusing our credentials, or the local version file is
                unusable, and no record was applied; retry the whole batch later.
        """
        self._require()
        async with self._lock:
            if self._templated:
                return await self._apply_templated(records)
            return await self._apply(records)

    async def _apply(self, records: Sequence[SinkRecord]) -> list[Applied | Exception]:
        chains: dict[str, list[int]] = {}  # by key: one key's records go one after another
        for i, record in enumerate(records):
            chains.setdefault(record.key, []).append(i)
        guards = {guard_key(r) for r in records}  # versions compare per (key, scope)
        applied = await self._store.versions(guards)
        # The newest version ever sent per (key, scope): once a version may have taken effect unseen (a
        # timeout, a kill, a batch given back), nothing older is sent again for that key.
        sent = await self._store.versions(guards, table="mesh_rest_sent")
        outcomes: list[Applied | Exception | None] = [None] * len(records)
        failures: list[Exception] = []
        pending = iter(chains.items())  # shared by the workers: each key is taken by one of them

        async def worker() -> None:
            for _, indexes in pending:
                for i in indexes:
                    record = records[i]
                    guard = guard_key(record)
                    last = applied.get(guard)
                    if (last is not None and record.version <= last) or record.version < sent.get(guard, -1):
                        outcomes[i] = Applied.STALE
                        self._counts["stale"] += 1
                        continue
                    try:
                        await self._store.mark_sent({guard: record.version})  # durable before sending
                        sent[guard] = max(sent.get(guard, -1), record.version)
                        outcome = await self._apply_one(record)
                    except Exception as exc:  # SystemUnavailable, or a bug: re-raised unwrapped below
                        failures.append(exc)
                        scope.cancel()  # give the whole batch back; in-flight requests stop too
                        return
                    outcomes[i] = outcome
                    if outcome is Applied.APPLIED:
                        applied[guard] = record.version

        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                for _ in range(min(self._config.concurrency, len(chains))):
                    tg.start_soon(worker)
        return batch_outcomes(self, outcomes, failures[0] if failures else None, log)

    def _request_for(self, record: SinkRecord) -> tuple[str, str, bytes | None]:
        """(method, path, body) for one record.

        Raises:
            RejectedRecord: the row cannot be encoded as JSON.
        """
        cfg = self._config
        key = quote(record.key, safe="")
        extra: dict[str, Any] = {cfg.key_field: record.key} if cfg.key_field else {}
        if record.deleted:
            path = self._delete_path.format(key=key)
            if cfg.delete_mode == "delete":
                return "DELETE", path, None
            return "PATCH", path, _JSON.encode({cfg.tombstone_field: True, **extra})
        row = record.row
        if cfg.fields is not None:
            row = {name: row[name] for name in cfg.fields if name in row}
        if cfg.omit_nulls:
            row = {name: value for name, value in row.items() if value is not None}
        try:
            body = _JSON.encode({**row, **extra})
        except (TypeError, ValueError, msgspec.EncodeError) as exc:
            raise RejectedRecord(f"key {record.key!r}: row is not JSON-encodable: {exc}") from None
        if not record.create:
            # Update only (the origin does not own the entity's existence): PATCH the record
            # itself; a 404 means there is nothing to update (UNCHANGED), never a create.
            if "{key}" not in self._upsert_path:
                raise RejectedRecord(
                    f"key {record.key!r}: an update-only record needs an upsert_path with {{key}} "
                    f"(got {self._upsert_path!r})"
                )
            return "PATCH", self._upsert_path.format(key=key), body
        return cfg.method, self._upsert_path.format(key=key), body

    async def _apply_one(self, record: SinkRecord) -> Applied | RejectedRecord | IntegrityPending:
        """Send one record, retrying within the bounds; record its version after a 2xx.

        Raises:
            SystemUnavailable: give the batch back (attempts exhausted, Retry-After over the
                cap, credentials refused, redirected, circuit open, version file unusable).
        """
        client, credentials = self._require()
        cfg = self._config
        if record.deleted and not record.create:  # not the origin's to delete: nothing to send
            with anyio.CancelScope(shield=True):
                await self._store.record(guard_key(record), record.version, deleted=False)
            return Applied.UNCHANGED
        try:
            method, path, body = self._request_for(record)
        except RejectedRecord as exc:
            self._counts["rejected"] += 1
            return exc
        headers = {"Idempotency-Key": record.id, "X-Mesh-Version": str(record.version)}
        if body is not None:
            headers["Content-Type"] = "application/json"
        what = f"{method} {path}"

        async def send() -> httpx.Response:
            with telemetry.api_call(record.id, method, path) as span:
                response = await client.request(method, path, content=body, headers=headers)
                telemetry.answered(span, response.status_code)
            return response

        def final(status: int) -> bool:
            gone = status in _GONE and (record.deleted or not record.create)
            return 200 <= status < 300 or gone or status in cfg.integrity_statuses

        async def answered(response: httpx.Response) -> Applied | RejectedRecord | IntegrityPending:
            status = response.status_code
            if not record.create and not record.deleted and status in _GONE:
                with anyio.CancelScope(shield=True):
                    await self._store.record(guard_key(record), record.version, deleted=False)
                return Applied.UNCHANGED  # absent, and not ours to create
            if 200 <= status < 300 or (record.deleted and status in _GONE):
                with anyio.CancelScope(shield=True):  # the target has it: record it
                    await self._store.record(guard_key(record), record.version, deleted=record.deleted)
                self._counts["applied"] += 1
                return Applied.APPLIED
            # integrity_statuses: a related record missing: the agent retries
            return refused(what, response, integrity=True)

        def refused(
            what: str, response: httpx.Response, *, integrity: bool = False
        ) -> RejectedRecord | IntegrityPending:
            self._counts["rejected"] += 1
            reason = refusal_reason(cfg, response.content)
            return refusal(
                what, response.status_code, reason, body, response.content, credentials.redact,
                integrity=integrity,
            )  # fmt: skip

        return await send_with_retries(
            lambda: what, send, cfg=cfg, breaker=self._breaker, gate=self._gate, counts=self._counts,
            redact=credentials.redact, final=final, answered=answered, refused=refused,
            credentials_refused=sink_credentials_refused, redirected=sink_redirected, busy=SINK_BUSY, log=log,
        )  # fmt: skip

    async def aclose(self) -> None:
        """Close the HTTP client (and the transport) and the version file. Idempotent."""
        client, self._client = self._client, None
        self._credentials = None
        with anyio.CancelScope(shield=True):
            if client is not None:
                await client.aclose()
            await self._store.aclose()


def _validate(cfg: RestSinkConfig) -> None:
    """What the config's types cannot say (and what a hand-built config may get wrong).

    Raises:
        ConfigError: naming the field.
    """

    def fail(field: str, message: str) -> None:
        raise ConfigError(message, path=f"sink.{field}")

    url = urlsplit(cfg.base_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        fail("base_url", "expected an http:// or https:// URL with a host")
    if url.username is not None or url.password is not None:
        fail("base_url", "must not contain credentials (use [auth])")
    if url.query or url.fragment:
        fail("base_url", "must not contain a query or fragment")
    known = {"key", "id"} if cfg.templated else {"key"}
    keyed: dict[str, bool] = {}
    for field, template in (("upsert_path", cfg.upsert_path), ("delete_path", cfg.delete_path)):
        if template is None:
            continue
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        except ValueError as exc:
            fail(field, f"not a path template: {exc}")
        if names - known:
            fail(field, f"unknown placeholder(s) {sorted(names - known)}: only {sorted(known)} known")
        if "id" in names and not (cfg.results is not None and cfg.results.id is not None):
            fail(field, "{id} needs the target's id: set results.id (and lookup)")
        keyed[field] = bool(names)
    if cfg.templated:
        delete_keyed = keyed.get("delete_path", keyed.get("upsert_path", False))
        if cfg.delete is None and not delete_keyed and (cfg.delete_mode == "delete" or cfg.key_field is None):
            fail("delete", "set [delete] or a delete_path with {key} or {id}")
    else:
        assert cfg.upsert_path is not None  # the config refuses neither upsert_path nor create
        if not keyed["upsert_path"] and cfg.key_field is None:
            fail("upsert_path", "needs {key}, or set key_field so the body names the record")
        delete_keyed = keyed.get("delete_path", keyed["upsert_path"])
        if not delete_keyed and (cfg.delete_mode == "delete" or cfg.key_field is None):
            fail("delete_path", "needs {key} (a delete has no body to name the record in)")
    if cfg.rate_limit < 0:
        fail("rate_limit", "must be >= 0")
