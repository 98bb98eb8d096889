"""Adapter plugins: each adapter declares itself once and is found through an entry point.

An adapter package (built in, or a distribution of its own) holds one :class:`AdapterPlugin`
per adapter name, importing nothing but its config Structs::

    # mesh_jsonl/plugin.py
    JSONL = AdapterPlugin(
        name="jsonl",
        source=Role(JsonlSourceConfig, "mesh_jsonl.source:JsonlSource"),
        sink=Role(JsonFilesSinkConfig, "mesh_jsonl.sink:JsonFilesSink"),
    )

and names it in the ``mesh.adapters`` entry point group of its ``pyproject.toml``::

    [project.entry-points."mesh.adapters"]
    jsonl = "mesh_jsonl.plugin:JSONL"

:func:`adapter_registry` collects every installed declaration once per process. Everything that
needs to know the adapters asks it: the config decoder (the ``adapter = "..."`` tagged unions of
``[flows.source]`` and ``[flows.sink]``), ``meshctl config check``, the manifest an agent sends
at registration, the control plane's flow validation, the connector agent (which opens sources
and sinks through :meth:`AdapterRegistry.open_source` / :meth:`AdapterRegistry.open_sink`), and
the contract-suite matrix.

Guarantees:

* Declarations are lazy: a factory or capability is a ``"module:attribute"`` string imported on
  first use, so loading the registry (and a config) never imports a driver (psycopg, httpx) or
  an adapter's implementation.
* A broken plugin (its entry point does not import, does not name an :class:`AdapterPlugin`, or
  declares another name than the entry point's) and two distributions declaring the same name
  are a :class:`~mesh.errors.PluginError` naming the entry point and its distribution; nothing
  is silently shadowed.
"""

from __future__ import annotations

import importlib
import re
import threading
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any, Literal, Protocol, Union

from mesh._config_base import AdapterConfig
from mesh.adapters import RunRecord, Sink, Source
from mesh.errors import ConfigProblem, PluginError

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

__all__ = [
    "ENTRY_POINT_GROUP",
    "AdapterPlugin",
    "AdapterRegistry",
    "CaptureState",
    "ChangeCapture",
    "Preflight",
    "ReconcileAccess",
    "Role",
    "RoleName",
    "RunLog",
    "adapter_registry",
    "discover",
]

ENTRY_POINT_GROUP = "mesh.adapters"
"""The entry point group adapter plugins are declared in."""

RoleName = Literal["source", "sink", "operation"]
"""A role an adapter can play: a flow's source or sink, or a System API operation (README
"System APIs": the ``run`` table of an ``[[api.operations]]`` entry)."""
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass(frozen=True)
class Role:
    """One role of an adapter: its config Struct and the factory of its Source or Sink.

    ``factory`` is ``"module:callable"``; the callable takes the (decoded, paths resolved) config
    and returns the adapter, not yet opened. It is imported only when a flow uses the role.
    """

    config: type[AdapterConfig]
    factory: str


class CaptureState(Protocol):
    """What ``meshctl capture status`` shows about one source's change capture."""

    @property
    def installed(self) -> bool: ...
    @property
    def up_to_date(self) -> bool: ...
    @property
    def pending(self) -> int: ...
    @property
    def change_table(self) -> str: ...
    @property
    def oldest_at(self) -> float | None: ...


class ChangeCapture(Protocol):
    """The ``capture`` capability: installable change capture (triggers and a change table) of a
    source, driven by ``meshctl capture install|remove|status``. Each method may raise
    :class:`~mesh.errors.MeshError` (the system is unreachable, the table does not exist)."""

    def applies(self, cfg: Any) -> bool:
        """Whether this source config uses installable capture (e.g. ``mode = "changes"``)."""
        ...

    def where(self, cfg: Any) -> str:
        """Where the captured table is, for the operator (no secrets)."""
        ...

    async def install(self, cfg: Any) -> bool:
        """Create or bring up to date; True if anything changed. Idempotent."""
        ...

    async def remove(self, cfg: Any, *, keep_changes: bool) -> bool:
        """Drop the capture (and unless ``keep_changes`` the changes not yet read); True if
        anything was installed."""
        ...

    async def status(self, cfg: Any) -> CaptureState: ...


