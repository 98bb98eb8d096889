"""Run an agent as a process: logging, the HTTP endpoint, signals, readiness, event loop.

The process is *ready* (``GET /readyz`` answers 200, systemd hears ``READY=1``) once its signal
handlers are installed ("signals"), its stores are open ("stores"), its NATS link is up ("nats")
and its command channel is subscribed ("commands"). Until "signals" is met a SIGTERM still kills
it the default way (exit -15), so a supervisor waits for readiness before it stops or commands it.

SIGTERM and SIGINT make the agent unready at once (``/readyz`` 503 "stopping", systemd hears
``STOPPING=1``), then cancel its task group; every actor unwinds through its context managers
(stores closed, NATS connection flushed and closed) and the process exits 0. A second signal
stops it without waiting for in-flight work.

With a metrics port configured, ``/metrics``, ``/healthz`` and ``/readyz`` are served there
(port 0: a free one, written to ``<state_dir>/endpoint.json``; see mesh.endpoint).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc

from mesh import telemetry
from mesh.config import AgentConfig
from mesh.endpoint import AgentEndpoint, remove_endpoint_file, write_endpoint_file
from mesh.metrics import Metrics
from mesh.readiness import Readiness
from mesh.sdnotify import Notifier

__all__ = ["run_agent_process", "run_until_signalled"]

log = logging.getLogger(__name__)


async def _announce(readiness: Readiness, notifier: Notifier, what: str) -> None:
    """Log and ``sd_notify`` the first time the process is ready."""
    await readiness.wait()
    log.info("%s ready", what)
    notifier.ready(f"{what} ready")


async def _watchdog(notifier: Notifier, interval: float) -> None:
    """``WATCHDOG=1`` from the event loop itself: a wedged loop stops the pings."""
    while True:
        notifier.watchdog()
        await anyio.sleep(interval)


async def run_until_signalled(
    run: Callable[[], Awaitable[object]],
    stop: Callable[[str], None],
    readiness: Readiness,
    notifier: Notifier,
    what: str,
    *,
    second_signal_forces: bool = True,
) -> None:
    """Run ``run()`` until it returns; on SIGTERM/SIGINT mark ``readiness`` stopping, send
    ``STOPPING=1`` and call ``stop(signal_name)``, then keep waiting for ``run()`` to return.
    A second signal cancels ``run()`` at once if ``second_signal_forces``.

    Marks the "signals" condition once the handlers are installed, sends ``READY=1`` the first
    time ``readiness`` is met and ``WATCHDOG=1`` if systemd asked for it. Raises what ``run()``
    raises."""

    async def run_then_end(tg: anyio.abc.TaskGroup) -> None:
        try:
            await run()
        finally:
            readiness.stopping(f"{what} stopped")
        tg.cancel_scope.cancel()  # done: stop listening for signals

    try:
        async with anyio.create_task_group() as tg:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                readiness.set("signals")  # the handlers are installed: a SIGTERM now stops us cleanly
                tg.start_soon(run_then_end, tg)
                tg.start_soon(_announce, readiness, notifier, what)
                if notifier.watchdog_interval is not None:
                    tg.start_soon(_watchdog, notifier, notifier.watchdog_interval)
                signalled = False
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if signalled:
                        if second_signal_forces:
                            log.warning("second %s: stopping now", name)
                            tg.cancel_scope.cancel()
                            break
                        continue
                    signalled = True
                    readiness.stopping(f"stopping ({name})")
                    notifier.stopping(f"stopping ({name})")
                    stop(name)
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:  # callers (the CLI) see the error itself, not a group of one
            raise group.exceptions[0] from None
        raise


async def _main(cfg: AgentConfig) -> None:
    from agents.connector import ConnectorAgent

    a = cfg.agent
    telemetry.configure_agent(cfg)
    metrics = Metrics()
    readiness = Readiness(["signals"])
    agent = ConnectorAgent(cfg, metrics=metrics, readiness=readiness)
    notifier = Notifier()
    endpoint: AgentEndpoint | None = None
    if a.metrics_port is not None:
        endpoint = AgentEndpoint(metrics.registry, readiness, a.metrics_host, a.metrics_port)
        endpoint.start()
        write_endpoint_file(a.state_dir, endpoint.url)
        log.info("metrics on %s/metrics (probes /healthz, /readyz)", endpoint.url)

    def stop(signame: str) -> None:
        log.info("%s: stopping agent %s (in-flight work gets %.0fs)", signame, a.name, a.shutdown_grace)
        agent.stop()

    try:
        await run_until_signalled(agent.run, stop, readiness, notifier, f"agent {a.name}")
    finally:
        telemetry.shutdown()  # flush the spans still queued
        notifier.close()
        if endpoint is not None:
            endpoint.close()
            remove_endpoint_file(a.state_dir)
    log.info("agent %s stopped", a.name)


def run_agent_process(cfg: AgentConfig) -> None:
    """Run the connector agent for ``cfg`` until SIGTERM/SIGINT (uvloop where available)."""
    backend_options: dict[str, Any] = {}
    try:
        import uvloop  # noqa: F401

        backend_options["use_uvloop"] = True
    except ImportError:
        pass
    anyio.run(_main, cfg, backend="asyncio", backend_options=backend_options)
