"""``meshctl dlq``: list, show, replay and purge dead-lettered messages (stream ``MESH_DLQ``).

Reading never consumes or acks anything. At a hub, ``list`` also names each linked leaf node
site (``meshctl leafnode link``) and how many dead letters it keeps in its own ``MESH_DLQ``:
those are not copied to the hub, so a replay always runs where the message failed.
Errors the operator can fix (server down, no such entry, a bad time) print one line and
exit 2; a replay in which some entries failed exits 1.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any, TypeVar

import anyio
import typer

from mesh.cli._access import connection
from mesh.cli._output import command_group, fail
from mesh.dlq import (
    DEFAULT_NATS_URL,
    DLQ_HEADERS,
    HTTP_HEADERS,
    DeadLetters,
    DlqEntry,
    DlqFilter,
    ReplayOutcome,
    ReplayReport,
    format_time,
    parse_time,
)
from mesh.errors import DecodeError, MeshError, TransportError
from mesh.transport import DLQ_STREAM, JetStream

__all__ = ["app", "quiet_connection_logs"]

_T = TypeVar("_T")

app = command_group("dlq", "Inspect, replay and purge dead-lettered messages (stream MESH_DLQ).")

ServerOpt = Annotated[
    str,
    typer.Option("--server", "-s", envvar="MESH_NATS_URL", help="NATS server URL (env MESH_NATS_URL)."),
]
FlowOpt = Annotated[str | None, typer.Option("--flow", help="Only entries of this flow.", show_default=False)]
ReasonOpt = Annotated[
    str | None,
    typer.Option("--reason", help="Only entries whose reason contains this (any case).", show_default=False),
]
ErrorOpt = Annotated[
    str | None,
    typer.Option(
        "--error", help="Only entries of this error class (e.g. RejectedRecord).", show_default=False
    ),
]
SinceOpt = Annotated[
    str | None,
    typer.Option(
        "--since",
        help="Only entries dead-lettered at or after TIME: ISO-8601 (UTC if no zone) or 15m, 2h, 1d.",
        show_default=False,
    ),
]
UntilOpt = Annotated[
    str | None,
    typer.Option("--until", help="Only entries dead-lettered at or before TIME.", show_default=False),
]
LimitOpt = Annotated[
    int | None, typer.Option("--limit", min=1, help="At most N entries.", show_default=False)
]
SeqsArg = Annotated[
    list[int] | None,
    typer.Argument(help="DLQ sequences (default: every entry matching the filters).", show_default=False),
]

_REASON_WIDTH = 60


_fail = fail


def _time(option: str, text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        return parse_time(text)
    except ValueError as exc:
        _fail(f"{option}: {exc}")


def _filter(
    flow: str | None, reason: str | None, error: str | None, since: str | None, until: str | None
) -> DlqFilter:
    return DlqFilter(
        flow=flow, reason=reason, error=error, since=_time("--since", since), until=_time("--until", until)
    )


def quiet_connection_logs() -> None:
    """The connection's own warnings (refused, disconnected on close) would repeat, in log form,
    what the command reports in one line; keep them out of the terminal."""
    transport = logging.getLogger("mesh.transport")
    if not any(isinstance(h, logging.NullHandler) for h in transport.handlers):
        transport.addHandler(logging.NullHandler())


def _run(server: str, work: Callable[[DeadLetters], Awaitable[_T]]) -> _T:
    """Connect, run ``work``, close; a mesh error becomes one line and exit 2."""
    quiet_connection_logs()

    async def main() -> _T:
        js: JetStream
        async with connection(server, 5.0) as js:
            return await work(DeadLetters(js))

    try:
        return anyio.run(main)
    except MeshError as exc:
        _fail(exc)


async def _edge_dead_letters(dlq: DeadLetters) -> dict[str, int | None]:
    """Sites linked to this hub and their own dead letter counts (``meshctl leafnode link``);
    empty when the stream is not this hub's, or when the hub's MESH_EVENTS cannot be asked (the
    note is a hint: it never makes the listing fail)."""
    from mesh.leafnode import edge_dead_letters

    if not isinstance(dlq.js, JetStream) or dlq.stream != DLQ_STREAM:
        return {}
    try:
        return await edge_dead_letters(dlq.js)
    except TransportError:
        return {}


def _entries(n: int) -> str:
    return f"{n} entr{'y' if n == 1 else 'ies'}"


def _shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def _table(entries: list[DlqEntry]) -> None:
    head = ("SEQ", "TIME", "FLOW", "ERROR", "ATT", "SUBJECT", "KEY", "VERSION", "ENVELOPE ID", "REASON")
    rows = []
    for e in entries:
        env = e.envelope
        rows.append((
            str(e.seq), format_time(e.time), e.flow, e.error_class or "-",
            "-" if e.attempts is None else str(e.attempts), e.original_subject or "-",
            env.key if env else "-", str(env.version) if env else "-",
            env.id if env else "(undecodable)", _shorten(e.reason, _REASON_WIDTH) or "-",
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]
    for r in [head, *rows]:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])


@app.command("list")
def _list(
    server: ServerOpt = DEFAULT_NATS_URL,
    flow: FlowOpt = None,
    reason: ReasonOpt = None,
    error: ErrorOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    limit: LimitOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array instead of a table.")] = False,
) -> None:
    """List dead-lettered messages, oldest first (reads only; nothing is consumed)."""
    flt = _filter(flow, reason, error, since, until)

    async def work(dlq: DeadLetters) -> tuple[bool, list[DlqEntry], dict[str, int | None]]:
        exists = await dlq.bounds() is not None
        return exists, await dlq.select(flt, limit=limit), await _edge_dead_letters(dlq)

    exists, entries, edges = _run(server, work)
    for domain, count in edges.items():
        held = "does not answer now" if count is None else f"holds {_entries(count)}"
        typer.secho(
            f"note: JetStream domain {domain!r} (a leaf node site sourced by this server) keeps its own"
            f" dead letters; its {DLQ_STREAM} {held}: run `meshctl dlq` against that site's server",
            err=True, fg=typer.colors.YELLOW,
        )  # fmt: skip
    if as_json:
        typer.echo(json.dumps([e.summary() for e in entries], indent=2, ensure_ascii=False))
        return
    if not exists:
        typer.echo(f"{DLQ_STREAM} does not exist yet: nothing has been dead-lettered")
        return
    if not entries:
        typer.echo("no matching DLQ entries" if not flt.is_empty else f"{DLQ_STREAM} is empty")
        return
    _table(entries)
    typer.echo(_entries(len(entries)))


def _hex_preview(data: bytes, limit: int = 256) -> list[str]:
    lines = []
    for off in range(0, min(len(data), limit), 16):
        chunk = data[off : off + 16]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"  {off:08x}  {chunk.hex(' '):<47}  {text}")
    if len(data) > limit:
        lines.append(f"  ... {len(data) - limit} more bytes")
    return lines


def _show_json(e: DlqEntry) -> dict[str, Any]:
    out = e.summary()
    out["subject"] = e.subject
    out["headers"] = dict(e.headers)
    if e.http is not None:
        out["http"] = {k: _maybe_json(v) if k != "status" else v for k, v in e.http.items()}
    if e.envelope is not None:
        env = e.envelope
        out["envelope"] = {
            "id": env.id, "kind": env.kind, "schema": env.schema, "flow": env.flow, "key": env.key,
            "version": env.version, "origin": env.origin, "occurred_at": env.occurred_at,
            "correlation_id": env.correlation_id, "causation_id": env.causation_id,
            "traceparent": env.traceparent,
        }  # fmt: skip
        try:
            out["payload"] = e.payload_json()
        except DecodeError:
            out["payload_hex"] = bytes(env.payload).hex()
    else:
        out["data_hex"] = e.data.hex()
    return out


def _maybe_json(text: str) -> Any:
    """A body as JSON when it is JSON (a bounded body cut short is not: kept as text)."""
    try:
        return json.loads(text) if text else text
    except ValueError:
        return text


@app.command("show")
def _show(
    seq: Annotated[int, typer.Argument(help="The entry's sequence in MESH_DLQ (see `dlq list`).")],
    server: ServerOpt = DEFAULT_NATS_URL,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Everything about one entry: all headers, the decoded envelope, the payload."""

    async def work(dlq: DeadLetters) -> DlqEntry:
        return await dlq.get(seq)

    e = _run(server, work)
    if as_json:
        typer.echo(json.dumps(_show_json(e), indent=2, ensure_ascii=False))
        return
    typer.echo(f"DLQ entry {e.seq} in {DLQ_STREAM} (subject {e.subject}, {len(e.data)} bytes)")
    typer.echo(f"  time: {format_time(e.time)}")
    typer.echo("Dead-letter headers:")
    for name in sorted(DLQ_HEADERS):
        if name in e.headers:
            typer.echo(f"  {name}: {e.headers[name]}")
    if e.http is not None:
        typer.echo(f"HTTP answer: {e.http['status']}")
        for label, name in (("Request body", "request_body"), ("Response body", "response_body")):
            body = _maybe_json(e.http[name])
            typer.echo(f"{label}:" if body else f"{label}: (none)")
            if body:
                text = json.dumps(body, indent=2, ensure_ascii=False) if not isinstance(body, str) else body
                for line in text.splitlines():
                    typer.echo(f"  {line}")
    others = {k: v for k, v in e.headers.items() if k not in DLQ_HEADERS | HTTP_HEADERS}
    if others:
        typer.echo("Original headers:")
        for name, value in others.items():
            typer.echo(f"  {name}: {value}")
    env = e.envelope
    if env is None:
        typer.echo(f"Envelope: not decodable ({e.decode_error})")
        typer.echo("Data (hex):")
        for line in _hex_preview(e.data):
            typer.echo(line)
        return
    typer.echo("Envelope:")
    for name, value in _show_json(e)["envelope"].items():
        if value not in ("", None):
            typer.echo(f"  {name}: {value}")
    try:
        payload = e.payload_json()
    except DecodeError as exc:
        typer.echo(f"Payload: not decodable ({exc}); hex:")
        for line in _hex_preview(bytes(env.payload)):
            typer.echo(line)
    else:
        typer.echo("Payload (JSON):")
        for line in json.dumps(payload, indent=2, ensure_ascii=False).splitlines():
            typer.echo(f"  {line}")


