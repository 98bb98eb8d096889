"""The canonical entities: the shapes every system's records are mapped to and from.

Guarantees (schema evolution, DESIGN §3):

* Every entity is a frozen, keyword-only msgspec Struct with a name (``customer``) and a schema
  version; ``Customer.schema_id == "customer/1"`` is what envelopes carry in ``schema``.
* A field added to an existing version always gets a default; unknown fields are ignored on
  decode, so old readers read new messages and new readers read old ones. A change that cannot
  keep that promise (removing or retyping a field, narrowing an enum) needs a new version:
  ``meshctl schema check`` catches it.
* Money is :class:`~mesh.canonical.money.Money` (integer minor units + ISO 4217 code), never a
  float. Documents with lines (orders, invoices, contracts) hold one currency: every amount in
  them must be in the document's ``currency``, or decoding fails.
* Dates are ``datetime.date`` (ISO ``YYYY-MM-DD`` on the wire); timestamps are timezone-aware.
* Rates (discounts, taxes) are fractions: ``0.05`` is 5 %.
"""

from __future__ import annotations

import datetime
import enum
from collections.abc import Iterable
from decimal import Decimal
from typing import Annotated, Any, ClassVar

import msgspec

from mesh.canonical.money import CurrencyCode, Money
from mesh.canonical.parts import Address, BankAccount, ContactDetails, ContactPerson, ExternalIds, Part

__all__ = [
    "ENTITIES",
    "BillingInterval",
    "Contract",
    "ContractLine",
    "ContractStatus",
    "Customer",
    "Entity",
    "Invoice",
    "InvoiceKind",
    "InvoiceLine",
    "InvoiceStatus",
    "PartyKind",
    "PartyStatus",
    "Payment",
    "PaymentDirection",
    "PaymentMethod",
    "PaymentStatus",
    "Price",
    "Product",
    "ProductKind",
    "ProductStatus",
    "SalesOrder",
    "SalesOrderLine",
    "SalesOrderStatus",
    "Supplier",
    "TaxLine",
    "TaxMode",
    "Tombstone",
    "entity_type",
]

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=500)]
Text = Annotated[str, msgspec.Meta(max_length=4000)]
Code = Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
Days = Annotated[int, msgspec.Meta(ge=0, le=3650)]
UtcDatetime = Annotated[datetime.datetime, msgspec.Meta(tz=True)]


class Entity(msgspec.Struct, frozen=True, kw_only=True):
    """Base of every canonical entity.

    ``id`` is the mesh-wide business key of the record (the envelope ``key``); ``external_ids``
    holds each system's own id for it, keyed by system name.
    """

    entity_name: ClassVar[str] = ""
    """The entity's name in subjects and configs (``customer``)."""
    schema_version: ClassVar[int] = 0
    schema_id: ClassVar[str] = ""
    """``<entity_name>/<schema_version>``: the envelope's ``schema``."""

    id: Id
    external_ids: ExternalIds = {}
    updated_at: UtcDatetime | None = None
    """When the record last changed in the system it came from."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.entity_name:
            cls.schema_id = f"{cls.entity_name}/{cls.schema_version}"


class Tombstone(msgspec.Struct, frozen=True, kw_only=True):
    """Payload of a ``<entity>.deleted`` event: which record is gone."""

    id: Id
    external_ids: ExternalIds = {}


def _one_currency(doc: str, currency: str, amounts: Iterable[tuple[str, Money | None]]) -> None:
    for where, money in amounts:
        if money is not None and money.currency != currency:
            raise ValueError(f"{where} is in {money.currency} but the {doc} is in {currency}")


def _fraction(where: str, value: Decimal | None) -> None:
    if value is not None and not (0 <= value <= 1):
        raise ValueError(f"{where} must be a fraction between 0 and 1, got {value}")


# --- parties ---------------------------------------------------------------------------------


class PartyKind(enum.StrEnum):
    COMPANY = "company"
    PERSON = "person"


class PartyStatus(enum.StrEnum):
    ACTIVE = "active"
    INACTIVE = "inactive"
    BLOCKED = "blocked"
    """No new orders or payments (credit hold, compliance)."""
    ARCHIVED = "archived"


class Customer(Entity, frozen=True):
    """A customer account (CRM account, ERP debtor, Xero contact with ``IsCustomer``)."""

    entity_name: ClassVar[str] = "customer"
    schema_version: ClassVar[int] = 1

    name: Name
    """Company name, or the person's full name for ``kind = person``."""
    number: Code | None = None
    """Customer / account number as printed on documents."""
    kind: PartyKind = PartyKind.COMPANY
    status: PartyStatus = PartyStatus.ACTIVE
    tax_number: Code | None = None
    """VAT / GST / tax registration number."""
    currency: CurrencyCode | None = None
    """Default currency for this customer's documents."""
    payment_terms_days: Days | None = None
    credit_limit: Money | None = None
    contact: ContactDetails = msgspec.field(default_factory=ContactDetails)
    primary_contact: ContactPerson | None = None
    billing_address: Address | None = None
    shipping_address: Address | None = None
    tags: list[Code] = []


