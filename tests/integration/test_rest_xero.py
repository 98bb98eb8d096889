"""End to end into a Xero-shaped finance API over real HTTP: ERP (SQLite) -> agents (real
nats-server, secured) -> the REST sink with envelope, batches, per-record results, the
cross-reference and archive-instead-of-delete. Every contact is created once and carries
Xero's id, deletes archive, no DELETE is ever sent, and the one record Xero refuses is
dead-lettered with its status, request and response bodies, shown by ``meshctl dlq show``."""

from __future__ import annotations

import functools
import json
import sqlite3
from pathlib import Path

import anyio
import pytest
from typer.testing import CliRunner

from adapters.rest._state import read_xrefs
from agents.connector import ConnectorAgent
from examples._fake_xero import FakeXero
from mesh.cli.main import app
from tests._secure import SecuredNatsServer as NatsServer
from tests._secure import secure_config, write_agent_config
from tests.integration._harness import AgentProcess

pytestmark = [pytest.mark.anyio, pytest.mark.integration, pytest.mark.timeout(90)]

runner = CliRunner()

ERP_SCHEMA = "CREATE TABLE contacts (id TEXT PRIMARY KEY, Name TEXT, EmailAddress TEXT);"


def erp_toml(tmp: Path, url: str) -> str:
    return f"""
[agent]
name = "erp-agent"
system = "erp"
state_dir = "{tmp / "s-erp"}"
[nats]
servers = ["{url}"]
[[flows]]
name = "contacts"
entity = "customer"
[flows.source]
adapter = "sqlite"
path = "{tmp / "erp.db"}"
table = "contacts"
key = "id"
poll_interval = 0.02
"""


def finance_toml(tmp: Path, url: str, api: str, timeout: float = 5.0) -> str:
    return f"""
[agent]
name = "finance-agent"
system = "finance"
state_dir = "{tmp / "s-fin"}"
[nats]
servers = ["{url}"]
[[flows]]
name = "contacts"
entity = "customer"
[flows.consumer]
batch_size = 100
fetch_timeout = 0.2
ack_wait = 10.0
max_deliver = 3
[flows.retry]
initial_delay = 0.1
max_delay = 0.5
[flows.sink]
adapter = "rest"
base_url = "{api}"
state_path = "{tmp / "s-fin" / "contacts.db"}"
create = {{ method = "POST", path = "/Contacts", params = {{ summarizeErrors = "false" }} }}
update = {{ method = "POST", path = "/Contacts/{{id}}" }}
delete = {{ method = "POST", path = "/Contacts/{{id}}" }}
delete_mode = "update"
delete_body = {{ ContactStatus = "ARCHIVED" }}
envelope = "Contacts"
batch_size = 50
key_field = "ContactNumber"
id_field = "ContactID"
fields = ["Name", "EmailAddress"]
omit_nulls = true
error_path = "Elements[].ValidationErrors[].Message"
timeout = {timeout}
[flows.sink.results]
status = "StatusAttributeString"
errors = "ValidationErrors[].Message"
id = "ContactID"
[flows.sink.lookup]
path = "/Contacts"
params = {{ where = 'ContactNumber=="{{key}}"' }}
id_path = "Contacts[0].ContactID"
"""


