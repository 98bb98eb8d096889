"""``meshctl flow apply`` refuses (control-plane side, before storing) a flow whose file paths
would resolve outside the target agent's state_dir and allowed_paths, with the field path; a
dry run and the real apply agree."""

from __future__ import annotations

import msgspec
import pytest

from mesh.controlplane.flows import FlowStore, parse_flow_file
from mesh.controlplane.kv import Entry, KvMirror, MemoryBucket
from mesh.controlplane.models import AgentRecord, ApplyFlows, FlowsApplied, Manifest, Refused

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

STATE = "/srv/mesh/crm"
SHARED = "/srv/exports"


def _agent(name: str, state_dir: str | None = STATE, allowed: tuple[str, ...] = (SHARED,)) -> AgentRecord:
    manifest = Manifest(
        adapters=["sqlite", "rest", "csv", "webhook"], state_dir=state_dir, allowed_paths=list(allowed)
    )
    return AgentRecord(
        agent_id=f"id-{name}", name=name, site="s", host="h", version="1", identity="x",
        credential="y", manifest=manifest,
    )  # fmt: skip


def _sqlite_sink(path: str, agent: str = "crm") -> str:
    return f"""
[[flows]]
name = "customers"
entity = "customer"
[flows.sink]
agent = "{agent}"
adapter = "sqlite"
path = "{path}"
table = "customers"
key = "id"
"""


def _problems(text: str, *agents: AgentRecord) -> list[str]:
    _, problems = parse_flow_file(text, "flows.toml", {a.name: a for a in agents})
    return problems


OUTSIDE = ["../../../x.db", "/etc/mesh-x.db", "sub/../../x.db", "/srv/mesh/crm-other/x.db"]
INSIDE = ["crm.db", "sub/x.db", "sub/../x.db", "/srv/mesh/crm/x.db", "/srv/exports/a/x.db"]


@pytest.mark.parametrize("path", OUTSIDE)
def test_paths_outside_the_agent_dirs_are_refused_with_the_field_path(path: str) -> None:
    (problem,) = _problems(_sqlite_sink(path), _agent("crm"))
    assert problem.startswith("flows.toml: flows[0].sink.path: ")
    assert repr(path) in problem
    assert "outside" in problem


@pytest.mark.parametrize("path", INSIDE)
def test_paths_inside_the_state_dir_or_allowed_paths_pass(path: str) -> None:
    assert _problems(_sqlite_sink(path), _agent("crm")) == []


def test_home_relative_paths_are_refused() -> None:
    (problem,) = _problems(_sqlite_sink("~/x.db"), _agent("crm"))
    assert "flows[0].sink.path" in problem
    assert "home directory" in problem


def test_an_agent_without_a_reported_state_dir_gets_relative_paths_only() -> None:
    old = _agent("crm", state_dir=None, allowed=())
    assert _problems(_sqlite_sink("crm.db"), old) == []
    assert "outside" in _problems(_sqlite_sink("../x.db"), old)[0]
    assert "outside" in _problems(_sqlite_sink("/srv/mesh/crm/x.db"), old)[0]


def test_every_path_field_of_every_adapter_is_found() -> None:
    text = """
[[flows]]
name = "files"
entity = "customer"
[flows.source]
agent = "crm"
adapter = "csv"
inbox_dir = "/tmp/inbox"
state_path = "ok.db"
key = "id"
[flows.sink]
agent = "crm"
adapter = "rest"
base_url = "https://crm.example.com"
upsert_path = "/c/{key}"
state_path = "../rest.db"
[flows.to_canonical]
fields = { id = "id" }
[flows.to_canonical.lookups.region]
sqlite = "/etc/lookup.db"
table = "regions"
key = "code"
value = "name"
"""
    problems = _problems(text, _agent("crm"))
    fields = sorted(p.split(": ")[1] for p in problems if "outside" in p)
    assert "flows[0].source.inbox_dir" in fields
    assert "flows[0].sink.state_path" in fields
    assert any(f.startswith("flows[0].to_canonical.lookups.region") for f in fields), problems


