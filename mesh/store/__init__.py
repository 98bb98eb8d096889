"""The agent's local SQLite stores: the outbox (with source cursors) and the inbox.

Stores are created 0600 in directories made 0700 (:func:`private_dir`), whoever creates them.
"""

from mesh.store._sqlite import private_dir
from mesh.store.applied import AppliedKey, AppliedKeys
from mesh.store.inbox import Inbox, InboxEntry
from mesh.store.outbox import Outbox, OutboxRow

__all__ = ["AppliedKey", "AppliedKeys", "Inbox", "InboxEntry", "Outbox", "OutboxRow", "private_dir"]
