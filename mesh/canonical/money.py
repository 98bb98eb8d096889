"""Money: integer minor units plus an ISO 4217 currency code, never a float.

Guarantees:

* ``Money.amount`` is an integer count of the currency's minor unit (cents for EUR, yen for JPY,
  fils for KWD). Decoding or constructing a ``Money`` with a currency outside
  :data:`CURRENCY_EXPONENTS` fails.
* :func:`to_minor_units` turns a decimal amount (``Decimal``, ``int``, a decimal string, or a
  ``float`` taken by its shortest repr, i.e. what a database printed) into minor units by the
  currency's exponent. An amount with more decimals than the currency has is **rejected** unless
  an explicit rounding policy is given; it never rounds silently.
* :func:`from_minor_units` is exact: it returns a ``Decimal`` with exactly the currency's number
  of decimals.
"""

from __future__ import annotations

import decimal
from decimal import Decimal
from typing import Annotated, Any, Literal

import msgspec

__all__ = [
    "CURRENCY_EXPONENTS",
    "CurrencyCode",
    "Money",
    "Rounding",
    "currency_exponent",
    "from_minor_units",
    "to_decimal",
    "to_minor_units",
]

CurrencyCode = Annotated[
    str, msgspec.Meta(pattern=r"^[A-Z]{3}$", description="ISO 4217 alphabetic currency code")
]

# ISO 4217 active codes and their minor-unit exponents (List One). Funds codes (BOV, CHE, CHW,
# CLF, COU, MXV, USN, UYI, UYW) are included; precious metals and testing codes (XAU, XTS, XXX)
# have no minor unit and are not money here.
_EXPONENT_0 = "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF"
_EXPONENT_3 = "BHD IQD JOD KWD LYD OMR TND"
_EXPONENT_4 = "CLF UYW"
_EXPONENT_2 = (
    "AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BMD BND BOB BOV BRL BSD BTN BWP BYN "
    "BZD CAD CDF CHE CHF CHW CNY COP COU CRC CUP CVE CZK DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP "
    "GEL GHS GIP GMD GTQ GYD HKD HNL HTG HUF IDR ILS INR IRR JMD KES KGS KHR KPW KYD KZT LAK LBP "
    "LKR LRD LSL MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MXV MYR MZN NAD NGN NIO NOK NPR "
    "NZD PAB PEN PGK PHP PKR PLN QAR RON RSD RUB SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN "
    "SVC SYP SZL THB TJS TMT TOP TRY TTD TWD TZS UAH USD USN UYU UZS VED VES WST XCD XCG YER ZAR "
    "ZMW ZWG"
)
CURRENCY_EXPONENTS: dict[str, int] = {
    code: exp
    for exp, codes in ((0, _EXPONENT_0), (2, _EXPONENT_2), (3, _EXPONENT_3), (4, _EXPONENT_4))
    for code in codes.split()
}
"""ISO 4217 code -> number of decimals of its minor unit (``JPY`` 0, ``EUR`` 2, ``KWD`` 3, ``CLF`` 4)."""

Rounding = Literal["reject", "half_even", "half_up", "half_down", "down", "up", "floor", "ceiling"]
"""What to do with an amount that has more decimals than the currency: ``reject`` (the default)
raises; the others round like the :mod:`decimal` constants of the same name (``down`` truncates
toward zero, ``floor`` toward negative infinity)."""

_ROUNDING: dict[str, str] = {
    "half_even": decimal.ROUND_HALF_EVEN,
    "half_up": decimal.ROUND_HALF_UP,
    "half_down": decimal.ROUND_HALF_DOWN,
    "down": decimal.ROUND_DOWN,
    "up": decimal.ROUND_UP,
    "floor": decimal.ROUND_FLOOR,
    "ceiling": decimal.ROUND_CEILING,
}


def currency_exponent(currency: str) -> int:
    """The number of decimals of ``currency``'s minor unit.

    Raises:
        ValueError: ``currency`` is not an ISO 4217 code in :data:`CURRENCY_EXPONENTS`.
    """
    try:
        return CURRENCY_EXPONENTS[currency]
    except (KeyError, TypeError):
        raise ValueError(f"unknown currency {currency!r} (expected an ISO 4217 code such as EUR)") from None


