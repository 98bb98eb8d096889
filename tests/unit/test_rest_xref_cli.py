"""``meshctl xref get|list``: the ids a REST target assigned, read from a real sink state file
written by the sink against the Xero-shaped fake."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from adapters.rest.config import RestSinkConfig
from adapters.rest.sink import RestSink
from examples._fake_xero import BASE, FakeXero
from mesh.adapters import SinkRecord
from mesh.cli.main import app
from mesh.config import load_agent_config

runner = CliRunner()

AGENT = f"""
[agent]
name = "finance-agent"
system = "finance"
state_dir = "state"

[[flows]]
name = "contacts"
entity = "customer"

[flows.sink]
adapter = "rest"
base_url = "http://xero.test{BASE}"
state_path = "state/contacts.db"
create = {{ method = "POST", path = "/Contacts" }}
update = {{ method = "POST", path = "/Contacts/{{id}}" }}
delete_path = "/Contacts/{{id}}"
envelope = "Contacts"
key_field = "ContactNumber"
results = {{ id = "ContactID" }}

[[flows]]
name = "other"
entity = "customer"
[flows.sink]
adapter = "csv"
out_dir = "out"
state_path = "state/out.db"
"""


@pytest.fixture
def agent(tmp_path: Path) -> Path:
    (tmp_path / "state").mkdir()
    path = tmp_path / "agent.toml"
    path.write_text(AGENT)
    return path


async def _fill(agent: Path, fake: FakeXero) -> None:
    sink_cfg = load_agent_config(agent).flows[0].sink
    assert isinstance(sink_cfg, RestSinkConfig)
    async with RestSink(sink_cfg, transport=httpx.ASGITransport(app=fake.app)) as sink:
        rows = [
            SinkRecord(id=f"e{k}", key=k, version=1, deleted=False, row={"Name": k}, origin="erp")
            for k in ("C1", "C2")
        ]
        await sink.apply(rows)


@pytest.mark.anyio
async def test_xref_get_and_list(agent: Path) -> None:
    fake = FakeXero()
    await _fill(agent, fake)
    [c1] = fake.by_number("Contacts", "C1")
    got = runner.invoke(app, ["xref", "get", "contacts", "C1", "--config", str(agent), "--json"])
    assert got.exit_code == 0, got.output
    assert json.loads(got.output)["id"] == c1["ContactID"]
    listed = runner.invoke(app, ["xref", "list", "contacts", "--config", str(agent)])
    assert listed.exit_code == 0, listed.output
    assert c1["ContactID"] in listed.output
    assert "C2" in listed.output
    missing = runner.invoke(app, ["xref", "get", "contacts", "C9", "--config", str(agent)])
    assert missing.exit_code == 1
    assert "no id for key 'C9'" in missing.output


def test_xref_errors_are_one_line(agent: Path) -> None:
    no_state = runner.invoke(app, ["xref", "list", "contacts", "--config", str(agent)])
    assert no_state.exit_code == 2
    assert "no such file (has the sink run yet?)" in no_state.output
    not_rest = runner.invoke(app, ["xref", "list", "other", "--config", str(agent)])
    assert not_rest.exit_code == 2
    assert "has no REST sink" in not_rest.output
    unknown = runner.invoke(app, ["xref", "list", "nope", "--config", str(agent)])
    assert unknown.exit_code == 2
    assert "no flow 'nope'" in unknown.output
    assert "Traceback" not in no_state.output + not_rest.output + unknown.output
