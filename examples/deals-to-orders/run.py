"""CRM deals marked won -> ERP sales orders with lines (Northwind orders + order_details).

    python examples/deals-to-orders/run.py [--duration 8] [--timeout 90] [--data-dir DIR]

Starts a throwaway PostgreSQL cluster with Northwind plus the ERP's order import table
(erp_import.sql), a nats-server, a fake CRM with a few deals, and two agents (crm-agent.toml polls
the CRM's deals API, erp-agent.toml writes orders); wins, changes and loses deals while it runs;
then checks every won deal is one ERP order with exactly its lines and amount, the lost ones are
not, and the deal naming an account the ERP does not know was dead-lettered with its reason.
See README.md.
"""

from __future__ import annotations

import datetime
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import anyio
import httpx
from _common import NORTHWIND_SQL, Stack, main, new_secret
from _fake_apis import FakeCrm

HERE = Path(__file__).resolve().parent
CRM_CONFIG, ERP_CONFIG = HERE / "crm-agent.toml", HERE / "erp-agent.toml"
CENTS = Decimal("0.01")


def line(product_id: int, name: str, quantity: int, price: str, discount: str = "0") -> dict[str, Any]:
    return {
        "product_id": product_id,
        "name": name,
        "quantity": quantity,
        "price": price,
        "discount": discount,
    }


def deal(key: str, account: str, name: str, stage: str, *lines: dict[str, Any]) -> dict[str, Any]:
    delivery = (datetime.date.today() + datetime.timedelta(days=14)).isoformat()
    return {
        "id": key,
        "account_id": account,
        "name": name,
        "stage": stage,
        "currency": "USD",
        "delivery_date": delivery,
        "line_items": list(lines),
    }


# The CRM before the agents start: Northwind accounts and products, prices as the CRM quotes them.
DEALS = [
    deal(
        "D-1001",
        "ALFKI",
        "Alfreds: cheese for the summer",
        "won",
        line(11, "Queso Cabrales", 12, "21.00"),
        line(72, "Mozzarella di Giovanni", 5, "34.80", "0.05"),
    ),
    deal(
        "D-1002",
        "BERGS",
        "Berglunds: pantry restock",
        "won",
        line(42, "Singaporean Hokkien Fried Mee", 10, "14.00"),
        line(14, "Tofu", 8, "23.25", "0.1"),
    ),
    deal(
        "D-1003", "QUICK", "QUICK-Stop: apples", "won", line(51, "Manjimup Dried Apples", 20, "53.00", "0.15")
    ),
    deal("D-1004", "HANAR", "Hanari Carnes: camembert", "open", line(60, "Camembert Pierrot", 15, "34.00")),
    deal(
        "D-1005",
        "VINET",
        "Vins et alcools: beverages",
        "open",
        line(1, "Chai", 24, "18.00"),
        line(2, "Chang", 24, "19.00", "0.05"),
    ),
    deal("D-1006", "FRANK", "Frankenversand: lost to a competitor", "lost", line(1, "Chai", 10, "18.00")),
    deal("D-1007", "ZZZZZ", "An account the ERP has never heard of", "won", line(1, "Chai", 1, "18.00")),
]

# What the sales team does while the mesh runs: (what, deal id, change).
LIVE_CHANGES: list[tuple[str, str, dict[str, Any]]] = [
    ("win D-1004 (HANAR)", "D-1004", {"stage": "won"}),
    (
        "D-1002: the customer wants 16 Tofu, not 8",
        "D-1002",
        {
            "line_items": [
                line(42, "Singaporean Hokkien Fried Mee", 10, "14.00"),
                line(14, "Tofu", 16, "23.25", "0.1"),
            ]
        },
    ),
    ("win D-1005 (VINET)", "D-1005", {"stage": "won"}),
    ("D-1003 falls through after all: lost", "D-1003", {"stage": "lost"}),
]

ORDERS_SQL = """SELECT json_build_object('deal', i.deal_id, 'order_id', o.order_id,
    'customer', o.customer_id, 'order_date', o.order_date, 'ship_name', o.ship_name,
    'lines', (SELECT json_agg(json_build_object('product_id', d.product_id, 'quantity', d.quantity,
                'unit_price', d.unit_price::numeric::text, 'discount', d.discount::numeric::text)
              ORDER BY d.product_id) FROM order_details d WHERE d.order_id = o.order_id))
  FROM crm_order_import i JOIN orders o USING (order_id) ORDER BY i.deal_id"""


def expected_order(d: dict[str, Any]) -> dict[str, Any]:
    """What the ERP should hold for a won deal (computed from the deal, not through the mesh)."""
    lines = sorted(
        (
            (li["product_id"], li["quantity"], Decimal(li["price"]), Decimal(li["discount"]))
            for li in d["line_items"]
        ),
    )
    return {
        "customer": d["account_id"],
        "order_date": d["close_date"],
        "lines": lines,
        "amount": Decimal(d["amount"]),
    }


