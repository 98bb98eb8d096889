"""An agent's side of reconciliation: answers :class:`~mesh.reconcile.models.ReconcileRequest`
on ``<prefix>.reconcile.<agent>`` for the flows it runs.

Each side hashes the **target form** of its records, the shape the sink writes:

* the sink reads its target's rows and hashes the columns its ``from_canonical`` mapping
  writes, as stored (no mapping at all, so nothing can be lost in an inverse mapping);
* the source reads its rows, maps each one exactly as the delivery path does (its own
  ``to_canonical``, then the sink's ``from_canonical`` carried in the request) and hashes the
  same columns. Comparing mapped forms rather than inverting the sink's mapping is what is
  correct: a mapping may drop or combine fields (``external_ids.erp`` never reaches the CRM), so
  an inverse would report differences the mesh can never repair.

Rows are read in chunks (keyset pagination in the adapter) and only per-bucket (count, XOR
hash) pairs are kept for ``digests``; ``records`` keeps only the records of the buckets asked
for. A request never fails silently: every error is an answer with ``ok = false`` and one line.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import msgspec

from mesh.config import FlowConfig
from mesh.errors import ConfigError, MappingError, MeshError
from mesh.flowdata import compile_flow_data
from mesh.mapping import Mapper, compile_mapping
from mesh.plugins import ReconcileAccess, RoleName, adapter_registry
from mesh.reconcile._hashing import Digests, bucket_of, field_hashes, record_hash, text_of
from mesh.reconcile.models import ReconcileReply, ReconcileRequest
from mesh.transport import Message

__all__ = ["ReconcileService"]

log = logging.getLogger(__name__)

_request = msgspec.json.Decoder(ReconcileRequest)
_encode = msgspec.json.Encoder().encode

MAX_CHUNK = 50_000
MAX_BUCKETS = 8192  # a digests answer of 8192 buckets is ~400 kB: under NATS' 1 MB limit


class _Side:
    """One flow side, ready to stream target-form records as ``(key, field hashes, raw row)``."""

    def __init__(
        self, cfg: FlowConfig, role: RoleName, access: ReconcileAccess, req: ReconcileRequest
    ) -> None:
        self.cfg, self.role, self.access, self.req = cfg, role, access, req
        self.adapter = cfg.source if role == "source" else cfg.sink
        self.chunks = 0
        self.to_canonical: Mapper | None = None
        self.from_canonical: Mapper | None = None

    async def prepare(self) -> None:
        if self.role != "source":
            return
        data = compile_flow_data(self.cfg, source=f"flow {self.cfg.name}", path=self.cfg.name)
        await data.open()
        self.to_canonical = data.to_canonical
        if self.req.mapping is not None:
            lookups = self.req.mapping.get("lookups") or {}
            if any(isinstance(lk, dict) and lk.get("sqlite") for lk in lookups.values()):
                # a path on the sink's host; the requester must not make this agent open files
                raise ConfigError(
                    f"flow {self.cfg.name}: the sink's mapping uses a SQLite lookup, which reconcile "
                    "cannot carry to the source agent (use inline values)"
                )
            self.from_canonical = compile_mapping(
                self.req.mapping, self.cfg.entity, "from_canonical", source="the sink's mapping",
                path=f"{self.cfg.name}.from_canonical",
            )  # fmt: skip
            await self.from_canonical.open()

    def target_form(self, row: dict[str, Any]) -> dict[str, Any]:
        if self.to_canonical is not None:
            row = self.to_canonical.map(row)
        if self.from_canonical is not None:
            row = self.from_canonical.map(row)
        return row

    async def records(self) -> AsyncIterator[tuple[str, dict[str, str], dict[str, Any]]]:
        """Every record as (key text, field hashes, the raw row); a source row its mapping
        refuses is skipped (it is in the dead-letter stream, not in the target: reported missing)."""
        assert self.adapter is not None
        key_field, fields = self.req.key_field, self.req.fields
        hashed = getattr(self.access, "scan_hashes", None)
        if self.role == "sink" and fields and hashed is not None:  # hashed by the database
            async for pairs in hashed(self.adapter, key_field, fields, self.req.chunk):
                self.chunks += 1
                for key, hashes in pairs:
                    yield key, hashes, {}
            return
        async for chunk in self.access.scan(self.adapter, self.role, self.req.chunk):
            self.chunks += 1
            for raw in chunk:
                try:
                    row = self.target_form(raw) if self.role == "source" else raw
                except MappingError as exc:
                    log.warning("reconcile %s: a %s row is not mapped: %s", self.cfg.name, self.role, exc)
                    continue
                key = row.get(key_field)
                if key is None:
                    continue
                yield str(text_of(key)), field_hashes(row, fields or sorted(row)), raw


class ReconcileService:
    """Answers reconciliation requests for the flows ``flows(name)`` returns (None: not run
    here). ``system`` is the agent's system (a source reports it as the origin)."""

    def __init__(self, name: str, system: str, flows: Callable[[str], FlowConfig | None]) -> None:
        self.name, self.system, self.flows = name, system, flows

    def __repr__(self) -> str:
        return f"<ReconcileService {self.name}>"

    async def answer(self, msg: Message) -> bytes:
        """The reply to one request: never raises (a failure is an ``ok = false`` reply)."""
        try:
            req = _request.decode(msg.data)
        except msgspec.DecodeError as exc:
            return _encode(ReconcileReply(ok=False, message=f"bad reconcile request: {exc}"))
        try:
            reply = await self._handle(req)
        except MeshError as exc:
            reply = ReconcileReply(ok=False, message=f"{req.op} on {self.name}: {exc}")
        except Exception as exc:  # an answer, whatever happened: the operator is waiting
            log.exception("reconcile %s %s failed", req.flow, req.op)
            reply = ReconcileReply(ok=False, message=f"{req.op} on {self.name} failed: {exc!r}")
        return _encode(reply)

    async def _handle(self, req: ReconcileRequest) -> ReconcileReply:
        cfg = self.flows(req.flow)
        if cfg is None:
            return ReconcileReply(ok=False, message=f"agent {self.name} does not run flow {req.flow!r}")
        if not (0 < req.chunk <= MAX_CHUNK and 0 < req.buckets <= MAX_BUCKETS):
            return ReconcileReply(ok=False, message=f"chunk must be 1..{MAX_CHUNK}, buckets 1..{MAX_BUCKETS}")
        sides = [s for s, a in (("source", cfg.source), ("sink", cfg.sink)) if a is not None]
        if not sides:
            return ReconcileReply(ok=False, message=f"flow {req.flow!r} has neither source nor sink here")
        if req.side and req.side not in sides:
            return ReconcileReply(
                ok=False, message=f"agent {self.name} runs no {req.side} of flow {req.flow!r}"
            )
        role: Literal["source", "sink"] = req.side or ("source" if cfg.source is not None else "sink")
        adapter = cfg.source if role == "source" else cfg.sink
        assert adapter is not None  # role is one of sides
        access = adapter_registry().reconcile_of(adapter)
        if access is None:
            tag = type(adapter).__struct_config__.tag
            return ReconcileReply(ok=False, message=f"adapter {tag!r} of flow {req.flow!r} cannot reconcile")
        if req.op == "describe":
            return msgspec.structs.replace(self._describe(cfg, role, req.origin), sides=sides)
        side = _Side(cfg, role, access, req)
        await side.prepare()
        if req.op == "digests":
            digests = Digests(req.buckets)
            count = 0
            async for key, hashes, _ in side.records():
                digests.add(key, record_hash(hashes))
                count += 1
            return ReconcileReply(side=role, digests=digests.as_wire(), count=count, chunks=side.chunks)
        if req.op == "records":
            wanted = set(req.select)
            records = {
                key: hashes
                async for key, hashes, _ in side.records()
                if bucket_of(key, req.buckets) in wanted
            }
            return ReconcileReply(side=role, records=records, count=len(records), chunks=side.chunks)
        if req.op == "restamp":
            if role != "source":
                return ReconcileReply(ok=False, message=f"restamp goes to the source of {req.flow!r}")
            keys = set(req.keys)
            raw_keys = [raw[_source_key(cfg)] async for key, _, raw in side.records() if key in keys]
            done = await access.restamp(adapter, raw_keys) if raw_keys else 0
            log.info("reconcile %s: re-emitted %d record(s) for repair", req.flow, done)
            return ReconcileReply(side=role, done=done, chunks=side.chunks)
        if req.op == "delete":
            if role != "sink":
                return ReconcileReply(ok=False, message=f"delete goes to a sink of {req.flow!r}")
            if not _may_delete(cfg, req.origin):
                return ReconcileReply(
                    ok=False, side=role,
                    message=f"flow {req.flow!r}: ownership does not let {req.origin!r} delete here",
                )  # fmt: skip
            done = await access.delete(adapter, req.keys)
            log.info("reconcile %s: deleted %d extra record(s) for repair", req.flow, done)
            return ReconcileReply(side=role, done=done)
        return ReconcileReply(ok=False, message=f"unknown op {req.op!r}")  # pragma: no cover

    def _describe(self, cfg: FlowConfig, role: Literal["source", "sink"], origin: str) -> ReconcileReply:
        if role == "source":
            return ReconcileReply(side=role, system=self.system)
        access = adapter_registry().reconcile_of(cfg.sink) if cfg.sink is not None else None
        key_of = getattr(access, "key_field", None)
        key = key_of(cfg.sink) if key_of is not None else getattr(cfg.sink, "key", None)
        if not isinstance(key, str):
            return ReconcileReply(
                ok=False, message=f"flow {cfg.name!r}: reconcile needs a single sink key column"
            )
        mapping = msgspec.to_builtins(cfg.from_canonical) if cfg.from_canonical is not None else None
        fields = sorted(cfg.from_canonical.fields) if cfg.from_canonical is not None else []
        if origin and cfg.ownership is not None and cfg.from_canonical is not None:
            fields = _owned(cfg, origin, fields)
        return ReconcileReply(side=role, system=self.system, key_field=key, fields=fields, mapping=mapping)


def _owned(cfg: FlowConfig, origin: str, fields: list[str]) -> list[str]:
    """The target fields whose canonical source ``origin`` may write (the others are set by
    other systems: comparing them would report drift that is none). Constants count as owned."""
    assert cfg.from_canonical is not None
    data = compile_flow_data(cfg, source=f"flow {cfg.name}", path=cfg.name)
    if data.ownership is None:
        return fields
    out = []
    for f in fields:
        rule = cfg.from_canonical.fields[f]
        path = rule if isinstance(rule, str) else rule.source
        if path is None or path == "id" or data.ownership.writable(cfg.entity, origin, [path])[0]:
            out.append(f)
    return out


def _source_key(cfg: FlowConfig) -> str:
    key = getattr(cfg.source, "key", None)
    if not isinstance(key, str):
        raise MeshError(f"flow {cfg.name!r}: repair needs a single source key column")
    return key


def _may_delete(cfg: FlowConfig, origin: str) -> bool:
    if cfg.ownership is None:
        return True
    data = compile_flow_data(cfg, source=f"flow {cfg.name}", path=cfg.name)
    if data.ownership is None:
        return True
    return data.ownership.decide(cfg.entity, origin, {}, deleted=True).may_delete
