"""Declarative mappings between a system's rows and canonical entities.

A flow declares them in TOML: ``[flows.to_canonical]`` turns a captured system row into the
canonical entity, ``[flows.from_canonical]`` turns a canonical entity into the row a sink writes.
Keys of ``fields`` are target paths; values are a source path (a plain rename) or a rule. A
sales order from an ERP's order table (with its lines in a list)::

    [flows.to_canonical.fields]
    id = { from = "OrderID", convert = "str" }
    "external_ids.erp" = { from = "OrderID", convert = "str" }
    customer_id = { from = "CustomerID", transform = ["trim", "upper"] }
    currency = "Currency"
    order_date = { from = "OrderDate", convert = "date", format = "%d.%m.%Y" }
    status = { from = "State", map = { O = "confirmed", S = "shipped" }, map_default = "draft" }
    reference = { from = "PO", default = "none" }
    contract_id = { const = "framework-2024" }
    shipping_amount = { from = "Freight", convert = "money", currency_from = "Currency" }
    "shipping_address.city" = "Ship.City"
    "shipping_address.country" = { from = "Ship.Country", transform = ["trim"], lookup = "countries" }

    [flows.to_canonical.fields.updated_at]      # a long rule reads better as a table
    from = "Modified"
    convert = "datetime"
    format = "%d.%m.%Y %H:%M"
    timezone = "Europe/Berlin"                  # of naive system times; canonical is UTC

    [flows.to_canonical.fields.lines]           # a list: map every item of the source list
    from = "details"
    [flows.to_canonical.fields.lines.items]
    line_no = { position = true }
    product_id = { from = "ProductID", convert = "str" }
    quantity = "Quantity"
    unit_price = { from = "UnitPrice", convert = "money", currency_from = "$.Currency" }
    discount_rate = { from = "Discount", convert = "decimal" }

    [flows.to_canonical.lookups.countries]
    values = { Germany = "DE", UK = "GB", USA = "US" }
    # or a SQLite table, read-only, reloaded every `refresh` seconds:
    # sqlite = "ref.db"  table = "countries"  key = "name"  value = "iso2"  refresh = 300.0

``from_canonical`` is written the same way with canonical paths on the right and system columns
on the left: ``UnitPrice = { from = "sales_price", convert = "money", currency = "USD" }``.

Each rule runs: read ``from`` (``$.`` = from the record's root inside ``items``) or take
``const``/``position`` -> ``transform`` (trim, upper, lower) -> ``map`` -> ``lookup`` ->
``convert`` -> write the target. A source that is absent leaves the target absent (a sink keeps
the column's value); ``null`` writes ``null``; ``default`` replaces both; ``required = true``
makes both an error.

Guarantees:

* :func:`compile_mapping` checks everything it can before the first record — target fields
  exist with compatible types, every required entity field is mapped, converters and their
  options, value-map and constant types, lookup tables and columns — and raises one
  :class:`~mesh.errors.ConfigError` listing **every** problem with its field path.
* :meth:`Mapper.map` never lets a bad record through: a value it cannot convert, a key missing
  from a value map or lookup, or a result that does not validate against the entity type raises
  :class:`~mesh.errors.MappingError` naming the field and the reason (the connector
  dead-letters that record and goes on). Amounts are never rounded silently.
* ``to_canonical`` returns exactly the fields the mapping set, validated and normalised to their
  wire form (dates as ISO strings, decimals as strings, money as ``{amount, currency}``).
  ``from_canonical`` accepts a partial canonical record (ownership may have removed fields) and
  validates each field present.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import anyio
import msgspec
from anyio.abc import TaskStatus

from mesh import _mapping_convert as cv
from mesh._mapping_compile import Rule, compile_rules
from mesh._mapping_config import FieldRule, LookupConfig, MappingConfig
from mesh._mapping_lookup import Lookup, quote_identifier, read_only
from mesh.canonical import _paths
from mesh.canonical.entities import ENTITIES, Entity
from mesh.errors import ConfigError, MappingError

__all__ = [
    "CONVERTERS",
    "TRANSFORMS",
    "Direction",
    "FieldRule",
    "Lookup",
    "LookupConfig",
    "Mapper",
    "MappingConfig",
    "compile_mapping",
]

log = logging.getLogger(__name__)

Direction = Literal["to_canonical", "from_canonical"]
CONVERTERS: tuple[str, ...] = cv.CONVERTERS
"""Names accepted by ``convert``."""
TRANSFORMS: tuple[str, ...] = ("trim", "upper", "lower")
"""Names accepted by ``transform`` (applied to strings; other values pass unchanged)."""


def _apply(rules: Sequence[Rule], ctx: cv.Context, prefix: str, entity: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for rule in rules:
        where = prefix + rule.target_text
        try:
            if rule.position:
                value: Any = (ctx.index or 0) + 1
            elif rule.const is not msgspec.UNSET:
                value = rule.const
            else:
                assert rule.source is not None
                value = _paths.get_path(ctx.root if rule.from_root else ctx.data, rule.source)
                if value is _paths.MISSING or value is None:
                    if rule.default is not msgspec.UNSET:
                        value = rule.default
                    elif rule.required:
                        state = "missing" if value is _paths.MISSING else "null"
                        raise cv.Fail(f"required source `{_paths.format_path(rule.source)}` is {state}")
                    elif value is _paths.MISSING:
                        continue  # absent stays absent: the target keeps its value
                elif rule.items is not None:
                    if not isinstance(value, list | tuple):
                        raise cv.Fail(f"expected a list of items, got {type(value).__name__}")
                    value = [
                        _apply(rule.items, cv.Context(ctx.root, item, i), f"{where}[{i}].", entity)
                        for i, item in enumerate(value)
                    ]
                else:
                    for step in rule.steps:
                        value = step(value, ctx)
            _paths.set_path(out, rule.target, value)
        except (cv.Fail, _paths.PathError) as exc:
            raise MappingError(str(exc), field=where, entity=entity) from None
    return out


_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)


def _only_given(full: Any, given: Any) -> Any:
    """``full`` (a validated, normalised value) cut down to the keys present in ``given``, at
    every depth: defaults that validation filled in are not fields the record set."""
    if isinstance(full, dict) and isinstance(given, Mapping):
        return {k: _only_given(full[k], given[k]) for k in given if k in full}
    if isinstance(full, list) and isinstance(given, Sequence) and not isinstance(given, str | bytes):
        return [_only_given(f, g) for f, g in zip(full, given, strict=False)]
    return full


def _split_error(exc: msgspec.ValidationError) -> tuple[str, str]:
    """msgspec's "Expected `int`, got `str` - at `$.a[0].b`" as ("a[0].b", "expected `int`, got `str`")."""
    match = _AT.match(str(exc))
    assert match is not None
    message = match["msg"]
    return (match["path"] or "").lstrip("."), message[:1].lower() + message[1:]


