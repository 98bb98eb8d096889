"""JetStream transport: one owned NATS connection, idempotent stream/consumer setup,
windowed publish with ``Nats-Msg-Id``, pull consumption with explicit acks, KV buckets and
request/reply (the :class:`~mesh.transport.Transport` interface on NATS).

Guarantees (beyond the interface's):

* **At-least-once.** :meth:`JetStream.publish_many` returns, per message, whether the server
  acknowledged it (PubAck); only those may be removed from the outbox (I3). A message may be
  stored twice if its ack was lost; JetStream drops the copy inside the duplicate window because
  ``Nats-Msg-Id`` is the envelope's deterministic id.
* **Everything is bounded.** Every publish and every JetStream API call has a timeout (nats-py's
  ``publish_async`` can leave a future unresolved forever: every such future is bounded).
* **The connection never gives up** once made: infinite reconnect; the agent keeps capturing
  into its outbox while NATS is away. The first connect is bounded.
* Redelivery counts come from the server (``num_delivered``), never from memory.
* nats-py's own tasks live and die with this object (``async with``).

Foreign exceptions (nats-py's) are translated in :mod:`mesh.transport._nats`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import ssl
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn

import anyio
import nats
import nats.errors
import nats.js.errors
from anyio.abc import TaskStatus
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from mesh.config import NatsConfig, StreamsConfig
from mesh.envelope import CONTENT_TYPE
from mesh.errors import ConfigError, TransportError
from mesh.redact import redact_urls
from mesh.secrets import read_secret
from mesh.transport import _jsapi
from mesh.transport._denials import Denials
from mesh.transport._nats import NATS_ERRORS, TIMEOUTS, translate, translated
from mesh.transport._tls import (
    client_cert_missing,
    client_ssl_context,
    describe_tls_failure,
    server_requires_tls,
    wants_tls,
)
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
    NoResponders,
    NotFound,
    NotSupported,
    OutMessage,
    PubAck,
    QuickHandler,
    Refused,
    StoredMessage,
    StreamReader,
    StreamState,
    Subscription,
    Transport,
    quick_reply,
)
from mesh.transport.subjects import AUDIT_STREAM, COMMANDS_STREAM, DLQ_STREAM, EVENTS_STREAM, TRACE_STREAM

__all__ = ["JetStream", "NatsBucket", "NatsDelivery", "PullConsumer"]

log = logging.getLogger(__name__)


class _Client(Client):
    """nats-py's client whose requests (every JetStream API call and publish included) fail
    at once with :class:`~mesh.transport.Refused` when the server refuses their subject,
    instead of waiting for the timeout (see :mod:`mesh.transport._denials`)."""

    def __init__(self) -> None:
        super().__init__()
        self.denials = Denials()

    @staticmethod
    def _parse_header_lines(raw: bytes) -> dict[str, str]:
        """nats-py's header parser (each received message with headers goes through it: every
        delivery carries ``Nats-Msg-Id``), the same result without a generator per name: a
        name with whitespace inside is skipped, an empty one kept, as nats-py does."""
        out: dict[str, str] = {}
        for line in raw.split(b"\r\n"):
            name, sep, value = line.partition(b":")
            if not sep:
                continue
            try:
                key = name.strip().decode("ascii")
            except UnicodeDecodeError:
                continue
            if key and key.split() != [key]:  # str.split() splits where str.isspace() is true
                continue
            out[key] = value.strip().decode("utf-8", "replace")
        return out

    async def request(
        self,
        subject: str,
        payload: bytes = b"",
        timeout: float = 0.5,
        old_style: bool = False,
        headers: dict[str, Any] | None = None,
    ) -> Msg:
        inbox = self._inbox_prefix.decode() + "."
        for refused in self.denials.refused_subscriptions:
            if refused.startswith(inbox.lower()):  # replies can never reach us on this connection
                raise Refused(f"permission denied: subscribe to {inbox}{refused[len(inbox) :]}")
        with self.denials.pending(publish=(subject,), subscribe=(inbox,)) as pending:
            with pending.scope:
                return await super().request(subject, payload, timeout, old_style, headers)
            pending.check()
        raise AssertionError("unreachable")  # the scope is only cancelled with ``denied`` set


def _is_authorization_error(exc: BaseException) -> bool:
    return isinstance(exc, nats.errors.AuthorizationError) or "authorization violation" in str(exc).lower()


async def _unsubscribe(sub: Any) -> None:
    """Unsubscribe, bounded and shielded; a connection already gone is not an error."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(2), contextlib.suppress(*NATS_ERRORS):
        await sub.unsubscribe()


class _NatsSubscription(Subscription):
    def __init__(self, sub: Any, subject: str, denials: Denials) -> None:
        self._sub = sub
        self.subject = subject
        self._denials = denials
        self._closed = False

    async def next(self, timeout: float) -> Message | None:
        if self.subject.lower() in self._denials.refused_subscriptions:
            raise Refused(f"permission denied: subscribe to {self.subject}")
        try:
            msg = await self._sub.next_msg(timeout=timeout)
        except TIMEOUTS:
            return None
        except NATS_ERRORS as exc:
            raise TransportError(f"subscription {self.subject}: {type(exc).__name__}: {exc}") from exc
        return Message(msg.subject, msg.data, dict(msg.headers or {}))

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await _unsubscribe(self._sub)


class NatsDelivery(Delivery):
    """A :class:`Delivery` from a JetStream pull consumer."""

    __slots__ = ("_msg",)

    def __init__(self, msg: Msg) -> None:
        self._msg = msg

    @property
    def data(self) -> bytes:
        return self._msg.data

    @property
    def subject(self) -> str:
        return self._msg.subject

    @property
    def headers(self) -> dict[str, str]:
        return dict(self._msg.headers or {})

    @property
    def num_delivered(self) -> int:
        return int(self._msg.metadata.num_delivered)

    @property
    def stream_seq(self) -> int:
        return int(self._msg.metadata.sequence.stream)

    async def ack(self) -> None:
        await translated("ack", self._msg.ack())

    async def nak(self, delay: float | None = None) -> None:
        await translated("nak", self._msg.nak(delay=delay))

    async def term(self) -> None:
        await translated("term", self._msg.term())


