"""``meshctl reconcile FLOW [--repair] [--json]``: prove that a flow's source and targets agree.

The agents that run the flow's sides compute hashes of what they read (see
:mod:`mesh.reconcile`); this command compares them and prints missing, extra and different
records. ``--repair`` re-emits missing and different records from the source through the normal
delivery path, deletes extras where the flow's ownership lets the source delete, and compares
again until the report is clean (or ``--wait`` seconds pass). Exit 0 when clean, 1 when drift
remains, 2 when reconciliation could not run (one line on stderr).
"""

from __future__ import annotations

from typing import Annotated

import msgspec
import typer

from mesh.cli._common import DEFAULT_URL, ControlPlaneOpt, JsonOpt, PrefixOpt, run_with_client
from mesh.controlplane.client import DEFAULT_PREFIX, ControlPlaneClient
from mesh.reconcile import Reconciler, Report

__all__ = ["reconcile_command", "render"]

_SHOW = 20


def render(report: Report) -> str:
    """The human-readable report: one summary line per (source, target) pair, then up to 20
    keys per kind."""
    out = []
    for t in report.targets:
        origin = f" {t.source}" if t.source else ""  # two-way flows: one line per direction
        out.append(
            f"flow {report.flow}{origin} -> {t.agent} ({t.system}): source {t.source_count}, "
            f"target {t.target_count}; missing {len(t.missing)}, extra {len(t.extra)}, "
            f"different {len(t.different)}"
        )
    for kind, keys in (("missing", report.missing), ("extra", report.extra)):
        if keys:
            more = f" … (+{len(keys) - _SHOW})" if len(keys) > _SHOW else ""
            out.append(f"  {kind}: {', '.join(keys[:_SHOW])}{more}")
    for d in report.different[:_SHOW]:
        out.append(f"  different: {d.key} ({', '.join(d.fields)})")
    if len(report.different) > _SHOW:
        out.append(f"  different: … (+{len(report.different) - _SHOW})")
    if report.repaired:
        out.append("repair: " + ", ".join(f"{k} {v}" for k, v in report.repaired.items()))
    if report.kept_extra:
        out.append(f"  kept (ownership forbids the delete): {', '.join(report.kept_extra[:_SHOW])}")
    out.append("clean" if report.clean else "drift found")
    return "\n".join(out)


def reconcile_command(
    flow: Annotated[str, typer.Argument(help="The flow to check (e.g. customers).")],
    repair: Annotated[bool, typer.Option("--repair", help="Repair the drift, then check again.")] = False,
    agents: Annotated[
        list[str] | None,
        typer.Option(
            "--agent", help="An agent that runs a side of the flow (repeat; default: every registered agent)."
        ),
    ] = None,
    buckets: Annotated[
        int, typer.Option("--buckets", min=1, max=8192, help="Key buckets of the first round.")
    ] = 1024,
    chunk: Annotated[
        int, typer.Option("--chunk", min=1, max=50000, help="Rows per read and records per answer.")
    ] = 1000,
    wait: Annotated[float, typer.Option("--wait", min=0, help="Seconds a repair may take to show.")] = 60.0,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds per agent request.")] = 120.0,
    as_json: JsonOpt = False,
    server: ControlPlaneOpt = DEFAULT_URL,
    prefix: PrefixOpt = DEFAULT_PREFIX,
) -> None:
    """Compare a flow's source with each of its targets (counts and per-record hashes)."""

    async def work(client: ControlPlaneClient) -> Report:
        names = list(agents or [])
        if not names:
            names = [a.name for a in (await client.agents()).agents if a.state == "active"]
        js = await client.connection()
        rec = Reconciler(js, flow, names, prefix=prefix, buckets=buckets, chunk=chunk, timeout=timeout)
        return await rec.run(repair=repair, wait=wait)

    report = run_with_client(server, 10.0, prefix, work)
    if as_json:
        typer.echo(msgspec.json.encode(report).decode())
    else:
        typer.echo(render(report))
    leftover = report.missing or report.different or set(report.extra) - set(report.kept_extra)
    raise typer.Exit(1 if leftover else 0)
