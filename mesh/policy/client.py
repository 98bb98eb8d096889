"""The agent side of shared API policies: a gate per named policy whose tokens come from the
coordinator (the control-plane leader) in small leased batches.

Guarantees and behaviour:

* Every request through :meth:`PolicyGate.acquire` spends one token granted by the coordinator
  (a token bucket of ``rate`` per second and ``burst`` shared by every caller), so the callers
  together stay within the policy's rate; unused tokens lapse after the grant's ``ttl``, so a
  dead agent holds nothing for long.
* When the coordinator does not answer (no leader, NATS away, a timeout), the gate degrades to a
  local bucket of ``rate * local_share`` and asks the coordinator again every ``retry_every``
  seconds; the first answer ends the degradation. ``mesh_policy_degraded{policy}`` is 1 meanwhile.
* When the daily quota is spent the coordinator grants nothing and :meth:`PolicyGate.acquire`
  raises :class:`QuotaExhausted` (a :class:`~mesh.errors.SystemUnavailable`: the sink gives its
  batch back) until the quota resets.
* :meth:`PolicyGate.slot` bounds requests in flight by this caller's share of the concurrency.

An agent makes one :class:`PolicyClient` and :func:`install` s it; adapters find gates with
:func:`policy_gate`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping

import anyio
import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge

from mesh.errors import ConfigError, SystemUnavailable, TransportError
from mesh.policy.bucket import RequestGate
from mesh.policy.config import PolicyConfig
from mesh.policy.wire import PolicyGrant, PolicyRequest, decode_grant, encode, policy_subject
from mesh.security.permissions import DEFAULT_PREFIX
from mesh.transport import Transport

__all__ = [
    "PolicyClient",
    "PolicyGate",
    "PolicyMetrics",
    "QuotaExhausted",
    "current_client",
    "install",
    "policy_gate",
]

log = logging.getLogger(__name__)


class QuotaExhausted(SystemUnavailable):
    """The policy's daily quota is spent; nothing is allowed before ``reset_at`` (epoch s)."""

    def __init__(self, policy: str, reset_at: float) -> None:
        self.policy = policy
        self.reset_at = reset_at
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(reset_at))
        super().__init__(f"API policy {policy!r}: daily quota spent; it resets at {when}")


