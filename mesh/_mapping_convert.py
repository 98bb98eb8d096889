"""Value converters of :mod:`mesh.mapping`: one function per ``convert`` name and direction.

Each converter is built once per field at compile time (options checked there) and then called
per record; a value it cannot convert raises :class:`Fail` with the reason, which the mapper
turns into a :class:`~mesh.errors.MappingError` naming the field.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from decimal import Decimal
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from mesh.canonical.money import CURRENCY_EXPONENTS, from_minor_units, to_decimal, to_minor_units

__all__ = ["CONVERTERS", "KINDS", "Fail", "build", "needs_currency"]

Direction = Literal["to_canonical", "from_canonical"]
Step = Callable[[Any, "Context"], Any]

KINDS: dict[str, str] = {
    "str": "str",
    "int": "int",
    "float": "float",
    "bool": "bool",
    "decimal": "decimal",
    "date": "date",
    "datetime": "datetime",
    "money": "money",
    "minor_units": "int",
}
"""Converter name -> the kind of value it produces on the canonical side (to_canonical)."""
CONVERTERS = tuple(KINDS)

_TRUE = {"1", "true", "t", "yes", "y", "on"}
_FALSE = {"0", "false", "f", "no", "n", "off"}
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


class Fail(ValueError):
    """This value cannot be converted; the message says why."""


class Context:
    """Where a value sits: the whole record (``root``) and the current list item (``data``)."""

    __slots__ = ("data", "index", "root")

    def __init__(self, root: Any, data: Any, index: int | None = None) -> None:
        self.root = root
        self.data = data
        self.index = index


def needs_currency(convert: str) -> bool:
    return convert in ("money", "minor_units")


def _name(value: Any) -> str:
    return type(value).__name__


def to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | Decimal):
        return str(value)
    if isinstance(value, float):
        return str(_decimal(value))  # NaN and infinities (a PostgreSQL float8 can hold them) fail
    if isinstance(value, datetime.date):
        return value.isoformat()
    raise Fail(f"cannot turn {_name(value)} {value!r} into a string")


def to_int(value: Any) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    try:
        number = to_decimal(value)
    except ValueError as exc:
        raise Fail(str(exc)) from None
    if number != number.to_integral_value():
        raise Fail(f"{value!r} is not a whole number")
    return int(number)


def to_float(value: Any) -> float:
    try:
        return float(to_decimal(value))
    except ValueError as exc:
        raise Fail(str(exc)) from None


def to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise Fail(f"{value!r} is not a boolean (expected true/false, yes/no, 1/0)")


def _decimal(value: Any) -> Decimal:
    try:
        return to_decimal(value)
    except ValueError as exc:
        raise Fail(str(exc)) from None


def _number_out(value: Decimal, as_string: bool) -> str | float:
    return str(value) if as_string else float(value)


# --- dates ------------------------------------------------------------------------------------


def check_format(convert: str, fmt: str) -> str | None:
    """Why ``fmt`` is unusable for ``convert`` (``None`` when it is fine)."""
    if fmt == "iso":
        return None
    if fmt in ("epoch", "epoch_ms"):
        return None if convert == "datetime" else f"format {fmt!r} applies to datetimes only"
    if "%" not in fmt:
        return f"format {fmt!r} is not 'iso', 'epoch', 'epoch_ms' or a strftime pattern such as '%d/%m/%Y'"
    sample = datetime.datetime(2001, 11, 23, 14, 35, 56)
    try:
        back = datetime.datetime.strptime(sample.strftime(fmt), fmt)
    except ValueError as exc:
        return f"format {fmt!r} cannot parse what it prints: {exc}"
    if convert == "date" and back.date() != sample.date():
        return f"format {fmt!r} does not hold a whole date (day, month and year)"
    return None


def check_timezone(name: str) -> str | None:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return f"unknown timezone {name!r} (expected an IANA name such as 'Europe/Berlin' or 'UTC')"
    return None


def _parse_date(value: Any, fmt: str) -> datetime.date:
    if isinstance(value, datetime.datetime):
        return value.date()
    if isinstance(value, datetime.date):
        return value
    if not isinstance(value, str):
        raise Fail(f"expected a date string, got {_name(value)} {value!r}")
    text = value.strip()
    try:
        if fmt == "iso":
            return (
                datetime.date.fromisoformat(text)
                if len(text) == 10
                else datetime.datetime.fromisoformat(text).date()
            )
        return datetime.datetime.strptime(text, fmt).date()
    except ValueError:
        raise Fail(f"{value!r} is not a date in format {fmt!r}") from None


def _parse_datetime(value: Any, fmt: str, zone: datetime.tzinfo) -> datetime.datetime:
    if isinstance(value, datetime.datetime):
        dt = value
    elif isinstance(value, datetime.date):
        dt = datetime.datetime.combine(value, datetime.time())
    elif fmt in ("epoch", "epoch_ms"):
        try:
            number = to_decimal(value)
        except ValueError:
            raise Fail(f"{value!r} is not a Unix timestamp") from None
        ms = number if fmt == "epoch_ms" else number * 1000
        try:
            return _EPOCH + datetime.timedelta(milliseconds=float(ms))
        except OverflowError:  # beyond year 1..9999 (or beyond what a timedelta holds)
            raise Fail(f"{value!r} is a Unix timestamp out of the range of datetimes") from None
    elif isinstance(value, str):
        text = value.strip()
        try:
            dt = (
                datetime.datetime.fromisoformat(text)
                if fmt == "iso"
                else datetime.datetime.strptime(text, fmt)
            )
        except ValueError:
            raise Fail(f"{value!r} is not a datetime in format {fmt!r}") from None
    else:
        raise Fail(f"expected a datetime string, got {_name(value)} {value!r}")
    return dt.replace(tzinfo=zone) if dt.tzinfo is None else dt


def _in_zone(dt: datetime.datetime, zone: datetime.tzinfo) -> datetime.datetime:
    try:
        return dt.astimezone(zone)
    except OverflowError:  # 0001-01-01 or 9999-12-31 moved across midnight by the offset
        raise Fail(f"{dt.isoformat()} is out of the range of datetimes in {zone}") from None


def _iso_utc(dt: datetime.datetime) -> str:
    return _in_zone(dt, datetime.UTC).isoformat().replace("+00:00", "Z")


# --- the factory ------------------------------------------------------------------------------


def build(
    convert: str,
    direction: Direction,
    *,
    fmt: str = "iso",
    timezone: str = "UTC",
    currency: str | None = None,
    currency_from: Callable[[Context], Any] | None = None,
    rounding: str = "reject",
    as_string: bool = False,
) -> Step:
    """The step for ``convert`` in ``direction``; options were validated by the caller."""
    to_canon = direction == "to_canonical"

    def cur(ctx: Context) -> str:
        if currency is not None:
            return currency
        assert currency_from is not None
        code = currency_from(ctx)
        code = code.strip().upper() if isinstance(code, str) else code
        if not isinstance(code, str) or code not in CURRENCY_EXPONENTS:  # a list or map is not hashable
            raise Fail(f"currency {code!r} is not an ISO 4217 code")
        return str(code)

    if convert == "str":
        return lambda v, ctx: to_str(v)
    if convert == "int":
        return lambda v, ctx: to_int(v)
    if convert == "float":
        return lambda v, ctx: to_float(v)
    if convert == "bool":
        return lambda v, ctx: to_bool(v)
    if convert == "decimal":
        if to_canon:
            return lambda v, ctx: str(_decimal(v))
        return lambda v, ctx: _number_out(_decimal(v), as_string)
    if convert == "date":
        if to_canon:
            return lambda v, ctx: _parse_date(v, fmt).isoformat()

        def date_out(v: Any, ctx: Context) -> str:
            d = _parse_date(v, "iso")
            return d.isoformat() if fmt == "iso" else d.strftime(fmt)

        return date_out
    if convert == "datetime":
        zone = ZoneInfo(timezone)
        if to_canon:
            return lambda v, ctx: _iso_utc(_parse_datetime(v, fmt, zone))

        def datetime_out(v: Any, ctx: Context) -> Any:
            dt = _in_zone(_parse_datetime(v, "iso", datetime.UTC), zone)
            if fmt == "epoch_ms":
                return (dt - _EPOCH) // datetime.timedelta(milliseconds=1)
            if fmt == "epoch":
                return (dt - _EPOCH) // datetime.timedelta(seconds=1)
            return dt.isoformat() if fmt == "iso" else dt.strftime(fmt)

        return datetime_out
    if convert == "money":
        if to_canon:

            def money_in(v: Any, ctx: Context) -> dict[str, Any]:
                code = cur(ctx)
                try:
                    return {"amount": to_minor_units(v, code, rounding), "currency": code}  # type: ignore[arg-type]
                except ValueError as exc:
                    raise Fail(str(exc)) from None

            return money_in

        def money_out(v: Any, ctx: Context) -> Any:
            if not isinstance(v, dict) or "amount" not in v or "currency" not in v:
                raise Fail(f"expected money {{amount, currency}}, got {v!r}")
            if currency is not None and v["currency"] != currency:
                raise Fail(f"amount is in {v['currency']}, but this field holds {currency}")
            try:
                return _number_out(from_minor_units(v["amount"], v["currency"]), as_string)
            except ValueError as exc:
                raise Fail(str(exc)) from None

        return money_out
    if convert == "minor_units":
        if to_canon:

            def minor_in(v: Any, ctx: Context) -> int:
                try:
                    return to_minor_units(v, cur(ctx), rounding)  # type: ignore[arg-type]
                except ValueError as exc:
                    raise Fail(str(exc)) from None

            return minor_in

        def minor_out(v: Any, ctx: Context) -> Any:
            try:
                return _number_out(from_minor_units(v, cur(ctx)), as_string)
            except ValueError as exc:
                raise Fail(str(exc)) from None

        return minor_out
    raise ValueError(f"unknown converter {convert!r}")
