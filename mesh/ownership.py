"""Field ownership: which system may create, delete and write which fields of an entity.

Configured per entity at ``[ownership.<entity>]``::

    [ownership.customer]
    system_of_record = "crm"        # only the CRM creates and deletes customers
    default_owner = "crm"           # fields not listed below (default: the system of record,
                                    # or "*" = any system when there is none)
    [ownership.customer.fields]
    credit_limit = "finance"                    # billing attributes come from finance
    payment_terms_days = "finance"
    "billing_address.country" = ["crm", "erp"]  # several owners; nested paths allowed
    tags = "*"                                  # any system

The apply path calls :meth:`Ownership.decide` with the event's origin before the sink sees a
record: fields the origin does not own are dropped (and counted by the connector as
``mesh_ownership_dropped_fields_total``), and a create or delete from a system that is not the
system of record is refused. Together with I7 (no echo) this keeps two-way sync from looping.

Guarantees:

* The most specific rule wins (``billing_address.country`` before ``billing_address`` before
  ``default_owner``). A nested object is filtered field by field only where rules go below it;
  an object whose every field was dropped is dropped whole, never written as ``{}``.
* ``id`` is always kept (it is the record's identity). Each system owns its own entry in
  ``external_ids`` (``external_ids.erp`` belongs to ``erp``) unless a rule says otherwise.
* An entity without an ``[ownership.<entity>]`` section is open: every origin may write every
  field, create and delete.
* :func:`compile_ownership` checks every entity name and field path and raises one
  :class:`~mesh.errors.ConfigError` listing every problem with its path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

from mesh.canonical import _paths
from mesh.canonical.entities import ENTITIES
from mesh.errors import ConfigError

__all__ = [
    "ANY_SYSTEM",
    "EntityOwnership",
    "EntityPolicy",
    "Ownership",
    "OwnershipDecision",
    "compile_ownership",
]

ANY_SYSTEM = "*"
_System = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]+$(?!\n)", min_length=1, max_length=64)]
# Owners are checked by compile_ownership, not by a Meta pattern: msgspec 0.22 can crash at
# interpreter exit on a union of a pattern-constrained str and a list of one (msgspec#717).
_Owners = str | list[str]
_OWNER = re.compile(r"^(\*|[A-Za-z0-9_-]{1,64})$")


class EntityOwnership(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``[ownership.<entity>]``: who owns the entity's existence and its fields."""

    system_of_record: _System | None = None
    """The only system that may create and delete records (none: any system)."""
    default_owner: _Owners | None = None
    """Owner(s) of fields not listed in ``fields`` (default: the system of record, else any)."""
    fields: dict[str, _Owners] = {}
    """Field path (``credit_limit``, ``billing_address.city``) -> owning system(s); ``"*"`` = any."""


@dataclass(frozen=True)
class OwnershipDecision:
    """What one origin may do with one record."""

    fields: dict[str, Any]
    """The record with only the fields the origin may write (``id`` always kept)."""
    dropped: tuple[str, ...]
    """Paths of the fields removed (``credit_limit``, ``billing_address.city``)."""
    may_create: bool
    """The origin may create the record if the target does not have it."""
    may_delete: bool

    def allowed(self, *, deleted: bool) -> bool:
        """Whether anything is left to apply: a permitted delete, or an upsert with a field
        besides ``id``."""
        return self.may_delete if deleted else any(k != "id" for k in self.fields)


def _as_set(owners: str | list[str] | None) -> frozenset[str] | None:
    if owners is None:
        return None
    return frozenset([owners] if isinstance(owners, str) else owners)


class EntityPolicy:
    """The compiled ownership rules of one entity."""

    def __init__(self, entity: str, cfg: EntityOwnership) -> None:
        self.entity = entity
        self.system_of_record = cfg.system_of_record
        default = _as_set(cfg.default_owner)
        if default is None:
            default = frozenset([cfg.system_of_record or ANY_SYSTEM])
        self.default = default
        self.rules: dict[tuple[_paths.Segment, ...], frozenset[str]] = {
            _paths.parse_path(path): frozenset(_as_set(owners) or ()) for path, owners in cfg.fields.items()
        }

    def owners(self, path: tuple[_paths.Segment, ...]) -> frozenset[str]:
        """The systems that may write ``path`` (the most specific rule, else the default)."""
        for n in range(len(path), 0, -1):
            rule = self.rules.get(path[:n])
            if rule is not None:
                return rule
        if len(path) >= 2 and path[0] == "external_ids":
            return frozenset([str(path[1])])  # each system owns its own id
        return self.default

    def may_write(self, origin: str, path: tuple[_paths.Segment, ...]) -> bool:
        if path == ("id",):
            return True
        owners = self.owners(path)
        return origin in owners or ANY_SYSTEM in owners

    def may_exist(self, origin: str) -> bool:
        """Whether ``origin`` may create or delete records."""
        return self.system_of_record is None or origin == self.system_of_record

    def _below(self, path: tuple[_paths.Segment, ...]) -> list[tuple[_paths.Segment, ...]]:
        n = len(path)
        below = [p for p in self.rules if len(p) > n and p[:n] == path]
        if path == ("external_ids",):
            below.append(("external_ids", "*"))  # per-system entries
        return below

    def filter(
        self, origin: str, record: Mapping[str, Any], prefix: tuple[_paths.Segment, ...] = ()
    ) -> tuple[dict[str, Any], list[str]]:
        """``record`` without the fields ``origin`` may not write, and their paths."""
        kept: dict[str, Any] = {}
        dropped: list[str] = []
        for key, value in record.items():
            path = (*prefix, key)
            below = self._below(path)
            if below and isinstance(value, Mapping):
                sub, sub_dropped = self.filter(origin, value, path)
                dropped += sub_dropped
                if sub or not value:
                    kept[key] = sub
                continue
            ok = self.may_write(origin, path)
            if ok and below and path != ("external_ids",):
                # replacing the whole object (e.g. with null) also overwrites the owned parts
                ok = all(self.may_write(origin, p) for p in below)
            if ok:
                kept[key] = value
            else:
                dropped.append(_paths.format_path(path))
        return kept, dropped

    def __repr__(self) -> str:
        return (
            f"<EntityPolicy {self.entity} system_of_record={self.system_of_record} "
            f"default={sorted(self.default)} rules={len(self.rules)}>"
        )