class PolicyMetrics:
    """``mesh_policy_tokens_granted_total``, ``mesh_policy_waits_total``, ``mesh_policy_degraded``
    and ``mesh_policy_quota_exhausted``, labelled by policy."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.granted = Counter(
            "mesh_policy_tokens_granted", "Request tokens granted by the policy coordinator", ["policy"],
            registry=r,
        )  # fmt: skip
        self.waits = Counter(
            "mesh_policy_waits", "Times a request waited for a policy token", ["policy"], registry=r
        )
        self.degraded = Gauge(
            "mesh_policy_degraded", "1 while the coordinator is unreachable (local share in use)", ["policy"],
            registry=r,
        )  # fmt: skip
        self.quota_exhausted = Gauge(
            "mesh_policy_quota_exhausted", "1 while the policy's daily quota is spent", ["policy"], registry=r
        )


class PolicyGate:
    """The gate of one policy in one agent. Same interface as the REST adapters' RequestGate
    (``acquire``, ``pause_until``) plus ``slot`` for concurrency. Cancellable while waiting."""

    def __init__(self, client: PolicyClient, name: str, spec: PolicyConfig) -> None:
        self.name = name
        self.spec = spec
        self._client = client
        self._tokens = 0
        self._expires = 0.0
        self._paused_until = 0.0
        self._degraded = False
        self._retry_at = 0.0
        self._quota_reset: float | None = None
        self._waiting = 0
        self._lock = anyio.Lock()
        self._local = RequestGate(
            spec.rate * spec.local_share, max(1, math.floor(spec.effective_burst * spec.local_share))
        )
        self._limiter = anyio.CapacityLimiter(spec.concurrency)
        self.batch = max(1, math.ceil(spec.rate / 10))
        """The most tokens asked for at once (a tenth of a second's worth)."""
        m = client.metrics
        self._granted = m.granted.labels(name)
        self._waits = m.waits.labels(name)
        self._degraded_gauge = m.degraded.labels(name)
        self._quota_gauge = m.quota_exhausted.labels(name)
        self._degraded_gauge.set(0)
        self._quota_gauge.set(0)

    def __repr__(self) -> str:
        state = "degraded" if self._degraded else "coordinated"
        return f"<PolicyGate {self.name} {self.spec.rate:g}/s {state} tokens={self._tokens}>"

    @property
    def degraded(self) -> bool:
        """True while the coordinator is unreachable and the local share applies."""
        return self._degraded

    def problem(self) -> str | None:
        """One line for the agent's health detail, or None when all is well."""
        if self._quota_reset is not None and time.time() < self._quota_reset:
            when = time.strftime("%H:%M:%S UTC", time.gmtime(self._quota_reset))
            return f"API policy {self.name}: daily quota spent until {when}"
        if self._degraded:
            return f"API policy {self.name}: coordinator unreachable, local share {self.spec.local_share:g}"
        return None

    def pause_until(self, deadline: float) -> None:
        """Let no request of this agent through before ``deadline`` (``anyio.current_time()``)."""
        self._paused_until = max(self._paused_until, deadline)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of this caller's concurrency slots for the duration of a request."""
        async with self._limiter:
            yield

    async def acquire(self) -> None:
        """Wait for a token (coordinated, or local while degraded) and take it.

        Raises:
            QuotaExhausted: the daily quota is spent (until it resets).
        """
        self._waiting += 1
        try:
            async with self._lock:
                waited = False
                while True:
                    now = anyio.current_time()
                    if self._quota_reset is not None:
                        if time.time() < self._quota_reset:
                            raise QuotaExhausted(self.name, self._quota_reset)
                        self._quota_reset = None
                        self._quota_gauge.set(0)
                    if self._paused_until > now:
                        waited = True
                        await anyio.sleep(self._paused_until - now)
                        continue
                    if self._tokens > 0 and now < self._expires:
                        self._tokens -= 1
                        return
                    if self._degraded and now < self._retry_at:
                        await self._local.acquire()
                        return
                    grant = await self._ask(min(self.batch, max(1, self._waiting)))
                    if grant is None:
                        continue  # degraded now: the local bucket serves
                    if grant.quota_reset is not None and grant.tokens == 0:
                        self._quota_reset = grant.quota_reset
                        self._quota_gauge.set(1)
                        continue
                    if grant.tokens:
                        self._granted.inc(grant.tokens)
                        self._tokens = grant.tokens
                        self._expires = anyio.current_time() + grant.ttl
                        continue
                    if not waited:
                        self._waits.inc()
                        waited = True
                    await anyio.sleep(max(0.001, grant.wait))
        finally:
            self._waiting -= 1

    async def _ask(self, want: int) -> PolicyGrant | None:
        """The coordinator's grant, or None (and degraded) when it cannot be had."""
        c = self._client
        why = ""
        js = c.transport()
        if js is None:
            why = "NATS not connected"
        else:
            req = PolicyRequest(policy=self.name, want=want, spec=self.spec)
            try:
                msg = await js.request(c.subject, encode(req), timeout=c.timeout)
                grant = decode_grant(msg.data)
            except TransportError as exc:
                why = str(exc) or type(exc).__name__
            except msgspec.DecodeError as exc:
                why = f"unreadable reply: {exc}"
            else:
                if not grant.error:
                    if self._degraded:
                        log.info("API policy %s: coordinator answers again; shared limits apply", self.name)
                        self._degraded = False
                        self._degraded_gauge.set(0)
                    if grant.concurrency != self._limiter.total_tokens:
                        self._limiter.total_tokens = max(1, grant.concurrency)
                    return grant
                why = grant.error
        if not self._degraded:
            log.warning(
                "API policy %s: coordinator unreachable (%s); going on at the local share %g of %g/s",
                self.name, why, self.spec.local_share, self.spec.rate,
            )  # fmt: skip
            self._degraded = True
            self._degraded_gauge.set(1)
            self._limiter.total_tokens = max(1, math.floor(self.spec.concurrency * self.spec.local_share))
        self._tokens = 0
        self._retry_at = anyio.current_time() + c.retry_every
        return None


class PolicyClient:
    """The policies of one agent (``policies``: name -> declaration) and the NATS link to the
    coordinator. ``transport`` returns the connected transport or None (NATS away)."""

    def __init__(
        self,
        caller: str,
        policies: Mapping[str, PolicyConfig],
        transport: Callable[[], Transport | None],
        *,
        prefix: str = DEFAULT_PREFIX,
        metrics: PolicyMetrics | None = None,
        timeout: float = 1.0,
        retry_every: float = 1.0,
    ) -> None:
        self.caller = caller
        self.subject = policy_subject(caller, prefix)
        self.policies = dict(policies)
        self.transport = transport
        self.metrics = metrics or PolicyMetrics()
        self.timeout = timeout
        self.retry_every = retry_every
        self._gates: dict[str, PolicyGate] = {}

    def __repr__(self) -> str:
        return f"<PolicyClient {self.caller} policies={sorted(self.policies)}>"

    def gate(self, name: str) -> PolicyGate:
        """The gate of policy ``name`` (one per agent, shared by its adapters).

        Raises:
            ConfigError: the agent declares no ``[policies.<name>]``.
        """
        if name not in self._gates:
            if name not in self.policies:
                declared = ", ".join(sorted(self.policies)) or "none"
                raise ConfigError(
                    f"API policy {name!r} is not declared in this agent's config: add [policies.{name}] "
                    f"(declared: {declared})"
                )
            self._gates[name] = PolicyGate(self, name, self.policies[name])
        return self._gates[name]

    def problems(self) -> list[str]:
        """Health-detail lines of the gates in use (degraded, quota spent)."""
        return [p for g in self._gates.values() if (p := g.problem()) is not None]


_installed: PolicyClient | None = None


def install(client: PolicyClient | None) -> None:
    """Make ``client`` the process's policy client (None: remove it)."""
    global _installed
    _installed = client


def current_client() -> PolicyClient | None:
    """The installed policy client, if any."""
    return _installed


def policy_gate(name: str) -> PolicyGate:
    """The gate of policy ``name`` from the installed client.

    Raises:
        ConfigError: no client is installed (the process runs no agent) or the policy is not
            declared.
    """
    if _installed is None:
        raise ConfigError(
            f"API policy {name!r} needs an agent: declare [policies.{name}] in the agent config "
            "(shared limits are coordinated over the agent's NATS connection)"
        )
    return _installed.gate(name)
