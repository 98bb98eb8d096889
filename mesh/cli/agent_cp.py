"""``meshctl agent register|deregister|revoke|list|health``: agents and the control plane.

The control plane is reached over NATS: ``--control-plane URL``, else ``$MESH_CONTROL_PLANE``,
else ``$MESH_NATS_URL``, else ``nats://127.0.0.1:4222`` (``register --config agent.toml`` takes
it from the agent's config). Exit codes: 0 done (``health``: healthy); 1 the control plane
refused (name taken, revoked, unknown agent) or, for ``health``, not healthy; 2 an error the
operator can fix (no control plane answering, unreadable state dir). One line on stderr, never
a stack trace.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import msgspec
import typer

from mesh.cli._common import (
    DEFAULT_PREFIX,
    DEFAULT_URL,
    ControlPlaneOpt,
    JsonOpt,
    PrefixOpt,
    TimeoutOpt,
    ago,
    fail,
    nats_access_defaults,
    run_with_client,
    table,
)
from mesh.controlplane.client import ControlPlaneClient, register_agent
from mesh.controlplane.identity import (
    CREDENTIALS_FILE,
    load_credentials,
    remove_credentials,
    save_credentials,
)
from mesh.controlplane.models import AgentView, FlowOp, Manifest
from mesh.errors import ConfigError

__all__ = ["app", "default_state_dir"]

app = typer.Typer(
    name="agent",
    help="Register agents with the control plane and see their health.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

NameArg = Annotated[str, typer.Argument(help="The agent's name.", show_default=False)]
StateDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        help="The agent's state directory (identity and credentials; default: from --config, "
        "else $XDG_STATE_HOME/mesh/NAME).",
        show_default=False,
    ),
]


def default_state_dir(name: str) -> Path:
    """``$XDG_STATE_HOME/mesh/<name>`` (``~/.local/state/mesh/<name>``)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "mesh" / name


def _views_json(views: list[AgentView]) -> None:
    typer.echo(msgspec.json.format(msgspec.json.encode(views), indent=2).decode())


@app.command("register")
def _register(
    site: Annotated[
        str | None,
        typer.Option(
            "--site",
            help="Where the agent runs (plant-1, eu-cloud; default: from --config).",
            show_default=False,
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Agent name (default: from --config).", show_default=False)
    ] = None,
    state_dir: StateDirOpt = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="Agent config (TOML): name, state dir and NATS URL.", show_default=False
        ),
    ] = None,
    adapters: Annotated[
        list[str] | None,
        typer.Option(
            "--adapter",
            help="An adapter the agent supports (repeat; default: every installed adapter).",
            show_default=False,
        ),
    ] = None,
    operations: Annotated[
        list[str] | None,
        typer.Option(
            "--operation", help="A system operation the agent exposes (repeat).", show_default=False
        ),
    ] = None,
    control_plane: ControlPlaneOpt = DEFAULT_URL,
    timeout: TimeoutOpt = 10.0,
    prefix: PrefixOpt = DEFAULT_PREFIX,
) -> None:
    """Register an agent (idempotent) and store its id and credentials in its state dir (0600)."""
    from mesh.config import load_agent_config
    from mesh.plugins import adapter_registry

    if config is not None:
        try:
            cfg = load_agent_config(config)
        except ConfigError as exc:
            fail(exc)
        name = name or cfg.agent.name
        site = site or cfg.agent.site
        state_dir = state_dir or Path(cfg.agent.state_dir)
        if not os.environ.get("MESH_CONTROL_PLANE") and control_plane == DEFAULT_URL:
            control_plane = cfg.nats.servers[0]
        nats_access_defaults(cfg.nats)  # its [nats] creds and [nats.tls], unless given here
    if name is None:
        fail("give --name (or --config with the agent's config)")
    if site is None:
        fail("give --site (or --config with the agent's config)")
    agent: str = name
    where: str = site
    directory = state_dir or default_state_dir(agent)
    try:
        installed = adapter_registry().names()
    except ConfigError as exc:
        fail(exc)
    # Where applied flows may keep files: `flow apply` refuses paths outside these up front.
    # (the agent runs its flows in its config's state_dir, whatever --state-dir says)
    allowed = [str(Path(p).resolve()) for p in cfg.agent.allowed_paths] if config is not None else []
    flow_root = Path(cfg.agent.state_dir) if config is not None else Path(directory)
    manifest = Manifest(
        adapters=list(adapters or installed),
        operations=list(operations or []),
        state_dir=str(flow_root.resolve()),
        allowed_paths=allowed,
    )
    try:
        current = load_credentials(directory)
    except ConfigError as exc:
        fail(exc)

    async def work(client: ControlPlaneClient) -> tuple[str, str]:
        reply, creds = await register_agent(
            client, name=agent, site=where, state_dir=str(directory), manifest=manifest, current=current
        )
        path = save_credentials(directory, creds)
        return reply.message or f"registered {agent} as {reply.agent_id}", str(path)

    message, path = run_with_client(control_plane, timeout, prefix, work)
    typer.echo(f"{message} (credentials in {path})")


