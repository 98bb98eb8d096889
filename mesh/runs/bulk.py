"""The scheduled bulk run of a source: :class:`ScheduledSource` wraps an adapter's
:class:`BulkExtract` (rows in key order, after a key) into a resumable, chunked Source.

How a run works, and what it guarantees:

* When the schedule says a run is due (:class:`~mesh.runs.schedule.Schedule`), the run id is
  derived from the flow and the scheduled time (``customers-20261203T020000Z``): a run restarted
  before its first chunk committed gets the same id.
* Each chunk (``chunk_size`` rows with keys after the last committed key) is one
  :class:`~mesh.adapters.ChangeBatch` whose cursor is the run's checkpoint (run id, last key,
  counts, checksum). The capture actor commits the cursor and the chunk's envelopes in ONE outbox
  transaction (I1), so a run killed at any point resumes from its last committed chunk.
* Every row carries its real version (``version_field``), never the time of the run; the
  envelope id is derived from (flow, run id, key, version) (I2), so a resumed chunk yields the
  same ids (the outbox and JetStream drop the repeats, the sink's inbox dedupes), and a row that
  an event already brought to a newer version is skipped by the sink's version guard (I5).
  Envelopes of a run carry the header ``Mesh-Run: <run id>`` so sinks can count what they applied.
* When the extract is exhausted the run is ``completed`` (an empty batch carries the final
  checkpoint) and the source waits for the next scheduled time.
* A :class:`RunTrigger` starts a run now, between scheduled times (``meshctl runs start``): its
  id is ``<flow>-<UTC time>-now``; it leaves the schedule as it was (the next scheduled run is
  still due at its time). While a run is in progress a trigger starts nothing.
"""

from __future__ import annotations

import abc
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime
from typing import Any, NamedTuple

import anyio
import msgspec

from mesh.adapters import Change, ChangeBatch, Source
from mesh.errors import ConfigError
from mesh.runs.records import BulkRun, RunStore, add_hash, record_hash
from mesh.runs.schedule import Clock, Schedule, ScheduleConfig

__all__ = [
    "RUN_HEADER",
    "BulkExtract",
    "BulkRow",
    "Checkpoint",
    "RunTrigger",
    "ScheduledSource",
    "row_version",
    "run_id_for",
    "timestamp_us",
]

