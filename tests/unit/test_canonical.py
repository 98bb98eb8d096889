"""Canonical entities and money: currency rules, versioning, evolution, document invariants."""

from __future__ import annotations

import datetime
from decimal import Decimal
from typing import Any

import msgspec
import pytest

from mesh.canonical import CURRENCY_EXPONENTS, ENTITIES, Customer, Entity, Money, entity_type
from mesh.canonical.entities import (
    Invoice,
    InvoiceLine,
    Payment,
    Price,
    Product,
    SalesOrder,
    SalesOrderLine,
    TaxLine,
)
from mesh.canonical.money import currency_exponent, from_minor_units, to_decimal, to_minor_units
from mesh.canonical.parts import Address

# --- money --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "exponent"),
    [
        ("JPY", 0),
        ("KRW", 0),
        ("CLP", 0),
        ("EUR", 2),
        ("USD", 2),
        ("GBP", 2),
        ("CHF", 2),
        ("BHD", 3),
        ("KWD", 3),
        ("JOD", 3),
        ("TND", 3),
        ("CLF", 4),
        ("UYW", 4),
    ],
)
def test_currency_exponents_follow_iso_4217(code: str, exponent: int) -> None:
    assert CURRENCY_EXPONENTS[code] == exponent
    assert currency_exponent(code) == exponent


def test_currency_table_holds_only_alphabetic_codes_with_known_exponents() -> None:
    assert len(CURRENCY_EXPONENTS) > 150
    for code, exp in CURRENCY_EXPONENTS.items():
        assert len(code) == 3, code
        assert code.isalpha(), code
        assert code.isupper(), code
        assert exp in (0, 2, 3, 4)
    for not_money in ("XAU", "XXX", "XTS", "eur", "EURO", ""):
        with pytest.raises(ValueError, match="unknown currency"):
            currency_exponent(not_money)


@pytest.mark.parametrize(
    ("value", "currency", "minor"),
    [
        ("12.34", "EUR", 1234),
        (Decimal("12.3"), "EUR", 1230),
        (12, "EUR", 1200),
        (9.8, "EUR", 980),
        (0.1, "USD", 10),
        ("-0.05", "EUR", -5),
        ("1234", "JPY", 1234),
        ("1.005", "KWD", 1005),
        (" 7.5 ", "BHD", 7500),
        ("0.0001", "CLF", 1),
        ("1E+2", "EUR", 10000),
    ],
)
def test_to_minor_units_is_exact(value: Any, currency: str, minor: int) -> None:
    assert to_minor_units(value, currency) == minor


@pytest.mark.parametrize(
    ("value", "currency"), [("12.345", "EUR"), ("1.5", "JPY"), (0.0001, "KWD"), (9.999, "USD")]
)
def test_to_minor_units_rejects_inexact_amounts_by_default(value: Any, currency: str) -> None:
    with pytest.raises(ValueError, match=f"more decimals than {currency} allows"):
        to_minor_units(value, currency)


@pytest.mark.parametrize(
    ("value", "rounding", "minor"),
    [
        ("0.125", "half_even", 12),
        ("0.135", "half_even", 14),
        ("0.125", "half_up", 13),
        ("0.125", "half_down", 12),
        ("0.129", "down", 12),
        ("-0.129", "down", -12),
        ("0.121", "up", 13),
        ("-0.121", "floor", -13),
        ("-0.129", "ceiling", -12),
    ],
)
def test_to_minor_units_rounds_only_by_explicit_policy(value: str, rounding: Any, minor: int) -> None:
    assert to_minor_units(value, "EUR", rounding) == minor


@pytest.mark.parametrize("value", [True, float("nan"), float("inf"), "abc", "NaN", "Infinity", None, [1]])
def test_to_minor_units_rejects_non_numbers(value: Any) -> None:
    with pytest.raises(ValueError, match="number"):
        to_minor_units(value, "EUR")


