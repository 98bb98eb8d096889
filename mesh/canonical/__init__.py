"""The canonical data model: versioned entities every system maps to and from.

* :mod:`mesh.canonical.entities` — Customer, Product, Price, Contract, SalesOrder, Invoice,
  Payment, Supplier, and :data:`ENTITIES` (name -> type).
* :mod:`mesh.canonical.parts` — Address, ContactDetails, ContactPerson, BankAccount.
* :mod:`mesh.canonical.money` — Money (integer minor units + ISO 4217 code) and the currency table.
* :mod:`mesh.canonical.schema` — JSON Schema and AsyncAPI export, breaking-change check.

Mappings between system rows and canonical entities live in :mod:`mesh.mapping`, field
ownership in :mod:`mesh.ownership`.
"""

from mesh.canonical.entities import (
    ENTITIES,
    Contract,
    Customer,
    Entity,
    Invoice,
    Payment,
    Price,
    Product,
    SalesOrder,
    Supplier,
    Tombstone,
    entity_type,
)
from mesh.canonical.money import CURRENCY_EXPONENTS, Money, currency_exponent
from mesh.canonical.parts import Address, BankAccount, ContactDetails, ContactPerson

__all__ = [
    "CURRENCY_EXPONENTS",
    "ENTITIES",
    "Address",
    "BankAccount",
    "ContactDetails",
    "ContactPerson",
    "Contract",
    "Customer",
    "Entity",
    "Invoice",
    "Money",
    "Payment",
    "Price",
    "Product",
    "SalesOrder",
    "Supplier",
    "Tombstone",
    "currency_exponent",
    "entity_type",
]
