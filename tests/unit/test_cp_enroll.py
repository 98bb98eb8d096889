"""The control plane's security side without a broker (KV in memory, a real security dir):
a token is claimed once, for its name, before it expires; the registry needs a token for a new
agent or key; the flow store re-issues an agent's JWT into its assignment when its flows change."""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
import pytest

from mesh.config import NatsConfig
from mesh.controlplane.enroll import Enrollment, agent_grants
from mesh.controlplane.flows import FlowStore
from mesh.controlplane.kv import Entry, KvMirror, MemoryBucket
from mesh.controlplane.models import (
    AgentRecord,
    ApplyFlows,
    AssignedFlow,
    Assignment,
    Manifest,
    Refused,
    Register,
    Registered,
    TokenCreate,
    TokenCreated,
)
from mesh.controlplane.registry import Registry
from mesh.security.authority import Authority
from mesh.security.jwt import UserClaims, decode, new_seed, public_key_of_seed
from mesh.security.setup import init_security_dir

pytestmark = pytest.mark.anyio

FILE = """
[[flows]]
name = "customers"
entity = "customer"
[flows.source]
agent = "erp"
adapter = "sqlite"
path = "erp.db"
table = "customers"
key = "id"
[flows.sink]
agent = "crm"
adapter = "sqlite"
path = "crm.db"
table = "customers"
key = "id"
"""


class World:
    def __init__(self, root: Path) -> None:
        init_security_dir(root / "sec")
        self.agents = MemoryBucket("agents")
        self.mirror = KvMirror(None, self.agents)  # type: ignore[arg-type]
        self.enroll = Enrollment(
            Authority.load(root / "sec"), self.agents, self.mirror, nats=NatsConfig(), prefix="mesh.cp"
        )
        self.registry = Registry(self.agents, replica="r", mirror=self.mirror, security=self.enroll)
        self.flows, self.assign = MemoryBucket("flows"), MemoryBucket("assign")
        self.store = FlowStore(
            self.flows, self.assign,
            flows_mirror=KvMirror(None, self.flows),  # type: ignore[arg-type]
            assign_mirror=KvMirror(None, self.assign),  # type: ignore[arg-type]
            agents_mirror=self.mirror, security=self.enroll,
        )  # fmt: skip

    async def token(self, name: str, systems: list[str], ttl: float = 60) -> str:
        made = await self.enroll.create_token(TokenCreate(name=name, ttl=ttl, systems=systems, actor="admin"))
        assert isinstance(made, TokenCreated)
        return made.token_id

    async def register(self, name: str, system: str, pk: str, token: str | None) -> Registered | Refused:
        manifest = Manifest(adapters=["sqlite"], state_dir="/", system=system)
        req = Register(name=name, site="s", identity="i" * 32, version="1", host="h", manifest=manifest,
                       public_key=pk, enrollment=token, actor=name)  # fmt: skip
        return await self.registry.register(req)

    def assignment(self, agent: str) -> Assignment:
        entry = self.assign.data[f"agent.{agent}"]
        return msgspec.json.decode(entry.value, type=Assignment)


def _pk() -> str:
    return public_key_of_seed(new_seed("user"))


async def test_a_token_works_once_for_its_name_before_it_expires(tmp_path: Path) -> None:
    w = World(tmp_path)
    token = await w.token("erp", ["erp"])
    other = await w.register("crm", "crm", _pk(), token)
    assert isinstance(other, Refused)
    assert "for agent 'erp', not 'crm'" in other.reason
    pk = _pk()
    assert isinstance(await w.register("erp", "erp", pk, token), Registered)
    again = await w.register("erp", "erp", _pk(), token)  # a new key with the used token
    assert isinstance(again, Refused)
    assert "already used" in again.reason
    assert isinstance(await w.register("erp", "erp", pk, None), Registered)  # its known key: no token
    no_token = await w.register("new", "erp", _pk(), None)
    assert isinstance(no_token, Refused)
    assert "enrollment token" in no_token.reason
    # expired: the control plane's own check (the record's expiry)
    late = await w.token("late", ["erp"], ttl=60)
    rec = msgspec.json.decode(w.agents.data[f"token.{late}"].value)
    rec["expires"] = time.time() - 1
    w.agents.data[f"token.{late}"] = Entry(f"token.{late}", msgspec.json.encode(rec), 99)
    expired = await w.register("late", "erp", _pk(), late)
    assert isinstance(expired, Refused)
    assert "expired" in expired.reason
    assert [t.used for t in w.enroll.tokens().tokens if t.name == "erp"] == [True]


