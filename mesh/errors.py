"""The mesh's one error tree, grouped by what the caller does about it.

::

    MeshError                      base of everything the mesh raises on purpose
    ├── RetryableError             try again later (nak with delay, reconnect, back off)
    │   ├── TransportError         NATS unreachable, publish/ack timed out, no responders
    │   └── SystemUnavailable      the external system (database, API) is down or busy
    ├── PermanentError             retrying cannot help: dead-letter the message, keep the flow going
    │   ├── DecodeError            bytes that are not a valid envelope or payload
    │   ├── RejectedRecord         the external system refused this record (constraint, mapping)
    │   └── MappingError           a flow's mapping cannot turn this record into its target shape
    ├── ConfigError                fix the configuration; the agent does not start
    └── StopError                  the agent must stop (store corrupt, disk full, credentials revoked)

Foreign exceptions (nats, sqlite3, OSError) are translated at the boundary that sees them,
so code above the adapters and the transport only ever handles this tree.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DecodeError",
    "MappingError",
    "MeshError",
    "PermanentError",
    "RejectedRecord",
    "RetryableError",
    "StopError",
    "SystemUnavailable",
    "TransportError",
]


class MeshError(Exception):
    """Base class of every error the mesh raises on purpose."""


class RetryableError(MeshError):
    """The operation may succeed if tried again later."""


class TransportError(RetryableError):
    """The message broker could not be reached or did not confirm in time."""


class SystemUnavailable(RetryableError):
    """The external system behind an adapter is unreachable, locked or overloaded."""


class PermanentError(MeshError):
    """Retrying cannot help: the message is dead-lettered and the flow moves on."""


class DecodeError(PermanentError):
    """Bytes that are not a valid envelope (or not a valid payload for its schema)."""


class RejectedRecord(PermanentError):
    """The target system refused this one record; others may still succeed."""


class MappingError(PermanentError):
    """A flow's mapping cannot turn this one record into its target shape: a value missing from a
    value map or lookup, a date in the wrong format, an inexact amount, a canonical entity that
    does not validate. ``field`` is the target field path (``lines[2].unit_price``), ``reason``
    what is wrong; the record is dead-lettered and the flow goes on."""

    def __init__(self, reason: str, *, field: str = "", entity: str = ""):
        self.reason = reason
        self.field = field
        self.entity = entity
        where = " ".join(p for p in (entity, f"field `{field}`" if field else "") if p)
        super().__init__(f"{where}: {reason}" if where else reason)


class ConfigError(MeshError):
    """The configuration is invalid. The message names the file, the field path and the problem."""

    def __init__(self, message: str, *, source: str | None = None, path: str | None = None):
        self.source = source
        self.path = path
        prefix = f"{source}: " if source else ""
        super().__init__(f"{prefix}{message}")


class StopError(MeshError):
    """The agent cannot continue safely and must stop (the supervisor does not restart it)."""
