"""End to end with in-process agents and a real nats-server: bulk sync, updates, deletes,
a malformed message, echo suppression, and a broker that is down when the source starts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import anyio
import msgspec
import nats
import pytest

from agents.connector import ConnectorAgent
from mesh.config import parse_agent_config
from mesh.envelope import Envelope, encode, encode_payload, envelope_id
from mesh.metrics import Metrics
from tests._secure import SecuredNatsServer as NatsServer
from tests._secure import create_layout, secure_agent
from tests.integration._harness import (
    ErpLoad,
    agent_toml,
    assert_effect_once,
    assert_same_rows,
    make_crm,
    make_erp,
    rows,
)

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


class Mesh:
    def __init__(self, tmp: Path, server: NatsServer) -> None:
        self.tmp, self.server = tmp, server
        self.erp, self.crm = tmp / "erp.db", tmp / "crm.db"
        make_erp(self.erp)
        make_crm(self.crm)
        self.load = ErpLoad(self.erp)
        self.erp_metrics, self.crm_metrics = Metrics(), Metrics()

    def toml(self, name: str) -> str:
        """The config of ``erp`` (source) or ``crm`` (sink), with its own least-privilege creds."""
        url, tmp = self.server.url, self.tmp
        if name == "erp":
            return agent_toml(name="erp-agent", system="erp", state=tmp / "s-erp", url=url,
                              source=self.erp, creds=tmp / "erp-agent.creds")  # fmt: skip
        return agent_toml(name="crm-agent", system="crm", state=tmp / "s-crm", url=url,
                          sink=self.crm, creds=tmp / "crm-agent.creds")  # fmt: skip

    def agent(self, name: str, text: str | None = None) -> ConnectorAgent:
        cfg = parse_agent_config(text or self.toml(name))
        secure_agent(cfg, self.server)
        return ConnectorAgent(cfg, metrics=self.erp_metrics if name == "erp" else self.crm_metrics)

    async def wait_synced(self, timeout: float = 60) -> None:
        with anyio.fail_after(timeout):
            while rows(self.erp) != rows(self.crm):
                await anyio.sleep(0.1)


@asynccontextmanager
async def running(*agents: ConnectorAgent) -> AsyncIterator[None]:
    async with anyio.create_task_group() as tg:
        for a in agents:
            await tg.start(a.run)
        yield
        tg.cancel_scope.cancel()


async def test_bulk_sync_then_updates_and_deletes(tmp_path: Path, nats_server: NatsServer) -> None:
    mesh = Mesh(tmp_path, nats_server)
    mesh.load.insert(10_000)
    async with running(mesh.agent("erp"), mesh.agent("crm")):
        await mesh.wait_synced(timeout=90)
        assert len(rows(mesh.crm)) == 10_000
        mesh.load.update(3000)
        mesh.load.delete(1000)
        mesh.load.mixed(50)
        await mesh.wait_synced()
    assert_same_rows(mesh.erp, mesh.crm)
    assert_effect_once(mesh.crm)
    assert (
        mesh.crm_metrics.registry.get_sample_value(
            "mesh_consumed_messages_total", {"flow": "customers", "outcome": "applied"}
        )
        >= 14_000
    )


async def test_malformed_message_is_dead_lettered_and_flow_continues(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    mesh = Mesh(tmp_path, nats_server)
    mesh.load.insert(20)
    async with running(mesh.agent("erp"), mesh.agent("crm")):
        await mesh.wait_synced()
        nc = await nats.connect(nats_server.url, user_credentials=str(nats_server.admin_creds))
        js = nc.jetstream()
        await js.publish("evt.customer.upserted.erp", b"\xc1 not msgpack",
                         headers={"Nats-Msg-Id": "garbage-1"})  # fmt: skip
        # a well-formed envelope whose payload is not a row
        bad = Envelope(id=envelope_id("customers", "erp", "7", 10**12), kind="customer.upserted",
                       flow="customers", key="7", version=10**12, origin="erp", occurred_at=0,
                       payload=msgspec.Raw(msgspec.msgpack.encode([1, 2, 3])))  # fmt: skip
        await js.publish("evt.customer.upserted.erp", encode(bad), headers={"Nats-Msg-Id": bad.id})
        mesh.load.insert(20)
        await mesh.wait_synced()
        sub = await js.pull_subscribe("dlq.customers", durable="t", stream="MESH_DLQ")
        with anyio.fail_after(10):
            dead = []
            while len(dead) < 2:
                with suppress(nats.errors.TimeoutError):
                    dead += await sub.fetch(2, timeout=1)
        await nc.close()
    reasons = sorted(m.headers["Mesh-Error-Class"] for m in dead)
    assert reasons == ["DecodeError", "DecodeError"]
    first = next(m for m in dead if m.data == b"\xc1 not msgpack")
    assert "not a valid envelope" in first.headers["Mesh-Reason"]
    assert first.headers["Mesh-Original-Subject"] == "evt.customer.upserted.erp"
    assert first.headers["Mesh-Attempts"] == "1"
    assert first.headers["Mesh-Flow"] == "customers"
    assert first.headers["Mesh-Agent"] == "crm-agent"
    assert len(rows(mesh.crm)) == 40  # the bad ones changed nothing, the good ones all applied
    assert (
        mesh.crm_metrics.registry.get_sample_value(
            "mesh_dead_lettered_messages_total", {"flow": "customers", "error": "DecodeError"}
        )
        == 2
    )


async def test_own_origin_is_never_applied_back(tmp_path: Path, nats_server: NatsServer) -> None:
    mesh = Mesh(tmp_path, nats_server)
    crm = mesh.agent("crm")
    async with running(crm):
        await crm.link.wait()  # the streams exist once the agent is connected
        nc = await nats.connect(nats_server.url, user_credentials=str(nats_server.admin_creds))
        js = nc.jetstream()
        for origin, key in (("crm", "1"), ("erp", "2")):
            env = Envelope(id=envelope_id("customers", origin, key, 1), kind="customer.upserted",
                           flow="customers", key=key, version=1, origin=origin, occurred_at=0,
                           payload=encode_payload({"id": int(key), "name": f"from {origin}",
                                                   "credit_limit_cents": 0}))  # fmt: skip
            await js.publish(f"evt.customer.upserted.{origin}", encode(env),
                             headers={"Nats-Msg-Id": env.id})  # fmt: skip
        await nc.close()
        with anyio.fail_after(10):
            while len(rows(mesh.crm)) < 1:
                await anyio.sleep(0.05)
        await anyio.sleep(0.5)
    assert [r[:2] for r in rows(mesh.crm)] == [(2, "from erp")]
    assert (
        mesh.crm_metrics.registry.get_sample_value(
            "mesh_consumed_messages_total", {"flow": "customers", "outcome": "echo"}
        )
        == 1
    )


async def test_outbox_buffers_while_broker_down_then_drains(tmp_path: Path, security_dir: Path) -> None:
    server = NatsServer(tmp_path / "nats", security_dir)  # not started yet
    mesh = Mesh(tmp_path, server)
    erp = mesh.agent("erp")
    async with anyio.create_task_group() as tg:
        await tg.start(erp.run)
        mesh.load.insert(300)
        mesh.load.update(100)
        mesh.load.delete(50)
        with anyio.fail_after(20):
            while (await erp.outbox.stats())[0] < 450:
                await anyio.sleep(0.05)
        assert not mesh.erp_metrics.registry.get_sample_value(
            "mesh_published_messages_total", {"flow": "customers"}
        )
        await anyio.to_thread.run_sync(server.start)
        await anyio.to_thread.run_sync(create_layout, server)  # what a control plane does
        try:
            await tg.start(mesh.agent("crm").run)
            await mesh.wait_synced(timeout=60)
            with anyio.fail_after(10):
                while (await erp.outbox.stats())[0]:
                    await anyio.sleep(0.05)
        finally:
            tg.cancel_scope.cancel()
            server.stop()
    assert_same_rows(mesh.erp, mesh.crm)
    assert_effect_once(mesh.crm)


async def test_one_agent_runs_both_directions(tmp_path: Path, nats_server: NatsServer) -> None:
    """ERP owns customers (ERP -> CRM); CRM owns products (CRM -> ERP); each agent captures one
    flow and applies the other, and neither echoes the other's changes back."""
    import sqlite3

    erp, crm = tmp_path / "erp.db", tmp_path / "crm.db"
    make_erp(erp)
    make_crm(crm)
    for db in (erp, crm):
        with sqlite3.connect(db) as c:
            c.execute("CREATE TABLE products (sku TEXT PRIMARY KEY, title TEXT, price_cents INTEGER)")

    def config(name: str, system: str, db: Path, capture: str, apply: str) -> str:
        return f"""
[agent]
name = "{name}"
system = "{system}"
state_dir = "{tmp_path / name}"
[nats]
servers = ["{nats_server.url}"]
creds = "{tmp_path / name}.creds"
inbox_prefix = "_INBOX.{name}"
[[flows]]
name = "{capture}"
entity = "{capture[:-1]}"
[flows.source]
adapter = "sqlite"
path = "{db}"
table = "{capture}"
key = "{"id" if capture == "customers" else "sku"}"
poll_interval = 0.02
[[flows]]
name = "{apply}"
entity = "{apply[:-1]}"
[flows.consumer]
fetch_timeout = 0.2
[flows.sink]
adapter = "sqlite"
path = "{db}"
table = "{apply}"
key = "{"id" if apply == "customers" else "sku"}"
"""

    a_cfg = parse_agent_config(config("erp-agent", "erp", erp, "customers", "products"))
    b_cfg = parse_agent_config(config("crm-agent", "crm", crm, "products", "customers"))
    secure_agent(a_cfg, nats_server)
    secure_agent(b_cfg, nats_server)
    a, b = ConnectorAgent(a_cfg), ConnectorAgent(b_cfg)
    ErpLoad(erp).insert(100)
    with sqlite3.connect(crm) as c:
        c.executemany(
            "INSERT INTO products VALUES (?, ?, ?)", [(f"SKU-{i}", f"Widget {i}", i * 100) for i in range(50)]
        )

    def table(db: Path, name: str) -> list[tuple[object, ...]]:
        with sqlite3.connect(db) as c:
            return c.execute(f"SELECT * FROM {name} ORDER BY 1").fetchall()

    async with running(a, b):
        with anyio.fail_after(30):
            while table(erp, "customers") != table(crm, "customers") or table(erp, "products") != table(
                crm, "products"
            ):
                await anyio.sleep(0.1)
        await anyio.sleep(1)  # anything echoed back would arrive now
    assert len(table(crm, "customers")) == 100
    assert len(table(erp, "products")) == 50
    # Nothing was captured again from the applied side: the stream holds each change once.
    nc = await nats.connect(nats_server.url, user_credentials=str(nats_server.admin_creds))
    info = await nc.jetstream().stream_info("MESH_EVENTS")
    await nc.close()
    assert info.state.messages == 150