def _store(*agents: AgentRecord) -> tuple[FlowStore, MemoryBucket]:
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
    return store, flows


async def test_dry_run_and_apply_agree_and_nothing_is_stored() -> None:
    store, flows = _store(_agent("crm"))
    text = _sqlite_sink("../../../x.db")
    dry = await store.apply(ApplyFlows(text=text, source="flows.toml", dry_run=True))
    real = await store.apply(ApplyFlows(text=text, source="flows.toml"))
    assert isinstance(dry, Refused)
    assert isinstance(real, Refused)
    assert dry.problems == real.problems
    assert "flows[0].sink.path" in real.problems[0]
    assert flows.data == {}
    ok = await store.apply(ApplyFlows(text=_sqlite_sink("crm.db"), source="flows.toml"))
    assert isinstance(ok, FlowsApplied)
    assert list(flows.data) == ["flow.customers"]


def test_applied_flows_may_only_read_the_environment_variables_the_agent_allows() -> None:
    from agents.flows import flow_from_assignment
    from mesh.errors import ConfigError
    from mesh.secrets import env_references

    config = {
        "name": "customers",
        "entity": "customer",
        "source": {"adapter": "sqlite", "path": "erp.db", "table": "customers", "key": "id"},
        "sink": {
            "adapter": "rest",
            "base_url": "https://crm.example.com",
            "upsert_path": "/c/{key}",
            "state_path": "v.db",
            "headers_env": {"X-Api-Key": "CRM_API_KEY"},
            "auth": {"type": "bearer", "token_env": "AWS_SECRET_ACCESS_KEY"},
        },
    }
    assert env_references(config) == [
        ("flow.sink.headers_env.X-Api-Key", "CRM_API_KEY"),
        ("flow.sink.auth.token_env", "AWS_SECRET_ACCESS_KEY"),
    ]
    with pytest.raises(ConfigError) as refused:
        flow_from_assignment(config, "/tmp/state", allowed_env=["CRM_*"])
    problems = [p.path for p in refused.value.problems]
    assert problems == ["flow.sink.auth.token_env"]  # CRM_API_KEY matches CRM_*
    assert "AWS_SECRET_ACCESS_KEY" in str(refused.value)
    assert "allowed_env" in str(refused.value)
    with pytest.raises(ConfigError, match="X-Api-Key"):
        flow_from_assignment(config, "/tmp/state")  # nothing allowed by default
    ok = dict(config, sink=dict(config["sink"], auth={"type": "bearer", "token_env": "CRM_TOKEN"}))  # type: ignore[arg-type]
    flow = flow_from_assignment(ok, "/tmp/state", allowed_env=["CRM_*"])
    assert flow.name == "customers"


def test_flow_apply_refuses_environment_variables_the_agent_does_not_allow() -> None:
    rest_sink = """
[[flows]]
name = "customers"
entity = "customer"
[flows.sink]
agent = "crm"
adapter = "rest"
base_url = "https://crm.example.com"
upsert_path = "/c/{key}"
state_path = "v.db"
headers_env = { "X-Api-Key" = "CRM_API_KEY" }
[flows.sink.auth]
type = "bearer"
token_env = "AWS_SECRET_ACCESS_KEY"
"""
    strict = _agent("crm")
    strict = msgspec.structs.replace(
        strict, manifest=msgspec.structs.replace(strict.manifest, allowed_env=["CRM_*"])
    )
    (problem,) = _problems(rest_sink, strict)
    assert problem.startswith("flows.toml: flows[0].sink.auth.token_env: ")
    assert "AWS_SECRET_ACCESS_KEY" in problem
    assert "allowed_env" in problem
    # An agent that reports nothing (an older one) is left to check for itself.
    assert _problems(rest_sink, _agent("crm")) == []
