"""The broker as one interface: what the actors and the control logic may ask of it.

Two implementations pass the same contract suite (tests/contract/test_transport.py):
:class:`~mesh.transport.JetStream` (NATS JetStream, production) and
:class:`~mesh.transport.MemoryTransport` (in memory, for unit tests without a broker).

Guarantees every implementation gives:

* **At-least-once delivery.** A published message is stored once per ``msg_id`` inside the
  stream's duplicate window; a consumer may see it again (redelivery) until it is acked or
  termed. Delivery counts come from the broker (``num_delivered``), never from memory.
* **Bounded calls.** Every call either completes or raises within the transport's request
  timeout (or the timeout it is given); nothing waits forever on a lost acknowledgement.
* **One error tree.** Only :class:`~mesh.errors.TransportError` (and its subclasses
  :class:`NoResponders`, :class:`NoReply`, :class:`RevisionConflict`, :class:`NotFound`,
  :class:`Refused` and :class:`NotSupported`) escape; foreign exceptions are translated at
  the implementation's boundary.
* **Reading a stream never consumes.** :meth:`Transport.stream_info`,
  :meth:`Transport.get_message` and :meth:`Transport.read_stream` create no durable state and
  ack nothing.
* **Resources are async context managers** on one idempotent ``aclose()``.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Literal, NoReturn, Self

import anyio
from anyio.abc import TaskStatus

from mesh.config import StreamsConfig
from mesh.errors import TransportError
from mesh.transport.subjects import EVENTS_STREAM

__all__ = [
    "Bucket",
    "Consumer",
    "ConsumerState",
    "Delivery",
    "Entry",
    "Handler",
    "KvUpdate",
    "KvWatch",
    "Message",
    "NoReply",
    "NoResponders",
    "NotFound",
    "NotSupported",
    "OutMessage",
    "PubAck",
    "QuickHandler",
    "Refused",
    "RevisionConflict",
    "StoredMessage",
    "StreamReader",
    "StreamState",
    "Subscription",
    "Transport",
    "quick_reply",
]

log = logging.getLogger(__name__)


class NoResponders(TransportError):
    """A request found nobody serving its subject (or a publish found no stream for it)."""


class NoReply(TransportError):
    """The broker (or a responder) did not answer within the timeout."""


class RevisionConflict(TransportError):
    """A compare-and-swap lost: the key changed (or exists / is gone) since it was read.
    Read again and decide again."""


class NotFound(TransportError):
    """The stream or consumer named does not exist."""


class Refused(TransportError):
    """The broker answered and refused the request (a bad request, a limit, a policy)."""


class NotSupported(TransportError):
    """The broker cannot do this (e.g. a nats-server too old for the operation)."""


@dataclass(frozen=True, slots=True)
class PubAck:
    """The broker's acknowledgement of one stored message."""

    stream: str
    seq: int
    """The message's stream sequence (the original's when ``duplicate``)."""
    duplicate: bool = False
    """The ``msg_id`` was already stored inside the duplicate window: nothing new was stored."""


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One message as a stream stores it: sequence, subject, store time (UTC), body, headers."""

    stream: str
    seq: int
    subject: str
    time: datetime
    data: bytes
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StreamState:
    """A snapshot of a stream. ``subjects`` counts the messages per subject matching the filter
    given to :meth:`Transport.stream_info` (empty without one)."""

    name: str
    first_seq: int
    last_seq: int
    messages: int
    subjects: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ConsumerState:
    """A snapshot of a durable consumer."""

    name: str
    stream: str
    filter_subject: str
    """Its subject filter (``>`` when it has none, or several)."""
    num_pending: int
    """Messages matching the filter not yet delivered."""
    num_ack_pending: int
    """Delivered and not yet settled."""
    ack_floor: int
    """The stream sequence up to which everything is settled."""


@dataclass(slots=True)
class OutMessage:
    """A message to publish to a stream; ``msg_id`` is its deduplication id (``Nats-Msg-Id``).

    Not frozen: the relay makes one per outbox row, and a frozen dataclass's ``__init__`` costs
    three times as much. Treat it as read-only once handed to a transport."""

    subject: str
    data: bytes
    msg_id: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Message:
    """A core (non-stream) message: a request or a reply."""

    subject: str
    data: bytes
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Message], Awaitable[bytes]]
"""Serves one request: returns the reply's body. An exception is logged and sends no reply."""
QuickHandler = Callable[[Message], bytes | None]
"""Answers one request at once, without waiting on anything (no I/O): the reply's body, or
None to leave the request to the :data:`Handler`. An exception is logged and the request goes
to the handler."""


