"""``meshctl agent register|deregister|revoke|list|health|token``: agents and the control plane.

Security on (the control plane runs with ``--security-dir``): ``agent token create`` makes a
one-time enrollment token for one agent name; ``agent register --config agent.toml --token T``
generates the agent's NATS key (or keeps the seed of its existing creds file), registers with
the token's credentials, and writes the returned user JWT with the agent's seed to the config's
``[nats] creds`` file (0600). A registered agent re-registers with its own creds, no token.

The control plane is reached over NATS: ``--control-plane URL``, else ``$MESH_CONTROL_PLANE``,
else ``$MESH_NATS_URL``, else ``nats://127.0.0.1:4222`` (``register --config agent.toml`` takes
it from the agent's config). Exit codes: 0 done (``health``: healthy); 1 the control plane
refused (name taken, revoked, unknown agent) or, for ``health``, not healthy; 2 an error the
operator can fix (no control plane answering, unreadable state dir). One line on stderr, never
a stack trace.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

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
from mesh.cli._output import command_group, echo_json
from mesh.controlplane.client import ControlPlaneClient, register_agent
from mesh.controlplane.identity import (
    CREDENTIALS_FILE,
    load_credentials,
    remove_credentials,
    save_credentials,
)
from mesh.controlplane.models import FlowOp, Manifest
from mesh.errors import ConfigError
from mesh.security.authority import EnrollmentToken, parse_enrollment_token, read_creds, write_creds
from mesh.security.jwt import InvalidToken, new_seed, public_key_of_seed

if TYPE_CHECKING:
    from mesh.config import AgentConfig

__all__ = ["app", "default_state_dir"]

app = command_group("agent", "Register agents with the control plane and see their health.")

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
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="MESH_ENROLL_TOKEN",
            help="Enrollment token (`meshctl agent token create`; env MESH_ENROLL_TOKEN): security "
            "on, writes the agent's NATS creds to its config's [nats] creds.",
            show_default=False,
        ),
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option("--token-file", help="Read the enrollment token from this file.", show_default=False),
    ] = None,
    control_plane: ControlPlaneOpt = DEFAULT_URL,
    timeout: TimeoutOpt = 10.0,
    prefix: PrefixOpt = DEFAULT_PREFIX,
) -> None:
    """Register an agent (idempotent) and store its id and credentials in its state dir (0600);
    with --token (or an existing [nats] creds file), also its NATS creds."""
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
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            fail(f"--token-file: cannot read {token_file}: {exc.strerror}")
    enroll = None
    if token is not None or (config is not None and cfg.nats.creds is not None):
        if config is None:
            fail("--token needs --config (the agent's config, whose [nats] creds receives its credentials)")
        enroll = _enrollment(cfg, token, name)
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
        allowed_env=list(cfg.agent.allowed_env) if config is not None else None,
    )
    try:
        current = load_credentials(directory)
    except ConfigError as exc:
        fail(exc)

    if config is not None:
        manifest = msgspec.structs.replace(
            manifest,
            system=cfg.agent.system,
            sources=[f.name for f in cfg.flows if f.source is not None],
            sinks=[f.name for f in cfg.flows if f.sink is not None],
            operations=list(operations or [])
            or ([op.name for op in cfg.api.operations] if cfg.api is not None else []),
        )

    async def work(client: ControlPlaneClient) -> tuple[str, str]:
        reply, creds = await register_agent(
            client, name=agent, site=where, state_dir=str(directory), manifest=manifest, current=current,
            public_key=enroll.public_key if enroll else None,
            enrollment=enroll.token_id if enroll else None,
        )  # fmt: skip
        path = save_credentials(directory, creds)
        message = reply.message or f"registered {agent} as {reply.agent_id}"
        if enroll is not None and reply.jwt:
            write_creds(enroll.creds_path, reply.jwt, enroll.seed)
            message += f"; NATS creds in {enroll.creds_path}"
        elif enroll is not None and enroll.token is not None:
            raise ConfigError("the control plane issued no NATS credentials (is its security on?)")
        return message, str(path)

    if enroll is None:
        message, path = run_with_client(control_plane, timeout, prefix, work)
    else:
        with enroll.connect_creds() as connect_with:
            message, path = run_with_client(
                control_plane, timeout, prefix, work, creds=connect_with, inbox_prefix=f"_INBOX.{agent}"
            )
    typer.echo(f"{message} (credentials in {path})")


class _Enroll:
    """What an agent registers with, security on: its seed and public key, the enrollment
    token (None: it re-registers with its own creds file), and where its creds go."""

    def __init__(self, creds_path: Path, seed: str, token: EnrollmentToken | None) -> None:
        self.creds_path = creds_path
        self.seed = seed
        self.public_key = public_key_of_seed(seed)
        self.token = token
        self.token_id = token.token_id if token is not None else None

    @contextlib.contextmanager
    def connect_creds(self) -> Iterator[str]:
        """The creds file to connect with: the token's (a temporary 0600 file, removed after)
        or the agent's own."""
        if self.token is None:
            yield str(self.creds_path)
            return
        with tempfile.TemporaryDirectory(prefix="mesh-enroll-") as tmp:
            yield str(write_creds(Path(tmp) / "enroll.creds", self.token.jwt, self.token.seed))