class RunLog(Protocol):
    """The ``runs`` capability: batch run records (counts in/out/failed, checksums) that
    ``meshctl files runs`` lists."""

    def location(self, cfg: Any) -> str:
        """Where the records are kept (a file path): two configs with one location share them."""
        ...

    def read(self, cfg: Any, *, limit: int | None = None) -> Sequence[RunRecord]:
        """The records, newest first, read without writing (safe beside a running agent).

        Raises:
            MeshError: the records exist but cannot be read.
        """
        ...


class Preflight(Protocol):
    """The optional ``preflight`` capability: reach the system a source or sink config names and
    report what would stop the flow, before it runs (``meshctl config check --connect``,
    ``meshctl flow apply --dry-run --connect``)."""

    async def __call__(self, cfg: Any, *, columns: Sequence[str] | None = None) -> list[ConfigProblem]:
        """Every problem found, each with the field path inside ``cfg`` it concerns (``table``,
        ``key``, ``dsn``; ``""`` for the config as a whole) and a one-line message that names the
        system without secrets (``table "custs" not found in postgres://db:5432/erp``).

        ``columns`` (sinks): the target fields the flow's mapping writes, when known. The call
        makes no change to the system and should finish within the config's own timeouts; it
        may raise :class:`~mesh.errors.MeshError` for a failure that stops the check as a whole
        (reported at the config's path).
        """
        ...


class ReconcileAccess(Protocol):
    """The optional ``reconcile`` capability (``meshctl reconcile``, :mod:`mesh.reconcile`):
    read a side's records in chunks, re-emit source records, delete target records.

    Two optional methods, looked up by name: ``key_field(cfg) -> str`` (the target's key field,
    when the config has no ``key``), and ``scan_hashes(cfg, key_field, fields, chunk)``, an
    async iterator of chunks of ``(key text, {field: hash})`` computed by the target itself (in
    SQL), used instead of :meth:`scan` on the sink side; its hashes must equal
    ``mesh.reconcile._hashing.field_hash`` of the value.
    """

    def scan(self, cfg: Any, role: RoleName, chunk: int) -> AsyncIterator[list[dict[str, Any]]]:
        """Every record of the source table / target, as column dicts, in chunks of at most
        ``chunk`` records (keyset pagination: never the whole table in memory).

        Raises:
            MeshError: the table cannot be read.
        """
        ...

    async def restamp(self, cfg: Any, keys: Sequence[Any]) -> int:
        """Source side: capture the rows with these key values again as new changes (a new
        version, so a new envelope id that passes the sinks' version guards); how many.

        Raises:
            ConfigError: this source cannot re-emit (e.g. cursor mode).
            MeshError: the source cannot be written.
        """
        ...

    async def delete(self, cfg: Any, keys: Sequence[str]) -> int:
        """Sink side: delete the records with these key values (as text); how many.

        Raises:
            MeshError: the target refused.
        """
        ...


