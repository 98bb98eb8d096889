"""JetStream transport: one owned NATS connection, idempotent stream/consumer setup,
windowed publish with ``Nats-Msg-Id``, and pull consumption with explicit acks.

Guarantees:

* **At-least-once.** :meth:`JetStream.publish_many` returns, per message, whether the server
  acknowledged it (PubAck); only those may be removed from the outbox (I3). A message may be
  stored twice if its ack was lost; JetStream drops the copy inside the duplicate window because
  ``Nats-Msg-Id`` is the envelope's deterministic id.
* **Everything is bounded.** Every publish and every JetStream API call has a timeout (nats-py's
  ``publish_async`` can leave a future unresolved forever, so it is not used).
* **The connection never gives up**: infinite reconnect; the agent keeps capturing into its
  outbox while NATS is away.
* Redelivery counts come from the server (``num_delivered``), never from memory.

Foreign exceptions (nats-py's) are translated to :class:`~mesh.errors.TransportError` here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import anyio
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from mesh.config import NatsConfig, StreamsConfig
from mesh.envelope import CONTENT_TYPE
from mesh.errors import ConfigError, TransportError

__all__ = [
    "DLQ_STREAM",
    "EVENTS_STREAM",
    "Delivery",
    "JetStream",
    "OutMessage",
    "PullConsumer",
    "dlq_subject",
    "event_subject",
]

log = logging.getLogger(__name__)

EVENTS_STREAM = "MESH_EVENTS"
COMMANDS_STREAM = "MESH_COMMANDS"
DLQ_STREAM = "MESH_DLQ"
AUDIT_STREAM = "MESH_AUDIT"

_NATS_ERRORS = (nats.errors.Error, nats.js.errors.Error, TimeoutError, OSError)


def event_subject(entity: str, event: str, origin: str) -> str:
    """``evt.<entity>.<event>.<origin>`` (DESIGN §4)."""
    return f"evt.{entity}.{event}.{origin}"


def dlq_subject(flow: str) -> str:
    return f"dlq.{flow}"


@dataclass(frozen=True, slots=True)
class OutMessage:
    subject: str
    data: bytes
    msg_id: str
    headers: dict[str, str] = field(default_factory=dict)


class Delivery:
    """One message delivered by a pull consumer. Settle it exactly once: ack, nak or term."""

    __slots__ = ("_msg",)

    def __init__(self, msg: Msg) -> None:
        self._msg = msg

    def __repr__(self) -> str:
        return f"<Delivery {self.subject} seq={self.stream_seq} delivered={self.num_delivered}>"

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
        """How many times the server has delivered this message (1 on the first delivery)."""
        return int(self._msg.metadata.num_delivered)

    @property
    def stream_seq(self) -> int:
        return int(self._msg.metadata.sequence.stream)

    async def ack(self) -> None:
        await _translate(self._msg.ack())

    async def nak(self, delay: float | None = None) -> None:
        await _translate(self._msg.nak(delay=delay))

    async def term(self) -> None:
        await _translate(self._msg.term())


async def _translate(coro: Any) -> Any:
    try:
        return await coro
    except nats.js.errors.APIError as exc:
        raise TransportError(f"JetStream refused: {exc.description or exc}") from exc
    except _NATS_ERRORS as exc:
        raise TransportError(f"NATS: {type(exc).__name__}: {exc}") from exc


class PullConsumer:
    """A durable pull consumer bound to one (flow, sink); several agent replicas may share it."""

    def __init__(self, sub: JetStreamContext.PullSubscription, name: str) -> None:
        self._sub = sub
        self.name = name

    def __repr__(self) -> str:
        return f"<PullConsumer {self.name}>"

    async def fetch(self, batch: int, timeout: float) -> list[Delivery]:
        """Up to ``batch`` messages; an empty list when none arrived within ``timeout``.

        Raises:
            TransportError: the connection is down or the consumer is gone.
        """
        try:
            msgs = await self._sub.fetch(batch, timeout=timeout)
        except (nats.errors.TimeoutError, TimeoutError, nats.js.errors.FetchTimeoutError):
            return []
        except _NATS_ERRORS as exc:
            raise TransportError(f"fetch from {self.name}: {type(exc).__name__}: {exc}") from exc
        return [Delivery(m) for m in msgs]

    async def pending(self) -> int:
        """Messages not yet delivered plus delivered but unacked (the consumer's backlog)."""
        info = await _translate(self._sub.consumer_info())
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    async def aclose(self) -> None:
        """Drop this binding (the durable consumer stays on the server). Best effort, bounded."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(2), contextlib.suppress(*_NATS_ERRORS):
            await self._sub.unsubscribe()


class JetStream:
    """Owns one NATS connection and everything nats-py spawns for it.

    Use as ``async with JetStream(cfg, name=...) as js``. ``connect()`` raises
    :class:`TransportError` when no server answers; once connected, nats-py reconnects forever.
    """

    def __init__(self, cfg: NatsConfig, *, name: str, domain: str | None = None) -> None:
        self.cfg = cfg
        self.name = name
        self.domain = domain
        """JetStream domain to address (``$JS.<domain>.API``); None: the server's own."""
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._windowed: dict[int, JetStreamContext] = {}
        self._closing = False
        self.connected = anyio.Event()
        self.reconnects = 0

    def __repr__(self) -> str:
        state = "connected" if self._nc is not None and self._nc.is_connected else "disconnected"
        return f"<JetStream {self.name} {state} servers={self.cfg.servers}>"

    @property
    def is_connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _password(self) -> str | None:
        if self.cfg.password_env is None:
            return None
        value = os.environ.get(self.cfg.password_env)
        if value is None:
            raise ConfigError(f"nats.password_env: environment variable {self.cfg.password_env} is not set")
        return value

    async def connect(self) -> None:
        last_logged = [0.0]

        async def on_error(exc: Exception) -> None:
            # During an outage nats-py reports every reconnect attempt; one line per 30 s is enough.
            now = anyio.current_time()
            if now - last_logged[0] >= 30:
                last_logged[0] = now
                log.warning("nats %s: %s: %s", self.name, type(exc).__name__, exc)

        async def on_disconnect() -> None:
            if not self._closing:
                log.warning("nats %s: disconnected", self.name)

        async def on_reconnect() -> None:
            self.reconnects += 1
            log.info("nats %s: reconnected", self.name)

        try:
            self._nc = await nats.connect(
                self.cfg.servers,
                name=self.name,
                user=self.cfg.user,
                password=self._password(),
                connect_timeout=max(1, int(self.cfg.connect_timeout)),
                allow_reconnect=True,
                # Bounded for the first connect (nats-py would otherwise loop here forever);
                # the caller decides whether to try again.
                max_reconnect_attempts=1,
                reconnect_time_wait=0.5,
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
            )
        except _NATS_ERRORS as exc:
            raise TransportError(
                f"cannot connect to {self.cfg.servers}: {exc or type(exc).__name__}"
            ) from exc
        # Once connected, never give up reconnecting (the default stops after ~2 minutes).
        self._nc.options["max_reconnect_attempts"] = -1
        self._js = self._nc.jetstream(timeout=self.cfg.request_timeout, domain=self.domain)
        self.connected.set()

    async def aclose(self) -> None:
        """Flush and close the connection (and nats-py's tasks). Idempotent."""
        self._closing = True
        nc, self._nc = self._nc, None
        self._js = None
        self._windowed.clear()
        if nc is None or nc.is_closed:
            return
        with anyio.move_on_after(5, shield=True):
            with contextlib.suppress(*_NATS_ERRORS):
                await nc.close()

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise TransportError("not connected")
        return self._js

    @property
    def nc(self) -> Client:
        if self._nc is None:
            raise TransportError("not connected")
        return self._nc

    async def ensure_streams(self, cfg: StreamsConfig) -> None:
        """Create or update the mesh streams. Idempotent; safe from many agents at once.

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
        ]
        jsm = self.js
        for sc in streams:
            try:
                await jsm.add_stream(sc)
            except nats.js.errors.BadRequestError:
                # Exists with another config (err 10058): bring it to ours.
                current = await _translate(jsm.stream_info(str(sc.name)))
                if current.config.sources:
                    sc = dataclasses.replace(sc, sources=current.config.sources)
                await _translate(jsm.update_stream(sc))
            except _NATS_ERRORS as exc:
                raise TransportError(f"ensure stream {sc.name}: {exc}") from exc

    async def publish(self, msg: OutMessage) -> int:
        """Publish one message and wait for its PubAck (bounded). Returns the stream sequence."""
        headers = {"Nats-Msg-Id": msg.msg_id, "Content-Type": CONTENT_TYPE, **msg.headers}
        ack = await _translate(
            self.js.publish(msg.subject, msg.data, timeout=self.cfg.request_timeout, headers=headers)
        )
        return int(ack.seq)

    async def publish_many(self, messages: Sequence[OutMessage], window: int) -> list[bool]:
        """Publish with at most ``window`` unacknowledged at a time; True where PubAck arrived.

        Acks arrive on one wildcard subscription (nats-py's ``publish_async``) instead of one
        request per message. nats-py can leave such a future unresolved forever (nats.py #985),
        so every ack is bounded: a publish stalled longer than ``request_timeout`` for a window
        slot, or an ack not back within ``request_timeout`` of the last send, counts as not
        acked. Never raises for a failed message: the caller keeps the unacked ones and retries.
        """
        if not messages:
            return []
        js = self._window_js(window)
        timeout = self.cfg.request_timeout
        futures: list[asyncio.Future[Any]] = []
        try:
            for m in messages:
                if not self.is_connected:
                    break
                headers = {"Nats-Msg-Id": m.msg_id, "Content-Type": CONTENT_TYPE, **m.headers}
                try:
                    fut = await js.publish_async(m.subject, m.data, wait_stall=timeout, headers=headers)
                except _NATS_ERRORS as exc:
                    log.debug("publish %s not sent: %s", m.msg_id, exc)
                    break
                futures.append(fut)
            with anyio.move_on_after(timeout):
                for fut in futures:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(fut)
        finally:
            for fut in futures:
                if not fut.done():
                    fut.cancel()  # releases its window slot in nats-py
        results = [False] * len(messages)
        for i, fut in enumerate(futures):
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                results[i] = True
        return results

    def _window_js(self, window: int) -> JetStreamContext:
        js = self._windowed.get(window)
        if js is None:
            js = self.nc.jetstream(
                timeout=self.cfg.request_timeout, publish_async_max_pending=window, domain=self.domain
            )
            self._windowed[window] = js
        return js

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
        """Create (or update to this config) a durable pull consumer and bind to it."""
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
        await _translate(self.js.add_consumer(stream, config))
        sub = await _translate(self.js.pull_subscribe_bind(durable=durable, stream=stream))
        return PullConsumer(sub, durable)
