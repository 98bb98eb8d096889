"""The agent's local SQLite stores: the outbox (with source cursors) and the inbox."""

from mesh.store.inbox import Inbox, InboxEntry
from mesh.store.outbox import Outbox, OutboxRow

__all__ = ["Inbox", "InboxEntry", "Outbox", "OutboxRow"]