@dataclass(frozen=True)
class AdapterPlugin:
    """One adapter's declaration: its name, its roles, and its optional capabilities.

    ``capture``, ``runs`` and ``preflight`` are ``"module:attribute"`` references to a
    :class:`ChangeCapture` (for the source), a :class:`RunLog` and a :class:`Preflight` (for
    either role). Raises ``ValueError`` when the
    declaration is inconsistent (no role, a config whose ``tag`` is not ``name``, a malformed
    reference).
    """

    name: str
    source: Role | None = None
    sink: Role | None = None
    capture: str | None = None
    runs: str | None = None
    preflight: str | None = None
    operation: Role | None = None
    """Optional: System API operations (``[api.operations.run]``); the factory takes the operation's
    run config and returns a :class:`mesh.api.Operation`."""
    bulk: str | None = None
    """``"module:callable"``: makes the source's full extract for a scheduled flow (the callable
    takes the source config and returns a :class:`mesh.runs.bulk.BulkExtract`)."""
    summary: str = ""
    reconcile: str | None = None
    """``"module:attribute"`` of a :class:`ReconcileAccess` (``meshctl reconcile``)."""
    """One line for listings: what system the adapter talks to."""

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(
                f"name {self.name!r}: expected 1-32 of a-z, 0-9, _ and -, starting with a letter"
            )
        if self.source is None and self.sink is None:
            raise ValueError(f"adapter {self.name!r}: declares neither a source nor a sink")
        for role_name, role in (("source", self.source), ("sink", self.sink), ("operation", self.operation)):
            if role is None:
                continue
            cfg = role.config
            if not (isinstance(cfg, type) and issubclass(cfg, AdapterConfig)):
                raise ValueError(
                    f"adapter {self.name!r}: {role_name} config must subclass mesh.config.AdapterConfig"
                )
            tag = cfg.__struct_config__.tag
            if tag != self.name:
                raise ValueError(
                    f"adapter {self.name!r}: {role_name} config {cfg.__name__} has tag {tag!r}"
                    f" (declare it with tag={self.name!r})"
                )
            _check_ref(self.name, f"{role_name} factory", role.factory)
        refs = (
            ("capture", self.capture),
            ("runs", self.runs),
            ("preflight", self.preflight),
            ("bulk", self.bulk),
            ("reconcile", self.reconcile),
        )
        for what, ref in refs:
            if ref is not None:
                _check_ref(self.name, what, ref)
        if self.capture is not None and self.source is None:
            raise ValueError(f"adapter {self.name!r}: capture needs a source")
        if self.bulk is not None and self.source is None:
            raise ValueError(f"adapter {self.name!r}: bulk needs a source")

    @property
    def roles(self) -> tuple[RoleName, ...]:
        return tuple(r for r in ("source", "sink") if getattr(self, r) is not None)

    @property
    def capabilities(self) -> frozenset[str]:
        """The roles and the optional capabilities this adapter declares."""
        extra = [
            c
            for c in ("capture", "runs", "preflight", "operation", "bulk", "reconcile")
            if getattr(self, c) is not None
        ]
        return frozenset([*self.roles, *extra])

    def role(self, role: RoleName) -> Role | None:
        found: Role | None = getattr(self, role)
        return found


class _NoAdapter(AdapterConfig, frozen=True, tag="-"):
    """Stands in for an empty union: no ``adapter`` value matches its tag, so decoding a side no
    installed adapter can play fails with msgspec's "Invalid value" at ``...adapter``."""


def _check_ref(name: str, what: str, ref: str) -> None:
    if not _REF.match(ref):
        raise ValueError(f"adapter {name!r}: {what} {ref!r} is not 'module:attribute'")


def _resolve(plugin: AdapterPlugin, what: str, ref: str) -> Any:
    module, _, attr = ref.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise PluginError(f"adapter {plugin.name!r}: cannot load its {what} {ref!r}: {exc}") from exc


