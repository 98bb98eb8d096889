"""The control plane's security side (``security_dir`` set): enrollment tokens, agents' user
JWTs and the revocation list.

* **Tokens.** :meth:`Enrollment.create_token` makes a one-time token for one agent name
  (:meth:`~mesh.security.authority.Authority.enrollment_token`) and records ``token.<id>`` in
  ``mesh_agents`` (:class:`~mesh.controlplane.models.TokenRecord`: name, systems, expiry, who
  created it; never the token itself). :meth:`Enrollment.claim` marks it used by
  compare-and-swap, so a token works once even if two registrations race.
* **User JWTs.** :meth:`Enrollment.issue` signs an agent's JWT with exactly the permissions of
  :func:`agent_permissions` for its systems and flows (:func:`agent_grants`); the flow store
  re-issues it into the agent's assignment whenever they change.
* **Revocations.** :meth:`Enrollment.revoke_key` adds a user public key to the list kept in
  ``mesh_agents`` under ``security.revocations`` (CAS), re-signs the MESH account JWT with the
  whole list and pushes it to nats-server through a SYS-account connection opened on first use
  (the server disconnects the key's connections at once). :meth:`Enrollment.push` re-pushes the
  full list (at control-plane start: a server restarted with an older resolver copy gets it again).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable
from pathlib import Path

import anyio
import msgspec

from mesh.config import NatsConfig
from mesh.controlplane.kv import Bucket, Entry, KvMirror, RevisionConflict
from mesh.controlplane.models import (
    AgentRecord,
    AssignedFlow,
    Refused,
    TokenCreate,
    TokenCreated,
    TokenRecord,
    Tokens,
    TokenView,
    encode,
)
from mesh.errors import ConfigError, TransportError
from mesh.security.authority import Authority, push_account
from mesh.security.jwt import InvalidToken, Permissions, public_key
from mesh.security.permissions import agent_permissions
from mesh.transport import JetStream, Transport

__all__ = ["REVOCATIONS_KEY", "Enrollment", "agent_grants", "token_key"]

log = logging.getLogger(__name__)

REVOCATIONS_KEY = "security.revocations"
_token = msgspec.json.Decoder(TokenRecord)
_revocations = msgspec.json.Decoder(dict[str, int])
_ATTEMPTS = 5


def token_key(token_id: str) -> str:
    return f"token.{token_id}"


def agent_grants(rec: AgentRecord, flows: Iterable[AssignedFlow]) -> tuple[list[str], list[str], list[str]]:
    """(systems, consumers, flows) agent ``rec`` is granted: the systems of its enrollment
    token; its static flows (manifest) only when its system is one of them; every assigned flow
    (an operator applied it), whose source side adds the agent's system. Consumers are
    ``<flow>-<the agent's system>`` for each flow it sinks."""
    m = rec.manifest
    system = m.system or (rec.systems[0] if len(rec.systems) == 1 else "")
    systems = set(rec.systems)
    consumers: set[str] = set()
    names: set[str] = set()
    if system and system in rec.systems:
        names |= set(m.sources) | set(m.sinks)
        consumers |= {f"{f}-{system}" for f in m.sinks}
    for f in flows:
        names.add(f.name)
        if f.config.get("source") is not None and system:
            systems.add(system)
        if f.config.get("sink") is not None and system:
            consumers.add(f"{f.name}-{system}")
    return sorted(systems), sorted(consumers), sorted(names)