def actual_order(row: dict[str, Any]) -> dict[str, Any]:
    lines = sorted(
        (li["product_id"], li["quantity"], Decimal(li["unit_price"]), Decimal(li["discount"]))
        for li in row["lines"] or []
    )
    amount = sum(((q * p * (1 - disc)).quantize(CENTS) for _, q, p, disc in lines), Decimal("0.00"))
    return {"customer": row["customer"], "order_date": row["order_date"], "lines": lines, "amount": amount}


async def scenario(stack: Stack) -> bool:
    stack.step("starting PostgreSQL, loading Northwind (the ERP) and its order import table")
    pg = await stack.postgres()
    await pg.load_northwind("erp")
    await pg.psql("erp", file=HERE / "erp_import.sql")
    before = (await pg.query("erp", "SELECT count(*) FROM orders"))[0]
    stack.info(f"ERP: {before} orders; import table crm_order_import (erp_import.sql)")

    stack.step("starting nats-server, the fake CRM (with deals) and the agents")
    nats = stack.nats()
    token = new_secret()
    crm = FakeCrm(token)
    for d in DEALS:
        crm.put_deal(d)
    stack.info(
        "CRM deals: " + ", ".join(f"{d['id']} {d['account_id']} {d['stage']}" for d in crm.deals.values())
    )
    crm_url = await stack.serve(crm.app, "fake CRM API")
    stack.agent(CRM_CONFIG, "crm-agent", crm_url=crm_url, env={"CRM_TOKEN": token})
    stack.agent(ERP_CONFIG, "erp-agent", erp_dsn=pg.dsn("erp"))
    stack.info(
        f"flow: crm-agent polls GET {crm_url}/deals?stage=won,lost --sales_order/1 on {nats.url}--> "
        "erp-agent --> crm_order_import --trigger--> orders + order_details"
    )

    async def erp_orders() -> dict[str, dict[str, Any]]:
        return {r["deal"]: r for r in await pg.query("erp", ORDERS_SQL)}

    async def status() -> str:
        return f"ERP orders from deals={len(await erp_orders())}"

    def expected() -> dict[str, dict[str, Any]]:
        won = (d for d in crm.deals.values() if d["stage"] == "won" and d["account_id"] != "ZZZZZ")
        return {d["id"]: expected_order(d) for d in won}

    async def in_sync() -> bool:
        actual = {k: actual_order(v) for k, v in (await erp_orders()).items()}
        return actual == expected()

    stack.step("won deals become ERP orders")
    await stack.wait_until(in_sync, "the won deals to become ERP orders", status=status)
    await stack.sample_event("evt.sales_order.upserted.crm", "D-1001")

    stack.step(f"the sales team works in the CRM over {stack.duration:.0f}s")
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=crm_url, headers=headers) as client:
        for what, key, change in LIVE_CHANGES:
            stack.info(f"CRM: {what}")
            (await client.patch(f"/deals/{key}", json=change)).raise_for_status()
            await anyio.sleep(stack.duration / len(LIVE_CHANGES))

    stack.step("waiting for the ERP to match the CRM")
    await stack.wait_until(in_sync, "the ERP orders to match the won deals", status=status)

    stack.step("verification")
    orders = await erp_orders()
    actual = {k: actual_order(v) for k, v in orders.items()}
    want = expected()
    stack.check(
        actual == want,
        f"every won deal is one ERP order with its lines and amount ({len(want)} orders)",
        f"expected {want}, ERP has {actual}",
    )
    stack.check(
        sorted(orders) == ["D-1001", "D-1002", "D-1004", "D-1005"],
        "D-1003 (lost) and D-1006 are not orders",
        str(sorted(orders)),
    )
    stack.check(actual.get("D-1002", {}).get("lines", [(0, 0)])[0][:2] == (14, 16), "D-1002 now has 16 Tofu")
    ids = sorted(r["order_id"] for r in orders.values())
    total = (await pg.query("erp", "SELECT count(*) FROM orders"))[0]
    stack.check(
        total == before + len(orders) and ids[0] > 20000, f"ERP order numbers {ids}; {total} orders in all"
    )
    dead = await stack.dead_letters()
    stack.check(
        len(dead) == 1 and dead[0]["envelope"]["key"] == "D-1007" and dead[0]["error"] == "IntegrityPending",
        "D-1007 (unknown account ZZZZZ) was dead-lettered as IntegrityPending, and nothing else",
        str(dead),
    )
    if dead:
        stack.info(
            f"dead letter: flow={dead[0]['flow']} key={dead[0]['envelope']['key']} "
            f"error={dead[0]['error']} reason={dead[0]['reason'][:160]}"
        )
        stack.info(f"(see it with: meshctl dlq list --server {nats.url})")
    stack.check(not crm.refused, "the CRM refused no request", "; ".join(crm.refused[:3]))
    crm_agent, erp = stack.agents
    stack.info(f"crm-agent {crm_agent.counts()} | erp-agent {erp.counts()}")
    return True


if __name__ == "__main__":
    main(
        "deals-to-orders",
        "CRM deals marked won -> ERP sales orders with lines (PostgreSQL)",
        scenario,
        needs=[NORTHWIND_SQL],
    )
