"""Compile-time checks of :mod:`mesh.mapping`: turn ``fields`` rules into executable steps and
collect every problem (with its field path) instead of stopping at the first."""

from __future__ import annotations

import contextlib
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import msgspec.inspect as mi

from mesh import _mapping_convert as cv
from mesh._mapping_config import FieldRule, MappingConfig
from mesh._mapping_lookup import Lookup, key_of
from mesh.canonical import _paths
from mesh.canonical.money import CURRENCY_EXPONENTS, Money

__all__ = ["Rule", "compile_rules"]

_TRANSFORMS: dict[str, Callable[[str], str]] = {"trim": str.strip, "upper": str.upper, "lower": str.lower}
_ROUNDINGS = ("reject", "half_even", "half_up", "half_down", "down", "up", "floor", "ceiling")
_KIND_TEXT = {
    "str": "a string",
    "int": "an integer",
    "float": "a float",
    "bool": "a boolean",
    "decimal": "a decimal",
    "date": "a date",
    "datetime": "a datetime",
    "money": "Money",
}
# What a canonical field of this msgspec type accepts from each converter kind.
_ACCEPTS: dict[type, set[str]] = {
    mi.StrType: {"str", "date", "datetime", "decimal"},
    mi.IntType: {"int"},
    mi.FloatType: {"int", "float"},
    mi.BoolType: {"bool"},
    mi.DecimalType: {"decimal", "int", "float", "str"},
    mi.DateType: {"date", "str"},
    mi.DateTimeType: {"datetime", "str"},
    mi.EnumType: {"str"},
    mi.LiteralType: {"str"},
    mi.AnyType: set(_KIND_TEXT),
}
_READS = {"money": "Money", "minor_units": "an integer", "date": "a date", "datetime": "a datetime"}
# What each converter needs on the canonical side when it reads from it (from_canonical).
_NEEDS: dict[str, tuple[type, ...]] = {
    "money": (mi.StructType,),
    "minor_units": (mi.IntType,),
    "date": (mi.DateType,),
    "datetime": (mi.DateTimeType,),
}


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled field rule."""

    target: tuple[_paths.Segment, ...]
    target_text: str
    source: tuple[_paths.Segment, ...] | None = None
    from_root: bool = False
    const: Any = msgspec.UNSET
    position: bool = False
    steps: tuple[cv.Step, ...] = ()
    default: Any = msgspec.UNSET
    required: bool = False
    items: tuple[Rule, ...] | None = None


def _kinds(tp: Any) -> set[str]:
    info = mi.type_info(tp)
    return _info_kinds(info)


def _info_kinds(info: mi.Type) -> set[str]:
    if isinstance(info, mi.Metadata):
        return _info_kinds(info.type)
    if isinstance(info, mi.UnionType):
        return set().union(*(_info_kinds(t) for t in info.types))
    if isinstance(info, mi.StructType):
        return {"money"} if info.cls is Money else set()
    return _ACCEPTS.get(type(info), set())


def _info(tp: Any) -> mi.Type:
    info = mi.type_info(_paths.unwrap(tp)[0])
    while isinstance(info, mi.Metadata):
        info = info.type
    return info


def _struct_item(tp: Any) -> type | None:
    """The item struct of a ``list[Struct]`` annotation, else None."""
    core, _ = _paths.unwrap(tp)
    if typing.get_origin(core) is list:
        item, _ = _paths.unwrap(typing.get_args(core)[0])
        if isinstance(item, type) and issubclass(item, msgspec.Struct):
            return item
    return None


def _key(name: str) -> str:
    return f".{name}" if name.isidentifier() else f'["{name}"]'


class _Compiler:
    def __init__(
        self,
        entity_type: type,
        direction: cv.Direction,
        lookups: dict[str, Lookup],
        lookup_names: set[str],
        problems: list[tuple[str, str]],
    ) -> None:
        self.entity_type = entity_type
        self.direction = direction
        self.to_canon = direction == "to_canonical"
        self.lookups = lookups
        self.lookup_names = lookup_names
        self.problems = problems

    def fail(self, where: str, message: str) -> None:
        self.problems.append((where, message))

    def rules(
        self,
        fields: dict[str, str | FieldRule],
        *,
        target_type: type | None,
        source_type: type | None,
        where: str,
        in_items: bool,
    ) -> tuple[Rule, ...]:
        out: list[Rule] = []
        targets: list[tuple[_paths.Segment, ...]] = []
        for key, spec in fields.items():
            rule = FieldRule(source=spec) if isinstance(spec, str) else spec
            compiled = self.rule(key, rule, target_type, source_type, where + _key(key), in_items)
            if compiled is not None:
                out.append(compiled)
            with contextlib.suppress(_paths.PathError):  # reported by self.rule
                targets.append(_paths.parse_path(key))
        for i, a in enumerate(targets):
            for b in targets[i + 1 :]:
                shorter, longer = sorted((a, b), key=len)
                if longer[: len(shorter)] == shorter:
                    self.fail(
                        where, f"`{_paths.format_path(longer)}` overlaps `{_paths.format_path(shorter)}`"
                    )
        if self.to_canon and target_type is not None:
            self.coverage(target_type, targets, where, "")
        return tuple(out)

    def coverage(
        self, struct: type, targets: list[tuple[_paths.Segment, ...]], where: str, prefix: str
    ) -> None:
        """Every required field of ``struct`` (and of nested structs partly mapped) is mapped."""
        for name, field in _paths.struct_fields(struct).items():
            mine = [t[1:] for t in targets if t and t[0] == name]
            if not mine:
                if field.required:
                    self.fail(where, f"required field `{prefix}{name}` of {struct.__name__} is not mapped")
                continue
            if any(not t for t in mine):
                continue  # the whole field is mapped
            core, _ = _paths.unwrap(field.type)
            if isinstance(core, type) and issubclass(core, msgspec.Struct):
                self.coverage(core, [t for t in mine if isinstance(t[0], str)], where, f"{prefix}{name}.")
            item = _struct_item(field.type)
            if item is not None:
                for index in sorted({t[0] for t in mine if isinstance(t[0], int)}):
                    sub = [t[1:] for t in mine if t[0] == index and len(t) > 1]
                    if sub and all(sub):
                        self.coverage(item, sub, where, f"{prefix}{name}[{index}].")

    def path(self, text: str, where: str) -> tuple[tuple[_paths.Segment, ...], bool] | None:
        from_root = text.startswith("$.")
        try:
            return _paths.parse_path(text[2:] if from_root else text), from_root
        except _paths.PathError as exc:
            self.fail(where, str(exc))
            return None

    def resolve(self, tp: type | None, segs: tuple[_paths.Segment, ...], where: str) -> Any:
        if tp is None:
            return None
        try:
            return _paths.resolve(tp, segs)
        except _paths.PathError as exc:
            self.fail(where, str(exc))
            return msgspec.UNSET

    def rule(
        self,
        key: str,
        rule: FieldRule,
        target_type: type | None,
        source_type: type | None,
        where: str,
        in_items: bool,
    ) -> Rule | None:
        bad = len(self.problems)
        parsed = self.path(key, where)
        target = parsed[0] if parsed else ()
        if parsed and parsed[1]:
            self.fail(where, "a target path cannot start with `$.`")
        target_ann = self.resolve(target_type, target, where) if parsed else msgspec.UNSET

        given = [
            n
            for n, on in (
                ("from", rule.source is not None),
                ("const", rule.const is not msgspec.UNSET),
                ("position", rule.position),
            )
            if on
        ]
        if len(given) != 1:
            self.fail(
                where,
                "give exactly one of `from`, `const` or `position`"
                + (f" (got {', '.join(given)})" if given else ""),
            )
        if rule.position and not in_items:
            self.fail(f"{where}.position", "only inside `items` (the position of a list item)")

        source: tuple[_paths.Segment, ...] | None = None
        from_root = False
        source_ann: Any = None
        if rule.source is not None:
            parsed_src = self.path(rule.source, f"{where}.from")
            if parsed_src:
                source, from_root = parsed_src
                base = self.entity_type if from_root and not self.to_canon else source_type
                source_ann = self.resolve(base, source, f"{where}.from")

        if rule.items is not None:
            return self.items_rule(rule, target, key, target_ann, source, from_root, source_ann, where, bad)

        steps = self.steps(rule, source_ann, where)
        convert_ok = rule.convert in cv.KINDS and len(self.problems) == bad
        if self.to_canon and target_ann not in (None, msgspec.UNSET):
            self.check_target_types(rule, target_ann, steps, convert_ok, where)
        if len(self.problems) != bad:
            return None
        return Rule(
            target=target,
            target_text=key,
            source=source,
            from_root=from_root,
            const=rule.const,
            position=rule.position,
            steps=tuple(s for _, s in steps),
            default=rule.default,
            required=rule.required,
        )

    def items_rule(
        self,
        rule: FieldRule,
        target: tuple[_paths.Segment, ...],
        key: str,
        target_ann: Any,
        source: tuple[_paths.Segment, ...] | None,
        from_root: bool,
        source_ann: Any,
        where: str,
        bad: int,
    ) -> Rule | None:
        assert rule.items is not None
        if rule.source is None:
            self.fail(f"{where}.items", "needs `from`: the list to map")
        extra = [
            n
            for n in ("transform", "map", "lookup", "convert")
            if getattr(rule, "value_map" if n == "map" else n)
        ]
        if extra:
            self.fail(f"{where}.{extra[0]}", "not with `items`: put it on the item fields")
        sub_target: type | None = None
        sub_source: type | None = None
        if self.to_canon:
            if target_ann not in (None, msgspec.UNSET):
                sub_target = _struct_item(target_ann)
                if sub_target is None:
                    self.fail(
                        f"{where}.items", f"`{key}` is {_paths.describe(target_ann)}, not a list of records"
                    )
        elif source_ann not in (None, msgspec.UNSET):
            sub_source = _struct_item(source_ann)
            if sub_source is None:
                self.fail(
                    f"{where}.items",
                    f"`{rule.source}` is {_paths.describe(source_ann)}, not a list of records",
                )
        items = self.rules(
            rule.items, target_type=sub_target, source_type=sub_source, where=f"{where}.items", in_items=True
        )
        if len(self.problems) != bad:
            return None
        return Rule(
            target=target,
            target_text=key,
            source=source,
            from_root=from_root,
            default=rule.default,
            required=rule.required,
            items=items,
        )

    def steps(self, rule: FieldRule, source_ann: Any, where: str) -> list[tuple[str, cv.Step]]:
        steps: list[tuple[str, cv.Step]] = []
        for name in rule.transform:
            fn = _TRANSFORMS.get(name)
            if fn is None:
                self.fail(
                    f"{where}.transform",
                    f"unknown transform {name!r} (expected one of: {', '.join(_TRANSFORMS)})",
                )
            else:
                steps.append(("transform", _transform_step(fn)))
        if rule.value_map is not None:
            steps.append(("map", _map_step(rule.value_map, rule.map_default)))
        elif rule.map_default is not msgspec.UNSET:
            self.fail(f"{where}.map_default", "only with `map`")
        if rule.lookup is not None:
            if rule.lookup not in self.lookup_names:
                known = ", ".join(sorted(self.lookup_names)) or "none defined"
                self.fail(f"{where}.lookup", f"no lookup named {rule.lookup!r} (lookups: {known})")
            elif rule.lookup in self.lookups:
                lookup = self.lookups[rule.lookup]
                steps.append(("lookup", lambda v, ctx: lookup.get(v)))
        step = self.converter(rule, source_ann, where)
        if step is not None:
            steps.append(("convert", step))
        return steps

    def converter(self, rule: FieldRule, source_ann: Any, where: str) -> cv.Step | None:
        convert = rule.convert
        options = {
            "format": rule.format,
            "timezone": rule.timezone,
            "currency": rule.currency,
            "currency_from": rule.currency_from,
        }
        uses = {
            "date": {"format"},
            "datetime": {"format", "timezone"},
            "money": {"currency", "currency_from"},
            "minor_units": {"currency", "currency_from"},
        }
        allowed = uses.get(convert or "", set())
        for name, value in options.items():
            if value is not None and name not in allowed:
                self.fail(
                    f"{where}.{name}",
                    f"applies only to convert = {' / '.join(k for k, v in uses.items() if name in v)}",
                )
        if rule.rounding != "reject" and convert not in ("money", "minor_units"):
            self.fail(f"{where}.rounding", "applies only to convert = money / minor_units")
        if rule.as_string and (self.to_canon or convert not in ("decimal", "money", "minor_units")):
            self.fail(
                f"{where}.as_string", "applies only to from_canonical convert = decimal / money / minor_units"
            )
        if convert is None:
            return None
        if convert not in cv.KINDS:
            self.fail(
                f"{where}.convert",
                f"unknown converter {convert!r} (expected one of: {', '.join(cv.CONVERTERS)})",
            )
            return None
        bad = len(self.problems)
        fmt = rule.format or "iso"
        if convert in ("date", "datetime") and (why := cv.check_format(convert, fmt)):
            self.fail(f"{where}.format", why)
        if rule.timezone is not None and (why := cv.check_timezone(rule.timezone)):
            self.fail(f"{where}.timezone", why)
        if rule.rounding not in _ROUNDINGS:
            self.fail(
                f"{where}.rounding",
                f"unknown rounding {rule.rounding!r} (expected one of: {', '.join(_ROUNDINGS)})",
            )
        currency_from: Callable[[cv.Context], Any] | None = None
        if cv.needs_currency(convert):
            if rule.currency is not None and rule.currency_from is not None:
                self.fail(f"{where}.currency", "give `currency` or `currency_from`, not both")
            if rule.currency is not None and rule.currency not in CURRENCY_EXPONENTS:
                self.fail(
                    f"{where}.currency",
                    f"unknown currency {rule.currency!r} (expected an ISO 4217 code such as EUR)",
                )
            needs = self.to_canon or convert == "minor_units"
            if needs and rule.currency is None and rule.currency_from is None:
                self.fail(where, f"convert = {convert} needs `currency` (a code) or `currency_from` (a path)")
            if rule.currency_from is not None:
                currency_from = self.currency_path(rule.currency_from, f"{where}.currency_from")
        if not self.to_canon and source_ann not in (None, msgspec.UNSET) and convert in _NEEDS:
            info = _info(source_ann)
            ok = isinstance(info, _NEEDS[convert]) and (
                convert != "money" or getattr(info, "cls", None) is Money
            )
            if not ok:
                self.fail(
                    f"{where}.convert",
                    f"convert = {convert} reads {_READS[convert]}, "
                    f"but `{rule.source}` is {_paths.describe(source_ann)}",
                )
        if len(self.problems) != bad:
            return None
        return cv.build(
            convert,
            self.direction,
            fmt=fmt,
            timezone=rule.timezone or "UTC",
            currency=rule.currency,
            currency_from=currency_from,
            rounding=rule.rounding,
            as_string=rule.as_string,
        )

    def currency_path(self, text: str, where: str) -> Callable[[cv.Context], Any] | None:
        parsed = self.path(text, where)
        if parsed is None:
            return None
        segs, from_root = parsed
        if not self.to_canon and from_root:
            self.resolve(self.entity_type, segs, where)

        def read(ctx: cv.Context) -> Any:
            value = _paths.get_path(ctx.root if from_root else ctx.data, segs)
            if value is _paths.MISSING or value is None:
                raise cv.Fail(f"no currency at `{text}`")
            return value

        return read

    def check_target_types(
        self, rule: FieldRule, ann: Any, steps: list[tuple[str, cv.Step]], convert_ok: bool, where: str
    ) -> None:
        name = _paths.describe(ann)
        if rule.position and "int" not in _kinds(ann):
            self.fail(f"{where}.position", f"gives an integer, but the field is {name}")
        if rule.convert in cv.KINDS and convert_ok:
            kind = cv.KINDS[rule.convert]
            if kind not in _kinds(ann):
                self.fail(
                    f"{where}.convert",
                    f"convert = {rule.convert} gives {_KIND_TEXT[kind]}, but the field is {name}",
                )
                return
        for what, value in (("const", rule.const), ("default", rule.default)):
            if value is not msgspec.UNSET:
                self.probe(value, [], ann, f"{where}.{what}")
        context_free = not (rule.convert and cv.needs_currency(rule.convert) and rule.currency is None)
        after_map = [s for n, s in steps if n == "convert"] if context_free else None
        if rule.value_map is not None and rule.lookup is None and after_map is not None:
            for k, v in rule.value_map.items():
                self.probe(v, after_map, ann, f"{where}.map.{k}")
            if rule.map_default is not msgspec.UNSET:
                self.probe(rule.map_default, after_map, ann, f"{where}.map_default")
        if rule.lookup in self.lookups and after_map is not None:
            lookup = self.lookups[rule.lookup]
            if lookup.path is None and lookup.table is not None:
                for v in list(lookup.table.values())[:1000]:
                    if not self.probe(v, after_map, ann, f"{where}.lookup"):
                        break

    def probe(self, value: Any, steps: list[cv.Step], ann: Any, where: str) -> bool:
        """Run a literal through the remaining steps and check it fits the target type."""
        original = value
        try:
            for step in steps:
                value = step(value, cv.Context({}, {}))
            msgspec.convert(value, ann)
        except cv.Fail as exc:
            self.fail(where, f"{original!r}: {exc}")
            return False
        except msgspec.ValidationError as exc:
            self.fail(where, f"{original!r} is not a valid {_paths.describe(ann)} ({exc})")
            return False
        return True


def _transform_step(fn: Callable[[str], str]) -> cv.Step:
    return lambda value, ctx: fn(value) if isinstance(value, str) else value


def _map_step(value_map: dict[str, Any], default: Any) -> cv.Step:
    def step(value: Any, ctx: cv.Context) -> Any:
        k = key_of(value)
        if k in value_map:
            return value_map[k]
        if default is not msgspec.UNSET:
            return default
        raise cv.Fail(f"{value!r} is not in the value map (expected one of: {', '.join(sorted(value_map))})")

    return step


def compile_rules(
    cfg: MappingConfig,
    entity_type: type,
    direction: cv.Direction,
    lookups: dict[str, Lookup],
    lookup_names: set[str],
    path: str,
    problems: list[tuple[str, str]],
) -> tuple[Rule, ...]:
    """Compile ``cfg.fields``; problems are appended to ``problems`` (path, message)."""
    c = _Compiler(entity_type, direction, lookups, lookup_names, problems)
    to_canon = direction == "to_canonical"
    return c.rules(
        cfg.fields,
        target_type=entity_type if to_canon else None,
        source_type=None if to_canon else entity_type,
        where=f"{path}.fields",
        in_items=False,
    )
