"""The lean agent process entry: ``mesh-agent --config FILE`` / ``python -m agents``.

It imports only the agent runtime (no typer, no operator commands), so an agent process starts
smaller than ``meshctl`` (peak RSS during a ``meshctl bench`` drain: see ``bin/bench-rss``);
``meshctl agent run`` delegates here and behaves the same way.

Exit codes: 0 stopped cleanly; 2 bad arguments or config, or a failure the operator can fix,
printed as one line ``error: ...`` on stderr (never a traceback); 130 interrupted before start.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "run_agent"]

_BAD_INPUT = 2


def _error(message: object) -> None:
    from mesh.redact import redact_urls

    red, reset = ("\x1b[31m", "\x1b[0m") if sys.stderr.isatty() else ("", "")
    print(f"{red}error: {redact_urls(str(message))}{reset}", file=sys.stderr)


def run_agent(config: Path, metrics_port: int | None = None) -> int:
    """Load ``config``, set up logging and run the agent until SIGTERM/SIGINT; the exit code.

    A bad config or a :class:`mesh.errors.MeshError` while running prints one ``error:`` line on
    stderr and returns 2. ``metrics_port`` overrides ``agent.metrics_port``."""
    import msgspec

    from mesh.config import load_agent_config
    from mesh.errors import ConfigError, MeshError
    from mesh.logs import setup_logging

    try:
        cfg = load_agent_config(config)
    except ConfigError as exc:
        _error(exc)
        return _BAD_INPUT
    if metrics_port is not None:
        agent = msgspec.structs.replace(cfg.agent, metrics_port=metrics_port)
        cfg = msgspec.structs.replace(cfg, agent=agent)
    setup_logging(cfg.log_level, fmt=cfg.log_format)
    from agents.runner import run_agent_process

    try:
        run_agent_process(cfg)
    except MeshError as exc:
        _error(exc)
        return _BAD_INPUT
    return 0


def _port(text: str) -> int:
    import argparse

    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid integer") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not in the range 0<=x<=65535")
    return port


def main(argv: Sequence[str] | None = None, prog: str = "mesh-agent") -> None:
    """Parse ``argv`` (``--config/-c FILE [--metrics-port N]``), run the agent, exit with its code."""
    import argparse

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run a connector agent until SIGTERM or Ctrl-C (ready: GET /readyz, sd_notify READY=1).",
    )
    parser.add_argument("--config", "-c", type=Path, required=True, help="Agent config file (TOML).")
    parser.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        help="Serve /metrics, /healthz and /readyz on this port (overrides agent.metrics_port; "
        "0 picks a free port, written to <state_dir>/endpoint.json).",
    )
    args = parser.parse_args(argv)
    try:
        code = run_agent(args.config, args.metrics_port)
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