async def test_full_outbox_pauses_capture_and_loses_nothing(tmp_path: Path, security_dir: Path) -> None:
    """Bounded disk at the edge: with the broker away, capture stops at outbox_max_bytes (the ERP
    keeps its changes in its change table), warns, and everything flows once the broker is back."""
    import sqlite3

    server = NatsServer(tmp_path / "nats", security_dir)  # not started yet
    mesh = Mesh(tmp_path, server)
    text = mesh.toml("erp")
    text = text.replace("[nats]", "outbox_max_bytes = 30000\noutbox_warn_depth = 10\n[nats]", 1)
    erp = mesh.agent("erp", text)
    registry = mesh.erp_metrics.registry
    mesh.load.insert(1000)
    async with anyio.create_task_group() as tg:
        await tg.start(erp.run)
        with anyio.fail_after(20):
            while not registry.get_sample_value("mesh_capture_paused", {"flow": "customers"}):
                await anyio.sleep(0.05)
        depth, _ = await erp.outbox.stats()
        assert 0 < depth < 1000
        assert erp.outbox.nbytes >= 30000
        with sqlite3.connect(mesh.erp) as c:  # the rest waits at the source, not lost
            waiting = c.execute("SELECT count(*) FROM _mesh_changes_customers").fetchone()[0]
        assert waiting >= 1000 - depth
        with anyio.fail_after(5):
            while registry.get_sample_value("mesh_outbox_over_threshold") != 1:
                await anyio.sleep(0.05)
        await anyio.to_thread.run_sync(server.start)
        await anyio.to_thread.run_sync(create_layout, server)  # what a control plane does
        try:
            await tg.start(mesh.agent("crm").run)
            await mesh.wait_synced(timeout=60)
            assert registry.get_sample_value("mesh_capture_paused", {"flow": "customers"}) == 0
        finally:
            tg.cancel_scope.cancel()
            server.stop()
    assert_same_rows(mesh.erp, mesh.crm)
    assert_effect_once(mesh.crm)


