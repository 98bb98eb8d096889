"""How meshctl ends a command that failed: one red line on stderr, credentials in URLs
redacted, exit 2 (or ``code``); never a traceback. Also the shape every command group shares
(:func:`command_group`) and JSON output (:func:`echo_json`)."""

from __future__ import annotations

from typing import NoReturn

import msgspec
import typer

from mesh.cli._exitcodes import BAD_INPUT
from mesh.redact import redact_urls


def fail(message: object, code: int = BAD_INPUT) -> NoReturn:
    typer.secho(f"error: {redact_urls(str(message))}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def command_group(name: str, help: str) -> typer.Typer:
    """A ``meshctl`` command group: bare, it prints its help; errors are never rich tracebacks;
    no shell-completion options."""
    return typer.Typer(
        name=name, help=help, no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False
    )


def echo_json(value: object) -> None:
    """Print ``value`` (anything msgspec encodes) as JSON indented by 2."""
    typer.echo(msgspec.json.format(msgspec.json.encode(value), indent=2).decode())
