"""Names refuse a trailing newline; state dirs are 0700 and stores 0600 whoever creates them."""

from __future__ import annotations

import io
import logging
import os
import stat
from pathlib import Path

import msgspec
import pytest
from typer.testing import CliRunner

from agents.flows import flow_from_assignment
from mesh.cli import app
from mesh.config import Token, decode_adapter_config, parse_agent_config
from mesh.controlplane.models import Token as CpToken
from mesh.errors import ConfigError
from mesh.logs import setup_logging
from mesh.redact import redact_urls
from mesh.store import Outbox, private_dir

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("kind", [Token, CpToken])
@pytest.mark.parametrize("bad", ["erp\n", "erp\r\n", "\nerp", "e rp", "erp.x", ""])
def test_names_refuse_newlines_and_separators(kind: object, bad: str) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(bad, kind)  # type: ignore[call-overload]


@pytest.mark.parametrize("kind", [Token, CpToken])
def test_a_plain_name_passes(kind: object) -> None:
    assert msgspec.convert("erp-agent_1", kind) == "erp-agent_1"  # type: ignore[call-overload]


def test_agent_name_with_a_trailing_newline_is_a_config_error(tmp_path: Path) -> None:
    text = '[agent]\nname = "erp\\n"\nsystem = "erp"\nstate_dir = "s"\n'
    with pytest.raises(ConfigError) as err:
        parse_agent_config(text, source="agent.toml", base=tmp_path)
    assert "agent.name" in str(err.value)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_dir_creates_0700_and_tightens_an_existing_one(tmp_path: Path) -> None:
    fresh = tmp_path / "a" / "state"
    private_dir(fresh)
    assert _mode(fresh) == 0o700
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    private_dir(loose)
    assert _mode(loose) == 0o700


@pytest.mark.anyio
async def test_stores_are_0600_with_their_wal_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        state = tmp_path / "state"
        async with Outbox(state / "outbox.db") as outbox:
            await outbox.capture("f", "c1", [("id1", "evt.x.upserted.erp", b"x")])
            files = sorted(p.name for p in state.iterdir())
            assert "outbox.db" in files
            for p in state.iterdir():
                assert _mode(p) == 0o600, (p.name, oct(_mode(p)))
        assert _mode(state) == 0o700
        os.chmod(state / "outbox.db", 0o644)  # loosened by hand: the next open tightens it
        async with Outbox(state / "outbox.db"):
            assert _mode(state / "outbox.db") == 0o600
    finally:
        os.umask(old)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nats://mesh:s3cret@hub:4222", "nats://***@hub:4222"),
        ("tls://tok3n@hub:4222", "tls://***@hub:4222"),
        ("postgresql://mesh:p%40ss@db:5432/erp?x=1", "postgresql://***@db:5432/erp?x=1"),
        ("a nats://u:p@h1, b nats://u:q@h2", "a nats://***@h1, b nats://***@h2"),
        ("nats://hub:4222 and https://example.com/a@b", "nats://hub:4222 and https://example.com/a@b"),
    ],
)
def test_urls_lose_their_userinfo(text: str, expected: str) -> None:
    assert redact_urls(text) == expected


def test_lists_of_servers_are_redacted_too() -> None:
    assert redact_urls(["nats://u:p@a:1", "nats://b:2"]) == "nats://***@a:1, nats://b:2"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_log_lines_never_carry_url_credentials(fmt: str) -> None:
    out = io.StringIO()
    setup_logging("info", stream=out, fmt=fmt)  # type: ignore[arg-type]
    try:
        logging.getLogger("t").info("connecting to %s", "nats://mesh:s3cret@hub:4222")
        try:
            raise ValueError("dsn postgresql://mesh:s3cret@db/erp refused")
        except ValueError:
            logging.getLogger("t").exception("boom")
    finally:
        logging.getLogger().handlers.clear()
    text = out.getvalue()
    assert "s3cret" not in text
    assert text.count("***@") == 3  # the message, the exception and its source line in the traceback


