"""``meshctl``: the operator's command line.

Errors the operator can fix (bad config, missing broker) print one clear line and exit 2;
they never print a stack trace.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mesh.cli import (
    agent_cp as cli_agent_cp,
)
from mesh.cli import (
    api as cli_api,
)
from mesh.cli import (
    audit as cli_audit,
)
from mesh.cli import (
    capture as cli_capture,
)
from mesh.cli import (
    cp as cli_cp,
)
from mesh.cli import (
    dlq as cli_dlq,
)
from mesh.cli import (
    files as cli_files,
)
from mesh.cli import (
    flow as cli_flow,
)
from mesh.cli import (
    install as cli_install,
)
from mesh.cli import (
    leafnode as cli_leafnode,
)
from mesh.cli import (
    orchestrator as cli_orchestrator,
)
from mesh.cli import (
    reconcile as cli_reconcile,
)
from mesh.cli import (
    runs as cli_runs,
)
from mesh.cli import (
    saga as cli_saga,
)
from mesh.cli import (
    schema as cli_schema,
)
from mesh.cli import (
    security as cli_security,
)
from mesh.cli import (
    top as cli_top,
)
from mesh.cli import (
    trace as cli_trace,
)
from mesh.cli import (
    xref as cli_xref,
)
from mesh.cli._common import add_nats_options
from mesh.cli._output import fail
from mesh.errors import ConfigError, ConfigProblem, MeshError

if TYPE_CHECKING:
    from mesh.config import AgentConfig

__all__ = ["app", "main"]

app = typer.Typer(
    name="meshctl",
    help="Operate the connector mesh: run agents, check configs, start the dev stack, benchmark.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
agent_app = typer.Typer(help="Run and inspect connector agents.", no_args_is_help=True)
config_app = typer.Typer(help="Validate agent config files; print their JSON Schema.", no_args_is_help=True)
dev_app = typer.Typer(help="The embedded development stack.", no_args_is_help=True)
app.add_typer(agent_app, name="agent")
app.add_typer(config_app, name="config")
app.add_typer(dev_app, name="dev")
app.add_typer(cli_dlq.app, name="dlq")
app.add_typer(cli_flow.app, name="flow")
app.add_typer(cli_leafnode.app, name="leafnode")
app.add_typer(cli_cp.app, name="control-plane")
app.add_typer(cli_audit.app, name="audit")
app.add_typer(cli_api.app, name="api")
app.add_typer(cli_schema.app, name="schema")
app.add_typer(cli_files.app, name="files")
app.add_typer(cli_runs.app, name="runs")
app.add_typer(cli_capture.app, name="capture")
app.add_typer(cli_security.app, name="security")
app.add_typer(cli_xref.app, name="xref")
app.add_typer(cli_orchestrator.app, name="orchestrator")
app.add_typer(cli_saga.app, name="saga")
app.command("reconcile")(cli_reconcile.reconcile_command)
app.command("trace")(cli_trace.trace_command)
app.command("top")(cli_top.top)
# register, deregister, revoke, list, health sit beside `agent run`
agent_app.registered_commands.extend(cli_agent_cp.app.registered_commands)
agent_app.registered_groups.extend(cli_agent_cp.app.registered_groups)
agent_app.registered_commands.extend(cli_install.app.registered_commands)
config_app.registered_commands.extend(cli_schema.config_app.registered_commands)  # config schema

ConfigOpt = Annotated[
    Path, typer.Option("--config", "-c", help="Agent config file (TOML).", show_default=False)
]


_fail = fail


@app.command("version")
def _version() -> None:
    """Print the version."""
    from importlib.metadata import version as v

    typer.echo(v("connector-mesh"))


@agent_app.command("run")
def _agent_run(
    config: ConfigOpt,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=65535,
            show_default=False,
            help="Serve /metrics, /healthz and /readyz on this port (overrides agent.metrics_port; "
            "0 picks a free port, written to <state_dir>/endpoint.json).",
        ),
    ] = None,
) -> None:
    """Run a connector agent until SIGTERM or Ctrl-C (ready: GET /readyz, sd_notify READY=1)."""
    from agents.entry import run_agent

    code = run_agent(config, metrics_port)
    if code:
        raise typer.Exit(code)


@config_app.command("check")
def _config_check(
    files: Annotated[list[Path], typer.Argument(help="Agent config files.")],
    connect: Annotated[
        bool,
        typer.Option(
            "--connect",
            help="Also reach every source and sink (credentials, tables, key columns, capture, "
            "mapped columns, API auth) and list every problem with its field path. Writes nothing.",
        ),
    ] = False,
) -> None:
    """Validate agent config files; print every problem with its file and field path.

    Exit codes: 0 all good; 1 a config is valid but --connect found problems; 2 a config is invalid.
    """
    from mesh.config import load_agent_config

    bad = unreachable = 0
    for file in files:
        try:
            cfg = load_agent_config(file)
        except ConfigError as exc:
            typer.secho(f"{exc}", fg=typer.colors.RED, err=True)
            bad += 1
            continue
        summary = f"agent {cfg.agent.name}, {len(cfg.flows)} flow(s)"
        if not connect:
            typer.echo(f"{file}: ok ({summary})")
            continue
        problems, unchecked = _preflight(cfg)
        for problem in problems:
            typer.secho(f"{file}: {problem.path}: {problem.message}", fg=typer.colors.RED, err=True)
        for side in unchecked:
            typer.echo(f"{file}: {side}: not checked (its adapter has no preflight)")
        if problems:
            unreachable += 1
            typer.echo(f"{file}: {len(problems)} problem(s) found by --connect ({summary})")
        else:
            typer.echo(f"{file}: ok, every source and sink reached ({summary})")
    if bad:
        raise typer.Exit(2)
    if unreachable:
        raise typer.Exit(1)


def _preflight(cfg: AgentConfig) -> tuple[list[ConfigProblem], list[str]]:
    """Run the preflight of every flow of ``cfg``; (problems, sides left unchecked)."""
    import anyio

    from mesh.preflight import preflight_flows, unchecked

    flows = [(f"flows[{i}]", flow) for i, flow in enumerate(cfg.flows)]
    problems = anyio.run(lambda: preflight_flows(flows))
    return problems, [side for path, flow in flows for side in unchecked(flow, path)]


@dev_app.command("up")
def _dev_up(
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where the broker store, demo databases and agent state go "
            "(default: a new temporary directory, kept on exit)."
        ),
    ] = None,
    records: Annotated[int, typer.Option(help="Customers the demo load inserts first.")] = 1000,
    rate: Annotated[float, typer.Option(help="Demo changes per second after the first load.")] = 50.0,
    duration: Annotated[float | None, typer.Option(help="Stop by itself after this many seconds.")] = None,
    tls: Annotated[
        bool,
        typer.Option(
            "--tls",
            help="Run everything over mutual TLS with a throwaway CA, server and client certificate "
            "made in <data-dir>/tls.",
        ),
    ] = False,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure",
            help="No NATS auth (anonymous connections), for debugging. Default: secured with JWTs "
            "from <data-dir>/security, each agent with its own creds in <data-dir>/creds.",
        ),
    ] = False,
) -> None:
    """Start nats-server, an on-prem ERP agent, a cloud agent and a demo load; Ctrl-C stops all."""
    from mesh.devtools.dev import run_dev_stack

    try:
        code = run_dev_stack(
            data_dir=data_dir, records=records, rate=rate, duration=duration, tls=tls, insecure=insecure
        )
    except MeshError as exc:
        _fail(exc)
        return
    raise typer.Exit(code)


@app.command("bench")
def _bench(
    events: Annotated[int, typer.Option(help="Backlog size for the drain test.")] = 50_000,
    rate: Annotated[int, typer.Option(help="Paced rate for the latency test (events/s).")] = 1000,
    seconds: Annotated[float, typer.Option(help="Duration of the paced latency test.")] = 10.0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write results here.")] = None,
    repeat: Annotated[
        int, typer.Option(min=1, help="Interleave the pipelines this many times and report medians.")
    ] = 1,
    faststream: Annotated[
        bool, typer.Option(help="Also run the FastStream peer (needs the bench extra).")
    ] = True,
    outage: Annotated[
        bool, typer.Option("--outage", help="Measure the offline edge instead: outage per GiB, drain after.")
    ] = False,
    replicas: Annotated[
        int,
        typer.Option(
            min=0, help="Measure sink scaling instead: drain by 1, then by N agents sharing the consumer."
        ),
    ] = 0,
) -> None:
    """Benchmark the mesh against raw nats-py and a FastStream pipeline in the same run (not a test)."""
    from mesh.devtools.bench import run_bench, run_outage_bench, run_scale_bench

    try:
        if replicas:
            run_scale_bench(events=events, replicas=replicas, json_out=json_out)
        elif outage:
            run_outage_bench(events=events, json_out=json_out)
        else:
            run_bench(
                events=events,
                rate=rate,
                seconds=seconds,
                json_out=json_out,
                repeat=repeat,
                faststream=faststream,
            )
    except MeshError as exc:
        _fail(exc)


# Last, once every command is registered: --creds/--tls-* on every command that talks to NATS.
add_nats_options(app)


def main() -> None:
    try:
        app(prog_name="meshctl")
    except KeyboardInterrupt:
        sys.exit(130)
