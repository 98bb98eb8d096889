"""The audit trail: who did what to which agent or flow, when, through which replica.

Entries are JSON :class:`AuditEntry` documents appended to stream ``MESH_AUDIT`` on subject
``audit.<kind>`` (``audit.register``, ``audit.revoke``, ...); the stream itself is created by
:meth:`mesh.transport.JetStream.ensure_streams`. Guarantees:

* :meth:`AuditLog.append` returns only once JetStream acknowledged the entry, and retries within
  its time budget; each entry has a unique ``Nats-Msg-Id``, so a retried append is stored once.
* :func:`tail` reads without consuming: an ephemeral ordered consumer, nothing is acked or deleted.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
import msgspec
import nats.js.errors
from nats.js.api import ConsumerConfig, DeliverPolicy

from mesh.errors import DecodeError, TransportError
from mesh.transport import AUDIT_STREAM, JetStream, OutMessage, Transport
from mesh.transport._nats import NATS_ERRORS, TIMEOUTS

__all__ = ["AuditEntry", "AuditLog", "AuditRecord", "audit_subject", "tail"]


class AuditEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One audited action."""

    kind: str
    """``register``, ``deregister``, ``revoke`` (later: ``flow.apply``, ``command`` ...)."""
    at: float
    """Unix time the control plane carried the action out."""
    who: str
    """Who asked: the operator (``user@host`` or ``$MESH_ACTOR``) or the agent itself."""
    target: str
    """What it was done to (an agent or flow name)."""
    what: str
    """One line saying what happened."""
    replica: str = ""
    """The control-plane replica that carried it out."""
    detail: dict[str, str] = msgspec.field(default_factory=dict)


_decoder = msgspec.json.Decoder(AuditEntry)


def audit_subject(kind: str) -> str:
    """``audit.<kind>``."""
    return f"audit.{kind}"


@dataclass(frozen=True, slots=True)
class AuditRecord:
    seq: int
    subject: str
    entry: AuditEntry


class AuditLog:
    """Appends entries for one control-plane replica."""

    def __init__(self, js: Transport, replica: str, *, timeout: float = 5.0) -> None:
        self.js = js
        self.replica = replica
        self.timeout = timeout
        self.appended = 0

    def __repr__(self) -> str:
        return f"<AuditLog {self.replica} appended={self.appended}>"

    async def append(
        self, kind: str, *, who: str, target: str, what: str, detail: dict[str, str] | None = None
    ) -> int:
        """Store one entry; returns its stream sequence.

        Raises:
            TransportError: not acknowledged within ``timeout`` (after retries).
        """
        entry = AuditEntry(
            kind=kind,
            at=time.time(),
            who=who or "unknown",
            target=target,
            what=what,
            replica=self.replica,
            detail=detail or {},
        )
        data = msgspec.json.encode(entry)
        msg = OutMessage(
            audit_subject(kind), data, f"audit-{uuid.uuid4()}", {"Content-Type": "application/json"}
        )
        last: Exception | None = None
        with anyio.move_on_after(self.timeout):
            while True:
                try:
                    seq = await self.js.publish(msg)  # the same msg id: a retry is stored once
                except TransportError as exc:
                    last = exc
                    await anyio.sleep(0.2)
                    continue
                self.appended += 1
                return seq
        raise TransportError(f"audit entry {kind} for {target} not stored: {last}")


async def tail(
    js: JetStream, *, last: int = 20, follow: bool = False, kind: str | None = None
) -> AsyncIterator[AuditRecord]:
    """The last ``last`` entries (of ``kind`` if given), oldest first; with ``follow``, then every
    new one as it is appended, until the caller stops iterating.

    Raises:
        TransportError: NATS unreachable or the audit stream missing.
        DecodeError: an entry that is not an :class:`AuditEntry`.
    """
    subject = audit_subject(kind) if kind else "audit.>"
    try:
        info = await js.js.stream_info(AUDIT_STREAM, subjects_filter=subject)
    except nats.js.errors.NotFoundError:
        raise TransportError(f"stream {AUDIT_STREAM} does not exist (no control plane ran yet?)") from None
    except NATS_ERRORS as exc:
        raise TransportError(f"audit stream: {type(exc).__name__}: {exc}") from exc
    end = int(info.state.last_seq)
    subjects = info.state.subjects or {}
    matching = sum(subjects.values()) if subjects else int(info.state.messages)
    if matching == 0 and not follow:
        return
    start_seq = _start(end, int(info.state.first_seq), last, kind is not None)
    config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start_seq)
    try:
        sub = await js.js.subscribe(subject, stream=AUDIT_STREAM, ordered_consumer=True, config=config)
    except NATS_ERRORS as exc:
        raise TransportError(f"audit stream: {type(exc).__name__}: {exc}") from exc
    window: list[AuditRecord] = []
    try:
        caught_up = end < start_seq or matching == 0
        while True:
            if caught_up and not follow:
                break
            try:
                msg = await sub.next_msg(timeout=1.0 if follow else js.cfg.request_timeout)
            except TIMEOUTS:
                if not caught_up:
                    break  # nothing more arrives: the window is complete
                continue
            seq = int(msg.metadata.sequence.stream)
            try:
                record = AuditRecord(seq, msg.subject, _decoder.decode(msg.data))
            except msgspec.DecodeError as exc:
                raise DecodeError(f"audit entry {seq}: {exc}") from None
            if caught_up:
                yield record
                continue
            window.append(record)
            if seq >= end:
                caught_up = True
                for r in window[-last:]:
                    yield r
                window.clear()
        for r in window[-last:]:
            yield r
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(2), contextlib.suppress(*NATS_ERRORS):
            await sub.unsubscribe()


def _start(end: int, first: int, last: int, filtered: bool) -> int:
    # Unfiltered, the last N entries are exactly the last N sequences; filtered by kind they may
    # be spread further back, so read the whole stream and keep the last N.
    if filtered:
        return max(first, 1)
    return max(first, end - last + 1, 1)