def test_to_minor_units_rejects_unknown_currency_and_rounding() -> None:
    with pytest.raises(ValueError, match="unknown currency 'ABC'"):
        to_minor_units("1", "ABC")
    with pytest.raises(ValueError, match="unknown rounding 'sideways'"):
        to_minor_units("1.001", "EUR", "sideways")  # type: ignore[arg-type]


def test_from_minor_units_is_exact_with_the_currency_scale() -> None:
    assert from_minor_units(1234, "EUR") == Decimal("12.34")
    assert str(from_minor_units(1200, "EUR")) == "12.00"
    assert str(from_minor_units(1234, "JPY")) == "1234"
    assert str(from_minor_units(1005, "KWD")) == "1.005"
    assert str(from_minor_units(-5, "EUR")) == "-0.05"
    with pytest.raises(ValueError, match="must be an integer"):
        from_minor_units(12.5, "EUR")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be an integer"):
        from_minor_units(True, "EUR")


def test_to_decimal_reads_floats_by_their_shortest_repr() -> None:
    assert to_decimal(9.8) == Decimal("9.8")  # not 9.800000000000000710542735760100185871124267578125
    assert to_decimal(0.1 + 0.2) == Decimal("0.30000000000000004")


def test_money_is_integer_minor_units_with_a_known_currency() -> None:
    m = Money.of("12.34", "EUR")
    assert m == Money(amount=1234, currency="EUR")
    assert m.to_decimal() == Decimal("12.34")
    assert str(m) == "12.34 EUR"
    assert str(Money.of(5, "JPY")) == "5 JPY"
    assert Money.of("0.125", "EUR", "half_even").amount == 12
    with pytest.raises(ValueError, match="more decimals"):
        Money.of("0.125", "EUR")
    with pytest.raises(ValueError, match="unknown currency 'ABC'"):
        Money(amount=1, currency="ABC")


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (b'{"amount": 12.5, "currency": "EUR"}', "Expected `int`, got `float`"),
        (b'{"amount": "12", "currency": "EUR"}', "Expected `int`, got `str`"),
        (b'{"amount": 12, "currency": "eur"}', "matching regex"),
        (b'{"amount": 12, "currency": "ABC"}', "unknown currency 'ABC'"),
        (b'{"amount": 12}', "missing required field `currency`"),
    ],
)
def test_money_decoding_never_accepts_floats_or_unknown_currencies(doc: bytes, message: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=message):
        msgspec.json.decode(doc, type=Money)


def test_money_of_different_currencies_never_mixes() -> None:
    eur = Money.of("1.50", "EUR")
    assert eur + Money.of("2", "EUR") == Money.of("3.50", "EUR")
    assert eur - Money.of("2", "EUR") == Money.of("-0.50", "EUR")
    with pytest.raises(ValueError, match="cannot combine EUR with USD"):
        _ = eur + Money.of("1", "USD")
    with pytest.raises(TypeError):
        _ = eur + 1


# --- entities ------------------------------------------------------------------------------------


def test_registry_names_every_entity_with_its_schema_version() -> None:
    assert set(ENTITIES) == {
        "customer",
        "product",
        "price",
        "contract",
        "sales_order",
        "invoice",
        "payment",
        "supplier",
    }
    for name, cls in ENTITIES.items():
        assert issubclass(cls, Entity)
        assert cls.entity_name == name
        assert cls.schema_id == f"{name}/{cls.schema_version}"
        assert cls.schema_version >= 1
        assert entity_type(name) is cls
    assert Customer.schema_id == "customer/1"
    with pytest.raises(KeyError, match=r"unknown entity 'widget'.*customer"):
        entity_type("widget")


def test_entities_are_frozen_and_keyword_only() -> None:
    c = Customer(id="C1", name="Acme")
    with pytest.raises(AttributeError):
        c.name = "Other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        Customer("C1", "Acme")  # type: ignore[call-arg]


