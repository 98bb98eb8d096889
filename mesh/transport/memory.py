"""An in-memory :class:`~mesh.transport.Transport` with JetStream's semantics, for unit tests.

It passes the same contract suite as :class:`~mesh.transport.JetStream`: streams that store
subjects by wildcard, a duplicate window by ``msg_id``, durable pull consumers with explicit
ack, ``nak(delay)``, ``term``, redelivery after ``ack_wait`` and a ``max_deliver`` limit, KV
buckets with per-bucket revisions, compare-and-swap and watches, and request/reply with a
"no responders" error. Several :class:`MemoryTransport` clients share one :class:`MemoryBroker`
(two agents, one broker). Nothing is persisted; time is anyio's clock.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import NoReturn

import anyio
import anyio.lowlevel
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from mesh.config import StreamsConfig
from mesh.envelope import CONTENT_TYPE
from mesh.errors import TransportError
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
    OutMessage,
    PubAck,
    QuickHandler,
    RevisionConflict,
    StoredMessage,
    StreamReader,
    StreamState,
    Subscription,
    Transport,
    quick_reply,
)
from mesh.transport.subjects import EVENTS_STREAM, STREAM_SUBJECTS, subject_matches

__all__ = ["MemoryBroker", "MemoryBucket", "MemoryTransport"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Stored:
    seq: int
    subject: str
    data: bytes
    headers: dict[str, str]
    time: datetime = field(default_factory=lambda: datetime.now(UTC))

    def stored(self, stream: str) -> StoredMessage:
        return StoredMessage(stream, self.seq, self.subject, self.time, self.data, dict(self.headers))


@dataclass(slots=True)
class _Stream:
    name: str
    subjects: list[str]
    duplicate_window: float
    messages: list[_Stored] = field(default_factory=list)
    ids: dict[str, tuple[int, float]] = field(default_factory=dict)
    consumers: dict[str, _ConsumerState] = field(default_factory=dict)
    last_seq: int = 0
    """The highest sequence ever stored (it survives deleting and purging messages)."""


@dataclass(slots=True)
class _Unsettled:
    num_delivered: int
    due: float
    """When it is delivered again unless settled (ack_wait, or a nak's delay)."""


@dataclass(slots=True)
class _ConsumerState:
    stream: _Stream
    filter_subject: str
    ack_wait: float
    limit: int
    max_ack_pending: int
    cursor: int = 0
    """Highest stream sequence delivered (or skipped) once."""
    unsettled: dict[int, _Unsettled] = field(default_factory=dict)

    def _new(self) -> list[_Stored]:
        return [
            m
            for m in self.stream.messages
            if m.seq > self.cursor and subject_matches(self.filter_subject, m.subject)
        ]

    def take(self, batch: int, now: float) -> list[tuple[_Stored, int]]:
        out: list[tuple[_Stored, int]] = []
        by_seq = {m.seq: m for m in self.stream.messages}
        for seq in sorted(self.unsettled):
            u = self.unsettled[seq]
            if len(out) >= batch or u.due > now:
                continue
            m = by_seq.get(seq)
            if u.num_delivered >= self.limit or m is None:  # the broker gives up on it (or it is gone)
                del self.unsettled[seq]
                continue
            u.num_delivered += 1
            u.due = now + self.ack_wait
            out.append((m, u.num_delivered))
        for m in self._new():
            if len(out) >= batch or len(self.unsettled) >= self.max_ack_pending:
                break
            self.cursor = m.seq
            self.unsettled[m.seq] = _Unsettled(1, now + self.ack_wait)
            out.append((m, 1))
        return out

    def next_due(self) -> float:
        return min((u.due for u in self.unsettled.values()), default=math.inf)

    def pending(self) -> int:
        return len(self._new()) + len(self.unsettled)

    def ack_floor(self) -> int:
        return min(self.unsettled) - 1 if self.unsettled else self.cursor

    def reset(self, seq: int) -> None:
        self.cursor = max(seq, 1) - 1
        self.unsettled.clear()

    def snapshot(self, name: str) -> ConsumerState:
        return ConsumerState(
            name,
            self.stream.name,
            self.filter_subject,
            len(self._new()),
            len(self.unsettled),
            self.ack_floor(),
        )


class _Bucket:
    def __init__(self, name: str, history: int, publish: Callable[[Message], None] | None = None) -> None:
        self.name = name
        self.history = history
        self.publish = publish
        """Where every change is also published, on ``$KV.<bucket>.<key>`` (as JetStream does)."""
        self.data: dict[str, Entry] = {}
        self.seq = 0
        self.watchers: dict[MemoryObjectSendStream[KvUpdate], str] = {}
        """Each watch's stream and its key pattern."""

    def store(self, key: str, value: bytes | None) -> int:
        self.seq += 1
        if value is None:
            self.data.pop(key, None)
            update = KvUpdate("delete", key, b"", self.seq)
        else:
            self.data[key] = Entry(key, value, self.seq)
            update = KvUpdate("put", key, value, self.seq)
        for w, keys in list(self.watchers.items()):
            if not subject_matches(keys, key):
                continue
            try:
                w.send_nowait(update)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self.watchers.pop(w, None)
        if self.publish is not None:
            headers = {"KV-Operation": "DEL"} if value is None else {}
            self.publish(Message(f"$KV.{self.name}.{key}", value or b"", headers))
        return self.seq


class MemoryBroker:
    """The shared state of in-memory transports: streams, consumers, buckets, responders."""

    def __init__(self) -> None:
        self.streams: dict[str, _Stream] = {}
        self.buckets: dict[str, _Bucket] = {}
        self.responders: dict[int, tuple[str, str, Handler]] = {}
        self.subscribers: dict[MemoryObjectSendStream[Message], tuple[str, MemoryTransport]] = {}
        """Each core subscription's stream, its subject and its client."""
        self._ids = itertools.count()
        self._changed = anyio.Event()

    def __repr__(self) -> str:
        sizes = {n: len(s.messages) for n, s in self.streams.items()}
        return f"<MemoryBroker streams={sizes} buckets={sorted(self.buckets)}>"

    def changed(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_change(self, until: float) -> None:
        with anyio.move_on_after(max(0.0, until - anyio.current_time())):
            await self._changed.wait()

    def publish_core(self, msg: Message) -> None:
        """Hand ``msg`` to every core subscription whose subject matches (at most once, no
        storage: a subscriber that has gone, or whose client is disconnected, misses it)."""
        for send, (pattern, client) in list(self.subscribers.items()):
            if not client.is_connected or not subject_matches(pattern, msg.subject):
                continue
            try:
                send.send_nowait(msg)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self.subscribers.pop(send, None)

    def stream_for(self, subject: str) -> _Stream | None:
        for s in self.streams.values():
            if any(subject_matches(p, subject) for p in s.subjects):
                return s
        return None


class _MemoryDelivery(Delivery):
    __slots__ = ("_broker", "_consumer", "_msg", "_n")

    def __init__(self, consumer: _ConsumerState, msg: _Stored, n: int, broker: MemoryBroker) -> None:
        self._consumer = consumer
        self._msg = msg
        self._n = n
        self._broker = broker

    @property
    def data(self) -> bytes:
        return self._msg.data

    @property
    def subject(self) -> str:
        return self._msg.subject

    @property
    def headers(self) -> dict[str, str]:
        return dict(self._msg.headers)

    @property
    def num_delivered(self) -> int:
        return self._n

    @property
    def stream_seq(self) -> int:
        return self._msg.seq

    async def ack(self) -> None:
        await anyio.lowlevel.checkpoint()
        self._consumer.unsettled.pop(self._msg.seq, None)
        self._broker.changed()

    async def nak(self, delay: float | None = None) -> None:
        await anyio.lowlevel.checkpoint()
        u = self._consumer.unsettled.get(self._msg.seq)
        if u is not None:
            u.due = anyio.current_time() + (delay or 0.0)
        self._broker.changed()

    async def term(self) -> None:
        await self.ack()  # the broker forgets it the same way; the caller has dead-lettered it


class _MemoryConsumer(Consumer):
    def __init__(self, transport: MemoryTransport, state: _ConsumerState, name: str) -> None:
        self._transport = transport
        self._state = state
        self.name = name

    async def fetch(self, batch: int, timeout: float) -> list[Delivery]:
        broker = self._transport._live()
        deadline = anyio.current_time() + timeout
        while True:
            now = anyio.current_time()
            got = self._state.take(batch, now)
            if got:
                await anyio.lowlevel.checkpoint()
                return [_MemoryDelivery(self._state, m, n, broker) for m, n in got]
            if now >= deadline:
                await anyio.lowlevel.checkpoint()
                return []
            await broker.wait_change(min(deadline, self._state.next_due()))
            self._transport._live()

    async def pending(self) -> int:
        self._transport._live()
        await anyio.lowlevel.checkpoint()
        return self._state.pending()


class _MemoryReader(StreamReader):
    def __init__(self, transport: MemoryTransport, stream: _Stream, subject: str, start_seq: int) -> None:
        self._transport = transport
        self._stream = stream
        self._subject = subject
        self._next = max(start_seq, 1)

    def __repr__(self) -> str:
        return f"<_MemoryReader {self._stream.name} next={self._next}>"

    async def next(self, timeout: float) -> StoredMessage | None:
        deadline = anyio.current_time() + timeout
        while True:
            broker = self._transport._live()
            for m in self._stream.messages:
                if m.seq >= self._next and subject_matches(self._subject, m.subject):
                    self._next = m.seq + 1
                    await anyio.lowlevel.checkpoint()
                    return m.stored(self._stream.name)
            if anyio.current_time() >= deadline:
                await anyio.lowlevel.checkpoint()
                return None
            await broker.wait_change(deadline)

    async def aclose(self) -> None:
        await anyio.lowlevel.checkpoint()


class _MemoryWatch(KvWatch):
    def __init__(
        self,
        bucket: _Bucket,
        send: MemoryObjectSendStream[KvUpdate],
        receive: MemoryObjectReceiveStream[KvUpdate],
    ) -> None:
        self._bucket = bucket
        self._send = send
        self._receive = receive

    async def next(self, timeout: float) -> KvUpdate | None:
        with anyio.move_on_after(timeout):
            try:
                return await self._receive.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                raise TransportError(f"watch {self._bucket.name}: closed") from None
        return None

    async def aclose(self) -> None:
        self._bucket.watchers.pop(self._send, None)
        self._send.close()
        self._receive.close()


class _MemorySubscription(Subscription):
    def __init__(
        self,
        transport: MemoryTransport,
        subject: str,
        send: MemoryObjectSendStream[Message],
        receive: MemoryObjectReceiveStream[Message],
    ) -> None:
        self._transport = transport
        self.subject = subject
        self._send = send
        self._receive = receive

    async def next(self, timeout: float) -> Message | None:
        with anyio.move_on_after(timeout):
            try:
                return await self._receive.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                raise TransportError(f"subscription {self.subject}: closed") from None
        return None

    async def aclose(self) -> None:
        self._transport.broker.subscribers.pop(self._send, None)
        self._send.close()
        self._receive.close()


class MemoryBucket(Bucket):
    """:class:`Bucket` in memory with JetStream KV's revision rules (one sequence per bucket).

    Usable on its own (``MemoryBucket("name")``) or through :meth:`MemoryTransport.key_value`.
    """

    def __init__(self, name: str = "memory", *, _state: _Bucket | None = None) -> None:
        self.name = name
        self._b = _state or _Bucket(name, 1)

    def __repr__(self) -> str:
        return f"<MemoryBucket {self.name} keys={len(self._b.data)} seq={self._b.seq}>"

    @property
    def data(self) -> dict[str, Entry]:
        """The live values by key (read-only use)."""
        return self._b.data

    async def get(self, key: str) -> Entry | None:
        await anyio.lowlevel.checkpoint()
        return self._b.data.get(key)

    async def create(self, key: str, value: bytes) -> int:
        await anyio.lowlevel.checkpoint()
        if key in self._b.data:
            raise RevisionConflict(f"KV {self.name}: create {key}: exists")
        return self._b.store(key, value)

    async def update(self, key: str, value: bytes, revision: int) -> int:
        await anyio.lowlevel.checkpoint()
        current = self._b.data.get(key)
        if current is None or current.revision != revision:
            raise RevisionConflict(f"KV {self.name}: update {key}: revision changed")
        return self._b.store(key, value)

    async def put(self, key: str, value: bytes) -> int:
        await anyio.lowlevel.checkpoint()
        return self._b.store(key, value)

    async def delete(self, key: str, revision: int | None = None) -> None:
        await anyio.lowlevel.checkpoint()
        current = self._b.data.get(key)
        if revision is not None and (current is None or current.revision != revision):
            raise RevisionConflict(f"KV {self.name}: delete {key}: revision changed")
        self._b.store(key, None)

    async def watch(self, keys: str = ">") -> KvWatch:
        await anyio.lowlevel.checkpoint()
        send, receive = anyio.create_memory_object_stream[KvUpdate](math.inf)
        for e in sorted(self._b.data.values(), key=lambda e: e.revision):
            if subject_matches(keys, e.key):
                send.send_nowait(KvUpdate("put", e.key, e.value, e.revision))
        send.send_nowait(KvUpdate("loaded"))
        self._b.watchers[send] = keys
        return _MemoryWatch(self._b, send, receive)


class MemoryTransport(Transport):
    """A client of a :class:`MemoryBroker` (its own when none is given).

    :meth:`disconnect` / :meth:`restore` simulate an outage: calls meanwhile raise
    :class:`~mesh.errors.TransportError`, as on a JetStream connection that is away.
    """

    def __init__(
        self, broker: MemoryBroker | None = None, *, name: str = "memory", request_timeout: float = 5.0
    ) -> None:
        self.broker = broker or MemoryBroker()
        self.name = name
        self.request_timeout = request_timeout
        self.reconnects = 0
        self.connected = anyio.Event()
        self._up = False
        self._closed = False

    def __repr__(self) -> str:
        return f"<MemoryTransport {self.name} {'connected' if self.is_connected else 'disconnected'}>"

    @property
    def is_connected(self) -> bool:
        return self._up and not self._closed

    def _live(self) -> MemoryBroker:
        if not self.is_connected:
            raise TransportError(f"{self.name}: not connected")
        return self.broker

    async def connect(self) -> None:
        await anyio.lowlevel.checkpoint()
        if self._closed:
            raise TransportError(f"{self.name}: closed")
        self._up = True
        self.connected.set()

    def disconnect(self) -> None:
        """Simulate a lost connection (until :meth:`restore`)."""
        self._up = False
        self.broker.changed()

    def restore(self) -> None:
        """End a simulated outage; counts as a reconnect."""
        if not self._closed:
            self._up = True
            self.reconnects += 1

    async def reconnect(self) -> None:
        """Drop the (simulated) connection and establish it again at once."""
        self._live()
        self.disconnect()
        await anyio.lowlevel.checkpoint()
        self.restore()

    async def aclose(self) -> None:
        self._closed = True
        self._up = False
        self.broker.changed()

    async def ensure_streams(self, cfg: StreamsConfig) -> None:
        broker = self._live()
        await anyio.lowlevel.checkpoint()
        for name, subjects in STREAM_SUBJECTS.items():
            stream = broker.streams.get(name)
            if stream is None:
                broker.streams[name] = _Stream(name, [subjects], cfg.duplicate_window)
            else:
                stream.duplicate_window = cfg.duplicate_window

    async def publish(self, msg: OutMessage) -> int:
        return (await self.publish_ack(msg)).seq

    async def publish_ack(self, msg: OutMessage) -> PubAck:
        broker = self._live()
        await anyio.lowlevel.checkpoint()
        stream = broker.stream_for(msg.subject)
        if stream is None:
            raise NoResponders(f"publish {msg.subject}: no stream stores this subject")
        now = anyio.current_time()
        seen = stream.ids.get(msg.msg_id)
        if seen is not None and now - seen[1] < stream.duplicate_window:
            return PubAck(stream.name, seen[0], duplicate=True)
        stream.last_seq += 1
        seq = stream.last_seq
        headers = {"Nats-Msg-Id": msg.msg_id, "Content-Type": CONTENT_TYPE, **msg.headers}
        stream.messages.append(_Stored(seq, msg.subject, msg.data, headers))
        stream.ids[msg.msg_id] = (seq, now)
        broker.changed()
        return PubAck(stream.name, seq)

    def _stream(self, name: str, what: str) -> _Stream:
        s = self._live().streams.get(name)
        if s is None:
            raise NotFound(f"{what}: stream {name} not found")
        return s

    async def stream_info(self, stream: str, *, subjects_filter: str | None = None) -> StreamState:
        s = self._stream(stream, f"stream info {stream}")
        await anyio.lowlevel.checkpoint()
        counts: dict[str, int] = {}
        if subjects_filter is not None:
            for m in s.messages:
                if subject_matches(subjects_filter, m.subject):
                    counts[m.subject] = counts.get(m.subject, 0) + 1
        # JetStream's first_seq is last_seq + 1 for an empty stream that once held messages.
        first = s.messages[0].seq if s.messages else s.last_seq + 1 if s.last_seq else 0
        return StreamState(stream, first, s.last_seq, len(s.messages), counts)

    async def get_message(
        self,
        stream: str,
        *,
        seq: int = 0,
        subject: str | None = None,
        since: datetime | None = None,
        last: bool = False,
    ) -> StoredMessage | None:
        if subject is None and (since is not None or last or seq < 1):
            raise ValueError("get_message without a subject takes a sequence (1 or more) only")
        if last and (since is not None or seq):
            raise ValueError("get_message(last=True) takes a subject only")
        if since is not None and seq:
            raise ValueError("get_message takes a sequence or a time, not both")
        s = self._stream(stream, f"get message from {stream}")
        await anyio.lowlevel.checkpoint()
        if subject is None:
            found = [m for m in s.messages if m.seq == seq]
        else:
            found = [
                m
                for m in s.messages
                if subject_matches(subject, m.subject) and m.seq >= seq and (since is None or m.time >= since)
            ]
        if not found:
            return None
        return (found[-1] if last else found[0]).stored(stream)

    async def delete_message(self, stream: str, seq: int) -> bool:
        s = self._live().streams.get(stream)
        await anyio.lowlevel.checkpoint()
        if s is None:
            return False
        before = len(s.messages)
        s.messages = [m for m in s.messages if m.seq != seq]
        return len(s.messages) < before

    async def purge(self, stream: str, *, up_to_seq: int) -> int:
        s = self._live().streams.get(stream)
        await anyio.lowlevel.checkpoint()
        if s is None:
            return 0
        before = len(s.messages)
        s.messages = [m for m in s.messages if m.seq > up_to_seq]
        return before - len(s.messages)

    async def read_stream(self, stream: str, *, subject: str = ">", start_seq: int = 1) -> StreamReader:
        s = self._stream(stream, f"read {stream}")
        await anyio.lowlevel.checkpoint()
        return _MemoryReader(self, s, subject, start_seq)

    async def consumers(self, stream: str) -> list[ConsumerState]:
        s = self._stream(stream, f"consumers of {stream}")
        await anyio.lowlevel.checkpoint()
        return [c.snapshot(name) for name, c in s.consumers.items()]

    async def consumer_info(self, stream: str, name: str) -> ConsumerState:
        s = self._stream(stream, f"consumer {name} on {stream}")
        await anyio.lowlevel.checkpoint()
        c = s.consumers.get(name)
        if c is None:
            raise NotFound(f"consumer {name} on {stream}: consumer not found")
        return c.snapshot(name)

    async def reset_consumer(self, stream: str, name: str, seq: int) -> int:
        s = self._stream(stream, f"reset consumer {name}")
        await anyio.lowlevel.checkpoint()
        c = s.consumers.get(name)
        if c is None:
            raise NotFound(f"reset consumer {name}: consumer not found")
        c.reset(seq)
        self.broker.changed()
        return max(seq, 1)

    async def publish_many(self, messages: Sequence[OutMessage], window: int) -> list[bool]:
        results = []
        for m in messages:
            try:
                await self.publish(m)
            except TransportError:
                results.append(False)
            else:
                results.append(True)
        return results

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
        broker = self._live()
        await anyio.lowlevel.checkpoint()
        s = broker.streams.get(stream)
        if s is None:
            raise TransportError(f"add consumer {durable}: stream {stream} not found")
        state = s.consumers.get(durable)
        if state is None:
            state = s.consumers[durable] = _ConsumerState(
                s, filter_subject, ack_wait, max_deliver + 1, max_ack_pending
            )
        else:
            state.filter_subject, state.ack_wait = filter_subject, ack_wait
            state.limit, state.max_ack_pending = max_deliver + 1, max_ack_pending
        return _MemoryConsumer(self, state, durable)

    async def key_value(
        self,
        name: str,
        *,
        history: int = 1,
        replicas: int = 1,
        memory: bool = False,
        create: bool = True,
        direct: bool = False,
    ) -> MemoryBucket:
        broker = self._live()
        await anyio.lowlevel.checkpoint()
        b = broker.buckets.get(name)
        if b is None:
            if not create:
                raise TransportError(f"KV bucket {name} does not exist")
            b = broker.buckets[name] = _Bucket(name, history, broker.publish_core)
        return MemoryBucket(name, _state=b)

    async def read_key(self, bucket: str, key: str) -> Entry | None:
        broker = self._live()
        await anyio.lowlevel.checkpoint()
        b = broker.buckets.get(bucket)
        if b is None:
            raise NotFound(f"KV {bucket}: read {key}: no bucket {bucket}")
        return b.data.get(key)

    async def subscribe(self, subject: str) -> Subscription:
        broker = self._live()
        await anyio.lowlevel.checkpoint()
        send, receive = anyio.create_memory_object_stream[Message](math.inf)
        broker.subscribers[send] = (subject, self)
        return _MemorySubscription(self, subject, send, receive)

    async def request(
        self, subject: str, data: bytes, *, timeout: float, headers: dict[str, str] | None = None
    ) -> Message:
        broker = self._live()
        await anyio.lowlevel.checkpoint()
        handlers: dict[str, Handler] = {}  # one responder per queue group (or each plain one)
        for key, (pattern, queue, handler) in broker.responders.items():
            if subject_matches(pattern, subject):
                handlers.setdefault(queue or f"#{key}", handler)
        if not handlers:
            raise NoResponders(f"request {subject}: no responders")
        handler = next(iter(handlers.values()))
        try:
            with anyio.fail_after(timeout):
                reply = await handler(Message(subject, data, dict(headers or {})))
        except TimeoutError:
            raise NoReply(f"request {subject}: no reply within {timeout}s") from None
        except Exception:
            log.exception("request on %s failed; no reply", subject)
            raise NoReply(f"request {subject}: no reply (the responder failed)") from None
        return Message(subject, reply)

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
        broker = self._live()
        key = next(broker._ids)
        if max_concurrent > 0:
            slots = anyio.Semaphore(max_concurrent)
            inner = handler

            async def limited(m: Message) -> bytes:
                async with slots:
                    return await inner(m)

            handler = limited
        if quick is not None:
            answer, slow = quick, handler

            async def quick_first(m: Message) -> bytes:
                reply = quick_reply(answer, m)
                return reply if reply is not None else await slow(m)

            handler = quick_first
        broker.responders[key] = (subject, queue, handler)
        try:
            task_status.started()
            await anyio.sleep_forever()
        finally:
            broker.responders.pop(key, None)
        raise AssertionError("unreachable")
