"""The mesh's one error tree, grouped by what the caller does about it.

::

    MeshError                      base of everything the mesh raises on purpose
    ├── RetryableError             try again later (nak with delay, reconnect, back off)
    │   ├── TransportError         NATS unreachable, publish/ack timed out (mesh.transport)
    │   │   ├── NoResponders       nobody serves the subject (or no stream takes it)
    │   │   ├── NoReply            no answer within the timeout
    │   │   ├── RevisionConflict   a KV compare-and-swap lost: read again, decide again
    │   │   ├── NotFound           the stream or consumer does not exist
    │   │   ├── Refused            the broker answered and refused (bad request, limit, policy)
    │   │   └── NotSupported       the broker cannot do it (too old a nats-server)
    │   ├── SystemUnavailable      the external system (database, API) is down or busy
    │   └── IntegrityPending       the target refused a record over a related record: a parent
    │                              not there yet (foreign key on insert) or a child still there
    │                              (on delete); retried within ``retry.integrity_retry`` seconds
    ├── PermanentError             retrying cannot help: dead-letter the message, keep the flow going
    │   ├── DecodeError            bytes that are not a valid envelope or payload
    │   ├── InvalidEnvelope        an envelope that contradicts its subject or the flow (forged?)
    │   ├── RejectedRecord         the external system refused this record (constraint, mapping)
    │   └── MappingError           a flow's mapping cannot turn this record into its target shape
    ├── ConfigError                fix the configuration: at load the agent does not start; found
    │   │                          at run time (wrong password, missing table) the flow is
    │   │                          ``failing`` with the reason and retried slowly until fixed
    │   └── PluginError            an installed adapter plugin is broken or declared twice
    └── StopError                  the agent must stop (store corrupt, disk full, credentials revoked)

Foreign exceptions (nats, sqlite3, OSError) are translated at the boundary that sees them,
so code above the adapters and the transport only ever handles this tree.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

__all__ = [
    "ConfigError",
    "ConfigProblem",
    "DecodeError",
    "IntegrityPending",
    "InvalidEnvelope",
    "MappingError",
    "MeshError",
    "PermanentError",
    "PluginError",
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


class IntegrityPending(RetryableError):
    """The target refused this one record because of another record: its parent is not there yet
    (a foreign key violated by an insert or update) or a child still refers to it (a delete).
    Flows that carry parents and children separately converge once the other record arrives,
    so the sink side retries it with doubling delays spread over the flow's
    ``retry.integrity_retry`` seconds (and at most ``consumer.max_deliver`` deliveries), then
    dead-letters it with the reason."""


class PermanentError(MeshError):
    """Retrying cannot help: the message is dead-lettered and the flow moves on."""


class DecodeError(PermanentError):
    """Bytes that are not a valid envelope (or not a valid payload for its schema)."""


class InvalidEnvelope(PermanentError):
    """A well-formed envelope the sink side refuses before applying anything: its ``origin``,
    ``kind`` or entity contradicts its subject (``evt.<entity>.<event>.<origin>``) or the flow,
    or its ``version`` is below 1 or beyond what a source could have produced (see
    ``ConsumerConfig.max_version_skew``). Forged or from a broken producer; ``field`` names the
    envelope field, ``got`` and ``expected`` the two values, and the message says all three. It
    is dead-lettered without touching the inbox, the sink or the version guard."""

    def __init__(self, field: str, got: object, expected: str):
        self.field = field
        self.got = got
        self.expected = expected
        # ``expected`` may quote the subject, which the sender chose: kept to one printable line.
        super().__init__(_printable(f"envelope {field} {got!r}: expected {expected}"))


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


def _printable(text: str) -> str:
    """``text`` with every unprintable character (line breaks, terminal escapes) written as its
    escape (``\\n``, ``\\x1b``): a message stays one line whatever a config key or a sender's
    subject holds."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class ConfigProblem(NamedTuple):
    """One thing wrong with a configuration: where (a field path such as ``flows[0].source.table``,
    or ``""`` for the file as a whole) and what."""

    path: str
    message: str


class ConfigError(MeshError):
    """The configuration is invalid: ``problems`` lists every (path, message) found, ``source``
    names the file (or other origin) they are in.

    Raised at load, the agent does not start. Raised at run time by a flow's adapter or mapping
    (a wrong password, a missing table or key column, an uninstalled capture trigger, an empty
    secret), it is not a bug: the flow reports ``failing`` with :meth:`lines` joined into one line,
    is retried on a slow backoff (``agents.delivery.CONFIG_RETRY``) and logs no traceback.

    ``str()`` renders one problem per line as ``file: path: message`` (parts that are empty are
    left out; unprintable characters in a path or message, such as a line break in a key, are
    written as escapes, so each problem is exactly one line), so a caller that needs the parts
    reads ``problems`` instead of parsing the text.
    ``ConfigError(message, path=...)`` is the one-problem form.
    """

    def __init__(
        self,
        message: str | None = None,
        *,
        source: str | None = None,
        path: str | None = None,
        problems: Iterable[tuple[str, str]] = (),
    ) -> None:
        listed = [ConfigProblem(_printable(p), _printable(m)) for p, m in problems]
        if message is not None:
            listed.insert(0, ConfigProblem(_printable(path or ""), _printable(message)))
        if not listed:
            raise ValueError("ConfigError needs a message or at least one problem")
        self.source = source
        self.problems: list[ConfigProblem] = list(dict.fromkeys(listed))
        super().__init__(self._render())

    @property
    def path(self) -> str | None:
        """The first problem's field path (None when it concerns the whole file)."""
        return self.problems[0].path or None

    def lines(self) -> list[str]:
        """Every problem as one ``file: path: message`` line."""
        return [": ".join(part for part in (self.source, p.path, p.message) if part) for p in self.problems]

    def _render(self) -> str:
        return "\n".join(self.lines())

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_config_error, (type(self), self.source, list(self.problems)))


def _rebuild_config_error(
    cls: type[ConfigError], source: str | None, problems: list[ConfigProblem]
) -> ConfigError:
    return cls(source=source, problems=problems)


class PluginError(ConfigError):
    """An installed adapter plugin cannot be used: its entry point does not load, does not name an
    adapter declaration, or declares a name another distribution already declared. The message
    names the entry point (``mesh.adapters:<name>``) and the distribution it comes from; fix the
    installation (uninstall or upgrade the distribution)."""


class StopError(MeshError):
    """The agent cannot continue safely and must stop (the supervisor does not restart it)."""
