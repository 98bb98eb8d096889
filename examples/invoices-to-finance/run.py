"""ERP invoices (derived from Northwind orders + order_details) -> finance REST API (Xero-shaped).

    python examples/invoices-to-finance/run.py [--duration 8] [--timeout 90] [--data-dir DIR]

Starts a throwaway PostgreSQL cluster with Northwind plus the ERP's invoices table
(erp_invoices.sql), a nats-server, a fake finance API shaped like Xero's accounting API (OAuth2
client credentials, Contacts, Invoices with LineItems) and two agents (erp-agent.toml,
finance-agent.toml); ships orders and corrects an invoice while it runs; then checks that the
finance system holds every ERP invoice with the same lines and, to the cent, the same totals,
and a contact for every customer. See README.md.
"""

from __future__ import annotations

import json
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import anyio
from _common import NORTHWIND_SQL, Stack, main, new_secret
from _fake_apis import FakeFinance

HERE = Path(__file__).resolve().parent
_LOGGED_HEADERS = ("content-type", "xero-tenant-id", "idempotency-key")  # never Authorization
ERP_CONFIG, FINANCE_CONFIG = HERE / "erp-agent.toml", HERE / "finance-agent.toml"

# What happens in the ERP while the mesh runs: (what, SQL). Each statement list is one transaction.
LIVE_CHANGES = [
    (
        "ship the five oldest open orders",
        "UPDATE orders SET shipped_date = current_date WHERE order_id IN "
        "(SELECT order_id FROM orders WHERE shipped_date IS NULL ORDER BY order_id LIMIT 5)",
    ),
    (
        "correct INV-10248: 10% off the Queso Cabrales",
        "UPDATE order_details SET discount = 0.1 WHERE order_id = 10248 AND product_id = 11",
    ),
    (
        "rename customer ALFKI",
        "UPDATE customers SET company_name = 'Alfreds Futterkiste GmbH' WHERE customer_id = 'ALFKI'",
    ),
    (
        "un-ship order 10249: its invoice INV-10249 is withdrawn (finance voids it)",
        "UPDATE orders SET shipped_date = NULL WHERE order_id = 10249",
    ),
    (
        "a customer MESH2 is entered by mistake and deleted again (finance archives the contact)",
        "INSERT INTO customers (customer_id, company_name, city, country)"
        " VALUES ('MESH2', 'Entered By Mistake', 'Leeds', 'UK')",
    ),
    (
        "a new customer MESH1 orders 3 Chai, shipped at once",
        "INSERT INTO customers (customer_id, company_name, city, country)"
        " VALUES ('MESH1', 'Mesh Demo Ltd', 'London', 'UK');"
        " INSERT INTO orders (order_id, customer_id, order_date, shipped_date, freight)"
        " VALUES (11078, 'MESH1', current_date, current_date, 12.5);"
        " INSERT INTO order_details VALUES (11078, 1, 18, 3, 0)",
    ),
]

INVOICES_SQL = """SELECT json_build_object('number', invoice_number, 'customer', customer_id,
    'date', issue_date, 'due', due_date, 'total', total::text, 'lines', lines)
  FROM invoices ORDER BY invoice_number"""
CUSTOMERS_SQL = "SELECT json_build_object('id', customer_id, 'name', company_name) FROM customers"


def expected_invoice(row: dict[str, Any]) -> dict[str, Any]:
    """What the finance system should hold for an ERP invoice row (computed without the mesh)."""
    return {
        "contact": row["customer"],
        "date": row["date"],
        "due": row["due"],
        "total": Decimal(row["total"]),
        "lines": [
            (
                li["description"],
                Decimal(li["quantity"]),
                Decimal(li["unit_price"]),
                Decimal(li["line_amount"]),
            )
            for li in row["lines"]
        ],
    }


def actual_invoice(inv: dict[str, Any]) -> dict[str, Any]:
    return {
        "contact": inv["Contact"]["ContactNumber"],
        "date": inv["Date"],
        "due": inv["DueDate"],
        "total": inv["Total"],
        "lines": [
            (li["Description"], Decimal(li["Quantity"]), Decimal(li["UnitAmount"]), Decimal(li["LineAmount"]))
            for li in inv["LineItems"]
        ],
    }


