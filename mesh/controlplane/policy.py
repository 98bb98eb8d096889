"""The coordinator of shared API policies, served by the control-plane leader.

Requests arrive on ``<prefix>.policy.<caller>`` (the caller token is the identity NATS
authenticated: an agent may publish only its own); each asks for a few tokens of one policy
and gets a :class:`~mesh.policy.PolicyGrant`. Per policy the coordinator keeps:

* a token bucket of ``rate`` per second holding up to ``burst``, shared by every caller: the
  tokens granted in any interval of ``L`` seconds are at most ``burst + rate * L``;
* the callers seen within the last few grant lifetimes, splitting ``concurrency`` between them;
* with ``daily_quota``, the tokens granted today (in ``timezone``) in KV bucket ``mesh_policy``
  (key ``<policy>.<YYYY-MM-DD>``, compare-and-swap), written before the grant is answered, so a
  restart or a new leader goes on from the persisted count; once spent it grants nothing and
  answers when the quota resets.

HA: one coordinator per leader term (the leader serves the subject in a queue group); a new
leader starts with a full bucket and the persisted quota. Grants lapse after ``ttl`` seconds at
the caller, so a dead agent's unused tokens are gone within a second and its concurrency share
returns to the others once it stops asking.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
import zoneinfo
from collections.abc import Awaitable, Callable
from typing import NoReturn

import anyio
import msgspec
from anyio.abc import TaskStatus

from mesh.errors import TransportError
from mesh.policy.config import PolicyConfig
from mesh.policy.wire import PolicyGrant, decode_request, encode
from mesh.transport import Bucket, Message, RevisionConflict, Transport

__all__ = ["POLICY_BUCKET", "AuditAppend", "PolicyCoordinator"]

log = logging.getLogger(__name__)

AuditAppend = Callable[[str, str, str, str, dict[str, str]], Awaitable[None]]
"""(kind, who, target, what, detail) -> an audit entry (the control plane's audit trail)."""

POLICY_BUCKET = "mesh_policy"
"""Daily quota counters: ``<policy>.<YYYY-MM-DD>`` holds ``{"used": n}``."""


class _Quota(msgspec.Struct):
    used: int = 0


class _State:
    def __init__(self, spec: PolicyConfig, now: float) -> None:
        self.spec = spec
        self.tokens = float(spec.effective_burst)
        self.stamp = now
        self.callers: dict[str, float] = {}
        self.day = ""
        self.used = 0
        self.revision: int | None = None
        self.reset_at = 0.0
        self.audited = ""


class PolicyCoordinator:
    """One leader term's coordinator. ``bucket``: the ``mesh_policy`` KV bucket (None: opened
    by :meth:`serve`). ``clock``: wall-clock seconds (the quota's day; tests pass their own).
    ``audit``: records a ``policy_quota`` entry (who: the caller refused first) once per
    policy and day when the quota runs out."""

    def __init__(
        self,
        bucket: Bucket | None = None,
        *,
        ttl: float = 1.0,
        clock: Callable[[], float] = time.time,
        audit: AuditAppend | None = None,
    ) -> None:
        self.bucket = bucket
        self.audit = audit
        self.ttl = ttl
        self.clock = clock
        self.states: dict[str, _State] = {}
        self._lock = anyio.Lock()

    def __repr__(self) -> str:
        return f"<PolicyCoordinator policies={sorted(self.states)}>"

    async def serve(
        self, js: Transport, prefix: str, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Open ``mesh_policy`` (created when missing) and answer ``<prefix>.policy.*`` in the
        queue group ``<prefix>.policy`` until cancelled.

        Raises:
            TransportError: the bucket cannot be opened or the subscription fails.
        """
        if self.bucket is None:
            self.bucket = await js.key_value(POLICY_BUCKET, history=1)

        async def handler(msg: Message) -> bytes:
            return await self.handle(msg.subject.rsplit(".", 1)[-1], msg.data)

        await js.serve(f"{prefix}.policy.*", handler, queue=f"{prefix}.policy", task_status=task_status)
        raise AssertionError("unreachable")  # serve returns only by raising

    async def handle(self, caller: str, data: bytes) -> bytes:
        """The encoded grant for one request of ``caller`` (never raises: errors are answered)."""
        try:
            req = decode_request(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return encode(PolicyGrant(error=f"invalid policy request: {exc}"))
        try:
            async with self._lock:
                grant = await self._grant(caller, req.policy, req.want, req.spec)
        except TransportError as exc:
            log.warning("API policy %s: quota counter not writable: %s", req.policy, exc)
            grant = PolicyGrant(error=f"the coordinator cannot write the quota counter: {exc}")
        return encode(grant)

    async def _grant(self, caller: str, name: str, want: int, spec: PolicyConfig) -> PolicyGrant:
        now = anyio.current_time()
        st = self.states.get(name)
        if st is None:
            st = self.states[name] = _State(spec, now)
            log.info(
                "API policy %s: %g/s burst %d (declared by %s)", name, spec.rate, spec.effective_burst, caller
            )
        elif st.spec != spec:
            log.debug("API policy %s: %s declares other numbers; the first declaration stands", name, caller)
        spec = st.spec
        st.tokens = min(float(spec.effective_burst), st.tokens + (now - st.stamp) * spec.rate)
        st.stamp = now
        st.callers[caller] = now
        horizon = now - 3 * self.ttl
        for c in [c for c, seen in st.callers.items() if seen < horizon]:
            del st.callers[c]
        share = max(1, spec.concurrency // len(st.callers))
        n = min(want, math.floor(st.tokens))
        used = None
        if spec.daily_quota is not None:
            await self._load_day(name, st)
            left = spec.daily_quota - st.used
            if left <= 0:
                if st.audited != st.day:
                    st.audited = st.day
                    await self._audit_spent(caller, name, st)
                return PolicyGrant(
                    concurrency=share, quota_used=st.used, quota_reset=st.reset_at, ttl=self.ttl
                )
            n = min(n, left)
            if n > 0:
                await self._count(name, st, n)
            used = st.used
        if n <= 0:
            wait = (1 - st.tokens) / spec.rate
            return PolicyGrant(wait=wait, concurrency=share, quota_used=used, ttl=self.ttl)
        st.tokens -= n
        return PolicyGrant(tokens=n, concurrency=share, quota_used=used, ttl=self.ttl)

    async def _audit_spent(self, caller: str, name: str, st: _State) -> None:
        log.warning("API policy %s: daily quota %s spent for %s", name, st.spec.daily_quota, st.day)
        if self.audit is None:
            return
        what = f"daily quota {st.spec.daily_quota} of API policy {name} spent for {st.day}"
        detail = {"used": str(st.used), "resets_at": str(st.reset_at), "timezone": st.spec.timezone}
        try:
            await self.audit("policy_quota", caller, name, what, detail)
        except TransportError as exc:
            log.error("audit: %s (the quota of %s stays spent)", exc, name)

    async def _load_day(self, name: str, st: _State) -> None:
        assert self.bucket is not None
        tz = zoneinfo.ZoneInfo(st.spec.timezone)
        today = dt.datetime.fromtimestamp(self.clock(), tz).date()
        if st.day == today.isoformat():
            return
        entry = await self.bucket.get(f"{name}.{today.isoformat()}")
        st.day = today.isoformat()
        st.used = msgspec.json.decode(entry.value, type=_Quota).used if entry is not None else 0
        st.revision = entry.revision if entry is not None else None
        midnight = dt.datetime.combine(today + dt.timedelta(days=1), dt.time(), tz)
        st.reset_at = midnight.timestamp()

    async def _count(self, name: str, st: _State, n: int) -> None:
        """Persist ``used + n`` (compare-and-swap; a conflict re-reads and retries)."""
        assert self.bucket is not None
        key = f"{name}.{st.day}"
        for _ in range(5):
            value = msgspec.json.encode(_Quota(used=st.used + n))
            try:
                if st.revision is None:
                    st.revision = await self.bucket.create(key, value)
                else:
                    st.revision = await self.bucket.update(key, value, st.revision)
                st.used += n
                return
            except RevisionConflict:
                entry = await self.bucket.get(key)
                st.used = msgspec.json.decode(entry.value, type=_Quota).used if entry is not None else 0
                st.revision = entry.revision if entry is not None else None
        raise TransportError(f"the quota counter {key} keeps changing under the coordinator")
