"""The ``[api]`` table of an agent config: the System API operations the agent serves.

Kept apart from :mod:`mesh.config` (which embeds it in :class:`~mesh.config.AgentConfig`) so that
:mod:`mesh.api` can use it without importing the whole config module. Each operation's ``run``
table is decoded by its ``adapter`` through the installed adapters' ``operation`` roles
(:func:`api_config_type`)::

    [api]
    version = "1.0.0"

    [[api.operations]]
    name = "sales_order.create"          # served at api.<system>.sales_order.create
    request = { entity = "sales_order" } # or { fields = { id = "str", qty = "int?" } }
    [api.operations.run]
    adapter = "sqlite"
    path = "erp.db"
    statement = "INSERT INTO orders (id, total) VALUES (:id, :total) RETURNING id AS order_id"
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Annotated, Any, cast

import msgspec

from mesh._config_base import AdapterConfig, ConfigStruct, PositiveFloat, PositiveInt
from mesh.errors import ConfigProblem

if TYPE_CHECKING:
    from mesh.plugins import AdapterRegistry

__all__ = ["FIELD_TYPES", "ApiConfig", "OperationConfig", "ShapeConfig", "api_config_type", "check_api"]

FIELD_TYPES: tuple[str, ...] = (
    "str", "int", "float", "bool", "decimal", "date", "datetime", "money", "object", "list",
)  # fmt: skip
"""Field types of a ``fields`` shape; a trailing ``?`` makes the field optional (default null)."""

OperationName = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]{0,62}\.[a-z][a-z0-9_]{0,62}$")]
SemVer = Annotated[str, msgspec.Meta(pattern=r"^\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$")]


class ShapeConfig(ConfigStruct, frozen=True):
    """A request or response shape: a canonical ``entity`` (``sales_order``: the canonical
    SalesOrder Struct) or a ``fields`` table (name -> type of :data:`FIELD_TYPES`)."""

    entity: str | None = None
    fields: dict[str, str] = {}
    many: bool = False
    """Response only: a list of such objects."""


class OperationConfig(ConfigStruct, frozen=True):
    name: OperationName
    """``<entity>.<operation>``, e.g. ``sales_order.create``."""
    run: AdapterConfig
    read: bool = False
    """A read (``customer.get``): no idempotency key needed, results not kept."""
    request: ShapeConfig = ShapeConfig()
    response: ShapeConfig | None = None
    timeout: PositiveFloat = 30.0
    """Longest one execution may take, whatever the caller's deadline."""
    description: str = ""


class ApiConfig(ConfigStruct, frozen=True):
    version: SemVer = "1.0.0"
    operations: list[OperationConfig] = []
    max_concurrent: PositiveInt = 16
    """Calls executed at once by this agent (more wait; beyond 10x as many: ``unavailable``)."""
    claim_timeout: PositiveFloat = 30.0
    """Seconds after a claim's deadline before another replica treats it as abandoned."""
    result_ttl: PositiveFloat = 24 * 3600.0
    """How long results are kept for replay (``mesh_api_results`` max age, when this agent creates it)."""


_OPTIONS: dict[str, Any] = {"frozen": True, "kw_only": True, "forbid_unknown_fields": True}


@functools.cache
def api_config_type(registry: AdapterRegistry) -> type[ApiConfig]:
    """:class:`ApiConfig` whose operations' ``run`` is the union of the installed adapters'
    operation configs."""
    union = registry.config_union("operation")
    op = msgspec.defstruct(
        "OperationConfig", [("run", union)], bases=(OperationConfig,), module=__name__, **_OPTIONS
    )
    api = msgspec.defstruct(
        "ApiConfig",
        [("operations", list[op], msgspec.field(default_factory=list))],  # type: ignore[valid-type]
        bases=(ApiConfig,),
        module=__name__,
        **_OPTIONS,
    )
    return cast("type[ApiConfig]", api)


def _shape_problems(shape: ShapeConfig, path: str) -> list[ConfigProblem]:
    from mesh.canonical import ENTITIES

    problems = []
    if shape.entity is not None and shape.fields:
        problems.append(ConfigProblem(path, "give either entity or fields, not both"))
    if shape.entity is not None and shape.entity not in ENTITIES:
        known = ", ".join(ENTITIES)
        problems.append(
            ConfigProblem(f"{path}.entity", f"unknown canonical entity {shape.entity!r} (expected: {known})")
        )
    for name, kind in shape.fields.items():
        if kind.removesuffix("?") not in FIELD_TYPES:
            known = ", ".join(FIELD_TYPES)
            problems.append(
                ConfigProblem(
                    f"{path}.fields.{name}", f"unknown type {kind!r} (expected: {known}; ?: optional)"
                )
            )
    return problems


def check_api(api: ApiConfig, path: str = "api") -> list[ConfigProblem]:
    """Consistency problems of the ``[api]`` table (types are checked already)."""
    problems: list[ConfigProblem] = []
    seen: set[str] = set()
    for i, op in enumerate(api.operations):
        where = f"{path}.operations[{i}]"
        if op.name in seen:
            problems.append(ConfigProblem(f"{where}.name", f"duplicate operation {op.name!r}"))
        seen.add(op.name)
        problems += _shape_problems(op.request, f"{where}.request")
        if op.request.many:
            problems.append(ConfigProblem(f"{where}.request.many", "a request is one object"))
        if op.response is not None:
            problems += _shape_problems(op.response, f"{where}.response")
        problems += [
            ConfigProblem(f"{where}.run.{p}" if p else f"{where}.run", m) for p, m in op.run.problems()
        ]
    return problems
