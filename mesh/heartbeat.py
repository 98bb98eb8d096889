"""The agent side of heartbeats: an actor that reports to the control plane every few seconds.

Run it under an agent's supervisor::

    hb = Heartbeat("erp-agent", "plant-1", agent.link.wait, collect, state_dir=cfg.agent.state_dir)
    await supervisor.start("heartbeat", hb.run)

Each beat calls ``collect()`` for a :class:`~mesh.controlplane.models.HeartbeatPayload` (health,
backlog per flow, error counts) and sends it with the agent id and credential stored in the state
dir by ``meshctl agent register``. Guarantees:

* **It never holds the agent up.** ``run`` signals ``started`` at once; a missing broker, an
  absent control plane (or a leader election in progress), a slow or failing ``collect()`` only
  cost that beat: the next one goes out on schedule. Every request is bounded by ``timeout``.
* **Fixed rate, no drift, no burst**: beats are ``interval`` apart; after a stall it skips
  the missed beats instead of sending them all at once.
* A ``collect()`` that raises is reported as ``failing`` with the error, not swallowed.
* Until the agent is registered (no ``credentials.json``) it sends nothing and says once, at
  info level, what running without a control plane means (no heartbeats, no remote commands;
  the config file's flows run as usual) and how to register; the credentials are re-read on
  every beat, so ``meshctl agent register`` takes effect without a restart (logged once too).
  Credentials of another agent in the state dir are a mistake: a warning every minute.
* A refusal is logged once per change of cause. ``revoked`` raises
  :class:`~mesh.errors.StopError` when ``stop_when_revoked`` (the default): revoked credentials
  are a reason for the agent to stop (see :mod:`mesh.errors`).

It depends only on :mod:`mesh.transport` and :mod:`mesh.controlplane`, not on the connector.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskStatus
from prometheus_client import CollectorRegistry

from mesh.controlplane.client import DEFAULT_PREFIX, ControlPlaneClient
from mesh.controlplane.identity import load_credentials
from mesh.controlplane.models import FlowKpis, HeartbeatAck, HeartbeatPayload, Refused, mesh_version
from mesh.controlplane.models import Heartbeat as HeartbeatRequest
from mesh.errors import ConfigError, MeshError, StopError
from mesh.metrics import LATENCY_BUCKETS, Metrics
from mesh.transport import Transport

__all__ = ["Collect", "Heartbeat", "flow_kpis", "metric_total"]

log = logging.getLogger(__name__)

Collect = Callable[[], Awaitable[HeartbeatPayload]]


class Heartbeat:
    """Sends one agent's heartbeats; see the module docstring for what it promises."""

    def __init__(
        self,
        agent_name: str,
        site: str,
        nats: Callable[[], Awaitable[Transport]],
        collect: Collect,
        *,
        state_dir: str | Path,
        interval: float = 5.0,
        timeout: float | None = None,
        prefix: str = DEFAULT_PREFIX,
        version: str | None = None,
        stop_when_revoked: bool = True,
    ) -> None:
        if interval <= 0:
            raise ValueError("heartbeat interval must be positive")
        self.agent_name = agent_name
        self.site = site
        self.collect = collect
        self.state_dir = Path(state_dir)
        self.interval = interval
        self.timeout = timeout if timeout is not None else min(interval, 5.0)
        self.version = version or mesh_version()
        self.stop_when_revoked = stop_when_revoked
        # Sent as the agent itself: the only heartbeat subject its credentials allow.
        self._client = ControlPlaneClient(nats, prefix=prefix, timeout=self.timeout, caller=agent_name)
        self.seq = 0
        self.sent = 0
        self.accepted = 0
        self.refused: Refused | None = None
        """The last refusal, until a heartbeat is accepted again."""
        self.last_error: str | None = None
        self.last_accepted_at: float | None = None
        self._warned_at = -1e9
        self._unregistered = False

    def __repr__(self) -> str:
        state = f"refused={self.refused.code}" if self.refused else f"accepted={self.accepted}/{self.sent}"
        return f"<Heartbeat {self.agent_name} every {self.interval:g}s {state}>"

    async def _payload(self) -> HeartbeatPayload:
        try:
            with anyio.fail_after(self.timeout):
                return await self.collect()
        except Exception as exc:
            return HeartbeatPayload(health="failing", detail=f"collecting the heartbeat failed: {exc!r}")

    async def beat(self) -> HeartbeatAck | Refused | None:
        """Send one heartbeat now. None when it could not be sent (not registered, no answer).

        Raises:
            StopError: the agent is revoked and ``stop_when_revoked`` is set.
            ConfigError: the credentials file is unreadable or invalid.
        """
        creds = await anyio.to_thread.run_sync(load_credentials, self.state_dir)
        if creds is None:
            if not self._unregistered:  # a standalone agent is not a fault: say so once
                self._unregistered = True
                log.info(
                    "agent %s runs without a control plane (not registered: no credentials in %s): "
                    "it runs the flows of its config file but sends no heartbeats and takes no remote "
                    "commands (flow pause/resume/drain, applied flows); to manage it from a control "
                    "plane run `meshctl agent register --name %s --site %s --state-dir %s` "
                    "(no restart needed)",
                    self.agent_name, self.state_dir, self.agent_name, self.site, self.state_dir,
                )  # fmt: skip
            return None
        if creds.name != self.agent_name:
            now = anyio.current_time()
            if now - self._warned_at >= 60:
                self._warned_at = now
                log.warning(
                    "agent %s: the credentials in %s are agent %s's: no heartbeats; register this "
                    "agent with its own state dir (`meshctl agent register --name %s --site %s "
                    "--state-dir DIR`)",
                    self.agent_name, self.state_dir, creds.name, self.agent_name, self.site,
                )  # fmt: skip
            return None
        if self._unregistered:
            self._unregistered = False
            log.info("agent %s is registered now: heartbeats start", self.agent_name)
        payload = await self._payload()
        self.seq += 1
        req = HeartbeatRequest(
            agent_id=creds.agent_id,
            name=self.agent_name,
            credential=creds.token,
            seq=self.seq,
            sent_at=time.time(),
            interval=self.interval,
            version=self.version,
            payload=payload,
        )
        self.sent += 1
        try:
            reply = await self._client.request(req)
        except MeshError as exc:
            if self.last_error != str(exc):
                log.warning("heartbeat of %s not delivered: %s", self.agent_name, exc)
            self.last_error = str(exc)
            return None
        self.last_error = None
        if isinstance(reply, Refused):
            if self.refused is None or self.refused.code != reply.code:
                log.error(
                    "control plane refused heartbeat of %s (%s): %s",
                    self.agent_name,
                    reply.code,
                    reply.reason,
                )
            self.refused = reply
            if reply.code == "revoked" and self.stop_when_revoked:
                raise StopError(f"control plane: {reply.reason}")
            return reply
        if isinstance(reply, HeartbeatAck):
            if self.refused is not None:
                log.info("control plane accepts heartbeats of %s again", self.agent_name)
            self.refused = None
            self.accepted += 1
            self.last_accepted_at = time.time()
            return reply
        log.warning("unexpected reply to a heartbeat: %s", type(reply).__name__)
        return None

    async def run(self, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Beat every ``interval`` seconds until cancelled."""
        task_status.started()
        next_at = anyio.current_time()
        while True:
            try:
                await self.beat()
            except ConfigError as exc:
                log.error("heartbeat of %s: %s", self.agent_name, exc)
            next_at += self.interval
            now = anyio.current_time()
            if next_at < now:  # stalled: skip the missed beats
                next_at = now + self.interval
            await anyio.sleep(next_at - now)


def metric_total(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels`` (e.g. a counter's
    ``..._total`` over every ``error`` of one ``flow``): handy for a ``collect()`` that reports
    error counts from an agent's existing metrics. 0 when there is none."""
    total = 0.0
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


_OUTCOME_FIELDS = {"applied": "applied", "duplicate": "duplicates", "not_owner": "not_owner"}
_COUNTERS = {
    "mesh_captured_messages_total": "captured",
    "mesh_published_messages_total": "published",
    "mesh_retried_messages_total": "retries",
    "mesh_dead_lettered_messages_total": "dead_lettered",
}


def flow_kpis(metrics: Metrics, now: float | None = None) -> dict[str, FlowKpis]:
    """Every flow's cumulative KPI counters from an agent's metrics, in one pass over its
    registry (for the heartbeat's :attr:`FlowReport.kpis`). Latency buckets follow
    :data:`~mesh.metrics.LATENCY_BUCKETS` then +Inf."""
    acc: dict[str, dict[str, Any]] = {}

    def of(flow: str) -> dict[str, Any]:
        return acc.setdefault(flow, {"failures": {}, "buckets": {}})

    for family in metrics.registry.collect():
        for sample in family.samples:
            flow = sample.labels.get("flow")
            if flow is None:
                continue
            name = sample.name
            if name in _COUNTERS:
                d = of(flow)
                d[_COUNTERS[name]] = d.get(_COUNTERS[name], 0) + int(sample.value)
            elif name == "mesh_consumed_messages_total":
                field = _OUTCOME_FIELDS.get(sample.labels.get("outcome", ""))
                if field is not None:
                    of(flow)[field] = int(sample.value)
            elif name == "mesh_failures_total":
                of(flow)["failures"][sample.labels["error_class"]] = int(sample.value)
            elif name == "mesh_end_to_end_latency_seconds_bucket":
                of(flow)["buckets"][float(sample.labels["le"])] = int(sample.value)
            elif name == "mesh_end_to_end_latency_seconds_sum":
                of(flow)["latency_sum"] = float(sample.value)
            elif name == "mesh_slo_target_seconds":
                of(flow)["slo_seconds"] = float(sample.value)
            elif name == "mesh_slo_changes_total":
                of(flow)["slo_total"] = int(sample.value)
            elif name == "mesh_slo_changes_on_time_total":
                of(flow)["slo_on_time"] = int(sample.value)
    out = {}
    for flow, d in acc.items():
        buckets: dict[float, int] = d.pop("buckets")
        counts = [buckets.get(float(b), 0) for b in LATENCY_BUCKETS] + [buckets.get(float("inf"), 0)]
        fresh = metrics.freshness_of(flow, now) if flow in metrics.newest_applied else None
        out[flow] = FlowKpis(**d, latency_buckets=counts if counts[-1] else [], freshness_seconds=fresh)
    return out