def test_every_field_beyond_the_essentials_has_a_default() -> None:
    """Optional by default: a field added later must never be required (schema evolution)."""
    essentials = {
        "customer": {"id", "name"},
        "supplier": {"id", "name"},
        "product": {"id", "name"},
        "price": {"id", "product_id", "unit_price"},
        "contract": {"id", "customer_id", "start_date", "currency"},
        "sales_order": {"id", "customer_id", "order_date", "currency"},
        "invoice": {"id", "party_id", "issue_date", "currency"},
        "payment": {"id", "payment_date", "amount"},
    }
    for name, cls in ENTITIES.items():
        required = {f.name for f in msgspec.structs.fields(cls) if f.required}
        assert required == essentials[name], name


def _order(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": "10248",
        "customer_id": "VINET",
        "order_date": "2016-07-04",
        "currency": "EUR",
        "status": "confirmed",
        "external_ids": {"erp": "10248"},
        "lines": [
            {
                "line_no": 1,
                "product_id": "11",
                "quantity": "12",
                "unit_price": {"amount": 1400, "currency": "EUR"},
            },
            {
                "line_no": 2,
                "product_id": "42",
                "quantity": "10",
                "discount_rate": "0.05",
                "unit_price": {"amount": 980, "currency": "EUR"},
            },
        ],
        "shipping_amount": {"amount": 3238, "currency": "EUR"},
        "shipping_address": {"line1": "59 rue de l'Abbaye", "city": "Reims", "country": "FR"},
        "updated_at": "2016-07-04T10:00:00Z",
    }
    doc.update(changes)
    return doc


def test_an_order_round_trips_through_msgpack_and_json_with_iso_dates() -> None:
    order = msgspec.convert(_order(), SalesOrder)
    assert order.order_date == datetime.date(2016, 7, 4)
    assert order.lines[1].discount_rate == Decimal("0.05")
    assert order.lines[0].quantity == Decimal(12)
    assert order.updated_at == datetime.datetime(2016, 7, 4, 10, tzinfo=datetime.UTC)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(order), type=SalesOrder) == order
    wire = msgspec.json.decode(msgspec.json.encode(order))
    assert wire["order_date"] == "2016-07-04"
    assert wire["lines"][1]["discount_rate"] == "0.05"  # decimals travel as strings, exactly
    assert wire["shipping_amount"] == {"amount": 3238, "currency": "EUR"}
    assert msgspec.json.decode(msgspec.json.encode(order), type=SalesOrder) == order


def test_unknown_fields_are_ignored_and_missing_optional_ones_default() -> None:
    """A newer writer's extra field and an older writer's missing fields both decode."""
    newer = msgspec.json.encode(
        {
            **_order(),
            "loyalty_tier": "gold",
            "lines": [{"quantity": "1", "unit_price": {"amount": 1, "currency": "EUR"}, "gift_wrap": True}],
        }
    )
    order = msgspec.json.decode(newer, type=SalesOrder)
    assert order.lines[0].quantity == 1
    older = msgspec.json.encode(
        {"id": "1", "customer_id": "C", "order_date": "2020-01-02", "currency": "JPY"}
    )
    order = msgspec.json.decode(older, type=SalesOrder)
    assert order.lines == []
    assert order.status == "draft"
    assert order.shipping_address is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"lines": [{"quantity": "1", "unit_price": {"amount": 1, "currency": "USD"}}]},
            "lines\\[0\\].unit_price is in USD but the sales order is in EUR",
        ),
        ({"shipping_amount": {"amount": 1, "currency": "GBP"}}, "shipping_amount is in GBP"),
        (
            {
                "lines": [
                    {"quantity": "1", "discount_rate": "5", "unit_price": {"amount": 1, "currency": "EUR"}}
                ]
            },
            "discount_rate must be a fraction between 0 and 1",
        ),
        ({"order_date": "04/07/2016"}, "Invalid RFC3339 encoded date - at `\\$.order_date`"),
        ({"updated_at": "2016-07-04T10:00:00"}, "Expected `datetime` with a timezone component"),
        ({"currency": "EURO"}, "matching regex"),
        ({"status": "lost"}, "Invalid enum value 'lost' - at `\\$.status`"),
        ({"shipping_address": {"country": "France"}}, "matching regex.*shipping_address.country"),
    ],
)
def test_order_invariants_are_checked_on_decode(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=message):
        msgspec.convert(_order(**changes), SalesOrder)