class AdapterRegistry:
    """The installed adapters by name. Immutable once built; safe to share between threads."""

    def __init__(self, plugins: Iterable[AdapterPlugin], *, origins: dict[str, str] | None = None) -> None:
        by_name: dict[str, AdapterPlugin] = {}
        origins = origins or {}
        for plugin in plugins:
            if plugin.name in by_name:
                raise PluginError(
                    f"adapter {plugin.name!r} is declared twice"
                    f" ({origins.get(plugin.name, 'unknown origin')} and another declaration)"
                )
            by_name[plugin.name] = plugin
        self._plugins = by_name
        self.origins: dict[str, str] = dict(origins)
        """Per adapter name: the entry point and distribution it came from (for messages)."""

    def __repr__(self) -> str:
        return (
            f"<AdapterRegistry sources={','.join(self.names('source'))} sinks={','.join(self.names('sink'))}>"
        )

    def __iter__(self) -> Iterator[AdapterPlugin]:
        return iter(self._plugins.values())

    def __len__(self) -> int:
        return len(self._plugins)

    def __contains__(self, name: object) -> bool:
        return name in self._plugins

    def __getitem__(self, name: str) -> AdapterPlugin:
        return self._plugins[name]

    def names(self, role: RoleName | None = None) -> tuple[str, ...]:
        """Adapter names in sorted order; with ``role``, those that can play it."""
        return tuple(sorted(n for n, p in self._plugins.items() if role is None or p.role(role) is not None))

    def configs(self, role: RoleName) -> tuple[type[AdapterConfig], ...]:
        """The config Structs of every adapter that can play ``role`` (sorted by name)."""
        out = []
        for name in self.names(role):
            role_decl = self._plugins[name].role(role)
            assert role_decl is not None
            out.append(role_decl.config)
        return tuple(out)

    def config_union(self, role: RoleName) -> Any:
        """The tagged union (``adapter = "..."``) of :meth:`configs`, for decoding (when no
        installed adapter can play ``role``, a Struct no ``adapter`` value matches)."""
        configs = self.configs(role)
        if not configs:
            return _NoAdapter
        return Union[configs]  # noqa: UP007 - built from a runtime tuple

    def plugin_of(self, cfg: AdapterConfig) -> AdapterPlugin:
        """The plugin whose config ``cfg`` is.

        Raises:
            PluginError: no installed adapter declares ``type(cfg)``.
        """
        tag = type(cfg).__struct_config__.tag
        plugin = self._plugins.get(tag) if isinstance(tag, str) else None
        if plugin is None or type(cfg) not in (
            r.config for r in (plugin.source, plugin.sink, plugin.operation) if r is not None
        ):
            raise PluginError(
                f"no installed adapter declares {type(cfg).__qualname__}"
                f" (installed: {', '.join(self.names())})"
            )
        return plugin

    def _factory(self, cfg: AdapterConfig, role: RoleName) -> Any:
        plugin = self.plugin_of(cfg)
        decl = plugin.role(role)
        if decl is None or decl.config is not type(cfg):
            raise PluginError(f"adapter {plugin.name!r} has no {role} for {type(cfg).__qualname__}")
        return _resolve(plugin, f"{role} factory", decl.factory)

    def open_source(self, cfg: AdapterConfig) -> Source:
        """The Source for a source config, constructed but not yet opened.

        Raises:
            PluginError: no installed adapter has a source for this config, or its factory does
                not import.
        """
        source = self._factory(cfg, "source")(cfg)
        if not isinstance(source, Source):
            raise PluginError(
                f"adapter {type(cfg).__struct_config__.tag!r}: its source factory made {source!r},"
                " not a Source"
            )
        return source

    def open_sink(self, cfg: AdapterConfig) -> Sink:
        """The Sink for a sink config, constructed but not yet opened (raises like :meth:`open_source`)."""
        sink = self._factory(cfg, "sink")(cfg)
        if not isinstance(sink, Sink):
            raise PluginError(
                f"adapter {type(cfg).__struct_config__.tag!r}: its sink factory made {sink!r}, not a Sink"
            )
        return sink

    def open_operation(self, cfg: AdapterConfig) -> Any:
        """The System API operation (a :class:`mesh.api.Operation`) for an operation run config,
        constructed but not yet opened (raises like :meth:`open_source`)."""
        op = self._factory(cfg, "operation")(cfg)
        if not all(callable(getattr(op, m, None)) for m in ("open", "run", "recorded", "aclose")):
            raise PluginError(
                f"adapter {type(cfg).__struct_config__.tag!r}: its operation factory made {op!r},"
                " not a mesh.api.Operation"
            )
        return op

    def capture_of(self, cfg: AdapterConfig) -> ChangeCapture | None:
        """The source's change-capture capability, if its adapter declares one and it applies to
        ``cfg`` (raises :class:`~mesh.errors.PluginError` when it does not import)."""
        plugin = self.plugin_of(cfg)
        if plugin.capture is None or plugin.source is None or type(cfg) is not plugin.source.config:
            return None
        capture: ChangeCapture = _resolve(plugin, "capture", plugin.capture)
        return capture if capture.applies(cfg) else None

    def runs_of(self, cfg: AdapterConfig) -> RunLog | None:
        """The run-record capability of ``cfg``'s adapter, if it declares one."""
        plugin = self.plugin_of(cfg)
        if plugin.runs is None:
            return None
        runs: RunLog = _resolve(plugin, "runs", plugin.runs)
        return runs

    def preflight_of(self, cfg: AdapterConfig) -> Preflight | None:
        """The preflight check of ``cfg``'s adapter, if it declares one (raises
        :class:`~mesh.errors.PluginError` when it does not import)."""
        plugin = self.plugin_of(cfg)
        if plugin.preflight is None:
            return None
        check: Preflight = _resolve(plugin, "preflight", plugin.preflight)
        return check

    def bulk_of(self, cfg: AdapterConfig) -> Any | None:
        """The maker of ``cfg``'s full extract (a callable taking ``cfg`` and returning a
        :class:`mesh.runs.bulk.BulkExtract`), if its adapter declares the ``bulk`` capability
        (raises :class:`~mesh.errors.PluginError` when it does not import)."""
        plugin = self.plugin_of(cfg)
        if plugin.bulk is None or plugin.source is None or type(cfg) is not plugin.source.config:
            return None
        return _resolve(plugin, "bulk", plugin.bulk)

    def reconcile_of(self, cfg: AdapterConfig) -> ReconcileAccess | None:
        """The reconcile capability of ``cfg``'s adapter, if it declares one."""
        plugin = self.plugin_of(cfg)
        if plugin.reconcile is None:
            return None
        access: ReconcileAccess = _resolve(plugin, "reconcile", plugin.reconcile)
        return access


