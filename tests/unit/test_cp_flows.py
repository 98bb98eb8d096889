"""Flow files and assignments on the control plane (KV in memory, same revision rules)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from mesh.controlplane.flows import FlowStore, parse_flow_file
from mesh.controlplane.kv import Entry, KvMirror, MemoryBucket
from mesh.controlplane.models import AgentRecord, ApplyFlows, Assignment, DeleteFlow, Manifest, Refused

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


def _agent(
    name: str, *, state: str = "active", adapters: tuple[str, ...] = ("sqlite", "rest")
) -> AgentRecord:
    return AgentRecord(
        agent_id=f"id-{name}", name=name, site="s", host="h", version="1", identity="x", credential="y",
        manifest=Manifest(adapters=list(adapters)), state=state,  # type: ignore[arg-type]
    )  # fmt: skip


def _store(*agents: AgentRecord) -> tuple[FlowStore, MemoryBucket, KvMirror]:
    flows, assign, reg = MemoryBucket("flows"), MemoryBucket("assign"), MemoryBucket("agents")
    agents_mirror = KvMirror(None, reg)  # type: ignore[arg-type]
    for i, a in enumerate(agents, 1):
        agents_mirror.apply(Entry(f"agent.{a.name}", msgspec.json.encode(a), i))
    store = FlowStore(
        flows, assign,
        flows_mirror=KvMirror(None, flows),  # type: ignore[arg-type]
        assign_mirror=KvMirror(None, assign),  # type: ignore[arg-type]
        agents_mirror=agents_mirror,
    )  # fmt: skip
    return store, assign, agents_mirror


def _assignment(bucket: MemoryBucket, agent: str) -> Assignment | None:
    entry = bucket.data.get(f"agent.{agent}")
    return None if entry is None else msgspec.json.decode(entry.value, type=Assignment)


def test_a_bad_file_lists_every_problem_with_its_path() -> None:
    text = FILE.replace('key = "id"\n[flows.sink]', "key = 7\n[flows.sink]").replace(
        'agent = "crm"', 'agent = "crn"'
    )
    text += (
        '[[flows]]\nname = "customers"\nentity = "customer"\nagent = "erp"\n[flows.sink]\nadapter = "csv"\n'
    )
    _, problems = parse_flow_file(text, "f.toml", {"erp": _agent("erp"), "crm": _agent("crm")})
    joined = "\n".join(problems)
    assert (
        "f.toml: flows[0].source.key: Expected" in joined or "f.toml: flows[0].source.key: expected" in joined
    )
    assert "flows[0].sink.agent: no registered agent named 'crn' (registered: crm, erp)" in joined
    assert "flows[1].name: duplicate flow name 'customers' (also flows[0])" in joined
    assert "flows[1].sink.adapter: agent 'erp' does not support adapter 'csv'" in joined
    assert all(p.startswith("f.toml: ") for p in problems)
    _, problems = parse_flow_file("[[flows]\n", "g.toml", {})
    assert problems
    assert problems[0].startswith("g.toml: not valid TOML")
    _, problems = parse_flow_file("other = 1\n", "h.toml", {})
    assert "h.toml: other: unknown key" in problems[0]


async def test_apply_is_idempotent_bumps_generations_and_assigns_each_side() -> None:
    store, assign, _ = _store(_agent("erp"), _agent("crm"))
    reply = await store.apply(ApplyFlows(text=FILE, source="f.toml", actor="ops"))
    assert not isinstance(reply, Refused)
    assert [(c.name, c.action, c.generation, c.agents) for c in reply.changes] == [
        ("customers", "created", 1, ["crm", "erp"])
    ]
    erp, crm = _assignment(assign, "erp"), _assignment(assign, "crm")
    assert erp is not None
    assert crm is not None
    assert erp.flows[0].config["source"]["table"] == "customers"
    assert erp.flows[0].config.get("sink") is None
    assert crm.flows[0].config["sink"]["path"] == "crm.db"
    assert crm.flows[0].config.get("source") is None
    again = await store.apply(ApplyFlows(text=FILE, source="f.toml"))
    assert not isinstance(again, Refused)
    assert again.changes[0].action == "unchanged"
    changed = await store.apply(ApplyFlows(text=FILE.replace("crm.db", "crm2.db"), source="f.toml"))
    assert not isinstance(changed, Refused)
    assert (changed.changes[0].action, changed.changes[0].generation) == ("updated", 2)
    crm = _assignment(assign, "crm")
    assert crm is not None
    assert crm.flows[0].generation == 2
    dry = await store.apply(ApplyFlows(text=FILE, source="f.toml", dry_run=True))
    assert not isinstance(dry, Refused)
    assert dry.dry_run
    assert dry.changes[0].action == "updated"
    assert store.specs()["customers"].generation == 2  # a dry run stores nothing


async def test_refused_file_stores_nothing() -> None:
    store, assign, _ = _store(_agent("erp"))
    reply = await store.apply(ApplyFlows(text=FILE, source="f.toml"))
    assert isinstance(reply, Refused)
    assert reply.code == "invalid"
    assert any("no registered agent named 'crm'" in p for p in reply.problems)
    assert store.specs() == {}
    assert assign.data == {}


async def test_pause_is_desired_state_and_revoked_or_deleted_means_no_assignment() -> None:
    store, assign, agents = _store(_agent("erp"), _agent("crm"))
    await store.apply(ApplyFlows(text=FILE, source="f.toml"))
    spec = await store.set_desired("customers", "paused", "ops")
    assert spec is not None
    assert spec.desired == "paused"
    erp = _assignment(assign, "erp")
    assert erp is not None
    assert erp.flows[0].desired == "paused"
    # Revoke crm: its assignment goes away, erp's stays.
    revoked = _agent("crm", state="revoked")
    agents.apply(Entry("agent.crm", msgspec.json.encode(revoked), 100))
    await store.reconcile()
    assert _assignment(assign, "crm") is None
    assert _assignment(assign, "erp") is not None
    done = await store.delete(DeleteFlow(name="customers", actor="ops"))
    assert not isinstance(done, Refused)
    assert _assignment(assign, "erp") is None
    missing: Any = await store.delete(DeleteFlow(name="customers"))
    assert isinstance(missing, Refused)
    assert missing.code == "unknown"


def test_mapping_and_ownership_problems_are_listed_before_anything_is_stored() -> None:
    text = FILE.replace(
        '[flows.sink]\nagent = "crm"',
        '[flows.to_canonical.fields]\nnmae = "name"\n'
        '[flows.ownership.fields]\ncredit_limt = "erp"\n'
        '[flows.sink]\nagent = "crm"',
    )
    _, problems = parse_flow_file(text, "f.toml", {"erp": _agent("erp"), "crm": _agent("crm")})
    joined = "\n".join(problems)
    assert "flows[0].to_canonical.fields" in joined
    assert "nmae" in joined
    assert "credit_limt" in joined
    assert all(p.startswith("f.toml") for p in problems)


def test_an_adapter_that_is_not_installed_lists_the_installed_ones_one_problem_per_line() -> None:
    text = FILE.replace('adapter = "sqlite"\npath = "erp.db"', 'adapter = "oracle"\npath = "erp.db"')
    _, problems = parse_flow_file(text, "f.toml", {"erp": _agent("erp"), "crm": _agent("crm")})
    assert problems[0].startswith(
        "f.toml: flows[0].source.adapter: invalid value 'oracle' (expected one of the installed source "
    )
    assert "sqlite" in problems[0]
    text = FILE.replace('[flows.sink]\nagent = "crm"', '[flows.to_canonical.fields]\nnmae = "name"\n'
                        '[flows.sink]\nagent = "crm"')  # fmt: skip
    _, problems = parse_flow_file(text, "f.toml", {"erp": _agent("erp"), "crm": _agent("crm")})
    # each mapping problem is its own line with the file and its path; no summary line
    assert len(problems) >= 2, problems
    assert all(p.startswith("f.toml: flows[0].to_canonical") for p in problems), problems
    assert not any("problems:" in p for p in problems)
