"""The TOML shape of a mapping (``[flows.to_canonical]``, ``[flows.from_canonical]``): frozen
msgspec Structs that reject unknown fields. :mod:`mesh.mapping` documents and re-exports them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

__all__ = ["FieldRule", "LookupConfig", "MappingConfig"]


class _Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class FieldRule(_Config, frozen=True):
    """How one target field gets its value (the right-hand side of a ``fields`` entry)."""

    source: str | None = msgspec.field(default=None, name="from")
    """Source path (``CompanyName``, ``address.city``, ``lines[0].qty``; ``$.x`` inside ``items``
    reads from the record's root)."""
    const: Any = msgspec.UNSET
    """A fixed value instead of a source."""
    position: bool = False
    """Inside ``items``: the item's 1-based position in its list."""
    transform: list[str] = []
    """String clean-ups in order: ``trim``, ``upper``, ``lower``."""
    value_map: dict[str, Any] | None = msgspec.field(default=None, name="map")
    """Source value (as a string: ``1``, ``true``) -> target value."""
    map_default: Any = msgspec.UNSET
    """Target value for a source value not in ``map`` (without it, such a record is an error)."""
    lookup: str | None = None
    """Name of a table under ``lookups``: source value -> target value."""
    convert: str | None = None
    """One of :data:`mesh.mapping.CONVERTERS`."""
    format: str | None = None
    """``date``/``datetime``: ``iso`` (default), ``epoch``, ``epoch_ms`` or a strftime pattern,
    the system-side format in both directions."""
    timezone: str | None = None
    """``datetime``: the system's zone for naive values (default UTC); canonical is UTC."""
    currency: str | None = None
    """``money``/``minor_units``: the ISO 4217 code of the system's amounts."""
    currency_from: str | None = None
    """``money``/``minor_units``: path of the currency code in the source record instead."""
    rounding: str = "reject"
    """Amounts with more decimals than the currency: ``reject`` (default) or a rounding mode
    (``half_even``, ``half_up``, ``half_down``, ``down``, ``up``, ``floor``, ``ceiling``)."""
    as_string: bool = False
    """``from_canonical`` numbers (``decimal``, ``money``, ``minor_units``): write a decimal
    string (exact) instead of a float."""
    default: Any = msgspec.UNSET
    """Target value when the source is absent or null."""
    required: bool = False
    """An absent or null source is an error for the record."""
    items: dict[str, str | FieldRule] | None = None
    """The source is a list: map every item with these rules (targets relative to the item)."""


class LookupConfig(_Config, frozen=True):
    """A reference table: either inline ``values`` or a SQLite ``table`` with ``key``/``value``
    columns (read-only, loaded at open and reloaded every ``refresh`` seconds)."""

    values: dict[str, Any] | None = None
    sqlite: str | None = None
    """Path of the SQLite file (relative to the config file)."""
    table: str | None = None
    key: str | None = None
    value: str | None = None
    refresh: float = 300.0
    default: Any = msgspec.UNSET
    """Result for a key not in the table (without it, such a record is an error)."""


class MappingConfig(_Config, frozen=True):
    """``[flows.to_canonical]`` or ``[flows.from_canonical]`` of a flow."""

    fields: dict[str, str | FieldRule]
    lookups: dict[str, LookupConfig] = {}

    def resolved(self, resolve: Callable[[str], str]) -> MappingConfig:
        """This mapping with its SQLite lookup paths made absolute by ``resolve``."""
        lookups = {
            name: msgspec.structs.replace(lk, sqlite=resolve(lk.sqlite)) if lk.sqlite else lk
            for name, lk in self.lookups.items()
        }
        return msgspec.structs.replace(self, lookups=lookups)
