"""REST sink request templates against a Xero-shaped API (``examples._fake_xero``, served
in-process through httpx's ASGI transport: real HTTP semantics, no socket): envelope, batching
with per-record results, the cross-reference of ids, lookup of a create whose answer was lost,
archive/void instead of DELETE, readable refusals for the dead letter, and the config errors."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from adapters.rest._paths import collect, parse
from adapters.rest._state import read_xrefs
from adapters.rest.config import RestBearerAuth, RestLookup, RestOperation, RestResults, RestSinkConfig
from adapters.rest.sink import RestSink
from examples._fake_xero import BASE, FakeXero
from mesh.adapters import Applied, SinkRecord
from mesh.config import parse_agent_config
from mesh.dlq import DlqEntry
from mesh.envelope import DeadLetter
from mesh.errors import ConfigError, RejectedRecord, SystemUnavailable

pytestmark = pytest.mark.anyio

URL = f"http://xero.test{BASE}"
XERO_RESULTS = RestResults(
    status="StatusAttributeString", errors="ValidationErrors[].Message", id="ContactID"
)


def contacts(tmp_path: Path, **kw: Any) -> RestSinkConfig:
    settings: dict[str, Any] = {
        "state_path": str(tmp_path / "state.db"),
        "create": RestOperation(method="POST", path="/Contacts"),
        "update": RestOperation(method="POST", path="/Contacts/{id}"),
        "delete": RestOperation(method="POST", path="/Contacts/{id}"),
        "delete_mode": "update",
        "delete_body": {"ContactStatus": "ARCHIVED"},
        "envelope": "Contacts",
        "key_field": "ContactNumber",
        "id_field": "ContactID",
        "results": XERO_RESULTS,
        "lookup": RestLookup(
            path="/Contacts", params={"where": 'ContactNumber=="{key}"'}, id_path="Contacts[0].ContactID"
        ),
        "error_path": "Elements[].ValidationErrors[].Message",
        "omit_nulls": True,
        "timeout": 2.0,
        "backoff_initial": 0.01,
        "backoff_max": 0.02,
        **kw,
    }
    return RestSinkConfig(base_url=URL, **settings)


def rec(key: str, version: int, name: str | None = "Ada", *, deleted: bool = False) -> SinkRecord:
    row = {"Name": name, "EmailAddress": None}
    return SinkRecord(
        id=f"e-{key}-{version}", key=key, version=version, deleted=deleted, row=row, origin="erp"
    )


def sink_for(fake: FakeXero, cfg: RestSinkConfig) -> RestSink:
    return RestSink(cfg, transport=httpx.ASGITransport(app=fake.app))


def bodies(fake: FakeXero) -> list[tuple[str, str, Any]]:
    return [
        (c.method, c.path.removeprefix(BASE), msgspec.json.decode(c.body) if c.body else None)
        for c in fake.requests
    ]


def xref(tmp_path: Path) -> dict[str, str | None]:
    return {row.key: row.id for row in read_xrefs(str(tmp_path / "state.db"))}


async def test_batches_in_an_envelope_store_the_ids_and_update_by_id(tmp_path: Path) -> None:
    fake = FakeXero()
    async with sink_for(fake, contacts(tmp_path, batch_size=3)) as sink:
        batch = [rec(f"C{i}", 1, f"Name {i}") for i in range(5)]
        assert await sink.apply(batch) == [Applied.APPLIED] * 5
        requests = bodies(fake)
        assert [(m, p) for m, p, _ in requests] == [("POST", "/Contacts"), ("POST", "/Contacts")]
        assert [len(b["Contacts"]) for _, _, b in requests] == [3, 2]
        assert requests[0][2]["Contacts"][0] == {"Name": "Name 0", "ContactNumber": "C0"}  # nulls left out
        ids = xref(tmp_path)
        assert sorted(ids) == [f"C{i}" for i in range(5)]
        assert {fake.contacts[ids[f"C{i}"]]["ContactNumber"] for i in range(5)} == {f"C{i}" for i in range(5)}

        assert await sink.apply([rec("C1", 2, "Renamed")]) == [Applied.APPLIED]
        method, path, body = bodies(fake)[-1]
        assert (method, path) == ("POST", f"/Contacts/{ids['C1']}")
        assert body == {"Contacts": [{"Name": "Renamed", "ContactNumber": "C1", "ContactID": ids["C1"]}]}
        assert fake.contacts[ids["C1"]]["Name"] == "Renamed"
        assert len(fake.contacts) == 5


async def test_one_key_is_never_twice_in_one_request(tmp_path: Path) -> None:
    fake = FakeXero()
    async with sink_for(fake, contacts(tmp_path, batch_size=10)) as sink:
        out = await sink.apply([rec("A", 1, "a1"), rec("B", 1), rec("A", 2, "a2")])
        assert out == [Applied.APPLIED] * 3
    ids = xref(tmp_path)
    assert [(m, p) for m, p, _ in bodies(fake)] == [("POST", "/Contacts"), ("POST", f"/Contacts/{ids['A']}")]
    assert fake.contacts[ids["A"]]["Name"] == "a2"
    assert fake.created == {"A": 1, "B": 1}


async def test_per_record_results_refuse_only_the_failed_record(tmp_path: Path) -> None:
    fake = FakeXero()
    cfg = contacts(
        tmp_path,
        batch_size=3,
        create=RestOperation(method="POST", path="/Contacts", params={"summarizeErrors": "false"}),
    )
    async with sink_for(fake, cfg) as sink:
        out = await sink.apply([rec("A", 1), rec("B", 1, None), rec("C", 1)])
    assert out[0] is Applied.APPLIED
    assert out[2] is Applied.APPLIED
    refused = out[1]
    assert isinstance(refused, RejectedRecord)
    assert "HTTP 200: The contact name must be specified" in str(refused)
    extra = refused.dead_letter_extra  # type: ignore[attr-defined]
    assert extra["http_status"] == 200
    assert msgspec.json.decode(extra["request_body"]) == {"Contacts": [{"ContactNumber": "B"}]}
    assert msgspec.json.decode(extra["response_body"])["StatusAttributeString"] == "ERROR"
    assert sorted(xref(tmp_path)) == ["A", "C"]  # B was refused: no id, nothing pending
    assert fake.created == {"A": 1, "C": 1}


async def test_a_refusal_reason_comes_from_error_path_not_the_echoed_record(tmp_path: Path) -> None:
    fake = FakeXero()
    async with sink_for(fake, contacts(tmp_path)) as sink:
        [refused] = await sink.apply([rec("A", 1, "")])
    assert isinstance(refused, RejectedRecord)
    assert str(refused) == "POST /Contacts: HTTP 400: The contact name must be specified"
    letter = DeadLetter(
        reason=str(refused), error_class="RejectedRecord", flow="contacts", original_subject="evt.x",
        **refused.dead_letter_extra,  # type: ignore[attr-defined]
    )  # fmt: skip
    headers = letter.to_headers()
    assert headers["Mesh-Http-Status"] == "400"
    assert '"Elements"' in headers["Mesh-Response-Body"]
    assert DeadLetter.from_headers(headers) == letter
    assert len(headers["Mesh-Request-Body"]) <= 4096


async def test_archive_instead_of_delete_and_no_delete_is_ever_sent(tmp_path: Path) -> None:
    fake = FakeXero()
    async with sink_for(fake, contacts(tmp_path)) as sink:
        assert await sink.apply([rec("A", 1)]) == [Applied.APPLIED]
        assert await sink.apply([rec("A", 2, deleted=True)]) == [Applied.APPLIED]
        # A key the target never got has nothing to archive.
        assert await sink.apply([rec("Z", 1, deleted=True)]) == [Applied.UNCHANGED]
    cid = xref(tmp_path)["A"]
    assert fake.contacts[cid]["ContactStatus"] == "ARCHIVED"
    assert bodies(fake)[-1] == (
        "POST", f"/Contacts/{cid}",
        {"Contacts": [{"ContactStatus": "ARCHIVED", "ContactNumber": "A", "ContactID": cid}]},
    )  # fmt: skip
    assert all(m != "DELETE" for m, _, _ in bodies(fake))


async def test_a_create_whose_answer_is_lost_is_looked_up_not_sent_again(tmp_path: Path) -> None:
    fake = FakeXero()
    fake.slow(1, 30.0)  # the create happens, the answer never comes within the timeout
    async with sink_for(fake, contacts(tmp_path, timeout=0.3)) as sink:
        assert await sink.apply([rec("A", 1)]) == [Applied.APPLIED]
    assert fake.created == {"A": 1}
    assert [m for m, *_ in fake.requests] == ["POST", "GET"]  # the lookup, not a second POST
    assert xref(tmp_path)["A"] == fake.by_number("Contacts", "A")[0]["ContactID"]


async def test_a_lost_create_is_found_after_a_restart(tmp_path: Path) -> None:
    fake = FakeXero()
    fake.slow(1, 30.0)
    async with sink_for(fake, contacts(tmp_path, timeout=0.3, max_attempts=1)) as sink:
        with pytest.raises(SystemUnavailable, match="no answer"):
            await sink.apply([rec("A", 1)])
    rows = read_xrefs(str(tmp_path / "state.db"))
    assert [(r.key, r.id, r.pending_version) for r in rows] == [("A", None, 1)]  # durable before sending
    async with sink_for(fake, contacts(tmp_path)) as sink:  # the agent again, the message redelivered
        assert await sink.apply([rec("A", 1)]) == [Applied.APPLIED]
        assert await sink.apply([rec("A", 2, "Later")]) == [Applied.APPLIED]
    assert fake.created == {"A": 1}
    [contact] = fake.by_number("Contacts", "A")
    assert contact["Name"] == "Later"
    assert xref(tmp_path) == {"A": contact["ContactID"]}


async def test_without_a_lookup_a_lost_create_is_retried_with_the_same_idempotency_key(
    tmp_path: Path,
) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["Idempotency-Key"])
        if len(seen) == 1:
            raise httpx.ReadTimeout("lost", request=request)
        return httpx.Response(200, json={"Contacts": [{"ContactID": "id-1", "StatusAttributeString": "OK"}]})

    cfg = contacts(tmp_path, lookup=None)
    async with RestSink(cfg, transport=httpx.MockTransport(handler)) as sink:
        assert await sink.apply([rec("A", 1)]) == [Applied.APPLIED]
    assert seen == ["e-A-1", "e-A-1"]
    assert xref(tmp_path) == {"A": "id-1"}


async def test_xref_and_version_commit_together(tmp_path: Path) -> None:
    fake = FakeXero()
    async with sink_for(fake, contacts(tmp_path)) as sink:
        assert await sink.apply([rec("A", 3)]) == [Applied.APPLIED]
    with closing(sqlite3.connect(tmp_path / "state.db")) as db:
        assert db.execute("SELECT key, version FROM mesh_rest_versions").fetchall() == [("A", 3)]
        [(key, cid, pending)] = db.execute("SELECT key, id, pending_version FROM mesh_rest_xref").fetchall()
    assert (key, pending) == ("A", None)
    assert cid in fake.contacts


def test_paths() -> None:
    assert parse("Elements[].ValidationErrors[0].Message") == (
        "Elements",
        None,
        "ValidationErrors",
        0,
        "Message",
    )
    doc = {"Elements": [{"ValidationErrors": [{"Message": "a"}, {"Message": "b"}]}, {"ValidationErrors": []}]}
    assert collect(doc, "Elements[].ValidationErrors[].Message") == ["a", "b"]
    assert collect(doc, "Elements[5].x") == []
    with pytest.raises(ValueError, match="malformed"):
        parse("a..b")


def test_old_dead_letters_stay_readable() -> None:
    old = {
        "Mesh-Reason": "x",
        "Mesh-Error-Class": "RejectedRecord",
        "Mesh-Flow": "f",
        "Mesh-Original-Subject": "s",
    }
    letter = DeadLetter.from_headers(old)
    assert (letter.http_status, letter.request_body, letter.response_body) == (None, "", "")
    assert "Mesh-Request-Body" not in letter.to_headers()


AGENT = """
[agent]
name = "finance-agent"
system = "finance"
state_dir = "state"

