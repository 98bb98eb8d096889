"""A flow's data rules, compiled: mappings to and from the canonical entity, and ownership.

A flow whose config has ``[flows.to_canonical]`` publishes canonical entities (envelope
``schema`` = ``customer/1``, payload = the mapped entity, a ``Tombstone`` for a delete) instead
of raw rows (``customer/row``). ``[flows.from_canonical]`` maps a canonical entity to the row
the sink writes, and ``[flows.ownership]`` decides which fields each origin may write (see
:mod:`mesh.ownership`). Everything is checked when the config is loaded (or a flow applied);
:func:`compile_flow_data` lists every problem at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from mesh.errors import ConfigError

if TYPE_CHECKING:
    from mesh.mapping import Mapper, MappingConfig
    from mesh.ownership import EntityOwnership, Ownership

__all__ = ["FlowData", "FlowDataConfig", "compile_flow_data"]


class FlowDataConfig(Protocol):
    """The parts of a flow's config that :func:`compile_flow_data` reads; ``mesh.config.FlowConfig``
    has them (this module does not import ``mesh.config``, which imports it)."""

    @property
    def entity(self) -> str: ...
    @property
    def to_canonical(self) -> MappingConfig | None: ...
    @property
    def from_canonical(self) -> MappingConfig | None: ...
    @property
    def ownership(self) -> EntityOwnership | None: ...


@dataclass(frozen=True)
class FlowData:
    """What a flow needs at run time to map and filter records (all optional)."""

    to_canonical: Mapper | None = None
    from_canonical: Mapper | None = None
    ownership: Ownership | None = None
    schema: str = ""
    """The envelope ``schema`` of what the flow publishes: ``customer/1``, or ``<entity>/row``."""

    async def open(self) -> None:
        """Load lookup tables (SQLite lookups are read here)."""
        for mapper in (self.to_canonical, self.from_canonical):
            if mapper is not None:
                await mapper.open()


def compile_flow_data(flow: FlowDataConfig, *, source: str, path: str, base: Path | None = None) -> FlowData:
    """Compile ``flow``'s mappings and ownership.

    Raises:
        ConfigError: every problem of every part, each with its field path.
    """
    from mesh.canonical.entities import ENTITIES
    from mesh.mapping import compile_mapping
    from mesh.ownership import compile_ownership

    problems: list[tuple[str, str]] = []
    mappers: dict[str, Mapper | None] = {"to_canonical": None, "from_canonical": None}
    for direction in ("to_canonical", "from_canonical"):
        cfg = getattr(flow, direction)
        if cfg is None:
            continue
        try:
            mappers[direction] = compile_mapping(
                cfg, flow.entity, direction, source=source, path=f"{path}.{direction}", base=base
            )
        except ConfigError as exc:
            problems.extend(exc.problems)
    ownership = None
    if flow.ownership is not None:
        try:
            ownership = compile_ownership(
                {flow.entity: flow.ownership}, source=source, path=f"{path}.ownership"
            )
        except ConfigError as exc:
            problems.extend(exc.problems)
    if (flow.to_canonical or flow.from_canonical or flow.ownership) and flow.entity not in ENTITIES:
        problems.append((
            f"{path}.entity",
            f"{flow.entity!r} is not a canonical entity (mappings and ownership "
            f"need one of: {', '.join(sorted(ENTITIES))})",
        ))  # fmt: skip
    if problems:
        raise ConfigError(source=source, problems=problems)
    schema = f"{flow.entity}/row"
    if mappers["to_canonical"] is not None:
        schema = ENTITIES[flow.entity].schema_id
    return FlowData(mappers["to_canonical"], mappers["from_canonical"], ownership, schema)
