"""The control-plane command apps without a control plane: help, argument errors, exit codes."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from mesh.broker import free_port
from mesh.cli import (
    agent_cp as cli_agent_cp,
)
from mesh.cli import (
    audit as cli_audit,
)
from mesh.cli import (
    cp as cli_cp,
)
from mesh.errors import ConfigError

runner = CliRunner()


def test_apps_list_their_commands() -> None:
    out = runner.invoke(cli_agent_cp.app, ["--help"]).output
    for command in ("register", "deregister", "revoke", "list", "health"):
        assert command in out
    assert "run" in runner.invoke(cli_cp.app, ["--help"]).output
    assert "tail" in runner.invoke(cli_audit.app, ["--help"]).output


def test_no_control_plane_is_one_line_and_exit_2(tmp_path: object) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    r = runner.invoke(cli_agent_cp.app, ["list", "--control-plane", url, "--timeout", "1"])
    assert r.exit_code == 2
    assert r.output.startswith("error: cannot connect")
    assert "Traceback" not in r.output
    r = runner.invoke(cli_audit.app, ["tail", "--nats", url])
    assert r.exit_code == 2


def test_register_needs_a_name() -> None:
    r = runner.invoke(cli_agent_cp.app, ["register", "--site", "s"])
    assert r.exit_code == 2
    assert "--name" in r.output


def test_run_rejects_bad_settings_before_starting() -> None:
    r = runner.invoke(cli_cp.app, ["run", "--http", "nowhere"])
    assert r.exit_code == 2
    assert "HOST:PORT" in r.output
    r = runner.invoke(cli_cp.app, ["run", "--stale-after", "90", "--lost-after", "60"])
    assert r.exit_code == 2
    assert "stale_after" in r.output
    r = runner.invoke(cli_cp.app, ["run", "--http-token-env", "MESH_TEST_UNSET_TOKEN_VAR"])
    assert r.exit_code == 2
    assert "MESH_TEST_UNSET_TOKEN_VAR" in r.output


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("[::1]:9", ("::1", 9)),
        (":0", ("127.0.0.1", 0)),
        ("off", None),
    ],
)
def test_parse_http_address(text: str, expected: object) -> None:
    assert cli_cp.parse_http_address(text) == expected


def test_parse_http_address_rejects_garbage() -> None:
    with pytest.raises(ConfigError):
        cli_cp.parse_http_address("localhost")