[[flows]]
name = "contacts"
entity = "customer"

[flows.sink]
adapter = "rest"
base_url = "https://api.xero.com/api.xro/2.0"
state_path = "state/contacts.db"
%s
"""

XERO = """
create = { method = "POST", path = "/Contacts" }
update = { method = "POST", path = "/Contacts/{id}" }
delete = { method = "POST", path = "/Contacts/{id}" }
delete_mode = "update"
delete_body = { ContactStatus = "ARCHIVED" }
envelope = "Contacts"
batch_size = 50
key_field = "ContactNumber"
id_field = "ContactID"
omit_nulls = true
error_path = "Elements[].ValidationErrors[].Message"
results = { status = "StatusAttributeString", errors = "ValidationErrors[].Message", id = "ContactID" }
[flows.sink.lookup]
path = "/Contacts"
params = { where = 'ContactNumber=="{key}"' }
id_path = "Contacts[0].ContactID"
"""


async def test_a_xero_sink_config_parses() -> None:
    cfg = parse_agent_config(AGENT % XERO, source="agent.toml").flows[0].sink
    assert isinstance(cfg, RestSinkConfig)
    assert cfg.templated
    assert cfg.update == RestOperation(method="POST", path="/Contacts/{id}")
    RestSink(cfg)  # the sink accepts it too


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("envelope = None", "batch_size: several records per request need an envelope"),
        ("delete_body = None", 'delete_body: delete_mode = "update" needs a body'),
        ('delete_mode = "delete"', 'delete_body: only used with delete_mode = "update"'),
        ("results = None", "lookup: set results.id too"),
        ('delete = { method = "DELETE", path = "/Contacts/{id}" }', "delete.method"),
        ('create = { path = "/Contacts/{id}" }', "create.path: a create has no id yet"),
        ('error_path = "a..b"', "error_path: malformed path"),
        ('update = { path = "/Contacts/{nr}" }', "update.path: unknown placeholder"),
        ("create = None", "upsert_path: set upsert_path, or [create]"),
    ],
)
def test_contradictory_options_are_refused_naming_the_field(change: str, message: str) -> None:
    lines = {line.split(" = ", 1)[0]: line for line in XERO.strip().splitlines()}
    for line in change.splitlines():
        name, _, value = line.partition(" = ")
        if value == "None":
            lines.pop(name)
        else:
            lines[name] = line
    with pytest.raises(ConfigError) as info:
        parse_agent_config(AGENT % "\n".join(lines.values()), source="agent.toml")
    assert "flows[0].sink" in str(info.value)
    assert message in str(info.value)


async def test_a_dead_letter_body_never_carries_a_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XERO_TOKEN", "tok-" + "x" * 40)

    def handler(request: httpx.Request) -> httpx.Response:  # a careless API echoes the token
        echo = {"Message": "bad", "Auth": request.headers["Authorization"], "Pad": "p" * 5000}
        return httpx.Response(400, json=echo)

    cfg = contacts(tmp_path, auth=RestBearerAuth(token_env="XERO_TOKEN"), error_path="Message")
    async with RestSink(cfg, transport=httpx.MockTransport(handler)) as sink:
        [refused] = await sink.apply([rec("A", 1)])
    assert isinstance(refused, RejectedRecord)
    assert str(refused) == "POST /Contacts: HTTP 400: bad"
    extra = refused.dead_letter_extra  # type: ignore[attr-defined]
    assert "x" * 40 not in extra["response_body"]
    assert "Bearer ***" in extra["response_body"]
    assert len(extra["response_body"]) <= 4096


def test_a_dlq_entry_reads_the_http_answer_and_a_replay_drops_it() -> None:
    letter = DeadLetter(
        reason="POST /Contacts: HTTP 400: bad", error_class="RejectedRecord", flow="contacts",
        original_subject="evt.customer.upserted.erp", http_status=400,
        request_body='{"Contacts": [{"Name": ""}]}', response_body='{"Elements": []}',
    )  # fmt: skip
    entry = DlqEntry.of(
        1, "dlq.contacts", datetime.now(UTC), b"x", {**letter.to_headers(), "X-Original": "1"}
    )
    assert entry.http == {
        "status": 400,
        "request_body": '{"Contacts": [{"Name": ""}]}',
        "response_body": '{"Elements": []}',
    }
    assert entry.original_headers() == {"X-Original": "1"}  # what a replay republishes
    assert DlqEntry.of(2, "dlq.x", datetime.now(UTC), b"x", {"Mesh-Reason": "r"}).http is None


async def test_a_slow_api_gets_each_batched_create_once(tmp_path: Path) -> None:
    fake = FakeXero()
    fake.slow(1, 30.0)  # the batch is created, the answer comes too late
    async with sink_for(fake, contacts(tmp_path, batch_size=5, timeout=0.3)) as sink:
        assert await sink.apply([rec(f"S{i}", 1, f"Slow {i}") for i in range(5)]) == [Applied.APPLIED] * 5
    assert fake.created == {f"S{i}": 1 for i in range(5)}
    assert [c.method for c in fake.requests] == ["POST"] + ["GET"] * 5  # looked up, never re-sent
    assert sorted(xref(tmp_path)) == [f"S{i}" for i in range(5)]


async def test_the_simple_options_take_omit_nulls_and_error_path_too(tmp_path: Path) -> None:
    seen: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.content)
        if b"bad" in request.content:
            return httpx.Response(422, json={"echo": "x" * 300, "errors": [{"message": "email is invalid"}]})
        return httpx.Response(200, json={})

    cfg = RestSinkConfig(
        base_url="http://crm.test", upsert_path="/customers/{key}", state_path=str(tmp_path / "state.db"),
        omit_nulls=True, error_path="errors[].message",
    )  # fmt: skip
    assert not cfg.templated
    async with RestSink(cfg, transport=httpx.MockTransport(handler)) as sink:
        good = SinkRecord(id="e1", key="1", version=1, deleted=False, row={"a": 1, "b": None}, origin="erp")
        bad = SinkRecord(id="e2", key="2", version=1, deleted=False, row={"email": "bad"}, origin="erp")
        out = await sink.apply([good, bad])
    assert out[0] is Applied.APPLIED
    assert isinstance(out[1], RejectedRecord)
    assert str(out[1]) == "PUT /customers/2: HTTP 422: email is invalid"
    assert out[1].dead_letter_extra["http_status"] == 422  # type: ignore[attr-defined]
    assert seen[0] == b'{"a":1}'
