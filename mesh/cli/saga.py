"""``meshctl saga``: start, list, show, retry and purge sagas (KV bucket ``mesh_sagas``; README
"Orchestration (sagas)").

Reading changes nothing. ``start`` publishes a saga's command trigger; ``retry`` resumes a
``failed`` saga by compare-and-swap. Errors the operator can fix (server down, no bucket, no
such saga, a saga that is not failed, a bad time) print one line and exit 2.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import anyio
import msgspec
import typer

from mesh.cli._access import connection
from mesh.cli._output import fail
from mesh.cli.dlq import quiet_connection_logs
from mesh.dlq import DEFAULT_NATS_URL, parse_time
from mesh.errors import MeshError
from mesh.saga.engine import retry_saga
from mesh.saga.state import SAGA_BUCKET, SagaRecord, decode_record
from mesh.transport import Bucket, JetStream, RevisionConflict

__all__ = ["app"]

_T = TypeVar("_T")

app = typer.Typer(help="Inspect and retry sagas (bucket mesh_sagas).", no_args_is_help=True)

ServerOpt = Annotated[
    str,
    typer.Option("--server", "-s", envvar="MESH_NATS_URL", help="NATS server URL (env MESH_NATS_URL)."),
]
_STATES = ("running", "completed", "compensating", "compensated", "failed")


def _run(server: str, work: Callable[[Bucket], Awaitable[_T]]) -> _T:
    quiet_connection_logs()

    async def main() -> _T:
        async with connection(server, 5.0) as js:
            bucket = await js.key_value(SAGA_BUCKET, create=False)
            return await work(bucket)

    try:
        return anyio.run(main)
    except MeshError as exc:
        fail(exc)


async def _all(bucket: Bucket) -> list[SagaRecord]:
    out = []
    async with await bucket.watch() as watch:
        while True:
            update = await watch.next(timeout=5.0)
            if update is None or update.op == "loaded":
                break
            if update.op == "put":
                try:
                    out.append(decode_record(update.value))
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue
    return out


def _ts(t: float | None) -> str:
    return "-" if not t else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _duration(start: float | None, end: float | None) -> str:
    if not start:
        return "-"
    return f"{(end or time.time()) - start:.2f}s"


def _current_step(rec: SagaRecord) -> str:
    for s in rec.steps:
        if s.state in ("running", "compensating", "compensation_failed", "failed"):
            return s.name
    return next((s.name for s in rec.steps if s.state == "pending"), "-")


def _summary(rec: SagaRecord) -> dict[str, Any]:
    return {
        "id": rec.id,
        "definition": rec.name,
        "state": rec.state,
        "step": _current_step(rec),
        "created_at": _ts(rec.created_at),
        "updated_at": _ts(rec.updated_at),
        "owner": rec.owner,
        "error": rec.error,
    }


@app.command("list")
def _list(
    server: ServerOpt = DEFAULT_NATS_URL,
    state: Annotated[
        str | None, typer.Option("--state", help=f"Only sagas in this state ({', '.join(_STATES)}).")
    ] = None,
    definition: Annotated[
        str | None, typer.Option("--definition", help="Only sagas of this definition.")
    ] = None,
    since: Annotated[
        str | None,
        typer.Option("--since", help="Only sagas started at or after TIME: ISO-8601 or 15m, 2h, 1d."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array.")] = False,
) -> None:
    """List sagas, oldest first."""
    if state is not None and state not in _STATES:
        fail(f"--state {state!r}: expected one of {', '.join(_STATES)}")
    after = 0.0
    if since is not None:
        try:
            after = parse_time(since).timestamp()
        except ValueError as exc:
            fail(f"--since: {exc}")
    recs = [
        r
        for r in _run(server, _all)
        if (state is None or r.state == state)
        and (definition is None or r.name == definition)
        and r.created_at >= after
    ]
    recs.sort(key=lambda r: r.created_at)
    rows = [_summary(r) for r in recs]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no matching sagas")
        return
    head = ("ID", "DEFINITION", "STATE", "STEP", "STARTED", "ERROR")
    cells = [
        head,
        *[(r["id"], r["definition"], r["state"], r["step"], r["created_at"], r["error"]) for r in rows],
    ]
    widths = [max(len(str(c[i])) for c in cells) for i in range(len(head) - 1)]
    for c in cells:
        typer.echo(
            "  ".join(str(v).ljust(w) for v, w in zip(c[:-1], widths, strict=True)) + "  " + str(c[-1])
        )
    typer.echo(f"{len(rows)} saga(s)")


async def _get(bucket: Bucket, sid: str) -> SagaRecord:
    entry = await bucket.get(sid)
    if entry is None:
        raise MeshError(f"no saga {sid!r} (see `meshctl saga list`)")
    return decode_record(entry.value)


@app.command("show")
def _show(
    saga_id: Annotated[str, typer.Argument(metavar="ID", help="The saga id (see `saga list`).")],
    server: ServerOpt = DEFAULT_NATS_URL,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole record as JSON.")] = False,
) -> None:
    """One saga: its state, steps (states, attempts, timings, results, errors)."""
    rec = _run(server, lambda b: _get(b, saga_id))
    if as_json:
        typer.echo(json.dumps(msgspec.to_builtins(rec), indent=2))
        return
    typer.echo(f"saga {rec.id} ({rec.name}): {rec.state}")
    typer.echo(
        f"  started {_ts(rec.created_at)}, updated {_ts(rec.updated_at)},"
        f" took {_duration(rec.created_at, rec.finished_at)}"
    )
    typer.echo(f"  trigger {rec.trigger.get('subject', '-')} id {rec.trigger.get('id', '-')}")
    if rec.owner and rec.state in ("running", "compensating"):
        typer.echo(f"  owner {rec.owner} (lease until {_ts(rec.lease_until)})")
    elif rec.owner:
        typer.echo(f"  last run by {rec.owner}")
    if rec.resume_at and rec.state in ("running", "compensating"):
        typer.echo(f"  parked until {_ts(rec.resume_at)}")
    if rec.retries:
        typer.echo(f"  retried by an operator {rec.retries} time(s)")
    if rec.error:
        typer.echo(f"  error: {rec.error}")
    typer.echo("  steps:")
    for s in rec.steps:
        line = (
            f"    {s.name:<20} {s.state:<20} attempts {s.attempts}  {_duration(s.started_at, s.finished_at)}"
        )
        if s.compensation_attempts:
            line += f"  compensation attempts {s.compensation_attempts}"
        typer.echo(line)
        if s.error:
            typer.echo(f"      error: {s.error}")
        if s.compensation_error:
            typer.echo(f"      compensation error: {s.compensation_error}")
        if s.result is not None:
            typer.echo(f"      result: {json.dumps(s.result)[:200]}")


@app.command("retry")
def _retry(
    saga_id: Annotated[str, typer.Argument(metavar="ID", help="The failed saga's id.")],
    server: ServerOpt = DEFAULT_NATS_URL,
) -> None:
    """Resume a failed saga: its failed compensation runs again, then the earlier ones."""

    async def work(bucket: Bucket) -> SagaRecord:
        try:
            return await retry_saga(bucket, saga_id)
        except (LookupError, ValueError) as exc:
            raise MeshError(str(exc).strip("'\"")) from None
        except RevisionConflict:
            raise MeshError(
                f"saga {saga_id} changed meanwhile; look again with `meshctl saga show`"
            ) from None

    rec = _run(server, work)
    typer.echo(f"saga {rec.id} resumed: compensating (an orchestrator replica picks it up)")


@app.command("start")
def _start(
    subject: Annotated[
        str, typer.Argument(help="A saga's command trigger (cmd.>), e.g. cmd.orchestrator.demo.")
    ],
    data: Annotated[str, typer.Option("--data", help="The command's JSON body, or @FILE.")] = "{}",
    msg_id: Annotated[
        str | None,
        typer.Option("--id", help="Message id (default: a new one); the same id never starts a second saga."),
    ] = None,
    server: ServerOpt = DEFAULT_NATS_URL,
) -> None:
    """Publish a command that triggers a saga (stream MESH_COMMANDS); prints its message id."""
    import uuid

    from mesh.transport import OutMessage

    if not subject.startswith("cmd.") or any(c in subject for c in "*> "):
        fail(f"{subject!r}: a saga is started by a command subject such as cmd.orchestrator.demo")
    text = data
    if data.startswith("@"):
        try:
            text = Path(data[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            fail(f"--data {data}: {exc.strerror or exc}")
    try:
        body = json.loads(text)
    except ValueError as exc:
        fail(f"--data: not JSON: {exc}")
    if not isinstance(body, dict):
        fail("--data: a JSON object is expected")
    mid = msg_id or f"saga-start-{uuid.uuid4()}"

    async def work(js: JetStream) -> bool:
        ack = await js.publish_ack(OutMessage(subject, json.dumps(body).encode(), msg_id=mid))
        return ack.duplicate

    quiet_connection_logs()

    async def main() -> bool:
        async with connection(server, 5.0) as js:
            return await work(js)

    try:
        duplicate = anyio.run(main)
    except MeshError as exc:
        fail(exc)
    note = " (a duplicate: that id was already published, no new saga)" if duplicate else ""
    typer.echo(f"published {subject} id {mid}{note}; see `meshctl saga list --since 5m`")


@app.command("purge")
def _purge(
    older_than: Annotated[
        str,
        typer.Option(
            "--older-than", help="Finished before TIME: ISO-8601 or 7d, 12h, ...", show_default=False
        ),
    ],
    state: Annotated[
        list[str] | None,
        typer.Option("--state", help="Only these states (default: completed and compensated)."),
    ] = None,
    server: ServerOpt = DEFAULT_NATS_URL,
) -> None:
    """Delete finished sagas from mesh_sagas. Running and compensating sagas are never deleted;
    failed ones only when asked for with --state failed."""
    states = state or ["completed", "compensated"]
    bad = [s for s in states if s not in ("completed", "compensated", "failed")]
    if bad:
        fail(f"--state {bad[0]!r}: only completed, compensated and failed sagas can be purged")
    try:
        before = parse_time(older_than).timestamp()
    except ValueError as exc:
        fail(f"--older-than: {exc}")

    async def work(bucket: Bucket) -> int:
        gone = 0
        for rec in await _all(bucket):
            if rec.state in states and (rec.finished_at or rec.updated_at) < before:
                entry = await bucket.get(rec.id)
                if entry is None or decode_record(entry.value).state not in states:
                    continue
                try:
                    await bucket.delete(rec.id, entry.revision)
                except RevisionConflict:
                    continue  # changed meanwhile (retried?): keep it
                gone += 1
        return gone

    typer.echo(f"deleted {_run(server, work)} saga(s)")