async def scenario(stack: Stack) -> bool:
    stack.step("starting PostgreSQL, loading Northwind (the ERP) and deriving its invoices")
    pg = await stack.postgres()
    await pg.load_northwind("erp")
    await pg.psql("erp", file=HERE / "erp_invoices.sql")
    first = (await pg.query("erp", "SELECT json_build_array(count(*), sum(total)::text) FROM invoices"))[0]
    stack.info(f"ERP: {first[0]} invoices (one per shipped order) worth {first[1]} USD; erp_invoices.sql")

    stack.step("starting nats-server, the fake finance API and the agents")
    nats = stack.nats()
    client_id, secret, tenant = "mesh-example", new_secret(), "0f9a3c1e-5d2b-4c8e-9a7f-1b2c3d4e5f60"
    finance = FakeFinance(client_id, secret, tenant)
    finance_url = await stack.serve(finance.app, "fake finance API (Xero-shaped)")
    stack.agent(ERP_CONFIG, "erp-agent", erp_dsn=pg.dsn("erp"))
    stack.agent(
        FINANCE_CONFIG,
        "finance-agent",
        finance_url=finance_url,
        client_id=client_id,
        tenant_id=tenant,
        env={"FINANCE_CLIENT_SECRET": secret},
    )
    stack.info(
        f"flows: erp-agent --customer/1, invoice/1 on {nats.url}--> finance-agent "
        f"--POST--> {finance_url}/api.xro/2.0/Contacts, /Invoices"
    )

    async def erp_state() -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
        customers = {r["id"]: r["name"] for r in await pg.query("erp", CUSTOMERS_SQL)}
        invoices = {r["number"]: expected_invoice(r) for r in await pg.query("erp", INVOICES_SQL)}
        return customers, invoices

    def finance_state() -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
        """Active contacts by ContactNumber, invoices not voided by InvoiceNumber."""
        contacts = {
            c["ContactNumber"]: c["Name"] for c in finance.contacts.values() if c["ContactStatus"] == "ACTIVE"
        }
        invoices = {
            v["InvoiceNumber"]: actual_invoice(v)
            for v in finance.invoices.values()
            if v["Status"] != "VOIDED"
        }
        return contacts, invoices

    async def in_sync() -> bool:
        return await erp_state() == finance_state()

    async def status() -> str:
        return f"finance contacts={len(finance.contacts)} invoices={len(finance.invoices)}"

    stack.step("initial load: customers become contacts, invoices become Xero invoices")
    await stack.wait_until(in_sync, "the invoices to reach the finance system", status=status)
    await stack.sample_event("evt.invoice.upserted.erp", "INV-10248")

    stack.step(f"live changes in the ERP over {stack.duration:.0f}s")
    for what, sql in LIVE_CHANGES:
        stack.info(f"ERP: {what}")
        await pg.psql("erp", sql=sql)
        await anyio.sleep(stack.duration / len(LIVE_CHANGES))

    async def mesh2_arrived() -> bool:
        return any(c["ContactNumber"] == "MESH2" for c in finance.contacts.values())

    await stack.wait_until(mesh2_arrived, "MESH2 to reach the finance system", status=status)
    stack.info("ERP: delete MESH2")
    await pg.psql("erp", sql="DELETE FROM customers WHERE customer_id = 'MESH2'")

    stack.step("waiting for the finance system to match the ERP")
    await stack.wait_until(in_sync, "the finance system to match the ERP", status=status)

    stack.step("verification")
    (erp_customers, erp_invoices), (contacts, invoices) = await erp_state(), finance_state()
    missing = sorted(erp_invoices.keys() ^ invoices.keys())
    wrong = [k for k in sorted(erp_invoices.keys() & invoices.keys()) if erp_invoices[k] != invoices[k]]
    stack.check(
        not missing and not wrong,
        f"finance holds exactly the ERP's {len(erp_invoices)} invoices: "
        "contact, dates, every line and the total",
        f"missing/extra {missing[:5]}, different {wrong[:5]}",
    )
    erp_sum = sum((i["total"] for i in erp_invoices.values()), Decimal(0))
    fin_sum = sum((i["total"] for i in invoices.values()), Decimal(0))
    stack.check(
        erp_sum == fin_sum, f"invoiced in all: ERP {erp_sum} USD = finance {fin_sum} USD, to the cent"
    )
    stack.check(contacts == erp_customers, f"a contact for each of the ERP's {len(erp_customers)} customers")
    stack.check(
        invoices.get("INV-10248", {}).get("lines", [("", 0, 0, 0)])[0][3] == Decimal("151.20"),
        "INV-10248's corrected line: 12 x 14.00 less 10% = 151.20",
    )
    stack.check(
        "INV-11078" in invoices and contacts.get("MESH1") == "Mesh Demo Ltd", "MESH1 and INV-11078 arrived"
    )
    voided = [v for v in finance.invoices.values() if v["InvoiceNumber"] == "INV-10249"]
    stack.check(
        [v["Status"] for v in voided] == ["VOIDED"], "INV-10249 voided in finance (one invoice, not deleted)"
    )
    archived = [c for c in finance.contacts.values() if c["ContactNumber"] == "MESH2"]
    stack.check(
        [c["ContactStatus"] for c in archived] == ["ARCHIVED"], "MESH2 archived in finance (one contact)"
    )
    twice = {n: k for n, k in finance.created.items() if k > 1}
    stack.check(not twice, "every contact and invoice created once, with the id Xero assigned", str(twice))
    deletes = [c for c in finance.requests if c.method == "DELETE"]
    stack.check(not deletes, "no DELETE sent (Xero has none for contacts or invoices)", str(deletes[:2]))
    dead = await stack.dead_letters()
    stack.check(not dead, "nothing was dead-lettered", str(dead[:2]))
    erp, fin = stack.agents
    stack.info(
        f"erp-agent {erp.counts()} | finance-agent {fin.counts()} | finance calls {len(finance.requests)}"
    )
    held = fin.metrics().get("mesh_consumed_messages_total{outcome=held}", 0)
    stack.info(f"deliveries held by after = (an invoice before its contact): {held:.0f}")
    log = stack.root / "finance-requests.jsonl"
    with log.open("w") as out:  # every request the finance API received, for contract checks
        for c in finance.requests:
            kept = {k: v for k, v in c.headers.items() if k in _LOGGED_HEADERS}
            out.write(json.dumps({"method": c.method, "path": c.path, "query": c.query, "headers": kept,
                                  "body": c.body.decode(), "status": c.status}) + "\n")  # fmt: skip
    stack.info(f"the finance API's {len(finance.requests)} requests: {log}")
    return True


if __name__ == "__main__":
    main(
        "invoices-to-finance",
        "ERP invoices (Northwind orders) -> finance REST API (Xero-shaped)",
        scenario,
        needs=[NORTHWIND_SQL],
    )
