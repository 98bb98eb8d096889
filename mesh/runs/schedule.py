"""Cron schedules of bulk runs, evaluated by cronsim in the schedule's own time zone.

A flow with ``[flows.schedule]`` runs its source as a bulk extract at the schedule's times
instead of continuously. Times are computed in ``timezone`` (IANA name, default UTC), so
``0 2 * * *`` in ``Europe/Berlin`` is 02:00 Berlin time in winter and in summer; on the night
the clocks skip 02:00 the run happens at 03:00, and on the night 02:00 happens twice it runs once.

Missed runs (the agent was down at the scheduled time): like Kubernetes CronJob with a
``startingDeadlineSeconds``, ``missed = "run_once"`` (the default) starts ONE run at start-up
if at least one scheduled time passed while the agent was down and it is not older than
``starting_deadline`` seconds (0: no limit); several missed times still make one run.
``missed = "skip"`` waits for the next scheduled time.

The clock is injected (``now``: seconds since the epoch) so tests move time by hand.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from cronsim import CronSim, CronSimError

from mesh._config_base import ConfigStruct

__all__ = ["Clock", "MissedPolicy", "Schedule", "ScheduleConfig"]

MissedPolicy = Literal["run_once", "skip"]

Clock = Callable[[], float]
"""Seconds since the epoch (``time.time`` in production, a settable value in tests)."""


class ScheduleConfig(ConfigStruct, frozen=True):
    """``[flows.schedule]``: run the flow's source as a scheduled bulk extract."""

    cron: Annotated[str, msgspec.Meta(min_length=1)]
    """A five-field cron expression (``0 2 * * *``: every day at 02:00), as cronsim reads it."""
    timezone: str = "UTC"
    """The IANA time zone the expression is read in (``Europe/Berlin``)."""
    missed: MissedPolicy = "run_once"
    """What to do about scheduled times that passed while the agent was down."""
    starting_deadline: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    """``run_once``: a missed time older than this many seconds is skipped (0: no limit)."""
    version_field: Annotated[str, msgspec.Meta(min_length=1)] = "updated_at"
    """The row field that holds the row's real version (an integer that grows with every change,
    or a timestamp: converted to microseconds since the epoch). A bulk row carries this version,
    never "now", so it cannot overwrite a newer change applied in real time (I5). Use the same
    version the flow's real-time capture uses (e.g. its ``version_column``) so the two compare.
    Adapters that version records themselves (REST: the source's ``version_field`` and
    ``version_type``) ignore it."""
    first_run: Literal["schedule", "now"] = "schedule"
    """A flow that never ran: wait for the first scheduled time (``schedule``, like a CronJob) or
    run once at once (``now``, then on schedule)."""
    chunk_size: Annotated[int, msgspec.Meta(ge=1)] = 1000
    """Rows per chunk; each chunk commits with its checkpoint (the resume point)."""

    def __post_init__(self) -> None:
        Schedule.check(self.cron, self.timezone)


class Schedule:
    """When the runs of one schedule are due. Stateless apart from the injected clock."""

    def __init__(self, cron: str, timezone: str = "UTC", *, now: Clock = time.time) -> None:
        """Raises:
        ValueError: the expression or the time zone is not valid (the message says which)."""
        self.cron = cron
        self.tz = self.check(cron, timezone)
        self.now = now

    def __repr__(self) -> str:
        return f"<Schedule {self.cron!r} {self.tz.key}>"

    @staticmethod
    def check(cron: str, timezone: str) -> ZoneInfo:
        """The time zone, after checking both; raises ValueError naming what is wrong."""
        try:
            tz = ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"timezone: unknown time zone {timezone!r} (use an IANA name such as Europe/Berlin)"
            ) from None
        try:
            CronSim(cron, datetime(2000, 1, 1, tzinfo=tz))
        except CronSimError as exc:
            raise ValueError(f"cron: {cron!r} is not a valid cron expression ({exc})") from None
        return tz

    def next_after(self, ts: float) -> float:
        """The first scheduled time strictly after ``ts`` (seconds since the epoch)."""
        start = datetime.fromtimestamp(ts, self.tz)
        for when in CronSim(self.cron, start):
            t = when.timestamp()
            if t > ts:
                return t
        raise ValueError(f"cron {self.cron!r} never fires")  # pragma: no cover - cronsim iterates forever

    def first_due(
        self,
        last_due: float | None,
        *,
        missed: MissedPolicy = "run_once",
        deadline: float = 0.0,
        first_now: bool = False,
        since: float | None = None,
    ) -> float:
        """The time the next run is due, given the scheduled time of the last run started
        (``last_due``; None: never ran). A result at or before ``now()`` means: run now.

        Never ran: the next scheduled time after ``since`` (when the schedule began counting;
        None: now), so a new flow does not run at once; or now with ``first_now``.
        Ran before: the next scheduled time after ``last_due``.
        Either way, if that time has passed (the agent was down, or a run started by hand was in
        progress), ``run_once`` makes it due now (unless older than ``deadline`` seconds), and
        ``skip`` moves on to the next time after now.
        """
        now = self.now()
        if last_due is None:
            if first_now:
                return now
            last_due = now if since is None else since
        nxt = self.next_after(last_due)
        if nxt > now:
            return nxt
        latest = self._latest_at_or_before(now, nxt)
        if missed == "run_once" and (deadline <= 0 or now - latest <= deadline):
            return latest
        return self.next_after(now)

    def _latest_at_or_before(self, now: float, first: float) -> float:
        """The last scheduled time in [first, now] (``first`` is one), by cronsim's reverse walk."""
        start = datetime.fromtimestamp(now, self.tz)
        for when in CronSim(self.cron, start, reverse=True):
            return max(first, when.timestamp())
        return first  # pragma: no cover - cronsim iterates forever

    @staticmethod
    def iso(ts: float) -> str:
        return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")