def quick_reply(quick: QuickHandler, msg: Message) -> bytes | None:
    """``quick(msg)``; None (the handler answers) when it raises, which is logged."""
    try:
        return quick(msg)
    except Exception:
        log.exception("quick answer to %s failed; the handler answers", msg.subject)
        return None


@dataclass(frozen=True, slots=True)
class Entry:
    """One KV value and the revision it was stored at."""

    key: str
    value: bytes
    revision: int


@dataclass(frozen=True, slots=True)
class KvUpdate:
    """One item a :class:`KvWatch` yields: a value stored (``put``), a key deleted
    (``delete``), or ``loaded``: every value that existed when the watch began has been given."""

    op: Literal["put", "delete", "loaded"]
    key: str = ""
    value: bytes = b""
    revision: int = 0


class _Resource(abc.ABC):
    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release the resource. Idempotent; never raises TransportError."""


class Delivery(abc.ABC):
    """One message delivered by a :class:`Consumer`. Settle it once: ack, nak or term.
    Unsettled, it is delivered again after the consumer's ``ack_wait``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<Delivery {self.subject} seq={self.stream_seq} delivered={self.num_delivered}>"

    @property
    @abc.abstractmethod
    def data(self) -> bytes: ...

    @property
    @abc.abstractmethod
    def subject(self) -> str: ...

    @property
    @abc.abstractmethod
    def headers(self) -> dict[str, str]:
        """A copy of the message's headers (``Nats-Msg-Id`` included)."""

    @property
    @abc.abstractmethod
    def num_delivered(self) -> int:
        """How many times the broker has delivered this message (1 on the first delivery)."""

    @property
    @abc.abstractmethod
    def stream_seq(self) -> int:
        """The message's sequence number in its stream."""

    @abc.abstractmethod
    async def ack(self) -> None:
        """Done: never delivered again. The ack is sent, not confirmed (the broker applies it a
        moment later); one lost on the way means one redelivery after ``ack_wait``, which the
        caller absorbs (inbox, I4). Raises TransportError when the connection is down."""

    @abc.abstractmethod
    async def nak(self, delay: float | None = None) -> None:
        """Deliver again after ``delay`` seconds (at once when None), until ``max_deliver``.
        Raises TransportError."""

    @abc.abstractmethod
    async def term(self) -> None:
        """Never deliver again (the caller has dead-lettered it). Raises TransportError."""


class Consumer(_Resource):
    """A durable pull consumer with explicit acks; several clients may share one by name."""

    name: str

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    @abc.abstractmethod
    async def fetch(self, batch: int, timeout: float) -> list[Delivery]:
        """Up to ``batch`` deliveries, redeliveries first; an empty list (not an error) when none
        arrived within ``timeout``.

        Raises:
            TransportError: the connection is down or the consumer is gone.
        """

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """Ack each of ``deliveries`` (fetched from this consumer), as :meth:`Delivery.ack` does,
        in as few writes as the transport can (this default: one by one). When it raises, the
        caller treats all of them as unsettled: an ack that did go out makes a later nak or term
        of the same delivery a no-op (or a TransportError), and one that did not means a
        redelivery after ``ack_wait``, which the inbox absorbs (I4).

        Raises:
            TransportError: the connection is down.
        """
        for d in deliveries:
            await d.ack()

    @abc.abstractmethod
    async def pending(self) -> int:
        """Messages not yet delivered plus delivered but unsettled (the consumer's backlog).

        Raises:
            TransportError: the broker did not answer.
        """

    async def aclose(self) -> None:
        """Drop this binding; the durable consumer and its state stay on the broker."""