async def test_contacts_into_xero_with_ids_archive_and_readable_dead_letters(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    (tmp_path / "s-fin").mkdir()
    with sqlite3.connect(tmp_path / "erp.db") as db:
        db.executescript(ERP_SCHEMA)
        db.executemany(
            "INSERT INTO contacts VALUES (?, ?, ?)",
            [(f"C{i:03}", f"Customer {i}", None if i % 3 else f"c{i}@example.com") for i in range(120)],
        )
        db.execute("INSERT INTO contacts VALUES ('BAD', '', NULL)")  # Xero refuses an empty name
    erp = ConnectorAgent(
        secure_config(erp_toml(tmp_path, nats_server.url), tmp_path / "erp.creds", nats_server)
    )
    fake = FakeXero()
    async with anyio.create_task_group() as tg:
        api = await tg.start(fake.run)
        fin = ConnectorAgent(
            secure_config(finance_toml(tmp_path, nats_server.url, api), tmp_path / "fin.creds", nats_server)
        )
        await tg.start(erp.run)
        await tg.start(fin.run)
        with anyio.fail_after(30):
            while len(fake.contacts) < 120:
                await anyio.sleep(0.1)
        with sqlite3.connect(tmp_path / "erp.db") as db:
            db.execute("UPDATE contacts SET Name = Name || ' (renamed)' WHERE id IN ('C001', 'C002')")
            db.execute("DELETE FROM contacts WHERE id IN ('C010', 'C011', 'C012')")

        def done() -> bool:
            archived = {
                c["ContactNumber"] for c in fake.contacts.values() if c["ContactStatus"] == "ARCHIVED"
            }
            renamed = [c for c in fake.contacts.values() if c["Name"].endswith("(renamed)")]
            return archived == {"C010", "C011", "C012"} and len(renamed) == 2

        with anyio.fail_after(30):
            while not done():
                await anyio.sleep(0.1)
        env = {"MESH_CREDS": str(nats_server.admin_creds)}
        invoke = functools.partial(
            runner.invoke, app, ["dlq", "list", "--server", nats_server.url, "--json"], env=env
        )
        with anyio.fail_after(30):
            while not json.loads((listed := await anyio.to_thread.run_sync(invoke)).output or "[]"):
                await anyio.sleep(0.2)
        [entry] = json.loads(listed.output)
        show = functools.partial(
            runner.invoke,
            app,
            ["dlq", "show", str(entry["seq"]), "--server", nats_server.url, "--json"],
            env=env,
        )
        shown = await anyio.to_thread.run_sync(show)
        text = await anyio.to_thread.run_sync(
            functools.partial(
                runner.invoke, app, ["dlq", "show", str(entry["seq"]), "--server", nats_server.url], env=env
            )
        )
        tg.cancel_scope.cancel()

    assert shown.exit_code == 0, shown.output
    detail = json.loads(shown.output)
    assert detail["reason"] == "POST /Contacts: HTTP 200: The contact name must be specified"
    assert detail["http"]["status"] == 200
    assert detail["http"]["request_body"] == {"Contacts": [{"Name": "", "ContactNumber": "BAD"}]}
    assert detail["http"]["response_body"]["StatusAttributeString"] == "ERROR"
    assert "HTTP answer: 200" in text.output
    assert '"ContactNumber": "BAD"' in text.output

    # Each contact created once, each with Xero's id in the cross-reference; no DELETE ever.
    assert all(n == 1 for n in fake.created.values())
    assert len(fake.created) == 120
    xrefs = {r.key: r.id for r in read_xrefs(str(tmp_path / "s-fin" / "contacts.db"))}
    for cid, contact in fake.contacts.items():
        assert xrefs[contact["ContactNumber"]] == cid
    assert {c.method for c in fake.requests} == {"POST"}  # no DELETE (and no lookup was needed)
    creates = [
        json.loads(c.body) for c in fake.requests if c.method == "POST" and c.path.endswith("/Contacts")
    ]
    assert max(len(c["Contacts"]) for c in creates) > 1  # batched
    assert all(len(c["Contacts"]) <= 50 for c in creates)
    assert all("EmailAddress" in c or int(c["ContactNumber"][1:]) % 3 for b in creates for c in b["Contacts"]
               if c["ContactNumber"] != "BAD")  # fmt: skip


@pytest.mark.crash
async def test_sigkill_after_the_create_took_effect_and_before_its_answer_makes_no_second_record(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """The API creates the contacts of the first request and holds the answer; the agent is
    SIGKILLed while waiting, so its state has no id for any of them. Restarted, it looks each
    one up (``lookup``) instead of creating it again: every contact exists once and the
    cross-reference has Xero's ids."""
    (tmp_path / "s-fin").mkdir()
    with sqlite3.connect(tmp_path / "erp.db") as db:
        db.executescript(ERP_SCHEMA)
        db.executemany(
            "INSERT INTO contacts VALUES (?, ?, NULL)", [(f"K{i:02}", f"Kunde {i}") for i in range(40)]
        )
    erp = ConnectorAgent(
        secure_config(erp_toml(tmp_path, nats_server.url), tmp_path / "erp.creds", nats_server)
    )
    fake = FakeXero()
    fake.slow(10_000, 3600.0)  # every write takes effect, then its answer never comes
    async with anyio.create_task_group() as tg:
        api = await tg.start(fake.run)
        cfg = write_agent_config(
            tmp_path / "finance-agent.toml",
            finance_toml(tmp_path, nats_server.url, api, timeout=60.0),
            nats_server,
        )
        fin = AgentProcess(cfg, tmp_path / "finance-agent.log")
        await anyio.to_thread.run_sync(fin.start)
        try:
            await tg.start(erp.run)
            state = str(tmp_path / "s-fin" / "contacts.db")

            def held() -> set[str]:
                """Keys whose create the API has carried out while the agent has no id for them."""
                if not (tmp_path / "s-fin" / "contacts.db").exists():
                    return set()
                pending = {r.key for r in read_xrefs(state) if r.id is None}
                return pending if pending and pending == set(fake.created) else set()

            with anyio.fail_after(30):
                while not held():
                    await anyio.sleep(0.05)
            assert all(r.id is None for r in read_xrefs(state))  # no answer seen for any of them
            lost = held()
            await anyio.to_thread.run_sync(fin.kill)
            assert fin.killed_by_sigkill
            fake.release()  # the killed agent's held answers go nowhere
            posts_before = len(fake.requests)
            await anyio.to_thread.run_sync(fin.start)

            def settled() -> bool:
                found = read_xrefs(str(tmp_path / "s-fin" / "contacts.db"))
                return len(found) == 40 and all(r.id is not None for r in found)

            with anyio.fail_after(30):
                while not settled():
                    await anyio.sleep(0.1)
            with sqlite3.connect(tmp_path / "erp.db") as db:
                db.execute("UPDATE contacts SET Name = 'Renamed' WHERE id = 'K07'")
            with anyio.fail_after(30):
                while not [c for c in fake.contacts.values() if c["Name"] == "Renamed"]:
                    await anyio.sleep(0.1)
        finally:
            await anyio.to_thread.run_sync(fin.kill)
            tg.cancel_scope.cancel()
    assert fake.created == {f"K{i:02}": 1 for i in range(40)}
    assert len(fake.contacts) == 40
    xrefs = {r.key: r.id for r in read_xrefs(str(tmp_path / "s-fin" / "contacts.db"))}
    assert {c["ContactNumber"]: cid for cid, c in fake.contacts.items()} == xrefs
    after = fake.requests[posts_before:]
    looked_up = [c for c in after if c.method == "GET"]
    assert len(looked_up) == len(lost)  # each lost create looked up once ...
    sent_again = {
        item["ContactNumber"]
        for c in after
        if c.method == "POST" and c.path.endswith("/Contacts")
        for item in json.loads(c.body)["Contacts"]
    }
    assert not sent_again & lost  # ... and none of them created again
    assert f"/api.xro/2.0/Contacts/{xrefs['K07']}" in [c.path for c in after]  # the update, by id