def _origin(ep: EntryPoint) -> str:
    dist = ep.dist
    where = f"distribution {dist.name} {dist.version}" if dist is not None else "unknown distribution"
    return f"entry point {ENTRY_POINT_GROUP}:{ep.name} = {ep.value!r} ({where})"


def discover(entry_points: Iterable[EntryPoint] | None = None) -> AdapterRegistry:
    """Load every adapter declared in the ``mesh.adapters`` entry point group (or in
    ``entry_points``) into a new registry.

    Raises:
        PluginError: an entry point does not load or does not name an :class:`AdapterPlugin`
            whose name is the entry point's, or two entry points declare one name; the message
            names the entry point and its distribution.
    """
    eps = list(metadata.entry_points(group=ENTRY_POINT_GROUP) if entry_points is None else entry_points)
    plugins: list[AdapterPlugin] = []
    origins: dict[str, str] = {}
    for ep in eps:
        origin = _origin(ep)
        if ep.name in origins:
            raise PluginError(f"adapter {ep.name!r} is declared twice: {origins[ep.name]} and {origin}")
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin must not hide behind a traceback
            raise PluginError(f"{origin} does not load: {type(exc).__name__}: {exc}") from exc
        if not isinstance(plugin, AdapterPlugin):
            raise PluginError(f"{origin} names {type(plugin).__name__}, not a mesh.plugins.AdapterPlugin")
        if plugin.name != ep.name:
            raise PluginError(
                f"{origin} declares adapter {plugin.name!r}; the entry point must be named alike"
            )
        origins[ep.name] = origin
        plugins.append(plugin)
    return AdapterRegistry(plugins, origins=origins)


_lock = threading.Lock()
_registry: AdapterRegistry | None = None


def adapter_registry() -> AdapterRegistry:
    """The installed adapters, discovered on first use and then kept for the process.

    Raises:
        PluginError: see :func:`discover` (raised again on every call until fixed).
    """
    global _registry
    with _lock:
        if _registry is None:
            _registry = discover()
        return _registry