class StreamReader(_Resource):
    """An ordered, ephemeral reader of one stream: the messages matching its subject filter,
    in stream order, from its start on, then each new one as it is stored. It acks nothing and
    leaves nothing behind on the broker; a gap (after a reconnect) is healed by the
    implementation, never seen by the reader."""

    @abc.abstractmethod
    async def next(self, timeout: float) -> StoredMessage | None:
        """The next message, or None when none came within ``timeout``. Raises TransportError."""


class KvWatch(_Resource):
    """A live view of a bucket: first every current value, then ``loaded``, then each change.

    A JetStream watch can silently miss updates after a server restart: a reader that must
    converge re-creates its watch after :attr:`Transport.reconnects` changes.
    """

    @abc.abstractmethod
    async def next(self, timeout: float) -> KvUpdate | None:
        """The next update, or None when none came within ``timeout``. Raises TransportError."""


class Subscription(_Resource):
    """A core (non-stream) subscription to one subject: each message published on it while the
    subscription lives, at most once, nothing stored. Messages published while the connection
    is away are lost: a reader that must converge re-reads its state after
    :attr:`Transport.reconnects` changes."""

    subject: str

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.subject}>"

    @abc.abstractmethod
    async def next(self, timeout: float) -> Message | None:
        """The next message, or None when none came within ``timeout``.
        Raises TransportError when the subscription has ended."""


class Bucket(abc.ABC):
    """Compare-and-swap access to one KV bucket. Revisions grow with every change to any key
    of the bucket. Every method raises TransportError when the broker does not answer."""

    name: str

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    @abc.abstractmethod
    async def get(self, key: str) -> Entry | None:
        """The current value, or None when absent or deleted."""

    @abc.abstractmethod
    async def create(self, key: str, value: bytes) -> int:
        """Store only if absent (or deleted); returns the revision. Raises RevisionConflict."""

    @abc.abstractmethod
    async def update(self, key: str, value: bytes, revision: int) -> int:
        """Store only if the key is still at ``revision``; returns the new one.
        Raises RevisionConflict."""

    @abc.abstractmethod
    async def put(self, key: str, value: bytes) -> int:
        """Store unconditionally; returns the revision."""

    async def put_many(self, items: Sequence[tuple[str, bytes]]) -> list[int | None]:
        """Store several ``(key, value)`` unconditionally, sent together (JetStream: in one
        write, acknowledged on one reply subscription, no request each); the revision of each,
        None where it was not stored (not acknowledged within the timeout, or refused). Never
        raises for one item; here: one :meth:`put` after the other."""
        out: list[int | None] = []
        for key, value in items:
            try:
                out.append(await self.put(key, value))
            except TransportError as exc:
                log.debug("KV %s: put %s: %s", self.name, key, exc)
                out.append(None)
        return out

    @abc.abstractmethod
    async def delete(self, key: str, revision: int | None = None) -> None:
        """Delete (only if still at ``revision`` when given, else RevisionConflict)."""

    @abc.abstractmethod
    async def watch(self, keys: str = ">") -> KvWatch:
        """Start watching the keys matching ``keys`` (NATS wildcards; default every key):
        ``async with await bucket.watch() as w``."""


