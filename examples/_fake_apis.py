"""Two small SaaS APIs for the examples, in memory, served by ``Stack.serve`` (Starlette apps).

**FakeCrm** (bearer token) keeps customers and products the mesh pushes to it, and deals that a
sales team works on::

    PUT    /customers/{id}      upsert (body: the CRM's own customer shape, checked strictly)
    DELETE /customers/{id}      404 if there is none
    PUT    /products/{id}       upsert (prices as decimal strings with two decimals, never floats)
    DELETE /products/{id}
    GET    /customers | /products            everything, as {"results": [...]}
    POST   /deals               create a deal; PATCH /deals/{id} changes it (stage, lines, ...)
    GET    /deals?stage=won,lost&updated_since=ISO&after=N&limit=N
                                changed deals, oldest change first, {"results", "paging": {"next"}}

Every deal change gets a new, strictly growing ``updated_at`` (microseconds, UTC).

**FakeFinance** behaves like Xero's accounting API where the mesh meets it (``/api.xro/2.0``, see
``shared/data/xero/xero_accounting.yaml``; the routes are ``_fake_xero.FakeXero``'s): OAuth2
client credentials at ``/connect/token``, then ``Authorization: Bearer`` plus a
``Xero-Tenant-Id`` header on every call::

    POST   /api.xro/2.0/Contacts            {"Contacts": [...]}: create (it assigns ContactID)
                                            or update (ContactID in the record); per-record
                                            results with ?summarizeErrors=false
    POST   /api.xro/2.0/Contacts/{ContactID}  update; archive: {"ContactStatus": "ARCHIVED"}
    POST   /api.xro/2.0/Invoices            the same for invoices (InvoiceID)
    POST   /api.xro/2.0/Invoices/{InvoiceID}  update; void: {"Status": "VOIDED"}
    GET    /api.xro/2.0/Contacts | /Invoices   ?where=ContactNumber=="..." / InvoiceNumber
    DELETE anything                         405: Xero has no DELETE for contacts or invoices

Refusals are Xero-shaped (400 ``ValidationException`` with ``Elements[].ValidationErrors[]``).
Amounts are read as exact decimals: a money value with more than two decimals (a float that
drifted, 142.80000000000001) is refused, and each line's ``LineAmount`` must equal
``Quantity * UnitAmount`` less its discount (``DiscountRate`` in percent, as Xero has it; without
one, a smaller LineAmount is the discount). Totals are computed here, as Xero does. An invoice
whose contact does not exist yet is refused, as Xero refuses it.
"""

from __future__ import annotations

import base64
import datetime
import json
import re
import secrets
from collections import Counter
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs, unquote_plus

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

try:  # run.py puts examples/ on sys.path; tests import the package
    from _fake_xero import FakeXero
except ImportError:
    from examples._fake_xero import FakeXero

__all__ = ["FakeCrm", "FakeFinance", "Invalid"]

_CENTS = Decimal("0.01")


class Invalid(Exception):
    """A request body the API refuses (the message says which field and why)."""


def _json(body: Any, status: int = 200) -> Response:
    text = json.dumps(body, default=lambda v: float(v) if isinstance(v, Decimal) else str(v))
    return Response(text, status_code=status, media_type="application/json")


async def _body(request: Request) -> Any:
    try:
        return json.loads(await request.body(), parse_float=Decimal)
    except ValueError:
        raise Invalid("body is not JSON") from None


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


# --- the CRM ---------------------------------------------------------------------------------------

_CUSTOMER = {"external_id", "company", "contact", "address"}
_CONTACT = {"name", "title", "phone", "fax", "email"}
_ADDRESS = {"street", "city", "region", "zip", "country_code"}
_PRODUCT = {"external_id", "name", "category", "unit", "price", "currency", "active", "in_stock"}
_PRICE = re.compile(r"^\d+\.\d{2}$")


