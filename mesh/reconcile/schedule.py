"""Scheduled reconciliation on the control plane (``[[reconcile]]`` in its settings).

At the times of a cron ``schedule`` (``"0 3 * * *"``, read in ``timezone`` by cronsim, as the
bulk-run schedules of :mod:`mesh.runs.schedule`), or every ``every`` seconds (the default:
hourly), the **leader** replica compares each scheduled flow (as
``meshctl reconcile`` does, without repairing unless ``repair = true``), sets the gauge
``mesh_reconcile_exceptions{flow,kind}`` (``kind``: missing, extra, different; the counts of
the last run) and appends an audit entry ``reconcile`` naming the counts. A run that cannot
complete (an agent away) sets ``kind="error"`` to 1 and is audited too; the schedule goes on.
A cron time that passes while no replica leads (or while a run is still going) is not made up:
the next run is at the next scheduled time, as with ``missed = "skip"``. ``schedule`` and
``every`` are exclusive.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated

import anyio
import msgspec
from anyio.abc import TaskStatus
from prometheus_client import Gauge

from mesh.errors import MeshError
from mesh.reconcile.driver import Reconciler
from mesh.reconcile.models import Report
from mesh.runs.schedule import Clock, Schedule
from mesh.security.permissions import DEFAULT_PREFIX
from mesh.transport import Transport

__all__ = ["KINDS", "ReconcileSchedule", "ReconcileScheduler"]

log = logging.getLogger(__name__)

KINDS = ("missing", "extra", "different", "error")

Audit = Callable[[str, str, str, str, dict[str, str]], Awaitable[None]]
"""``(kind, who, target, what, detail)``: appends one audit entry."""


class ReconcileSchedule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One ``[[reconcile]]`` table of the control plane's settings."""

    flow: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,200}$")]
    every: Annotated[float, msgspec.Meta(ge=1.0)] | None = None
    """Seconds between runs (the first run is ``every`` after the control plane starts);
    3600 when neither this nor ``schedule`` is set."""
    schedule: Annotated[str, msgspec.Meta(min_length=1)] | None = None
    """A five-field cron expression (``0 3 * * *``: every day at 03:00), as cronsim reads it."""
    timezone: str = "UTC"
    """The IANA time zone ``schedule`` is read in (``Europe/Berlin``)."""
    agents: list[str] = []
    """The agents running the flow's sides (default: every active registered agent)."""
    repair: bool = False
    """Repair what a run finds (as ``meshctl reconcile --repair``)."""
    buckets: Annotated[int, msgspec.Meta(ge=1, le=8192)] = 1024
    chunk: Annotated[int, msgspec.Meta(ge=1, le=50000)] = 1000
    timeout: Annotated[float, msgspec.Meta(gt=0)] = 300.0

    def __post_init__(self) -> None:
        if self.schedule is not None:
            if self.every is not None:
                raise ValueError("give either schedule (cron) or every (seconds), not both")
            Schedule.check(self.schedule, self.timezone)
        elif self.timezone != "UTC":
            raise ValueError("timezone needs a schedule (cron)")

    @property
    def interval(self) -> float:
        """Seconds between runs when there is no cron ``schedule``."""
        return 3600.0 if self.every is None else self.every


class ReconcileScheduler:
    """Runs ``schedules`` while ``is_leader()``; see the module docstring."""

    def __init__(
        self,
        transport: Transport,
        schedules: Sequence[ReconcileSchedule],
        *,
        gauge: Gauge,
        audit: Audit,
        agents: Callable[[], list[str]],
        is_leader: Callable[[], bool],
        who: str,
        prefix: str = DEFAULT_PREFIX,
        now: Clock = time.time,
        tick: float = 1.0,
    ) -> None:
        """``now`` is the clock cron schedules are evaluated on and ``tick`` the longest sleep
        between looks at it (tests move the clock by hand)."""
        self.transport, self.schedules = transport, list(schedules)
        self.gauge, self.audit, self.agents, self.is_leader = gauge, audit, agents, is_leader
        self.who, self.prefix, self.now, self.tick = who, prefix, now, tick
        self.runs = 0
        self.due: dict[str, float] = {}
        """The next scheduled time (seconds since the epoch) of each cron-scheduled flow."""

    def __repr__(self) -> str:
        return f"<ReconcileScheduler {[s.flow for s in self.schedules]} runs={self.runs}>"

    async def run(self, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run every schedule on its interval until cancelled."""
        async with anyio.create_task_group() as tg:
            for s in self.schedules:
                tg.start_soon(self._loop, s)
            task_status.started()

    async def _loop(self, s: ReconcileSchedule) -> None:
        if s.schedule is None:
            while True:
                await anyio.sleep(s.interval)
                if self.is_leader():
                    await self.run_once(s)
        cron = Schedule(s.schedule, s.timezone, now=self.now)
        due = cron.next_after(self.now())
        while True:
            self.due[s.flow] = due
            # The clock is injected (tests move it), so look at it every ``tick``; cancellable.
            while (left := due - self.now()) > 0:  # noqa: ASYNC110
                await anyio.sleep(min(left, self.tick))
            if self.is_leader():
                await self.run_once(s)
            # Times that passed during the run (or a clock jump) are skipped, not made up.
            due = cron.next_after(max(due, self.now()))

    async def run_once(self, s: ReconcileSchedule) -> Report | None:
        """One run of ``s``: gauge and audit entry set; the report (None when it failed)."""
        rec = Reconciler(
            self.transport, s.flow, s.agents or self.agents(), prefix=self.prefix,
            buckets=s.buckets, chunk=s.chunk, timeout=s.timeout,
        )  # fmt: skip
        report: Report | None = None
        try:
            report = await rec.run(repair=s.repair)
        except MeshError as exc:
            log.warning("scheduled reconcile of %s failed: %s", s.flow, exc)
            counts = {"missing": 0, "extra": 0, "different": 0, "error": 1}
            what = f"failed: {exc}"
        else:
            counts = {
                "missing": len(report.missing), "extra": len(report.extra),
                "different": len(report.different), "error": 0,
            }  # fmt: skip
            what = ", ".join(f"{k} {v}" for k, v in counts.items() if k != "error")
            if report.repaired:
                what += "; repaired " + ", ".join(f"{k} {v}" for k, v in report.repaired.items())
        self.runs += 1
        for kind in KINDS:
            self.gauge.labels(s.flow, kind).set(counts[kind])
        detail = {k: str(v) for k, v in counts.items()}
        try:
            await self.audit("reconcile", self.who, s.flow, what, detail)
        except MeshError as exc:
            log.error("audit: %s (reconcile of %s: %s)", exc, s.flow, what)
        return report
