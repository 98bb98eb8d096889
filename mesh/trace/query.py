"""Reading ``MESH_TRACE`` into a :class:`~mesh.trace.index.TxnIndex` (``meshctl trace``, the
control plane), and the one-line path of a transaction for humans.

Raises nothing but :class:`~mesh.errors.TransportError` (the stream missing included, with what
to do) and :class:`~mesh.errors.DecodeError` never: an undecodable trace message is skipped and
counted.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from mesh.errors import DecodeError, TransportError
from mesh.trace.index import TxnIndex
from mesh.trace.records import TraceRecord, decode_batch
from mesh.transport import TRACE_STREAM, NotFound, StoredMessage, Transport

__all__ = ["add_message", "format_record", "load_index"]

log = logging.getLogger(__name__)


def add_message(index: TxnIndex, msg: StoredMessage) -> int:
    """Index the records of one stored trace message; how many were taken (0 for a message
    that is not a trace batch, or whose subject is not ``trace.<agent>.<kind>``)."""
    parts = msg.subject.split(".")
    if len(parts) != 3:
        return 0
    try:
        records = decode_batch(msg.data)
    except DecodeError:
        return 0
    before = index.records
    for r in records:
        index.add(r, subject_agent=parts[1])
    index.last_seq = max(index.last_seq, msg.seq)
    return index.records - before


async def load_index(
    js: Transport, *, since: datetime | None = None, index: TxnIndex | None = None, timeout: float = 5.0
) -> TxnIndex:
    """Read the trace stream (from ``since``, or all it retains) into ``index`` (a new one by
    default) and return it.

    Raises:
        TransportError: NATS unreachable, or no ``MESH_TRACE`` stream (no control plane ran yet).
    """
    index = index if index is not None else TxnIndex()
    try:
        info = await js.stream_info(TRACE_STREAM)
    except NotFound:
        raise TransportError(
            f"stream {TRACE_STREAM} does not exist: start the control plane once to create it"
        ) from None
    end = info.last_seq
    start = max(index.last_seq + 1, info.first_seq, 1)
    if since is not None:
        first = await js.get_message(TRACE_STREAM, subject="trace.>", since=since)
        if first is None:
            return index
        start = max(start, first.seq)
    if info.messages == 0 or start > end:
        return index
    async with await js.read_stream(TRACE_STREAM, start_seq=start) as reader:
        while True:
            msg = await reader.next(timeout=timeout)
            if msg is None:
                break
            add_message(index, msg)
            if msg.seq >= end:
                break
    return index


def _time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def format_record(r: TraceRecord) -> str:
    """One line: time, kind, agent/system, flow, business key, envelope id, latency, outcome."""
    where = f"{r.agent}/{r.system}" if r.system else r.agent
    bits = [_time(r.at), f"{r.kind:<13}", f"{where:<24}"]
    if r.flow:
        bits.append(f"flow={r.flow}")
    if r.business_key:
        bits.append(r.business_key)
    if r.envelope_id:
        bits.append(f"env={r.envelope_id}")
    if r.causation_id:
        bits.append(f"cause={r.causation_id}")
    if r.latency_ms:
        bits.append(f"latency={r.latency_ms}ms")
    if r.outcome:
        bits.append(r.outcome)
    if r.detail:
        # one line whatever a foreign system put in a reason (no newlines or control characters)
        detail = "".join(c if c.isprintable() else " " for c in r.detail)
        bits.append(f"({' '.join(detail.split())})")
    return "  ".join(bits)
