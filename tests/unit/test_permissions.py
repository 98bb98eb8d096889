"""The permission table: exactly what each identity may publish and subscribe, and names that
cannot widen it."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.errors import ConfigError
from mesh.security.permissions import (
    admin_permissions,
    agent_permissions,
    control_plane_permissions,
    enrollment_permissions,
    permission_table,
)
from mesh.transport.subjects import subject_matches


def _allowed(patterns: list[str], subject: str) -> bool:
    return any(subject_matches(p, subject) for p in patterns)


AGENT = agent_permissions("crm-agent", ["crm"], ["sync-erp"], ["sync"])


@pytest.mark.parametrize(
    "subject",
    [
        "evt.customer.created.crm",
        "dlq.sync",
        "mesh.cp.register.crm-agent",
        "mesh.cp.heartbeat.crm-agent",
        "$JS.API.INFO",
        "$JS.API.STREAM.INFO.MESH_EVENTS",
        "$JS.API.STREAM.INFO.MESH_DLQ",
        "$JS.API.CONSUMER.CREATE.MESH_EVENTS.sync-erp",
        "$JS.API.CONSUMER.CREATE.MESH_EVENTS.sync-erp.evt.customer.*.*",
        "$JS.API.CONSUMER.DURABLE.CREATE.MESH_EVENTS.sync-erp",
        "$JS.API.CONSUMER.INFO.MESH_EVENTS.sync-erp",
        "$JS.API.CONSUMER.MSG.NEXT.MESH_EVENTS.sync-erp",
        "$JS.ACK.MESH_EVENTS.sync-erp.1.2.3.4.5.6",
        "$JS.API.DIRECT.GET.KV_mesh_assign.$KV.mesh_assign.agent.crm-agent",
    ],
)
def test_agent_may_publish(subject: str) -> None:
    assert _allowed(AGENT.pub.allow, subject)


@pytest.mark.parametrize(
    "subject",
    [
        "evt.customer.created.erp",
        "evt.customer.created.crm.extra",
        "dlq.other",
        "mesh.cp.register.erp-agent",
        "mesh.cp.flow_apply.admin",
        "mesh.cp.revoke.crm-agent",
        "mesh.cp.agent.erp-agent",
        "$JS.API.STREAM.PURGE.MESH_DLQ",
        "$JS.API.STREAM.DELETE.MESH_EVENTS",
        "$JS.API.STREAM.DELETE.KV_mesh_flows",
        "$JS.API.STREAM.NAMES",
        "$JS.API.CONSUMER.DELETE.MESH_EVENTS.sync-erp",
        "$JS.API.CONSUMER.CREATE.MESH_EVENTS.other-erp",
        "$JS.API.CONSUMER.CREATE.KV_mesh_assign",
        "$JS.API.DIRECT.GET.KV_mesh_assign",
        "$JS.API.DIRECT.GET.KV_mesh_assign.$KV.mesh_assign.agent.erp-agent",
        "$KV.mesh_assign.agent.crm-agent",
        "$SYS.REQ.CLAIMS.UPDATE",
    ],
)
def test_agent_may_not_publish(subject: str) -> None:
    assert not _allowed(AGENT.pub.allow, subject)


def test_agent_subscriptions_and_replies() -> None:
    assert AGENT.sub.allow == [
        "_INBOX.crm-agent.>",
        "mesh.cp.agent.crm-agent",
        "mesh.cp.reconcile.crm-agent",
        "$KV.mesh_assign.agent.crm-agent",
    ]
    assert AGENT.resp is not None
    assert AGENT.resp.max == 1
    assert not _allowed(AGENT.sub.allow, "_INBOX.erp-agent.x")
    assert AGENT.pub.deny == []
    assert AGENT.sub.deny == []


def test_agent_permissions_grow_with_systems_consumers_and_flows_and_follow_the_prefix() -> None:
    perms = agent_permissions("a", ["crm", "erp", "crm"], ["f-x", "g-x"], ["f", "g"], prefix="acme.cp")
    assert [p for p in perms.pub.allow if p.startswith("evt.")] == ["evt.*.*.crm", "evt.*.*.erp"]
    assert [p for p in perms.pub.allow if p.startswith("$JS.API.CONSUMER.INFO")] == [
        "$JS.API.CONSUMER.INFO.MESH_EVENTS.f-x",
        "$JS.API.CONSUMER.INFO.MESH_EVENTS.g-x",
    ]
    assert "acme.cp.register.a" in perms.pub.allow
    assert "acme.cp.agent.a" in perms.sub.allow
    bare = agent_permissions("a", [], [], [])
    assert not any(p.startswith(("evt.", "dlq.", "$JS.API.CONSUMER")) for p in bare.pub.allow)


def test_enrollment_allows_only_registration() -> None:
    perms = enrollment_permissions("crm-agent")
    assert perms.pub.allow == ["mesh.cp.register.crm-agent"]
    assert perms.sub.allow == ["_INBOX.crm-agent.>"]
    assert perms.resp is None


def test_admin_and_control_plane_have_the_whole_account() -> None:
    for perms in (admin_permissions(), control_plane_permissions()):
        assert perms.pub.allow == [">"]
        assert perms.sub.allow == [">"]


@pytest.mark.parametrize("bad", ["", "a.b", "*", ">", "a b", "crm\n", "ä", "x" * 201, "a>"])
@pytest.mark.parametrize("field", ["name", "system", "consumer", "flow"])
def test_names_must_be_single_tokens(field: str, bad: str) -> None:
    args = {"name": "a", "system": "crm", "consumer": "f-erp", "flow": "f"} | {field: bad}
    with pytest.raises(ConfigError, match="not a single NATS subject token"):
        agent_permissions(args["name"], [args["system"]], [args["consumer"]], [args["flow"]])


@pytest.mark.parametrize("prefix", ["", "mesh.*", "mesh.>", "mesh..cp", "mesh cp"])
def test_prefix_must_be_plain_tokens(prefix: str) -> None:
    with pytest.raises(ConfigError, match="subject prefix"):
        enrollment_permissions("a", prefix)


def test_markdown_table_lists_every_identity_and_permission() -> None:
    table = permission_table()
    lines = table.splitlines()
    assert lines[0].startswith("| identity |")
    assert len(lines) == 8  # 6 identities; System API serving is its own row
    for subject in AGENT.pub.allow + AGENT.sub.allow:
        rendered = subject.replace("crm-agent", "A").replace("sync-erp", "C").replace("sync", "F")
        assert f"`{rendered.replace('.crm', '.S')}`" in table


def test_readme_shows_the_current_table() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    assert permission_table() in readme, "README's permission table is stale: paste permission_table()"
