"""The broker behind one interface: :class:`Transport` (see :mod:`mesh.transport.base` for the
guarantees), implemented on NATS JetStream (:class:`JetStream`) and in memory
(:class:`MemoryTransport`, for tests without a broker). nats-py's exceptions become
:mod:`mesh.errors` in one place, :mod:`mesh.transport._nats`.

The in-memory classes are imported on first use: an agent process never loads them.
"""

from typing import TYPE_CHECKING, Any

from mesh.transport.base import (
    Bucket,
    Consumer,
    ConsumerState,
    Delivery,
    Entry,
    Handler,
    KvUpdate,
    KvWatch,
    Message,
    NoReply,
    NoResponders,
    NotFound,
    NotSupported,
    OutMessage,
    PubAck,
    QuickHandler,
    Refused,
    RevisionConflict,
    StoredMessage,
    StreamReader,
    StreamState,
    Subscription,
    Transport,
)
from mesh.transport.jetstream import JetStream, NatsBucket, PullConsumer
from mesh.transport.subjects import (
    AUDIT_STREAM,
    COMMANDS_STREAM,
    DLQ_STREAM,
    EVENTS_STREAM,
    TRACE_STREAM,
    dlq_subject,
    event_subject,
)

__all__ = [
    "AUDIT_STREAM",
    "COMMANDS_STREAM",
    "DLQ_STREAM",
    "EVENTS_STREAM",
    "TRACE_STREAM",
    "Bucket",
    "Consumer",
    "ConsumerState",
    "Delivery",
    "Entry",
    "Handler",
    "JetStream",
    "KvUpdate",
    "KvWatch",
    "MemoryBroker",
    "MemoryBucket",
    "MemoryTransport",
    "Message",
    "NatsBucket",
    "NoReply",
    "NoResponders",
    "NotFound",
    "NotSupported",
    "OutMessage",
    "PubAck",
    "PullConsumer",
    "QuickHandler",
    "Refused",
    "RevisionConflict",
    "StoredMessage",
    "StreamReader",
    "StreamState",
    "Subscription",
    "Transport",
    "dlq_subject",
    "event_subject",
]

if TYPE_CHECKING:
    from mesh.transport.memory import MemoryBroker, MemoryBucket, MemoryTransport

_LAZY = frozenset({"MemoryBroker", "MemoryBucket", "MemoryTransport"})


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from mesh.transport import memory

        return getattr(memory, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
