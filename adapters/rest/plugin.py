"""The REST adapter's declaration (entry point ``mesh.adapters:rest``). Importing this module
imports only its config Structs, not httpx."""

from __future__ import annotations

from adapters.rest._api import RestOperationConfig
from adapters.rest.config import RestSinkConfig, RestSourceConfig
from mesh.plugins import AdapterPlugin, Role

__all__ = ["REST"]

REST = AdapterPlugin(
    name="rest",
    summary="a JSON REST API (a polled list endpoint; one request per record as a sink)",
    source=Role(RestSourceConfig, "adapters.rest.source:RestSource"),
    sink=Role(RestSinkConfig, "adapters.rest.sink:RestSink"),
    preflight="adapters.rest._preflight:rest_preflight",
    operation=Role(RestOperationConfig, "adapters.rest._api:RestOperation"),
    bulk="adapters.rest._bulk:rest_extract",
    reconcile="adapters.rest._reconcile:REST",
)
