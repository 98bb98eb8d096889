"""The hook through which saga transitions reach transaction tracing (issue 13 item 4).

:func:`trace_saga_event` is called at every saga and step transition, after the transition is
saved. It does nothing yet: the tracing work fills it (one small publish to
``trace.saga.<saga id>`` on its trace stream). It must stay cheap and must never raise: a
tracing problem may not stop a saga.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mesh.saga.state import SagaRecord, StepRecord
    from mesh.transport import Transport

__all__ = ["trace_saga_event"]


async def trace_saga_event(
    transport: Transport, rec: SagaRecord, step: StepRecord | None, event: str
) -> None:
    """Record that saga ``rec`` (at ``step``, None for the saga itself) reached ``event``
    (started, attempt, completed, failed, compensated, compensation_failed). Never raises."""
    return None
