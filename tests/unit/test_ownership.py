"""Field ownership: who may create, delete and write which fields."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest

from mesh.errors import ConfigError
from mesh.ownership import EntityOwnership, Ownership, compile_ownership

CONFIG = """
[ownership.customer]
system_of_record = "crm"
[ownership.customer.fields]
credit_limit = "finance"
payment_terms_days = "finance"
"billing_address.country" = ["crm", "erp"]
"billing_address.postal_code" = "finance"
tags = "*"

[ownership.sales_order]
system_of_record = "erp"
default_owner = ["erp", "shop"]
[ownership.sales_order.fields]
status = "erp"
"external_ids" = "erp"
"""


def ownership(text: str = CONFIG) -> Ownership:
    return compile_ownership(tomllib.loads(text)["ownership"], source="agent.toml")


def customer(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": "ALFKI",
        "name": "Alfreds Futterkiste",
        "external_ids": {"crm": "0015e", "erp": "ALFKI"},
        "credit_limit": {"amount": 500000, "currency": "EUR"},
        "payment_terms_days": 30,
        "billing_address": {
            "line1": "Obere Str. 57",
            "city": "Berlin",
            "country": "DE",
            "postal_code": "12209",
        },
        "tags": ["key-account"],
    }
    doc.update(changes)
    return doc


def test_system_of_record_owns_existence_and_the_default_fields() -> None:
    rules = ownership()
    crm = rules.decide("customer", "crm", customer())
    assert crm.may_create
    assert crm.may_delete
    assert crm.dropped == (
        "external_ids.erp",
        "credit_limit",
        "payment_terms_days",
        "billing_address.postal_code",
    )
    assert crm.fields == {
        "id": "ALFKI",
        "name": "Alfreds Futterkiste",
        "external_ids": {"crm": "0015e"},
        "billing_address": {"line1": "Obere Str. 57", "city": "Berlin", "country": "DE"},
        "tags": ["key-account"],
    }
    assert crm.allowed(deleted=False)


def test_a_field_owner_writes_only_its_fields_and_may_not_create_or_delete() -> None:
    finance = ownership().decide("customer", "finance", customer())
    assert finance.fields == {
        "id": "ALFKI",
        "credit_limit": {"amount": 500000, "currency": "EUR"},
        "payment_terms_days": 30,
        "billing_address": {"postal_code": "12209"},
        "tags": ["key-account"],
    }
    assert set(finance.dropped) == {
        "name",
        "external_ids.crm",
        "external_ids.erp",
        "billing_address.line1",
        "billing_address.city",
        "billing_address.country",
    }
    assert not finance.may_create
    assert not finance.may_delete


def test_deletes_only_from_the_system_of_record() -> None:
    rules = ownership()
    tomb = {"id": "ALFKI"}
    assert rules.decide("customer", "crm", tomb, deleted=True).allowed(deleted=True)
    refused = rules.decide("customer", "erp", tomb, deleted=True)
    assert not refused.may_delete
    assert not refused.allowed(deleted=True)
    assert refused.dropped == ()


def test_nested_rules_most_specific_wins_and_emptied_objects_are_dropped_whole() -> None:
    rules = ownership()
    erp = rules.decide("customer", "erp", customer(billing_address={"city": "Köln", "country": "DE"}))
    assert erp.fields["billing_address"] == {"country": "DE"}  # country has its own rule: crm or erp
    assert "billing_address.city" in erp.dropped
    only_city = rules.decide("customer", "finance", customer(billing_address={"city": "Köln"}))
    assert "billing_address" not in only_city.fields  # never written as {}
    assert "billing_address.city" in only_city.dropped


def test_replacing_a_whole_object_needs_every_owned_part() -> None:
    rules = ownership()
    cleared = rules.decide("customer", "crm", customer(billing_address=None))
    assert "billing_address" not in cleared.fields  # would wipe finance's postal code
    assert "billing_address" in cleared.dropped
    assert rules.writable(
        "customer", "crm", ["name", "billing_address", "billing_address.city", "credit_limit"]
    ) == (["name", "billing_address.city"], ["billing_address", "credit_limit"])


def test_each_system_owns_its_own_external_id_unless_a_rule_says_otherwise() -> None:
    rules = ownership()
    mine = rules.decide("customer", "erp", {"id": "ALFKI", "external_ids": {"erp": "A-1", "crm": "forged"}})
    assert mine.fields == {"id": "ALFKI", "external_ids": {"erp": "A-1"}}
    assert mine.dropped == ("external_ids.crm",)
    order = rules.decide(
        "sales_order",
        "shop",
        {"id": "1", "external_ids": {"shop": "S-9"}, "status": "cancelled", "reference": "PO-7"},
    )
    assert order.fields == {
        "id": "1",
        "reference": "PO-7",
    }  # external_ids = "erp" overrides the per-system default
    assert set(order.dropped) == {"external_ids.shop", "status"}
    assert not order.may_create


def test_default_owner_list_any_system_and_id_always_kept() -> None:
    rules = ownership()
    shop = rules.decide("sales_order", "shop", {"id": "1", "reference": "PO-7", "customer_id": "ALFKI"})
    assert shop.fields == {"id": "1", "reference": "PO-7", "customer_id": "ALFKI"}
    stranger = rules.decide("sales_order", "crm", {"id": "1", "reference": "x"})
    assert stranger.fields == {"id": "1"}
    assert not stranger.allowed(deleted=False)  # the id alone is nothing to apply
    assert rules.decide("customer", "webshop", customer(tags=["vip"])).fields["tags"] == ["vip"]  # "*"


def test_unconfigured_entities_are_open() -> None:
    rules = ownership()
    decision = rules.decide("invoice", "anyone", {"id": "INV-1", "total": {"amount": 1, "currency": "EUR"}})
    assert decision.fields == {"id": "INV-1", "total": {"amount": 1, "currency": "EUR"}}
    assert decision.dropped == ()
    assert decision.may_create
    assert decision.may_delete
    assert rules.writable("invoice", "anyone", ["total"]) == (["total"], [])
    assert Ownership().decide("customer", "x", {"id": "1"}).may_delete


def test_no_system_of_record_means_anyone_creates_and_default_owner_is_any() -> None:
    rules = compile_ownership({"product": EntityOwnership(fields={"sales_price": "erp"})})
    decision = rules.decide(
        "product", "shop", {"id": "1", "name": "Chai", "sales_price": {"amount": 1, "currency": "USD"}}
    )
    assert decision.fields == {"id": "1", "name": "Chai"}
    assert decision.dropped == ("sales_price",)
    assert decision.may_create
    assert decision.may_delete
    assert "system_of_record=None" in repr(rules.policies["product"])


def test_every_problem_is_listed_with_its_path() -> None:
    bad = tomllib.loads("""
