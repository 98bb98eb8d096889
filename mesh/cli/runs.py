"""``meshctl runs list|show``: run records of scheduled bulk runs, across agents and adapters.

Reads the ``mesh_runs`` KV bucket (every source agent's record of its runs, with the counts the
sink agents report for the same run; see :mod:`mesh.runs.report`), or, without NATS, one agent's
own records: ``--state-dir`` (its ``runs.db``) or ``--config agent.toml`` (its ``runs.db`` plus
the file runs of its CSV flows, the records ``meshctl files runs`` lists, as runs of adapter
``csv`` with ids ``<flow>-import-<n>`` / ``<flow>-export-<n>``; running agents report these
to the bucket too). Reading never writes. Errors the operator can fix (server
down, no bucket yet, unknown run) print one line and exit 2.

``meshctl runs start FLOW --agent A`` starts a bulk run of a scheduled flow now: the command
``run`` on the agent's command subject ``<prefix>.agent.<A>`` (what ``meshctl flow pause`` and
``--dry-run --connect`` use too). Exit 0 with the run's id once the agent started it; 1 when the
agent refused (no such scheduled flow, a run in progress, the flow paused or failing); 2 when the
agent did not answer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import anyio
import msgspec
import typer

from mesh.cli._common import (
    DEFAULT_PREFIX,
    DEFAULT_URL,
    ControlPlaneOpt,
    JsonOpt,
    PrefixOpt,
    connection,
    fail,
    timestamp,
)
from mesh.cli.dlq import quiet_connection_logs
from mesh.config import load_agent_config
from mesh.controlplane.models import AgentCommand, CommandResult, encode
from mesh.errors import MeshError, TransportError
from mesh.plugins import adapter_registry
from mesh.runs.adapter_runs import adapter_run
from mesh.runs.records import RunStore, SinkTally
from mesh.runs.report import ENTRY, RUNS_BUCKET, RunEntry, RunView, merge_runs

__all__ = ["app", "format_view", "read_bucket"]

app = typer.Typer(
    name="runs",
    help="Run records of scheduled bulk runs (all agents and adapters).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

StateDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        help="Read one agent's own records (its state_dir) instead of the mesh_runs bucket.",
        show_default=False,
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="Read one agent's own records, CSV file runs included (agent TOML).",
        show_default=False,
    ),
]  # fmt: skip
FlowOpt = Annotated[str | None, typer.Option("--flow", help="Only this flow's runs.", show_default=False)]

_ENC = msgspec.json.Encoder()


@app.callback()
def _runs() -> None:
    """Run records of scheduled bulk runs (all agents and adapters)."""


async def read_bucket(server: str, timeout: float = 5.0) -> list[RunEntry]:
    """Every entry of the ``mesh_runs`` bucket (source records and sink counts).

    Raises:
        TransportError: NATS unreachable, or the bucket does not exist yet.
    """
    entries: list[RunEntry] = []
    async with connection(server, timeout) as js:
        bucket = await js.key_value(RUNS_BUCKET, create=False)
        async with await bucket.watch() as watch:
            with anyio.fail_after(timeout * 6):
                while True:
                    update = await watch.next(timeout)
                    if update is None or update.op == "loaded":
                        break
                    if update.op == "put":
                        try:
                            entries.append(ENTRY.decode(update.value))
                        except msgspec.DecodeError:
                            continue  # not ours; never fatal for a listing
    return entries


async def _local(state_dir: Path) -> list[RunEntry]:
    path = state_dir / "runs.db"
    if not path.exists():
        return []
    runs = await RunStore(path).list(limit=10_000)
    tally = SinkTally(path)
    entries = [RunEntry(role="source", source=r) for r in runs]
    for r in runs:
        counts = await tally.counts(r.id, r.agent)
        if counts is not None:
            entries.append(RunEntry(role="sink", sink=counts))
    return entries


def _csv_runs(config: Path) -> list[RunEntry]:
    """The CSV flows' file runs of the agent ``config`` as bulk-run entries (``meshctl files runs``)."""
    cfg = load_agent_config(config)
    registry = adapter_registry()
    entries = []
    seen: set[tuple[str, str]] = set()
    for f in cfg.flows:
        for side in (f.source, f.sink):
            if side is None:
                continue
            log = registry.runs_of(side)
            if log is None or (f.name, log.location(side)) in seen:
                continue
            seen.add((f.name, log.location(side)))
            for r in log.read(side):
                run = adapter_run(f.name, str(type(side).__struct_config__.tag), cfg.agent.name, r)
                entries.append(RunEntry(role="source", source=run))
    return entries