def _report(report: ReplayReport, *, keep: bool) -> None:
    dup = f" ({report.duplicates} already stored inside the duplicate window)" if report.duplicates else ""
    kept = "kept in the DLQ (--keep)" if keep else f"{report.deleted} deleted from {DLQ_STREAM}"
    typer.echo(f"replayed {report.replayed}{dup}, failed {report.failed}, skipped {report.skipped}; {kept}")
    for problem in report.problems:
        typer.secho(f"  {problem}", fg=typer.colors.YELLOW, err=True)


@app.command(
    "replay",
    help="Republish entries to their original subject (Nats-Msg-Id replay-<seq>), then delete them.\n\n"
    "The sink's inbox and version guard make the replay safe: a fixed message applies once, anything "
    "already applied is a duplicate. Exits 1 if some entries failed.",
)
def _replay(
    seqs: SeqsArg = None,
    server: ServerOpt = DEFAULT_NATS_URL,
    flow: FlowOpt = None,
    reason: ReasonOpt = None,
    error: ErrorOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    limit: LimitOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what would be replayed.")] = False,
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep the entries in the DLQ after replaying.")
    ] = False,
) -> None:
    """Republish entries to their original subject, then delete them (help above)."""
    flt = _filter(flow, reason, error, since, until)

    async def work(dlq: DeadLetters) -> ReplayReport | None:
        entries = await dlq.select(flt, seqs or (), limit=limit)
        if not entries:
            typer.echo("no matching DLQ entries: nothing to replay")
            return None
        if dry_run:
            _table(entries)
            skip = sum(1 for e in entries if not e.original_subject)
            typer.echo(
                f"dry run: would replay {_entries(len(entries) - skip)}"
                + (f" and skip {skip} without an original subject" if skip else "")
                + "; nothing published or deleted"
            )
            return None
        typer.echo(f"replaying {_entries(len(entries))} from {DLQ_STREAM}")
        with typer.progressbar(length=len(entries), label="replay", file=sys.stderr) as bar:

            def step(_: DlqEntry, __: ReplayOutcome) -> None:
                bar.update(1)

            return await dlq.replay(entries, keep=keep, progress=step)

    report = _run(server, work)
    if report is None:
        return
    _report(report, keep=keep)
    if report.failed:
        raise typer.Exit(1)


