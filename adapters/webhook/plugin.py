"""The webhook receiver's declaration (entry point ``mesh.adapters:webhook``). Importing this
module imports only its config Struct."""

from __future__ import annotations

from adapters.webhook.config import WebhookSourceConfig
from mesh.plugins import AdapterPlugin, Role

__all__ = ["WEBHOOK"]

WEBHOOK = AdapterPlugin(
    name="webhook",
    summary="signed inbound HTTP (a SaaS POSTs JSON events)",
    source=Role(WebhookSourceConfig, "adapters.webhook.source:WebhookSource"),
)
