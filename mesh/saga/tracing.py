"""Saga transitions as trace records (README "Tracing business transactions").

:func:`trace_saga_event` is called at every saga and step transition, after the transition is
saved, and records one ``saga_step`` record to the current task's
:class:`~mesh.trace.TraceRecorder` (the orchestrator's own, see :mod:`agents.orchestrator`;
nothing happens without one). The record belongs to the transaction of the saga's trigger (its
correlation id, else the saga id), names the saga id as its ``envelope_id`` (so ``meshctl trace
<saga id>`` finds it) and the trigger as its cause. Outcomes: ``saga_started``,
``saga_completed``, ``saga_compensated``, ``saga_failed`` for the saga; ``started`` (an attempt),
``completed``, ``failed``, ``compensated``, ``compensation_failed`` for a step. ``detail`` is
``<saga>/<step>`` plus the reason of a failure. When a saga starts, its trigger message is
recorded ``applied`` (outcome ``saga_started``, flow ``saga-<name>``): the saga is what consumes
it, so the transaction completes when the saga does.

Guarantees: appends to memory only (no I/O); never raises.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from mesh.trace import child_traceparent, record

if TYPE_CHECKING:
    from mesh.saga.state import SagaRecord, StepRecord
    from mesh.transport import Transport

__all__ = ["saga_outcome", "trace_saga_event"]

log = logging.getLogger(__name__)

_SAGA = {"started": "saga_started", "completed": "saga_completed",
         "compensated": "saga_compensated", "failed": "saga_failed"}  # fmt: skip
_STEP = {"attempt": "started"}


def saga_outcome(step: StepRecord | None, event: str) -> str:
    """The ``saga_step`` outcome that the engine's ``event`` (for ``step``, None = the saga) is."""
    if step is None:
        return _SAGA.get(event, f"saga_{event}")
    return _STEP.get(event, event)


async def trace_saga_event(
    transport: Transport, rec: SagaRecord, step: StepRecord | None, event: str
) -> None:
    """Record that saga ``rec`` (at ``step``, None for the saga itself) reached ``event``
    (started, attempt, completed, failed, compensated, compensation_failed). Never raises."""
    try:
        _record(rec, step, event)
    except Exception as exc:  # tracing may not stop a saga
        log.warning("saga %s: trace record for %s not made: %s", rec.id, event, exc)


def _record(rec: SagaRecord, step: StepRecord | None, event: str) -> None:
    trigger: dict[str, Any] = rec.trigger
    corr = str(trigger.get("correlation_id") or rec.id)
    outcome = saga_outcome(step, event)
    latency = 0.0
    if step is None:
        detail = rec.name
        if event in ("compensated", "failed") and rec.error:
            detail = f"{rec.name}: {rec.error}"
        elif event == "completed" and rec.finished_at:
            latency = rec.finished_at - rec.created_at
    else:
        detail = f"{rec.name}/{step.name}"
        if event == "attempt":
            detail += f" attempt {step.attempts}"
        elif event == "failed" and step.error:
            detail += f": {step.error}"
            latency = (step.finished_at or 0) - (step.started_at or 0)
        elif event == "compensation_failed" and step.compensation_error:
            detail += f": {step.compensation_error}"
        elif event == "completed":
            latency = (step.finished_at or 0) - (step.attempt_started_at or step.started_at or 0)
    if step is None and event == "started" and trigger.get("id"):
        # The trigger message has been taken up: starting the saga is what applying it means here
        # (no sink consumes a saga's trigger, so without this its transaction never completes).
        record(
            "applied",
            correlation_id=corr,
            envelope_id=str(trigger["id"]),
            business_key=_business_key(trigger),
            flow=f"saga-{rec.name}",
            outcome="saga_started",
            detail=rec.id,
            traceparent=str(trigger.get("traceparent", "")),
        )
    record(
        "saga_step",
        correlation_id=corr,
        envelope_id=rec.id,
        causation_id=str(trigger.get("id", "")),
        business_key=_business_key(trigger),
        flow=f"saga-{rec.name}",
        outcome=outcome,
        detail=detail,
        latency_ms=int(max(0.0, latency) * 1000),
        traceparent=child_traceparent(str(trigger.get("traceparent", ""))),
    )


def _business_key(trigger: dict[str, Any]) -> str:
    """``<entity>:<key>`` of an envelope trigger (as the agents name it: ``deal:42``)."""
    kind, key = trigger.get("kind"), trigger.get("key")
    if isinstance(kind, str) and kind and key not in (None, ""):
        return f"{kind.rpartition('.')[0] or kind}:{key}"
    return ""