class Supplier(Entity, frozen=True):
    """A supplier / vendor (ERP creditor, Xero contact with ``IsSupplier``)."""

    entity_name: ClassVar[str] = "supplier"
    schema_version: ClassVar[int] = 1

    name: Name
    number: Code | None = None
    status: PartyStatus = PartyStatus.ACTIVE
    tax_number: Code | None = None
    currency: CurrencyCode | None = None
    payment_terms_days: Days | None = None
    contact: ContactDetails = msgspec.field(default_factory=ContactDetails)
    primary_contact: ContactPerson | None = None
    address: Address | None = None
    bank_account: BankAccount | None = None


# --- catalogue -------------------------------------------------------------------------------


class ProductKind(enum.StrEnum):
    GOODS = "goods"
    SERVICE = "service"


class ProductStatus(enum.StrEnum):
    ACTIVE = "active"
    DISCONTINUED = "discontinued"
    """Still known (old orders refer to it), no longer sold."""
    ARCHIVED = "archived"


class Product(Entity, frozen=True):
    """A sellable or purchasable item (ERP article, Xero ``Item``)."""

    entity_name: ClassVar[str] = "product"
    schema_version: ClassVar[int] = 1

    name: Name
    sku: Code | None = None
    """Item code / SKU, unique per catalogue."""
    description: Text | None = None
    kind: ProductKind = ProductKind.GOODS
    status: ProductStatus = ProductStatus.ACTIVE
    category: Name | None = None
    unit_of_measure: Name | None = None
    """Sales unit as the catalogue states it (``each``, ``kg``, ``24 - 12 oz bottles``)."""
    sales_price: Money | None = None
    """List price per unit, net of tax."""
    purchase_price: Money | None = None
    tax_code: Code | None = None
    supplier_id: Id | None = None
    is_sold: bool = True
    is_purchased: bool = True
    track_inventory: bool = False
    quantity_on_hand: Decimal | None = None
    reorder_level: Decimal | None = None


class Price(Entity, frozen=True):
    """One entry of a price list: a product's unit price, possibly per customer and period."""

    entity_name: ClassVar[str] = "price"
    schema_version: ClassVar[int] = 1

    product_id: Id
    unit_price: Money
    price_list: Code = "standard"
    customer_id: Id | None = None
    """Set for a customer-specific price."""
    min_quantity: Decimal = Decimal(1)
    """The price applies from this quantity on (volume breaks)."""
    valid_from: datetime.date | None = None
    valid_to: datetime.date | None = None
    """Last day the price applies (inclusive)."""
    tax_included: bool = False

    def __post_init__(self) -> None:
        if self.valid_from and self.valid_to and self.valid_to < self.valid_from:
            raise ValueError(f"valid_to {self.valid_to} is before valid_from {self.valid_from}")


# --- contracts and orders --------------------------------------------------------------------


class BillingInterval(enum.StrEnum):
    ONCE = "once"
    MONTHLY = "monthly"
    QUARTERLY = "quarterly"
    YEARLY = "yearly"


class ContractStatus(enum.StrEnum):
    DRAFT = "draft"
    ACTIVE = "active"
    SUSPENDED = "suspended"
    TERMINATED = "terminated"
    EXPIRED = "expired"


class ContractLine(Part, frozen=True):
    unit_price: Money
    quantity: Decimal = Decimal(1)
    line_no: Annotated[int, msgspec.Meta(ge=1)] | None = None
    product_id: Id | None = None
    description: Text | None = None


