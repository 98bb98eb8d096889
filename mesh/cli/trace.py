"""``meshctl trace``: where a business transaction went, and which ones failed.

``meshctl trace ID`` reads the trace stream ``MESH_TRACE`` (admin credentials; nothing is
consumed or changed) and prints every transaction ``ID`` names — a correlation id, the id of any
envelope in it, or a business key such as ``customer:ALFKI`` — as its path across systems in
time order: captured, published, applied per sink, API calls, saga steps, dead letters, with
agent, system and latency, then its status. ``meshctl trace --status failed --since 1h`` lists
transactions instead. ``--json`` prints JSON. Both read the last day of records unless
``--since`` says otherwise (a busy mesh retains days of them). Errors the operator can fix (no
broker, no trace stream yet, a bad ``--since``) print one line and exit 2; an unknown ID exits 1.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

import anyio
import msgspec
import typer

from mesh.cli._common import DEFAULT_URL, ControlPlaneOpt, JsonOpt, TimeoutOpt, connection, fail
from mesh.cli.dlq import quiet_connection_logs
from mesh.dlq import parse_time
from mesh.errors import MeshError
from mesh.trace import STATUSES, TxnIndex, format_record, load_index

__all__ = ["trace_command"]

_encoder = msgspec.json.Encoder()


def _ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def trace_command(
    ident: Annotated[
        str | None,
        typer.Argument(
            metavar="ID",
            help="A correlation id, an envelope id or a business key (entity:key).",
            show_default=False,
        ),
    ] = None,
    status: Annotated[
        str | None,
        typer.Option(
            "--status",
            help=f"List transactions with this status ({', '.join(STATUSES)}).",
            show_default=False,
        ),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            help="Only records at or after TIME: ISO-8601 or 15m, 2h, 7d (default: 1d).",
            show_default=False,
        ),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most N transactions listed.")] = 50,
    as_json: JsonOpt = False,
    server: ControlPlaneOpt = DEFAULT_URL,
    timeout: TimeoutOpt = 5.0,
) -> None:
    """Show a business transaction's path across systems, or list transactions by status."""
    if ident is None and status is None:
        fail("give a transaction ID (correlation id, envelope id or entity:key) or --status")
    if status is not None and status not in STATUSES:
        fail(f"--status must be one of {', '.join(STATUSES)}, not {status!r}")
    start: datetime | None
    try:
        start = parse_time(since) if since is not None else None
    except ValueError as exc:
        fail(f"--since: {exc}")
    if start is None:  # a busy mesh retains days of records: read the last day unless told
        start = datetime.now(UTC) - timedelta(days=1)
    quiet_connection_logs()

    async def main() -> TxnIndex:
        async with connection(server, timeout) as js:
            return await load_index(js, since=start, timeout=timeout)

    try:
        index = anyio.run(main)
    except MeshError as exc:
        fail(exc)
    if ident is None:
        _list(index, status, start, limit, as_json)
        return
    found = index.find(ident)
    if status is not None:
        found = [t for t in found if t.status()[0] == status]
    if not found:
        if as_json:
            typer.echo(_encoder.encode({"query": ident, "transactions": []}).decode())
        else:
            window = f"since {since}" if since else "in the last day"
            typer.echo(f"no transaction found for {ident!r} {window} (--since 7d searches further)", err=True)
        raise typer.Exit(1)
    if as_json:
        doc = {
            "query": ident,
            "transactions": [
                {"correlation_id": t.correlation_id, "status": t.status()[0], "reason": t.status()[1],
                 "records": t.records}
                for t in found
            ],
        }  # fmt: skip
        typer.echo(_encoder.encode(doc).decode())
        return
    for n, txn in enumerate(found):
        st, reason = txn.status()
        if n:
            typer.echo("")
        systems = " -> ".join(dict.fromkeys(r.system for r in txn.records if r.system))
        typer.echo(f"transaction {txn.correlation_id}: {st}{f' ({reason})' if reason else ''}")
        typer.echo(f"  systems: {systems or '-'}; {len(txn.records)} records")
        for r in txn.records:
            typer.echo("  " + format_record(r))


def _list(index: TxnIndex, status: str | None, start: datetime | None, limit: int, as_json: bool) -> None:
    since_ms = int(start.timestamp() * 1000) if start is not None else 0
    rows = index.list(status, since_ms, limit)
    if as_json:
        typer.echo(_encoder.encode({"transactions": rows}).decode())
        return
    if not rows:
        typer.echo("no transactions" + (f" with status {status}" if status else ""))
        return
    for s in rows:
        keys = ",".join(s.business_keys[:3]) + ("..." if len(s.business_keys) > 3 else "")
        reason = f"  {s.reason}" if s.reason else ""
        typer.echo(
            f"{_ms(s.updated)}  {s.status:<11}  {s.correlation_id}  {keys}  {'->'.join(s.systems)}{reason}"
        )