class Transport(_Resource):
    """A connection to the broker. ``async with`` connects; :meth:`aclose` (idempotent) closes.

    After a successful :meth:`connect`, a lost connection is re-established forever in the
    background (:attr:`reconnects` counts it); calls made meanwhile raise TransportError.
    """

    name: str
    reconnects: int
    connected: anyio.Event

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    @property
    @abc.abstractmethod
    def is_connected(self) -> bool: ...

    @property
    def where(self) -> str:
        """Where this transport connects (server URLs, comma-separated), for messages."""
        return self.name

    @abc.abstractmethod
    async def connect(self) -> None:
        """Connect once (bounded). Raises TransportError when no server answers."""

    @abc.abstractmethod
    async def reconnect(self) -> None:
        """Drop the connection and establish it again (bounded), reading the credentials anew:
        a rewritten creds file takes effect. Counts in :attr:`reconnects` like any reconnect;
        subscriptions and consumers bound before it keep working after it.

        Raises:
            TransportError: not connected again within the connect timeout (the transport
                keeps trying in the background, as after any lost connection).
        """

    @abc.abstractmethod
    async def ensure_streams(self, cfg: StreamsConfig) -> None:
        """Create or update the mesh streams (idempotent, safe from many clients at once).
        Raises TransportError."""

    @abc.abstractmethod
    async def publish(self, msg: OutMessage) -> int:
        """Store one message and wait (bounded) for the broker's ack; returns its stream
        sequence (the original's for a duplicate ``msg_id`` inside the duplicate window).

        Raises:
            NoResponders: no stream stores ``msg.subject``.
            TransportError: not stored or not confirmed in time.
        """

    @abc.abstractmethod
    async def publish_many(self, messages: Sequence[OutMessage], window: int) -> list[bool]:
        """Publish with at most ``window`` unconfirmed at once; True where the broker acked.

        Never raises for a failed message: the caller keeps the unacked ones and retries them
        (a message not acked may still have been stored; its ``msg_id`` dedupes the retry).
        """

    @abc.abstractmethod
    async def publish_ack(self, msg: OutMessage) -> PubAck:
        """Like :meth:`publish`, and say whether the broker took it as a duplicate of a
        ``msg_id`` already stored inside the duplicate window.

        Raises:
            NoResponders: no stream stores ``msg.subject``.
            TransportError: not stored or not confirmed in time.
        """

    @abc.abstractmethod
    async def stream_info(self, stream: str, *, subjects_filter: str | None = None) -> StreamState:
        """A snapshot of ``stream``; with ``subjects_filter`` (NATS wildcards), the message
        count of every subject matching it.

        Raises:
            NotFound: no such stream.
            TransportError: the broker did not answer.
        """

    @abc.abstractmethod
    async def get_message(
        self,
        stream: str,
        *,
        seq: int = 0,
        subject: str | None = None,
        since: datetime | None = None,
        last: bool = False,
    ) -> StoredMessage | None:
        """One stored message, or None when there is none:

        * without ``subject``: the message at ``seq`` exactly;
        * with ``subject`` (wildcards allowed): the first message on it at or after ``seq``, or
          (with ``since``, instead of ``seq``) the first one stored at or after ``since``;
          with ``last``, the last message on it.

        Raises:
            NotFound: no such stream.
            ValueError: a combination not described above.
            TransportError: the broker did not answer or refused.
        """

    @abc.abstractmethod
    async def delete_message(self, stream: str, seq: int) -> bool:
        """Delete one message; False when it (or the stream) was already gone.
        Raises TransportError."""

    @abc.abstractmethod
    async def purge(self, stream: str, *, up_to_seq: int) -> int:
        """Delete every message with a sequence up to and including ``up_to_seq``; the count
        deleted (0 when the stream does not exist). Raises TransportError."""

    @abc.abstractmethod
    async def read_stream(self, stream: str, *, subject: str = ">", start_seq: int = 1) -> StreamReader:
        """Start an ordered, ephemeral reader of ``stream`` from ``start_seq`` on, only
        messages on ``subject``: ``async with await transport.read_stream(...) as r``.

        Raises:
            NotFound: no such stream.
            TransportError: the broker did not answer.
        """

    @abc.abstractmethod
    async def consumers(self, stream: str) -> list[ConsumerState]:
        """Every durable consumer of ``stream``.

        Raises:
            NotFound: no such stream.
            TransportError: the broker did not answer.
        """

    @abc.abstractmethod
    async def consumer_info(self, stream: str, name: str) -> ConsumerState:
        """A snapshot of one consumer.

        Raises:
            NotFound: no such stream or consumer (the message says which).
            TransportError: the broker did not answer.
        """

    @abc.abstractmethod
    async def reset_consumer(self, stream: str, name: str, seq: int) -> int:
        """Move a durable consumer so its next delivery is at or above stream sequence ``seq``;
        it keeps its name, config and bound clients, its pending and redelivery state is
        cleared. Returns the sequence it was reset to.

        Raises:
            NotFound: no such stream or consumer.
            NotSupported: the broker has no consumer reset (nats-server before 2.14).
            TransportError: the broker refused or did not answer.
        """

    @abc.abstractmethod
    async def pull_consumer(
        self,
        *,
        durable: str,
        filter_subject: str,
        ack_wait: float,
        max_deliver: int,
        max_ack_pending: int,
        stream: str = EVENTS_STREAM,
        metadata: dict[str, str] | None = None,
    ) -> Consumer:
        """Create (or update to this config) a durable pull consumer and bind to it.

        The broker delivers a message up to ``max_deliver + 1`` times: the caller, not the
        broker, gives up at ``max_deliver`` (it dead-letters instead of dropping silently).

        Raises:
            TransportError: the stream does not exist or the broker refused.
        """

    @abc.abstractmethod
    async def key_value(
        self,
        name: str,
        *,
        history: int = 1,
        replicas: int = 1,
        memory: bool = False,
        create: bool = True,
        direct: bool = False,
    ) -> Bucket:
        """Open a KV bucket, creating it with these settings when missing (``create``);
        ``direct``: created with direct get (``allow_direct``), so a key can be read by a
        request whose subject names it (``$JS.API.DIRECT.GET.KV_<bucket>.$KV.<bucket>.<key>``).

        Raises:
            TransportError: the bucket is missing (and not ``create``) or the broker refused.
        """

    @abc.abstractmethod
    async def read_key(self, bucket: str, key: str) -> Entry | None:
        """The current value of ``key`` in KV bucket ``bucket``, or None when absent, deleted or
        purged. One JetStream direct get whose API subject names the key
        (``$JS.API.DIRECT.GET.KV_<bucket>.$KV.<bucket>.<key>``), so a subject permission can
        limit who reads which key; nothing else is asked of the broker (no stream info).

        Raises:
            NotFound: no such bucket, or it does not allow direct gets.
            Refused: the credentials may not read this key.
            TransportError: the broker did not answer.
        """

    @abc.abstractmethod
    async def subscribe(self, subject: str) -> Subscription:
        """Subscribe to ``subject`` (wildcards allowed); the broker routes messages to it once
        this returns (the subscription is flushed to the server):
        ``async with await transport.subscribe(subject) as sub``.

        Raises:
            Refused: the credentials may not subscribe to ``subject``.
            TransportError: the connection is down.
        """

    @abc.abstractmethod
    async def request(
        self, subject: str, data: bytes, *, timeout: float, headers: dict[str, str] | None = None
    ) -> Message:
        """Send a request and wait up to ``timeout`` for the first reply.

        Raises:
            NoResponders: nobody serves ``subject``.
            NoReply: no reply within ``timeout``.
            Refused: the credentials may not publish to ``subject`` (or not receive replies).
            TransportError: the connection is down.
        """

    @abc.abstractmethod
    async def serve(
        self,
        subject: str,
        handler: Handler,
        *,
        queue: str = "",
        max_concurrent: int = 0,
        quick: QuickHandler | None = None,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        """Answer requests on ``subject`` (wildcards allowed) until cancelled.

        Up to ``max_concurrent`` requests are handled at once (0: no limit; 1: one at a time, in
        arrival order). ``task_status.started()`` once the broker routes requests here. Replicas
        sharing a ``queue`` share the requests. Raises Refused when the credentials may not
        subscribe to ``subject``, TransportError when the subscription fails or ends.

        ``quick`` (optional) is tried first for every request, outside the concurrency limit:
        a request it answers costs no task, and the replies of a burst go out together
        (JetStream: in one socket write, the serving loop yielding every few dozen answers so
        other tasks keep their turns); the rest go to ``handler``."""
