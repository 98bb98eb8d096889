"""Every meshctl command that talks to NATS takes --creds and --tls-ca/--tls-cert/--tls-key
(with their MESH_* environment variables), checked before anything connects; [nats.tls] in an
agent config is validated with its field path and resolved against the file's directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from mesh.cli.main import app
from mesh.config import parse_agent_config
from mesh.errors import ConfigError

ACCESS_OPTIONS = {
    "--creds": "MESH_CREDS",
    "--tls-ca": "MESH_TLS_CA",
    "--tls-cert": "MESH_TLS_CERT",
    "--tls-key": "MESH_TLS_KEY",
}


def _commands(command: Any, path: tuple[str, ...] = ()) -> list[tuple[str, Any]]:
    """(``"group sub"``, command) for every leaf of typer's (vendored click) command tree."""
    if getattr(command, "commands", None):
        found = []
        for name, sub in command.commands.items():
            found += _commands(sub, (*path, name))
        return found
    return [(" ".join(path), command)]


def _envvars(option: Any) -> list[str]:
    env = option.envvar
    return [env] if isinstance(env, str) else list(env or [])


def _talks_to_nats(command: Any) -> bool:
    return any("MESH_NATS_URL" in _envvars(p) for p in command.params)


COMMANDS = _commands(typer.main.get_command(app))
NATS_COMMANDS = [(name, c) for name, c in COMMANDS if _talks_to_nats(c) or name == "leafnode link"]


def test_the_walk_finds_the_nats_commands() -> None:
    names = {name for name, _ in NATS_COMMANDS}
    expected = {
        "flow list", "flow apply", "flow replay", "dlq list", "dlq purge", "agent register",
        "agent list", "agent revoke", "control-plane run", "control-plane status", "audit tail",
        "leafnode link",
    }  # fmt: skip
    assert expected <= names, expected - names


@pytest.mark.parametrize("name", [name for name, _ in NATS_COMMANDS])
def test_every_nats_command_takes_the_creds_and_tls_options(name: str) -> None:
    command = dict(COMMANDS)[name]
    options = {o: p for p in command.params for o in p.opts}
    for option, env in ACCESS_OPTIONS.items():
        assert option in options, f"meshctl {name} lacks {option}"
        assert _envvars(options[option]) == [env], (
            f"meshctl {name} {option} reads {_envvars(options[option])}"
        )


def test_commands_that_do_not_talk_to_nats_do_not_get_them() -> None:
    command = dict(COMMANDS)["config check"]
    assert not {o for p in command.params for o in p.opts} & ACCESS_OPTIONS.keys()


def test_a_missing_creds_file_is_one_line_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nobody.creds"
    result = CliRunner().invoke(app, ["flow", "list", "--creds", str(missing)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: --creds (MESH_CREDS): no such file: {missing}"]


def test_the_creds_file_is_read_from_mesh_creds(tmp_path: Path) -> None:
    missing = tmp_path / "env.creds"
    result = CliRunner().invoke(app, ["dlq", "list"], env={"MESH_CREDS": str(missing)})
    assert result.exit_code == 2
    assert f"no such file: {missing}" in result.output
    assert "Traceback" not in result.output


def test_a_missing_tls_file_and_a_cert_without_key_are_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["agent", "list", "--tls-ca", str(tmp_path / "ca.pem")])
    assert result.exit_code == 2
    assert f"--tls-ca (MESH_TLS_CA): no such file: {tmp_path / 'ca.pem'}" in result.output
    cert = tmp_path / "client.pem"
    cert.write_text("not used")
    result = CliRunner().invoke(app, ["agent", "list"], env={"MESH_TLS_CERT": str(cert)})
    assert result.exit_code == 2
    assert "--tls-cert and --tls-key go together" in result.output


AGENT = """
[agent]
name = "erp-agent"
system = "erp"
state_dir = "state"

[nats]
servers = ["tls://127.0.0.1:4222"]
"""


def test_nats_tls_in_an_agent_config_is_resolved_against_the_file(tmp_path: Path) -> None:
    (tmp_path / "pki").mkdir()
    for name in ("ca.pem", "agent.pem", "agent.key"):
        (tmp_path / "pki" / name).write_text("pem")
    text = (
        AGENT
        + '[nats.tls]\nca_file = "pki/ca.pem"\ncert_file = "pki/agent.pem"\nkey_file = "pki/agent.key"\n'
    )
    cfg = parse_agent_config(text, source="a.toml", base=tmp_path)
    assert cfg.nats.tls is not None
    assert cfg.nats.tls.ca_file == str(tmp_path / "pki" / "ca.pem")
    assert cfg.nats.tls.key_file == str(tmp_path / "pki" / "agent.key")


def test_nats_tls_problems_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as missing:
        parse_agent_config(AGENT + '[nats.tls]\nca_file = "nope.pem"\n', source="a.toml", base=tmp_path)
    assert missing.value.problems[0].path == "nats.tls.ca_file"
    assert "no such file: " in missing.value.problems[0].message
    (tmp_path / "c.pem").write_text("pem")
    with pytest.raises(ConfigError) as alone:
        parse_agent_config(AGENT + '[nats.tls]\ncert_file = "c.pem"\n', source="a.toml", base=tmp_path)
    assert alone.value.problems[0].path == "nats.tls"
    assert "cert_file and key_file go together" in alone.value.problems[0].message


# --- the control plane's HTTPS settings ------------------------------------------------------


def test_https_needs_cert_and_key_and_both_files(tmp_path: Path) -> None:
    from mesh.controlplane.settings import settings_from

    cert = tmp_path / "cert.pem"
    cert.write_text("pem")
    with pytest.raises(ConfigError, match="http_tls_cert_file and http_tls_key_file go together"):
        settings_from({"http_tls_cert_file": str(cert)})
    with pytest.raises(ConfigError) as missing:
        settings_from({"http_tls_cert_file": str(cert), "http_tls_key_file": str(tmp_path / "key.pem")})
    assert missing.value.problems[0].path == "http_tls_key_file"
    assert str(tmp_path / "key.pem") in missing.value.problems[0].message
    with pytest.raises(ConfigError) as ca:
        settings_from({"nats": {"tls": {"ca_file": str(tmp_path / "ca.pem")}}})
    assert ca.value.problems[0].path == "nats.tls.ca_file"