async def test_registration_refused_with_a_token_when_security_is_off(tmp_path: Path) -> None:
    agents = MemoryBucket("agents")
    registry = Registry(agents, replica="r")
    req = Register(name="a", site="s", identity="i" * 32, version="1", host="h", enrollment="UX")
    reply = await registry.register(req)
    assert isinstance(reply, Refused)
    assert "security is off" in reply.reason


async def test_the_jwt_is_reissued_into_the_assignment_when_flows_change(tmp_path: Path) -> None:
    w = World(tmp_path)
    for name in ("erp", "crm"):
        assert isinstance(await w.register(name, name, _pk(), await w.token(name, [name])), Registered)
    await w.store.reconcile()
    first = w.assignment("crm")
    assert first.flows == []  # kept without flows, for its JWT
    claims = decode(first.credentials_jwt, kind=UserClaims)
    assert isinstance(claims.nats, UserClaims)
    consume = "$JS.API.CONSUMER.CREATE.MESH_EVENTS.customers-crm"
    assert consume not in claims.nats.pub.allow
    assert await w.store.reconcile() == 0  # nothing changed: no new JWT
    applied = await w.store.apply(ApplyFlows(text=FILE, source="f.toml", actor="admin"))
    assert not isinstance(applied, Refused), applied
    second = w.assignment("crm")
    assert second.credentials_jwt != first.credentials_jwt
    claims = decode(second.credentials_jwt, kind=UserClaims)
    assert isinstance(claims.nats, UserClaims)
    assert consume in claims.nats.pub.allow
    assert "dlq.customers" in claims.nats.pub.allow
    assert "evt.*.*.crm" in claims.nats.pub.allow  # its token's system
    await w.store.set_desired("customers", "paused", "admin")  # same permissions: same JWT
    paused = w.assignment("crm")
    assert paused.flows[0].desired == "paused"
    assert paused.credentials_jwt == second.credentials_jwt
    erp = decode(w.assignment("erp").credentials_jwt, kind=UserClaims)
    assert isinstance(erp.nats, UserClaims)
    assert "evt.*.*.erp" in erp.nats.pub.allow
    assert not any(p.startswith("$JS.API.CONSUMER.CREATE") for p in erp.nats.pub.allow)


def test_static_flows_are_granted_only_within_the_tokens_systems() -> None:
    manifest = Manifest(system="crm", sources=["a"], sinks=["b"])
    rec = AgentRecord(agent_id="i", name="x", site="s", host="h", version="1", identity="d", credential="c",
                      manifest=manifest, systems=["crm"])  # fmt: skip
    assert agent_grants(rec, []) == (["crm"], ["b-crm"], ["a", "b"])
    outside = msgspec.structs.replace(rec, systems=["erp"])
    assert agent_grants(outside, []) == (["erp"], [], [])
    assigned = AssignedFlow(name="f", generation=1, desired="running", config={"sink": {"adapter": "x"}})
    assert agent_grants(outside, [assigned]) == (["erp"], ["f-crm"], ["f"])


async def test_cached_records_and_digests_follow_each_revision(tmp_path: Path) -> None:
    """reconcile() keeps decoded records, assignments and permission digests by KV revision:
    a record rewritten (a new key, a new system) is read again and gets a new JWT; the others
    are left alone."""
    w = World(tmp_path)
    for name in ("erp", "crm"):
        assert isinstance(await w.register(name, name, _pk(), await w.token(name, [name])), Registered)
    assert not isinstance(await w.store.apply(ApplyFlows(text=FILE, source="f.toml", actor="admin")), Refused)
    assert await w.store.reconcile() == 0
    before = {a: w.assignment(a).credentials_jwt for a in ("erp", "crm")}
    pk = _pk()
    assert isinstance(await w.register("crm", "crm", pk, await w.token("crm", ["crm"])), Registered)
    assert await w.store.reconcile() == 1  # crm only: its record changed
    after = w.assignment("crm")
    assert after.credentials_jwt != before["crm"]
    claims = decode(after.credentials_jwt, kind=UserClaims)
    assert claims.sub == pk
    assert w.assignment("erp").credentials_jwt == before["erp"]
    assert await w.store.reconcile() == 0
    # a record that vanishes takes its assignment (and its cached entries) with it
    del w.agents.data["agent.erp"]
    w.mirror.forget("agent.erp", w.mirror.get("agent.erp").revision)  # type: ignore[union-attr]
    assert await w.store.reconcile() == 1
    assert "agent.erp" not in w.assign.data
    assert set(w.store.agents()) == {"crm"}
