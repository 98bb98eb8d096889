"""Secrets are referenced (``*_env`` / ``*_file``), never held: static credential headers are
refused with the field path, secret files are read (trailing newline dropped, empty = clear
error), and secret files in applied flows are confined like every other path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from adapters.rest._auth import Credentials
from adapters.rest.config import RestSinkConfig, RestSourceConfig
from adapters.webhook._signature import Verifier
from adapters.webhook.config import WebhookSourceConfig
from agents.flows import flow_from_assignment
from mesh.config import NatsConfig, decode_adapter_config, parse_agent_config
from mesh.controlplane.flows import parse_flow_file
from mesh.controlplane.models import AgentRecord, Manifest
from mesh.errors import ConfigError
from mesh.secrets import read_secret, secret_header_problem

pytestmark = pytest.mark.timeout(30)

SECRET = "s3cr3t-Zq9-never-printed"


def _sink(**fields: Any) -> dict[str, Any]:
    return {
        "adapter": "rest", "base_url": "https://crm.example.com", "upsert_path": "/c/{key}",
        "state_path": "rest.db", **fields,
    }  # fmt: skip


def _source(**fields: Any) -> dict[str, Any]:
    return {
        "adapter": "rest", "base_url": "https://crm.example.com", "path": "/c",
        "version_field": "v", **fields,
    }  # fmt: skip


SECRET_HEADERS = [
    "Authorization", "authorization", "Cookie", "Proxy-Authorization", "X-Api-Key", "X-API-KEY",
    "X-Auth-Token", "X-Access-Token", "Api-Key", "X-Apikey", "X-Client-Secret", "X-Password",
    "X-Amz-Security-Token", "Private-Token",
]  # fmt: skip


@pytest.mark.parametrize("name", SECRET_HEADERS)
@pytest.mark.parametrize(("side", "make"), [("sink", _sink), ("source", _source)])
def test_static_credential_headers_are_refused_with_the_field_path(side: str, make: Any, name: str) -> None:
    with pytest.raises(ConfigError) as err:
        decode_adapter_config(side, make(headers={name: SECRET}), path=f"flows[0].{side}")  # type: ignore[arg-type]
    text = str(err.value)
    assert f"flows[0].{side}" in text
    assert f"headers.{name}" in text
    assert "headers_env" in text
    assert "headers_file" in text
    assert SECRET not in text


@pytest.mark.parametrize("name", ["Accept", "X-Tenant", "User-Agent", "Idempotency-Key", "X-Request-Id"])
def test_harmless_static_headers_pass(name: str) -> None:
    assert secret_header_problem(name) is None
    cfg = decode_adapter_config("sink", _sink(headers={name: "x"}), path="s")
    assert isinstance(cfg, RestSinkConfig)


def test_a_header_may_come_from_one_place_only() -> None:
    with pytest.raises(ConfigError, match=r"headers_env\.x-tenant: also set in headers"):
        decode_adapter_config(
            "sink", _sink(headers={"X-Tenant": "a"}, headers_env={"x-tenant": "T"}), path="s"
        )


def test_secret_headers_from_env_and_files_are_sent_and_masked(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(SECRET + "\n")
    cfg = decode_adapter_config(
        "sink",
        _sink(headers_env={"X-Api-Key": "API_KEY"}, headers_file={"X-Auth-Token": str(tmp_path / "token")}),
        path="s",
    )
    assert isinstance(cfg, RestSinkConfig)
    creds = Credentials(
        cfg.auth, {"API_KEY": "k3y-" + SECRET}, headers_env=cfg.headers_env, headers_file=cfg.headers_file
    )
    assert creds.headers == {"X-Api-Key": "k3y-" + SECRET, "X-Auth-Token": SECRET}
    assert SECRET not in repr(creds)
    assert creds.redact(f"401 for {SECRET} and k3y-{SECRET}") == "401 for *** and ***"


def test_an_empty_or_missing_secret_file_is_a_clear_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match=r"headers_file\.X-Token: the REST secret file .*empty is empty"):
        Credentials(None, {}, headers_file={"X-Token": str(empty)})
    with pytest.raises(ConfigError, match=r"headers_file\.X-Token: cannot read .* secret file"):
        Credentials(None, {}, headers_file={"X-Token": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match=r"headers_env\.X-Token: environment variable TOK .*not set"):
        Credentials(None, {}, headers_env={"X-Token": "TOK"})


@pytest.mark.parametrize(
    ("kind", "field"),
    [("bearer", "token"), ("api_key", "key"), ("oauth2", "client_secret"), ("basic", "password")],
)
def test_every_auth_secret_has_a_file_alternative(tmp_path: Path, kind: str, field: str) -> None:
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\r\n")
    auth: dict[str, Any] = {"type": kind, f"{field}_file": str(secret)}
    if kind == "basic":
        auth["user"] = "mesh"
    if kind == "oauth2":
        auth |= {"token_url": "https://login.example.com/token", "client_id": "mesh"}
    cfg = decode_adapter_config("source", _source(auth=auth), path="s")
    assert isinstance(cfg, RestSourceConfig)
    creds = Credentials(cfg.auth, {})
    assert SECRET not in repr(creds)
    assert "file:" in repr(creds)
    if kind == "bearer":
        assert creds.headers == {"Authorization": f"Bearer {SECRET}"}
    both = auth | {f"{field}_env": "X"}
    with pytest.raises(ConfigError, match=f"{field}_env / {field}_file: set exactly one"):
        decode_adapter_config("source", _source(auth=both), path="s")


def test_webhook_secret_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "hook").write_text(SECRET + "\n")
    (tmp_path / "old").write_text("old-" + SECRET)
    cfg = msgspec.convert(
        {
            "adapter": "webhook", "port": 0, "state_path": "w.db", "key_field": "id",
            "secret_file": str(tmp_path / "hook"), "rotation_secret_files": [str(tmp_path / "old")],
        },
        WebhookSourceConfig,
    )  # fmt: skip
    verifier = Verifier.from_config(cfg, {})
    assert SECRET not in repr(verifier)
    from adapters.webhook.source import sign

    body = b'{"id": 1}'
    for secret in (SECRET, "old-" + SECRET):
        verifier.verify({"Webhook-Signature": sign(secret, body)}, body)
    with pytest.raises(msgspec.ValidationError, match="secret_env / secret_file"):
        msgspec.convert(
            {"adapter": "webhook", "port": 0, "state_path": "w.db", "key_field": "id"}, WebhookSourceConfig
        )


def test_postgres_and_nats_passwords_take_a_file_too(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="password_env / password_file: set at most one"):
        decode_adapter_config(
            "sink",
            {"adapter": "postgres", "dsn": "host=db dbname=erp user=mesh", "table": "t", "key": "id",
             "password_env": "PG", "password_file": "pg.txt"},
            path="s",
        )  # fmt: skip
    with pytest.raises(msgspec.ValidationError, match="password_env / password_file"):
        msgspec.convert({"password_env": "A", "password_file": "b"}, NatsConfig)
    (tmp_path / "nats.pw").write_text(SECRET + "\n")
    agent = tmp_path / "agent.toml"
    text = (
        '[agent]\nname = "a"\nsystem = "erp"\nstate_dir = "s"\n'
        '[nats]\nuser = "u"\npassword_file = "nats.pw"\n'
    )
    cfg = parse_agent_config(text, source=str(agent), base=tmp_path)
    assert cfg.nats.password_file == str(tmp_path / "nats.pw")
    assert read_secret(None, cfg.nats.password_file, field="nats.password", what="NATS") == SECRET


def _bearer_flow(token_file: str) -> dict[str, Any]:
    return {
        "name": "customers", "entity": "customer",
        "sink": _sink(state_path="rest.db", auth={"type": "bearer", "token_file": token_file}),
    }  # fmt: skip


def test_secret_files_of_applied_flows_are_confined_on_both_sides(tmp_path: Path) -> None:
    """A flow that names /etc/shadow as a token file would send that file to the flow's URL."""
    state = tmp_path / "state"
    state.mkdir()
    with pytest.raises(ConfigError, match="outside"):
        flow_from_assignment(_bearer_flow("/etc/shadow"), str(state))
    (state / "tok").write_text(SECRET)
    flow = flow_from_assignment(_bearer_flow("tok"), str(state))
    assert isinstance(flow.sink, RestSinkConfig)
    assert flow.sink.auth is not None
    assert getattr(flow.sink.auth, "token_file", None) == str(state / "tok")

    manifest = Manifest(adapters=["rest"], state_dir=str(state))
    agent = AgentRecord(
        agent_id="i", name="crm", site="s", host="h", version="1", identity="x", credential="y",
        manifest=manifest,
    )  # fmt: skip
    text = """
[[flows]]
name = "customers"
entity = "customer"
[flows.sink]
agent = "crm"
adapter = "rest"
base_url = "https://crm.example.com"
upsert_path = "/c/{key}"
state_path = "rest.db"
[flows.sink.auth]
type = "bearer"
token_file = "/etc/shadow"
"""
    _, problems = parse_flow_file(text, "flows.toml", {"crm": agent})
    (problem,) = problems
    assert problem.startswith("flows.toml: flows[0].sink.auth.token_file: ")
