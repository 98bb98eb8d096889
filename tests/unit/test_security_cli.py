"""``meshctl security issue-orchestrator`` and ``issue-leaf`` (``issue-agent``: test_agent_creds):
the config's creds path or ``--out``, the key kept on re-issue, the inbox-prefix warning, and the
one-line error without a path."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mesh.cli.main import app
from mesh.security.authority import Authority, read_creds
from mesh.security.jwt import UserClaims
from mesh.security.permissions import admin_permissions
from mesh.security.setup import init_security_dir

_SAGA = """
[[sagas]]
name = "q2c"
trigger = { subject = "evt.deal.upserted.crm" }
[[sagas.steps]]
name = "order"
subject = "api.erp.sales_order.create"
request = { deal = "$trigger.payload.deal_id" }
"""


@pytest.fixture(scope="module")
def sec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("sec") / "sec"
    init_security_dir(d)
    return d


def _orchestrator(tmp_path: Path, nats: str) -> Path:
    config = tmp_path / "orchestrator.toml"
    config.write_text(f'[orchestrator]\nname = "q2c-orchestrator"\n[nats]\n{nats}\n{_SAGA}')
    return config


def test_issue_orchestrator_writes_its_creds_keeps_the_key_and_warns_about_the_inbox(
    sec: Path, tmp_path: Path
) -> None:
    creds = tmp_path / "creds" / "orch.creds"
    config = _orchestrator(tmp_path, f'creds = "{creds}"\ninbox_prefix = "_INBOX.q2c-orchestrator"')
    args = ["security", "issue-orchestrator", "--config", str(config), "--dir", str(sec)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"wrote {creds} for orchestrator q2c-orchestrator: publishes" in result.output
    assert "warning" not in result.output
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    first = read_creds(creds)
    claims = Authority.load(sec).verify_user(first.jwt)
    assert claims.name == "q2c-orchestrator"
    assert isinstance(claims.nats, UserClaims)
    assert "api.>" in claims.nats.pub.allow
    # Re-issued with the inbox prefix unset: same key, and a warning (unlike an agent's).
    config = _orchestrator(tmp_path, f'creds = "{creds}"')
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "[nats] inbox_prefix is None; these creds only receive replies on '_INBOX.q2c-orchestrator'" in (
        result.output
    )
    assert read_creds(creds).public_key == first.public_key


def test_issue_orchestrator_needs_a_creds_path(sec: Path, tmp_path: Path) -> None:
    config = _orchestrator(tmp_path, 'servers = ["nats://127.0.0.1:4222"]')
    args = ["security", "issue-orchestrator", "--config", str(config), "--dir", str(sec)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert (
        f"{config}: no [nats] creds path in the config: pass --out PATH or set [nats] creds" in result.output
    )
    assert "Traceback" not in result.output
    out = tmp_path / "o.creds"
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert read_creds(out).public_key


def test_issue_leaf_writes_an_account_wide_user_for_the_domain(sec: Path, tmp_path: Path) -> None:
    out = tmp_path / "leaf.creds"
    args = ["security", "issue-leaf", "--dir", str(sec), "--domain", "site1", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"wrote {out} (user leaf-site1)" in result.output
    claims = Authority.load(sec).verify_user(read_creds(out).jwt)
    assert claims.name == "leaf-site1"
    assert isinstance(claims.nats, UserClaims)
    assert claims.nats.pub == admin_permissions().pub
    bad = CliRunner().invoke(
        app, ["security", "issue-leaf", "--dir", str(sec), "--domain", "a.b", "--out", str(out)]
    )
    assert bad.exit_code == 2
    assert "domain" in bad.output
