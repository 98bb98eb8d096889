"""``meshctl capture``: install, remove and inspect the trigger-based change capture of the
``changes``-mode SQL sources (SQLite and PostgreSQL) of an agent config.

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
from typing import Annotated, Any, NoReturn

import anyio
import typer

from mesh.config import FlowConfig, PostgresSourceConfig, SqliteSourceConfig, load_agent_config
from mesh.errors import MeshError

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

_Target = tuple[FlowConfig, SqliteSourceConfig | PostgresSourceConfig]


def _fail(message: object) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


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
    for f in flows:
        src = f.source
        if isinstance(src, SqliteSourceConfig | PostgresSourceConfig) and src.mode == "changes":
            targets.append((f, src))
        elif flow is not None:
            what = (
                "no source"
                if src is None
                else f"a {src.__struct_config__.tag} source in {getattr(src, 'mode', '')} mode"
            )
            _fail(f"flow {flow!r} has {what}: change capture applies to SQL sources in changes mode")
    if not targets:
        _fail(f"{config}: no flow has a SQL source in changes mode")
    return targets


def _where(src: SqliteSourceConfig | PostgresSourceConfig) -> str:
    if isinstance(src, SqliteSourceConfig):
        return f"sqlite {src.path} {src.table}"
    from adapters.sql._pg_common import where_of

    return where_of(src.dsn, src.schema, src.table)


def _each(
    targets: list[_Target], action: Callable[[SqliteSourceConfig | PostgresSourceConfig], Awaitable[str]]
) -> bool:
    """Run ``action`` per flow, printing ``flow: where: result``; False if any failed."""
    ok = True

    async def run() -> None:
        nonlocal ok
        for flow, src in targets:
            try:
                result = await action(src)
            except MeshError as exc:
                typer.secho(f"{flow.name}: {_where(src)}: error: {exc}", fg=typer.colors.RED, err=True)
                ok = False
                continue
            typer.echo(f"{flow.name}: {_where(src)}: {result}")

    anyio.run(run)
    return ok


@app.command("install")
def _install(config: ConfigOpt, flow: FlowOpt = None) -> None:
    """Create (or bring up to date) the change table and triggers of each changes-mode source."""
    from adapters.sql import postgres, sqlite

    async def install(src: SqliteSourceConfig | PostgresSourceConfig) -> str:
        if isinstance(src, SqliteSourceConfig):
            changed = await sqlite.install_change_capture(src.path, src.table, key=src.key)
        else:
            changed = await postgres.install_change_capture(src)
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
    from adapters.sql import postgres, sqlite

    async def remove(src: SqliteSourceConfig | PostgresSourceConfig) -> str:
        if isinstance(src, SqliteSourceConfig):
            removed = await sqlite.remove_change_capture(src.path, src.table, keep_changes=keep_changes)
        else:
            removed = await postgres.remove_change_capture(src, keep_changes=keep_changes)
        return "removed" if removed else "nothing installed"

    if not _each(_targets(config, flow), remove):
        raise typer.Exit(2)


@app.command("status")
def _status(config: ConfigOpt, flow: FlowOpt = None) -> None:
    """Show whether capture is installed and current, and how many changes wait (exit 1 if any
    is missing or out of date)."""
    from adapters.sql import postgres
    from adapters.sql._sqlite_capture import capture_status

    current = True

    async def status(src: SqliteSourceConfig | PostgresSourceConfig) -> str:
        nonlocal current
        state: Any
        if isinstance(src, SqliteSourceConfig):
            state = await capture_status(src.path, src.table, key=src.key)
        else:
            state = await postgres.change_capture_status(src)
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
