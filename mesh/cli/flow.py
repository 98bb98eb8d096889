"""``meshctl flow``: operate flows on the broker. ``replay`` makes a flow's sink consumer
redeliver from a stream sequence or a point in time.

Errors the operator can fix (server down, no such consumer, a bad time) print one line and
exit 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import anyio
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
    connection,
    fail,
    run_with_client,
    table,
)
from mesh.cli._output import command_group, echo_json
from mesh.cli.dlq import ServerOpt, quiet_connection_logs
from mesh.controlplane.client import ControlPlaneClient
from mesh.controlplane.models import (
    AgentCommand,
    CommandResult,
    FlowOp,
    FlowOutcome,
    FlowsApplied,
    FlowSpecView,
    encode,
)
from mesh.controlplane.status import CONFIG_FILE
from mesh.dlq import DEFAULT_NATS_URL, FlowReplay, format_time, parse_time, replay_flow
from mesh.errors import MeshError

__all__ = ["app", "print_result"]

app = command_group("flow", "Operate flows on the broker.")


@app.callback()
def _flow() -> None:
    """Operate flows on the broker."""


@app.command(
    "replay",
    help="Make the flow's durable consumer redeliver from --since TIME or --from-seq N.\n\n"
    "The running sink agent keeps its binding; every redelivered message goes through its inbox and "
    "version guard again, so nothing applies twice and no old version overwrites a newer one. "
    "Needs nats-server 2.14+ (consumer reset API).",
)
def _replay(
    name: Annotated[str, typer.Argument(help="The flow's name.", show_default=False)],
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            help="Redeliver from the first message at or after TIME: ISO-8601 (UTC if no zone) "
            "or 15m, 2h, 1d.",
            show_default=False,
        ),
    ] = None,
    from_seq: Annotated[
        int | None,
        typer.Option("--from-seq", help="Redeliver from this MESH_EVENTS sequence.", show_default=False),
    ] = None,
    sink_system: Annotated[
        str | None,
        typer.Option(
            "--sink-system",
            help="The sink's system: the consumer is <flow>-<system> (needed when several sinks "
            "consume the flow).",
            show_default=False,
        ),
    ] = None,
    server: ServerOpt = DEFAULT_NATS_URL,
) -> None:
    """Make the flow's durable consumer redeliver from a point (help above)."""
    if (since is None) == (from_seq is None):
        fail("give exactly one of --since TIME or --from-seq N")
    start = None
    if since is not None:
        try:
            start = parse_time(since)
        except ValueError as exc:
            fail(f"--since: {exc}")

    quiet_connection_logs()

    async def main() -> FlowReplay:
        async with connection(server, 5.0) as js:
            return await replay_flow(js, name, sink_system=sink_system, since=start, from_seq=from_seq)

    try:
        result = anyio.run(main)
    except MeshError as exc:
        fail(exc)
        return
    where = f"{result.stream}, filter {result.filter_subject}"
    if not result.reset:
        typer.echo(f"consumer {result.consumer} ({where}): {result.note}")
        return
    origin = f" (first message since {format_time(start)})" if start is not None else ""
    typer.echo(
        f"consumer {result.consumer} ({where}) reset: redelivering from stream seq {result.from_seq}{origin}"
    )
    typer.echo(
        f"  now pending: {result.pending} to deliver, {result.ack_pending} awaiting ack "
        f"(stream last seq {result.stream_last_seq})"
    )
    typer.echo("  the sink agent's inbox and version guard keep the replayed messages from applying twice")


# --- flows through the control plane ---------------------------------------------------------

FlowNameArg = Annotated[str, typer.Argument(help="The flow's name.", show_default=False)]
AgentOpt = Annotated[
    str | None,
    typer.Option(
        "--agent", help="Only on this agent (default: every agent that runs the flow).", show_default=False
    ),
]


