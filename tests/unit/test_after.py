"""``after``: a child flow's sink holds a record until its parent was applied here by the parent
flow's sink, a parent's delete waits for its children's deletes, and a record still held at the
end of ``retry.integrity_retry`` is dead-lettered with the reason (memory transport, real
SQLite inbox; the end-to-end proof is tests/integration/test_after.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from agents._hold import parent_key
from agents.delivery import Apply, FlowPlan
from mesh.adapters import Applied, SinkRecord
from mesh.config import AfterConfig, FlowConfig, decode_flow, parse_agent_config
from mesh.envelope import DeadLetter, Envelope, encode, encode_payload, envelope_id
from mesh.errors import ConfigError
from mesh.metrics import Metrics
from mesh.store import AppliedKey, AppliedKeys, Inbox
from mesh.transport import DLQ_STREAM, OutMessage, Transport
from tests.unit.test_delivery import ScriptedSink, inbox, sample, stream, transport, until

__all__ = ["inbox", "transport"]  # fixtures shared with test_delivery

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

SINK = {"adapter": "sqlite", "path": "unused.db", "table": "t", "key": "id"}


def flow(name: str, entity: str, **extra: Any) -> FlowConfig:
    return decode_flow({
        "name": name, "entity": entity, "sink": SINK,
        "consumer": {"max_deliver": 30, "ack_wait": 30, "fetch_timeout": 0.05},
        "retry": {"initial_delay": 0.02, "max_delay": 0.05, "jitter": 0, "integrity_retry": 5.0},
        **extra,
    })  # fmt: skip


def env(
    entity: str, flow_name: str, key: str, version: int, row: dict[str, Any] | None, *, deleted: bool = False
) -> Envelope:
    event = "deleted" if deleted else "upserted"
    return Envelope(
        id=envelope_id(flow_name, "erp", key, version), kind=f"{entity}.{event}", flow=flow_name, key=key,
        version=version, origin="erp", occurred_at=1, correlation_id=f"c-{key}",
        payload=encode_payload(row or {}),
    )  # fmt: skip


async def publish(t: Transport, e: Envelope) -> None:
    event = e.kind.split(".")[1]
    await t.publish(OutMessage(f"evt.{e.kind.split('.')[0]}.{event}.erp", encode(e), e.id))


class Pair:
    """A parent flow (customers) and a child flow (orders, ``after`` customers by ``customer``)
    on one agent, each with its own scripted sink and one shared inbox."""

    def __init__(self, t: Transport, ib: Inbox, **child_extra: Any) -> None:
        async def connected() -> Transport:
            return t

        self.metrics = Metrics()
        child_cfg = flow("orders", "order", after={"flow": "customers", "key": "customer"}, **child_extra)
        self.parent_sink = ScriptedSink(lambda r: Applied.APPLIED, [])
        self.child_sink = ScriptedSink(lambda r: Applied.APPLIED, [])
        parent_plan = FlowPlan(flow("customers", "customer"), agent="a", system="crm", is_parent=lambda: True)
        child_plan = FlowPlan(child_cfg, agent="a", system="crm")
        self.parent = Apply(parent_plan, ib, connected, self.metrics, lambda: self.parent_sink)
        self.child = Apply(child_plan, ib, connected, self.metrics, lambda: self.child_sink)

    def count(self, flow_name: str, outcome: str) -> float:
        return sample(self.metrics, "mesh_consumed_messages_total", flow=flow_name, outcome=outcome)


def keys(records: list[SinkRecord]) -> list[tuple[str, bool]]:
    return [(r.key, r.deleted) for r in records]


async def test_a_child_waits_for_its_parent_and_is_never_tried_before(
    transport: Transport, inbox: Inbox
) -> None:
    pair = Pair(transport, inbox)
    await publish(transport, env("order", "orders", "10248", 1, {"id": 10248, "customer": "ALFKI"}))
    await publish(transport, env("order", "orders", "10249", 1, {"id": 10249, "customer": None}))  # no parent
    async with anyio.create_task_group() as tg:
        await tg.start(pair.child.run)
        await until(lambda: pair.count("orders", "held") >= 2)
        assert keys(pair.child_sink.seen) == [("10249", False)]  # 10248 was never sent to the target
        await publish(transport, env("customer", "customers", "ALFKI", 1, {"id": "ALFKI"}))
        await tg.start(pair.parent.run)
        await until(lambda: pair.count("orders", "applied") == 2)
        tg.cancel_scope.cancel()
    assert keys(pair.child_sink.seen) == [("10249", False), ("10248", False)]
    assert stream(transport, DLQ_STREAM) == []
    assert pair.count("orders", "dead_lettered") == 0


async def test_a_parent_delete_waits_for_its_childrens_deletes(transport: Transport, inbox: Inbox) -> None:
    pair = Pair(transport, inbox)
    await publish(transport, env("customer", "customers", "ALFKI", 1, {"id": "ALFKI"}))
    await publish(transport, env("order", "orders", "10248", 1, {"id": 10248, "customer": "ALFKI"}))
    async with anyio.create_task_group() as tg:
        await tg.start(pair.parent.run)
        await tg.start(pair.child.run)
        await until(lambda: pair.count("orders", "applied") == 1)
        tg.cancel_scope.cancel()
    await publish(transport, env("customer", "customers", "ALFKI", 2, None, deleted=True))
    async with anyio.create_task_group() as tg:
        await tg.start(pair.parent.run)
        await until(lambda: pair.count("customers", "held") >= 2)
        assert keys(pair.parent_sink.seen) == [("ALFKI", False)]  # the delete waits
        await publish(transport, env("order", "orders", "10248", 2, None, deleted=True))  # no payload
        await tg.start(pair.child.run)
        await until(lambda: pair.count("customers", "applied") == 2)
        tg.cancel_scope.cancel()
    assert keys(pair.parent_sink.seen) == [("ALFKI", False), ("ALFKI", True)]
    assert stream(transport, DLQ_STREAM) == []


async def test_a_record_older_than_what_its_flow_applied_is_not_held(
    transport: Transport, inbox: Inbox
) -> None:
    """A line inserted and deleted again while its order never arrived (or came and went): the
    delete applies, and the redelivered insert goes to the sink, whose version guard skips it,
    instead of being held until the budget ends and dead-lettered."""
    pair = Pair(transport, inbox)
    await publish(transport, env("order", "orders", "10248", 1, {"id": 10248, "customer": "ALFKI"}))
    async with anyio.create_task_group() as tg:
        await tg.start(pair.child.run)
        await until(lambda: pair.count("orders", "held") >= 1)
        await publish(transport, env("order", "orders", "10248", 2, None, deleted=True))
        await until(lambda: len(pair.child_sink.seen) == 2)
        tg.cancel_scope.cancel()
    assert keys(pair.child_sink.seen) == [("10248", True), ("10248", False)]
    assert stream(transport, DLQ_STREAM) == []


async def test_a_child_still_held_at_the_end_of_the_budget_is_dead_lettered_with_why(
    transport: Transport, inbox: Inbox
) -> None:
    pair = Pair(transport, inbox, consumer={"max_deliver": 4, "ack_wait": 30, "fetch_timeout": 0.05},
                retry={"initial_delay": 0.02, "jitter": 0, "integrity_retry": 0.2})  # fmt: skip
    await publish(transport, env("order", "orders", "10248", 1, {"id": 10248, "customer": "ALFKI"}))
    async with anyio.create_task_group() as tg:
        await tg.start(pair.child.run)
        await until(lambda: len(stream(transport, DLQ_STREAM)) == 1)
        tg.cancel_scope.cancel()
    assert pair.child_sink.seen == []
    assert pair.count("orders", "held") == 3
    letter = DeadLetter.from_headers(stream(transport, DLQ_STREAM)[0].headers)
    assert (letter.error_class, letter.permanent, letter.attempts) == ("IntegrityPending", False, 4)
    assert "parent customers 'ALFKI' (field 'customer') not applied here yet" in letter.reason
    assert "still held after 4 deliveries over retry.integrity_retry = 0.2s" in letter.reason


async def test_applied_keys_keep_the_newest_version_and_a_deletes_parent(tmp_path: Path) -> None:
    async with Inbox(tmp_path / "inbox.db") as ib:
        state = AppliedKeys(ib)
        await state.record([AppliedKey("orders", "1", 5, False, "customers", "ALFKI")])
        await state.record([AppliedKey("orders", "1", 3, False, "customers", "BONAP")])  # older: ignored
        assert await state.children("customers", ["ALFKI", "BONAP"]) == {"ALFKI": [("orders", "1")]}
        await state.record([AppliedKey("orders", "1", 6, True)])  # a delete without payload
        assert await state.children("customers", ["ALFKI"]) == {}
        assert await state.present("orders", ["1"]) == set()
        await state.record([AppliedKey("customers", "ALFKI", 1, False)])
        assert await state.present("customers", ["ALFKI", "BONAP"]) == {"ALFKI"}
    async with Inbox(tmp_path / "inbox.db") as ib:  # durable, and not pruned with the inbox
        await ib.prune(0)
        assert await AppliedKeys(ib).present("customers", ["ALFKI"]) == {"ALFKI"}


def test_parent_keys_are_encoded_as_sources_encode_keys() -> None:
    one = AfterConfig(flow="orders", key="order_id")
    assert parent_key(one, {"order_id": 10248}) == "10248"
    assert parent_key(one, {"order_id": "ALFKI"}) == "ALFKI"
    assert parent_key(one, {"order_id": None}) is None
    assert parent_key(one, {}) is None
    two = AfterConfig(flow="lines", key=["order_id", "product_id"])
    assert parent_key(two, {"order_id": 10248, "product_id": 11}) == "[10248,11]"


def _agent(tmp_path: Path, flows: str) -> str:
    return f"""
