"""Find the System APIs being served (``meshctl api list``): ``$SRV.INFO`` answers of every
``mesh-<system>`` service instance, grouped by service and version."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mesh.api import _micro
from mesh.api._wire import SERVICE_PREFIX, decode

__all__ = ["ServiceView", "discover"]


@dataclass
class ServiceView:
    """One System API service at one version: its endpoints and the agents serving it."""

    name: str
    version: str
    system: str
    endpoints: list[dict[str, Any]] = field(default_factory=list)
    agents: list[str] = field(default_factory=list)
    instances: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "system": self.system,
            "endpoints": self.endpoints,
            "agents": self.agents,
            "instances": self.instances,
        }


async def discover(transport: Any, *, timeout: float = 2.0) -> list[ServiceView]:
    """Every ``mesh-*`` service answering ``$SRV.INFO`` within ``timeout`` (sorted by name,
    version). ``transport`` is a connected :class:`~mesh.transport.JetStream`.

    Raises:
        TransportError: not connected.
    """
    nc = getattr(transport, "nc", transport)
    views: dict[tuple[str, str], ServiceView] = {}
    for data in await _micro.request_many(nc, "$SRV.INFO", timeout=timeout):
        try:
            info = decode(data)
        except Exception:
            continue
        if not isinstance(info, dict) or not str(info.get("name", "")).startswith(SERVICE_PREFIX):
            continue
        meta = info.get("metadata") or {}
        key = (str(info["name"]), str(info.get("version", "")))
        view = views.get(key)
        if view is None:
            view = views[key] = ServiceView(key[0], key[1], str(meta.get("system", "")))
            view.endpoints = [
                {"name": e.get("name"), "subject": e.get("subject"), **(e.get("metadata") or {})}
                for e in info.get("endpoints") or []
            ]
        agent = str(meta.get("agent", ""))
        if agent and agent not in view.agents:
            view.agents.append(agent)
        view.instances.append(str(info.get("id", "")))
    for v in views.values():
        v.agents.sort()
    return [views[k] for k in sorted(views)]
