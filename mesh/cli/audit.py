"""``meshctl audit tail``: the control plane's audit trail (stream ``MESH_AUDIT``).

Reading never consumes or deletes anything. ``--follow`` keeps printing new entries until
Ctrl-C. Errors the operator can fix (server down, no audit stream yet) print one line and exit 2.
"""

from __future__ import annotations

from typing import Annotated

import anyio
import msgspec
import typer

from mesh.cli._common import DEFAULT_URL, ControlPlaneOpt, JsonOpt, connection, fail, timestamp
from mesh.cli.dlq import quiet_connection_logs
from mesh.controlplane.audit import AuditRecord, tail
from mesh.errors import MeshError

__all__ = ["app", "format_record"]

app = typer.Typer(
    name="audit",
    help="Read the audit trail: registrations, revocations, flow changes, commands.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _audit() -> None:
    """Read the audit trail: registrations, revocations, flow changes, commands."""


def format_record(r: AuditRecord) -> str:
    """One line: sequence, time, kind, target, who, replica, what."""
    e = r.entry
    via = f" via {e.replica}" if e.replica else ""
    return f"{r.seq:>6}  {timestamp(e.at)}  {e.kind:<10}  {e.target:<20}  by {e.who}{via}: {e.what}"


@app.command("tail")
def _tail(
    n: Annotated[int, typer.Option("-n", "--lines", min=1, help="How many of the latest entries.")] = 20,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new entries.")] = False,
    kind: Annotated[
        str | None, typer.Option("--kind", help="Only this kind (register, revoke, ...).", show_default=False)
    ] = None,
    as_json: JsonOpt = False,
    server: ControlPlaneOpt = DEFAULT_URL,
) -> None:
    """Print the latest audit entries, oldest first."""
    quiet_connection_logs()
    encoder = msgspec.json.Encoder()

    async def main() -> int:
        count = 0
        async with connection(server, 5.0) as js:
            async for record in tail(js, last=n, follow=follow, kind=kind):
                count += 1
                if as_json:
                    doc = {
                        "seq": record.seq,
                        "subject": record.subject,
                        **msgspec.structs.asdict(record.entry),
                    }
                    typer.echo(encoder.encode(doc).decode())
                else:
                    typer.echo(format_record(record))
        return count

    try:
        count = anyio.run(main)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except MeshError as exc:
        fail(exc)
    if count == 0 and not as_json:
        typer.echo("no audit entries")
