"""Signed inbound HTTP (webhooks) as a source. Import :mod:`adapters.webhook.source`.

The private modules hold its parts: ``_signature`` (HMAC verification, secret rotation, replay
window), ``_mapping`` (JSON event -> :class:`~mesh.adapters.Change`) and ``_seen`` (delivery ids
already captured, in the source's own SQLite file).
"""

__all__: list[str] = []
