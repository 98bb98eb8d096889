"""Every request the REST sink sends to a Xero-shaped API is valid against Xero's published
OpenAPI description (``shared/data/xero/xero_accounting.yaml``, loaded by path, never copied)
made STRICT here: the published one declares no ``additionalProperties: false`` and no required
wrapper arrays, so a bare object or a field Xero does not know would pass it. The strict copy
refuses unknown properties on Contact, Invoice, LineItem and their wrappers Contacts/Invoices,
and requires the wrapper arrays.

Two sources of requests: the sink driven directly (creates in batches, update by id, archive,
void, the lookup of a lost create), and the whole ``examples/invoices-to-finance`` run (PostgreSQL
Northwind -> agents -> the fake finance API), whose every request it logged.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters.rest.config import RestLookup, RestOperation, RestResults, RestSinkConfig
from adapters.rest.sink import RestSink
from examples._fake_xero import BASE, Call, FakeXero
from mesh.adapters import Applied, SinkRecord

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("MESH_DATA_DIR") or REPO.parent / "shared" / "data")
SPEC = DATA / "xero" / "xero_accounting.yaml"
NORTHWIND = DATA / "northwind" / "northwind-postgres.sql"

yaml = pytest.importorskip("yaml")
openapi_core = pytest.importorskip("openapi_core")
needs_spec = pytest.mark.skipif(not SPEC.is_file(), reason=f"Xero's OpenAPI description not found at {SPEC}")

pytestmark = [needs_spec]

STRICT = ("Contact", "Invoice", "LineItem", "Contacts", "Invoices")


def strict_copy(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec with unknown properties refused on the five schemas and the wrappers required."""
    strict = copy.deepcopy(spec)
    schemas = strict["components"]["schemas"]
    for name in STRICT:
        schemas[name]["additionalProperties"] = False
    schemas["Contacts"]["required"] = ["Contacts"]
    schemas["Invoices"]["required"] = ["Invoices"]
    return strict


@pytest.fixture(scope="module")
def validator() -> Any:
    from openapi_core import Config, OpenAPI

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with SPEC.open() as f:
        spec = yaml.load(f, Loader=loader)  # a safe loader
    # The published document does not pass the spec validator itself (e.g. a boolean property
    # with default "false"): requests are validated against it, the document is not.
    return OpenAPI.from_dict(strict_copy(spec), config=Config(spec_validator_cls=None))


def violations(validator: Any, calls: list[dict[str, Any]]) -> list[str]:
    from openapi_core.testing import MockRequest

    found = []
    for c in calls:
        args = dict(httpx.QueryParams(c["query"]))
        headers = {"Authorization": "Bearer t", **c["headers"]}
        request = MockRequest(
            "https://api.xero.com", c["method"].lower(), c["path"], headers=headers,
            data=c["body"] or None, args=args,
        )  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Unsupported scheme type" (OAuth2)
            try:
                validator.validate_request(request)
            except Exception as exc:  # every kind of violation is reported, not raised
                cause = exc.__cause__ or exc
                found.append(f"{c['method']} {c['path']}?{c['query']}: {type(exc).__name__}: {cause}"[:600])
    return found


KEPT_HEADERS = ("content-type", "xero-tenant-id", "idempotency-key")


def as_dicts(calls: list[Call]) -> list[dict[str, Any]]:
    return [
        {"method": c.method, "path": c.path, "query": c.query, "body": c.body.decode(),
         "headers": {k: v for k, v in c.headers.items() if k in KEPT_HEADERS}}
        for c in calls
    ]  # fmt: skip


def test_the_strict_copy_refuses_what_the_published_spec_lets_through(validator: Any) -> None:
    wrong = [
        {"method": "POST", "path": f"{BASE}/Contacts", "query": "", "headers": {"xero-tenant-id": "t",
         "content-type": "application/json"}, "body": json.dumps({"Name": "bare object"})},
        {"method": "POST", "path": f"{BASE}/Contacts", "query": "", "headers": {"xero-tenant-id": "t",
         "content-type": "application/json"}, "body": json.dumps({"Contacts": [{"Name": "x", "name": "x"}]})},
        {"method": "DELETE", "path": f"{BASE}/Contacts/00000000-0000-0000-0000-000000000001", "query": "",
         "headers": {"xero-tenant-id": "t"}, "body": ""},
    ]  # fmt: skip
    assert len(violations(validator, wrong)) == 3


