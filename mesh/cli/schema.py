"""``meshctl schema``: export the canonical contracts and check them for breaking changes; and
``meshctl config schema``: the JSON Schema of the agent config file.

``export DIR`` writes one JSON Schema per entity version (``customer.v1.schema.json``) and
``asyncapi.json``. ``check DIR`` compares the current schemas with that export: exit 0 when
nothing breaks (compatible changes are listed), 1 when something does (every breaking change is
listed with its path), 2 when the directory cannot be read. A new version that old readers
cannot take (or whose readers cannot take the old one) gets a note: it cannot be mixed with the
previous version while agents are upgraded one at a time.

``config schema`` prints (or writes with ``--output``) the JSON Schema of an agent config with
the installed adapters' options, each with its documentation (for editors and CI linting of
TOML configs, e.g. with taplo or check-jsonschema); docs/config-reference.md is the same as a
page.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mesh.canonical.schema import check_schemas, export_schemas
from mesh.cli._exitcodes import BAD_INPUT, NOT_OK
from mesh.cli._output import fail
from mesh.errors import MeshError

__all__ = ["app", "config_app"]

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
        raise typer.Exit(BAD_INPUT) from None
    for path in written:
        typer.echo(str(path))


@app.command("check")
def _check(directory: DirArg) -> None:
    """Compare the current schemas with the export in DIR; exit 1 on any breaking change."""
    try:
        report = check_schemas(directory)
    except (OSError, ValueError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(BAD_INPUT) from None
    for change in report.changes:
        typer.echo(str(change))
    for schema, changes in report.not_mixable.items():
        paths = ", ".join(c.path for c in changes)
        typer.echo(
            f"note: {schema} cannot be mixed with the previous version in a rolling upgrade ({paths}): "
            "drain and upgrade every agent of the entity together, or add only optional fields"
        )
    breaking = report.breaking
    if breaking:
        typer.secho(
            f"{len(breaking)} breaking change(s): add a new schema version instead "
            "(the old one stays side by side)",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(NOT_OK)
    typer.echo(f"ok: no breaking changes ({len(report.changes)} change(s) listed)")


config_app = typer.Typer(
    name="config", help="Agent config files.", pretty_exceptions_enable=False, add_completion=False
)
"""Commands that join ``meshctl config`` (registered by :mod:`mesh.cli.main`)."""


@config_app.command("schema")
def _config_schema(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write it to this file instead of stdout.")
    ] = None,
) -> None:
    """Print the JSON Schema of an agent config file (every option of every installed adapter)."""
    import json

    from mesh.devtools.config_docs import agent_config_schema

    try:
        text = json.dumps(agent_config_schema(), indent=2, sort_keys=True) + "\n"
    except MeshError as exc:  # a broken adapter plugin
        fail(exc)
    if output is None:
        typer.echo(text, nl=False)
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        fail(f"--output: cannot write {output}: {exc.strerror or exc}")
    typer.echo(f"wrote {output}")