@app.command("deregister")
def _deregister(
    name: NameArg,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            "--state-dir", help="Also delete the credentials kept in this state dir.", show_default=False
        ),
    ] = None,
    control_plane: ControlPlaneOpt = DEFAULT_URL,
    timeout: TimeoutOpt = 10.0,
    prefix: PrefixOpt = DEFAULT_PREFIX,
) -> None:
    """Forget an agent: its name becomes free and its credential stops working."""
    done = run_with_client(control_plane, timeout, prefix, lambda c: c.deregister(name))
    typer.echo(done.message)
    if state_dir is not None and remove_credentials(state_dir):
        typer.echo(f"removed {Path(state_dir) / CREDENTIALS_FILE}")


@app.command("revoke")
def _revoke(
    name: NameArg,
    reason: Annotated[str, typer.Option("--reason", help="Why (kept in the registry and the audit).")] = "",
    control_plane: ControlPlaneOpt = DEFAULT_URL,
    timeout: TimeoutOpt = 10.0,
    prefix: PrefixOpt = DEFAULT_PREFIX,
) -> None:
    """Revoke an agent: its heartbeats and re-registration are refused until it is deregistered."""
    done = run_with_client(control_plane, timeout, prefix, lambda c: c.revoke(name, reason=reason))
    typer.echo(done.message)


@app.command("list")
def _list(
    as_json: JsonOpt = False,
    control_plane: ControlPlaneOpt = DEFAULT_URL,
    timeout: TimeoutOpt = 5.0,
    prefix: PrefixOpt = DEFAULT_PREFIX,
) -> None:
    """List registered agents with their health."""
    reply = run_with_client(control_plane, timeout, prefix, lambda c: c.agents())
    if as_json:
        _views_json(reply.agents)
        return
    if not reply.agents:
        typer.echo("no agents registered")
        return
    table(
        ("NAME", "SITE", "HOST", "VERSION", "STATE", "HEALTH", "LAST HEARTBEAT", "OUTBOX", "ERRORS", "ID"),
        [
            (
                a.name,
                a.site,
                a.host,
                a.version,
                a.state,
                a.health,
                ago(a.last_heartbeat),
                a.outbox_depth,
                a.errors,
                a.agent_id,
            )
            for a in reply.agents
        ],
    )


@app.command(
    "health",
    help="Show agent health. With NAME, exit 0 only when that agent is healthy (1 otherwise), so "
    "scripts and probes can use it; without NAME, exit 1 when any agent is not healthy.",
)
def _health(
    name: Annotated[str | None, typer.Argument(help="Only this agent.", show_default=False)] = None,
    as_json: JsonOpt = False,
    control_plane: ControlPlaneOpt = DEFAULT_URL,
    timeout: TimeoutOpt = 5.0,
    prefix: PrefixOpt = DEFAULT_PREFIX,
) -> None:
    """Show agent health (see the command help for the exit codes)."""
    reply = run_with_client(control_plane, timeout, prefix, lambda c: c.agents(name))
    views = reply.agents
    if as_json:
        _views_json(views)
    elif not views:
        typer.echo("no agents registered")
    else:
        table(
            ("NAME", "HEALTH", "STATE", "LAST HEARTBEAT", "WHY"),
            [(a.name, a.health, a.state, ago(a.last_heartbeat), a.reason or "-") for a in views],
        )
    if any(a.health != "healthy" or a.state != "active" for a in views):
        raise typer.Exit(1)


def _agent_command(op: FlowOp, help_text: str) -> None:
    @app.command(op, help=help_text + "\n\nWaits for the agent's answer; exit 1 if a flow failed.")
    def command(
        name: NameArg,
        wait: Annotated[
            float, typer.Option("--wait", help="Seconds the agent gets to carry it out.")
        ] = 60.0 if op == "drain" else 30.0,
        as_json: JsonOpt = False,
        control_plane: ControlPlaneOpt = DEFAULT_URL,
        prefix: PrefixOpt = DEFAULT_PREFIX,
    ) -> None:
        from mesh.cli.flow import print_result

        result = run_with_client(
            control_plane, wait, prefix, lambda c: c.command(op, agent=name, timeout=wait)
        )
        print_result(result, as_json)


_agent_command(
    "pause", "Pause every flow of the agent (until resumed or the agent restarts; use `flow pause` to keep "
    "a flow paused across restarts).",
)  # fmt: skip
_agent_command("resume", "Resume every paused or drained flow of the agent.")
_agent_command("drain", "Drain every flow of the agent (capture stops, backlog published and applied).")
_agent_command("restart", "Restart every flow of the agent (adapters reopened; the process keeps running).")