class Ownership:
    """Ownership rules of every configured entity; unconfigured entities are open."""

    def __init__(self, policies: Mapping[str, EntityPolicy] | None = None) -> None:
        self.policies = dict(policies or {})

    def decide(
        self, entity: str, origin: str, record: Mapping[str, Any], *, deleted: bool = False
    ) -> OwnershipDecision:
        """What ``origin`` may write of ``record`` (a canonical dict, whole or just the changed
        fields), and whether it may create or delete the record."""
        policy = self.policies.get(entity)
        if policy is None:
            return OwnershipDecision(dict(record), (), True, True)
        exists = policy.may_exist(origin)
        if deleted:
            return OwnershipDecision(dict(record), (), exists, exists)
        kept, dropped = policy.filter(origin, record)
        return OwnershipDecision(kept, tuple(dropped), exists, exists)

    def writable(self, entity: str, origin: str, fields: Iterable[str]) -> tuple[list[str], list[str]]:
        """Split field paths (``credit_limit``, ``billing_address.city``) into the ones ``origin``
        may write and the ones it may not."""
        policy = self.policies.get(entity)
        names = list(fields)
        if policy is None:
            return names, []
        yes: list[str] = []
        no: list[str] = []
        for name in names:
            path = _paths.parse_path(name)
            ok = policy.may_write(origin, path) and all(
                policy.may_write(origin, p) for p in policy._below(path)
            )
            (yes if ok else no).append(name)
        return yes, no

    def __repr__(self) -> str:
        return f"<Ownership entities={sorted(self.policies)}>"


def _check_owners(owners: str | list[str], where: str, problems: list[tuple[str, str]]) -> None:
    names = [owners] if isinstance(owners, str) else owners
    if not names:
        problems.append((where, "expected at least one owner"))
    for name in names:
        if not _OWNER.match(name):
            problems.append((where, f"{name!r} is not a system name (letters, digits, _ and -) or '*'"))


def _locate(raw: Any, exc: msgspec.ValidationError, where: str) -> tuple[str, str]:
    text, _, at = str(exc).partition(" - at `$")
    at = at.rstrip("`")
    fields = raw.get("fields") if isinstance(raw, Mapping) else None
    if at.startswith(".fields[...]") and isinstance(fields, Mapping):
        for key, owners in fields.items():  # msgspec prints dict keys as [...]: find the key
            try:
                msgspec.convert(owners, _Owners)
            except msgspec.ValidationError as inner:
                text, _, _ = str(inner).partition(" - at `$")
                at = ".fields" + (f".{key}" if str(key).isidentifier() else f'["{key}"]')
                break
    return f"{where}{at}", text[:1].lower() + text[1:]


def compile_ownership(
    cfg: Mapping[str, EntityOwnership] | Mapping[str, Any] | None,
    *,
    source: str = "<ownership>",
    path: str = "ownership",
) -> Ownership:
    """Validate ``[ownership.*]`` and build the :class:`Ownership` the apply path uses.

    Raises:
        ConfigError: unknown entities, field paths that do not exist, malformed owners; every
            problem is listed with its path (``ownership.customer.fields.credit_limt``).
    """
    problems: list[tuple[str, str]] = []
    policies: dict[str, EntityPolicy] = {}
    for entity, raw in (cfg or {}).items():
        where = f"{path}.{entity}"
        if isinstance(raw, EntityOwnership):
            spec = raw
        else:
            try:
                spec = msgspec.convert(raw, EntityOwnership)
            except msgspec.ValidationError as exc:
                problems.append(_locate(raw, exc, where))
                continue
        if entity not in ENTITIES:
            problems.append(
                (where, f"unknown entity {entity!r} (expected one of: {', '.join(sorted(ENTITIES))})")
            )
            continue
        bad = len(problems)
        for field_path in spec.fields:
            fwhere = f"{where}.fields" + (
                f".{field_path}" if field_path.isidentifier() else f'["{field_path}"]'
            )
            try:
                segments = _paths.parse_path(field_path)
                _paths.resolve(ENTITIES[entity], segments)
            except _paths.PathError as exc:
                problems.append((fwhere, str(exc)))
                continue
            if any(isinstance(s, int) for s in segments):
                problems.append((fwhere, "ownership applies to whole fields: own the list, not one item"))
            elif segments == ("id",):
                problems.append((fwhere, "`id` is the record's identity: every system may send it"))
            _check_owners(spec.fields[field_path], fwhere, problems)
        if spec.default_owner is not None:
            _check_owners(spec.default_owner, f"{where}.default_owner", problems)
        if len(problems) == bad:
            policies[entity] = EntityPolicy(entity, spec)
    if problems:
        raise ConfigError(source=source, problems=problems)
    return Ownership(policies)
