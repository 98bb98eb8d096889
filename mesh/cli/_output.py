"""How meshctl ends a command that failed: one red line on stderr, credentials in URLs
redacted, exit 2 (or ``code``); never a traceback."""

from __future__ import annotations

from typing import NoReturn

import typer

from mesh.cli._exitcodes import BAD_INPUT
from mesh.redact import redact_urls


def fail(message: object, code: int = BAD_INPUT) -> NoReturn:
    typer.secho(f"error: {redact_urls(str(message))}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)
