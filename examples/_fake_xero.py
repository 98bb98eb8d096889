"""A fake finance API that behaves like Xero's accounting API where the REST sink meets it
(``/api.xro/2.0``, see ``shared/data/xero/xero_accounting.yaml``), in memory, as a Starlette app::

    GET    /Contacts?where=ContactNumber=="C1"   {"Contacts": [...]} (the filter: one field, ==)
    POST   /Contacts                            {"Contacts": [...]}: create (no ContactID) or
                                                update (ContactID) each; up to 50 per request
    POST   /Contacts/{ContactID}                {"Contacts": [one]}: update (archive:
                                                ``ContactStatus = "ARCHIVED"``)
    GET    /Contacts/{ContactID}
    the same for /Invoices (InvoiceID, InvoiceNumber; void: ``Status = "VOIDED"``)
    DELETE anything                             405, as Xero has no DELETE for either

It assigns ``ContactID`` / ``InvoiceID`` (UUIDs) itself, answers per record
(``StatusAttributeString`` OK/ERROR with ``ValidationErrors``) with ``summarizeErrors=false``,
and otherwise refuses a request with any invalid record as a whole: 400 with Xero's
``ValidationException`` body, whose ``Elements`` repeat each submitted record followed by its
``ValidationErrors``. It has **no idempotency**: a create sent twice makes two records, which is
what the tests count. ``slow(n, seconds)`` makes the next ``n`` writes take effect and then hold
the answer back (a client that times out has lost the answer of a create that happened).
"""

from __future__ import annotations

import json
import re
import uuid
from decimal import Decimal
from typing import Any, NamedTuple

import anyio
from anyio.abc import TaskStatus
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mesh.controlplane.http import HttpServer

__all__ = ["BASE", "Call", "FakeXero"]

BASE = "/api.xro/2.0"
_WHERE = re.compile(r'^\s*(\w+)\s*==\s*"([^"]*)"\s*$')
_CONTACT_STATUS = {"ACTIVE", "ARCHIVED", "GDPRREQUEST"}
_INVOICE_STATUS = {"DRAFT", "SUBMITTED", "DELETED", "AUTHORISED", "PAID", "VOIDED"}


def _json(body: Any, status: int = 200) -> Response:
    text = json.dumps(body, default=lambda v: float(v) if isinstance(v, Decimal) else str(v))
    return Response(text, status, media_type="application/json")


class Call(NamedTuple):
    """One request the fake received (``status`` 0 while unanswered)."""

    method: str
    path: str
    query: str
    body: bytes
    status: int
    headers: dict[str, str]