@app.command(
    "apply",
    help="Validate a flow file and store its flows; the agents named in it start, reconfigure or keep "
    "them without a restart.\n\nNothing is stored unless the whole file is valid: every problem is "
    "listed with its path (exit 1). Re-applying an unchanged flow changes nothing.",
)
def _apply(
    file: Annotated[Path, typer.Argument(help="Flow file (TOML, [[flows]] tables).", show_default=False)],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and show what would change.")] = False,
    connect: Annotated[
        bool,
        typer.Option(
            "--connect",
            help="With --dry-run: each agent named in the file checks its side of every flow against "
            "the real systems (credentials, tables, key columns, capture, mapped columns, API auth), "
            "as it would run it; every problem is listed with its path (exit 1). Nothing changes.",
        ),
    ] = False,
    as_json: JsonOpt = False,
    control_plane: ControlPlaneOpt = DEFAULT_URL,
    timeout: TimeoutOpt = 10.0,
    prefix: PrefixOpt = DEFAULT_PREFIX,
) -> None:
    if connect and not dry_run:
        fail("--connect needs --dry-run (check first, then apply)")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"{file}: cannot read: {getattr(exc, 'strerror', None) or exc}")

    async def work(c: ControlPlaneClient) -> tuple[FlowsApplied, list[FlowOutcome]]:
        reply = await c.apply_flows(text, source=str(file), dry_run=dry_run)
        checked = await _preflight_parts(c, text, timeout) if connect else []
        return reply, checked

    reply, checked = run_with_client(control_plane, timeout, prefix, work)
    if as_json:
        echo_json({"applied": reply, "preflight": checked} if connect else reply)
    else:
        verb = "would be" if reply.dry_run else ""
        for ch in reply.changes:
            what = ch.action if not verb else f"{verb} {ch.action}"
            typer.echo(f"flow {ch.name}: {what} (generation {ch.generation}) on {', '.join(ch.agents)}")
        for o in checked:
            if o.ok:
                typer.echo(f"{file}: {o.flow}: {o.agent}: {o.message}")
            else:
                typer.secho(f"{file}: {o.message} (agent {o.agent})", fg=typer.colors.RED, err=True)
    if any(not o.ok for o in checked):
        raise typer.Exit(1)


def _split_flow_file(text: str) -> list[tuple[int, str, str, dict[str, Any]]]:
    """(index, flow name, agent, the config that agent would run) for every side of every flow
    of a flow file the control plane accepted (so its shape is known to be right)."""
    import tomllib

    parts = []
    for i, flow in enumerate(tomllib.loads(text).get("flows", [])):
        common = {k: v for k, v in flow.items() if k not in ("agent", "source", "sink")}
        by_agent: dict[str, dict[str, Any]] = {}
        for side in ("source", "sink"):
            if side in flow:
                part = dict(flow[side])
                agent = str(part.pop("agent", flow.get("agent")))
                by_agent.setdefault(agent, dict(common))[side] = part
        parts += [(i, str(flow.get("name")), agent, config) for agent, config in by_agent.items()]
    return parts


async def _preflight_parts(c: ControlPlaneClient, text: str, timeout: float) -> list[FlowOutcome]:
    """Ask each agent to preflight its share of each flow, on its command subject; problems come
    back as failed outcomes whose message starts with the file path (``flows[2].sink.table``)."""
    from agents.control import command_subject

    transport = await c.connection()
    found: list[FlowOutcome] = []
    for i, name, agent, config in _split_flow_file(text):
        cmd = AgentCommand(op="preflight", flow=name, config=config, timeout=timeout, actor=c.caller)
        try:
            msg = await transport.request(command_subject(agent, c.prefix), encode(cmd), timeout=timeout + 5)
            result = msgspec.json.decode(msg.data, type=CommandResult)
        except (MeshError, msgspec.DecodeError) as exc:
            found.append(FlowOutcome(agent=agent, flow=name, ok=False, state="preflight",
                                     message=f"flows[{i}]: agent {agent} did not answer: {exc}"))  # fmt: skip
            continue
        for o in result.outcomes or [FlowOutcome(agent=agent, flow=name, ok=result.ok, state="preflight",
                                                 message=result.message)]:  # fmt: skip
            if o.message.startswith(("flow.", "flow:")):
                message = f"flows[{i}]{o.message[4:]}"
            else:
                message = o.message if o.ok else f"flows[{i}]: {o.message}"
            found.append(msgspec.structs.replace(o, message=message))
    return found