class PullConsumer(Consumer):
    """A durable pull consumer bound to one (flow, sink); several agent replicas may share it."""

    def __init__(
        self,
        sub: JetStreamContext.PullSubscription,
        name: str,
        *,
        denials: Denials | None = None,
        next_subject: str = "",
    ) -> None:
        self._sub = sub
        self.name = name
        self._denials = denials or Denials()
        self._next_subject = next_subject
        """The API subject a fetch publishes to (``$JS.API.CONSUMER.MSG.NEXT.<stream>.<name>``)."""

    async def fetch(self, batch: int, timeout: float) -> list[Delivery]:
        """See :meth:`Consumer.fetch`; raises Refused when the credentials may not pull from
        this consumer (instead of answering empty batches forever)."""
        with self._denials.pending(publish=(self._next_subject,)) as pending:
            msgs = None
            with pending.scope:
                try:
                    msgs = await self._sub.fetch(batch, timeout=timeout)
                except TIMEOUTS:  # nats-py raises on an empty batch
                    pass
                except NATS_ERRORS as exc:
                    raise TransportError(f"fetch from {self.name}: {type(exc).__name__}: {exc}") from exc
            pending.check()
        return [NatsDelivery(m) for m in msgs or []]

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """See :meth:`Consumer.ack_many`: the acks go to the connection's buffer as one command
        (nats-py's ``Msg.ack`` publishes each alone, with its checks and a flush request each),
        all or none. One by one instead while the connection is not up (nats-py's buffering and
        errors then apply per ack) or if nats-py's client is not as expected.

        Raises:
            TransportError: the connection is closed or its buffer is full.
        """
        if not deliveries:
            return
        msgs = [d._msg for d in deliveries if type(d) is NatsDelivery]
        nc = msgs[0]._client if msgs else None
        send = getattr(nc, "_send_command", None)
        flush = getattr(nc, "_flush_pending", None)
        if (
            nc is None or send is None or flush is None or len(msgs) != len(deliveries) or not nc.is_connected
            or any(not m.reply or m._ackd for m in msgs)  # Msg.ack raises its own error for these
        ):  # fmt: skip
            await super().ack_many(deliveries)
            return
        command = b"".join([b"PUB " + m.reply.encode() + b" 0\r\n\r\n" for m in msgs])
        await translated("ack", send(command))
        for m in msgs:
            m._ackd = True
        with contextlib.suppress(AttributeError, KeyError):
            nc.stats["out_msgs"] += len(msgs)
        queue = getattr(nc, "_flush_queue", None)
        if queue is not None and queue.empty():
            await translated("ack", flush())

    async def pending(self) -> int:
        info = await translated(f"consumer info {self.name}", self._sub.consumer_info())
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(2), contextlib.suppress(*NATS_ERRORS):
            await self._sub.unsubscribe()


class _OrderedReader(StreamReader):
    """A :class:`StreamReader` on a nats-py ordered push consumer (ephemeral, no acks; nats-py
    re-creates it from the last sequence seen when it detects a gap)."""

    def __init__(self, js: JetStreamContext, sub: JetStreamContext.PushSubscription, stream: str) -> None:
        self._js = js
        self._sub = sub
        self._stream = stream
        self._closed = False

    def __repr__(self) -> str:
        return f"<_OrderedReader {self._stream}>"

    async def next(self, timeout: float) -> StoredMessage | None:
        try:
            msg = await self._sub.next_msg(timeout=timeout)
        except TIMEOUTS:
            return None
        except NATS_ERRORS as exc:
            raise TransportError(f"read {self._stream}: {type(exc).__name__}: {exc}") from exc
        meta = msg.metadata
        return StoredMessage(
            self._stream,
            int(meta.sequence.stream),
            msg.subject,
            meta.timestamp.astimezone(UTC),
            msg.data,
            dict(msg.headers or {}),
        )

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True), anyio.move_on_after(2), contextlib.suppress(*NATS_ERRORS):
            # The server would drop the ephemeral consumer only after its inactive threshold;
            # delete it now so a reader leaves nothing behind. nats-py keeps the current name
            # (it changes when the ordered consumer is re-created) in ``_consumer`` only.
            name = getattr(self._sub, "_consumer", None)
            await self._sub.unsubscribe()
            if name:
                await self._js.delete_consumer(self._stream, name)


def _consumer_state(info: Any) -> ConsumerState:
    cfg = info.config
    subjects = getattr(cfg, "filter_subjects", None) or []
    filter_subject = cfg.filter_subject or (subjects[0] if len(subjects) == 1 else ">")
    return ConsumerState(
        name=str(info.name),
        stream=str(info.stream_name),
        filter_subject=str(filter_subject),
        num_pending=int(info.num_pending or 0),
        num_ack_pending=int(info.num_ack_pending or 0),
        ack_floor=int(info.ack_floor.stream_seq or 0) if info.ack_floor else 0,
    )


class _NatsWatch(KvWatch):
    def __init__(self, watcher: Any, name: str) -> None:
        self._watcher = watcher
        self._name = name
        self._closed = False

    async def next(self, timeout: float) -> KvUpdate | None:
        try:
            update = await self._watcher.updates(timeout=timeout)
        except TIMEOUTS:
            return None
        except NATS_ERRORS as exc:
            raise TransportError(f"watch {self._name}: {type(exc).__name__}: {exc}") from exc
        if update is None:  # nats-py's end-of-initial-values marker
            return KvUpdate("loaded")
        revision = int(update.revision or 0)
        if update.operation in (KV_DEL, KV_PURGE):
            return KvUpdate("delete", update.key, b"", revision)
        return KvUpdate("put", update.key, bytes(update.value or b""), revision)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(2),
            contextlib.suppress(*NATS_ERRORS, AttributeError),
        ):
            await self._watcher.stop()