RUN_HEADER = "Mesh-Run"
"""The message header naming the bulk run an envelope belongs to."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class BulkRow(NamedTuple):
    """One extracted row: where it is (``position``, JSON-encodable, passed back as ``after`` to
    continue), its entity ``key``, the ``row``, and its ``version`` when the adapter knows it
    (None: read from the row's ``version_field``); ``deleted`` for a soft-deleted record."""

    position: Any
    key: str
    row: dict[str, Any]
    version: int | None = None
    deleted: bool = False


class BulkExtract(abc.ABC):
    """An adapter's full extract, in key order. Implementations: adapters/sql/_bulk.py,
    adapters/rest/_bulk.py. Used as an async context manager (``open`` / idempotent ``aclose``)."""

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Connect. Raises SystemUnavailable (retry later) or ConfigError (table/columns missing)."""

    @abc.abstractmethod
    async def chunk(self, after: Any, limit: int) -> list[BulkRow]:
        """Up to ``limit`` rows whose position sorts after ``after`` (None: from the first), in
        position order; ``key`` is the entity key as the adapter's continuous source spells it.

        Raises:
            SystemUnavailable: the system went away; the caller retries from the same checkpoint.
        """

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release connections. Idempotent."""


class Checkpoint(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The cursor of a scheduled flow: the run in progress (if any) and the last run's schedule time."""

    last_due: float | None = None
    """The scheduled time of the last run started (None: never ran)."""
    since: float | None = None
    """Never ran on schedule: when the source began waiting for the first scheduled time (the
    first run is due at the first scheduled time after it). Runs started by hand keep it, so the
    scheduled time that passes while one is in progress is not lost."""
    run: str | None = None
    due: float = 0.0
    started_at: float = 0.0
    after: Any = None
    read: int = 0
    checksum: int = 0
    resumed: int = 0


_CP_ENC = msgspec.json.Encoder()
_CP_DEC = msgspec.json.Decoder(Checkpoint)


def run_id_for(flow: str, due: float) -> str:
    return f"{flow}-{datetime.fromtimestamp(due, UTC):%Y%m%dT%H%M%SZ}"


_INT_TEXT = re.compile(r"[+-]?[0-9]+")


def timestamp_us(text: str) -> int | None:
    """ISO-8601 text as integer microseconds since the epoch (naive = UTC); None if not one."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return _micros(moment)


def _micros(moment: datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // datetime.resolution


def row_version(value: Any, field: str, *, what: str = "version_field") -> int:
    """A row's version: an integer (or integer text, or a float without fraction), or a
    timestamp (datetime, date or ISO-8601 text) in microseconds since the epoch (naive = UTC).
    The bulk runs and the SQL sources (cursor mode) read versions with it.

    Raises:
        ConfigError: the value is neither (``what`` and ``field`` name where it came from:
            ``version_field 'updated_at'``, ``column 'updated_at'``).
    """
    if isinstance(value, bool):
        pass
    elif isinstance(value, int):
        return value
    elif isinstance(value, float) and value.is_integer():
        return int(value)
    elif isinstance(value, str):
        text = value.strip()
        if _INT_TEXT.fullmatch(text):
            return int(text)
        micros = timestamp_us(text)
        if micros is not None:
            return micros
    elif isinstance(value, datetime):
        return _micros(value)
    elif isinstance(value, date):
        return _micros(datetime(value.year, value.month, value.day))
    raise ConfigError(
        f"{what} {field!r} holds {value!r}: a version must be an integer or an ISO-8601 timestamp"
    )


class RunTrigger:
    """Starts a scheduled flow's run now. One per flow, kept by the agent across the restarts of
    its :class:`ScheduledSource` (which calls :meth:`wait_due`, :meth:`began` and :meth:`ended`)."""

    def __init__(self) -> None:
        self.current: str | None = None
        """The run in progress (None: the source waits for the next run, or is not running)."""
        self._requested = False
        self._wake = anyio.Event()
        self._started = anyio.Event()
        self._manual: dict[str, int] = {}

    def manual_id(self, base: str) -> str:
        """``base``, or ``base-2``, ``-3``... when runs started now already had it (several
        within one second): every run gets its own id, hence its own envelope ids."""
        n = self._manual.get(base, 0) + 1
        self._manual = {base: n}  # only the latest second can repeat
        return base if n == 1 else f"{base}-{n}"

    def __repr__(self) -> str:
        return f"<RunTrigger current={self.current} requested={self._requested}>"

    async def run_now(self, timeout: float) -> tuple[bool, str]:
        """Ask for a run now and wait up to ``timeout`` seconds for the source to start it.
        ``(True, run id)`` once started; ``(False, why)`` when a run is already in progress (its
        id in the message) or the source did not start one in time (the flow is paused, failing or
        not running here; the request stays, so the run starts when the source reads again)."""
        if self.current is not None:
            return False, f"run {self.current} is in progress"
        self._requested = True
        started = self._started = anyio.Event()
        self._wake.set()
        with anyio.move_on_after(timeout):
            await started.wait()
            return True, self.current or ""
        return False, f"the flow's source did not start a run within {timeout:g}s (is the flow running?)"

    async def wait_due(self, due: float, now: Clock, tick: float) -> bool:
        """Wait until ``due`` (by ``now``, looked at every ``tick``) or a request; True if requested."""
        while not self._requested and (left := due - now()) > 0:
            self._wake = anyio.Event()
            if self._requested:
                break
            with anyio.move_on_after(min(left, tick)):
                await self._wake.wait()
        return self._requested

    def began(self, run: str) -> None:
        """The source started (or resumed) ``run``: a request waiting for it is answered."""
        self.current = run
        self._requested = False
        self._started.set()

    def ended(self) -> None:
        """The run in progress completed."""
        self.current = None


Reporter = Callable[[BulkRun], Awaitable[None]]
"""Told every committed change of a run record (the agent reports it to ``mesh_runs``)."""


class ScheduledSource(Source):
    """A Source that runs ``extract`` as a chunked, resumable bulk run at ``schedule``'s times.

    ``now`` is the clock (seconds since the epoch) and ``tick`` the longest sleep between looks at
    it, so a test can move time by hand. Run records go to ``store`` (and ``report``) only once the
    chunk they describe is committed (:meth:`committed`).
    """

    def __init__(
        self,
        flow: str,
        adapter: str,
        cfg: ScheduleConfig,
        extract: BulkExtract,
        store: RunStore,
        *,
        agent: str = "",
        now: Clock = time.time,
        tick: float = 1.0,
        report: Reporter | None = None,
        trigger: RunTrigger | None = None,
    ) -> None:
        """``trigger``: starts a run now when asked (:class:`RunTrigger`)."""
        self.flow, self.adapter, self.cfg, self.extract = flow, adapter, cfg, extract
        self.store, self.agent, self.now, self.tick, self.report = store, agent, now, tick, report
        self.trigger = trigger if trigger is not None else RunTrigger()
        self.schedule = Schedule(cfg.cron, cfg.timezone, now=now)
        self._pending: dict[str, tuple[Checkpoint, BulkRun]] = {}
        self._last: Checkpoint | None = None
        """The checkpoint of the last batch read (committed or not)."""
        self._committed: Checkpoint | None = None
        """The last checkpoint known to be in the outbox."""
        self._opened = False
        self._failed = False

    def __repr__(self) -> str:
        run = self._last.run if self._last else None
        return f"<ScheduledSource {self.flow} {self.schedule!r} run={run}>"

    async def open(self) -> None:
        await self.extract.open()
        self._opened = True

    async def aclose(self) -> None:
        if not self._opened:
            return
        self._opened = False
        with anyio.CancelScope(shield=True):
            try:
                cp = self._committed
                if cp is not None and cp.run is not None and not self._failed:
                    await self._record(cp, "interrupted")
            finally:
                await self.extract.aclose()

    def _record_of(
        self, cp: Checkpoint, state: str, finished: float | None = None, detail: str = ""
    ) -> BulkRun:
        assert cp.run is not None
        return BulkRun(
            id=cp.run, flow=self.flow, adapter=self.adapter, agent=self.agent, state=state,  # type: ignore[arg-type]
            scheduled_for=cp.due, started_at=cp.started_at, finished_at=finished, read=cp.read,
            published=cp.read, checksum=f"{cp.checksum:032x}", resumed=cp.resumed, detail=detail,
        )  # fmt: skip

    async def _record(
        self, cp: Checkpoint, state: str, finished: float | None = None, detail: str = ""
    ) -> None:
        run = self._record_of(cp, state, finished, detail)
        await self.store.put(run)
        if self.report is not None:
            await self.report(run)

    async def _close_orphans(self, keep: str | None) -> None:
        """Runs still recorded ``running`` that the cursor does not continue were killed before
        their first chunk committed (nothing of them is in the outbox): ``interrupted``. A
        scheduled one that is due again starts afresh under the same id."""
        for run in await self.store.list(self.flow, limit=20):
            if run.state == "running" and run.id != keep:
                why = "the agent stopped before the run's first chunk was committed"
                gone = msgspec.structs.replace(run, state="interrupted", detail=why)
                await self.store.put(gone)
                if self.report is not None:
                    await self.report(gone)

    async def read(self, cursor: str | None, limit: int) -> ChangeBatch:
        """The next chunk of the run in progress; else waits (cancellable) for the next due run.

        Unlike a continuous source, it returns one empty batch when a run completes: its cursor
        records the completion.

        Raises:
            SystemUnavailable: from the extract; retry from the same cursor.
            ConfigError: a row's version field is missing or not a version.
        """
        cp = _CP_DEC.decode(cursor) if cursor else Checkpoint()
        if self._last is None:
            self._committed = cp
            await self._close_orphans(cp.run)
            if cp.run is not None:  # resuming after a stop or crash
                cp = msgspec.structs.replace(cp, resumed=cp.resumed + 1)
                await self._record(cp, "running")
                self.trigger.began(cp.run or "")
        self._last = cp
        if cp.run is None:
            c = self.cfg
            # A flow that never ran counts from when it began waiting, not from whenever the
            # source looks again: after a run by hand that ended past the first scheduled time,
            # that time is missed (``missed``), not silently moved to the next one.
            since = cp.since if cp.since is not None or cp.last_due is not None else self.now()
            due = self.schedule.first_due(
                cp.last_due, missed=c.missed, deadline=c.starting_deadline, first_now=c.first_run == "now",
                since=since,
            )  # fmt: skip
            # The clock is injected (tests move it): looked at every ``tick``; cancellable.
            if await self.trigger.wait_due(due, self.now, self.tick):
                now = self.now()  # a run now: the schedule (last_due, since) stays as it was
                run = self.trigger.manual_id(f"{run_id_for(self.flow, now)}-now")
                cp = Checkpoint(last_due=cp.last_due, since=since, run=run, due=now, started_at=now)
            else:
                cp = Checkpoint(last_due=due, run=run_id_for(self.flow, due), due=due, started_at=self.now())
            self._last = cp
            await self._record(cp, "running")
            self.trigger.began(cp.run or "")
            if self._committed is None or self._committed.run is None:
                self._committed = cp  # a stop now leaves the run "interrupted" at 0 rows
        try:
            return self._batch(cp, await self.extract.chunk(cp.after, min(limit, self.cfg.chunk_size)))
        except ConfigError as exc:
            # The flow goes "failing" and retries (agents.delivery); the run resumes from its
            # checkpoint once the cause is fixed. Until then the record says why.
            committed = self._committed if self._committed and self._committed.run == cp.run else cp
            await self._record(committed, "failed", detail=str(exc))
            self._failed = True
            raise

    def _batch(self, cp: Checkpoint, rows: list[BulkRow]) -> ChangeBatch:
        if not rows:
            done = Checkpoint(last_due=cp.last_due, since=cp.since)
            encoded = _CP_ENC.encode(done).decode()
            self._pending[encoded] = (done, self._record_of(cp, "completed", self.now()))
            self._last = done
            self.trigger.ended()
            return ChangeBatch(changes=[], cursor=encoded, run=cp.run or "")
        changes = []
        total = cp.checksum
        field = self.cfg.version_field
        for item in rows:
            key, row, version = item.key, item.row, item.version
            if version is None:
                if field not in row:
                    why = f"rows have no field {field!r} (schedule.version_field)"
                    raise ConfigError(f"flow {self.flow}: {why}")
                version = row_version(row[field], field)
            total = add_hash(total, record_hash(key, version, row))
            changes.append(Change(key=key, version=version, row=row, deleted=item.deleted))
        cp = msgspec.structs.replace(cp, after=rows[-1][0], read=cp.read + len(rows), checksum=total)
        encoded = _CP_ENC.encode(cp).decode()
        self._pending[encoded] = (cp, self._record_of(cp, "running"))
        self._last = cp
        return ChangeBatch(changes=changes, cursor=encoded, run=cp.run or "")

    async def committed(self, cursor: str) -> None:
        """The chunk (or completion) of ``cursor`` is in the outbox: record it."""
        done = self._pending.pop(cursor, None)
        self._pending.clear()
        if done is not None:
            self._committed, run = done
            await self.store.put(run)
            if self.report is not None:
                await self.report(run)