def _join(prefix: str, path: str) -> str:
    if not prefix or not path:
        return prefix or path
    return prefix + path if path.startswith("[") else f"{prefix}.{path}"


def _validation_error(exc: msgspec.ValidationError, entity: str, prefix: str = "") -> MappingError:
    path, message = _split_error(exc)
    return MappingError(message, field=_join(prefix, path), entity=entity)


def _locate(raw: Any, tp: Any, where: str) -> tuple[str, str]:
    """Where in ``raw`` converting to ``tp`` fails. msgspec prints dict keys as ``[...]``; this
    walks the ``fields``/``items``/``lookups`` tables to name the key."""
    try:
        msgspec.convert(raw, tp)
    except msgspec.ValidationError as exc:
        path, message = _split_error(exc)
    else:
        return where, "invalid"
    if isinstance(raw, Mapping):
        for table, value_type in (
            ("fields", str | FieldRule),
            ("items", str | FieldRule),
            ("lookups", LookupConfig),
        ):
            entries = raw.get(table)
            if path.startswith(f"{table}[...]") and isinstance(entries, Mapping):
                for key, value in entries.items():
                    sub = f"{where}.{table}" + (f".{key}" if str(key).isidentifier() else f'["{key}"]')
                    try:
                        msgspec.convert(value, value_type)
                    except msgspec.ValidationError:
                        return _locate(value, value_type, sub)
    return _join(where, path), message