@app.command("purge")
def _purge(
    seqs: SeqsArg = None,
    server: ServerOpt = DEFAULT_NATS_URL,
    flow: FlowOpt = None,
    reason: ReasonOpt = None,
    error: ErrorOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    limit: LimitOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete matching entries (all of them when no filter or sequence is given)."""
    flt = _filter(flow, reason, error, since, until)
    whole = flt.is_empty and not seqs and limit is None

    async def count(dlq: DeadLetters) -> tuple[int, list[DlqEntry], int]:
        if whole:
            bounds = await dlq.bounds()
            return (0, [], 0) if bounds is None else (bounds[2], [], bounds[1])
        entries = await dlq.select(flt, seqs or (), limit=limit)
        return len(entries), entries, 0

    n, entries, last_seq = _run(server, count)
    if n == 0:
        typer.echo("no matching DLQ entries: nothing to purge")
        return
    what = f"all {n} entries of {DLQ_STREAM}" if whole else f"{_entries(n)} from {DLQ_STREAM}"
    if not yes and not typer.confirm(f"delete {what}?", default=False):
        typer.echo("nothing deleted")
        raise typer.Exit(1)

    async def purge(dlq: DeadLetters) -> int:
        if whole:
            return await dlq.purge_all(last_seq)
        return await dlq.purge(entries)

    deleted = _run(server, purge)
    typer.echo(f"deleted {_entries(deleted)} from {DLQ_STREAM}")
