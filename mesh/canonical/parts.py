"""Shared parts of canonical entities: addresses, contact details, people, bank accounts.

Every part is a frozen, keyword-only msgspec Struct whose fields all have defaults, so a part can
be filled field by field from a mapping and gain fields later without breaking old messages.
Unknown fields are ignored on decode.
"""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec

__all__ = [
    "Address",
    "AddressKind",
    "BankAccount",
    "ContactDetails",
    "ContactPerson",
    "CountryCode",
    "ExternalIds",
    "Part",
]

CountryCode = Annotated[
    str, msgspec.Meta(pattern=r"^[A-Z]{2}$", description="ISO 3166-1 alpha-2 country code")
]
ExternalIds = dict[str, str]
"""System name (the agent's ``system``, e.g. ``erp``) -> that system's id for the record."""

_Text = Annotated[str, msgspec.Meta(max_length=500)]
_Email = Annotated[str, msgspec.Meta(pattern=r"^[^@\s]+@[^@\s]+$", max_length=320)]


class Part(msgspec.Struct, frozen=True, kw_only=True):
    """Base of the shared parts (frozen, keyword-only, unknown fields ignored)."""


class AddressKind(enum.StrEnum):
    STREET = "street"
    POSTAL = "postal"
    """A P.O. box or other delivery-only address."""


class Address(Part, frozen=True):
    """A postal address (Xero ``Address``, Northwind ``Address/City/Region/PostalCode/Country``)."""

    kind: AddressKind = AddressKind.STREET
    line1: _Text | None = None
    line2: _Text | None = None
    line3: _Text | None = None
    city: _Text | None = None
    region: _Text | None = None
    """State, province, county or sales region as the source system names it."""
    postal_code: Annotated[str, msgspec.Meta(max_length=50)] | None = None
    country: CountryCode | None = None
    attention_to: _Text | None = None
    """Recipient line (a ship-to name, a department)."""


class ContactDetails(Part, frozen=True):
    """How to reach an organisation."""

    email: _Email | None = None
    phone: Annotated[str, msgspec.Meta(max_length=50)] | None = None
    mobile: Annotated[str, msgspec.Meta(max_length=50)] | None = None
    fax: Annotated[str, msgspec.Meta(max_length=50)] | None = None
    website: _Text | None = None


class ContactPerson(Part, frozen=True):
    """A person at a customer or supplier (Xero ``ContactPerson``, Northwind ``ContactName``)."""

    name: _Text | None = None
    """Full name as one string, when the source does not split it."""
    first_name: _Text | None = None
    last_name: _Text | None = None
    title: _Text | None = None
    """Job title (``Sales Representative``)."""
    email: _Email | None = None
    phone: Annotated[str, msgspec.Meta(max_length=50)] | None = None


class BankAccount(Part, frozen=True):
    """Where to pay a supplier (or collect from a customer)."""

    account_name: _Text | None = None
    iban: Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{2}[0-9]{2}[A-Z0-9]{1,30}$")] | None = None
    bic: Annotated[str, msgspec.Meta(pattern=r"^[A-Z0-9]{8}([A-Z0-9]{3})?$")] | None = None
    account_number: Annotated[str, msgspec.Meta(max_length=50)] | None = None
    """A domestic account number, for countries without IBAN."""
