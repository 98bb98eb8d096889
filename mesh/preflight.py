"""Preflight: reach every source and sink a set of flows names and list what would stop them.

``meshctl config check --connect`` runs it on an agent config, and a connector agent runs it on
request for ``meshctl flow apply --dry-run --connect``. Each adapter brings its own check through
the optional ``preflight`` capability of its plugin (:class:`mesh.plugins.Preflight`); this
module calls them, one flow side at a time, and puts every problem under the field path of the
agent config it concerns (``flows[2].sink.table``).

Guarantees: nothing is written to any system; every side is bounded by ``timeout`` seconds; a
side whose check fails as a whole (unreachable, a broken plugin, an unexpected exception) is one
problem at that side's path, never a traceback; a side whose adapter has no preflight is left
unchecked and said so (:func:`unchecked`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import anyio

from mesh.config import FlowConfig
from mesh.errors import ConfigError, ConfigProblem, MeshError
from mesh.plugins import AdapterRegistry, adapter_registry

__all__ = ["DEFAULT_TIMEOUT", "mapped_columns", "preflight_flow", "preflight_flows", "unchecked"]

DEFAULT_TIMEOUT = 20.0
"""Seconds one side (a source or a sink) of one flow may take to check."""

_FIRST = re.compile(r"^[^.\[]+")


def mapped_columns(flow: FlowConfig) -> list[str] | None:
    """The top-level target fields the flow's ``from_canonical`` mapping writes (in order), or
    None when the flow has no such mapping (rows then carry whatever the events carry)."""
    if flow.from_canonical is None:
        return None
    names: dict[str, None] = {}
    for target in flow.from_canonical.fields:
        m = _FIRST.match(target)
        if m:
            names[m[0]] = None
    return list(names)


def unchecked(flow: FlowConfig, path: str, registry: AdapterRegistry | None = None) -> list[str]:
    """The side paths of ``flow`` whose adapter declares no preflight (``flows[1].sink (csv)``)."""
    registry = registry or adapter_registry()
    out = []
    for side, cfg in (("source", flow.source), ("sink", flow.sink)):
        if cfg is None:
            continue
        try:
            if registry.preflight_of(cfg) is None:
                out.append(f"{path}.{side} ({registry.plugin_of(cfg).name})")
        except MeshError:
            continue  # preflight_flow reports it
    return out


def _under(prefix: str, problems: Sequence[tuple[str, str]]) -> list[ConfigProblem]:
    return [ConfigProblem(f"{prefix}.{p}" if p else prefix, m) for p, m in problems]


async def _side(
    flow: FlowConfig, side: str, path: str, registry: AdapterRegistry, timeout: float
) -> list[ConfigProblem]:
    cfg = flow.source if side == "source" else flow.sink
    prefix = f"{path}.{side}"
    if cfg is None:
        return []
    try:
        check = registry.preflight_of(cfg)
        if check is None:
            return []
        columns = mapped_columns(flow) if side == "sink" else None
        with anyio.fail_after(timeout):
            return _under(prefix, await check(cfg, columns=columns))
    except TimeoutError:
        return [ConfigProblem(prefix, f"no answer within {timeout:g}s (is the system reachable?)")]
    except ConfigError as exc:
        return _under(prefix, [(p.path, p.message) for p in exc.problems])
    except MeshError as exc:
        return [ConfigProblem(prefix, " ".join(str(exc).split()))]
    except Exception as exc:  # a third-party check must not end the run with a traceback
        text = " ".join(str(exc).split())
        return [ConfigProblem(prefix, f"preflight failed: {type(exc).__name__}: {text}")]


async def preflight_flow(
    flow: FlowConfig,
    path: str,
    *,
    registry: AdapterRegistry | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[ConfigProblem]:
    """Every problem of ``flow``'s source and sink, under ``path`` (``flows[2]``): source first."""
    registry = registry or adapter_registry()
    found: dict[str, list[ConfigProblem]] = {}

    async def one(side: str) -> None:
        found[side] = await _side(flow, side, path, registry, timeout)

    async with anyio.create_task_group() as tg:
        for side in ("source", "sink"):
            tg.start_soon(one, side)
    return [*found["source"], *found["sink"]]


async def preflight_flows(
    flows: Sequence[tuple[str, FlowConfig]],
    *,
    registry: AdapterRegistry | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[ConfigProblem]:
    """Every problem of every ``(path, flow)``, checked concurrently, listed in the given order."""
    registry = registry or adapter_registry()
    found: list[list[ConfigProblem]] = [[] for _ in flows]

    async def one(i: int, path: str, flow: FlowConfig) -> None:
        found[i] = await preflight_flow(flow, path, registry=registry, timeout=timeout)

    async with anyio.create_task_group() as tg:
        for i, (path, flow) in enumerate(flows):
            tg.start_soon(one, i, path, flow)
    return [p for problems in found for p in problems]
