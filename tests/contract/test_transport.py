"""The Transport contract: one suite, run against JetStream (a real nats-server) and memory.

Both implementations must behave the same wherever the delivery path depends on it: dedupe by
msg id, order, ack / nak / term and the server's delivery counts, ack_wait redelivery,
max_deliver, pending, KV compare-and-swap and watch, request/reply, reconnect, close; and the
operator's view of a stream: stream and consumer snapshots, reading stored messages without
consuming them, deleting and purging, consumer reset.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from mesh.config import StreamsConfig
from mesh.errors import TransportError
from mesh.transport import (
    EVENTS_STREAM,
    Consumer,
    Entry,
    JetStream,
    KvUpdate,
    MemoryBroker,
    MemoryTransport,
    Message,
    NoReply,
    NoResponders,
    NotFound,
    OutMessage,
    RevisionConflict,
    Transport,
)
from tests._secure import SecuredNatsServer as NatsServer

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

SUBJECT = "evt.customer.upserted.erp"


class Backend:
    """Makes clients of one broker and can take the broker away for a moment."""

    def client(self, name: str) -> Transport:
        raise NotImplementedError

    async def outage(self, clients: list[Transport]) -> None:
        """Break every client's connection and bring the broker back (same state)."""
        raise NotImplementedError


class MemoryBackend(Backend):
    def __init__(self) -> None:
        self.broker = MemoryBroker()

    def client(self, name: str) -> Transport:
        return MemoryTransport(self.broker, name=name)

    async def outage(self, clients: list[Transport]) -> None:
        for c in clients:
            assert isinstance(c, MemoryTransport)
            c.disconnect()
        with pytest.raises(TransportError):
            await clients[0].publish(OutMessage(SUBJECT, b"x", "during-outage"))
        for c in clients:
            assert isinstance(c, MemoryTransport)
            c.restore()


class JetStreamBackend(Backend):
    def __init__(self, server: NatsServer) -> None:
        self.server = server

    def client(self, name: str) -> Transport:
        return JetStream(self.server.nats_config(request_timeout=2.0), name=name)

    async def outage(self, clients: list[Transport]) -> None:
        before = [c.reconnects for c in clients]
        await anyio.to_thread.run_sync(self.server.restart)
        with anyio.fail_after(20):
            while not all(c.is_connected and c.reconnects > b for c, b in zip(clients, before, strict=True)):
                await anyio.sleep(0.05)


