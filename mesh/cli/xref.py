"""``meshctl xref``: the cross-reference of a REST sink, canonical key -> the id the target
assigned on create (``results.id``), read from the sink's state file (read-only: safe beside a
running agent)::

    meshctl xref get FLOW KEY --config agent.toml [--json]
    meshctl xref list FLOW --config agent.toml [--json]

A row without an id is a create that was sent and whose answer was not seen yet: the sink looks
it up (``lookup``) before it sends anything else for that key. A bad config, a flow without a
REST sink or a missing state file prints one line and exits 2; ``get`` of a key with no row
exits 1.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import msgspec
import typer

from adapters.rest._state import XrefRow, default_target, read_xrefs
from adapters.rest.config import RestSinkConfig
from mesh.cli._common import JsonOpt, fail, table
from mesh.config import load_agent_config
from mesh.errors import MeshError

__all__ = ["XrefEntry", "app"]

app = typer.Typer(
    name="xref",
    help="Ids a REST target assigned to the mesh's records (the sink's cross-reference).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ConfigOpt = Annotated[
    Path, typer.Option("--config", "-c", help="Agent config file (TOML).", show_default=False)
]


class XrefEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One row (the ``--json`` output): ``id`` is null while a create's answer is unknown."""

    flow: str
    key: str
    id: str | None
    pending_version: int | None
    updated_at: int
    target: str
    state_path: str


@app.callback()
def _xref() -> None:
    """Ids a REST target assigned to the mesh's records (the sink's cross-reference)."""


def _rows(config: Path, flow: str, key: str | None) -> list[XrefEntry]:
    try:
        cfg = load_agent_config(config)
    except MeshError as exc:
        fail(exc)
    found = [f for f in cfg.flows if f.name == flow]
    if not found:
        fail(f"{config}: no flow {flow!r} (flows: {', '.join(f.name for f in cfg.flows) or 'none'})")
    sink = found[0].sink
    if not isinstance(sink, RestSinkConfig):
        fail(f'{config}: flow {flow!r} has no REST sink (adapter = "rest"); only REST sinks keep ids')
    path = sink.upsert_path if sink.upsert_path is not None else sink.create.path  # type: ignore[union-attr]
    target = default_target(sink.base_url, path)
    try:
        rows: list[XrefRow] = read_xrefs(sink.state_path, key=key)
    except MeshError as exc:
        fail(exc)
    return [
        XrefEntry(
            flow=flow,
            key=r.key,
            id=r.id,
            pending_version=r.pending_version,
            updated_at=r.updated_at,
            target=r.target,
            state_path=sink.state_path,
        )
        for r in rows
        if r.target == target
    ]


def _print(rows: list[XrefEntry], as_json: bool) -> None:
    if as_json:
        typer.echo(msgspec.json.format(msgspec.json.encode(rows), indent=2).decode())
        return
    when = "%Y-%m-%dT%H:%M:%SZ"
    table(
        ["KEY", "TARGET ID", "UPDATED"],
        [
            [r.key, r.id or f"(create of v{r.pending_version} sent, answer unknown)",
             time.strftime(when, time.gmtime(r.updated_at))]
            for r in rows
        ],
    )  # fmt: skip


@app.command("get")
def _get(
    flow: Annotated[str, typer.Argument(help="The flow whose sink keeps the ids.")],
    key: Annotated[str, typer.Argument(help="The record's canonical key.")],
    config: ConfigOpt,
    as_json: JsonOpt = False,
) -> None:
    """The id the target holds for KEY (exit 1 if the sink has none)."""
    rows = _rows(config, flow, key)
    if not rows:
        fail(f"flow {flow!r}: no id for key {key!r} (never created through this sink)", code=1)
    if as_json:
        typer.echo(msgspec.json.format(msgspec.json.encode(rows[0]), indent=2).decode())
        return
    _print(rows, as_json=False)


@app.command("list")
def _list(
    flow: Annotated[str, typer.Argument(help="The flow whose sink keeps the ids.")],
    config: ConfigOpt,
    as_json: JsonOpt = False,
) -> None:
    """Every key -> id of the flow's REST sink, by key."""
    rows = _rows(config, flow, None)
    if not rows and not as_json:
        typer.echo("no ids yet")
        return
    _print(rows, as_json)
