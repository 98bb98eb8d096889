"""Helpers shared by the control-plane commands of ``meshctl`` (agent, control-plane, audit).

The NATS URL option is here (:data:`ControlPlaneOpt`); the ``--creds``/``--tls-*`` options every
NATS-talking command gets are in :mod:`mesh.cli._access` and re-exported here.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, TypeVar

import anyio
import typer

from mesh.cli._access import (
    NATS_ACCESS_OPTIONS,
    CredsOpt,
    NatsAccess,
    TlsCaOpt,
    TlsCertOpt,
    TlsKeyOpt,
    add_nats_options,
    connection,
    nats_access,
    nats_access_defaults,
    nats_config,
    talks_to_nats,
)
from mesh.cli._output import fail
from mesh.cli.dlq import quiet_connection_logs
from mesh.controlplane.client import DEFAULT_PREFIX, ControlPlaneClient, RequestRefused
from mesh.errors import MeshError

_T = TypeVar("_T")

DEFAULT_URL = "nats://127.0.0.1:4222"

ControlPlaneOpt = Annotated[
    str,
    typer.Option(
        "--control-plane",
        "--nats",
        envvar=["MESH_CONTROL_PLANE", "MESH_NATS_URL"],
        help="NATS URL the control plane listens on (env MESH_CONTROL_PLANE, then MESH_NATS_URL).",
    ),
]
TimeoutOpt = Annotated[
    float, typer.Option("--timeout", min=0.1, help="Seconds to wait for the control plane to answer.")
]
PrefixOpt = Annotated[
    str,
    typer.Option(
        "--subject-prefix", envvar="MESH_CP_PREFIX", help="Control-plane subject prefix.", hidden=True
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def run_with_client(
    url: str,
    timeout: float,
    prefix: str,
    work: Callable[[ControlPlaneClient], Awaitable[_T]],
    *,
    creds: str | None = None,
    inbox_prefix: str | None = None,
) -> _T:
    """Connect, run ``work`` with a client, close. A refusal exits 1, any other mesh error 2,
    each with one line on stderr. ``creds``/``inbox_prefix``: see :func:`connection`."""
    quiet_connection_logs()

    async def main() -> _T:
        async with connection(url, timeout, creds=creds, inbox_prefix=inbox_prefix) as js:
            return await work(ControlPlaneClient(js, prefix=prefix, timeout=timeout))

    try:
        return anyio.run(main)
    except RequestRefused as exc:
        if not exc.problems:
            fail(f"refused ({exc.code}): {exc.reason}", 1)
        typer.secho(f"error: refused ({exc.code}): {exc.reason}", fg=typer.colors.RED, err=True)
        for problem in exc.problems:
            typer.echo(f"  {problem}", err=True)
        raise typer.Exit(1) from None
    except MeshError as exc:
        fail(exc)


def table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a left-aligned table (the last column is not padded)."""
    cells = [[str(c) for c in head], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    for r in cells:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths[:-1], strict=True)) + "  " + r[-1])


def ago(t: float | None) -> str:
    if t is None:
        return "never"
    return f"{max(0.0, time.time() - t):.1f}s ago"


def timestamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


__all__ = [
    "DEFAULT_PREFIX",
    "DEFAULT_URL",
    "NATS_ACCESS_OPTIONS",
    "ControlPlaneOpt",
    "CredsOpt",
    "JsonOpt",
    "NatsAccess",
    "PrefixOpt",
    "TimeoutOpt",
    "TlsCaOpt",
    "TlsCertOpt",
    "TlsKeyOpt",
    "add_nats_options",
    "ago",
    "connection",
    "fail",
    "nats_access",
    "nats_access_defaults",
    "nats_config",
    "run_with_client",
    "table",
    "talks_to_nats",
    "timestamp",
]