def _enrollment(cfg: AgentConfig, token: str | None, name: str | None) -> _Enroll:
    """Check the token and the config's creds path; the agent's seed (its creds file's, else new).
    Exits 2 with one line on any problem."""
    agent = name or cfg.agent.name
    if cfg.nats.creds is None:
        fail(f"agent {agent}: its config has no [nats] creds = \"<path>\": add one (where its NATS "
             "credentials are written) and register again")  # fmt: skip
    path = Path(cfg.nats.creds)
    parsed = None
    if token is not None:
        try:
            parsed = parse_enrollment_token(token)
        except InvalidToken as exc:
            fail(f"--token: {exc}")
        if parsed.name != agent:
            fail(f"--token: the enrollment token is for agent {parsed.name!r}, not {agent!r}")
    seed: str
    if path.exists():
        try:
            seed = read_creds(path).seed
        except (ConfigError, InvalidToken) as exc:
            fail(f"{path}: {exc} (remove it to start with a new key)")
    elif parsed is None:
        fail(f"agent {agent}: {path} does not exist and no --token given: ask for an enrollment token "
             f"(`meshctl agent token create --name {agent}`)")  # fmt: skip
    else:
        seed = new_seed("user").decode()
    return _Enroll(path, seed, parsed)


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
        echo_json(reply.agents)
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
        echo_json(views)
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
        wait: Annotated[float, typer.Option("--wait", help="Seconds the agent gets to carry it out.")] = 60.0
        if op == "drain"
        else 30.0,
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


token_app = command_group(
    "token", "Enrollment tokens: one-time, expiring permission for one agent name to register."
)
app.add_typer(token_app)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _parse_ttl(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``1h``, ``7d`` as seconds. Raises ConfigError."""
    t = text.strip().lower()
    unit = _UNITS.get(t[-1:])
    number = t[:-1] if unit is not None else t
    try:
        value = float(number) * (unit or 1)
    except ValueError:
        raise ConfigError(f"--ttl: expected a duration like 30m, 1h or 7d, got {text!r}") from None
    if not value > 0:
        raise ConfigError(f"--ttl: must be positive, got {text!r}")
    return value


@token_app.command("create")
def _token_create(
    name: Annotated[str, typer.Option("--name", help="The agent the token enrolls.", show_default=False)],
    ttl: Annotated[str, typer.Option("--ttl", help="How long it stays valid (30m, 1h, 7d).")] = "1h",
    systems: Annotated[
        list[str] | None,
        typer.Option(
            "--system",
            help="A system the agent may publish events of (repeat); its static flows run only within these.",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Write the token to this file (0600) instead of stdout.",
            show_default=False,
        ),
    ] = None,
    control_plane: ControlPlaneOpt = DEFAULT_URL,
    timeout: TimeoutOpt = 10.0,
    prefix: PrefixOpt = DEFAULT_PREFIX,
) -> None:
    """Create a one-time enrollment token for agent NAME (the control plane must run with
    --security-dir). Give it to whoever runs `meshctl agent register --token`."""
    try:
        seconds = _parse_ttl(ttl)
    except ConfigError as exc:
        fail(exc)
    made = run_with_client(
        control_plane, timeout, prefix, lambda c: c.token_create(name, ttl=seconds, systems=systems)
    )
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(made.expires))
    if output is not None:
        from mesh.security._files import write_private

        write_private(output, made.token + "\n")
        typer.echo(f"enrollment token for {made.name} written to {output} (expires {expires})")
    else:
        typer.echo(made.token)
        typer.echo(f"(one use, for agent {made.name}, expires {expires})", err=True)


@token_app.command("list")
def _token_list(
    as_json: JsonOpt = False,
    control_plane: ControlPlaneOpt = DEFAULT_URL,
    timeout: TimeoutOpt = 5.0,
    prefix: PrefixOpt = DEFAULT_PREFIX,
) -> None:
    """List enrollment tokens (id, agent, systems, expiry, used; never the tokens themselves)."""
    reply = run_with_client(control_plane, timeout, prefix, lambda c: c.tokens())
    if as_json:
        echo_json(reply.tokens)
        return
    if not reply.tokens:
        typer.echo("no enrollment tokens")
        return
    now = time.time()
    table(
        ("AGENT", "SYSTEMS", "STATE", "EXPIRES", "CREATED BY", "ID"),
        [
            (
                t.name,
                ",".join(t.systems) or "-",
                "used" if t.used else ("expired" if t.expires <= now else "valid"),
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t.expires)),
                t.created_by,
                t.token_id,
            )
            for t in reply.tokens
        ],
    )