def contact_sink(tmp_path: Path, fake: FakeXero, name: str, **kw: Any) -> RestSink:
    singular = name[:-1]
    cfg = RestSinkConfig(
        base_url=f"http://xero.test{BASE}",
        state_path=str(tmp_path / f"{name}.db"),
        headers={"Xero-Tenant-Id": "tenant-1"},
        create=RestOperation(method="POST", path=f"/{name}", params={"summarizeErrors": "false"}),
        update=RestOperation(method="POST", path=f"/{name}/{{id}}"),
        delete=RestOperation(method="POST", path=f"/{name}/{{id}}"),
        envelope=name,
        batch_size=50,
        key_field=f"{singular}Number",
        id_field=f"{singular}ID",
        omit_nulls=True,
        results=RestResults(
            status="StatusAttributeString", errors="ValidationErrors[].Message", id=f"{singular}ID"
        ),
        lookup=RestLookup(
            path=f"/{name}",
            params={"where": f'{singular}Number=="{{key}}"'},
            id_path=f"{name}[0].{singular}ID",
        ),
        timeout=0.5,
        backoff_initial=0.01,
        **kw,
    )
    return RestSink(cfg, transport=httpx.ASGITransport(app=fake.app))


def rec(key: str, version: int, row: dict[str, Any], *, deleted: bool = False) -> SinkRecord:
    return SinkRecord(
        id=f"e-{key}-{version}", key=key, version=version, deleted=deleted, row=row, origin="erp"
    )


@pytest.mark.anyio
async def test_every_request_the_sink_sends_is_valid_against_the_strict_spec(
    tmp_path: Path, validator: Any
) -> None:
    fake = FakeXero(tenant_id="tenant-1")
    contacts = [
        rec(f"C{i}", 1, {"Name": f"Customer {i}", "EmailAddress": None, "IsCustomer": True})
        for i in range(60)
    ]
    async with contact_sink(tmp_path, fake, "Contacts", delete_mode="update",
                            delete_body={"ContactStatus": "ARCHIVED"}) as sink:  # fmt: skip
        assert await sink.apply(contacts) == [Applied.APPLIED] * 60
        assert (
            await sink.apply([rec("C1", 2, {"Name": "Renamed"}), rec("C2", 2, {}, deleted=True)])
            == [Applied.APPLIED] * 2
        )
        fake.slow(1, 30.0)  # the next create happens, its answer is lost: looked up, not re-sent
        assert await sink.apply([rec("C99", 1, {"Name": "Late answer"})]) == [Applied.APPLIED]
    invoice = {
        "Type": "ACCREC", "Contact": {"ContactNumber": "C3"}, "Date": "2024-05-01", "DueDate": "2024-05-31",
        "Status": "AUTHORISED", "CurrencyCode": "USD", "LineAmountTypes": "Exclusive", "Reference": None,
        "LineItems": [{"Description": "Chai", "Quantity": 3.0, "UnitAmount": 18.0, "LineAmount": 54.0,
                       "AccountCode": "200", "ItemCode": "1"}],
    }  # fmt: skip
    async with contact_sink(tmp_path, fake, "Invoices", delete_mode="update",
                            delete_body={"Status": "VOIDED"}) as sink:  # fmt: skip
        assert await sink.apply([rec("INV-1", 1, invoice), rec("INV-2", 1, invoice)]) == [Applied.APPLIED] * 2
        assert await sink.apply([rec("INV-2", 2, {}, deleted=True)]) == [Applied.APPLIED]
    assert violations(validator, as_dicts(fake.requests)) == []
    methods = {(c.method, c.path.count("/")) for c in fake.requests}
    assert methods == {("POST", 3), ("POST", 4), ("GET", 3)}  # batches, by-id updates, a lookup
    assert [v["Status"] for v in fake.invoices.values() if v["InvoiceNumber"] == "INV-2"] == ["VOIDED"]
    assert all(n == 1 for n in fake.created.values())


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.skipif(not NORTHWIND.is_file(), reason=f"reference data (Northwind) not found at {NORTHWIND}")
def test_the_invoices_example_speaks_xero(tmp_path: Path, validator: Any) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "invoices-to-finance" / "run.py"),
         "--data-dir", str(run_dir), "--duration", "1", "--timeout", "60"],
        capture_output=True, text=True, timeout=170, env={**os.environ, "MESH_DATA_DIR": str(DATA)},
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    for shown in ("INV-10249 voided in finance", "MESH2 archived in finance", "no DELETE sent",
                  "every contact and invoice created once, with the id Xero assigned"):  # fmt: skip
        assert f"ok   {shown}" in out, out[-4000:]
    calls = [json.loads(line) for line in (run_dir / "finance-requests.jsonl").read_text().splitlines()]
    assert len(calls) > 10
    assert violations(validator, calls) == []
    bodies = [json.loads(c["body"]) for c in calls if c["method"] == "POST"]
    assert max(len(b.get("Contacts", b.get("Invoices", []))) for b in bodies) > 1  # batched