class NatsBucket(Bucket):
    """:class:`Bucket` on a nats-py ``KeyValue``."""

    def __init__(self, kv: KeyValue, name: str) -> None:
        self.kv = kv
        self.name = name
        self._acks: _KvAcks | None = None

    async def get(self, key: str) -> Entry | None:
        with translate(f"KV {self.name}: get {key}"):
            try:
                e = await self.kv.get(key)
            except nats.js.errors.NotFoundError:  # KeyNotFoundError, and deleted keys
                return None
        return Entry(key, bytes(e.value or b""), int(e.revision or 0))

    async def create(self, key: str, value: bytes) -> int:
        return int(await translated(f"KV {self.name}: create {key}", self.kv.create(key, value)))

    async def update(self, key: str, value: bytes, revision: int) -> int:
        return int(
            await translated(f"KV {self.name}: update {key}", self.kv.update(key, value, last=revision))
        )

    async def put(self, key: str, value: bytes) -> int:
        return int(await translated(f"KV {self.name}: put {key}", self.kv.put(key, value)))

    async def put_many(self, items: Sequence[tuple[str, bytes]]) -> list[int | None]:
        if not items:
            return []
        js = self.kv._js
        nc: Client = js._nc
        acks = self._acks
        if acks is None or acks.nc is not nc:
            acks = _KvAcks(nc)
            await acks.start()
            self._acks = acks
        loop = asyncio.get_running_loop()
        sent: list[tuple[str, asyncio.Future[int | None]]] = []
        try:
            for key, value in items:
                token = acks.token()
                fut: asyncio.Future[int | None] = loop.create_future()
                acks.waiting[token] = fut
                sent.append((token, fut))
                try:  # no yield: nats-py's flusher sends the whole batch in one write
                    await nc.publish(self.kv._pre + key, value, reply=acks.prefix + token)
                except NATS_ERRORS as exc:
                    log.debug("KV %s: put %s not sent: %s", self.name, key, exc)
                    fut.set_result(None)
                    break
            await asyncio.wait([f for _, f in sent], timeout=float(getattr(js, "_timeout", 5.0)))
        finally:
            for token, fut in sent:
                if not fut.done():
                    acks.waiting.pop(token, None)
                    fut.cancel()
        out: list[int | None] = [None] * len(items)
        for i, (_, fut) in enumerate(sent):
            if fut.done() and not fut.cancelled():
                out[i] = fut.result()
        return out

    async def delete(self, key: str, revision: int | None = None) -> None:
        await translated(f"KV {self.name}: delete {key}", self.kv.delete(key, last=revision))

    async def watch(self, keys: str = ">") -> KvWatch:
        watcher = await translated(f"KV {self.name}: watch {keys}", self.kv.watch(keys))
        return _NatsWatch(watcher, self.name)


class _TlsRefused(Exception):
    """The first connect failed in its TLS handshake (carries the ssl error)."""

    def __init__(self, error: ssl.SSLError) -> None:
        super().__init__(str(error))
        self.error = error


def _take_queued_without_waiting(psub: Any) -> None:
    """Let a fetch take a message already received without a task and a ``wait_for`` each.

    nats-py's ``fetch`` collects a batch through ``Subscription.next_msg``, which starts a task
    running ``wait_for(queue.get(), timeout)`` for every message, even when it is already queued;
    for a 1,000-message batch that is most of the consumer's loop time. A queued message is
    taken directly, with the same bookkeeping as ``next_msg``; otherwise ``next_msg`` waits as
    before (its timeout unchanged). Left alone if nats-py's subscription is not as expected.
    """
    sub = getattr(psub, "_sub", None)
    queue = getattr(sub, "_pending_queue", None)
    if sub is None or not isinstance(queue, asyncio.Queue) or not hasattr(sub, "_pending_size"):
        return
    waiting_next_msg = sub.next_msg

    async def next_msg(timeout: float | None = 1.0) -> Msg:
        if queue.empty() or sub._conn.is_closed:
            return await waiting_next_msg(timeout)
        msg: Msg = queue.get_nowait()
        sub._pending_size -= len(msg.data)
        queue.task_done()
        return msg

    sub.next_msg = next_msg


_QUICK_TURN = 32
"""Requests a serving loop answers quickly between two yields to the event loop (~1-2 ms)."""


class _QueuedFirst:
    """The messages of a subscription, each one already received taken at once.

    nats-py's ``messages`` iterator starts a task and an ``asyncio.wait`` for every message,
    even a queued one: a served subject under load (thousands of heartbeats a second) spent
    most of its loop time there, and a reply per loop turn meant a socket write per reply.
    Queued messages are taken directly (the same bookkeeping as the iterator); an empty queue
    waits through nats-py's iterator as before, which also ends the iteration on unsubscribe
    or close. Uses the iterator alone if nats-py's subscription is not as expected.
    """

    def __init__(self, psub: Any) -> None:
        self.sub = psub
        self.messages = psub.messages
        queue = getattr(psub, "_pending_queue", None)
        ok = isinstance(queue, asyncio.Queue) and hasattr(psub, "_pending_size") and hasattr(psub, "_conn")
        self.queue: asyncio.Queue[Msg] | None = queue if ok else None

    def __aiter__(self) -> _QueuedFirst:
        return self

    async def __anext__(self) -> Msg:
        queue = self.queue
        if queue is not None and not queue.empty() and not self.sub._conn.is_closed:
            msg: Msg = queue.get_nowait()
            self.sub._pending_size -= len(msg.data)
            queue.task_done()
            return msg
        return await self.messages.__anext__()


