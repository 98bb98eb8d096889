"""The agent registry: what the leader does with register, deregister, revoke and heartbeat.

State lives in bucket ``mesh_agents``: ``agent.<name>`` holds the :class:`AgentRecord`,
``heartbeat.<name>`` the last accepted :class:`HeartbeatRecord`. Guarantees:

* **Registration is idempotent per identity.** The same name with the same identity token
  returns the same agent id; the credential the agent already holds is kept (a new one is
  issued only when the agent does not present a valid one). The same name with another
  identity is refused (``conflict``) until an operator deregisters it.
* **Every change is a compare-and-swap** on the record's revision, so two leaders overlapping
  for a moment, or two requests racing, cannot lose an update; a lost race is re-read and
  decided again.
* **Refusals are answers, not errors**: an unknown agent, a revoked one or a bad credential
  gets a :class:`Refused` reply naming the cause; its heartbeat is not stored.
* Every registration, deregistration and revocation is appended to the audit stream after the
  change is stored (an audit failure is logged and counted, the change stands).
* Secrets are compared in constant time and stored only as SHA-256 digests.
* **Heartbeats are kept in memory and stored when they matter.** The newest accepted heartbeat
  of every agent is in :attr:`Registry.latest` (the leader's own views read it, so the leader's
  ``/status`` is as fresh as the last heartbeat); ``heartbeat.<name>`` in KV is written (and the
  reply sent after it is stored) for the first heartbeat this replica accepts from an agent
  (after every change of role), whenever something a verdict or a flow view depends on changes
  (the agent's reported health or detail, new errors, an outbox crossing ``max_outbox_age``,
  its version, its flows' states or generations), and at least every ``store_every`` seconds
  otherwise. So the other replicas (and a new leader after failover) see every health-relevant
  change as before, and counters and heartbeat times at most ``store_every`` seconds old: a
  follower may call an agent that stopped stale or lost up to ``store_every`` seconds earlier
  than the leader does. This cut the KV writes (and the watch deliveries to every replica) by
  ``store_every / interval``: at 5,000 agents beating every second, 5,000 writes/s became ~1,000.
  The writes due in one loop turn are sent as one batch (:meth:`Bucket.put_many`), each reply
  still after its own write is acknowledged.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel
import msgspec

from mesh.controlplane.health import HealthPolicy
from mesh.controlplane.kv import Bucket, Entry, KvMirror, RevisionConflict
from mesh.controlplane.models import (
    AgentRecord,
    Deregister,
    Done,
    Heartbeat,
    HeartbeatAck,
    HeartbeatRecord,
    Refused,
    Register,
    Registered,
    Revoke,
    digest,
    encode,
)
from mesh.errors import TransportError

if TYPE_CHECKING:
    from mesh.controlplane.enroll import Enrollment

__all__ = ["STORE_EVERY", "AuditFn", "Registry", "agent_key", "heartbeat_key", "material"]

log = logging.getLogger(__name__)

AuditFn = Callable[[str, str, str, str, dict[str, str]], Awaitable[object]]
"""``audit(kind, who, target, what, detail)``."""

_record = msgspec.json.Decoder(AgentRecord)
_heartbeat = msgspec.json.Decoder(HeartbeatRecord)
_ATTEMPTS = 5
STORE_EVERY = 5.0
"""Seconds between two KV writes of an agent's heartbeat when nothing that matters changed
(at most a third of ``stale_after``)."""


def agent_key(name: str) -> str:
    return f"agent.{name}"


def heartbeat_key(name: str) -> str:
    return f"heartbeat.{name}"


def _same(secret: str, stored_digest: str) -> bool:
    return hmac.compare_digest(digest(secret), stored_digest)


class Registry:
    """Leader-side registry operations on one bucket (and the replica's mirror of it)."""

    def __init__(
        self,
        bucket: Bucket,
        *,
        replica: str,
        mirror: KvMirror | None = None,
        audit: AuditFn | None = None,
        on_audit_failure: Callable[[], None] | None = None,
        security: Enrollment | None = None,
        policy: HealthPolicy | None = None,
        store_every: float = STORE_EVERY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``security``: security on (registration needs an enrollment token or the agent's
        known public key; deregistration and revocation revoke its key); None: off.
        ``policy``: the health timers (``max_outbox_age`` decides when an outbox's age
        matters); ``store_every``: see the module's guarantees (capped at a third of
        ``policy.stale_after``); ``clock``: wall-clock time (``received_at``)."""
        self.security = security
        self.bucket = bucket
        self.replica = replica
        self.mirror = mirror
        self._audit = audit
        self._on_audit_failure = on_audit_failure
        self._records: dict[str, tuple[int, AgentRecord]] = {}
        """Decoded agent records by KV revision (a heartbeat must not decode one each time)."""
        self._errors: dict[str, tuple[int, str, int]] = {}
        """Per agent: (heartbeat revision, agent id, error count) of the last heartbeat stored."""
        self.policy = policy or HealthPolicy()
        self.store_every = max(0.0, min(store_every, self.policy.stale_after / 3))
        self.clock = clock
        self.latest: dict[str, HeartbeatRecord] = {}
        """The newest heartbeat this replica accepted per agent (stored or not)."""
        self._written: dict[str, tuple[HeartbeatRecord, tuple[object, ...]]] = {}
        """The last heartbeat this replica stored per agent (since its last change of role),
        with its :func:`material`."""
        self.writes = 0
        self._batch: list[tuple[str, bytes, asyncio.Future[int | None]]] = []
        """Heartbeats stored in KV so far (the rest were kept in memory only)."""

    def __repr__(self) -> str:
        return f"<Registry {self.bucket.name} via {self.replica}>"

    async def _audit_entry(self, kind: str, who: str, target: str, what: str, detail: dict[str, str]) -> None:
        if self._audit is None:
            return
        try:
            await self._audit(kind, who, target, what, detail)
        except TransportError as exc:
            log.error("audit: %s (the %s of %s stands)", exc, kind, target)
            if self._on_audit_failure is not None:
                self._on_audit_failure()

    def _stored(self, key: str, value: bytes, revision: int) -> None:
        if self.mirror is not None:
            self.mirror.apply(Entry(key, value, revision))

    def _removed(self, key: str, revision: int) -> None:
        if self.mirror is not None:
            self.mirror.forget(key, revision)

    async def _cached(self, key: str) -> Entry | None:
        """The mirror's copy when it has one (heartbeats: hot path), else a KV read."""
        if self.mirror is not None:
            entry = self.mirror.get(key)
            if entry is not None:
                return entry
        return await self.bucket.get(key)

    async def _enroll(self, req: Register) -> tuple[str, list[str] | None] | Refused:
        """Security on: (the agent's public key, the systems of the token it used or None when
        it needs none: its known key), or why it may not register."""
        assert self.security is not None
        why = self.security.check_public_key(req.public_key)
        if why is not None:
            return Refused(
                code="invalid",
                reason=f"security is on: registering {req.name} needs its NATS public key and an "
                f"enrollment token (`meshctl agent token create --name {req.name}`, then "
                f"`meshctl agent register --token ...`): {why}",
            )
        assert req.public_key is not None
        current = await self.bucket.get(agent_key(req.name))
        if current is not None:
            rec = _record.decode(current.value)
            if rec.state == "revoked":
                why = _revoked(rec) + "; deregister it before registering again"
                return Refused(code="revoked", reason=why)
            if rec.public_key == req.public_key:
                return req.public_key, None
        if not req.enrollment:
            what = "a new public key" if current is not None else "a new agent"
            return Refused(
                code="unauthorized",
                reason=f"{req.name} registers with {what}: that needs an enrollment token "
                f"(`meshctl agent token create --name {req.name}`, then "
                "`meshctl agent register --token ...`)",
            )
        claimed = await self.security.claim(req.enrollment, req.name)
        if isinstance(claimed, Refused):
            return claimed
        return req.public_key, claimed.systems

    async def register(self, req: Register) -> Registered | Refused:
        key = agent_key(req.name)
        pk = ""
        systems: list[str] | None = None
        if self.security is None and req.enrollment:
            return Refused(
                code="invalid",
                reason="security is off on this control plane (no --security-dir): it issues no "
                "NATS credentials; register without --token",
            )
        if self.security is not None:
            enrolled = await self._enroll(req)
            if isinstance(enrolled, Refused):
                return enrolled
            pk, systems = enrolled
        for _ in range(_ATTEMPTS):
            current = await self.bucket.get(key)
            now = time.time()
            # With security on the broker authenticates the agent's heartbeats (only its user may
            # publish on its heartbeat subject): no second, bearer-token credential is issued.
            token = secrets.token_urlsafe(32) if self.security is None else ""
            if current is None:
                if self.security is not None and systems is None:
                    return Refused(code="unknown", reason=f"agent {req.name} was deregistered meanwhile")
                rec = AgentRecord(
                    agent_id=uuid.uuid4().hex,
                    name=req.name,
                    site=req.site,
                    host=req.host,
                    version=req.version,
                    identity=digest(req.identity),
                    credential=digest(token),
                    manifest=req.manifest,
                    registered_at=now,
                    updated_at=now,
                    public_key=pk,
                    systems=systems or [],
                )
                value = encode(rec)
                try:
                    revision = await self.bucket.create(key, value)
                except RevisionConflict:
                    continue
                self._stored(key, value, revision)
                what = (
                    f"registered agent {req.name} (site {req.site}, host {req.host}, version {req.version})"
                )
                log.info("%s by %s", what, req.actor or "unknown")
                await self._audit_entry("register", req.actor, req.name, what, _details(rec))
                return Registered(
                    agent_id=rec.agent_id,
                    name=req.name,
                    credential=token,
                    created=True,
                    message=f"registered {req.name} as {rec.agent_id}",
                )
            rec = _record.decode(current.value)
            # With security on, the broker vouches for the caller, and a token (or its key)
            # for this name is the operator's consent: the identity token does not decide.
            if self.security is None and not _same(req.identity, rec.identity):
                return Refused(
                    code="conflict",
                    reason=f"agent name {req.name!r} is already registered by another identity (agent id "
                    f"{rec.agent_id}, host {rec.host}, site {rec.site}); deregister it first "
                    f"(`meshctl agent deregister {req.name}`) or choose another name",
                )
            if rec.state == "revoked":
                return Refused(
                    code="revoked", reason=_revoked(rec) + "; deregister it before registering again"
                )
            keep = req.credential is not None and _same(req.credential, rec.credential)
            new = msgspec.structs.replace(
                rec,
                site=req.site,
                host=req.host,
                version=req.version,
                manifest=req.manifest,
                updated_at=now,
                credential=rec.credential if keep else digest(token),
                identity=digest(req.identity) if self.security is not None else rec.identity,
                public_key=pk or rec.public_key,
                systems=rec.systems if systems is None else systems,
            )
            value = encode(new)
            try:
                revision = await self.bucket.update(key, value, current.revision)
            except RevisionConflict:
                continue
            self._stored(key, value, revision)
            if self.security is not None and rec.public_key and rec.public_key != new.public_key:
                problem = await self.security.revoke_key(rec.public_key)  # the old key is done
                if problem:
                    log.error("agent %s: old key not revoked: %s", req.name, problem)
            how = "credential kept" if keep else "new credential issued"
            what = f"re-registered agent {req.name} (same identity, {how})"
            log.info("%s by %s", what, req.actor or "unknown")
            await self._audit_entry("register", req.actor, req.name, what, _details(new))
            return Registered(
                agent_id=rec.agent_id,
                name=req.name,
                credential=None if keep else token,
                created=False,
                message=f"{req.name} already registered as {rec.agent_id}; {how}",
            )
        return Refused(
            code="internal", reason=f"registration of {req.name} kept racing other changes; try again"
        )

    async def deregister(self, req: Deregister) -> Done | Refused:
        key = agent_key(req.name)
        for _ in range(_ATTEMPTS):
            current = await self.bucket.get(key)
            if current is None:
                return Refused(code="unknown", reason=f"no agent named {req.name!r} is registered")
            rec = _record.decode(current.value)
            try:
                await self.bucket.delete(key, revision=current.revision)
            except RevisionConflict:
                continue
            self._removed(key, current.revision)
            hb = await self.bucket.get(heartbeat_key(req.name))
            if hb is not None:
                await self.bucket.delete(heartbeat_key(req.name))
                self._removed(heartbeat_key(req.name), hb.revision)
            self.latest.pop(req.name, None)
            self._written.pop(req.name, None)
            what = f"deregistered agent {req.name} ({rec.agent_id})"
            what += await self._revoke_key(rec)
            log.info("%s by %s", what, req.actor or "unknown")
            await self._audit_entry("deregister", req.actor, req.name, what, _details(rec))
            return Done(message=what)
        return Refused(code="internal", reason=f"deregistration of {req.name} kept racing other changes")

    async def revoke(self, req: Revoke) -> Done | Refused:
        key = agent_key(req.name)
        for _ in range(_ATTEMPTS):
            current = await self.bucket.get(key)
            if current is None:
                return Refused(code="unknown", reason=f"no agent named {req.name!r} is registered")
            rec = _record.decode(current.value)
            if rec.state == "revoked":
                return Done(message=f"{_revoked(rec)} (nothing to do)")
            now = time.time()
            new = msgspec.structs.replace(
                rec,
                state="revoked",
                revoked_at=now,
                revoked_by=req.actor or "unknown",
                revoke_reason=req.reason,
                updated_at=now,
            )
            value = encode(new)
            try:
                revision = await self.bucket.update(key, value, current.revision)
            except RevisionConflict:
                continue
            self._stored(key, value, revision)
            what = f"revoked agent {req.name} ({rec.agent_id})" + (f": {req.reason}" if req.reason else "")
            what += await self._revoke_key(rec)
            log.warning("%s by %s", what, req.actor or "unknown")
            await self._audit_entry(
                "revoke", req.actor, req.name, what, {**_details(rec), "reason": req.reason}
            )
            return Done(message=what)
        return Refused(code="internal", reason=f"revocation of {req.name} kept racing other changes")

    async def _revoke_key(self, rec: AgentRecord) -> str:
        """Security on: revoke the agent's NATS key (the server drops its connections); what to
        add to the message (the push failure, if any)."""
        if self.security is None or not rec.public_key:
            return ""
        problem = await self.security.revoke_key(rec.public_key)
        return f" (NATS key revoked{'; ' + problem if problem else ''})"

    def heartbeat_now(self, req: Heartbeat) -> HeartbeatAck | Refused | None:
        """:meth:`heartbeat` when it needs no I/O: the refusal, or the ack of a heartbeat kept
        in memory; None when the heartbeat must be stored now (or the agent's record is not in
        the mirror): then :meth:`heartbeat` decides."""
        current = self.mirror.get(agent_key(req.name)) if self.mirror is not None else None
        if current is None:
            return None
        checked = self._check(req, current)
        if checked is not None:
            return checked
        hb = self._record(req)
        if self._due(hb):
            return None
        self._keep(hb)
        return HeartbeatAck(seq=req.seq, leader=self.replica)

    async def heartbeat(self, req: Heartbeat) -> HeartbeatAck | Refused:
        """Accept (or refuse) one heartbeat; store it when due (see the module's guarantees).

        Raises:
            TransportError: the KV store could not be read or written.
        """
        current = await self._cached(agent_key(req.name))
        if current is None:
            return Refused(
                code="unknown",
                reason=f"agent {req.name!r} is not registered: register it (`meshctl agent register`)",
            )
        checked = self._check(req, current)
        if checked is not None:
            return checked
        hb = self._record(req)
        if self._due(hb):
            key, value = heartbeat_key(req.name), encode(hb)
            revision = await self._put(key, value)
            if revision is None:
                raise TransportError(f"KV {self.bucket.name}: storing {key} was not acknowledged")
            self._stored(key, value, revision)
            self._written[req.name] = (hb, material(hb, self.policy))
            self.writes += 1
            if len(self._errors) > 4 * len(self._records) + 64:
                self._errors.clear()  # agents deregistered long ago: start again (bounded memory)
            self._errors[req.name] = (revision, req.agent_id, req.payload.errors)
        self._keep(hb)
        return HeartbeatAck(seq=req.seq, leader=self.replica)

    async def _put(self, key: str, value: bytes) -> int | None:
        """Store one heartbeat together with the others due in the same loop turn (one
        :meth:`~mesh.transport.Bucket.put_many`: one write, no request each); its revision,
        None when it was not stored."""
        done: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._batch.append((key, value, done))
        if len(self._batch) == 1:  # the first of this turn sends the turn's batch
            with anyio.CancelScope(shield=True):  # bounded by the bucket's timeout
                await anyio.lowlevel.checkpoint()  # the other handlers of this turn add theirs
                batch, self._batch = self._batch, []
                try:
                    revisions = await self.bucket.put_many([(k, v) for k, v, _ in batch])
                except Exception as exc:  # put_many reports per item; anything else: none stored
                    log.warning(
                        "KV %s: storing %d heartbeat(s) failed: %s", self.bucket.name, len(batch), exc
                    )
                    revisions = [None] * len(batch)
                for (_, _, waiting), revision in zip(batch, revisions, strict=True):
                    if not waiting.done():
                        waiting.set_result(revision)
        return await done

    def _check(self, req: Heartbeat, current: Entry) -> Refused | None:
        """Why the heartbeat is refused (None: accepted), given the agent's stored record."""
        cached = self._records.get(req.name)
        if cached is not None and cached[0] == current.revision:
            rec = cached[1]
        else:
            rec = _record.decode(current.value)
            self._records[req.name] = (current.revision, rec)
        if rec.agent_id != req.agent_id:
            return Refused(
                code="unknown",
                reason=f"agent id {req.agent_id} is not registered under {req.name!r} (it was "
                f"deregistered and the name registered again?); register this agent again",
            )
        if rec.state == "revoked":
            return Refused(code="revoked", reason=_revoked(rec))
        authenticated = self.security is not None and bool(rec.public_key)  # by NATS itself
        if not authenticated and not _same(req.credential, rec.credential):
            return Refused(
                code="unauthorized", reason=f"bad credential for agent {req.name!r}; register it again"
            )
        return None

    def _record(self, req: Heartbeat) -> HeartbeatRecord:
        """The record of an accepted heartbeat (errors grown since the previous one)."""
        delta = 0
        mine = self.latest.get(req.name)
        previous = (
            (mine.agent_id, mine.payload.errors) if mine is not None else self._previous_errors(req.name)
        )
        if previous is not None and previous[0] == req.agent_id:
            delta = max(0, req.payload.errors - previous[1])
        return HeartbeatRecord(
            agent_id=req.agent_id,
            name=req.name,
            seq=req.seq,
            received_at=self.clock(),
            sent_at=req.sent_at,
            interval=req.interval,
            version=req.version,
            payload=req.payload,
            errors_delta=delta,
        )

    def _keep(self, hb: HeartbeatRecord) -> None:
        self.latest[hb.name] = hb
        if len(self._records) > 100_000:
            self._records.clear()
        if len(self.latest) > 100_000:  # names of agents deregistered by other leaders
            self.latest.clear()
            self._written.clear()

    def _due(self, hb: HeartbeatRecord) -> bool:
        """Whether ``hb`` must be stored now (see the module's guarantees)."""
        written = self._written.get(hb.name)
        if written is None:
            return True
        last, stored = written
        if last.agent_id != hb.agent_id:
            return True
        if hb.received_at - last.received_at >= self.store_every or hb.received_at < last.received_at:
            return True
        return material(hb, self.policy) != stored

    def role_changed(self) -> None:
        """This replica became or stopped being the leader: forget the heartbeats held in
        memory (a new leader's are newer) and store the next one of every agent."""
        self.latest.clear()
        self._written.clear()

    def _previous_errors(self, name: str) -> tuple[str, int] | None:
        """(agent id, error count) of the agent's stored heartbeat: remembered when this replica
        stored it (and the mirror still holds that revision), else decoded from the mirror."""
        entry = self.mirror.get(heartbeat_key(name)) if self.mirror is not None else None
        if entry is None:
            return None
        known = self._errors.get(name)
        if known is not None and known[0] == entry.revision:
            return known[1], known[2]
        try:
            hb = _heartbeat.decode(entry.value)
        except msgspec.DecodeError:
            return None
        return hb.agent_id, hb.payload.errors


def material(hb: HeartbeatRecord, policy: HealthPolicy) -> tuple[object, ...]:
    """What of a heartbeat a health verdict or a flow's state depends on (besides its time):
    a heartbeat that changes it is stored at once."""
    p = hb.payload
    flows = tuple((f.name, f.state, f.generation, f.detail) for f in p.flows)
    late = p.outbox_age_seconds > policy.max_outbox_age
    return (hb.version, p.health, p.detail, hb.errors_delta > 0, late, flows)


def _revoked(rec: AgentRecord) -> str:
    by = f" by {rec.revoked_by}" if rec.revoked_by else ""
    reason = f" ({rec.revoke_reason})" if rec.revoke_reason else ""
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(rec.revoked_at or 0))
    return f"agent {rec.name!r} was revoked{by} at {when}{reason}"


def _details(rec: AgentRecord) -> dict[str, str]:
    return {
        "agent_id": rec.agent_id,
        "site": rec.site,
        "host": rec.host,
        "version": rec.version,
        "adapters": ",".join(rec.manifest.adapters),
        "operations": ",".join(rec.manifest.operations),
    }
