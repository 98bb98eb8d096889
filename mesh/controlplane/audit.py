"""The audit trail: who did what to which agent or flow, when, through which replica.

Entries are JSON :class:`AuditEntry` documents appended to stream ``MESH_AUDIT`` on subject
``audit.<kind>`` (``audit.register``, ``audit.revoke``, ...); the stream itself is created by
:meth:`mesh.transport.JetStream.ensure_streams`. Guarantees:

* :meth:`AuditLog.append` returns only once JetStream acknowledged the entry, and retries within
  its time budget; each entry has a unique ``Nats-Msg-Id``, so a retried append is stored once.
* :func:`tail` reads without consuming: an ordered, ephemeral
  :meth:`~mesh.transport.Transport.read_stream` reader; nothing is acked or deleted.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
import msgspec

from mesh.errors import DecodeError, TransportError
from mesh.transport import AUDIT_STREAM, NotFound, OutMessage, Transport

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
    js: Transport, *, last: int = 20, follow: bool = False, kind: str | None = None, timeout: float = 5.0
) -> AsyncIterator[AuditRecord]:
    """The last ``last`` entries (of ``kind`` if given), oldest first; with ``follow``, then every
    new one as it is appended, until the caller stops iterating. ``timeout`` bounds the wait
    for entries known to be stored.

    Raises:
        TransportError: NATS unreachable or the audit stream missing.
        DecodeError: an entry that is not an :class:`AuditEntry`.
    """
    subject = audit_subject(kind) if kind else "audit.>"
    try:
        info = await js.stream_info(AUDIT_STREAM, subjects_filter=subject)
    except NotFound:
        raise TransportError(f"stream {AUDIT_STREAM} does not exist (no control plane ran yet?)") from None
    end = info.last_seq
    matching = sum(info.subjects.values()) if info.subjects else info.messages
    if kind and matching:
        # The last entry of this kind, not the stream's: waiting for the stream's last sequence
        # on a filtered read would only end by timing out.
        newest = await js.get_message(AUDIT_STREAM, subject=subject, last=True)
        end = newest.seq if newest is not None else end
    if matching == 0 and not follow:
        return
    start_seq = _start(end, info.first_seq, last, kind is not None)
    window: list[AuditRecord] = []
    async with await js.read_stream(AUDIT_STREAM, subject=subject, start_seq=start_seq) as reader:
        caught_up = end < start_seq or matching == 0
        while True:
            if caught_up and not follow:
                break
            msg = await reader.next(timeout=1.0 if follow else timeout)
            if msg is None:
                if not caught_up:
                    break  # nothing more arrives: the window is complete
                continue
            try:
                record = AuditRecord(msg.seq, msg.subject, _decoder.decode(msg.data))
            except msgspec.DecodeError as exc:
                raise DecodeError(f"audit entry {msg.seq}: {exc}") from None
            if caught_up:
                yield record
                continue
            window.append(record)
            if msg.seq >= end:
                caught_up = True
                for r in window[-last:]:
                    yield r
                window.clear()
        for r in window[-last:]:
            yield r


def _start(end: int, first: int, last: int, filtered: bool) -> int:
    # Unfiltered, the last N entries are exactly the last N sequences; filtered by kind they may
    # be spread further back, so read the whole stream and keep the last N.
    if filtered:
        return max(first, 1)
    return max(first, end - last + 1, 1)
