"""Scheduled bulk runs: cron schedules, run records, and the resumable bulk extract of a source.

* :mod:`mesh.runs.schedule`: when a scheduled flow runs (cron + time zone, injectable clock,
  what happens to runs missed while the agent was down).
* :mod:`mesh.runs.records`: the run record (:class:`BulkRun`) and the agent's durable run store.
* :mod:`mesh.runs.bulk`: :class:`ScheduledSource`, a Source that turns a key-ordered extract
  into chunks whose checkpoint commits with the outbox (I1), so a killed run resumes.
"""

from mesh.runs.records import BulkRun, RunState, RunStore
from mesh.runs.schedule import MissedPolicy, Schedule, ScheduleConfig

__all__ = ["BulkRun", "MissedPolicy", "RunState", "RunStore", "Schedule", "ScheduleConfig"]