class Contract(Entity, frozen=True):
    """A customer contract or subscription (CRM deal won, ERP framework agreement)."""

    entity_name: ClassVar[str] = "contract"
    schema_version: ClassVar[int] = 1

    customer_id: Id
    start_date: datetime.date
    currency: CurrencyCode
    number: Code | None = None
    title: Name | None = None
    status: ContractStatus = ContractStatus.DRAFT
    end_date: datetime.date | None = None
    """Last day of the contract (inclusive); none for open-ended contracts."""
    auto_renew: bool = False
    billing_interval: BillingInterval = BillingInterval.MONTHLY
    recurring_amount: Money | None = None
    """What is billed every ``billing_interval``."""
    total_value: Money | None = None
    payment_terms_days: Days | None = None
    lines: list[ContractLine] = []

    def __post_init__(self) -> None:
        if self.end_date and self.end_date < self.start_date:
            raise ValueError(f"end_date {self.end_date} is before start_date {self.start_date}")
        _one_currency(
            "contract",
            self.currency,
            [("recurring_amount", self.recurring_amount), ("total_value", self.total_value)]
            + [(f"lines[{i}].unit_price", line.unit_price) for i, line in enumerate(self.lines)],
        )


class SalesOrderStatus(enum.StrEnum):
    DRAFT = "draft"
    CONFIRMED = "confirmed"
    PARTIALLY_SHIPPED = "partially_shipped"
    SHIPPED = "shipped"
    INVOICED = "invoiced"
    CANCELLED = "cancelled"
    CLOSED = "closed"


class SalesOrderLine(Part, frozen=True):
    quantity: Decimal
    unit_price: Money
    """Price per unit before the discount, net of tax."""
    line_no: Annotated[int, msgspec.Meta(ge=1)] | None = None
    product_id: Id | None = None
    sku: Code | None = None
    description: Text | None = None
    discount_rate: Decimal = Decimal(0)
    """Fraction of the line's gross amount taken off (0.05 = 5 %)."""
    tax_code: Code | None = None
    line_amount: Money | None = None
    """Net amount of the line after discount, when the source states it."""


class SalesOrder(Entity, frozen=True):
    """A customer order (ERP sales order, Northwind ``Orders`` + ``Order Details``)."""

    entity_name: ClassVar[str] = "sales_order"
    schema_version: ClassVar[int] = 1

    customer_id: Id
    order_date: datetime.date
    currency: CurrencyCode
    number: Code | None = None
    status: SalesOrderStatus = SalesOrderStatus.DRAFT
    required_date: datetime.date | None = None
    shipped_date: datetime.date | None = None
    reference: Name | None = None
    """The customer's own reference (purchase order number)."""
    contract_id: Id | None = None
    lines: list[SalesOrderLine] = []
    shipping_amount: Money | None = None
    """Freight charged on the order."""
    subtotal: Money | None = None
    tax_total: Money | None = None
    total: Money | None = None
    billing_address: Address | None = None
    shipping_address: Address | None = None

    def __post_init__(self) -> None:
        _one_currency(
            "sales order",
            self.currency,
            [
                ("shipping_amount", self.shipping_amount),
                ("subtotal", self.subtotal),
                ("tax_total", self.tax_total),
                ("total", self.total),
            ]
            + [(f"lines[{i}].unit_price", ln.unit_price) for i, ln in enumerate(self.lines)]
            + [(f"lines[{i}].line_amount", ln.line_amount) for i, ln in enumerate(self.lines)],
        )
        for i, line in enumerate(self.lines):
            _fraction(f"lines[{i}].discount_rate", line.discount_rate)


# --- finance ---------------------------------------------------------------------------------


class InvoiceKind(enum.StrEnum):
    RECEIVABLE = "receivable"
    """A sales invoice we send (Xero ``ACCREC``)."""
    PAYABLE = "payable"
    """A bill we received (Xero ``ACCPAY``)."""
    RECEIVABLE_CREDIT = "receivable_credit"
    PAYABLE_CREDIT = "payable_credit"


class InvoiceStatus(enum.StrEnum):
    DRAFT = "draft"
    SUBMITTED = "submitted"
    AUTHORISED = "authorised"
    PAID = "paid"
    VOIDED = "voided"
    DELETED = "deleted"


class TaxMode(enum.StrEnum):
    """Whether line amounts include tax (Xero ``LineAmountTypes``)."""

    EXCLUSIVE = "exclusive"
    INCLUSIVE = "inclusive"
    NO_TAX = "no_tax"


class InvoiceLine(Part, frozen=True):
    unit_price: Money
    quantity: Decimal = Decimal(1)
    line_no: Annotated[int, msgspec.Meta(ge=1)] | None = None
    product_id: Id | None = None
    sku: Code | None = None
    description: Text | None = None
    discount_rate: Decimal = Decimal(0)
    """Fraction taken off (0.05 = 5 %)."""
    tax_code: Code | None = None
    account_code: Code | None = None
    """Ledger account the line posts to."""
    tax_amount: Money | None = None
    line_amount: Money | None = None


