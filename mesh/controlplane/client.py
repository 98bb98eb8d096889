"""Talk to the control plane over NATS request/reply (used by ``meshctl`` and the agents).

Every request goes to ``<prefix>.<kind>.<caller>``: the caller (an operator's name, or the
agent's own for its registration and heartbeats) is a subject token, so the broker's
permissions decide who may send what, and the control plane records that token, not a name
the body claims.

Guarantees: every request is bounded by ``timeout``. While no replica serves a subject (no
control plane running, or a leader election in progress after a failover) the client keeps
asking until the deadline, so a request sent during a failover lands on the new leader. A refusal
raises :class:`RequestRefused` with the control plane's code and reason; transport trouble raises
:class:`~mesh.errors.TransportError`. Nothing is retried after the control plane has answered.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

from mesh.controlplane.identity import Credentials, load_or_create_identity
from mesh.controlplane.models import (
    Agents,
    ApplyFlows,
    CommandResult,
    DeleteFlow,
    Deregister,
    Done,
    FlowCommand,
    FlowOp,
    Flows,
    FlowsApplied,
    GetStatus,
    ListAgents,
    ListFlows,
    ListTokens,
    Manifest,
    RefusalCode,
    Refused,
    Register,
    Registered,
    Reply,
    Request,
    Revoke,
    StatusReport,
    TokenCreate,
    TokenCreated,
    Tokens,
    decode_reply,
    default_actor,
    encode,
    mesh_version,
)
from mesh.errors import PermanentError, TransportError
from mesh.transport import NoReply, NoResponders, Transport

__all__ = ["DEFAULT_PREFIX", "ControlPlaneClient", "RequestRefused", "caller_token", "register_agent"]

DEFAULT_PREFIX = "mesh.cp"

_NOT_IN_TOKEN = re.compile(r"[^A-Za-z0-9_-]+")


def caller_token(name: str) -> str:
    """``name`` as one subject token (letters, digits, ``_`` and ``-``; anything else becomes
    ``_``, at most 64 characters): ``alice@host.example`` -> ``alice_host_example``."""
    token = _NOT_IN_TOKEN.sub("_", name).strip("_")[:64]
    return token or "unknown"


_R = TypeVar("_R")


class RequestRefused(PermanentError):
    """The control plane answered and refused: asking again the same way cannot help."""

    def __init__(self, code: RefusalCode, reason: str, problems: list[str] | None = None) -> None:
        self.code = code
        self.reason = reason
        self.problems = problems or []
        """Every problem found, one per line, when ``code`` is ``invalid`` (e.g. a flow file)."""
        super().__init__(reason)


class ControlPlaneClient:
    """Requests to the control plane through one connected :class:`~mesh.transport.Transport`.

    ``js`` may also be a zero-argument async callable returning one (an agent's link that may
    still be connecting). ``caller`` names who sends the requests (the last subject token);
    by default the acting operator (:func:`~mesh.controlplane.models.default_actor`:
    ``$MESH_ACTOR`` or ``user@host``) reduced by :func:`caller_token`.
    """

    def __init__(
        self,
        js: Transport | Callable[[], Awaitable[Transport]],
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = 5.0,
        caller: str | None = None,
    ) -> None:
        self._js = js
        self.prefix = prefix
        self.timeout = timeout
        self.caller = caller_token(caller if caller is not None else default_actor())

    def __repr__(self) -> str:
        return f"<ControlPlaneClient {self.prefix} caller={self.caller} timeout={self.timeout}s>"

    def subject(self, req: Request, caller: str | None = None) -> str:
        """The subject ``req`` is sent on: ``<prefix>.<kind>.<caller>``."""
        who = caller_token(caller) if caller else self.caller
        return f"{self.prefix}.{req.__struct_config__.tag}.{who}"

    async def connection(self) -> Transport:
        """The connection requests go through (waiting for it when given a provider)."""
        if isinstance(self._js, Transport):
            return self._js
        return await self._js()

    async def request(
        self, req: Request, *, timeout: float | None = None, caller: str | None = None
    ) -> Reply:
        """Send ``req`` to ``<prefix>.<kind>.<caller>`` (this client's caller unless given) and
        return the decoded reply (a Refused included).

        Raises:
            Refused: the broker's permissions do not let this connection send it
                (:class:`mesh.transport.Refused`, a TransportError).
            TransportError: no answer within the timeout, or no control plane serving it.
        """
        budget = self.timeout if timeout is None else timeout
        subject = self.subject(req, caller)
        data = encode(req)
        deadline = anyio.current_time() + budget
        transport = await self.connection()
        while True:
            left = deadline - anyio.current_time()
            if left <= 0:
                raise TransportError(
                    f"no control plane serves {subject} (is `meshctl control-plane run` up and "
                    f"connected to {transport.where}?)"
                )
            try:
                msg = await transport.request(subject, data, timeout=left)
            except NoResponders:
                await anyio.sleep(min(0.25, max(0.0, deadline - anyio.current_time())))
                continue
            except NoReply:
                raise TransportError(
                    f"the control plane did not answer {subject} within {budget:g}s"
                ) from None
            return decode_reply(msg.data)

    async def _expect(self, req: Request, kind: type[_R], caller: str | None = None) -> _R:
        reply = await self.request(req, caller=caller)
        if isinstance(reply, Refused):
            raise RequestRefused(reply.code, reply.reason, reply.problems)
        if not isinstance(reply, kind):
            raise TransportError(f"unexpected reply to {type(req).__name__}: {type(reply).__name__}")
        return reply

    async def register(self, req: Register) -> Registered:
        """Register (idempotent for the same identity), sent as the agent itself (caller =
        ``req.name``, the only register subject its enrollment token allows). Raises
        RequestRefused."""
        return await self._expect(req, Registered, caller=req.name)

    async def deregister(self, name: str, *, actor: str | None = None) -> Done:
        return await self._expect(Deregister(name=name, actor=actor or default_actor()), Done, actor)

    async def revoke(self, name: str, *, reason: str = "", actor: str | None = None) -> Done:
        req = Revoke(name=name, reason=reason, actor=actor or default_actor())
        return await self._expect(req, Done, actor)

    async def token_create(
        self, name: str, *, ttl: float, systems: list[str] | None = None, actor: str | None = None
    ) -> TokenCreated:
        """A one-time enrollment token for agent ``name`` (security on). Raises RequestRefused."""
        req = TokenCreate(name=name, ttl=ttl, systems=list(systems or []), actor=actor or default_actor())
        return await self._expect(req, TokenCreated, actor)

    async def tokens(self) -> Tokens:
        """Every enrollment token recorded (ids, names, systems, expiry, used; not the tokens)."""
        return await self._expect(ListTokens(), Tokens)

    async def agents(self, name: str | None = None) -> Agents:
        """Every agent (or the one named; RequestRefused ``unknown`` if there is none)."""
        return await self._expect(ListAgents(name=name), Agents)

    async def status(self) -> StatusReport:
        return await self._expect(GetStatus(), StatusReport)

    async def apply_flows(
        self, text: str, *, source: str, dry_run: bool = False, actor: str | None = None
    ) -> FlowsApplied:
        """Validate and store a flow file. Raises RequestRefused (``invalid``: ``problems``)."""
        req = ApplyFlows(text=text, source=source, dry_run=dry_run, actor=actor or default_actor())
        return await self._expect(req, FlowsApplied, actor)

    async def delete_flow(self, name: str, *, actor: str | None = None) -> Done:
        return await self._expect(DeleteFlow(name=name, actor=actor or default_actor()), Done, actor)

    async def flows(self, name: str | None = None) -> Flows:
        return await self._expect(ListFlows(name=name), Flows)

    async def command(
        self,
        op: FlowOp,
        *,
        flow: str | None = None,
        agent: str | None = None,
        timeout: float = 30.0,
        actor: str | None = None,
    ) -> CommandResult:
        """Pause/resume/drain/restart a flow (or every flow of ``agent``) and wait for the
        agents' results (``timeout`` per agent, plus the request's own margin)."""
        req = FlowCommand(op=op, flow=flow, agent=agent, timeout=timeout, actor=actor or default_actor())
        reply = await self.request(req, timeout=timeout + 10, caller=actor)
        if isinstance(reply, Refused):
            raise RequestRefused(reply.code, reply.reason, reply.problems)
        if not isinstance(reply, CommandResult):
            raise TransportError(f"unexpected reply to a command: {type(reply).__name__}")
        return reply


async def register_agent(
    client: ControlPlaneClient,
    *,
    name: str,
    site: str,
    state_dir: str,
    manifest: Manifest,
    current: Credentials | None,
    actor: str | None = None,
    public_key: str | None = None,
    enrollment: str | None = None,
) -> tuple[Registered, Credentials]:
    """Register the agent whose state dir is ``state_dir`` and return the reply and the
    credentials to keep (the current ones when the control plane issued none). Security on:
    ``public_key`` is the agent's NATS user key (the reply's ``jwt`` is issued for it) and
    ``enrollment`` the id of the enrollment token it connected with (None: its key is known).

    Raises:
        RequestRefused: name taken by another identity, agent revoked, invalid request.
        TransportError: no control plane answered.
        ConfigError: the state dir cannot be read or written.
    """
    # With NATS auth the agent's public key is its identity and the broker authenticates its
    # heartbeats: no identity or token file is written (its .creds file is its one credential).
    identity = public_key or load_or_create_identity(state_dir)
    sent_credential = current.token if current is not None and current.name == name else None
    if public_key:
        sent_credential = None
    reply = await client.register(
        Register(
            name=name,
            site=site,
            identity=identity,
            version=mesh_version(),
            host=socket.gethostname(),
            manifest=manifest,
            credential=sent_credential,
            actor=actor or default_actor(),
            public_key=public_key,
            enrollment=enrollment,
        )
    )
    js = await client.connection()
    if public_key and reply.jwt:
        creds = Credentials(
            agent_id=reply.agent_id,
            name=name,
            site=site,
            token="",
            control_plane=js.where.split(", ")[0],
            registered_at=current.registered_at if current is not None else time.time(),
        )
    elif reply.credential is None and current is not None and sent_credential is not None:
        creds = Credentials(
            agent_id=reply.agent_id,
            name=name,
            site=site,
            token=current.token,
            control_plane=js.where.split(", ")[0],
            registered_at=current.registered_at,
        )
    elif reply.credential is not None:
        creds = Credentials(
            agent_id=reply.agent_id,
            name=name,
            site=site,
            token=reply.credential,
            control_plane=js.where.split(", ")[0],
            registered_at=time.time(),
        )
    else:
        raise TransportError("the control plane issued no credential for a new registration")
    return reply, creds
