"""Least-privilege creds for an agent that runs the static flows of its config:
``permissions_for_agent`` and ``meshctl security issue-agent``."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mesh.cli.main import app
from mesh.config import parse_agent_config
from mesh.security.authority import Authority, read_creds
from mesh.security.jwt import UserClaims, decode
from mesh.security.permissions import agent_permissions, permissions_for_agent
from mesh.security.setup import init_security_dir
from mesh.transport.subjects import consumer_name, subject_matches


def _config(tmp_path: Path, *, source: bool, sink: bool, name: str = "crm-agent", extra: str = "") -> str:
    text = f"""
[agent]
name = "{name}"
system = "crm"
state_dir = "{tmp_path / "state"}"
{extra}
[[flows]]
name = "customers"
entity = "customer"
[[flows]]
name = "products"
entity = "product"
"""
    # the first flow gets the source and/or the sink, the second one never a source
    first, second = text.split("[[flows]]")[1:]
    src = f'[flows.source]\nadapter = "sqlite"\npath = "{tmp_path / "a.db"}"\ntable = "t"\nkey = "id"\n'
    snk = f'[flows.sink]\nadapter = "sqlite"\npath = "{tmp_path / "b.db"}"\ntable = "t"\nkey = "id"\n'
    head = text.split("[[flows]]")[0]
    return (
        head
        + "[[flows]]" + first + (src if source else "") + (snk if sink else "")
        + "[[flows]]" + second + snk
    )  # fmt: skip


def test_consumer_name_is_flow_and_sink_system() -> None:
    assert consumer_name("customers", "crm") == "customers-crm"


@pytest.mark.parametrize(("source", "sink"), [(True, False), (False, True), (True, True)])
def test_permissions_follow_the_flows(tmp_path: Path, source: bool, sink: bool) -> None:
    cfg = parse_agent_config(_config(tmp_path, source=source, sink=sink))
    perms = permissions_for_agent(cfg)
    consumers = (["customers-crm"] if sink else []) + ["products-crm"]
    flows = ["customers", "products"]
    assert perms == agent_permissions("crm-agent", ["crm"] if source else [], consumers, flows)
    pub = perms.pub.allow
    assert any(subject_matches(p, "evt.customer.created.crm") for p in pub) is source
    assert not any(subject_matches(p, "evt.customer.created.erp") for p in pub)
    assert any(subject_matches(p, "$JS.ACK.MESH_EVENTS.customers-crm.1.2.3.4.5.6") for p in pub) is sink
    assert any(subject_matches(p, "$JS.API.CONSUMER.MSG.NEXT.MESH_EVENTS.products-crm") for p in pub)
    assert not any(subject_matches(p, "$JS.API.CONSUMER.MSG.NEXT.MESH_EVENTS.products-erp") for p in pub)
    assert {"dlq.customers", "dlq.products"} <= set(pub)
    assert not any(subject_matches(p, "$JS.API.STREAM.CREATE.MESH_EVENTS") for p in pub)


def test_permissions_follow_the_prefix(tmp_path: Path) -> None:
    cfg = parse_agent_config(_config(tmp_path, source=True, sink=False))
    assert "acme.cp.heartbeat.crm-agent" in permissions_for_agent(cfg, "acme.cp").pub.allow


@pytest.fixture(scope="module")
def sec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("sec") / "sec"
    init_security_dir(d)
    return d


def test_issue_agent_writes_private_creds_to_the_config_path_and_keeps_the_key(
    sec: Path, tmp_path: Path
) -> None:
    creds = tmp_path / "creds" / "crm-agent.creds"
    extra = f'[nats]\ncreds = "{creds}"\ninbox_prefix = "_INBOX.crm-agent"\n'
    config = tmp_path / "agent.toml"
    config.write_text(_config(tmp_path, source=True, sink=True, extra=extra))
    result = CliRunner().invoke(app, ["security", "issue-agent", "--config", str(config), "--dir", str(sec)])
    assert result.exit_code == 0, result.output
    assert str(creds) in result.output
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    first = read_creds(creds)
    claims = Authority.load(sec).verify_user(first.jwt)
    assert claims.name == "crm-agent"
    assert isinstance(claims.nats, UserClaims)
    assert claims.nats.pub == permissions_for_agent(parse_agent_config(config.read_text())).pub

    # re-issued after a flow change: same key, new permissions
    config.write_text(_config(tmp_path, source=False, sink=True, extra=extra))
    result = CliRunner().invoke(app, ["security", "issue-agent", "-c", str(config), "--dir", str(sec)])
    assert result.exit_code == 0, result.output
    second = read_creds(creds)
    assert second.public_key == first.public_key
    assert "evt.*.*.crm" not in decode(second.jwt).nats.pub.allow  # type: ignore[union-attr]


def test_issue_agent_out_overrides_the_config(sec: Path, tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(_config(tmp_path, source=True, sink=False))
    out = tmp_path / "elsewhere.creds"
    args = ["security", "issue-agent", "--config", str(config), "--dir", str(sec), "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert read_creds(out).name == "crm-agent"


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no-path", "no [nats] creds path in the config"),
        ("no-dir", "is not a mesh security dir"),
        ("bad-config", "agent.toml"),
    ],
)
def test_issue_agent_errors_are_one_line(sec: Path, tmp_path: Path, case: str, message: str) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("[agent]\n" if case == "bad-config" else _config(tmp_path, source=True, sink=False))
    directory = tmp_path / "nothing" if case == "no-dir" else sec
    args = ["security", "issue-agent", "--config", str(config), "--dir", str(directory)]
    if case == "no-dir":
        args += ["--out", str(tmp_path / "x.creds")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_issue_agent_warns_about_another_inbox_prefix(sec: Path, tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    extra = '[nats]\ninbox_prefix = "_INBOX"\n'
    config.write_text(_config(tmp_path, source=True, sink=False, extra=extra))
    out = tmp_path / "a.creds"
    args = ["security", "issue-agent", "-c", str(config), "--dir", str(sec), "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0
    assert "_INBOX.crm-agent" in result.output


def test_issue_leaf_writes_a_private_mesh_user_for_the_link(sec: Path, tmp_path: Path) -> None:
    out = tmp_path / "leaf" / "leaf-edge.creds"
    args = ["security", "issue-leaf", "--dir", str(sec), "--domain", "edge", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    creds = read_creds(out)
    claims = Authority.load(sec).verify_user(creds.jwt)
    assert claims.name == "leaf-edge"
    assert isinstance(claims.nats, UserClaims)
    assert claims.nats.pub.allow == [">"]
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0
    assert read_creds(out).public_key == creds.public_key  # re-issued with the same key
    bad = CliRunner().invoke(app, [*args[:-4], "--domain", "a.b", "--out", str(out)])
    assert bad.exit_code == 2
    assert "not a single NATS subject token" in bad.output
