"""What keeps a control plane with thousands of agents responsive: heartbeats kept in memory and
stored in KV only when due, the leader's views reading them, mirror versions (the sweep's
reconciliation skips when nothing changed), metrics computed when scraped, and served
subscriptions taking queued messages without a task each."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import anyio
import msgspec
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

from mesh.controlplane.health import HealthPolicy
from mesh.controlplane.kv import Entry, KvMirror, MemoryBucket
from mesh.controlplane.metrics import ControlPlaneMetrics
from mesh.controlplane.models import (
    Deregister,
    FlowReport,
    FlowView,
    Heartbeat,
    HeartbeatAck,
    HeartbeatPayload,
    Refused,
    Register,
    Registered,
)
from mesh.controlplane.registry import Registry, heartbeat_key
from mesh.controlplane.status import StatusBuilder

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def beat(agent_id: str, token: str, seq: int, **payload: Any) -> Heartbeat:
    return Heartbeat(
        agent_id=agent_id, name="erp", credential=token, seq=seq, sent_at=0, interval=1, version="1",
        payload=HeartbeatPayload(**payload),
    )  # fmt: skip


async def registered(bucket: MemoryBucket, clock: Clock, **kw: Any) -> tuple[Registry, Registered, KvMirror]:
    mirror = KvMirror(None, bucket)  # type: ignore[arg-type]  # applied to by the registry only
    r = Registry(bucket, replica="cp", mirror=mirror, clock=clock, **kw)
    reg = await r.register(Register(name="erp", site="s", identity="i" * 43, version="1", host="h"))
    assert isinstance(reg, Registered)
    assert reg.credential
    return r, reg, mirror


async def stored_seq(bucket: MemoryBucket) -> int | None:
    entry = await bucket.get(heartbeat_key("erp"))
    return None if entry is None else int(entry.value.split(b'"seq":')[1].split(b",")[0])


async def test_heartbeats_are_stored_when_something_matters_or_every_store_every() -> None:
    bucket, clock = MemoryBucket(), Clock()
    r, reg, _ = await registered(bucket, clock, store_every=5.0)
    aid, tok = reg.agent_id, reg.credential
    assert tok is not None
    assert isinstance(await r.heartbeat(beat(aid, tok, 1)), HeartbeatAck)
    assert await stored_seq(bucket) == 1  # the first one this replica sees: stored
    clock.now += 1
    await r.heartbeat(beat(aid, tok, 2, outbox_depth=7))  # only counters moved
    assert await stored_seq(bucket) == 1
    assert r.latest["erp"].seq == 2  # kept in memory
    clock.now += 1
    await r.heartbeat(beat(aid, tok, 3, health="degraded", detail="NATS away"))
    assert await stored_seq(bucket) == 3  # the agent's own verdict changed: at once
    clock.now += 1
    await r.heartbeat(beat(aid, tok, 4, health="degraded", detail="NATS away"))
    assert await stored_seq(bucket) == 3
    clock.now += 1
    await r.heartbeat(beat(aid, tok, 5, errors=2))  # back to ok and errors grew
    assert await stored_seq(bucket) == 5
    assert r.latest["erp"].errors_delta == 2
    clock.now += 1
    await r.heartbeat(beat(aid, tok, 6, errors=2))  # no new errors: that changes the verdict
    assert await stored_seq(bucket) == 6
    assert r.latest["erp"].errors_delta == 0
    clock.now += 1
    await r.heartbeat(beat(aid, tok, 7, errors=2, flows=[FlowReport(name="f", state="paused")]))
    assert await stored_seq(bucket) == 7  # a flow's state
    clock.now += 1
    await r.heartbeat(beat(aid, tok, 8, errors=2, flows=[FlowReport(name="f", state="paused")]))
    assert await stored_seq(bucket) == 7
    clock.now += 3.9  # 4.9 s after the last write
    await r.heartbeat(beat(aid, tok, 9, errors=2, flows=[FlowReport(name="f", state="paused")]))
    assert await stored_seq(bucket) == 7
    clock.now += 0.2  # 5.1 s after the last write
    await r.heartbeat(beat(aid, tok, 10, errors=2, flows=[FlowReport(name="f", state="paused")]))
    assert await stored_seq(bucket) == 10
    assert r.writes == 6


async def test_an_old_outbox_is_stored_at_once_and_store_every_is_capped_by_stale_after() -> None:
    bucket, clock = MemoryBucket(), Clock()
    policy = HealthPolicy(stale_after=6.0, lost_after=20.0, max_outbox_age=30.0)
    r, reg, _ = await registered(bucket, clock, store_every=60.0, policy=policy)
    assert r.store_every == 2.0  # a third of stale_after: followers never see a beating agent stale
    aid, tok = reg.agent_id, reg.credential
    assert tok is not None
    await r.heartbeat(beat(aid, tok, 1, outbox_age_seconds=10.0))
    clock.now += 1
    await r.heartbeat(beat(aid, tok, 2, outbox_age_seconds=31.0))
    assert await stored_seq(bucket) == 2


async def test_a_change_of_role_or_registration_stores_the_next_heartbeat() -> None:
    bucket, clock = MemoryBucket(), Clock()
    r, reg, _ = await registered(bucket, clock)
    aid, tok = reg.agent_id, reg.credential
    assert tok is not None
    await r.heartbeat(beat(aid, tok, 1))
    clock.now += 1
    r.role_changed()
    assert r.latest == {}
    await r.heartbeat(beat(aid, tok, 2))
    assert await stored_seq(bucket) == 2
    await r.deregister(Deregister(name="erp"))
    assert "erp" not in r.latest
    again = await r.register(Register(name="erp", site="s", identity="i" * 43, version="1", host="h"))
    assert isinstance(again, Registered)
    assert again.credential
    clock.now += 1
    await r.heartbeat(beat(again.agent_id, again.credential, 1))
    assert await stored_seq(bucket) == 1  # a new agent id: stored at once


async def test_the_leaders_views_read_the_heartbeats_held_in_memory() -> None:
    bucket, clock = MemoryBucket(), Clock()
    r, reg, mirror = await registered(bucket, clock)
    aid, tok = reg.agent_id, reg.credential
    assert tok is not None
    builder = StatusBuilder(mirror, HealthPolicy(), latest=r.latest)
    follower = StatusBuilder(mirror, HealthPolicy())  # the same KV contents, no heartbeats in memory
    await r.heartbeat(beat(aid, tok, 1))
    clock.now += 3
    await r.heartbeat(beat(aid, tok, 2, outbox_depth=9))
    (mine,) = builder.agents(clock.now)
    (theirs,) = follower.agents(clock.now)
    assert (mine.outbox_depth, mine.heartbeat_age_seconds) == (9, 0.0)
    assert (theirs.outbox_depth, theirs.heartbeat_age_seconds) == (0, 3.0)
    assert mine.health == theirs.health == "healthy"
    # A heartbeat held for an earlier registration under the same name is not this agent's.
    r.latest["erp"] = msgspec.structs.replace(
        r.latest["erp"], agent_id="someone-else", received_at=clock.now + 5
    )
    (mine,) = builder.agents(clock.now)
    assert mine.outbox_depth == 0


def test_mirror_versions_change_only_with_their_keys() -> None:
    mirror = KvMirror(None, MemoryBucket())  # type: ignore[arg-type]
    agents, beats, every = mirror.version("agent"), mirror.version("heartbeat"), mirror.version()
    mirror.apply(Entry("heartbeat.a", b"{}", 1))
    assert mirror.version("agent") == agents
    assert mirror.version("heartbeat") != beats
    assert mirror.version() != every
    agents = mirror.version("agent")
    mirror.apply(Entry("agent.a", b"{}", 2))
    assert mirror.version("agent") != agents
    agents = mirror.version("agent")
    mirror.apply(Entry("agent.a", b"{}", 2))  # not newer: nothing changed
    assert mirror.version("agent") == agents
    mirror.forget("agent.a", 3)
    assert mirror.version("agent") != agents
    agents = mirror.version("agent")
    mirror._swap({}, {})  # a reload changes everything
    assert mirror.version("agent") != agents


def flow(name: str, **kw: Any) -> FlowView:
    return FlowView(name=name, state="running", agents=["a"], backlog=3, consumer_pending=4, lag_seconds=1.5,
                    dlq_depth=0, errors=0, **kw)  # fmt: skip


def test_per_flow_and_per_agent_gauges_are_computed_when_scraped() -> None:
    m = ControlPlaneMetrics(CollectorRegistry())
    m.flows.replace([flow("b", latency_p99_seconds=0.25), flow("a", slo_ratio=0.5)])
    t = [100.0]
    m.agent_heartbeat_age.clock = lambda: t[0]
    m.agent_heartbeat_age.replace({("erp", "plant"): 90.0})
    text = generate_latest(m.registry).decode()
    assert 'mesh_cp_flow_backlog_messages{flow="a"} 3.0' in text
    assert 'mesh_cp_flow_consumer_pending_messages{flow="b"} 4.0' in text
    assert 'mesh_cp_flow_slo_ratio{flow="a"} 0.5' in text
    assert 'mesh_cp_flow_slo_ratio{flow="b"} 1.0' in text  # no SLO data: 1
    assert 'mesh_cp_flow_latency_seconds{flow="b",quantile="0.99"} 0.25' in text
    assert 'flow="a",quantile' not in text
    assert "# TYPE mesh_cp_flow_latency_seconds summary" in text
    assert 'mesh_cp_agent_heartbeat_age_seconds{agent="erp",site="plant"} 10.0' in text
    t[0] = 130.0
    assert (
        'mesh_cp_agent_heartbeat_age_seconds{agent="erp",site="plant"} 40.0'
        in generate_latest(m.registry).decode()
    )
    m.flows.replace([flow("a")])
    m.agent_heartbeat_age.replace({})
    text = generate_latest(m.registry).decode()
    assert 'flow="b"' not in text
    assert "mesh_cp_agent_heartbeat_age_seconds{" not in text


def test_request_counters_reuse_their_children() -> None:
    m = ControlPlaneMetrics(CollectorRegistry())
    for _ in range(3):
        m.served("heartbeat", "ok", 0.001)
    m.served("heartbeat", "refused", 0.002)
    text = generate_latest(m.registry).decode()
    assert 'mesh_cp_requests_total{kind="heartbeat",outcome="ok"} 3.0' in text
    assert 'mesh_cp_requests_total{kind="heartbeat",outcome="refused"} 1.0' in text
    assert 'mesh_cp_request_duration_seconds_count{kind="heartbeat"} 4.0' in text


class _Conn:
    is_closed = False


class _Sub:
    """What :class:`_QueuedFirst` reads of a nats-py subscription: its pending queue and size,
    its connection, and the ``messages`` iterator that waits when the queue is empty."""

    def __init__(self) -> None:
        self._pending_queue: asyncio.Queue[Any] = asyncio.Queue()
        self._pending_size = 0
        self._conn = _Conn()
        self.waited = 0
        outer = self

        class Waiting:
            async def __anext__(self) -> Any:
                outer.waited += 1
                msg = await outer._pending_queue.get()
                if msg is None:
                    raise StopAsyncIteration
                outer._pending_size -= len(msg.data)
                return msg

        self.messages = Waiting()

    def put(self, data: bytes) -> None:
        self._pending_queue.put_nowait(type("Msg", (), {"data": data})())
        self._pending_size += len(data)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_served_messages_already_queued_are_taken_without_waiting() -> None:
    from mesh.transport.jetstream import _QueuedFirst

    sub = _Sub()
    for i in range(5):
        sub.put(b"x" * i)
    it = _QueuedFirst(sub)
    got = [await it.__anext__() for _ in range(5)]
    assert [len(m.data) for m in got] == [0, 1, 2, 3, 4]
    assert sub.waited == 0  # no task, no wait for any of them
    assert sub._pending_size == 0
    assert sub._pending_queue.empty()
    sub.put(b"late")
    sub._conn.is_closed = True  # a closed connection: through nats-py's iterator, as before
    assert (await it.__anext__()).data == b"late"
    assert sub.waited == 1
    sub._pending_queue.put_nowait(None)
    with pytest.raises(StopAsyncIteration):
        await it.__anext__()


def test_a_subscription_not_as_expected_is_read_through_its_iterator() -> None:
    from mesh.transport.jetstream import _QueuedFirst

    class Other:
        messages = object()

    assert _QueuedFirst(Other()).queue is None


async def test_heartbeat_now_answers_without_io_unless_a_write_is_due() -> None:
    bucket, clock = MemoryBucket(), Clock()
    r, reg, _ = await registered(bucket, clock)
    aid, tok = reg.agent_id, reg.credential
    assert tok is not None
    assert r.heartbeat_now(beat(aid, tok, 1)) is None  # the first one must be stored
    assert isinstance(await r.heartbeat(beat(aid, tok, 1)), HeartbeatAck)
    clock.now += 1
    ack = r.heartbeat_now(beat(aid, tok, 2, outbox_depth=3))
    assert isinstance(ack, HeartbeatAck)
    assert ack.seq == 2
    assert r.latest["erp"].payload.outbox_depth == 3
    assert await stored_seq(bucket) == 1
    assert r.heartbeat_now(beat(aid, tok, 3, health="failing")) is None  # a verdict changes: store
    refused = r.heartbeat_now(beat(aid, "wrong", 4))
    assert isinstance(refused, Refused)
    assert refused.code == "unauthorized"
    assert r.heartbeat_now(beat("other-id", tok, 5)) is not None  # refused at once too
    nobody = Registry(MemoryBucket(), replica="cp", mirror=KvMirror(None, MemoryBucket()))  # type: ignore[arg-type]
    assert nobody.heartbeat_now(beat(aid, tok, 1)) is None  # not in the mirror: read KV


class CountingBucket(MemoryBucket):
    """The in-memory bucket, counting how the registry writes to it."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    async def put_many(self, items: Sequence[tuple[str, bytes]]) -> list[int | None]:
        self.batches.append(len(items))
        return await super().put_many(items)