class _KvAcks:
    """The reply subscription of :meth:`NatsBucket.put_many`: each PubAck resolves its waiting
    future with the stored message's sequence (the key's new revision), an error with None."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.prefix = nc.new_inbox() + "."
        self.waiting: dict[str, asyncio.Future[int | None]] = {}
        self._next = 0

    async def start(self) -> None:
        await translated("subscribe to KV put acks", self.nc.subscribe(self.prefix + "*", cb=self._on_ack))

    def token(self) -> str:
        self._next += 1
        return format(self._next, "x")

    async def _on_ack(self, msg: Msg) -> None:
        fut = self.waiting.pop(msg.subject[len(self.prefix) :], None)
        if fut is None or fut.done():
            return
        try:
            ack = json.loads(msg.data) if msg.data else {}
        except ValueError:
            ack = {}
        seq = ack.get("seq") if isinstance(ack, dict) and "error" not in ack else None
        fut.set_result(seq if isinstance(seq, int) else None)


class _Window:
    """The acks of one :meth:`JetStream.publish_many` call: ``results[i]`` turns True when the
    PubAck of message ``i`` says stored (or duplicate); ``room`` is set once at most
    ``low_water`` are unacknowledged, ``idle`` once none is."""

    __slots__ = ("idle", "inflight", "low_water", "results", "room")

    def __init__(self, n: int, low_water: int) -> None:
        self.results = [False] * n
        self.inflight = 0
        self.low_water = low_water
        self.room = asyncio.Event()
        self.idle = asyncio.Event()

    def acked(self, i: int, ok: bool) -> None:
        self.results[i] = ok
        self.inflight -= 1
        if self.inflight <= self.low_water:
            self.room.set()
            if self.inflight <= 0:
                self.idle.set()


class _PubAcks:
    """The reply subscription of windowed publishes: each PubAck marks its message in the
    waiting :class:`_Window` (True for a stored or duplicate message, False for an error or a
    no-responders status)."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.prefix = nc.new_inbox() + "."
        self.waiting: dict[str, tuple[_Window, int]] = {}
        self._next = 0

    async def start(self) -> None:
        sub = await translated("subscribe to publish acks", self.nc.subscribe(self.prefix + "*"))
        # Each ack is marked as nats-py's reader hands it over, instead of through the
        # subscription's queue and a callback task (a task switch per publish).
        sub._pending_queue = _InlineQueue(sub, self._on_ack)

    def token(self) -> str:
        self._next += 1
        return format(self._next, "x")

    def _on_ack(self, msg: Msg) -> None:
        slot = self.waiting.pop(msg.subject[len(self.prefix) :], None)
        if slot is not None:
            data = msg.data
            slot[0].acked(slot[1], b'"seq"' in data and b'"error"' not in data)


class _InlineQueue(asyncio.Queue[Msg]):
    """A subscription queue that hands each message to ``handle`` at once and stays empty
    (``handle`` must not raise or block: it runs inside nats-py's read loop)."""

    def __init__(self, sub: Any, handle: Callable[[Msg], None]) -> None:
        super().__init__()
        self._sub = sub
        self._handle = handle

    def put_nowait(self, item: Msg) -> None:
        self._sub._pending_size -= len(item.data)  # nats-py counted it as queued
        try:
            self._handle(item)
        except Exception:  # never into nats-py's reader
            log.exception("publish ack not handled")


# What nats-py's publish refuses in a subject (whitespace would let a subject inject protocol),
# and its header rules: RFC 7230 token keys, values trimmed with CR/LF turned into spaces.
_SUBJECT_INVALID = re.compile(r"[ \t\r\n]")
_HEADER_KEY = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_NEWLINES = str.maketrans({"\r": " ", "\n": " "})
_FIXED_HEADERS = f"\r\nContent-Type: {CONTENT_TYPE}\r\n\r\n".encode()


class _Unsendable(Exception):
    """A message nats-py's own publish would refuse (bad subject or header, too large)."""


def _hpub(m: OutMessage, reply: str, max_payload: int) -> bytes:
    """The ``HPUB`` frame of one message, byte for byte what nats-py's ``publish`` writes for
    ``headers={"Nats-Msg-Id": ..., "Content-Type": CONTENT_TYPE, **m.headers}``.

    Raises:
        _Unsendable: the subject or a header is malformed, or the payload is over the limit.
    """
    if not m.subject or _SUBJECT_INVALID.search(m.subject) or len(m.data) > max_payload:
        raise _Unsendable(m.msg_id)
    mid = m.msg_id
    if not m.headers and "\r" not in mid and "\n" not in mid and mid == mid.strip():
        hdr = b"NATS/1.0\r\nNats-Msg-Id: " + mid.encode() + _FIXED_HEADERS
    else:
        lines = [b"NATS/1.0\r\n"]
        for k, v in {"Nats-Msg-Id": mid, "Content-Type": CONTENT_TYPE, **m.headers}.items():
            key = k.strip()
            if not key:
                continue
            if not _HEADER_KEY.fullmatch(key):
                raise _Unsendable(m.msg_id)
            lines.append(f"{key}: {v.strip().translate(_HEADER_NEWLINES)}\r\n".encode())
        lines.append(b"\r\n")
        hdr = b"".join(lines)
    size = len(hdr)
    return b"%b %d %d\r\n%b%b\r\n" % (
        f"HPUB {m.subject} {reply}".encode(),
        size,
        size + len(m.data),
        hdr,
        m.data,
    )