class TaxLine(Part, frozen=True):
    """Tax of one rate on a document (one per tax code)."""

    tax_code: Code
    tax_amount: Money
    tax_rate: Decimal | None = None
    """Fraction (0.19 = 19 %)."""
    taxable_amount: Money | None = None
    name: Name | None = None


class Invoice(Entity, frozen=True):
    """A sales invoice, a bill, or a credit note (Xero ``Invoice``)."""

    entity_name: ClassVar[str] = "invoice"
    schema_version: ClassVar[int] = 1

    party_id: Id
    """The customer (receivables) or supplier (payables) id."""
    issue_date: datetime.date
    currency: CurrencyCode
    kind: InvoiceKind = InvoiceKind.RECEIVABLE
    number: Code | None = None
    status: InvoiceStatus = InvoiceStatus.DRAFT
    due_date: datetime.date | None = None
    tax_mode: TaxMode = TaxMode.EXCLUSIVE
    reference: Name | None = None
    sales_order_id: Id | None = None
    contract_id: Id | None = None
    lines: list[InvoiceLine] = []
    tax_lines: list[TaxLine] = []
    subtotal: Money | None = None
    tax_total: Money | None = None
    total: Money | None = None
    amount_paid: Money | None = None
    amount_due: Money | None = None
    fully_paid_on: datetime.date | None = None
    billing_address: Address | None = None

    def __post_init__(self) -> None:
        amounts: list[tuple[str, Money | None]] = [
            (name, getattr(self, name))
            for name in ("subtotal", "tax_total", "total", "amount_paid", "amount_due")
        ]
        for i, ln in enumerate(self.lines):
            amounts += [
                (f"lines[{i}].unit_price", ln.unit_price),
                (f"lines[{i}].tax_amount", ln.tax_amount),
                (f"lines[{i}].line_amount", ln.line_amount),
            ]
            _fraction(f"lines[{i}].discount_rate", ln.discount_rate)
        for i, tl in enumerate(self.tax_lines):
            amounts += [
                (f"tax_lines[{i}].tax_amount", tl.tax_amount),
                (f"tax_lines[{i}].taxable_amount", tl.taxable_amount),
            ]
            _fraction(f"tax_lines[{i}].tax_rate", tl.tax_rate)
        _one_currency("invoice", self.currency, amounts)
        if self.due_date and self.due_date < self.issue_date:
            raise ValueError(f"due_date {self.due_date} is before issue_date {self.issue_date}")


class PaymentDirection(enum.StrEnum):
    INCOMING = "incoming"
    """Money received (Xero ``ACCRECPAYMENT``)."""
    OUTGOING = "outgoing"
    """Money paid out (Xero ``ACCPAYPAYMENT``)."""


class PaymentStatus(enum.StrEnum):
    PENDING = "pending"
    COMPLETED = "completed"
    FAILED = "failed"
    REVERSED = "reversed"


class PaymentMethod(enum.StrEnum):
    BANK_TRANSFER = "bank_transfer"
    CARD = "card"
    CASH = "cash"
    CHEQUE = "cheque"
    DIRECT_DEBIT = "direct_debit"
    OTHER = "other"


class Payment(Entity, frozen=True):
    """A payment against an invoice or on account (Xero ``Payment``)."""

    entity_name: ClassVar[str] = "payment"
    schema_version: ClassVar[int] = 1

    payment_date: datetime.date
    amount: Money
    """In the invoice's currency."""
    direction: PaymentDirection = PaymentDirection.INCOMING
    status: PaymentStatus = PaymentStatus.COMPLETED
    invoice_id: Id | None = None
    party_id: Id | None = None
    method: PaymentMethod | None = None
    reference: Name | None = None
    bank_amount: Money | None = None
    """What the bank account moved, in its own currency."""
    exchange_rate: Decimal | None = None
    """Units of the bank currency per unit of ``amount``'s currency."""
    account_code: Code | None = None
    is_reconciled: bool = False


ENTITIES: dict[str, type[Entity]] = {
    cls.entity_name: cls
    for cls in (Customer, Product, Price, Contract, SalesOrder, Invoice, Payment, Supplier)
}
"""Entity name -> its current canonical type."""


def entity_type(name: str) -> type[Entity]:
    """The canonical type of entity ``name``.

    Raises:
        KeyError: no such entity; the message lists the known ones.
    """
    try:
        return ENTITIES[name]
    except KeyError:
        raise KeyError(f"unknown entity {name!r} (expected one of: {', '.join(sorted(ENTITIES))})") from None
