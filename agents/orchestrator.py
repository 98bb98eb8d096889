"""The orchestrator agent: runs the sagas of an ``orchestrator.toml`` (README "Orchestration (sagas)").

``meshctl orchestrator run --config orchestrator.toml`` runs one replica; run several for HA and
throughput: they share the sagas through ``mesh_sagas`` leases (see :mod:`mesh.saga.engine`),
and each saga trigger's durable consumer ``saga-<name>`` is shared by all of them.

SIGTERM/SIGINT stop it: running steps are cancelled where they are (their state is saved before
each attempt, and whoever claims the saga next repeats the attempt with the same idempotency
key). A SIGKILL is no different for the sagas, only their leases run out first.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio

from mesh.endpoint import AgentEndpoint
from mesh.readiness import Readiness
from mesh.saga.definition import OrchestratorConfig
from mesh.saga.engine import Orchestrator
from mesh.saga.metrics import SagaMetrics
from mesh.sdnotify import Notifier
from mesh.trace import TraceRecorder, use_recorder
from mesh.transport import JetStream, Transport

__all__ = ["run_orchestrator", "run_orchestrator_process"]

log = logging.getLogger(__name__)


async def run_orchestrator(
    cfg: OrchestratorConfig, *, metrics: SagaMetrics | None = None, readiness: Readiness | None = None
) -> None:
    """Connect and run the sagas of ``cfg`` until cancelled; marks ``readiness`` condition
    "sagas" once the triggers are bound and the active sagas loaded. Saga transitions are
    traced through the orchestrator's own :class:`~mesh.trace.TraceRecorder` (``[trace]``,
    published on ``trace.<orchestrator name>.saga_step``; best effort, never in a saga's way).

    Raises:
        TransportError: NATS cannot be reached, or the bucket/streams are missing or refused.
    """
    try:
        async with JetStream(cfg.nats, name=f"orchestrator {cfg.orchestrator.name}") as js:
            orchestrator = Orchestrator(cfg, js, metrics=metrics)

            async def link() -> Transport:
                return js

            tracer = TraceRecorder(
                cfg.orchestrator.name, "orchestrator", cfg=cfg.trace, transport=link,
                counter=orchestrator.metrics.trace_records,
            )  # fmt: skip
            async with anyio.create_task_group() as tg:
                await tg.start(tracer.run)
                with use_recorder(tracer):  # the saga tasks inherit it
                    await tg.start(orchestrator.run)
                if readiness is not None:
                    readiness.set("sagas")
                log.info(
                    "orchestrator %s ready: %d saga definition(s): %s",
                    orchestrator.replica,
                    len(cfg.sagas),
                    ", ".join(s.name for s in cfg.sagas) or "none (runs sagas other replicas started)",
                )
    except BaseExceptionGroup as group:
        raise _single(group) from None


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one mesh error inside nested task-group wrappers (the operator sees it, not a group)."""
    while isinstance(group, BaseExceptionGroup) and len(group.exceptions) == 1:
        group = group.exceptions[0]  # type: ignore[assignment]
    return group


async def _main(cfg: OrchestratorConfig) -> None:
    from agents.runner import run_until_signalled

    o = cfg.orchestrator
    readiness = Readiness(["signals", "sagas"])
    metrics = SagaMetrics()
    notifier = Notifier()
    scope = anyio.CancelScope()
    endpoint: AgentEndpoint | None = None
    if o.metrics_port is not None:
        endpoint = AgentEndpoint(metrics.registry, readiness, o.metrics_host, o.metrics_port)
        endpoint.start()
        log.info("metrics on %s/metrics (probes /healthz, /readyz)", endpoint.url)

    async def run() -> None:
        with scope:
            await run_orchestrator(cfg, metrics=metrics, readiness=readiness)

    def stop(signame: str) -> None:
        log.info("%s: stopping orchestrator %s", signame, cfg.orchestrator.name)
        scope.cancel()

    try:
        await run_until_signalled(run, stop, readiness, notifier, f"orchestrator {cfg.orchestrator.name}")
    finally:
        notifier.close()
        if endpoint is not None:
            endpoint.close()


def run_orchestrator_process(cfg: OrchestratorConfig) -> None:
    """Run the orchestrator for ``cfg`` until SIGTERM/SIGINT (uvloop where available)."""
    backend_options: dict[str, Any] = {}
    try:
        import uvloop  # noqa: F401

        backend_options["use_uvloop"] = True
    except ImportError:
        pass
    anyio.run(_main, cfg, backend="asyncio", backend_options=backend_options)