async def test_heartbeats_due_in_the_same_loop_turn_are_stored_in_one_batch() -> None:
    bucket = CountingBucket()
    mirror = KvMirror(None, bucket)  # type: ignore[arg-type]
    r = Registry(bucket, replica="cp", mirror=mirror)
    agents = []
    for i in range(20):
        reg = await r.register(Register(name=f"a{i}", site="s", identity=f"{i:043d}", version="1", host="h"))
        assert isinstance(reg, Registered)
        assert reg.credential
        agents.append(reg)
    acks: list[object] = []

    async def send(reg: Registered) -> None:
        assert reg.credential
        req = Heartbeat(agent_id=reg.agent_id, name=reg.name, credential=reg.credential, seq=1, sent_at=0,
                        interval=1, version="1", payload=HeartbeatPayload())  # fmt: skip
        acks.append(await r.heartbeat(req))

    async with anyio.create_task_group() as tg:
        for reg in agents:
            tg.start_soon(send, reg)
    assert all(isinstance(a, HeartbeatAck) for a in acks)
    assert bucket.batches == [20]  # every first heartbeat is due: one batch, not 20 writes
    for reg in agents:
        entry = mirror.get(heartbeat_key(reg.name))
        assert entry is not None  # read-your-writes with the revision put_many answered
        assert entry == await bucket.get(heartbeat_key(reg.name))
