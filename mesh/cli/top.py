"""``meshctl top``: a live terminal view of the mesh's KPIs, for an operator without a browser.

It asks a control-plane replica for its status document over NATS (the same request as
``meshctl control-plane status``, with ``--creds``/``MESH_CREDS``) every ``--interval`` seconds
and draws one frame: agents grouped by site with their health, then every flow with its rates,
latency p50/p99 (last minute), failures, retries, backlog, dead letters (depth, oldest, top
reason), freshness and SLO ratio. The rates and quantiles are those of the replica's in-memory
series (see :mod:`mesh.controlplane.series`), so they agree with the dashboard.

On a terminal it redraws in place (ANSI home + clear, health in colour); when stdout is not a
terminal it prints plain text frames (no escape codes) one after the other. ``--once`` prints
one frame and exits (for scripts). Ctrl-C exits 0; a control plane that does not answer prints
one line on the frame and is asked again at the next refresh (exit 2 with ``--once``).
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import Annotated

import anyio
import typer

from mesh.cli._common import (
    DEFAULT_PREFIX,
    DEFAULT_URL,
    ControlPlaneOpt,
    PrefixOpt,
    TimeoutOpt,
    connection,
    quiet_connection_logs,
)
from mesh.cli._output import fail
from mesh.controlplane.client import ControlPlaneClient
from mesh.controlplane.models import StatusReport
from mesh.errors import MeshError

__all__ = ["render_frame", "top"]

_COLOURS = {"healthy": "32", "degraded": "33", "stale": "33;1", "lost": "31;1"}
_HOME_CLEAR = "\x1b[H\x1b[2J"


def _ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.1f}ms" if x < 1 else f"{x:.2f}s"


def _secs(x: float | None) -> str:
    if x is None:
        return "-"
    if x < 120:
        return f"{x:.1f}s"
    return f"{x / 60:.0f}m" if x < 7200 else f"{x / 3600:.1f}h"


def _table(head: list[str], rows: list[list[str]], width: int, colour: dict[int, list[str]]) -> list[str]:
    """Left-aligned columns; the last column is cut to ``width``. ``colour[i]`` holds the ANSI
    code of each row's cell ``i`` (applied after padding, so alignment holds)."""
    cells = [head, *rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    out = []
    for n, r in enumerate(cells):
        parts = []
        for i, c in enumerate(r):
            text = c.ljust(widths[i]) if i < len(r) - 1 else c
            codes = colour.get(i)
            if codes is not None and n > 0 and codes[n - 1]:
                text = f"\x1b[{codes[n - 1]}m{text}\x1b[0m"
            parts.append(text)
        line = "  ".join(parts)
        out.append(line if colour else line[:width])
    return out


def render_frame(report: StatusReport, *, width: int = 120, ansi: bool = False, interval: float = 0) -> str:
    """One frame of ``meshctl top`` as text. ``ansi``: colour the health cells (only for a
    terminal); without it the frame has no escape codes at all."""
    cp = report.control_plane
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(report.generated_at))
    every = f" · every {interval:g}s (Ctrl-C quits)" if interval else ""
    lines = [
        f"meshctl top · replica {cp.replica} ({'leader' if cp.is_leader else 'follower'}) · leader "
        f"{cp.leader or 'none'} · NATS {'up' if cp.nats_connected else 'DOWN'} · {stamp}{every}",
        "agents: " + ", ".join(f"{v} {k}" for k, v in report.counts.items()),
        "",
    ]
    now = report.generated_at
    agents = sorted(report.agents, key=lambda a: (a.site, a.name))
    if agents:
        rows = [
            [
                a.site, a.name, a.manifest.system or "-", a.health,
                "never" if a.last_heartbeat is None else f"{max(0.0, now - a.last_heartbeat):.1f}s",
                str(a.outbox_depth), str(a.errors), a.reason or "-",
            ]
            for a in agents
        ]  # fmt: skip
        colour = {3: [_COLOURS.get(a.health, "") for a in agents]} if ansi else {}
        head = ["SITE", "AGENT", "SYSTEM", "HEALTH", "HEARTBEAT", "OUTBOX", "ERRORS", "WHY"]
        lines += _table(head, rows, width, colour)
    else:
        lines.append("no agent registered")
    lines.append("")
    if report.flows:
        rows = [
            [
                f.name, f.state, f"{f.captured_per_second:.1f}", f"{f.applied_per_second:.1f}",
                _ms(f.latency_p50_seconds), _ms(f.latency_p99_seconds),
                f"{f.failures_per_second:.2f}", f"{f.retries_per_second:.2f}",
                str(f.backlog), str(f.consumer_pending), str(f.dlq_depth),
                _secs(f.dlq_oldest_age_seconds) if f.dlq_depth else "-", _secs(f.freshness_seconds),
                "-" if f.slo_ratio is None else f"{f.slo_ratio * 100:.1f}%",
            ]
            for f in report.flows
        ]  # fmt: skip
        head = [
            "FLOW", "STATE", "IN/s", "OUT/s", "P50", "P99", "FAIL/s", "RETRY/s", "BACKLOG", "PENDING",
            "DLQ", "DLQ AGE", "FRESH", "SLO",
        ]  # fmt: skip
        lines += _table(head, rows, width, {})
    else:
        lines.append("no flow reported or applied")
    dead = [f for f in report.flows if f.dlq_depth and f.dlq_top_reasons]
    if dead:
        lines += ["", "DEAD LETTERS (top reasons)"]
        for f in dead:
            for r in f.dlq_top_reasons[:3]:
                lines.append(f"  {f.name}: {r.count} x {r.error_class}: {r.reason}"[:width])
    return "\n".join(lines) + "\n"


def top(
    interval: Annotated[
        float, typer.Option("--interval", "-n", min=0.2, help="Seconds between two refreshes.")
    ] = 2.0,
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit (for scripts).")] = False,
    control_plane: ControlPlaneOpt = DEFAULT_URL,
    timeout: TimeoutOpt = 5.0,
    prefix: PrefixOpt = DEFAULT_PREFIX,
) -> None:
    """Live view of agents (by site, with health) and flows (rates, p50/p99, backlog, dead
    letters, freshness, SLO), refreshed every --interval seconds; --once prints one frame."""
    quiet_connection_logs()
    tty = sys.stdout.isatty()

    async def main() -> None:
        async with connection(control_plane, timeout) as js:
            client = ControlPlaneClient(js, prefix=prefix, timeout=timeout)
            while True:
                width = shutil.get_terminal_size((120, 40)).columns if tty else 200
                try:
                    frame = render_frame(
                        await client.status(), width=width, ansi=tty, interval=0 if once else interval
                    )
                except MeshError as exc:
                    if once:
                        raise
                    frame = f"control plane did not answer: {exc} (asking again in {interval:g}s)\n"
                sys.stdout.write((_HOME_CLEAR if tty and not once else "") + frame)
                if not tty and not once:
                    sys.stdout.write("\n")
                sys.stdout.flush()
                if once:
                    return
                await anyio.sleep(interval)

    try:
        anyio.run(main)
    except KeyboardInterrupt:
        return
    except MeshError as exc:
        fail(exc)
