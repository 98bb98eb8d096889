"""Run records of adapters with the ``runs`` capability (the CSV adapters' file imports and
exports), as bulk runs in ``mesh_runs``, so ``meshctl runs list`` and ``/status`` show them next
to the scheduled SQL and REST runs, across agents.

An adapter keeps its own records (the CSV adapters: in their ``state_path``, see
:mod:`adapters.files.runs`); :class:`AdapterRunWatcher` reads the newest ``limit`` of each every
``every`` seconds (read-only, beside the running adapter) and hands every record that is new or
changed since it last did to the agent's reporter. A record becomes a :class:`BulkRun` with id
``<flow>-import-<n>`` or ``<flow>-export-<n>`` (:func:`adapter_run`; ``meshctl runs list
--config`` prints the same ids).
Eventually consistent (up to ``every`` seconds late); a record that cannot be read is retried at
the next look.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import anyio
import anyio.to_thread
from anyio.abc import TaskStatus

from mesh.adapters import RunRecord
from mesh.errors import MeshError
from mesh.plugins import RunLog, adapter_registry
from mesh.runs.records import BulkRun, RunState

__all__ = ["AdapterRunWatcher", "adapter_run"]

log = logging.getLogger(__name__)

_STATE: dict[str, RunState] = {
    "complete": "completed", "duplicate": "completed", "running": "running", "failed": "failed",
}  # fmt: skip


def adapter_run(flow: str, adapter: str, agent: str, r: RunRecord) -> BulkRun:
    """One adapter run record as a bulk run (``complete`` and ``duplicate`` are ``completed``;
    ``read``/``published``/``failed`` are the rows in, out and rejected)."""
    return BulkRun(
        id=f"{flow}-{r.direction}-{r.id}", flow=flow, adapter=adapter, agent=agent,
        state=_STATE.get(r.status, "failed"), scheduled_for=r.started_at, started_at=r.started_at,
        finished_at=r.finished_at, read=r.rows_in, published=r.rows_out, failed=r.rows_failed,
        checksum=r.checksum or "", detail=" ".join(x for x in (r.direction, r.file, r.detail) if x),
    )  # fmt: skip


Sides = Callable[[], Iterable[tuple[str, Any]]]
"""``(flow name, source or sink config)`` of every flow side the agent runs now."""


class AdapterRunWatcher:
    """Reports the run records of the agent's adapters with the ``runs`` capability; :meth:`run`
    is its actor (see the module docstring)."""

    def __init__(
        self,
        agent: str,
        sides: Sides,
        report: Callable[[BulkRun], Awaitable[None]],
        *,
        every: float = 2.0,
        limit: int = 20,
        runs_of: Callable[[Any], RunLog | None] | None = None,
    ) -> None:
        self.agent, self.sides, self.report, self.every, self.limit = agent, sides, report, every, limit
        self.runs_of = runs_of if runs_of is not None else adapter_registry().runs_of
        self._sent: dict[tuple[str, str], dict[str, BulkRun]] = {}
        """(flow, records location) -> run id -> what was reported last."""
        self._warned: set[tuple[str, str]] = set()

    def __repr__(self) -> str:
        return f"<AdapterRunWatcher {self.agent} logs={len(self._sent)}>"

    async def run(self, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Look every ``every`` seconds until cancelled."""
        task_status.started()
        while True:
            await self.scan()
            await anyio.sleep(self.every)

    async def scan(self) -> int:
        """Look once; how many records were handed to the reporter."""
        reported = 0
        seen: set[tuple[str, str]] = set()
        for flow, side in list(self.sides()):
            runs = self.runs_of(side)
            if runs is None:
                continue
            where = (flow, runs.location(side))
            if where in seen:  # a flow whose source and sink share their records
                continue
            seen.add(where)
            try:
                read = functools.partial(runs.read, side, limit=self.limit)
                records = await anyio.to_thread.run_sync(read)
            except MeshError as exc:
                if where not in self._warned:
                    log.warning("flow %s: run records not readable yet: %s", flow, exc)
                    self._warned.add(where)
                continue
            self._warned.discard(where)
            adapter = str(type(side).__struct_config__.tag)
            before = self._sent.get(where, {})
            now: dict[str, BulkRun] = {}
            for r in records:
                run = adapter_run(flow, adapter, self.agent, r)
                now[run.id] = run
                if before.get(run.id) != run:
                    await self.report(run)
                    reported += 1
            self._sent[where] = now
        for gone in set(self._sent) - seen:  # flows no longer run here
            del self._sent[gone]
        return reported
