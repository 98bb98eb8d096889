"""The REST sink's templated path (``RestSinkConfig.templated``): records in rounds, requests
grouped and batched by operation, per-record results, the cross-reference of target ids and the
lookup of creates whose answer was lost. A mixin of :class:`adapters.rest.sink.RestSink`; the
guarantees are listed in that module's docstring.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import anyio
import httpx
import msgspec

from adapters.rest._auth import Credentials
from adapters.rest._paths import first
from adapters.rest._ratelimit import RequestGate, SharedGate
from adapters.rest._retry import CircuitBreaker
from adapters.rest._send import (
    SINK_BUSY,
    batch_outcomes,
    send_with_retries,
    sink_credentials_refused,
    sink_redirected,
)
from adapters.rest._state import VersionStore
from adapters.rest._template import (
    body_of,
    delete_item,
    encode_json,
    excerpt,
    format_path,
    guard_key,
    has_placeholder,
    read_results,
    refusal,
    refusal_reason,
    upsert_item,
)
from adapters.rest.config import RestOperation, RestSinkConfig
from mesh.adapters import Applied, SinkRecord
from mesh.errors import IntegrityPending, RejectedRecord, SystemUnavailable

__all__ = ["TemplatedApply"]

log = logging.getLogger("adapters.rest.sink")

_GONE = frozenset({404, 410})  # a delete that finds nothing has had its effect


class TemplatedApply:
    """The templated ``apply`` of :class:`~adapters.rest.sink.RestSink` (state it uses is set
    up by the sink's ``__init__``)."""

    _config: RestSinkConfig
    _store: VersionStore
    _gate: RequestGate | SharedGate
    _breaker: CircuitBreaker
    _counts: dict[str, int]
    _upsert_path: str
    _xref: bool
    _refused_creates: list[str]

    def _require(self) -> tuple[httpx.AsyncClient, Credentials]:
        raise NotImplementedError  # pragma: no cover - the sink's

    async def _apply_templated(self, records: Sequence[SinkRecord]) -> list[Applied | Exception]:
        """The templated path: records go in rounds (the k-th record of each key in round k, so
        one request never holds a key twice and a key's records stay in order); each round's
        records become requests grouped by (method, path), up to ``batch_size`` each."""
        guards = {guard_key(r) for r in records}
        applied = await self._store.versions(guards)
        sent = await self._store.versions(guards, table="mesh_rest_sent")
        outcomes: list[Applied | Exception | None] = [None] * len(records)
        rounds: list[list[int]] = []
        depth: dict[str, int] = {}
        for i, record in enumerate(records):
            d = depth.get(record.key, 0)
            depth[record.key] = d + 1
            if d == len(rounds):
                rounds.append([])
            rounds[d].append(i)
        failure: Exception | None = None
        for indexes in rounds:
            try:
                await self._round(records, indexes, applied, sent, outcomes)
            except Exception as exc:  # SystemUnavailable, or a bug: re-raised unwrapped below
                failure = exc
                break
        return batch_outcomes(self, outcomes, failure, log)

    async def _round(
        self,
        records: Sequence[SinkRecord],
        indexes: list[int],
        applied: dict[str, int],
        sent: dict[str, int],
        outcomes: list[Applied | Exception | None],
    ) -> None:
        cfg = self._config
        live: list[int] = []
        for i in indexes:
            record, guard = records[i], guard_key(records[i])
            last = applied.get(guard)
            if (last is not None and record.version <= last) or record.version < sent.get(guard, -1):
                outcomes[i] = Applied.STALE
                self._counts["stale"] += 1
            elif record.deleted and not record.create:  # not the origin's to delete
                with anyio.CancelScope(shield=True):
                    await self._store.record(guard, record.version, deleted=False)
                outcomes[i] = Applied.UNCHANGED
            else:
                live.append(i)
        if not live:
            return
        xrefs = await self._store.xrefs(records[i].key for i in live)
        ops: list[_Op] = []
        for i in live:
            record, guard = records[i], guard_key(records[i])
            row = xrefs.get(record.key)
            target_id = row.id if row is not None else None
            if row is not None and row.id is None and cfg.lookup is not None:
                # A create went out and its answer was never seen: find it before anything else.
                target_id = await self._lookup(record)
                if target_id is not None:
                    self._counts["found"] += 1
                    done = row.pending_version == record.version and not record.deleted
                    with anyio.CancelScope(shield=True):
                        await self._store.record_applied(
                            record.key, record.version if done else None, guard=guard, target_id=target_id
                        )
                    if done:  # that very create took effect: nothing more to send
                        outcomes[i] = Applied.APPLIED
                        applied[guard] = record.version
                        self._counts["applied"] += 1
                        continue
            try:
                op = self._op_for(i, record, guard, target_id)
            except RejectedRecord as exc:
                self._counts["rejected"] += 1
                outcomes[i] = exc
                continue
            if isinstance(op, Applied):  # nothing to send (a delete of what the target never got)
                with anyio.CancelScope(shield=True):
                    await self._store.record(guard, record.version, deleted=record.deleted)
                outcomes[i] = op
                applied[guard] = record.version
                continue
            ops.append(op)
        if not ops:
            return
        # Durable before anything is sent: the newest version sent per key, and the creates
        # whose answer may be lost (looked up before they are sent again).
        await self._store.mark_sent({op.guard: op.record.version for op in ops})
        for op in ops:
            sent[op.guard] = max(sent.get(op.guard, -1), op.record.version)
        if self._xref:
            await self._store.mark_creating(
                {op.record.key: op.record.version for op in ops if op.kind == "create"}
            )
        requests: dict[tuple[str, str], list[list[_Op]]] = {}
        for op in ops:
            chunks = requests.setdefault((op.method, op.path), [])
            batchable = op.batchable and chunks and len(chunks[-1]) < cfg.batch_size
            if batchable:
                chunks[-1].append(op)
            else:
                chunks.append([op])
        failures: list[Exception] = []
        limiter = anyio.CapacityLimiter(cfg.concurrency)

        async def run(request: list[_Op]) -> None:
            async with limiter:
                try:
                    await self._send_request(request, outcomes, applied)
                except Exception as exc:
                    failures.append(exc)
                    scope.cancel()  # give the batch back; in-flight requests stop too

        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                for chunks in requests.values():
                    for request in chunks:
                        tg.start_soon(run, request)
        refused, self._refused_creates = self._refused_creates, []
        if refused:
            with anyio.CancelScope(shield=True):
                await self._store.forget_pending(refused)
        if failures:
            raise failures[0]

    def _op_for(self, index: int, record: SinkRecord, guard: str, target_id: str | None) -> _Op | Applied:
        """The request one record needs, or UNCHANGED when there is nothing to send.

        Raises:
            RejectedRecord: the row is not JSON-encodable, or the path needs an id not known.
        """
        cfg = self._config
        kind: Literal["create", "update", "delete"]
        item: dict[str, Any] | None
        params: dict[str, str] = {}
        if record.deleted:
            kind = "delete"
            if cfg.delete is not None:
                method, template, params = cfg.delete.method, cfg.delete.path, cfg.delete.params
            else:
                template = cfg.delete_path or self._upsert_path
                method = "PATCH" if cfg.delete_mode == "tombstone" else "DELETE"
            if "{id}" in template and target_id is None:
                return Applied.UNCHANGED  # the target never got it (no id): nothing to delete
            if cfg.delete_mode == "update":
                item = delete_item(cfg, record, target_id)
            elif cfg.delete_mode == "tombstone":
                item = {cfg.tombstone_field: True, **({cfg.key_field: record.key} if cfg.key_field else {})}
            else:
                item = None
        else:
            default = RestOperation(path=self._upsert_path, method=cfg.method)
            if target_id is not None or (not record.create and not self._xref):
                kind = "update"
                op = cfg.update or cfg.create or default
                method, template, params = op.method, op.path, op.params
                if not record.create and cfg.update is None and cfg.create is None:
                    method = "PATCH"
            elif not record.create:
                return Applied.UNCHANGED  # the target has no id for it, and it is not ours to create
            else:
                kind = "create"
                op = cfg.create or default
                method, template, params = op.method, op.path, op.params
            if "{id}" in template and target_id is None:
                raise RejectedRecord(
                    f"key {record.key!r}: {template} needs the target's id, and none is known"
                )
            item = upsert_item(cfg, record, target_id)
        batchable = item is not None and cfg.envelope is not None and not has_placeholder(template)
        path = format_path(template, record.key, target_id)
        return _Op(index, record, guard, kind, method, path, params, item, batchable)

    async def _lookup(self, record: SinkRecord) -> str | None:
        """The id the target holds for ``record``'s key, by the configured lookup; None if absent.

        Raises:
            SystemUnavailable: the lookup failed (no answer, 5xx, refused); the batch goes back
                and the next delivery looks again.
        """
        lookup = self._config.lookup
        assert lookup is not None
        client, credentials = self._require()
        path = format_path(lookup.path, record.key, None)
        params = {name: value.format(key=record.key) for name, value in lookup.params.items()}
        what = f"lookup {lookup.method} {path}"
        self._counts["lookups"] += 1
        try:
            await self._gate.acquire()
            async with self._gate.slot():  # the policy's concurrency share (mesh.policy)
                with anyio.fail_after(self._config.timeout):
                    response = await client.request(lookup.method, path, params=params)
        except (TimeoutError, httpx.TimeoutException):
            raise SystemUnavailable(f"{what}: no answer within {self._config.timeout:g}s") from None
        except httpx.HTTPError as exc:
            raise SystemUnavailable(
                credentials.redact(f"{what}: {type(exc).__name__}: {exc}")[:300]
            ) from None
        if response.status_code in _GONE:
            return None
        if not 200 <= response.status_code < 300:
            raise SystemUnavailable(
                credentials.redact(f"{what}: HTTP {response.status_code}: {excerpt(response.content)}")
            )
        try:
            doc = msgspec.json.decode(response.content)
        except msgspec.DecodeError:
            raise SystemUnavailable(f"{what}: the answer is not JSON") from None
        found = first(doc, lookup.id_path)
        return None if found is None else str(found)

    async def _send_request(
        self, request: list[_Op], outcomes: list[Applied | Exception | None], applied: dict[str, int]
    ) -> None:
        """Send one request (one record, or a batch), with the retries of ``_apply_one``; a
        create whose answer is lost is looked up before it is sent again."""
        client, credentials = self._require()
        cfg = self._config
        remaining = list(request)

        def what() -> str:
            return f"{remaining[0].method} {remaining[0].path}"

        async def send() -> httpx.Response:
            head = remaining[0]
            body = (
                None
                if head.item is None
                else body_of(cfg, [op.item for op in remaining if op.item is not None])
            )
            ids = [op.record.id for op in remaining]
            headers = {
                "Idempotency-Key": ids[0] if len(ids) == 1 else _batch_key(ids),
                "X-Mesh-Version": str(head.record.version),
            }
            if body is not None:
                headers["Content-Type"] = "application/json"
            return await client.request(
                head.method, head.path, params=head.params, content=body, headers=headers
            )

        def final(status: int) -> bool:
            return 200 <= status < 300 or status in cfg.integrity_statuses or status in _GONE

        async def answered(response: httpx.Response) -> Literal[True]:
            status, name = response.status_code, what()
            if 200 <= status < 300:
                await self._settle(name, status, remaining, response.content, outcomes, applied)
            elif status in cfg.integrity_statuses:  # a related record missing: the agent retries
                for op in remaining:
                    outcomes[op.slot] = self._refuse(name, status, op, response.content, integrity=True)
            else:  # gone: a delete (or an update that is not ours to create) has nothing to do
                for op in remaining:
                    if op.kind == "delete" or not op.record.create:
                        with anyio.CancelScope(shield=True):
                            await self._store.record(op.guard, op.record.version, deleted=op.record.deleted)
                        applied[op.guard] = op.record.version
                        outcomes[op.slot] = Applied.APPLIED if op.kind == "delete" else Applied.UNCHANGED
                    else:
                        outcomes[op.slot] = self._refuse(name, status, op, response.content)
            return True

        def refused(name: str, response: httpx.Response) -> Literal[True]:
            for op in remaining:
                outcomes[op.slot] = self._refuse(name, response.status_code, op, response.content)
            return True

        async def between(lost: bool) -> Literal[True] | None:
            nonlocal remaining
            if not lost or cfg.lookup is None:
                return None
            # The request may have taken effect: never send a create again blindly.
            still: list[_Op] = []
            for op in remaining:
                found = await self._lookup(op.record) if op.kind == "create" else None
                if found is None:
                    still.append(op)
                    continue
                self._counts["found"] += 1
                with anyio.CancelScope(shield=True):
                    await self._store.record_applied(
                        op.record.key, op.record.version, guard=op.guard, target_id=found
                    )
                applied[op.guard] = op.record.version
                outcomes[op.slot] = Applied.APPLIED
                self._counts["applied"] += 1
            if not still:
                return True
            remaining = still
            return None

        await send_with_retries(
            what, send, cfg=cfg, breaker=self._breaker, gate=self._gate, counts=self._counts,
            redact=credentials.redact, final=final, answered=answered, refused=refused,
            credentials_refused=sink_credentials_refused, redirected=sink_redirected, busy=SINK_BUSY,
            between=between, log=log,
        )  # fmt: skip

    async def _settle(
        self,
        what: str,
        status: int,
        request: list[_Op],
        content: bytes,
        outcomes: list[Applied | Exception | None],
        applied: dict[str, int],
    ) -> None:
        """Record the outcome of each record of a 2xx answer (per-record results when set)."""
        for op, result in zip(request, read_results(self._config, content, len(request)), strict=True):
            if result.failed:
                answer = encode_json(result.answer)
                outcomes[op.slot] = self._refuse(what, status, op, answer, reason=result.reason or "refused")
                continue
            target_id = result.target_id if self._xref and op.kind != "delete" else None
            if op.kind == "create" and self._xref and target_id is None:
                log.warning("%s: answer has no id at results.id for key %r", what, op.record.key)
            with anyio.CancelScope(shield=True):  # the target has it: record it
                await self._store.record_applied(
                    op.record.key, op.record.version, deleted=op.record.deleted, guard=op.guard,
                    target_id=target_id,
                )  # fmt: skip
            applied[op.guard] = op.record.version
            outcomes[op.slot] = Applied.APPLIED
            self._counts["applied"] += 1

    def _refuse(
        self,
        what: str,
        status: int,
        op: _Op,
        answer: bytes,
        *,
        reason: str | None = None,
        integrity: bool = False,
    ) -> RejectedRecord | IntegrityPending:
        """A refusal of one record, carrying its request and the answer for the dead letter. A
        refused create is known not to have happened: its pending mark is dropped."""
        _, credentials = self._require()
        self._counts["rejected"] += 1
        if op.kind == "create" and self._xref:
            self._refused_creates.append(op.record.key)
        request = None if op.item is None else body_of(self._config, [op.item])
        why = reason if reason is not None else refusal_reason(self._config, answer)
        return refusal(what, status, why, request, answer, credentials.redact, integrity=integrity)


class _Op(NamedTuple):
    """One record's part of a request."""

    slot: int
    record: SinkRecord
    guard: str
    kind: Literal["create", "update", "delete"]
    method: str
    path: str
    params: dict[str, str]
    item: dict[str, Any] | None
    """Its object in the body (None: a request without body, DELETE)."""
    batchable: bool


def _batch_key(ids: list[str]) -> str:
    """The Idempotency-Key of a batch: the same records give the same key."""
    return "batch-" + hashlib.sha256("\n".join(ids).encode()).hexdigest()[:32]
