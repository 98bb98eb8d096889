"""The lean agent process entry: ``mesh-agent --config FILE`` / ``python -m agents``.

It imports only the agent runtime (no typer, no operator commands), so an agent process starts
smaller than ``meshctl``; ``meshctl agent run`` delegates here and behaves the same way. Before
any thread exists it caps glibc's malloc arenas (``MALLOC_ARENA_MAX``, default 2 here): the
SQLite stores run on worker threads and each thread would otherwise get its own arena, which
only ever grows the peak RSS. An operator-set ``MALLOC_ARENA_MAX`` is left to glibc.

Exit codes: 0 stopped cleanly; 2 bad arguments or config, or a failure the operator can fix,
printed as one line ``error: ...`` on stderr (never a traceback); 130 interrupted before start.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["cap_malloc_arenas", "main", "run_agent"]

_BAD_INPUT = 2
_M_ARENA_MAX = -8  # glibc malloc.h


def cap_malloc_arenas(arenas: int = 2) -> bool:
    """Limit glibc malloc to ``arenas`` arenas unless ``MALLOC_ARENA_MAX`` is set; call before
    starting threads. True if the limit was applied; False elsewhere (not glibc, env set)."""
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


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
    cap_malloc_arenas()
    try:
        code = run_agent(args.config, args.metrics_port)
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