def _views(
    state_dir: Path | None, server: str, flow: str | None, config: Path | None = None
) -> list[RunView]:
    quiet_connection_logs()
    if config is not None:
        if state_dir is not None:
            fail("give --config or --state-dir, not both")
        try:
            state_dir = Path(load_agent_config(config).agent.state_dir)
        except MeshError as exc:
            fail(exc)

    async def main() -> list[RunEntry]:
        if state_dir is None:
            return await read_bucket(server)
        local = await _local(state_dir)
        return local + (await anyio.to_thread.run_sync(_csv_runs, config) if config is not None else [])

    try:
        entries = anyio.run(main)
    except TransportError as exc:
        fail(f"cannot read the {RUNS_BUCKET} bucket at {server}: {exc} (is the control plane up?)")
    except MeshError as exc:
        fail(exc)
    views = merge_runs(entries)
    return [v for v in views if flow is None or v.run.flow == flow]


def _duration(v: RunView) -> str:
    r = v.run
    return f"{r.finished_at - r.started_at:.1f}s" if r.finished_at is not None else "-"


def format_view(v: RunView) -> str:
    """One line: run id, flow, adapter, agent, state, start, duration, counts."""
    r = v.run
    return (
        f"{r.id:<36} {r.flow:<16} {r.adapter:<9} {r.agent:<14} {r.state:<11} {timestamp(r.started_at)} "
        f"{_duration(v):>8}  read {r.read} published {r.published} applied {r.applied} "
        f"skipped {r.skipped} failed {r.failed}"
    )


@app.command("list")
def _list(
    flow: FlowOpt = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many (newest first).")] = 50,
    state_dir: StateDirOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    server: ControlPlaneOpt = DEFAULT_URL,
) -> None:
    """List runs, newest first: state, start, duration, counts read/published/applied/failed."""
    views = _views(state_dir, server, flow, config)[:limit]
    if as_json:
        typer.echo(_ENC.encode([msgspec.structs.asdict(v.run) for v in views]).decode())
        return
    if not views:
        typer.echo("no runs")
    for v in views:
        typer.echo(format_view(v))


@app.command("show")
def _show(
    run_id: Annotated[str, typer.Argument(help="The run id (as `meshctl runs list` prints it).")],
    state_dir: StateDirOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    server: ControlPlaneOpt = DEFAULT_URL,
) -> None:
    """One run in full, with each sink agent's counts."""
    found = [v for v in _views(state_dir, server, None, config) if v.run.id == run_id]
    if not found:
        fail(f"no run {run_id!r} (see `meshctl runs list`)")
    v = found[0]
    if as_json:
        typer.echo(_ENC.encode(v).decode())
        return
    r = v.run
    for name, value in [
        ("run", r.id), ("flow", r.flow), ("adapter", r.adapter), ("agent", r.agent), ("state", r.state),
        ("scheduled for", timestamp(r.scheduled_for)), ("started", timestamp(r.started_at)),
        ("finished", timestamp(r.finished_at) if r.finished_at is not None else "-"),
        ("read", r.read), ("published", r.published), ("applied", r.applied), ("skipped", r.skipped),
        ("failed", r.failed), ("checksum", r.checksum), ("resumed", r.resumed), ("detail", r.detail or "-"),
    ]:  # fmt: skip
        typer.echo(f"{name:<14} {value}")
    for s in v.sinks:
        typer.echo(f"sink {s.agent:<9} applied {s.applied} skipped {s.skipped} failed {s.failed}")


@app.command("start")
def _start(
    flow: Annotated[str, typer.Argument(help="The scheduled flow (one with [flows.schedule]).")],
    agent: Annotated[str, typer.Option("--agent", "-a", help="The agent running the flow's source.")],
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="Seconds to wait for the run to start.")
    ] = 30.0,
    as_json: JsonOpt = False,
    server: ControlPlaneOpt = DEFAULT_URL,
    prefix: PrefixOpt = DEFAULT_PREFIX,
) -> None:
    """Start a bulk run of a scheduled flow now (the schedule goes on as before)."""
    from agents.control import command_subject

    quiet_connection_logs()
    cmd = AgentCommand(op="run", flow=flow, timeout=timeout, actor="meshctl")

    async def main() -> CommandResult:
        async with connection(server, timeout) as js:
            msg = await js.request(command_subject(agent, prefix), encode(cmd), timeout=timeout + 5)
            return msgspec.json.decode(msg.data, type=CommandResult)

    try:
        result = anyio.run(main)
    except (MeshError, msgspec.DecodeError) as exc:
        fail(f"agent {agent} did not answer the run command: {exc} (is it up and running flow {flow}?)")
    if as_json:
        typer.echo(_ENC.encode(result).decode())
    elif result.ok:
        typer.echo(f"{flow} on {agent}: {result.message} (meshctl runs list --flow {flow})")
    if not result.ok:
        fail(f"{flow} on {agent}: {result.message}", 1)