class Enrollment:
    """The security side of one control-plane replica (see the module doc)."""

    def __init__(
        self,
        authority: Authority,
        agents: Bucket,
        mirror: KvMirror,
        *,
        nats: NatsConfig,
        prefix: str,
    ) -> None:
        """``nats``: the replica's NATS settings; the SYS connection uses them with the security
        dir's ``creds/sys.creds``."""
        self.authority = authority
        self.bucket = agents
        self.mirror = mirror
        self.prefix = prefix
        self._sys_cfg = msgspec.structs.replace(
            nats, creds=str(Path(authority.directory, "creds", "sys.creds").absolute()), inbox_prefix=None
        )
        self._sys: Transport | None = None
        self._pushing = anyio.Lock()  # one push at a time, one SYS connection

    def __repr__(self) -> str:
        return f"<Enrollment {self.authority.directory}>"

    async def aclose(self) -> None:
        """Close the SYS connection, if one was opened. Idempotent."""
        sys, self._sys = self._sys, None
        if sys is not None:
            await sys.aclose()

    # --- tokens --------------------------------------------------------------------------------

    async def create_token(self, req: TokenCreate) -> TokenCreated | Refused:
        """Make and record a one-time token for ``req.name`` (refused for a revoked agent)."""
        current = await self.bucket.get(f"agent.{req.name}")
        if current is not None:
            rec = msgspec.json.decode(current.value, type=AgentRecord)
            if rec.state == "revoked":
                why = f"agent {req.name!r} is revoked: deregister it before enrolling it again"
                return Refused(code="revoked", reason=why)
        try:
            token, token_id = self.authority.enrollment_token(req.name, req.ttl, self.prefix)
        except ConfigError as exc:
            return Refused(code="invalid", reason=str(exc))
        now = time.time()
        record = TokenRecord(
            token_id=token_id,
            name=req.name,
            systems=sorted(set(req.systems)),
            expires=now + req.ttl,
            created_at=now,
            created_by=req.actor or "unknown",
        )
        key, value = token_key(token_id), encode(record)
        self.mirror.apply(Entry(key, value, await self.bucket.create(key, value)))
        return TokenCreated(token=token, token_id=token_id, name=req.name, expires=int(record.expires))

    def tokens(self) -> Tokens:
        """Every recorded token (from the mirror), newest first."""
        out = []
        for e in self.mirror.with_prefix("token.").values():
            try:
                t = _token.decode(e.value)
            except msgspec.DecodeError:
                continue
            out.append(TokenView(
                token_id=t.token_id, name=t.name, systems=t.systems, expires=t.expires,
                created_at=t.created_at, created_by=t.created_by, used=t.used,
            ))  # fmt: skip
        out.sort(key=lambda t: -t.created_at)
        return Tokens(tokens=out)

    async def claim(self, token_id: str, name: str) -> TokenRecord | Refused:
        """Mark token ``token_id`` used for agent ``name`` (compare-and-swap: once only).

        Refused (``unauthorized``) when it is unknown, for another name, used or expired."""
        key = token_key(token_id)
        for _ in range(_ATTEMPTS):
            current = await self.bucket.get(key)
            if current is None:
                return Refused(code="unauthorized", reason="unknown enrollment token: ask for a new one")
            rec = _token.decode(current.value)
            if rec.name != name:
                why = f"the enrollment token is for agent {rec.name!r}, not {name!r}"
                return Refused(code="unauthorized", reason=why)
            if rec.used:
                when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(rec.used_at or 0))
                why = f"the enrollment token for {name} was already used (at {when}): ask for a new one"
                return Refused(code="unauthorized", reason=why)
            now = time.time()
            if rec.expires <= now:
                when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(rec.expires))
                why = f"the enrollment token for {name} expired at {when}: ask for a new one"
                return Refused(code="unauthorized", reason=why)
            used = msgspec.structs.replace(rec, used=True, used_at=now)
            value = encode(used)
            try:
                revision = await self.bucket.update(key, value, current.revision)
            except RevisionConflict:
                continue
            self.mirror.apply(Entry(key, value, revision))
            return used
        return Refused(code="internal", reason=f"the enrollment token for {name} kept changing; try again")

    # --- user JWTs -----------------------------------------------------------------------------

    def permissions(self, rec: AgentRecord, flows: Iterable[AssignedFlow]) -> Permissions:
        systems, consumers, names = agent_grants(rec, flows)
        m = rec.manifest
        apis = [m.system] if m.operations and m.system and m.system in rec.systems else []
        return agent_permissions(rec.name, systems, consumers, names, self.prefix, apis=apis)

    def issue(self, rec: AgentRecord, flows: Iterable[AssignedFlow]) -> tuple[str, str]:
        """(user JWT, digest of what it grants) for agent ``rec`` running ``flows``.

        Raises:
            ConfigError: a name that is not one subject token. InvalidToken: no public key.
        """
        perms = self.permissions(rec, flows)
        jwt = self.authority.issue_user(rec.name, rec.public_key, perms)
        return jwt, self.grant_digest(rec, perms)

    @staticmethod
    def grant_digest(rec: AgentRecord, perms: Permissions) -> str:
        data = msgspec.json.encode([rec.public_key, perms], order="sorted")
        return hashlib.sha256(data).hexdigest()

    def wanted_digest(self, rec: AgentRecord, flows: Iterable[AssignedFlow]) -> str:
        return self.grant_digest(rec, self.permissions(rec, flows))

    @staticmethod
    def check_public_key(key: str | None) -> str | None:
        """Why ``key`` is not a user public key (None when it is)."""
        if not key:
            return "no public key sent"
        try:
            public_key(key, "user")
        except InvalidToken as exc:
            return str(exc)
        return None

    # --- revocations ---------------------------------------------------------------------------

    def revocations(self) -> dict[str, int]:
        entry = self.mirror.get(REVOCATIONS_KEY)
        if entry is None or not entry.value:
            return {}
        try:
            return _revocations.decode(entry.value)
        except msgspec.DecodeError:
            return {}

    async def revoke_key(self, key: str) -> str:
        """Add user public key ``key`` to the revocation list (its JWTs issued until now are
        refused) and push the account JWT. Returns "" or why the push failed (the list is
        stored either way; the next push carries it)."""
        for _ in range(_ATTEMPTS):
            current = await self.bucket.get(REVOCATIONS_KEY)
            revoked = _revocations.decode(current.value) if current is not None and current.value else {}
            revoked[key] = int(time.time())
            value = msgspec.json.encode(dict(sorted(revoked.items())))
            try:
                if current is None:
                    revision = await self.bucket.create(REVOCATIONS_KEY, value)
                else:
                    revision = await self.bucket.update(REVOCATIONS_KEY, value, current.revision)
            except RevisionConflict:
                continue
            self.mirror.apply(Entry(REVOCATIONS_KEY, value, revision))
            break
        else:
            return "the revocation list kept changing; run the command again"
        return await self.push()

    async def push(self) -> str:
        """Push the MESH account JWT with the whole revocation list (read from KV). Returns ""
        or why it failed (one line)."""
        try:
            async with self._pushing:
                current = await self.bucket.get(REVOCATIONS_KEY)
                revoked = _revocations.decode(current.value) if current is not None and current.value else {}
                account = self.authority.revoked_account_jwt(revoked)
                if self._sys is None:
                    sys = JetStream(self._sys_cfg, name="control-plane:sys")
                    await sys.connect()
                    self._sys = sys
                await push_account(self._sys, account)
        except (TransportError, ConfigError, InvalidToken, msgspec.DecodeError) as exc:
            log.error("could not push the MESH account JWT (revocations) to nats-server: %s", exc)
            return f"could not push the revocation list to nats-server: {exc}"
        log.info("MESH account JWT pushed (%d revoked key(s))", len(revoked))
        return ""
