"""Durable saga state: one msgspec record per saga in the JetStream KV bucket ``mesh_sagas``.

The key is the saga id; the value a :class:`SagaRecord` (its definition, state, steps with their
states, attempts, timings, results and errors, and the lease of the replica running it). Every
change is a compare-and-swap on the key's revision (:class:`~mesh.transport.Bucket.update`), so
two writers can never both win: a replica whose write conflicts has lost the saga and stops.

States: ``running`` -> ``completed``; or a step fails -> ``compensating`` -> ``compensated``;
a compensation fails -> ``failed`` (dead-lettered; ``meshctl saga retry`` -> ``compensating``).
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Literal

import msgspec

from mesh.saga.definition import SagaDef

__all__ = [
    "ACTIVE_STATES",
    "SAGA_BUCKET",
    "SagaRecord",
    "SagaState",
    "StepRecord",
    "StepState",
    "decode_record",
    "encode_record",
    "new_record",
    "saga_id",
]

SAGA_BUCKET = "mesh_sagas"

SagaState = Literal["running", "completed", "compensating", "compensated", "failed"]
StepState = Literal[
    "pending", "running", "completed", "failed", "compensating", "compensated", "compensation_failed"
]
ACTIVE_STATES: frozenset[str] = frozenset({"running", "compensating"})
"""States in which a replica owns and advances the saga."""


class StepRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str
    state: StepState = "pending"
    attempts: int = 0
    started_at: float | None = None
    """When the first attempt started (unix seconds)."""
    attempt_started_at: float | None = None
    finished_at: float | None = None
    next_attempt_at: float | None = None
    """After a retryable failure: when the next attempt may start (survives a restart)."""
    wake_at: float | None = None
    """wait steps: when the wait ends."""
    await_from_seq: int | None = None
    """publish_await: the MESH_EVENTS sequence after which the awaited event is looked for."""
    result: Any = None
    error: str = ""
    compensation_attempts: int = 0
    compensation_error: str = ""
    compensated_at: float | None = None


class SagaRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    name: str
    definition: SagaDef
    state: SagaState = "running"
    trigger: dict[str, Any] = msgspec.field(default_factory=dict)
    steps: list[StepRecord] = msgspec.field(default_factory=list)
    created_at: float = 0.0
    updated_at: float = 0.0
    finished_at: float | None = None
    error: str = ""
    """Why the saga compensates or failed (one line)."""
    owner: str = ""
    """The replica running it ("" when none)."""
    lease_until: float = 0.0
    resume_at: float = 0.0
    """A parked saga (a long wait or retry backoff, no owner) is claimable from this time on."""
    retries: int = 0
    """How many times an operator resumed it (``meshctl saga retry``)."""

    def step(self, name: str) -> StepRecord:
        return next(s for s in self.steps if s.name == name)

    def results(self) -> dict[str, Any]:
        """Completed steps' results by name (the ``steps`` root of templates)."""
        return {s.name: s.result for s in self.steps if s.state != "pending" and s.result is not None}

    def claimable(self, now: float) -> bool:
        """Active, with nobody's live lease on it, and not parked until later."""
        return (
            self.state in ACTIVE_STATES
            and (not self.owner or self.lease_until < now)
            and self.resume_at <= now
        )


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(SagaRecord)


def encode_record(rec: SagaRecord) -> bytes:
    return _encoder.encode(rec)


def decode_record(data: bytes) -> SagaRecord:
    """Raises msgspec.DecodeError/ValidationError on a value that is not a saga record."""
    return _decoder.decode(data)


def saga_id(name: str, trigger_id: str) -> str:
    """The id of the saga ``name`` started by the message ``trigger_id``: the same message
    always yields the same id (a redelivered trigger starts no second saga). A KV key and one
    NATS subject token."""
    digest = hashlib.sha256(f"{name}\x00{trigger_id}".encode()).hexdigest()[:20]
    return f"{name}-{digest}"


def new_record(
    saga: SagaDef, sid: str, trigger: dict[str, Any], *, owner: str = "", lease: float = 0.0
) -> SagaRecord:
    now = time.time()
    return SagaRecord(
        id=sid,
        name=saga.name,
        definition=saga,
        trigger=trigger,
        steps=[StepRecord(name=s.name) for s in saga.steps],
        created_at=now,
        updated_at=now,
        owner=owner,
        lease_until=now + lease if owner else 0.0,
    )
