"""Business transaction tracing (README "Tracing business transactions").

Agents record what happened to each message (:class:`TraceRecorder`, :func:`record`) into the
stream ``MESH_TRACE``; :class:`TxnIndex` rebuilds transactions from those records and derives
their status; :func:`load_index` reads the stream.
"""

from mesh.trace.index import (
    STATUSES,
    Expected,
    Transaction,
    TransactionsView,
    TxnIndex,
    TxnStatus,
    TxnSummary,
    derive_status,
)
from mesh.trace.links import CauseLinks, Link
from mesh.trace.query import add_message, format_record, load_index
from mesh.trace.recorder import TraceRecorder, current_recorder, record, use_recorder
from mesh.trace.records import (
    KINDS,
    TraceBatch,
    TraceKind,
    TraceRecord,
    child_traceparent,
    decode_batch,
    encode_batch,
    new_traceparent,
    trace_context,
    trace_subject,
    valid_id,
    valid_traceparent,
)

__all__ = [
    "KINDS",
    "STATUSES",
    "CauseLinks",
    "Expected",
    "Link",
    "TraceBatch",
    "TraceKind",
    "TraceRecord",
    "TraceRecorder",
    "Transaction",
    "TransactionsView",
    "TxnIndex",
    "TxnStatus",
    "TxnSummary",
    "add_message",
    "child_traceparent",
    "current_recorder",
    "decode_batch",
    "derive_status",
    "encode_batch",
    "format_record",
    "load_index",
    "new_traceparent",
    "record",
    "trace_context",
    "trace_subject",
    "use_recorder",
    "valid_id",
    "valid_traceparent",
]