@pytest.fixture(params=["memory", pytest.param("jetstream", marks=pytest.mark.integration)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "memory":
        return MemoryBackend()
    return JetStreamBackend(request.getfixturevalue("nats_server"))


@pytest.fixture
async def transport(backend: Backend) -> AsyncIterator[Transport]:
    async with backend.client("contract") as t:
        await t.ensure_streams(StreamsConfig(storage="memory"))
        yield t


async def consumer(t: Transport, *, ack_wait: float = 30, max_deliver: int = 5, name: str = "c") -> Consumer:
    return await t.pull_consumer(
        durable=name, filter_subject="evt.customer.>", ack_wait=ack_wait, max_deliver=max_deliver,
        max_ack_pending=1000,
    )  # fmt: skip


def msg(i: int, subject: str = SUBJECT) -> OutMessage:
    return OutMessage(subject, f"m{i}".encode(), f"id-{i}", {"Mesh-Test": str(i)})


# --- publish --------------------------------------------------------------------------------------


async def test_publish_dedupes_by_msg_id_and_keeps_order(transport: Transport) -> None:
    seqs = [await transport.publish(msg(i)) for i in range(3)]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == 3
    assert await transport.publish(msg(1)) == seqs[1]  # a republish inside the window: the original
    assert await transport.publish_many([msg(i) for i in range(6)], window=4) == [True] * 6
    c = await consumer(transport)
    assert await c.pending() == 6
    got = await c.fetch(10, timeout=2)
    assert [d.data for d in got] == [f"m{i}".encode() for i in range(6)]
    assert [d.stream_seq for d in got][:3] == seqs
    assert got[0].headers["Nats-Msg-Id"] == "id-0"
    assert got[0].headers["Mesh-Test"] == "0"
    assert got[0].subject == SUBJECT


async def test_publish_to_a_subject_no_stream_stores_raises(transport: Transport) -> None:
    with pytest.raises(TransportError):
        await transport.publish(OutMessage("nowhere.at.all", b"x", "n1"))
    stray = OutMessage("nowhere.at.all", b"x", "n2")
    assert await transport.publish_many([stray, msg(1)], 8) == [False, True]


# --- consume --------------------------------------------------------------------------------------


async def test_empty_fetch_is_an_empty_list(transport: Transport) -> None:
    c = await consumer(transport)
    assert await c.fetch(10, timeout=0.2) == []
    assert await c.pending() == 0


async def test_ack_nak_term_and_delivery_counts(transport: Transport) -> None:
    c = await consumer(transport)
    for i in range(3):
        await transport.publish(msg(i))
    got = await c.fetch(10, timeout=2)
    assert [(d.data, d.num_delivered) for d in got] == [(b"m0", 1), (b"m1", 1), (b"m2", 1)]
    await got[0].ack()
    await got[1].nak(delay=0.2)
    await got[2].term()
    again = await c.fetch(10, timeout=3)
    assert [(d.data, d.num_delivered) for d in again] == [(b"m1", 2)]
    await again[0].ack()
    assert await c.fetch(10, timeout=0.3) == []
    await eventually(lambda: c.pending(), 0)


async def test_ack_many_settles_each_delivery_it_is_given(transport: Transport) -> None:
    c = await consumer(transport, ack_wait=1)
    assert await transport.publish_many([msg(i) for i in range(50)], window=64) == [True] * 50
    got = await c.fetch(100, timeout=2)
    assert len(got) == 50
    await c.ack_many(got[:40])
    await c.ack_many([])
    await eventually(lambda: c.pending(), 10)  # acks are sent, not confirmed
    again = await c.fetch(100, timeout=5)  # the ten not acked, back after ack_wait
    assert [(d.data, d.num_delivered) for d in again] == [(f"m{i}".encode(), 2) for i in range(40, 50)]
    await c.ack_many(again)
    await eventually(lambda: c.pending(), 0)
    assert await c.fetch(100, timeout=1.5) == []  # past ack_wait: nothing comes back


async def test_unacked_message_is_redelivered_after_ack_wait(transport: Transport) -> None:
    c = await consumer(transport, ack_wait=0.5)
    await transport.publish(msg(0))
    first = await c.fetch(1, timeout=2)
    assert [d.num_delivered for d in first] == [1]
    again = await c.fetch(1, timeout=5)  # not settled: back after ack_wait
    assert [(d.data, d.num_delivered) for d in again] == [(b"m0", 2)]
    await again[0].ack()


async def test_delivered_at_most_max_deliver_plus_one_times(transport: Transport) -> None:
    c = await consumer(transport, max_deliver=2)
    await transport.publish(msg(0))
    counts = []
    while got := await c.fetch(1, timeout=1.0):
        counts.append(got[0].num_delivered)
        await got[0].nak()
    assert counts == [1, 2, 3]  # the caller gives up at max_deliver; the broker one later


async def test_pending_counts_undelivered_and_unsettled(transport: Transport) -> None:
    c = await consumer(transport)
    for i in range(5):
        await transport.publish(msg(i))
    await transport.publish(msg(9, "evt.product.upserted.erp"))  # not this consumer's
    assert await c.pending() == 5
    got = await c.fetch(2, timeout=2)
    assert await c.pending() == 5  # delivered but not settled still counts
    await got[0].ack()
    await got[1].term()
    await eventually(lambda: c.pending(), 3)  # acks are sent, not confirmed


async def eventually(read: Callable[[], Awaitable[object]], want: object) -> None:
    """Wait (bounded) until ``read()`` returns ``want``."""
    with anyio.fail_after(10):
        while (got := await read()) != want:
            del got
            await anyio.sleep(0.02)


async def test_durable_state_is_shared_by_name(transport: Transport, backend: Backend) -> None:
    c1 = await consumer(transport, name="shared")
    for i in range(4):
        await transport.publish(msg(i))
    first = await c1.fetch(2, timeout=2)
    for d in first:
        await d.ack()
    async with backend.client("other") as other:
        c2 = await consumer(other, name="shared")
        rest = await c2.fetch(10, timeout=2)
        assert [d.data for d in rest] == [b"m2", b"m3"]
        for d in rest:
            await d.ack()
        await c2.aclose()
    await c1.aclose()


# --- KV -------------------------------------------------------------------------------------------


async def test_kv_compare_and_swap(transport: Transport) -> None:
    b = await transport.key_value("contract_kv", history=2, memory=True)
    assert await b.get("k") is None
    r1 = await b.create("k", b"one")
    with pytest.raises(RevisionConflict):
        await b.create("k", b"again")
    r2 = await b.update("k", b"two", r1)
    assert r2 > r1
    with pytest.raises(RevisionConflict):
        await b.update("k", b"stale", r1)
    entry = await b.get("k")
    assert entry is not None
    assert (entry.value, entry.revision) == (b"two", r2)
    with pytest.raises(RevisionConflict):
        await b.delete("k", revision=r1)
    await b.delete("k", revision=r2)
    assert await b.get("k") is None
    r3 = await b.create("k", b"three")  # a deleted key may be created again
    assert r3 > r2
    assert await b.put("k", b"four") > r3
    same = await transport.key_value("contract_kv")  # opening again: the same data
    got = await same.get("k")
    assert got is not None
    assert got.value == b"four"


async def test_kv_put_many_stores_each_and_answers_its_revision(transport: Transport) -> None:
    b = await transport.key_value("contract_many", history=1, memory=True)
    first = await b.put("a", b"0")
    revisions = await b.put_many([(f"k{i}", b"v%d" % i) for i in range(50)] + [("a", b"1")])
    assert all(r is not None for r in revisions)
    known = [r for r in revisions if r is not None]
    assert known == sorted(known)
    assert len(set(known)) == 51
    assert known[0] > first
    for i in (0, 49):
        got = await b.get(f"k{i}")
        assert got is not None
        assert (got.value, got.revision) == (b"v%d" % i, revisions[i])
    latest = await b.get("a")
    assert latest is not None
    assert (latest.value, latest.revision) == (b"1", revisions[-1])
    assert await b.put_many([]) == []


async def test_kv_missing_bucket_without_create_raises(transport: Transport) -> None:
    with pytest.raises(TransportError):
        await transport.key_value("contract_absent", create=False)


async def test_kv_watch_gives_current_values_then_changes(transport: Transport) -> None:
    b = await transport.key_value("contract_watch", memory=True)
    ra = await b.put("a", b"1")
    async with await b.watch() as w:
        seen = [await _next(w.next), await _next(w.next)]
        assert seen == [KvUpdate("put", "a", b"1", ra), KvUpdate("loaded")]
        rb = await b.put("b", b"2")
        assert await _next(w.next) == KvUpdate("put", "b", b"2", rb)
        await b.delete("a")
        update = await _next(w.next)
        assert (update.op, update.key) == ("delete", "a")
        assert update.revision > rb


async def test_kv_watch_of_some_keys_gives_only_those(transport: Transport) -> None:
    b = await transport.key_value("contract_some", memory=True)
    await b.put("agent.a", b"1")
    await b.put("agent.b", b"2")
    async with await b.watch("agent.b") as w:
        assert (await _next(w.next)).key == "agent.b"
        assert (await _next(w.next)).op == "loaded"
        await b.put("agent.a", b"3")
        rb = await b.put("agent.b", b"4")
        assert await _next(w.next) == KvUpdate("put", "agent.b", b"4", rb)


async def test_kv_watch_of_an_empty_bucket_says_loaded(transport: Transport) -> None:
    b = await transport.key_value("contract_empty", memory=True)
    async with await b.watch() as w:
        assert await _next(w.next) == KvUpdate("loaded")


async def test_read_key_gives_the_live_value_or_none(transport: Transport) -> None:
    bucket = await transport.key_value("kv_direct", direct=True)
    assert await transport.read_key("kv_direct", "agent.a") is None
    other = await bucket.put("agent.b", b"other")
    rev = await bucket.put("agent.a", b"one")
    assert await transport.read_key("kv_direct", "agent.a") == Entry("agent.a", b"one", rev)
    rev = await bucket.put("agent.a", b"two")
    assert await transport.read_key("kv_direct", "agent.a") == Entry("agent.a", b"two", rev)
    await bucket.delete("agent.a")
    assert await transport.read_key("kv_direct", "agent.a") is None  # a delete marker is no value
    assert await transport.read_key("kv_direct", "agent.b") == Entry("agent.b", b"other", other)
    with pytest.raises(NotFound):
        await transport.read_key("kv_nowhere", "agent.a")


async def test_subscribe_gets_each_message_on_its_subject_from_then_on(transport: Transport) -> None:
    bucket = await transport.key_value("kv_follow", direct=True)
    await bucket.put("agent.a", b"before")  # before the subscription: not delivered
    async with await transport.subscribe("$KV.kv_follow.agent.a") as sub:
        assert await sub.next(timeout=0.2) is None
        await bucket.put("agent.b", b"not mine")
        await bucket.put("agent.a", b"one")
        got = await sub.next(timeout=5)
        assert got is not None
        assert (got.subject, got.data) == ("$KV.kv_follow.agent.a", b"one")
        await bucket.delete("agent.a")
        got = await sub.next(timeout=5)
        assert got is not None
        assert got.headers.get("KV-Operation") == "DEL"
        assert await sub.next(timeout=0.2) is None


async def _next(next_: Callable[[float], object]) -> KvUpdate:
    with anyio.fail_after(10):
        while True:
            update = await next_(1.0)  # type: ignore[misc]
            if update is not None:
                assert isinstance(update, KvUpdate)
                return update


# --- request / reply ------------------------------------------------------------------------------


async def test_request_reply_and_no_responders(transport: Transport) -> None:
    with pytest.raises(NoResponders):
        await transport.request("svc.echo", b"x", timeout=2)

    async def echo(m: Message) -> bytes:
        return m.subject.encode() + b":" + m.data

    async def fail(m: Message) -> bytes:
        raise ValueError("broken handler")

    async with anyio.create_task_group() as tg:
        await tg.start(transport.serve, "svc.*", echo)
        reply = await transport.request("svc.echo", b"hi", timeout=2)
        assert reply.data == b"svc.echo:hi"
        await tg.start(transport.serve, "bad.one", fail)
        with pytest.raises(NoReply):  # no reply: the caller times out, nothing hangs
            await transport.request("bad.one", b"x", timeout=0.5)
        tg.cancel_scope.cancel()
    with pytest.raises(NoResponders):  # served only while the serving task runs
        await transport.request("svc.echo", b"x", timeout=2)


async def test_quick_answers_first_and_hands_the_rest_to_the_handler(transport: Transport) -> None:
    handled: list[bytes] = []

    def quick(m: Message) -> bytes | None:
        if m.data == b"boom":
            raise ValueError("broken quick answer")  # logged; the handler answers instead
        return b"quick:" + m.data if m.data.startswith(b"q") else None

    async def slow(m: Message) -> bytes:
        handled.append(m.data)
        await anyio.lowlevel.checkpoint()
        return b"slow:" + m.data

    async with anyio.create_task_group() as tg:
        await tg.start(functools.partial(transport.serve, "qsvc.*", slow, max_concurrent=1, quick=quick))
        replies: dict[bytes, bytes] = {}

        async def ask(body: bytes) -> None:
            replies[body] = (await transport.request("qsvc.x", body, timeout=5)).data

        async with anyio.create_task_group() as burst:  # a burst, answered in any order
            for body in [b"q%d" % i for i in range(100)] + [b"s1", b"boom", b"s2"]:
                burst.start_soon(ask, body)
        assert all(replies[b"q%d" % i] == b"quick:q%d" % i for i in range(100))
        assert (replies[b"s1"], replies[b"boom"], replies[b"s2"]) == (b"slow:s1", b"slow:boom", b"slow:s2")
        assert sorted(handled) == [b"boom", b"s1", b"s2"]  # only what quick left
        tg.cancel_scope.cancel()


# --- connection -----------------------------------------------------------------------------------


async def test_reconnects_after_an_outage_and_keeps_durable_state(backend: Backend) -> None:
    async with backend.client("a") as t:
        await t.ensure_streams(StreamsConfig())
        c = await consumer(t, name="survivor")
        await t.publish(msg(0))
        got = await c.fetch(1, timeout=2)
        await got[0].ack()
        await backend.outage([t])
        assert t.is_connected
        await t.publish(msg(1))
        c = await consumer(t, name="survivor")
        again = await c.fetch(10, timeout=3)
        assert [d.data for d in again] == [b"m1"]  # m0 stays acked across the outage
        await again[0].ack()


async def test_reconnect_on_demand_keeps_subscriptions_and_consumers(transport: Transport) -> None:
    before = transport.reconnects
    c = await consumer(transport, name="kept")
    await transport.publish(msg(0))
    bucket = await transport.key_value("kv_again", direct=True)
    async with await transport.subscribe("$KV.kv_again.k") as sub:
        await transport.reconnect()
        assert transport.is_connected
        assert transport.reconnects == before + 1
        await bucket.put("k", b"after")
        got = await sub.next(timeout=5)
        assert got is not None
        assert got.data == b"after"
    delivered = await c.fetch(5, timeout=2)
    assert [d.data for d in delivered] == [b"m0"]


async def test_close_is_idempotent_and_final(backend: Backend) -> None:
    t = backend.client("closing")
    async with t:
        await t.ensure_streams(StreamsConfig(storage="memory"))
        assert t.is_connected
    await t.aclose()
    await t.aclose()
    assert not t.is_connected
    with pytest.raises(TransportError):
        await t.publish(msg(0))


async def test_consumer_on_a_missing_stream_raises(transport: Transport) -> None:
    with pytest.raises(TransportError):
        await transport.pull_consumer(
            durable="x", filter_subject="evt.>", ack_wait=1, max_deliver=1, max_ack_pending=1,
            stream="NO_SUCH_STREAM",
        )  # fmt: skip
    assert EVENTS_STREAM  # the default stream exists (used by every other test)


# --- reading and operating on a stream ------------------------------------------------------------

PRODUCT = "evt.product.upserted.erp"


async def test_publish_ack_says_whether_it_was_a_duplicate(transport: Transport) -> None:
    first = await transport.publish_ack(msg(0))
    again = await transport.publish_ack(msg(0))
    assert (first.stream, first.duplicate) == (EVENTS_STREAM, False)
    assert (again.seq, again.duplicate) == (first.seq, True)
    with pytest.raises(NoResponders):
        await transport.publish_ack(OutMessage("nowhere.at.all", b"x", "n1"))


async def test_stream_info_counts_messages_per_subject(transport: Transport) -> None:
    for i in range(3):
        await transport.publish(msg(i))
    await transport.publish(msg(3, PRODUCT))
    info = await transport.stream_info(EVENTS_STREAM, subjects_filter="evt.customer.>")
    assert (info.name, info.first_seq, info.last_seq, info.messages) == (EVENTS_STREAM, 1, 4, 4)
    assert info.subjects == {SUBJECT: 3}
    assert (await transport.stream_info(EVENTS_STREAM)).subjects == {}
    with pytest.raises(NotFound):
        await transport.stream_info("NO_SUCH_STREAM")


async def test_get_message_by_seq_by_subject_by_time_and_last(transport: Transport) -> None:
    await transport.publish(msg(0))
    await transport.publish(msg(1, PRODUCT))
    await transport.publish(msg(2))
    one = await transport.get_message(EVENTS_STREAM, seq=2)
    assert one is not None
    assert (one.seq, one.subject, one.data) == (2, PRODUCT, b"m1")
    assert one.headers["Mesh-Test"] == "1"
    assert one.headers["Nats-Msg-Id"] == "id-1"
    assert one.time.tzinfo is not None
    assert abs(one.time - datetime.now(UTC)) < timedelta(minutes=5)
    nxt = await transport.get_message(EVENTS_STREAM, seq=2, subject="evt.customer.>")
    assert nxt is not None
    assert nxt.seq == 3
    last = await transport.get_message(EVENTS_STREAM, subject="evt.customer.>", last=True)
    assert last is not None
    assert last.seq == 3
    since = await transport.get_message(EVENTS_STREAM, subject=">", since=one.time - timedelta(hours=1))
    assert since is not None
    assert since.seq == 1
    assert (
        await transport.get_message(EVENTS_STREAM, subject=">", since=datetime.now(UTC) + timedelta(hours=1))
        is None
    )
    assert await transport.get_message(EVENTS_STREAM, seq=4, subject=">") is None
    assert await transport.get_message(EVENTS_STREAM, seq=99) is None
    with pytest.raises(ValueError, match="sequence"):
        await transport.get_message(EVENTS_STREAM)
    with pytest.raises(NotFound):
        await transport.get_message("NO_SUCH_STREAM", seq=1)


async def test_delete_and_purge(transport: Transport) -> None:
    for i in range(5):
        await transport.publish(msg(i))
    assert await transport.delete_message(EVENTS_STREAM, 2) is True
    assert await transport.delete_message(EVENTS_STREAM, 2) is False
    assert await transport.get_message(EVENTS_STREAM, seq=2) is None
    assert await transport.purge(EVENTS_STREAM, up_to_seq=3) == 2  # 1 and 3; 2 was gone
    info = await transport.stream_info(EVENTS_STREAM)
    assert (info.first_seq, info.last_seq, info.messages) == (4, 5, 2)
    assert await transport.purge("NO_SUCH_STREAM", up_to_seq=3) == 0


async def test_a_deleted_message_is_not_redelivered(transport: Transport) -> None:
    c = await consumer(transport, ack_wait=0.5)
    await transport.publish(msg(0))
    await transport.publish(msg(1))
    first = await c.fetch(2, timeout=2)
    assert [d.stream_seq for d in first] == [1, 2]
    await first[1].ack()
    assert await transport.delete_message(EVENTS_STREAM, 1)
    assert await c.fetch(2, timeout=1.5) == []  # past ack_wait: seq 1 would be back if it existed
    await eventually(lambda: c.pending(), 0)


async def test_read_stream_in_order_from_a_sequence_then_new_ones(transport: Transport) -> None:
    for i in range(4):
        await transport.publish(msg(i))
    await transport.publish(msg(4, PRODUCT))
    async with await transport.read_stream(EVENTS_STREAM, subject="evt.customer.>", start_seq=2) as reader:
        got = [await reader.next(timeout=5) for _ in range(3)]
        assert [(m.seq, m.data) for m in got if m is not None] == [(2, b"m1"), (3, b"m2"), (4, b"m3")]
        assert await reader.next(timeout=0.3) is None  # the product event is not on the filter
        await transport.publish(msg(5))
        new = await reader.next(timeout=5)
        assert new is not None
        assert (new.seq, new.subject, new.headers["Mesh-Test"]) == (6, SUBJECT, "5")
    assert await consumer(transport, name="after-read")  # a reader leaves no consumer behind
    assert [c.name for c in await transport.consumers(EVENTS_STREAM)] == ["after-read"]
    with pytest.raises(NotFound):
        await transport.read_stream("NO_SUCH_STREAM")


async def test_consumer_info_and_reset_redeliver_from_a_sequence(transport: Transport) -> None:
    c = await consumer(transport, name="resettable")
    for i in range(4):
        await transport.publish(msg(i))
    for d in await c.fetch(4, timeout=2):
        await d.ack()

    async def floor() -> int:
        return (await transport.consumer_info(EVENTS_STREAM, "resettable")).ack_floor

    await eventually(floor, 4)
    info = await transport.consumer_info(EVENTS_STREAM, "resettable")
    assert (info.name, info.stream, info.filter_subject) == ("resettable", EVENTS_STREAM, "evt.customer.>")
    assert (info.num_pending, info.num_ack_pending) == (0, 0)
    assert [s.name for s in await transport.consumers(EVENTS_STREAM)] == ["resettable"]
    assert await transport.reset_consumer(EVENTS_STREAM, "resettable", 3) == 3
    again = await c.fetch(10, timeout=2)
    assert [d.stream_seq for d in again] == [3, 4]
    with pytest.raises(NotFound):
        await transport.consumer_info(EVENTS_STREAM, "no-such-consumer")
    with pytest.raises(NotFound):
        await transport.reset_consumer(EVENTS_STREAM, "no-such-consumer", 1)
    with pytest.raises(NotFound):
        await transport.consumers("NO_SUCH_STREAM")
