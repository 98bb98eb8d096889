"""System API operations on PostgreSQL: an INSERT ... RETURNING and a stored function, once per
idempotency key even when two replicas race (the ``mesh_api_calls`` row commits with the
order), a refusal raised by the function is ``rejected``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest

from mesh.api import ApiError, call, call_detailed
from mesh.config import AgentConfig
from tests._pg import PgCluster
from tests._secure import SecuredNatsServer, secure_config
from tests.integration.test_system_api import admin, agent_toml, serving

pytestmark = [pytest.mark.anyio, pytest.mark.integration, pytest.mark.timeout(90)]

SCHEMA = """
CREATE TABLE sales_orders (
    id serial PRIMARY KEY, number text NOT NULL UNIQUE, customer_id text NOT NULL,
    total_minor bigint NOT NULL, currency text NOT NULL
);
CREATE FUNCTION cancel_order(p_number text) RETURNS TABLE (number text, cancelled boolean)
LANGUAGE plpgsql AS $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM sales_orders s WHERE s.number = p_number) THEN
    RAISE EXCEPTION 'order % does not exist', p_number;
  END IF;
  DELETE FROM sales_orders s WHERE s.number = p_number;
  RETURN QUERY SELECT p_number, true;
END $$;
"""

OPS = """
[[api.operations]]
name = "sales_order.create"
request = {{ entity = "sales_order" }}
[api.operations.run]
adapter = "postgres"
dsn = "{dsn}"
statement = \"\"\"INSERT INTO sales_orders (number, customer_id, total_minor, currency)
VALUES (:id, :customer_id, 0, :currency) RETURNING id AS order_id, number\"\"\"

[[api.operations]]
name = "sales_order.cancel"
request = {{ fields = {{ number = "str" }} }}
[api.operations.run]
adapter = "postgres"
dsn = "{dsn}"
statement = "SELECT * FROM cancel_order(:number)"
"""


@pytest.fixture
def erp_pg(pg_cluster: PgCluster, pg_db: str) -> str:
    with pg_cluster.connect(pg_db) as conn:
        conn.execute(SCHEMA)
    return pg_cluster.dsn(pg_db)


@pytest.fixture
def erp(tmp_path: Path, erp_pg: str, nats_server: SecuredNatsServer) -> AgentConfig:
    text = agent_toml("erp-agent", "erp", tmp_path / "state", OPS.format(dsn=erp_pg), nats_server)
    return secure_config(text, tmp_path / "erp.creds", nats_server)


def canonical_order(number: str) -> dict[str, Any]:
    return {"id": number, "customer_id": "ALFKI", "currency": "EUR", "order_date": "2026-12-03", "lines": []}


def numbers(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        return [r[0] for r in conn.execute("SELECT number FROM sales_orders ORDER BY id")]


async def test_postgres_operations_run_once_per_key_and_map_refusals(
    erp: AgentConfig, erp_pg: str, nats_server: SecuredNatsServer
) -> None:
    subject = "api.erp.sales_order.create"
    async with admin(nats_server) as js, serving(erp, replicas=2) as servers:
        outcomes: list[Any] = []

        async def one() -> None:
            res = await call_detailed(
                js, subject, canonical_order("SO-1"), idempotency_key="deal-1", timeout=15
            )
            outcomes.append((res.result, res.replayed))

        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(one)
        assert {str(r) for r, _ in outcomes} == {str({"order_id": 1, "number": "SO-1"})}
        assert sum(1 for _, replayed in outcomes if not replayed) == 1
        assert sum(s.executions for s in servers) == 1

        with pytest.raises(ApiError) as bad:
            await call(
                js, subject, {**canonical_order("SO-2"), "currency": "euro"}, idempotency_key="x", timeout=5
            )
        assert bad.value.code == "bad_request"
        assert bad.value.message.startswith("request: currency: ")

        got = await call(
            js, "api.erp.sales_order.cancel", {"number": "SO-1"}, idempotency_key="c1", timeout=5
        )
        assert got == {"number": "SO-1", "cancelled": True}
        with pytest.raises(ApiError) as refused:
            await call(js, "api.erp.sales_order.cancel", {"number": "SO-1"}, idempotency_key="c2", timeout=5)
        assert refused.value.code == "rejected"
        assert "order SO-1 does not exist" in refused.value.message
    assert numbers(erp_pg) == []
    with psycopg.connect(erp_pg) as conn:
        recorded = conn.execute("SELECT count(*) FROM mesh_api_calls").fetchone()
    assert recorded == (2,), "the create and the first cancel; the refused cancel left no row"