def test_invoice_holds_one_currency_and_sane_dates() -> None:
    eur = Money.of("100", "EUR")
    invoice = Invoice(
        id="INV-1",
        party_id="ALFKI",
        issue_date=datetime.date(2024, 1, 31),
        currency="EUR",
        lines=[InvoiceLine(unit_price=eur, quantity=Decimal(2), tax_amount=Money.of("38", "EUR"))],
        tax_lines=[TaxLine(tax_code="DE19", tax_rate=Decimal("0.19"), tax_amount=Money.of("38", "EUR"))],
        total=Money.of("238", "EUR"),
        due_date=datetime.date(2024, 2, 29),
    )
    assert msgspec.json.decode(msgspec.json.encode(invoice), type=Invoice) == invoice
    wire = msgspec.to_builtins(invoice)
    wire["tax_lines"][0]["tax_amount"]["currency"] = "USD"
    with pytest.raises(msgspec.ValidationError, match=r"tax_lines\[0\]\.tax_amount is in USD"):
        msgspec.convert(wire, Invoice)
    wire = msgspec.to_builtins(invoice) | {"due_date": "2024-01-01"}
    with pytest.raises(msgspec.ValidationError, match="due_date 2024-01-01 is before issue_date"):
        msgspec.convert(wire, Invoice)
    wire = msgspec.to_builtins(invoice)
    wire["tax_lines"][0]["tax_rate"] = "19"
    with pytest.raises(msgspec.ValidationError, match="tax_rate must be a fraction"):
        msgspec.convert(wire, Invoice)


def test_price_validity_period_and_payment_money() -> None:
    with pytest.raises(msgspec.ValidationError, match="valid_to 2024-01-01 is before valid_from"):
        msgspec.convert(
            {
                "id": "P",
                "product_id": "1",
                "unit_price": {"amount": 1, "currency": "EUR"},
                "valid_from": "2024-02-01",
                "valid_to": "2024-01-01",
            },
            Price,
        )
    payment = msgspec.convert(
        {
            "id": "PAY-1",
            "payment_date": "2024-03-01",
            "amount": {"amount": 5000, "currency": "KWD"},
            "direction": "outgoing",
            "method": "bank_transfer",
        },
        Payment,
    )
    assert payment.amount.to_decimal() == Decimal("5.000")


def test_parts_validate_their_codes() -> None:
    assert msgspec.convert({"country": "DE", "city": "Berlin"}, Address).country == "DE"
    with pytest.raises(msgspec.ValidationError, match="matching regex"):
        msgspec.convert({"country": "Germany"}, Address)
    with pytest.raises(msgspec.ValidationError, match=r"contact\.email"):
        msgspec.convert({"id": "C", "name": "n", "contact": {"email": "not an email"}}, Customer)
    with pytest.raises(msgspec.ValidationError, match=r"Expected `str` of length >= 1 - at `\$\.name`"):
        msgspec.convert({"id": "C", "name": ""}, Customer)


def test_product_quantities_are_decimals_not_floats() -> None:
    product = msgspec.convert(
        {
            "id": "1",
            "name": "Chai",
            "quantity_on_hand": 39.5,
            "sales_price": {"amount": 1800, "currency": "USD"},
        },
        Product,
    )
    assert product.quantity_on_hand == Decimal("39.5")
    assert msgspec.json.decode(msgspec.json.encode(product))["quantity_on_hand"] == "39.5"


def test_sales_order_line_requires_quantity_and_price() -> None:
    with pytest.raises(msgspec.ValidationError, match="missing required field `unit_price`"):
        msgspec.convert({"quantity": "1"}, SalesOrderLine)
