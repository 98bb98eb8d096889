"""ERP (Northwind in PostgreSQL) customers and products -> CRM (REST), as canonical entities.

    python examples/erp-to-crm/run.py [--duration 8] [--timeout 90] [--data-dir DIR]

Starts a throwaway PostgreSQL cluster with Northwind, a nats-server, a fake CRM REST API and two
agents (erp-agent.toml, crm-agent.toml); shows the initial load and a few live ERP changes
reaching the CRM; then checks that the CRM holds exactly the ERP's customers and products, field
by field in its own shape, and that nothing was dead-lettered. See README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import anyio
from _common import NORTHWIND_SQL, Stack, main, new_secret, toml_lookup
from _fake_apis import FakeCrm

HERE = Path(__file__).resolve().parent
ERP_CONFIG, CRM_CONFIG = HERE / "erp-agent.toml", HERE / "crm-agent.toml"

# What the ERP's users do while the mesh runs: (what, SQL).
LIVE_CHANGES = [
    (
        "rename customer ALFKI",
        "UPDATE customers SET company_name = 'Alfreds Futterkiste GmbH', "
        "phone = '030-0074322' WHERE customer_id = 'ALFKI'",
    ),
    (
        "new customer MESH1",
        "INSERT INTO customers (customer_id, company_name, contact_name, city, country) "
        "VALUES ('MESH1', 'Mesh Demo Ltd', 'Ada Lovelace', 'London', 'UK')",
    ),
    ("raise the price of Chai to 19.50", "UPDATE products SET unit_price = 19.5 WHERE product_id = 1"),
    ("delete customer PARIS (it has no orders)", "DELETE FROM customers WHERE customer_id = 'PARIS'"),
    ("discontinue Chang", "UPDATE products SET discontinued = 1 WHERE product_id = 2"),
    (
        "move customer BLONP",
        "UPDATE customers SET address = '12, rue des Bouchers', "
        "postal_code = '67000' WHERE customer_id = 'BLONP'",
    ),
]

CUSTOMERS_SQL = """SELECT json_build_object('id', customer_id, 'company', company_name,
    'contact_name', contact_name, 'contact_title', contact_title, 'phone', phone, 'fax', fax,
    'street', address, 'city', city, 'region', region, 'zip', postal_code, 'country', country)
  FROM customers ORDER BY customer_id"""
PRODUCTS_SQL = """SELECT json_build_object('id', p.product_id, 'name', p.product_name,
    'category', c.category_name, 'unit', p.quantity_per_unit,
    'price', to_char(p.unit_price::numeric, 'FM999990.00'), 'discontinued', p.discontinued,
    'in_stock', p.units_in_stock)
  FROM products p LEFT JOIN categories c USING (category_id) ORDER BY p.product_id"""


def expected_customer(row: dict[str, Any], countries: dict[str, str]) -> dict[str, Any]:
    """The CRM record an ERP customer row should become (written without the mesh's mapper)."""
    country = row["country"].strip() if row["country"] else None
    return {
        "external_id": row["id"],
        "company": row["company"],
        "contact": {
            "name": row["contact_name"],
            "title": row["contact_title"],
            "phone": row["phone"],
            "fax": row["fax"],
        },
        "address": {
            "street": row["street"],
            "city": row["city"],
            "region": row["region"],
            "zip": row["zip"],
            "country_code": countries[country] if country else None,
        },
    }


def expected_product(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "external_id": str(row["id"]),
        "name": row["name"],
        "category": row["category"],
        "unit": row["unit"],
        "price": row["price"],
        "currency": "USD",
        "active": row["discontinued"] == 0,
        "in_stock": row["in_stock"],
    }


def differences(expected: dict[str, dict[str, Any]], actual: dict[str, dict[str, Any]]) -> list[str]:
    """What differs between two stores keyed by id (the CRM adds ``updated_at``: ignored)."""
    out = [f"missing {k}" for k in sorted(expected.keys() - actual.keys())]
    out += [f"extra {k}" for k in sorted(actual.keys() - expected.keys())]
    for k in sorted(expected.keys() & actual.keys()):
        got = {f: v for f, v in actual[k].items() if f != "updated_at"}
        if got != expected[k]:
            out.append(f"{k}: expected {expected[k]}, CRM has {got}")
    return out


async def scenario(stack: Stack) -> bool:
    stack.step("starting PostgreSQL and loading Northwind (the ERP)")
    pg = await stack.postgres()
    await pg.load_northwind("erp")
    counts = await pg.query(
        "erp", "SELECT json_build_array((SELECT count(*) FROM customers), (SELECT count(*) FROM products))"
    )
    n_customers, n_products = int(counts[0][0]), int(counts[0][1])
    stack.info(f"ERP: {n_customers} customers, {n_products} products")

    stack.step("starting nats-server, the fake CRM and the agents")
    nats = stack.nats()
    token = new_secret()
    crm = FakeCrm(token)
    crm_url = await stack.serve(crm.app, "fake CRM API")
    stack.agent(ERP_CONFIG, "erp-agent", erp_dsn=pg.dsn("erp"))
    stack.agent(CRM_CONFIG, "crm-agent", crm_url=crm_url, env={"CRM_TOKEN": token})
    stack.info(f"flows: erp-agent --customer/1, product/1 on {nats.url}--> crm-agent --PUT--> {crm_url}")

    async def crm_counts() -> str:
        return f"CRM customers={len(crm.customers)} products={len(crm.products)}"

    async def initial_load_done() -> bool:
        return len(crm.customers) == n_customers and len(crm.products) == n_products

    stack.step("initial load: the ERP agent snapshots both tables, the CRM agent applies them")
    await stack.wait_until(initial_load_done, "the initial load to reach the CRM", status=crm_counts)
    await stack.sample_event("evt.customer.upserted.erp", "ALFKI")
    await stack.sample_event("evt.product.upserted.erp", "1")

    stack.step(f"live changes in the ERP over {stack.duration:.0f}s")
    for what, sql in LIVE_CHANGES:
        stack.info(f"ERP: {what}")
        await pg.psql("erp", sql=sql)
        await anyio.sleep(stack.duration / len(LIVE_CHANGES))

    countries = toml_lookup(ERP_CONFIG, "customers", "to_canonical", "countries")

    async def expected() -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        customers = {r["id"]: expected_customer(r, countries) for r in await pg.query("erp", CUSTOMERS_SQL)}
        products = {str(r["id"]): expected_product(r) for r in await pg.query("erp", PRODUCTS_SQL)}
        return customers, products

    async def in_sync() -> bool:
        customers, products = await expected()
        return not differences(customers, crm.customers) and not differences(products, crm.products)

    stack.step("waiting for the CRM to match the ERP")
    await stack.wait_until(in_sync, "the CRM to match the ERP", status=crm_counts)

    stack.step("verification")
    customers, products = await expected()
    diff_c, diff_p = differences(customers, crm.customers), differences(products, crm.products)
    stack.check(
        not diff_c,
        f"CRM holds exactly the ERP's {len(customers)} customers, field by field",
        "; ".join(diff_c[:3]),
    )
    stack.check(
        not diff_p,
        f"CRM holds exactly the ERP's {len(products)} products, field by field",
        "; ".join(diff_p[:3]),
    )
    stack.check(crm.customers.get("ALFKI", {}).get("company") == "Alfreds Futterkiste GmbH", "ALFKI renamed")
    stack.check("PARIS" not in crm.customers and "MESH1" in crm.customers, "PARIS deleted, MESH1 created")
    stack.check(crm.products.get("1", {}).get("price") == "19.50", 'Chai costs "19.50" in the CRM')
    stack.check(not crm.refused, "the CRM refused no request", "; ".join(crm.refused[:3]))
    dead = await stack.dead_letters()
    stack.check(not dead, "nothing was dead-lettered", str(dead[:2]))
    erp, crm_agent = stack.agents
    stack.info(
        f"erp-agent {erp.counts()} | crm-agent {crm_agent.counts()} | CRM requests {dict(crm.requests)}"
    )
    return True


if __name__ == "__main__":
    main(
        "erp-to-crm",
        "Northwind customers and products (PostgreSQL) -> CRM REST API",
        scenario,
        needs=[NORTHWIND_SQL],
    )
