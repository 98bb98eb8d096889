"""Reports run records to the ``mesh_runs`` KV bucket, and reads them back merged.

Every agent writes only its own keys (``<agent>.<flow>.<run id>.source|sink``, see
:func:`~mesh.runs.records.run_key`; the permission table allows ``$KV.mesh_runs.<agent>.>``
and nothing else of the bucket). A KV put is a JetStream publish to ``$KV.mesh_runs.<key>``,
so an agent needs no JetStream API rights for it. Reports are best effort and retried: the
agent's ``runs.db`` is the durable record; the bucket is the mesh-wide view
(``meshctl runs list|show``), eventually consistent. The control plane creates the bucket and
keeps its entries ``runs_max_age`` seconds (default 30 days, see
:func:`mesh.controlplane.runs_view.ensure_runs_retention`): a record not updated for that long
leaves the bucket (the agent's ``runs.db`` still has it).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Literal

import anyio
import msgspec
from anyio.abc import TaskStatus

from mesh.errors import MeshError
from mesh.runs.records import BulkRun, SinkCounts, SinkTally, run_key

__all__ = [
    "DEFAULT_RUNS_MAX_AGE",
    "RUNS_BUCKET",
    "Publish",
    "RunEntry",
    "RunReporter",
    "RunSummary",
    "RunView",
    "latest_per_flow",
    "merge_runs",
]

log = logging.getLogger(__name__)

RUNS_BUCKET = "mesh_runs"
DEFAULT_RUNS_MAX_AGE = 30 * 86400.0
"""Seconds a run record stays in ``mesh_runs`` after its last update (30 days)."""


Publish = Callable[[str, bytes, str], Awaitable[object]]


class RunEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One value of the bucket: a source's run record or a sink's counts of a run."""

    role: Literal["source", "sink"]
    source: BulkRun | None = None
    sink: SinkCounts | None = None


class RunView(msgspec.Struct, frozen=True, kw_only=True):
    """A run as ``meshctl runs`` shows it: the source's record with the sinks' counts added."""

    run: BulkRun
    sinks: list[SinkCounts] = msgspec.field(default_factory=list)


_ENC = msgspec.json.Encoder()
ENTRY = msgspec.json.Decoder(RunEntry)


def merge_runs(entries: Iterable[RunEntry]) -> list[RunView]:
    """Source records (one per agent, flow and run id) joined with the sink counts of the same
    (flow, run), newest first;
    ``applied``/``skipped`` are the sinks' sums and ``failed`` adds theirs."""
    sources: dict[tuple[str, str, str], BulkRun] = {}
    sinks: dict[tuple[str, str], list[SinkCounts]] = {}
    for e in entries:
        if e.source is not None:
            sources[(e.source.flow, e.source.id, e.source.agent)] = e.source
        elif e.sink is not None:
            sinks.setdefault((e.sink.flow, e.sink.run), []).append(e.sink)
    views = []
    for k, run in sources.items():
        got = sorted(sinks.get(k[:2], []), key=lambda s: s.agent)
        run = msgspec.structs.replace(
            run, applied=sum(s.applied for s in got), skipped=sum(s.skipped for s in got),
            failed=run.failed + sum(s.failed for s in got),
        )  # fmt: skip
        views.append(RunView(run=run, sinks=got))
    views.sort(key=lambda v: (v.run.started_at, v.run.id), reverse=True)
    return views


class RunSummary(msgspec.Struct, frozen=True, kw_only=True):
    """The latest run of one flow, as the control plane's ``/status`` shows it (``runs``)."""

    flow: str
    run: str
    """The run's id (``meshctl runs show RUN``)."""
    agent: str
    adapter: str
    state: str
    """``running``, ``completed``, ``failed`` or ``interrupted`` (CSV: ``duplicate`` too)."""
    started_at: float
    finished_at: float | None = None
    read: int = 0
    published: int = 0
    applied: int = 0
    skipped: int = 0
    failed: int = 0
    age_seconds: float = 0.0
    """Seconds since the run finished (or, while it runs, since it started)."""
    resumed: int = 0
    """How many times the run resumed after a stop or crash."""
    checksum: str = ""
    """The run's checksum over its extracted records (see :class:`~mesh.runs.records.BulkRun`)."""


def latest_per_flow(views: Iterable[RunView], now: float) -> list[RunSummary]:
    """The newest run of each flow (by start time, as :func:`merge_runs` orders), by flow name."""
    latest: dict[str, RunView] = {}
    for v in views:
        have = latest.get(v.run.flow)
        if have is None or (v.run.started_at, v.run.id) > (have.run.started_at, have.run.id):
            latest[v.run.flow] = v
    out = []
    for flow in sorted(latest):
        r = latest[flow].run
        since = r.finished_at if r.finished_at is not None else r.started_at
        out.append(RunSummary(
            flow=flow, run=r.id, agent=r.agent, adapter=r.adapter, state=r.state,
            started_at=r.started_at, finished_at=r.finished_at, read=r.read, published=r.published,
            applied=r.applied, skipped=r.skipped, failed=r.failed,
            age_seconds=round(max(0.0, now - since), 3), resumed=r.resumed, checksum=r.checksum,
        ))  # fmt: skip
    return out


class RunReporter:
    """The agent's reports to ``mesh_runs``: the latest state of each key, put once, retried
    every few seconds while NATS or the bucket is not there. :meth:`run` is its actor."""

    def __init__(self, agent: str, publish: Publish, *, retry_every: float = 2.0) -> None:
        """``publish(subject, data, msg_id)`` is a JetStream publish that waits for the PubAck
        (raises :class:`~mesh.errors.MeshError` when it cannot)."""
        self.agent = agent
        self.publish = publish
        self.retry_every = retry_every
        self._pending: dict[str, bytes] = {}
        self._tally: dict[tuple[str, str], SinkTally] = {}
        self._wake = anyio.Event()

    def __repr__(self) -> str:
        return f"<RunReporter {self.agent} pending={len(self._pending)}>"

    async def report(self, run: BulkRun) -> None:
        """Queue ``run`` (a source's record) for the bucket; never blocks on NATS."""
        self._put(run_key(self.agent, run.flow, run.id, "source"), RunEntry(role="source", source=run))

    async def tallied(self, tally: SinkTally, flow: str, runs: set[str]) -> None:
        """The sink counts of ``runs`` changed in ``tally``: queue them."""
        for run in runs:
            counts = await tally.counts(run, self.agent)
            if counts is not None:
                self._put(run_key(self.agent, flow, run, "sink"), RunEntry(role="sink", sink=counts))

    def _put(self, key: str, entry: RunEntry) -> None:
        self._pending[key] = _ENC.encode(entry)
        self._wake.set()

    async def run(self, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        warned = False
        while True:
            if not self._pending:
                await self._wake.wait()
            self._wake = anyio.Event()
            for key, value in list(self._pending.items()):
                msg_id = hashlib.sha256(key.encode() + b"\0" + value).hexdigest()
                try:
                    await self.publish(f"$KV.{RUNS_BUCKET}.{key}", value, msg_id)
                except MeshError as exc:
                    if not warned:
                        log.warning("run records not reported to %s yet (%s); retrying", RUNS_BUCKET, exc)
                        warned = True
                    break
                if self._pending.get(key) == value:
                    del self._pending[key]
                warned = False
            if self._pending:
                with anyio.move_on_after(self.retry_every):
                    await self._wake.wait()
