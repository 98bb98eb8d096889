"""``meshctl files``: the run records of batch imports and exports (CSV: ``adapters/files``).

``meshctl files runs --config agent.toml [--flow NAME] [--json]`` lists, newest first, every
run of every flow of that agent whose source or sink has the ``runs`` capability (built in:
``adapter = "csv"``; see :class:`mesh.plugins.RunLog`), read from the adapters' state files
(read-only: safe beside a running agent). A bad config, an unknown flow or an unreadable state
file prints one line and exits 2.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer

from mesh.cli._common import JsonOpt, fail, table
from mesh.config import load_agent_config
from mesh.errors import MeshError
from mesh.plugins import RunLog, adapter_registry

__all__ = ["FlowRun", "app"]

app = typer.Typer(
    name="files",
    help="CSV file imports and exports: run records.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


class FlowRun(msgspec.Struct, frozen=True, kw_only=True):
    """One run record, with the flow it belongs to (the ``--json`` output is a list of these)."""

    flow: str
    id: int
    direction: str
    status: str
    file: str
    checksum: str | None
    started_at: float
    finished_at: float | None
    rows_in: int
    rows_out: int
    rows_failed: int
    detail: str
    rejects_file: str | None
    moved_to: str | None
    state_path: str


@app.callback()
def _files() -> None:
    """CSV file imports and exports: run records."""


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


@app.command("runs")
def _runs(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="Agent config file (TOML).", show_default=False)
    ],
    flow: Annotated[
        str | None, typer.Option("--flow", help="Only this flow's runs.", show_default=False)
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="At most N runs per flow.", show_default=False)
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """List import and export runs: status, counts in/out/failed, file, SHA-256, rejects."""
    try:
        cfg = load_agent_config(config)
        registry = adapter_registry()
    except MeshError as exc:
        fail(exc)
    places: dict[tuple[str, str], tuple[RunLog, Any]] = {}
    for f in cfg.flows:
        if flow is not None and f.name != flow:
            continue
        for side in (f.source, f.sink):
            log = registry.runs_of(side) if side is not None else None
            if log is not None:  # a source and sink may share one state file: read it once
                places.setdefault((f.name, log.location(side)), (log, side))
    if not places:
        which = f"flow {flow!r}" if flow is not None else "any flow"
        fail(f"{config}: {which} has no csv source or sink (no adapter with run records)")
    runs: list[FlowRun] = []
    for (name, state), (log, side) in places.items():
        try:
            records = log.read(side, limit=limit)
        except MeshError as exc:
            fail(exc)
        runs.extend(FlowRun(flow=name, state_path=state, **msgspec.structs.asdict(r)) for r in records)
    runs.sort(key=lambda r: (r.started_at, r.id), reverse=True)
    if as_json:
        typer.echo(msgspec.json.format(msgspec.json.encode(runs), indent=2).decode())
        return
    if not runs:
        typer.echo("no runs yet")
        return
    head = ["FLOW", "RUN", "DIRECTION", "STATUS", "STARTED", "FINISHED", "IN", "OUT", "FAILED", "SHA256"]
    table(
        [*head, "FILE"],
        [
            [
                r.flow, r.id, r.direction, r.status, _when(r.started_at), _when(r.finished_at),
                r.rows_in, r.rows_out, r.rows_failed, (r.checksum or "-")[:12],
                r.file + (f"  ({r.detail})" if r.detail else "")
                + (f"  rejects: {r.rejects_file}" if r.rejects_file else ""),
            ]
            for r in runs
        ],
    )  # fmt: skip
