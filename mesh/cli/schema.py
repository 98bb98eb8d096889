"""``meshctl schema``: export the canonical contracts and check them for breaking changes.

``export DIR`` writes one JSON Schema per entity version (``customer.v1.schema.json``) and
``asyncapi.json``. ``check DIR`` compares the current schemas with that export: exit 0 when
nothing breaks (compatible changes are listed), 1 when something does (every breaking change is
listed with its path), 2 when the directory cannot be read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mesh.canonical.schema import check_schemas, export_schemas

__all__ = ["app"]

app = typer.Typer(
    name="schema",
    help="Export canonical JSON Schemas + AsyncAPI, and check them against a previous export.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

DirArg = Annotated[Path, typer.Argument(help="The export directory.", show_default=False)]


@app.command("export")
def _export(directory: DirArg) -> None:
    """Write every entity's JSON Schema (one file per version) and asyncapi.json into DIR."""
    try:
        written = export_schemas(directory)
    except OSError as exc:
        typer.secho(f"error: cannot write {directory}: {exc.strerror or exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    for path in written:
        typer.echo(str(path))


@app.command("check")
def _check(directory: DirArg) -> None:
    """Compare the current schemas with the export in DIR; exit 1 on any breaking change."""
    try:
        report = check_schemas(directory)
    except (OSError, ValueError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    for change in report.changes:
        typer.echo(str(change))
    breaking = report.breaking
    if breaking:
        typer.secho(
            f"{len(breaking)} breaking change(s): add a new schema version instead "
            "(the old one stays side by side)",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(1)
    typer.echo(f"ok: no breaking changes ({len(report.changes)} change(s) listed)")
