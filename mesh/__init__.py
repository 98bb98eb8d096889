"""The runtime every mesh agent shares: envelope and codec, config, actors and supervision,
JetStream transport, SQLite outbox/inbox, metrics and the ``meshctl`` CLI."""

__all__: list[str] = []