class JetStream(Transport):
    """Owns one NATS connection and everything nats-py spawns for it.

    Use as ``async with JetStream(cfg, name=...) as js``. ``connect()`` raises
    :class:`TransportError` when no server answers; once connected, nats-py reconnects forever.
    """

    def __init__(self, cfg: NatsConfig, *, name: str, domain: str | None = None) -> None:
        self.cfg = cfg
        self.name = name
        self.domain = domain
        """JetStream domain to address (``$JS.<domain>.API``); None: the server's own."""
        self._nc: _Client | None = None
        self._js: JetStreamContext | None = None
        self._acks: _PubAcks | None = None
        self._closing = False
        self.connected = anyio.Event()
        self.reconnects = 0
        self._reconnected = anyio.Event()

    def __repr__(self) -> str:
        state = "connected" if self._nc is not None and self._nc.is_connected else "disconnected"
        return f"<JetStream {self.name} {state} servers=[{redact_urls(self.cfg.servers)}]>"

    @property
    def is_connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    @property
    def where(self) -> str:
        return ", ".join(self.cfg.servers)

    def _password(self) -> str | None:
        if self.cfg.password_env is None and self.cfg.password_file is None:
            return None
        return read_secret(self.cfg.password_env, self.cfg.password_file, field="nats.password", what="NATS")

    def _tls_and_creds(self) -> tuple[ssl.SSLContext | None, str | None]:
        """The client SSL context (None: plaintext) and the creds file, both checked (files read
        here, before the event loop's connect)."""
        tls = client_ssl_context(self.cfg.tls) if wants_tls(self.cfg) else None
        creds = self.cfg.creds
        if creds is not None and not os.path.isfile(creds):
            raise ConfigError(f"no such credentials file: {creds}", path="nats.creds")
        return tls, creds

    async def connect(self) -> None:
        """Connect (TLS when ``cfg.tls`` is set or a URL is ``tls://``; see :mod:`._tls`).

        Raises:
            ConfigError: a TLS file or the creds file is missing or unreadable.
            TransportError: no server reachable, or the TLS handshake failed (one line that says
                why: unknown CA, client certificate required, wrong host name), or ``cfg.tls``
                is set and the server does not use TLS.
        """
        last_logged = [0.0]
        tls, creds = self._tls_and_creds()
        nc = _Client()
        unauthorized: list[Exception] = []  # the server refused the credentials at connect
        first_connect = [True]

        async def on_error(exc: Exception) -> None:
            if first_connect[0] and isinstance(exc, ssl.SSLError):
                # A failed TLS upgrade leaves nats-py 2.16 waiting forever for the plain stream
                # to close (its protocol was handed to the TLS layer): stop the first connect here.
                raise _TlsRefused(exc)
            if first_connect[0] and _is_authorization_error(exc):
                unauthorized.append(exc)  # said once, by connect's own error
                return
            refused = nc.denials.report(str(exc))
            if refused is not None:
                # Told to whoever waits on it (Refused); one that nobody waits on is worth a line.
                log.warning("nats %s: permission denied: %s to %s", self.name, *refused)
                return
            # During an outage nats-py reports every reconnect attempt; one line per 30 s is enough.
            now = anyio.current_time()
            if now - last_logged[0] >= 30:
                last_logged[0] = now
                log.warning("nats %s: %s: %s", self.name, type(exc).__name__, exc)

        async def on_disconnect() -> None:
            if not self._closing:
                log.warning("nats %s: disconnected", self.name)

        async def on_reconnect() -> None:
            nc.denials.refused_subscriptions.clear()  # re-sent, perhaps with new credentials
            self.reconnects += 1
            self._reconnected.set()
            self._reconnected = anyio.Event()
            log.info("nats %s: reconnected", self.name)

        # nats-py types it int; it takes (and we want) half a second.
        options: dict[str, Any] = {"reconnect_time_wait": 0.5}
        if creds is not None:
            options["user_credentials"] = creds
        if self.cfg.inbox_prefix:
            options["inbox_prefix"] = self.cfg.inbox_prefix
        try:
            await nc.connect(
                self.cfg.servers,
                name=self.name,
                user=self.cfg.user,
                password=self._password(),
                connect_timeout=max(1, int(self.cfg.connect_timeout)),
                tls=tls,
                tls_hostname=self.cfg.tls.server_name if self.cfg.tls else None,
                allow_reconnect=True,
                # Bounded for the first connect (nats-py would otherwise loop here forever);
                # the caller decides whether to try again.
                max_reconnect_attempts=1,
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                **options,
            )
        except _TlsRefused as exc:
            # No close(): after a failed TLS upgrade nats-py 2.16 would wait on the dead stream.
            raise TransportError(
                f"cannot connect to {redact_urls(self.cfg.servers)}: "
                f"{describe_tls_failure(exc.error, self.cfg)}"
            ) from None
        except NATS_ERRORS as exc:
            await self._abandon(nc)
            if not (unauthorized or _is_authorization_error(exc)):
                why = client_cert_missing(nc, self.cfg) or redact_urls(str(exc) or type(exc).__name__)
                raise TransportError(f"cannot connect to {redact_urls(self.cfg.servers)}: {why}") from exc
            raise TransportError(
                f"cannot connect to {redact_urls(self.cfg.servers)}: authorization violation "
                f"(the server refused {self._credentials_named()}; check them or get new ones)"
            ) from None
        finally:
            first_connect[0] = False
        self._nc = nc
        if tls is not None and not server_requires_tls(self._nc):
            await self.aclose()
            raise TransportError(
                f"cannot connect to {redact_urls(self.cfg.servers)}: the server does not use TLS "
                "but TLS is configured; refusing a plaintext connection"
            )
        # Once connected, never give up reconnecting (the default stops after ~2 minutes).
        self._nc.options["max_reconnect_attempts"] = -1
        self._js = self._nc.jetstream(timeout=self.cfg.request_timeout, domain=self.domain)
        self.connected.set()

    def _credentials_named(self) -> str:
        if self.cfg.creds is not None:
            return f"the credentials in {self.cfg.creds}"
        if self.cfg.user is not None:
            return f"user {self.cfg.user}"
        return "an anonymous connection"

    @staticmethod
    async def _abandon(nc: Client) -> None:
        """Stop whatever nats-py left running after a failed first connect."""
        if not nc.is_closed:
            with anyio.move_on_after(2, shield=True), contextlib.suppress(*NATS_ERRORS):
                await nc.close()

    async def reconnect(self) -> None:
        """See :meth:`Transport.reconnect` (nats-py's ``force_reconnect``; the creds file is
        read again at every connect)."""
        nc = self.nc
        reconnected = self._reconnected
        await nc.force_reconnect()
        bound = self.cfg.connect_timeout + self.cfg.request_timeout + 1
        with anyio.move_on_after(bound):
            await reconnected.wait()
            return
        raise TransportError(
            f"reconnect to {redact_urls(self.cfg.servers)}: not connected again within {bound:g}s "
            "(still trying in the background)"
        )

    async def aclose(self) -> None:
        """Flush and close the connection (and nats-py's tasks). Idempotent."""
        self._closing = True
        nc, self._nc = self._nc, None
        self._js = None
        self._acks = None
        if nc is None or nc.is_closed:
            return
        with anyio.move_on_after(5, shield=True):
            with contextlib.suppress(*NATS_ERRORS):
                await nc.close()

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise TransportError("not connected")
        return self._js

    @property
    def nc(self) -> _Client:
        if self._nc is None:
            raise TransportError("not connected")
        return self._nc

    async def ensure_streams(self, cfg: StreamsConfig) -> None:
        """See :meth:`Transport.ensure_streams`.

        An update keeps the stream's ``sources`` (e.g. a hub's MESH_EVENTS sourcing from leaf
        node domains, see :mod:`mesh.leafnode`): they are set up by the operator, not by agents.
        """
        storage = StorageType.FILE if cfg.storage == "file" else StorageType.MEMORY
        common: dict[str, Any] = dict(
            num_replicas=cfg.replicas,
            storage=storage,
            duplicate_window=cfg.duplicate_window,
            retention=RetentionPolicy.LIMITS,
            discard=DiscardPolicy.OLD,
        )
        streams = [
            StreamConfig(name=EVENTS_STREAM, subjects=["evt.>"], max_age=cfg.max_age or None, **common),
            StreamConfig(name=COMMANDS_STREAM, subjects=["cmd.>"], max_age=cfg.max_age or None, **common),
            StreamConfig(name=DLQ_STREAM, subjects=["dlq.>"], **common),
            StreamConfig(name=AUDIT_STREAM, subjects=["audit.>"], **common),
            StreamConfig(
                name=TRACE_STREAM,
                subjects=["trace.>"],
                max_age=cfg.trace.max_age or None,
                max_bytes=cfg.trace.max_bytes,
                **common,
            ),
        ]
        jsm = self.js
        for sc in streams:
            try:
                await jsm.add_stream(sc)
            except nats.js.errors.BadRequestError:
                # Exists with another config (err 10058): bring it to ours.
                current = await translated(f"stream info {sc.name}", jsm.stream_info(str(sc.name)))
                if current.config.sources:
                    sc = dataclasses.replace(sc, sources=current.config.sources)
                await translated(f"update stream {sc.name}", jsm.update_stream(sc))
            except NATS_ERRORS as exc:
                raise TransportError(f"ensure stream {sc.name}: {exc}") from exc

    async def publish(self, msg: OutMessage) -> int:
        """Publish one message and wait for its PubAck (bounded). Returns the stream sequence."""
        return (await self.publish_ack(msg)).seq

    async def publish_ack(self, msg: OutMessage) -> PubAck:
        headers = {"Nats-Msg-Id": msg.msg_id, "Content-Type": CONTENT_TYPE, **msg.headers}
        ack = await translated(
            f"publish {msg.subject}",
            self.js.publish(msg.subject, msg.data, timeout=self.cfg.request_timeout, headers=headers),
        )
        return PubAck(str(ack.stream), int(ack.seq), bool(ack.duplicate))

    @property
    def _api_prefix(self) -> str:
        return f"$JS.{self.domain}.API" if self.domain else "$JS.API"

    async def _api(self, what: str, subject: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        """One raw JetStream API request; its answer (which may be an error answer)."""
        body = json.dumps(payload).encode() if payload else b""
        try:
            msg = await self.request(f"{self._api_prefix}.{subject}", body, timeout=self.cfg.request_timeout)
        except NoResponders:
            raise TransportError(f"{what}: JetStream is not enabled on {self.where}") from None
        return _jsapi.decode_answer(what, msg.data)

    async def stream_info(self, stream: str, *, subjects_filter: str | None = None) -> StreamState:
        info = await translated(
            f"stream info {stream}", self.js.stream_info(stream, subjects_filter=subjects_filter)
        )
        state = info.state
        return StreamState(
            stream,
            int(state.first_seq or 0),
            int(state.last_seq or 0),
            int(state.messages or 0),
            {k: int(v) for k, v in (state.subjects or {}).items()},
        )

    async def get_message(
        self,
        stream: str,
        *,
        seq: int = 0,
        subject: str | None = None,
        since: datetime | None = None,
        last: bool = False,
    ) -> StoredMessage | None:
        request: dict[str, Any]
        if subject is None:
            if since is not None or last or seq < 1:
                raise ValueError("get_message without a subject takes a sequence (1 or more) only")
            request = {"seq": seq}
        elif last:
            if since is not None or seq:
                raise ValueError("get_message(last=True) takes a subject only")
            request = {"last_by_subj": subject}
        elif since is not None:
            if seq:
                raise ValueError("get_message takes a sequence or a time, not both")
            request = {"start_time": _jsapi.rfc3339(since), "next_by_subj": subject}
        else:
            request = {"seq": max(seq, 1), "next_by_subj": subject}
        what = f"get message from {stream}"
        resp = await self._api(what, f"STREAM.MSG.GET.{stream}", request)
        err = _jsapi.error_of(resp)
        if err is not None:
            if err[0] == _jsapi.NO_MESSAGE:
                return None
            _jsapi.raise_for(what, err)
        message = _jsapi.stored_message(stream, resp["message"])
        # The server converts a time to int64 nanoseconds (one after 2262 wraps around and it
        # answers with an early message), so check the answer's own time.
        if since is not None and message.time < since:
            return None
        return message

    async def delete_message(self, stream: str, seq: int) -> bool:
        what = f"delete {stream} seq {seq}"
        resp = await self._api(what, f"STREAM.MSG.DELETE.{stream}", {"seq": seq})
        err = _jsapi.error_of(resp)
        if err is not None:
            if err[0] in (_jsapi.NO_MESSAGE, _jsapi.STREAM_NOT_FOUND) or "not found" in err[1].lower():
                return False
            _jsapi.raise_for(what, err)
        return bool(resp.get("success"))

    async def purge(self, stream: str, *, up_to_seq: int) -> int:
        what = f"purge {stream}"
        resp = await self._api(what, f"STREAM.PURGE.{stream}", {"seq": up_to_seq + 1})
        err = _jsapi.error_of(resp)
        if err is not None:
            if err[0] == _jsapi.STREAM_NOT_FOUND:
                return 0
            _jsapi.raise_for(what, err)
        return int(resp.get("purged", 0))

    async def read_stream(self, stream: str, *, subject: str = ">", start_seq: int = 1) -> StreamReader:
        await self.stream_info(stream)  # NotFound before subscribing
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(start_seq, 1)
        )
        sub = await translated(
            f"read {stream}",
            self.js.subscribe(subject, stream=stream, ordered_consumer=True, config=config),
        )
        return _OrderedReader(self.js, sub, stream)

    async def consumers(self, stream: str) -> list[ConsumerState]:
        found: list[ConsumerState] = []
        while True:
            batch = await translated(
                f"consumers of {stream}", self.js.consumers_info(stream, offset=len(found) or None)
            )
            found.extend(_consumer_state(c) for c in batch)
            if len(batch) < 256:
                return found

    async def consumer_info(self, stream: str, name: str) -> ConsumerState:
        info = await translated(f"consumer {name} on {stream}", self.js.consumer_info(stream, name))
        return _consumer_state(info)

    async def reset_consumer(self, stream: str, name: str, seq: int) -> int:
        version = self.nc.connected_server_version
        if (version.major, version.minor) < (2, 14):
            raise NotSupported(
                f"the server runs nats-server {version}; resetting a consumer needs nats-server 2.14 or later"
            )
        await self.consumer_info(stream, name)  # the server leaves a reset of a missing one unanswered
        result = await translated(
            f"reset consumer {name}",
            self.js.reset_consumer(stream, name, seq=seq, timeout=self.cfg.request_timeout),
        )
        return int(result.reset_seq)

    async def publish_many(self, messages: Sequence[OutMessage], window: int) -> list[bool]:
        """Publish with at most ``window`` unacknowledged at a time; True where PubAck arrived.

        Acks arrive on one wildcard reply subscription per connection instead of one request
        per message. Messages are handed to nats-py without yielding to the loop while the
        window has room, and a full window waits until half of it is acked, so nats-py's flusher
        sends each chunk in one write (nats-py's own ``publish_async`` yields for every message
        through ``wait_for`` and so writes each one alone). Every ack is bounded (the lesson of
        nats.py #985): a full window not half acked within ``request_timeout``, or an ack not
        back within ``request_timeout`` of the last send, counts as not acked. Never raises for
        a failed message: the caller keeps the unacked ones and retries (same ``Nats-Msg-Id``,
        so the server drops a duplicate).
        """
        if not messages:
            return []
        acks = await self._pub_acks()
        timeout = self.cfg.request_timeout
        window = max(1, window)
        acked = _Window(len(messages), low_water=window // 2)
        tokens: list[str] = []
        total = len(messages)
        try:
            while len(tokens) < total and self.is_connected:
                if acked.inflight >= window:
                    # The window is full: wait until half of it is acked, so the next chunk goes
                    # out in one write again (a slot at a time would mean a write per message).
                    acked.room.clear()
                    with anyio.move_on_after(timeout) as stalled:
                        await acked.room.wait()
                    if stalled.cancelled_caught:
                        log.debug(
                            "publish %s not sent: window stalled %gs", messages[len(tokens)].msg_id, timeout
                        )
                        break
                if not await self._send_chunk(acks, messages, tokens, window - acked.inflight, acked):
                    break
            if acked.inflight > 0:
                acked.idle.clear()
                with anyio.move_on_after(timeout):
                    await acked.idle.wait()
        finally:
            for token in tokens:
                acks.waiting.pop(token, None)  # a late ack no longer counts
        return acked.results

    async def _send_chunk(
        self, acks: _PubAcks, messages: Sequence[OutMessage], tokens: list[str], room: int, acked: _Window
    ) -> bool:
        """Hand the next ``room`` messages to nats-py as one buffer (one write by its flusher);
        False when one could not be sent (the rest of the call is then not sent either)."""
        nc = self.nc
        first = len(tokens)
        frames: list[bytes] = []
        ok = True
        for i in range(first, min(len(messages), first + room)):
            m = messages[i]
            token = acks.token()
            try:
                frames.append(_hpub(m, acks.prefix + token, nc.max_payload))
            except _Unsendable:
                log.debug("publish %s not sent: bad subject or header, or too large", m.msg_id)
                ok = False
                break
            acks.waiting[token] = (acked, i)
            tokens.append(token)
        if not frames:
            return ok
        acked.inflight += len(frames)
        try:
            if nc.is_closed or nc.is_draining_pubs:
                raise nats.errors.ConnectionClosedError
            nc.stats["out_msgs"] += len(frames)
            nc.stats["out_bytes"] += sum(len(messages[i].data) for i in range(first, len(tokens)))
            # nats-py's publish, for a whole chunk: queue the frames, wake its flusher.
            await nc._send_command(b"".join(frames))
            if nc._flush_queue is not None and nc._flush_queue.empty():
                await nc._flush_pending()
        except NATS_ERRORS as exc:
            log.debug("publishes from %s not sent: %s", messages[first].msg_id, exc)
            for token in tokens[first:]:
                acks.waiting.pop(token, None)
            acked.inflight -= len(tokens) - first
            del tokens[first:]
            return False
        return ok

    async def _pub_acks(self) -> _PubAcks:
        acks = self._acks
        if acks is None or acks.nc is not self.nc:
            acks = _PubAcks(self.nc)
            await acks.start()
            self._acks = acks
        return acks

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
    ) -> PullConsumer:
        config = ConsumerConfig(
            durable_name=durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            filter_subject=filter_subject,
            ack_wait=ack_wait,
            # The server's own limit sits one above ours so the agent, not the server, decides
            # when to give up: it dead-letters at max_deliver instead of silently dropping.
            max_deliver=max_deliver + 1,
            max_ack_pending=max_ack_pending,
            metadata=metadata,
        )
        await translated(f"add consumer {durable}", self.js.add_consumer(stream, config))
        sub = await translated(
            f"bind consumer {durable}", self.js.pull_subscribe_bind(durable=durable, stream=stream)
        )
        next_subject = f"{self._api_prefix}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        _take_queued_without_waiting(sub)
        return PullConsumer(sub, durable, denials=self.nc.denials, next_subject=next_subject)

    async def key_value(
        self,
        name: str,
        *,
        history: int = 1,
        replicas: int = 1,
        memory: bool = False,
        create: bool = True,
        direct: bool = False,
    ) -> NatsBucket:
        with translate(f"open bucket {name}"):
            try:
                kv = await self.js.key_value(name)
            except nats.js.errors.BucketNotFoundError:
                if not create:
                    raise TransportError(f"KV bucket {name} does not exist") from None
                config = KeyValueConfig(
                    bucket=name,
                    history=history,
                    replicas=replicas,
                    storage=StorageType.MEMORY if memory else StorageType.FILE,
                    description=f"connector mesh: {name}",
                    # Direct gets name the key in the API subject: what read_key needs, so that
                    # a permission can allow reading one key and no other.
                    direct=direct,
                )
                try:
                    kv = await self.js.create_key_value(config)
                except nats.js.errors.APIError:
                    kv = await self.js.key_value(name)  # created meanwhile by another client
        return NatsBucket(kv, name)

    async def request(
        self, subject: str, data: bytes, *, timeout: float, headers: dict[str, str] | None = None
    ) -> Message:
        msg = await translated(
            f"request {subject}", self.nc.request(subject, data, timeout=timeout, headers=headers)
        )
        return Message(msg.subject, msg.data, dict(msg.headers or {}))

    async def read_key(self, bucket: str, key: str) -> Entry | None:
        what = f"KV {bucket}: read {key}"
        subject = f"{self._api_prefix}.DIRECT.GET.KV_{bucket}.$KV.{bucket}.{key}"
        try:
            msg = await self.request(subject, b"", timeout=self.cfg.request_timeout)
        except NoResponders:
            raise NotFound(f"{what}: no bucket {bucket} that allows direct gets on {self.where}") from None
        headers = msg.headers
        status = headers.get("Status", "")
        if status == "404":
            return None
        if status:
            why = f"{status} {headers.get('Description', '')}".rstrip()
            raise TransportError(f"{what}: the server answered {why}")
        if headers.get("KV-Operation") in ("DEL", "PURGE"):
            return None
        try:
            revision = int(headers.get("Nats-Sequence", "0"))
        except ValueError:
            raise TransportError(f"{what}: unreadable sequence {headers.get('Nats-Sequence')!r}") from None
        return Entry(key, msg.data, revision)

    async def subscribe(self, subject: str) -> Subscription:
        nc = self.nc
        with nc.denials.pending(subscribe=(subject,)) as pending:
            sub = await translated(f"subscribe {subject}", nc.subscribe(subject))
            try:
                await self._flush_subscription(subject)
                pending.check()
            except BaseException:
                await _unsubscribe(sub)
                raise
        return _NatsSubscription(sub, subject, nc.denials)

    async def _flush_subscription(self, subject: str) -> None:
        """Wait until the server has the subscription (and has said whether it refuses it: its
        error comes before the flush's answer)."""
        # Shielded (it is bounded): nats-py leaves a cancelled flush's PING future queued, and
        # the PONG that answers it then raises InvalidStateError in nats-py's read loop.
        # Two round trips: nats-server may send a subscription's refusal after the PONG of the
        # first (measured: 3 runs in 40), never after the second's (40 of 40). A refusal later
        # still is caught by serve() and Subscription.next() (refused_subscriptions).
        with anyio.CancelScope(shield=True):
            for _ in range(2):
                flush = self.nc.flush(timeout=max(1, int(self.cfg.request_timeout)))
                await translated(f"subscribe {subject}", flush)

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
        # No callback: nats-py would run it in a task of its own and swallow its errors.
        nc = self.nc
        # The refusal is watched for as long as it serves: the server may send it late.
        with nc.denials.pending(subscribe=(subject,)) as pending:
            sub = await translated(f"subscribe {subject}", nc.subscribe(subject, queue=queue))
            try:
                await self._flush_subscription(subject)
                pending.check()
            except BaseException:
                await _unsubscribe(sub)
                raise
            try:
                with pending.scope:
                    task_status.started()
                    slots = anyio.Semaphore(max_concurrent) if max_concurrent > 1 else None
                    answered = 0
                    async with anyio.create_task_group() as tg:
                        async for msg in _QueuedFirst(sub):
                            if quick is not None:
                                request = Message(msg.subject, msg.data, dict(msg.headers or {}))
                                reply = quick_reply(quick, request)
                                if reply is not None:
                                    if msg.reply:
                                        with contextlib.suppress(*NATS_ERRORS):
                                            await msg.respond(reply)  # queued: one write for the burst
                                    answered += 1
                                    if answered % _QUICK_TURN == 0:
                                        await anyio.lowlevel.checkpoint()  # others get their turn
                                    continue
                            if max_concurrent == 1:
                                await self._answer(handler, msg)
                            elif slots is None:
                                tg.start_soon(self._answer, handler, msg)
                            else:
                                try:  # a free slot: no yield, so a burst's replies go out in one write
                                    slots.acquire_nowait()
                                except anyio.WouldBlock:
                                    await slots.acquire()
                                tg.start_soon(self._answer_released, handler, msg, slots)
                pending.check()
                raise TransportError(f"subscription {subject} ended")  # the connection was closed
            finally:
                quiet = contextlib.suppress(*NATS_ERRORS)
                with anyio.CancelScope(shield=True), anyio.move_on_after(2), quiet:
                    await sub.unsubscribe()

    @classmethod
    async def _answer_released(cls, handler: Handler, msg: Msg, slots: anyio.Semaphore) -> None:
        try:
            await cls._answer(handler, msg)
        finally:
            slots.release()

    @staticmethod
    async def _answer(handler: Handler, msg: Msg) -> None:
        try:
            reply = await handler(Message(msg.subject, msg.data, dict(msg.headers or {})))
        except Exception:
            log.exception("request on %s failed; no reply", msg.subject)
            return
        if msg.reply:
            with contextlib.suppress(*NATS_ERRORS):
                await msg.respond(reply)
