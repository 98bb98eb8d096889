"""The ``[api]`` table, request shapes and the System API permission rows (no I/O)."""

from __future__ import annotations

import msgspec
import pytest

from adapters.rest._api import RestOperationConfig
from adapters.sql._api import SqliteOperationConfig
from mesh.api import ApiError, ShapeConfig
from mesh.api._shapes import compile_shape, validate
from mesh.api._wire import endpoint_name, endpoint_subject, error_reply, service_name
from mesh.api.client import subject_of
from mesh.config import parse_agent_config
from mesh.errors import ConfigError
from mesh.security.permissions import agent_permissions, api_permissions, permissions_for_agent

BASE = """
[agent]
name = "erp-agent"
system = "erp"
state_dir = "state"
"""

GOOD = (
    BASE
    + """
[api]
version = "2.1.0"

[[api.operations]]
name = "sales_order.create"
request = { entity = "sales_order" }
[api.operations.run]
adapter = "sqlite"
path = "erp.db"
statement = "INSERT INTO orders (id) VALUES (:id) RETURNING id"

[[api.operations]]
name = "invoice.create"
[api.operations.run]
adapter = "rest"
base_url = "https://finance.example.com/v1"
path = "/invoices"
"""
)


def test_operations_decode_by_adapter_with_paths_resolved(tmp_path: object) -> None:
    cfg = parse_agent_config(GOOD, base=tmp_path)  # type: ignore[arg-type]
    assert cfg.api is not None
    assert cfg.api.version == "2.1.0"
    sql, rest = (op.run for op in cfg.api.operations)
    assert isinstance(sql, SqliteOperationConfig)
    assert sql.path == f"{tmp_path}/erp.db"
    assert isinstance(rest, RestOperationConfig)
    assert rest.method == "POST"
    assert permissions_for_agent(cfg) == agent_permissions("erp-agent", [], [], [], apis=["erp"])


@pytest.mark.parametrize(
    ("change", "path", "message"),
    [
        (('name = "sales_order.create"', 'name = "SalesOrder"'), "api.operations[0].name", "matching"),
        (('adapter = "sqlite"', 'adapter = "oracle"'), "api.operations[0].run.adapter", "invalid value"),
        (("request = { entity = \"sales_order\" }", 'request = { entity = "deal" }'),
         "api.operations[0].request.entity", "unknown canonical entity 'deal'"),
        (("request = { entity = \"sales_order\" }", 'request = { fields = { n = "number" } }'),
         "api.operations[0].request.fields.n", "unknown type 'number'"),
        (('path = "/invoices"', 'path = "invoices"'), "api.operations[1].run.path", "must start with '/'"),
        (('version = "2.1.0"', 'version = "2.1"'), "api.version", "expected `str` matching"),
        (('statement = "INSERT', 'statment = "INSERT'), "api.operations[0].run", "unknown field `statment`"),
        (('name = "invoice.create"', 'name = "sales_order.create"'), "api.operations[1].name", "duplicate"),
    ],
)  # fmt: skip
def test_a_bad_api_table_names_the_field(change: tuple[str, str], path: str, message: str) -> None:
    assert change[0] in GOOD
    with pytest.raises(ConfigError) as info:
        parse_agent_config(GOOD.replace(change[0], change[1], 1), source="erp.toml")
    problems = info.value.problems
    assert any(p.path == path and message.lower() in p.message.lower() for p in problems), problems


def test_request_shapes_validate_with_the_field_path() -> None:
    typ = compile_shape(ShapeConfig(fields={"id": "str", "qty": "int?", "total": "money"}), "Req")
    assert validate({"id": "A", "total": {"amount": 5, "currency": "EUR"}}, typ, "request") == {
        "id": "A",
        "qty": None,
        "total": {"amount": 5, "currency": "EUR"},
    }
    with pytest.raises(ApiError) as info:
        validate({"id": "A", "total": {"amount": "5", "currency": "EUR"}}, typ, "request")
    assert (info.value.code, info.value.message) == (
        "bad_request",
        "request: total.amount: expected `int`, got `str`",
    )
    with pytest.raises(ApiError, match="missing required field `id`"):
        validate({"total": {"amount": 5, "currency": "EUR"}}, typ, "request")
    order = compile_shape(ShapeConfig(entity="sales_order"), "Order")
    with pytest.raises(ApiError, match=r"request: lines\[0\]\.quantity"):
        line = {"quantity": [], "unit_price": {"amount": 1, "currency": "EUR"}}
        head = {"id": "1", "customer_id": "C", "order_date": "2026-01-01", "currency": "EUR"}
        validate({**head, "lines": [line]}, order, "request")
    assert validate({"anything": [1]}, compile_shape(None, "Any"), "request") == {"anything": [1]}


def test_names_subjects_and_error_replies_follow_the_contract() -> None:
    assert service_name("erp") == "mesh-erp"
    assert endpoint_subject("erp", "sales_order.create") == "api.erp.sales_order.create"
    assert endpoint_name("sales_order.create") == "sales_order_create"
    assert subject_of("erp.customer.get") == subject_of("api.erp.customer.get") == "api.erp.customer.get"
    body, headers = error_reply(ApiError("unavailable", "down"))
    assert msgspec.json.decode(body) == {
        "ok": False,
        "error": {"code": "unavailable", "message": "down", "retryable": True},
    }
    assert headers == {"Nats-Service-Error": "down", "Nats-Service-Error-Code": "503"}
    assert ApiError("rejected", "no").retryable is False


def test_serving_an_api_grants_only_that_systems_subjects_and_keys() -> None:
    pub, sub = api_permissions(["erp"])
    assert sub == ["api.erp.>", "$SRV.*", "$SRV.*.mesh-erp", "$SRV.*.mesh-erp.>"]
    assert pub == [
        "$KV.mesh_api_results.erp.>",
        "$JS.API.DIRECT.GET.KV_mesh_api_results.$KV.mesh_api_results.erp.>",
    ]
    plain = agent_permissions("crm-agent", ["crm"], [], [])
    assert not any(s.startswith(("api.", "$SRV", "$KV.mesh_api")) for s in plain.pub.allow + plain.sub.allow)
    with pytest.raises(ConfigError):
        api_permissions(["erp.>"])