def _only(obj: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise Invalid(f"{where}: expected an object")
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise Invalid(f"{where}: unknown field(s) {', '.join(unknown)}")
    return obj


def _text(obj: dict[str, Any], name: str, *, required: bool = False) -> None:
    value = obj.get(name)
    if value is None and not required:
        return
    if not isinstance(value, str) or not value.strip():
        raise Invalid(f"{name}: expected a non-empty string, got {value!r}")


class FakeCrm:
    """The CRM: customers and products it receives, deals it hands out (see the module doc)."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.customers: dict[str, dict[str, Any]] = {}
        self.products: dict[str, dict[str, Any]] = {}
        self.deals: dict[str, dict[str, Any]] = {}
        self.requests: Counter[str] = Counter()
        self.refused: list[str] = []
        self._last = _utc_now()
        self.app = Starlette(
            routes=[
                Route("/customers", self._list_customers, methods=["GET"]),
                Route("/customers/{id}", self._customer, methods=["GET", "PUT", "DELETE"]),
                Route("/products", self._list_products, methods=["GET"]),
                Route("/products/{id}", self._product, methods=["GET", "PUT", "DELETE"]),
                Route("/deals", self._deals, methods=["GET", "POST"]),
                Route("/deals/{id}", self._deal, methods=["GET", "PATCH"]),
            ]
        )

    def __repr__(self) -> str:
        return (
            f"<FakeCrm customers={len(self.customers)} products={len(self.products)} deals={len(self.deals)}>"
        )

    def _stamp(self) -> str:
        """A strictly growing ``updated_at`` (two changes never share one)."""
        now = _utc_now()
        self._last = max(now, self._last + datetime.timedelta(microseconds=1))
        return self._last.isoformat(timespec="microseconds").replace("+00:00", "Z")

    def _authorized(self, request: Request) -> bool:
        return secrets.compare_digest(request.headers.get("authorization", ""), f"Bearer {self.token}")

    async def _guard(self, request: Request, handler: Any) -> Response:
        self.requests[f"{request.method} {request.url.path.split('/')[1]}"] += 1
        if not self._authorized(request):
            return _json({"error": "missing or wrong bearer token"}, 401)
        try:
            result: Response = await handler()
        except Invalid as exc:
            self.refused.append(f"{request.method} {request.url.path}: {exc}")
            return _json({"error": str(exc)}, 422)
        return result

    # customers and products: the targets of the erp-to-crm example

    def _check_customer(self, key: str, raw: Any) -> dict[str, Any]:
        body = _only(raw, _CUSTOMER, "customer")
        if body.get("external_id") != key:
            raise Invalid(f"external_id: {body.get('external_id')!r} does not match the URL's {key!r}")
        _text(body, "company", required=True)
        _only(body.get("contact") or {}, _CONTACT, "contact")
        address = _only(body.get("address") or {}, _ADDRESS, "address")
        code = address.get("country_code")
        if code is not None and not (isinstance(code, str) and re.fullmatch(r"[A-Z]{2}", code)):
            raise Invalid(f"address.country_code: expected an ISO 3166 code such as DE, got {code!r}")
        return body

    def _check_product(self, key: str, raw: Any) -> dict[str, Any]:
        body = _only(raw, _PRODUCT, "product")
        if body.get("external_id") != key:
            raise Invalid(f"external_id: {body.get('external_id')!r} does not match the URL's {key!r}")
        _text(body, "name", required=True)
        price = body.get("price")
        if price is not None and not (isinstance(price, str) and _PRICE.fullmatch(price)):
            raise Invalid(f'price: expected a decimal string with two decimals ("18.00"), got {price!r}')
        if not isinstance(body.get("active", True), bool):
            raise Invalid("active: expected true or false")
        return body

    async def _record(self, request: Request, store: dict[str, dict[str, Any]], check: Any) -> Response:
        key = request.path_params["id"]

        async def handle() -> Response:
            if request.method == "GET":
                return _json(store[key]) if key in store else _json({"error": "not found"}, 404)
            if request.method == "DELETE":
                if store.pop(key, None) is None:
                    return _json({"error": "not found"}, 404)
                return Response(status_code=204)
            store[key] = {**check(key, await _body(request)), "updated_at": self._stamp()}
            return _json(store[key])

        return await self._guard(request, handle)

    async def _customer(self, request: Request) -> Response:
        return await self._record(request, self.customers, self._check_customer)

    async def _product(self, request: Request) -> Response:
        return await self._record(request, self.products, self._check_product)

    async def _list_customers(self, request: Request) -> Response:
        return await self._guard(request, self._lister(self.customers))

    async def _list_products(self, request: Request) -> Response:
        return await self._guard(request, self._lister(self.products))

    @staticmethod
    def _lister(store: dict[str, dict[str, Any]]) -> Any:
        async def handle() -> Response:
            return _json({"results": list(store.values())})

        return handle

    # deals: the source of the deals-to-orders example

    def put_deal(self, deal: dict[str, Any]) -> dict[str, Any]:
        """Create or change a deal in place (what a salesperson does in the CRM's UI)."""
        current = self.deals.get(deal["id"], {"stage": "open", "currency": "USD", "line_items": []})
        merged = {**current, **deal}
        if merged["stage"] == "won" and not merged.get("close_date"):
            merged["close_date"] = _utc_now().date().isoformat()
        total = sum(
            (Decimal(li["price"]) * li["quantity"] * (1 - Decimal(li.get("discount", "0")))).quantize(_CENTS)
            for li in merged["line_items"]
        )
        merged["amount"] = f"{total:.2f}"
        merged["updated_at"] = self._stamp()
        self.deals[deal["id"]] = merged
        return merged

    async def _deals(self, request: Request) -> Response:
        async def handle() -> Response:
            if request.method == "POST":
                body = await _body(request)
                if not isinstance(body, dict) or not isinstance(body.get("id"), str):
                    raise Invalid("a deal needs a string id")
                return _json(self.put_deal(body), 201)
            q = request.query_params
            stages = set(q["stage"].split(",")) if q.get("stage") else None
            since = q.get("updated_since")
            rows = sorted(self.deals.values(), key=lambda d: (d["updated_at"], d["id"]))
            rows = [
                d
                for d in rows
                if (stages is None or d["stage"] in stages)
                and (since is None or _ts(d["updated_at"]) >= _ts(since))
            ]
            start, limit = int(q.get("after") or 0), int(q.get("limit") or 100)
            page = rows[start : start + limit]
            paging = {"next": str(start + limit)} if start + limit < len(rows) else {}
            return _json({"results": page, "paging": paging})

        return await self._guard(request, handle)

    async def _deal(self, request: Request) -> Response:
        key = request.path_params["id"]

        async def handle() -> Response:
            if key not in self.deals:
                return _json({"error": "not found"}, 404)
            if request.method == "PATCH":
                body = await _body(request)
                if not isinstance(body, dict):
                    raise Invalid("expected an object")
                return _json(self.put_deal({**body, "id": key}))
            return _json(self.deals[key])

        return await self._guard(request, handle)


def _ts(text: str) -> datetime.datetime:
    value = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=datetime.UTC)


# --- the finance API (Xero-shaped) ----------------------------------------------------------------

_AMOUNT_TYPES = {"Exclusive", "Inclusive", "NoTax"}


def _money(value: Any, where: str, places: int = 2) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise Invalid(f"{where}: expected a number, got {value!r}")
    amount = Decimal(value)
    if amount != amount.quantize(Decimal(1).scaleb(-places)):
        raise Invalid(f"{where}: {value} has more than {places} decimals")
    return amount


def _date(value: Any, where: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(str(value)[:10])
    except ValueError:
        raise Invalid(f"{where}: expected a date YYYY-MM-DD, got {value!r}") from None


class FakeFinance(FakeXero):
    """A finance SaaS that behaves like Xero's accounting API (see ``_fake_xero.FakeXero``:
    ids it assigns, envelopes, per-record results, archive/void by POST, no DELETE), behind
    OAuth2 client credentials and a ``Xero-Tenant-Id``, and strict about money (module doc)."""

    def __init__(self, client_id: str, client_secret: str, tenant_id: str) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.tokens: set[str] = set()
        super().__init__(tenant_id=tenant_id)

    def __repr__(self) -> str:
        counts = f"contacts={len(self.contacts)} invoices={len(self.invoices)} tokens={len(self.tokens)}"
        return f"<FakeFinance {counts}>"

    def routes(self) -> list[Route]:
        return [Route("/connect/token", self._token, methods=["POST"]), *super().routes()]

    def refuse_credentials(self, request: Request) -> Response | None:
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        if token not in self.tokens:
            return _json({"Type": "Unauthorized", "Title": "Unauthorized", "Status": 401}, 401)
        return super().refuse_credentials(request)

    async def _token(self, request: Request) -> Response:
        """OAuth2 client credentials (client_secret_basic), as identity.xero.com answers them."""
        auth = request.headers.get("authorization", "")
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode(errors="replace")).items()}
        try:
            user, _, password = base64.b64decode(auth.removeprefix("Basic ")).decode().partition(":")
        except ValueError:
            user = password = ""
        ok = secrets.compare_digest(unquote_plus(user), self.client_id) and secrets.compare_digest(
            unquote_plus(password), self.client_secret
        )
        if not ok or form.get("grant_type") != "client_credentials":
            return _json({"error": "invalid_client"}, 400 if ok else 401)
        token = secrets.token_urlsafe(24)
        self.tokens.add(token)
        return _json(
            {
                "access_token": token,
                "expires_in": 1800,
                "token_type": "Bearer",
                "scope": form.get("scope", ""),
            }
        )

    def check_invoice(self, invoice: dict[str, Any]) -> list[str]:
        """Dates, currency and exact amounts; computes DiscountAmount, SubTotal and Total."""
        try:
            self._check_money(invoice)
        except Invalid as exc:
            return [str(exc)]
        return []

    def _check_money(self, body: dict[str, Any]) -> None:
        _text(body, "InvoiceNumber", required=True)
        issued, due = _date(body.get("Date"), "Date"), _date(body.get("DueDate"), "DueDate")
        if due < issued:
            raise Invalid("DueDate: before Date")
        if not (
            isinstance(body.get("CurrencyCode"), str) and re.fullmatch(r"[A-Z]{3}", body["CurrencyCode"])
        ):
            raise Invalid(f"CurrencyCode: expected an ISO 4217 code, got {body.get('CurrencyCode')!r}")
        if body.get("LineAmountTypes", "Exclusive") not in _AMOUNT_TYPES:
            raise Invalid(f"LineAmountTypes: {body.get('LineAmountTypes')!r}")
        lines = body.get("LineItems")
        if not isinstance(lines, list) or not lines:
            raise Invalid("LineItems: at least one line is needed")
        subtotal = Decimal(0)
        for i, line in enumerate(lines):
            where = f"LineItems[{i}]"
            _text(line, "Description", required=True)
            quantity = _money(line.get("Quantity"), f"{where}.Quantity", 4)
            unit = _money(line.get("UnitAmount"), f"{where}.UnitAmount", 4)
            amount = _money(line.get("LineAmount"), f"{where}.LineAmount")
            gross = quantity * unit
            if "DiscountRate" in line:
                rate = _money(line["DiscountRate"], f"{where}.DiscountRate")
                expected = (gross * (100 - rate) / 100).quantize(_CENTS)
                if amount != expected:
                    raise Invalid(f"{where}.LineAmount: {amount}, but the discounted amount is {expected}")
            elif not (0 <= amount <= gross):
                raise Invalid(
                    f"{where}.LineAmount: {amount} is not between 0 and Quantity x UnitAmount ({gross})"
                )
            line["DiscountAmount"] = gross.quantize(_CENTS) - amount
            subtotal += amount
        body["SubTotal"], body["TotalTax"], body["Total"] = subtotal, Decimal("0.00"), subtotal