@app.command(
    "list",
    help="Every flow the agents run: applied ones (FROM apply, with their generation and desired "
    "state) and those from the agents' own config files (FROM config file), with their state.",
)
def _list(
    as_json: JsonOpt = False,
    control_plane: ControlPlaneOpt = DEFAULT_URL,
    timeout: TimeoutOpt = 5.0,
    prefix: PrefixOpt = DEFAULT_PREFIX,
) -> None:
    reply = run_with_client(control_plane, timeout, prefix, lambda c: c.flows())
    if as_json:
        echo_json(reply.flows)
        return
    if not reply.flows:
        typer.echo("no flows applied, and no registered agent reports one from its config file")
        return

    def row(f: FlowSpecView) -> tuple[object, ...]:
        agents = ",".join(p.agent for p in f.spec.parts)
        if f.spec.source == CONFIG_FILE:  # known from heartbeats only: no generation, no desired state
            return (f.spec.name, "config file", f.spec.entity or "-", "-", "-", f.state, agents, "-", "-")
        return (
            f.spec.name, "apply", f.spec.entity, f.spec.generation, f.spec.desired, f.state, agents,
            ago(f.spec.applied_at), f.spec.applied_by,
        )  # fmt: skip

    table(("NAME", "FROM", "ENTITY", "GEN", "DESIRED", "STATE", "AGENTS", "APPLIED", "BY"),
          [row(f) for f in reply.flows])  # fmt: skip


@app.command("get", help="One applied flow: its configuration per agent and what each agent reports.")
def _get(
    name: FlowNameArg,
    as_json: JsonOpt = False,
    control_plane: ControlPlaneOpt = DEFAULT_URL,
    timeout: TimeoutOpt = 5.0,
    prefix: PrefixOpt = DEFAULT_PREFIX,
) -> None:
    reply = run_with_client(control_plane, timeout, prefix, lambda c: c.flows(name))
    view = reply.flows[0]
    if as_json:
        echo_json(view)
        return
    spec = view.spec
    typer.echo(f"flow {spec.name}  entity {spec.entity}  generation {spec.generation}  "
               f"desired {spec.desired}")  # fmt: skip
    typer.echo(f"state {view.state}  applied {ago(spec.applied_at)} by {spec.applied_by} from {spec.source}")
    for part in spec.parts:
        sides = [s for s in ("source", "sink") if part.config.get(s)]
        typer.echo(f"\n[{part.agent}] runs the {' and '.join(sides)}:")
        echo_json(part.config)
    if view.reports:
        typer.echo("")
        table(
            ("AGENT", "STATE", "GEN", "OUTBOX", "PENDING", "ERRORS", "DETAIL"),
            [
                (r.name, r.state, r.generation, r.outbox_depth if r.outbox_depth is not None else "-",
                 r.consumer_pending if r.consumer_pending is not None else "-", r.errors, r.detail or "-")
                for r in view.reports
            ],
        )  # fmt: skip


@app.command("delete", help="Remove an applied flow: its agents stop it once in-flight work is done.")
def _delete(
    name: FlowNameArg,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    control_plane: ControlPlaneOpt = DEFAULT_URL,
    timeout: TimeoutOpt = 10.0,
    prefix: PrefixOpt = DEFAULT_PREFIX,
) -> None:
    if not yes and not typer.confirm(f"delete flow {name}?"):
        raise typer.Exit(1)
    done = run_with_client(control_plane, timeout, prefix, lambda c: c.delete_flow(name))
    typer.echo(done.message)


def print_result(result: CommandResult, as_json: bool) -> None:
    """Print a command's result; exit 1 unless every agent carried it out."""
    if as_json:
        echo_json(result)
    else:
        for o in result.outcomes:
            mark = "ok" if o.ok else "FAILED"
            typer.echo(f"{o.agent}/{o.flow}: {mark}: {o.state}: {o.message}")
        if result.message and not result.outcomes:
            typer.echo(result.message)
    if not result.ok:
        raise typer.Exit(1)


def _command(op: FlowOp, help_text: str) -> None:
    @app.command(op, help=help_text + "\n\nWaits for every agent's answer; exit 1 if any failed.")
    def command(
        name: FlowNameArg,
        agent: AgentOpt = None,
        wait: Annotated[float, typer.Option("--wait", help="Seconds each agent gets to carry it out.")] = 60.0
        if op == "drain"
        else 30.0,
        as_json: JsonOpt = False,
        control_plane: ControlPlaneOpt = DEFAULT_URL,
        prefix: PrefixOpt = DEFAULT_PREFIX,
    ) -> None:
        result = run_with_client(
            control_plane, wait, prefix, lambda c: c.command(op, flow=name, agent=agent, timeout=wait)
        )
        print_result(result, as_json)


_command("pause", "Stop reading the flow's source and applying to its sink (kept across restarts).")
_command("resume", "Run a paused or drained flow again, from where it stopped.")
_command(
    "drain",
    "Stop capture, publish what the outbox holds, apply everything pending, then stop (state drained).",
)
_command("restart", "Stop the flow and start it again (its adapters are opened afresh).")