class FakeXero:
    """The fake (see the module doc). ``requests`` logs every call as (method, path, query,
    body bytes, status; 0 while unanswered) for the contract test; ``created`` counts creates per number."""

    def __init__(self, *, token: str | None = None, tenant_id: str | None = None) -> None:
        self.token = token
        self.tenant_id = tenant_id
        self.contacts: dict[str, dict[str, Any]] = {}
        self.invoices: dict[str, dict[str, Any]] = {}
        self.created: dict[str, int] = {}
        self.requests: list[Call] = []
        self._slow = 0
        self._delay = 0.0
        self._released = anyio.Event()
        self.app = Starlette(routes=self.routes())

    def routes(self) -> list[Route]:
        """The API's routes (a subclass adds its own)."""
        routes = []
        for name, id_name in (("Contacts", "ContactID"), ("Invoices", "InvoiceID")):
            routes.append(Route(f"{BASE}/{name}", self._collection(name, id_name), methods=["GET", "POST"]))
            routes.append(Route(f"{BASE}/{name}/{{rid}}", self._one(name, id_name), methods=["GET", "POST"]))
        return routes

    def refuse_credentials(self, request: Request) -> Response | None:
        """An answer refusing the request's credentials, or None to let it through."""
        if self.token is not None and request.headers.get("authorization") != f"Bearer {self.token}":
            return _json({"Type": "Unauthorized", "Title": "Unauthorized", "Status": 401}, 401)
        if self.tenant_id is not None and request.headers.get("xero-tenant-id") != self.tenant_id:
            return _json({"Type": "AuthenticationUnsuccessful", "Status": 403}, 403)
        return None

    def check_invoice(self, invoice: dict[str, Any]) -> list[str]:
        """More checks of an invoice as it would be stored (a subclass adds its own; it may
        also normalise the record in place, e.g. compute totals)."""
        return []

    def __repr__(self) -> str:
        counts = f"contacts={len(self.contacts)} invoices={len(self.invoices)} calls={len(self.requests)}"
        return f"<FakeXero {counts}>"

    async def run(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve over HTTP until cancelled; ``task_status.started(url)`` (the API's base URL,
        ending in ``/api.xro/2.0``) once connections are accepted."""
        server = HttpServer(self.app, host, port, grace=1.0, name="fake-xero")
        async with anyio.create_task_group() as tg:
            await tg.start(server.run)
            task_status.started(f"{server.url}{BASE}")

    def slow(self, count: int, seconds: float) -> None:
        """The next ``count`` writes take effect, then wait ``seconds`` before answering (or
        until :meth:`release`)."""
        self._slow, self._delay = count, seconds
        self._released = anyio.Event()

    def release(self) -> None:
        """Stop holding answers back: every held one goes out now, later ones at once."""
        self._slow = 0
        self._released.set()

    def store(self, name: str) -> dict[str, dict[str, Any]]:
        return self.contacts if name == "Contacts" else self.invoices

    def by_number(self, name: str, number: str) -> list[dict[str, Any]]:
        """Every record whose ContactNumber / InvoiceNumber is ``number``."""
        field = "ContactNumber" if name == "Contacts" else "InvoiceNumber"
        return [r for r in self.store(name).values() if r.get(field) == number]

    async def _call(self, request: Request, work: Any) -> Response:
        body = await request.body()
        slot = len(self.requests)  # logged on arrival: a call whose answer is never read counts too
        headers = dict(request.headers)
        self.requests.append(Call(request.method, request.url.path, request.url.query, body, 0, headers))
        response = self.refuse_credentials(request) or await work(body)
        self.requests[slot] = self.requests[slot]._replace(status=response.status_code)
        return response

    def _collection(self, name: str, id_name: str) -> Any:
        async def handle(request: Request) -> Response:
            async def work(body: bytes) -> Response:
                if request.method == "GET":
                    records = list(self.store(name).values())
                    where = request.query_params.get("where")
                    if where:
                        match = _WHERE.match(where)
                        if match is None:
                            return _json(
                                {"Type": "ValidationException", "Message": f"bad where {where!r}"}, 400
                            )
                        records = [r for r in records if str(r.get(match[1])) == match[2]]
                    return _json({name: records})
                summarize = request.query_params.get("summarizeErrors", "true").lower() != "false"
                return await self._write(name, id_name, body, None, summarize)

            return await self._call(request, work)

        return handle

    def _one(self, name: str, id_name: str) -> Any:
        async def handle(request: Request) -> Response:
            rid = request.path_params["rid"]

            async def work(body: bytes) -> Response:
                if rid not in self.store(name):
                    return _json({"Type": "NotFound", "Title": "Not Found", "Status": 404}, 404)
                if request.method == "GET":
                    return _json({name: [self.store(name)[rid]]})
                summarize = request.query_params.get("summarizeErrors", "true").lower() != "false"
                return await self._write(name, id_name, body, rid, summarize)

            return await self._call(request, work)

        return handle

    async def _write(
        self, name: str, id_name: str, body: bytes, rid: str | None, summarize: bool
    ) -> Response:
        try:
            doc = json.loads(body, parse_float=Decimal)  # amounts exact, as Xero reads them
        except ValueError:
            return _json({"Type": "ValidationException", "Message": "the body is not JSON"}, 400)
        items = doc.get(name) if isinstance(doc, dict) else None
        if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
            return _json({"Type": "ValidationException", "Message": f"expected {{{name!r}: [...]}}"}, 400)
        if len(items) > 50 or (rid is not None and len(items) != 1):
            return _json({"Type": "ValidationException", "Message": "too many records"}, 400)
        errors = [self._check(name, id_name, item, rid) for item in items]
        if summarize and any(errors):
            elements = [
                {**item, "ValidationErrors": [{"Message": m} for m in errs]}
                for item, errs in zip(items, errors, strict=True)
            ]
            return _json(
                {"ErrorNumber": 10, "Type": "ValidationException",
                 "Message": "A validation exception occurred", "Elements": elements},
                400,
            )  # fmt: skip
        results = []
        for item, errs in zip(items, errors, strict=True):
            if errs:
                results.append({**item, "StatusAttributeString": "ERROR",
                                "ValidationErrors": [{"Message": m} for m in errs]})  # fmt: skip
                continue
            results.append({**self._apply(name, id_name, item, rid), "StatusAttributeString": "OK"})
        if self._slow > 0:  # took effect; now the answer is late (or never read)
            self._slow -= 1
            with anyio.move_on_after(self._delay):
                await self._released.wait()
        return _json({"Id": str(uuid.uuid4()), "Status": "OK", "ProviderName": "mesh fake", name: results})

    def _check(self, name: str, id_name: str, item: dict[str, Any], rid: str | None) -> list[str]:
        store = self.store(name)
        target = rid or item.get(id_name)
        if target is not None and target not in store:
            return [f"{id_name} {target} does not exist"]
        existing = store.get(target, {}) if target else {}
        merged = {**existing, **item}
        if name == "Contacts":
            errors = [] if str(merged.get("Name") or "").strip() else ["The contact name must be specified"]
            if merged.get("ContactStatus", "ACTIVE") not in _CONTACT_STATUS:
                errors.append(f"ContactStatus {merged.get('ContactStatus')!r} is not valid")
            return errors
        errors = []
        if merged.get("Type") not in ("ACCREC", "ACCPAY"):
            errors.append("Invoice Type must be specified")
        if self.contact_of(merged.get("Contact")) is None:
            errors.append("A valid contact must be specified (Contact.ContactID or an active ContactNumber)")
        if merged.get("Status", "DRAFT") not in _INVOICE_STATUS:
            errors.append(f"Status {merged.get('Status')!r} is not valid")
        return errors + self.check_invoice(merged)

    def contact_of(self, ref: Any) -> dict[str, Any] | None:
        """The contact an invoice names, by ContactID or (as Xero allows) by the ContactNumber of
        an active contact."""
        if not isinstance(ref, dict):
            return None
        if ref.get("ContactID") in self.contacts:
            return self.contacts[ref["ContactID"]]
        number = ref.get("ContactNumber")
        active = (
            [c for c in self.by_number("Contacts", number) if c.get("ContactStatus") == "ACTIVE"]
            if number
            else []
        )
        return active[0] if active else None

    def _apply(self, name: str, id_name: str, item: dict[str, Any], rid: str | None) -> dict[str, Any]:
        store = self.store(name)
        target = rid or item.get(id_name)
        if target is None:
            target = str(uuid.uuid4())
            number = item.get("ContactNumber" if name == "Contacts" else "InvoiceNumber")
            self.created[str(number)] = self.created.get(str(number), 0) + 1
            store[target] = {id_name: target}
            if name == "Contacts":
                store[target]["ContactStatus"] = "ACTIVE"
        record = {**store[target], **item, id_name: target}
        if name == "Invoices":
            contact = self.contact_of(record.get("Contact"))
            assert contact is not None  # checked
            record["Contact"] = {
                "ContactID": contact["ContactID"],
                "ContactNumber": contact.get("ContactNumber"),
            }
            self.check_invoice(record)  # normalise (totals)
        store[target] = record
        return record