[agent]
name = "a"
system = "crm"
state_dir = "{tmp_path}"
[nats]
servers = ["nats://127.0.0.1:4222"]
{flows}"""


def _sink_flow(name: str, after: str = "") -> str:
    return f"""
[[flows]]
name = "{name}"
entity = "{name}"
{after}
[flows.sink]
adapter = "sqlite"
path = "t.db"
table = "{name}"
key = "id"
"""


@pytest.mark.parametrize(
    ("flows", "message"),
    [
        (_sink_flow("orders", 'after = { flow = "customers", key = "customer_id" }'),
         "flows[0].after.flow: 'customers' is not a flow of this agent with a [sink]"),
        (_sink_flow("orders", 'after = { flow = "orders", key = "customer_id" }'),
         "flows[0].after.flow: a flow cannot come after itself"),
        (_sink_flow("a", 'after = { flow = "b", key = "x" }')
         + _sink_flow("b", 'after = { flow = "a", key = "y" }'),
         "flows[0].after.flow: parents form a cycle (a -> b -> a): nothing could apply"),
        (_sink_flow("customers") + _sink_flow("orders", 'after = { flow = "customers", key = [] }'),
         "flows[1].after.key: expected at least one field"),
        (_sink_flow("customers") + _sink_flow("orders", 'after = { flow = "customers", keys = "x" }'),
         "flows[1].after"),
    ],
)  # fmt: skip
def test_a_wrong_after_is_named_with_its_path(tmp_path: Path, flows: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_agent_config(_agent(tmp_path, flows), base=tmp_path)
    assert message in "\n".join(caught.value.lines())


def test_a_good_after_parses(tmp_path: Path) -> None:
    text = _sink_flow("customers") + _sink_flow(
        "orders", 'after = { flow = "customers", key = "customer_id" }'
    )
    cfg = parse_agent_config(_agent(tmp_path, text), base=tmp_path)
    assert cfg.flows[1].after == AfterConfig(flow="customers", key="customer_id")
