"""``meshctl api``: list the System APIs being served and call one (README "System APIs").

``list`` asks ``$SRV.INFO`` (the NATS services protocol) and shows each ``mesh-<system>``
service with its version, endpoints and the agents serving it. ``call`` sends one request
with a deadline and an idempotency key and prints the result as JSON; an error reply prints
one line (code, message, whether it is retryable) and exits 1; a connection problem exits 2.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path
from typing import Annotated, Any

import anyio
import typer

from mesh.api import ApiError, call_detailed, subject_of
from mesh.api.discovery import ServiceView, discover
from mesh.cli._access import connection
from mesh.cli._output import fail
from mesh.cli.dlq import quiet_connection_logs
from mesh.dlq import DEFAULT_NATS_URL
from mesh.errors import MeshError

__all__ = ["app"]

app = typer.Typer(
    name="api",
    help="List and call the System APIs agents serve (api.<system>.<entity>.<operation>).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ServerOpt = Annotated[
    str,
    typer.Option("--server", "-s", envvar="MESH_NATS_URL", help="NATS server URL (env MESH_NATS_URL)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _table(views: list[ServiceView]) -> str:
    if not views:
        return "no System API is being served"
    lines = []
    for v in views:
        lines.append(f"{v.name} {v.version}  system={v.system}  agents={', '.join(v.agents) or '-'}"
                     f"  instances={len(v.instances)}")  # fmt: skip
        for e in sorted(v.endpoints, key=lambda e: str(e.get("subject"))):
            kind = "read" if e.get("read") == "true" else "write"
            lines.append(f"  {e.get('subject')}  ({kind})  {e.get('description') or ''}".rstrip())
    return "\n".join(lines)


@app.command("list")
def _list_apis(
    server: ServerOpt = DEFAULT_NATS_URL,
    wait: Annotated[float, typer.Option("--wait", min=0.1, help="Seconds to collect answers.")] = 1.0,
    as_json: JsonOpt = False,
) -> None:
    """The System API services answering $SRV.INFO: versions, endpoints, agents serving them."""
    quiet_connection_logs()

    async def main() -> list[ServiceView]:
        async with connection(server, 5.0) as js:
            return await discover(js, timeout=wait)

    try:
        views = anyio.run(main)
    except MeshError as exc:
        fail(exc)
    if as_json:
        typer.echo(json.dumps([v.to_dict() for v in views], indent=2))
    else:
        typer.echo(_table(views))


def _read_data(data: str) -> Any:
    if data.startswith("@"):
        source = data[1:]
        try:
            text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
        except OSError as exc:
            fail(f"--data: cannot read {source}: {exc.strerror}")
    else:
        text = data
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        fail(f"--data: not JSON: {exc}")
    if not isinstance(value, dict):
        fail("--data: the request must be a JSON object")
    return value


@app.command("call")
def _call_api(
    name: Annotated[
        str, typer.Argument(help="erp.sales_order.create or the subject api.erp.sales_order.create")
    ],
    data: Annotated[
        str, typer.Option("--data", "-d", help="The request: JSON, @file.json or @- (stdin).")
    ] = "{}",
    key: Annotated[
        str | None,
        typer.Option(
            "--key", "-k", help="Idempotency key (default: a new random one; repeat it to retry safely)."
        ),
    ] = None,
    read: Annotated[bool, typer.Option("--read", help="Send no idempotency key (read operations).")] = False,
    timeout: Annotated[float, typer.Option("--timeout", "-t", min=0.1, help="Deadline in seconds.")] = 10.0,
    correlation_id: Annotated[str, typer.Option("--correlation-id", help="Business correlation id.")] = "",
    server: ServerOpt = DEFAULT_NATS_URL,
) -> None:
    """Call one operation and print its result (JSON). An error reply exits 1."""
    request = _read_data(data)
    subject = subject_of(name)
    idem = None if read else (key or f"meshctl-{uuid.uuid4()}")
    quiet_connection_logs()

    async def main() -> Any:
        async with connection(server, timeout) as js:
            return await call_detailed(
                js, subject, request, idempotency_key=idem, timeout=timeout, correlation_id=correlation_id
            )

    try:
        res = anyio.run(main)
    except ApiError as exc:
        again = "retryable" if exc.retryable else "not retryable"
        fail(f"{subject}: {exc.code} ({again}): {exc.message}", code=1)
    except MeshError as exc:
        fail(exc)
    if res.replayed:
        typer.secho(f"replayed: the result of the first call with key {idem}", err=True)
    typer.echo(json.dumps(res.result, indent=2, default=str))
