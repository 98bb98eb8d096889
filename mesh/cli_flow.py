"""``meshctl flow``: operate flows on the broker. ``replay`` makes a flow's sink consumer
redeliver from a stream sequence or a point in time.

Errors the operator can fix (server down, no such consumer, a bad time) print one line and
exit 2.
"""

from __future__ import annotations

from typing import Annotated

import anyio
import typer

from mesh.cli_dlq import ServerOpt, quiet_connection_logs
from mesh.dlq import DEFAULT_NATS_URL, FlowReplay, connect, format_time, parse_time, replay_flow
from mesh.errors import MeshError

__all__ = ["app"]

app = typer.Typer(
    name="flow",
    help="Operate flows on the broker.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _flow() -> None:
    """Operate flows on the broker."""


def _fail(message: object) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


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
        _fail("give exactly one of --since TIME or --from-seq N")
    start = None
    if since is not None:
        try:
            start = parse_time(since)
        except ValueError as exc:
            _fail(f"--since: {exc}")

    quiet_connection_logs()

    async def main() -> FlowReplay:
        async with connect(server) as js:
            return await replay_flow(js, name, sink_system=sink_system, since=start, from_seq=from_seq)

    try:
        result = anyio.run(main)
    except MeshError as exc:
        _fail(exc)
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
