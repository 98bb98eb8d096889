"""Run an agent as a process: logging, metrics endpoint, signals, event loop.

SIGTERM and SIGINT cancel the agent's task group; every actor unwinds through its context
managers (stores closed, NATS connection flushed and closed) and the process exits 0.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

import anyio
import anyio.abc

from mesh.config import AgentConfig
from mesh.metrics import Metrics

__all__ = ["run_agent_process", "serve_metrics"]

log = logging.getLogger(__name__)


def serve_metrics(metrics: Metrics, host: str, port: int) -> tuple[Any, int]:
    """Serve ``/metrics`` on a daemon thread; returns (server, bound port)."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return server, int(server.server_port)


async def _main(cfg: AgentConfig) -> None:
    from agents.connector import ConnectorAgent

    metrics = Metrics()
    server = None
    if cfg.agent.metrics_port is not None:
        server, port = serve_metrics(metrics, cfg.agent.metrics_host, cfg.agent.metrics_port)
        log.info("metrics on http://%s:%d/metrics", cfg.agent.metrics_host, port)
    agent = ConnectorAgent(cfg, metrics=metrics)

    async def run_then_end(tg: anyio.abc.TaskGroup) -> None:
        await agent.run()
        tg.cancel_scope.cancel()  # the agent is done: stop listening for signals

    try:
        async with anyio.create_task_group() as tg:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                tg.start_soon(run_then_end, tg)
                async for signum in signals:
                    if agent.stopping:
                        log.warning("second %s: stopping now", signal.Signals(signum).name)
                        tg.cancel_scope.cancel()
                        break
                    log.info(
                        "%s: stopping agent %s (in-flight work gets %.0fs)",
                        signal.Signals(signum).name, cfg.agent.name, cfg.agent.shutdown_grace,
                    )  # fmt: skip
                    agent.stop()
    finally:
        if server is not None:
            server.shutdown()
    log.info("agent %s stopped", cfg.agent.name)


def run_agent_process(cfg: AgentConfig) -> None:
    """Run the connector agent for ``cfg`` until SIGTERM/SIGINT (uvloop where available)."""
    backend_options: dict[str, Any] = {}
    try:
        import uvloop  # noqa: F401

        backend_options["use_uvloop"] = True
    except ImportError:
        pass
    anyio.run(_main, cfg, backend="asyncio", backend_options=backend_options)
