"""``meshctl capture``: install, remove and inspect the trigger-based change capture of the
sources of an agent config whose adapter declares the ``capture`` capability (built in: the
``changes``-mode SQL sources, SQLite and PostgreSQL; see :class:`mesh.plugins.ChangeCapture`).

``install`` is idempotent and brings out-of-date triggers up to date (the table's columns or the
key changed) without losing changes not yet read; ``remove`` drops triggers and, unless
``--keep-changes``, the change table; ``status`` shows per flow whether capture is installed and
current and how many changes wait, and exits 1 when any is missing or out of date. Errors the
operator can fix (bad config, unknown flow, database unreachable) print one line and exit 2.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated

import anyio
import typer

from mesh.cli._output import fail
from mesh.config import AdapterConfig, FlowConfig, load_agent_config
from mesh.errors import MeshError
from mesh.plugins import ChangeCapture, adapter_registry

__all__ = ["app"]

app = typer.Typer(
    name="capture",
    help="Install, remove and inspect change capture (triggers + change table) of SQL sources.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ConfigOpt = Annotated[
    Path, typer.Option("--config", "-c", help="Agent config file (TOML).", show_default=False)
]
FlowOpt = Annotated[
    str | None,
    typer.Option("--flow", help="Only this flow (default: every flow with a changes-mode SQL source).",
                 show_default=False),
]  # fmt: skip

_Target = tuple[FlowConfig, AdapterConfig, ChangeCapture]


_fail = fail


def _targets(config: Path, flow: str | None) -> list[_Target]:
    """The flows whose source has trigger-based capture (``mode = "changes"``)."""
    try:
        cfg = load_agent_config(config)
    except MeshError as exc:
        _fail(exc)
    flows = cfg.flows
    if flow is not None:
        flows = [f for f in flows if f.name == flow]
        if not flows:
            _fail(
                f"{config}: no flow named {flow!r} (flows: {', '.join(f.name for f in cfg.flows) or 'none'})"
            )
    targets: list[_Target] = []
    registry = adapter_registry()
    for f in flows:
        src = f.source
        capture = registry.capture_of(src) if src is not None else None
        if src is not None and capture is not None:
            targets.append((f, src, capture))
        elif flow is not None:
            what = (
                "no source"
                if src is None
                else f"a {src.__struct_config__.tag} source in {getattr(src, 'mode', '')} mode"
            )
            _fail(
                f"flow {flow!r} has {what}: change capture applies to sources whose adapter installs it"
                " (SQL sources in changes mode)"
            )
    if not targets:
        _fail(f"{config}: no flow has a source with installable change capture (SQL in changes mode)")
    return targets


def _each(targets: list[_Target], action: Callable[[ChangeCapture, AdapterConfig], Awaitable[str]]) -> bool:
    """Run ``action`` per flow, printing ``flow: where: result``; False if any failed."""
    ok = True

    async def run() -> None:
        nonlocal ok
        for flow, src, capture in targets:
            try:
                result = await action(capture, src)
            except MeshError as exc:
                typer.secho(f"{flow.name}: {capture.where(src)}: error: {exc}", fg=typer.colors.RED, err=True)
                ok = False
                continue
            typer.echo(f"{flow.name}: {capture.where(src)}: {result}")

    anyio.run(run)
    return ok


@app.command("install")
def _install(config: ConfigOpt, flow: FlowOpt = None) -> None:
    """Create (or bring up to date) the change table and triggers of each changes-mode source."""

    async def install(capture: ChangeCapture, src: AdapterConfig) -> str:
        changed = await capture.install(src)
        return "installed (or updated)" if changed else "already installed and up to date"

    if not _each(_targets(config, flow), install):
        raise typer.Exit(2)


@app.command("remove")
def _remove(
    config: ConfigOpt,
    flow: FlowOpt = None,
    keep_changes: Annotated[
        bool, typer.Option("--keep-changes", help="Keep the change table and the changes not yet read.")
    ] = False,
) -> None:
    """Drop the capture triggers (and, unless --keep-changes, the change table) of each source."""

    async def remove(capture: ChangeCapture, src: AdapterConfig) -> str:
        removed = await capture.remove(src, keep_changes=keep_changes)
        return "removed" if removed else "nothing installed"

    if not _each(_targets(config, flow), remove):
        raise typer.Exit(2)


@app.command("status")
def _status(config: ConfigOpt, flow: FlowOpt = None) -> None:
    """Show whether capture is installed and current, and how many changes wait (exit 1 if any
    is missing or out of date)."""
    current = True

    async def status(capture: ChangeCapture, src: AdapterConfig) -> str:
        nonlocal current
        state = await capture.status(src)
        current = current and state.installed and state.up_to_date
        if not state.installed:
            text = "not installed"
        else:
            text = "installed, " + (
                "up to date" if state.up_to_date else "OUT OF DATE (run `meshctl capture install`)"
            )
        waiting = f"{state.pending} change{'' if state.pending == 1 else 's'} waiting in {state.change_table}"
        if state.oldest_at is not None:
            waiting += f" (oldest {max(0.0, time.time() - state.oldest_at):.0f}s old)"
        return f"{text}; {waiting}" if state.installed or state.pending else text

    if not _each(_targets(config, flow), status):
        raise typer.Exit(2)
    if not current:
        raise typer.Exit(1)
