"""JetStream transport against a real nats-server on a random loopback port."""

from __future__ import annotations

import anyio
import pytest

from mesh.broker import free_port
from mesh.config import NatsConfig, StreamsConfig
from mesh.errors import TransportError
from mesh.transport import EVENTS_STREAM, JetStream, OutMessage
from tests._secure import SecuredNatsServer as NatsServer

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


def cfg(server: NatsServer, **kw: object) -> NatsConfig:
    return server.nats_config(request_timeout=2.0, **kw)


async def test_streams_are_ensured_idempotently(nats_server: NatsServer) -> None:
    async with JetStream(cfg(nats_server), name="a") as a, JetStream(cfg(nats_server), name="b") as b:
        await a.ensure_streams(StreamsConfig())
        await b.ensure_streams(StreamsConfig())
        # a changed setting is applied to the existing stream, not refused
        await a.ensure_streams(StreamsConfig(duplicate_window=60))
        info = await a.js.stream_info(EVENTS_STREAM)
        assert info.config.duplicate_window == 60
        assert info.config.subjects == ["evt.>"]


async def test_publish_many_dedups_by_msg_id_and_acks_each(nats_server: NatsServer) -> None:
    async with JetStream(cfg(nats_server), name="p") as js:
        await js.ensure_streams(StreamsConfig())
        msgs = [OutMessage("evt.customer.upserted.erp", f"m{i}".encode(), f"id-{i}") for i in range(500)]
        assert all(await js.publish_many(msgs, window=64))
        # a republish of the same ids (a relay that crashed before deleting) is absorbed
        assert all(await js.publish_many(msgs[:100], window=64))
        info = await js.js.stream_info(EVENTS_STREAM)
        assert info.state.messages == 500


async def test_pull_consumer_ack_nak_term(nats_server: NatsServer) -> None:
    async with JetStream(cfg(nats_server), name="c") as js:
        await js.ensure_streams(StreamsConfig())
        consumer = await js.pull_consumer(
            durable="flow-sink", filter_subject="evt.customer.>", ack_wait=30, max_deliver=5,
            max_ack_pending=100,
        )  # fmt: skip
        assert await consumer.fetch(10, timeout=0.2) == []  # an empty fetch is not an error
        for i in range(3):
            await js.publish(OutMessage("evt.customer.upserted.erp", f"{i}".encode(), f"x{i}"))
        got = await consumer.fetch(10, timeout=2)
        assert [d.data for d in got] == [b"0", b"1", b"2"]
        assert all(d.num_delivered == 1 for d in got)
        assert got[0].headers["Nats-Msg-Id"] == "x0"
        await got[0].ack()
        await got[1].nak(delay=0.2)
        await got[2].term()
        again = await consumer.fetch(10, timeout=3)
        assert [(d.data, d.num_delivered) for d in again] == [(b"1", 2)]
        await again[0].ack()
        assert await consumer.fetch(10, timeout=0.5) == []
        # binding again (an agent restart) finds the same durable and its position
        consumer2 = await js.pull_consumer(
            durable="flow-sink", filter_subject="evt.customer.>", ack_wait=30, max_deliver=5,
            max_ack_pending=100,
        )  # fmt: skip
        assert await consumer2.fetch(10, timeout=0.3) == []
        assert await consumer2.pending() == 0


async def test_connect_to_nothing_is_a_transport_error() -> None:
    js = JetStream(NatsConfig(servers=[f"nats://127.0.0.1:{free_port()}"], connect_timeout=1), name="x")
    with pytest.raises(TransportError, match="cannot connect"):
        await js.connect()
    await js.aclose()


async def test_reconnects_after_broker_restart(nats_server: NatsServer) -> None:
    async with JetStream(cfg(nats_server), name="r") as js:
        await js.ensure_streams(StreamsConfig())
        await js.publish(OutMessage("evt.c.upserted.erp", b"before", "b1"))
        nats_server.kill()
        with pytest.raises(TransportError):
            await js.publish(OutMessage("evt.c.upserted.erp", b"during", "d1"))
        await anyio.to_thread.run_sync(nats_server.start)
        with anyio.fail_after(20):
            while True:
                try:
                    await js.publish(OutMessage("evt.c.upserted.erp", b"after", "a1"))
                    break
                except TransportError:
                    await anyio.sleep(0.2)
        info = await js.js.stream_info(EVENTS_STREAM)
        assert info.state.messages >= 2
        assert js.reconnects >= 1