class Mapper:
    """A compiled mapping for one entity and direction. Use as an async context manager (or
    call :meth:`open`) before :meth:`map` when it has SQLite lookups."""

    def __init__(
        self,
        entity: str,
        direction: Direction,
        rules: tuple[Rule, ...],
        lookups: dict[str, Lookup],
    ) -> None:
        self.entity = entity
        self.direction = direction
        self.entity_type: type[Entity] = ENTITIES[entity]
        self.rules = rules
        self.lookups = lookups
        self._fields = {name: f.type for name, f in _paths.struct_fields(self.entity_type).items()}

    def map(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """Map one record.

        ``to_canonical``: a system row -> the canonical fields the mapping sets, validated
        against the entity type and in wire form. ``from_canonical``: a (possibly partial)
        canonical record -> the system row; each canonical field present is validated first.

        Raises:
            MappingError: the record cannot be mapped; ``field`` and the message say where and why.
        """
        if self.direction == "to_canonical":
            out = _apply(self.rules, cv.Context(row, row), "", self.entity)
            try:
                entity = msgspec.convert(out, self.entity_type)
            except msgspec.ValidationError as exc:
                raise _validation_error(exc, self.entity) from None
            wire = msgspec.to_builtins(entity)
            return {k: _only_given(wire[k], out[k]) for k in out}
        canonical: dict[str, Any] = {}
        for key, value in row.items():
            tp = self._fields.get(key)
            if tp is None:
                continue  # a newer schema's field: ignored, like msgspec does on decode
            try:
                # Validated, but only what was given: a nested object that ownership pruned must
                # not grow its defaults back (``contact.email`` absent is not ``null``).
                canonical[key] = _only_given(msgspec.to_builtins(msgspec.convert(value, tp)), value)
            except msgspec.ValidationError as exc:
                raise _validation_error(exc, self.entity, key) from None
        return _apply(self.rules, cv.Context(canonical, canonical), "", self.entity)

    async def open(self) -> None:
        """Load the SQLite lookup tables (inline ones are loaded at compile time).

        Raises:
            ConfigError: a SQLite lookup table cannot be read.
        """
        await self.refresh(force=True)

    async def refresh(self, *, force: bool = False) -> None:
        """Reload the SQLite lookups whose ``refresh`` interval has passed (all with ``force``).

        A reload that fails keeps the previous table (logged) unless nothing was loaded yet.

        Raises:
            ConfigError: a table that was never loaded cannot be read.
        """
        now = time.monotonic()
        for lookup in self.lookups.values():
            if lookup.path is None or not (force or lookup.due <= now):
                continue
            try:
                await anyio.to_thread.run_sync(lookup.load)
            except (sqlite3.Error, OSError) as exc:
                if lookup.table is None:
                    raise ConfigError(f"lookup {lookup.name!r}: cannot read {lookup.path}: {exc}") from None
                log.warning(
                    "lookup %s: reload from %s failed (%s); keeping the previous table",
                    lookup.name,
                    lookup.path,
                    exc,
                )

    async def run_refresh(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Reload SQLite lookups on their intervals until cancelled (run it in a task group)."""
        task_status.started()
        while True:
            due = min((lk.due for lk in self.lookups.values()), default=float("inf"))
            if due == float("inf"):
                await anyio.sleep_forever()
            await anyio.sleep(max(0.0, due - time.monotonic()))
            await self.refresh()

    async def aclose(self) -> None:
        """Nothing to release (tables are in memory); idempotent."""

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        lookups = ", ".join(repr(lk) for lk in self.lookups.values())
        tail = f" {lookups}" if lookups else ""
        return f"<Mapper {self.entity} {self.direction} fields={len(self.rules)}{tail}>"


def compile_mapping(
    cfg: MappingConfig | Mapping[str, Any],
    entity: str,
    direction: Direction,
    *,
    source: str = "<mapping>",
    path: str = "mapping",
    base: Path | None = None,
) -> Mapper:
    """Validate a mapping and build its :class:`Mapper`.

    ``source`` (the config file) and ``path`` (``flows[0].to_canonical``) prefix every problem;
    ``base`` resolves relative SQLite lookup paths (default: the working directory).

    Raises:
        ConfigError: listing every problem, each with its field path.
    """
    if not isinstance(cfg, MappingConfig):
        try:
            cfg = msgspec.convert(cfg, MappingConfig)
        except msgspec.ValidationError:
            where, message = _locate(cfg, MappingConfig, path)
            raise ConfigError(message, source=source, path=where) from None
    problems: list[tuple[str, str]] = []
    if entity not in ENTITIES:
        problems.append((path, f"unknown entity {entity!r} (expected one of: {', '.join(sorted(ENTITIES))})"))
        raise _config_error(problems, source, path)
    if direction not in ("to_canonical", "from_canonical"):
        raise ConfigError(f"unknown direction {direction!r}", source=source, path=path)
    lookups: dict[str, Lookup] = {}
    for name, lcfg in cfg.lookups.items():
        lookup = _check_lookup(name, lcfg, f"{path}.lookups.{name}", base or Path.cwd(), problems)
        if lookup is not None:
            lookups[name] = lookup
    rules = compile_rules(cfg, ENTITIES[entity], direction, lookups, set(cfg.lookups), path, problems)
    if problems:
        raise _config_error(problems, source, path)
    return Mapper(entity, direction, rules, lookups)


def _config_error(problems: list[tuple[str, str]], source: str, path: str) -> ConfigError:
    return ConfigError(source=source, problems=problems)


def _check_lookup(
    name: str, cfg: LookupConfig, where: str, base: Path, problems: list[tuple[str, str]]
) -> Lookup | None:
    if (cfg.values is None) == (cfg.sqlite is None):
        problems.append(
            (where, "give either `values` (an inline table) or `sqlite` + `table` + `key` + `value`")
        )
        return None
    if cfg.values is not None:
        extra = [k for k in ("table", "key", "value") if getattr(cfg, k) is not None]
        if extra:
            problems.append((f"{where}.{extra[0]}", "only for `sqlite` lookups"))
        return Lookup(name, cfg, None)
    if cfg.refresh <= 0:
        problems.append((f"{where}.refresh", "expected seconds > 0"))
    missing = [k for k in ("table", "key", "value") if getattr(cfg, k) is None]
    for k in missing:
        problems.append((f"{where}.{k}", "required for a `sqlite` lookup"))
    assert cfg.sqlite is not None
    file = Path(cfg.sqlite).expanduser()
    file = file if file.is_absolute() else (base / file)
    if not file.is_file():
        problems.append((f"{where}.sqlite", f"no such file: {file}"))
        return None
    if missing:
        return None
    try:
        conn = read_only(str(file))
        try:
            columns = {
                row[1] for row in conn.execute(f"PRAGMA table_info({quote_identifier(cfg.table or '')})")
            }
        finally:
            conn.close()
    except sqlite3.Error as exc:
        problems.append((f"{where}.sqlite", f"cannot read {file}: {exc}"))
        return None
    if not columns:
        problems.append((f"{where}.table", f"no table or view {cfg.table!r} in {file}"))
        return None
    for k in ("key", "value"):
        column = getattr(cfg, k)
        if column not in columns:
            problems.append(
                (
                    f"{where}.{k}",
                    f"no column {column!r} in {cfg.table} (expected one of: {', '.join(sorted(columns))})",
                )
            )
    lookup = Lookup(name, cfg, str(file))
    lookup.table = None  # loaded at open
    return lookup