async def test_poison_record_is_retried_per_policy_then_dead_lettered_without_blocking(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """A record the target refuses (a CHECK constraint) is retried as the flow's policy says
    (here: RejectedRecord = "retry", max_deliver 3), then dead-lettered with its attempt count;
    every other record, including later ones, applies meanwhile."""
    import sqlite3

    mesh = Mesh(tmp_path, nats_server)
    with sqlite3.connect(mesh.crm) as c:
        c.executescript("""
            DROP TABLE customers;
            CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT, country TEXT,
                credit_limit_cents INTEGER NOT NULL CHECK (credit_limit_cents < 900000000), balance REAL);
        """)
    text = mesh.toml("crm")
    text = text.replace("ack_wait = 5.0", "ack_wait = 5.0\nmax_deliver = 3")
    text = text.replace("[flows.retry]", '[flows.retry]\nerrors = { RejectedRecord = "retry" }')
    crm = mesh.agent("crm", text)
    mesh.load.insert(300)
    with sqlite3.connect(mesh.erp) as c:
        poison = [r[0] for r in c.execute("SELECT id FROM customers WHERE credit_limit_cents >= 900000000")]
    assert poison, "the seeded load should contain some refused rows"
    async with running(mesh.agent("erp"), crm):
        with anyio.fail_after(30):
            while len(rows(mesh.crm)) < 300 - len(poison):
                await anyio.sleep(0.1)
        nc = await nats.connect(nats_server.url, user_credentials=str(nats_server.admin_creds))
        sub = await nc.jetstream().pull_subscribe("dlq.customers", durable="t", stream="MESH_DLQ")
        dead: list[nats.aio.msg.Msg] = []
        with anyio.fail_after(30):
            while len(dead) < len(poison):
                with suppress(nats.errors.TimeoutError):
                    dead += await sub.fetch(len(poison), timeout=1)
        await nc.close()
    assert sorted(int(r[0]) for r in rows(mesh.crm)) == sorted(set(range(1, 301)) - set(poison))
    assert {m.headers["Mesh-Attempts"] for m in dead} == {"3"}
    assert {m.headers["Mesh-Error-Class"] for m in dead} == {"RejectedRecord"}
    assert all("CHECK constraint failed" in m.headers["Mesh-Reason"] for m in dead)
    retried = mesh.crm_metrics.registry.get_sample_value("mesh_retried_messages_total", {"flow": "customers"})
    assert retried == 2 * len(poison)