def test_cli_errors_never_print_url_credentials() -> None:
    result = CliRunner().invoke(
        app, ["dlq", "list", "--server", "nats://mesh:s3cret@127.0.0.1:1"], catch_exceptions=False
    )
    assert result.exit_code == 2
    assert "s3cret" not in result.output
    assert "nats://***@127.0.0.1:1" in result.output


def _assigned(sink_path: str) -> dict[str, object]:
    flow: dict[str, object] = {
        "name": "customers",
        "entity": "customer",
        "sink": {"adapter": "sqlite", "path": sink_path, "table": "customers", "key": "id"},
    }
    return flow


@pytest.mark.parametrize("path", ["../../../x.db", "/etc/mesh-x.db", "sub/../../x.db"])
def test_an_applied_flow_may_not_leave_the_state_dir(tmp_path: Path, path: str) -> None:
    state = tmp_path / "state"
    state.mkdir()
    with pytest.raises(ConfigError) as err:
        flow_from_assignment(_assigned(path), str(state))
    (problem,) = err.value.problems
    assert problem.path == "flows.customers.sink"
    assert repr(path) in problem.message
    assert "outside" in problem.message


def test_a_symlink_out_of_the_state_dir_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "link").symlink_to(tmp_path)
    with pytest.raises(ConfigError, match="outside"):
        flow_from_assignment(_assigned("link/x.db"), str(state))


def test_paths_inside_the_state_dir_or_an_allowed_dir_pass(tmp_path: Path) -> None:
    state, shared = tmp_path / "state", tmp_path / "srv" / "crm"
    state.mkdir()
    shared.mkdir(parents=True)
    inside = flow_from_assignment(_assigned("sub/crm.db"), str(state))
    assert inside.sink is not None
    assert inside.sink.path == str(state / "sub" / "crm.db")  # type: ignore[attr-defined]
    allowed = flow_from_assignment(_assigned(str(shared / "crm.db")), str(state), [str(shared)])
    assert allowed.sink is not None
    assert allowed.sink.path == str(shared / "crm.db")  # type: ignore[attr-defined]
    with pytest.raises(ConfigError):
        flow_from_assignment(_assigned(str(shared / "crm.db")), str(state))


def test_allowed_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    text = '[agent]\nname = "crm"\nsystem = "crm"\nstate_dir = "s"\nallowed_paths = ["data"]\n'
    cfg = parse_agent_config(text, source="agent.toml", base=tmp_path)
    assert cfg.agent.allowed_paths == [str(tmp_path / "data")]


@pytest.mark.parametrize(
    "dsn",
    [
        "host=db password=s3cret",
        "host=db   password = 's3cret'",
        "postgresql://mesh:s3cret@db/erp",
        "postgres://mesh:s3cret@db/erp",
        "postgresql://mesh@db/erp?password=s3cret",
        "postgresql://mesh@db/erp?pass%77ord=s3cret",
        "postgresql://mesh:s3%23cret@db/erp",
        "postgresql://mesh:s3#cret@db/erp",
        "postgresql://mesh@db/erp?sslmode=require&password=s3cret",
    ],
)
def test_a_password_in_a_dsn_is_refused_in_any_form(dsn: str) -> None:
    spec = {"adapter": "postgres", "dsn": dsn, "table": "t", "key": "id"}
    with pytest.raises(ConfigError) as err:
        decode_adapter_config("source", spec, source="agent.toml", path="flows[0].source")
    message = str(err.value)
    assert "must not hold a password" in message
    assert "agent.toml: flows[0].source" in message
    assert "s3" not in message


@pytest.mark.parametrize(
    "dsn", ["host=db dbname=erp user=mesh", "postgresql://mesh@db/erp", "host=db passfile=/run/pgpass"]
)
def test_a_dsn_without_a_password_passes(dsn: str) -> None:
    spec = {"adapter": "postgres", "dsn": dsn, "table": "t", "key": "id"}
    assert decode_adapter_config("source", spec).dsn == dsn  # type: ignore[attr-defined]
