"""A small finance API for the quote-to-cash example, in memory (a Starlette app).

    POST /invoices     {"reference", "customer", "amount_minor", "currency"} with a bearer token
                       and an Idempotency-Key header: 201 {"invoice": {"invoice_id", "number",
                       "status"}}; the same key again answers the first invoice (200) and
                       creates nothing. A customer on credit hold is refused:
                       422 {"message": "customer X is on credit hold: ..."}.
    GET  /invoices     {"invoices": [...]}

``hold(reference)`` makes the next POST for that reference wait until ``release(reference)``:
run.py uses it to SIGKILL the orchestrator while the invoice call is in flight.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

__all__ = ["FakeFinance"]


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status_code=status, media_type="application/json")


class FakeFinance:
    """The finance system: invoices by idempotency key, customers on credit hold refused."""

    def __init__(self, token: str, credit_hold: set[str]) -> None:
        self.token = token
        self.credit_hold = credit_hold
        self.invoices: list[dict[str, Any]] = []
        self.by_key: dict[str, dict[str, Any]] = {}
        self.posts: Counter[str] = Counter()
        """POSTs per reference (retries included), created or not."""
        self.refused: list[str] = []
        self._holds: dict[str, anyio.Event] = {}
        self.arrived: dict[str, anyio.Event] = {}

    def hold(self, reference: str) -> anyio.Event:
        """The next POST for ``reference`` waits for :meth:`release`; the event is set when it
        arrives."""
        self._holds[reference] = anyio.Event()
        self.arrived[reference] = anyio.Event()
        return self.arrived[reference]

    def release(self, reference: str) -> None:
        self._holds.pop(reference, anyio.Event()).set()

    def count(self, reference: str) -> int:
        return sum(1 for i in self.invoices if i["reference"] == reference)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/invoices", self._invoices, methods=["GET", "POST"])])

    async def _invoices(self, request: Request) -> Response:
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return _json({"message": "unauthorized"}, 401)
        if request.method == "GET":
            return _json({"invoices": self.invoices})
        try:
            body = json.loads(await request.body())
            ref, customer = str(body["reference"]), str(body["customer"])
            amount, currency = int(body["amount_minor"]), str(body["currency"])
        except (ValueError, KeyError, TypeError):
            return _json({"message": "expected reference, customer, amount_minor, currency"}, 400)
        key = request.headers.get("idempotency-key", "")
        if not key:
            return _json({"message": "Idempotency-Key header required"}, 400)
        self.posts[ref] += 1
        if ref in self._holds:
            self.arrived[ref].set()
            await self._holds[ref].wait()
        if key in self.by_key:
            return _json({"invoice": _public(self.by_key[key])})
        if customer in self.credit_hold:
            self.refused.append(ref)
            return _json(
                {"message": f"customer {customer} is on credit hold: invoice for {ref} refused"}, 422
            )
        invoice = {
            "invoice_id": f"inv-{len(self.invoices) + 1:04d}",
            "number": f"INV-{1000 + len(self.invoices) + 1}",
            "status": "AUTHORISED",
            "reference": ref,
            "customer": customer,
            "amount_minor": amount,
            "currency": currency,
        }
        self.invoices.append(invoice)
        self.by_key[key] = invoice
        return _json({"invoice": _public(invoice)}, 201)


def _public(invoice: dict[str, Any]) -> dict[str, Any]:
    """What the API answers about an invoice (the rest it keeps to itself)."""
    return {k: invoice[k] for k in ("invoice_id", "number", "status")}