def to_decimal(value: Any) -> Decimal:
    """``value`` as an exact ``Decimal``: ints and decimal strings as written, floats by their
    shortest repr (``9.8`` -> ``Decimal("9.8")``, not the binary expansion).

    Raises:
        ValueError: not a finite number (bools, ``NaN``, ``Infinity`` and non-numeric strings
            included).
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, Decimal):
        result = value
    elif isinstance(value, int):
        result = Decimal(value)
    elif isinstance(value, float):
        result = Decimal(repr(value))
    elif isinstance(value, str):
        try:
            result = Decimal(value.strip())
        except decimal.InvalidOperation:
            raise ValueError(f"not a decimal number: {value!r}") from None
    else:
        raise ValueError(f"expected a number or decimal string, got {type(value).__name__}")
    if not result.is_finite():
        raise ValueError(f"not a finite number: {value!r}")
    return result


def to_minor_units(value: Any, currency: str, rounding: Rounding = "reject") -> int:
    """``value`` (major units, e.g. ``"12.34"`` EUR) as integer minor units (``1234``).

    Raises:
        ValueError: unknown currency, not a number, or more decimals than the currency has while
            ``rounding`` is ``"reject"``.
    """
    exp = currency_exponent(currency)
    amount = to_decimal(value)
    scaled = amount.scaleb(exp)
    whole = scaled.to_integral_value(rounding=decimal.ROUND_DOWN)
    if whole != scaled:
        if rounding == "reject":
            raise ValueError(
                f"{amount} has more decimals than {currency} allows ({exp}); "
                "set a rounding policy to round it"
            )
        if rounding not in _ROUNDING:
            raise ValueError(
                f"unknown rounding {rounding!r} (expected one of: reject, {', '.join(_ROUNDING)})"
            )
        whole = scaled.to_integral_value(rounding=_ROUNDING[rounding])
    return int(whole)


def from_minor_units(amount: int, currency: str) -> Decimal:
    """Integer minor units as an exact ``Decimal`` in major units (``1234`` EUR -> ``12.34``).

    Raises:
        ValueError: unknown currency or ``amount`` not an integer.
    """
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise ValueError(f"minor units must be an integer, got {amount!r}")
    return Decimal(amount).scaleb(-currency_exponent(currency))


class Money(msgspec.Struct, frozen=True, kw_only=True):
    """An amount of money: ``amount`` integer minor units of ``currency`` (ISO 4217).

    ``Money(amount=1234, currency="EUR")`` is 12.34 EUR; ``Money(amount=1234, currency="JPY")``
    is 1234 yen. Money of different currencies never mixes: ``+`` and ``-`` raise ``ValueError``.
    """

    amount: int
    """Integer count of the currency's minor unit (may be negative: credits, refunds)."""
    currency: CurrencyCode

    def __post_init__(self) -> None:
        currency_exponent(self.currency)  # raises for an unknown code, also when decoding

    @classmethod
    def of(cls, value: Any, currency: str, rounding: Rounding = "reject") -> Money:
        """Money from a major-unit amount: ``Money.of("12.34", "EUR")`` (see :func:`to_minor_units`)."""
        return cls(amount=to_minor_units(value, currency, rounding), currency=currency)

    def to_decimal(self) -> Decimal:
        """The amount in major units, exact (``Decimal("12.34")``)."""
        return from_minor_units(self.amount, self.currency)

    def _same(self, other: object) -> Money:
        if not isinstance(other, Money):
            raise TypeError(f"cannot combine Money with {type(other).__name__}")
        if other.currency != self.currency:
            raise ValueError(f"cannot combine {self.currency} with {other.currency}")
        return other

    def __add__(self, other: object) -> Money:
        return Money(amount=self.amount + self._same(other).amount, currency=self.currency)

    def __sub__(self, other: object) -> Money:
        return Money(amount=self.amount - self._same(other).amount, currency=self.currency)

    def __str__(self) -> str:
        return f"{self.to_decimal()} {self.currency}"
