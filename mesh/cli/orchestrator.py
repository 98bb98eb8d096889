"""``meshctl orchestrator``: run the saga orchestrator (README "Orchestration (sagas)").

A bad config prints every problem (file, field path, what is wrong) and exits 2; so does a
missing broker, bucket or stream, in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mesh.cli._output import fail
from mesh.errors import ConfigError, MeshError

__all__ = ["app"]

app = typer.Typer(help="The saga orchestrator.", no_args_is_help=True)


@app.command("run")
def _run(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="Orchestrator config (TOML).", show_default=False)
    ],
) -> None:
    """Run an orchestrator replica until SIGTERM or Ctrl-C (several replicas share the sagas)."""
    from agents.orchestrator import run_orchestrator_process
    from mesh.logs import setup_logging
    from mesh.saga.definition import load_orchestrator_config

    try:
        cfg = load_orchestrator_config(config)
    except ConfigError as exc:
        fail(exc)
        return
    setup_logging(cfg.orchestrator.log_level, fmt=cfg.orchestrator.log_format)
    try:
        run_orchestrator_process(cfg)
    except MeshError as exc:
        fail(exc)


@app.command("check")
def _check(
    files: Annotated[list[Path], typer.Argument(help="Orchestrator config files.")],
) -> None:
    """Validate orchestrator configs; print every problem with its file and field path."""
    from mesh.saga.definition import load_orchestrator_config

    bad = 0
    for file in files:
        try:
            cfg = load_orchestrator_config(file)
        except ConfigError as exc:
            typer.secho(f"{exc}", fg=typer.colors.RED, err=True)
            bad += 1
        else:
            typer.echo(f"{file}: ok ({len(cfg.sagas)} saga(s): {', '.join(s.name for s in cfg.sagas)})")
    if bad:
        raise typer.Exit(2)