[ownership.widget]
system_of_record = "crm"
[ownership.customer]
default_owner = ["crm", "fin ance"]
[ownership.customer.fields]
credit_limt = "finance"
"billing_address.cty" = "finance"
"tags[0]" = "crm"
id = "crm"
name = []
[ownership.product]
system_of_record = "c rm"
""")["ownership"]
    with pytest.raises(ConfigError) as info:
        compile_ownership(bad, source="agent.toml")
    message = str(info.value)
    assert len(info.value.problems) == 8, message
    assert message.splitlines() == [f"agent.toml: {p}: {m}" for p, m in info.value.problems]
    for fragment in (
        "ownership.widget: unknown entity 'widget' (expected one of: contract, customer,",
        "ownership.customer.fields.credit_limt: no field `credit_limt` on Customer "
        "(expected one of: billing_address,",
        'ownership.customer.fields["billing_address.cty"]: no field `cty` on Address (at `billing_address`)',
        'ownership.customer.fields["tags[0]"]: ownership applies to whole fields: own the list, not one item',
        "ownership.customer.fields.id: `id` is the record's identity: every system may send it",
        "ownership.customer.fields.name: expected at least one owner",
        "ownership.customer.default_owner: 'fin ance' is not a system name (letters, digits, _ and -) or '*'",
        "ownership.product.system_of_record: expected `str` matching regex",
    ):
        assert fragment in message, message


def test_a_single_problem_is_one_line() -> None:
    with pytest.raises(
        ConfigError, match=r"^agent.toml: ownership.customer: object contains unknown field `default`"
    ):
        compile_ownership({"customer": {"default": "crm"}}, source="agent.toml")
    with pytest.raises(
        ConfigError, match=r"^<ownership>: ownership.customer.fields.tags: 'crm erp' is not a system name"
    ):
        compile_ownership({"customer": {"fields": {"tags": "crm erp"}}})


def test_the_documented_example_compiles() -> None:
    import textwrap

    import mesh.ownership

    doc = mesh.ownership.__doc__ or ""
    block = doc.split("::\n\n", 1)[1].split("\n\nThe apply path", 1)[0]
    rules = compile_ownership(tomllib.loads(textwrap.dedent(block))["ownership"], source="doc")
    finance = rules.decide("customer", "finance", customer())
    assert set(finance.fields) == {"id", "credit_limit", "payment_terms_days", "tags"}


def test_building_the_decoders_never_crashes_the_interpreter() -> None:
    """msgspec 0.22 can segfault at interpreter exit when a pattern-constrained str appears as
    ``X | list[X]`` (msgspec#717); owners are therefore checked by hand. Convert ownership,
    mapping and canonical types in fresh interpreters and demand a clean exit each time."""
    import subprocess
    import sys

    code = (
        "import msgspec, mesh.ownership as o, mesh.mapping as m, mesh.canonical.schema as s\n"
        "msgspec.convert({'default_owner': 'crm', 'fields': {'a': ['crm', 'erp']}}, o.EntityOwnership)\n"
        "msgspec.convert({'fields': {'id': 'x', 'n': {'from': 'y', 'items': {'a': 'b'}}}}, m.MappingConfig)\n"
        "s.asyncapi_document()\n"
    )
    codes = [subprocess.run([sys.executable, "-c", code], capture_output=True).returncode for _ in range(12)]
    assert codes == [0] * 12
