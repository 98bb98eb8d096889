"""The two interfaces every adapter implements: Source (capture) and Sink (apply).

A **Source** reads a system's changes after an opaque cursor. It is *at-least-once and
resumable*: the connector stores the returned cursor in the same SQLite transaction as the
envelopes it made from the changes (I1), and after a crash asks again from the last stored
cursor, so the same changes come back with the same versions and therefore the same ids (I2).

A **Sink** applies records to a system *idempotently with a version guard*: a record whose
version is not newer than what the target holds for that key is skipped, never applied (I4, I5).
Sinks apply a whole batch in one transaction of the target where the system allows it.

Both are async context managers built on one idempotent ``aclose()``.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Sequence
from types import TracebackType
from typing import Any, ClassVar, Literal, Self

import msgspec

__all__ = ["Applied", "Change", "ChangeBatch", "RunRecord", "RunStatus", "Sink", "SinkRecord", "Source"]


class Change(msgspec.Struct, frozen=True, kw_only=True):
    """One captured change of one entity.

    ``version`` grows with every change of the same key (it need not be contiguous). ``row`` is
    the full row after the change; for a delete it holds at least the key column.
    """

    key: str
    version: int
    deleted: bool = False
    row: dict[str, Any] = msgspec.field(default_factory=dict)
    occurred_at: int = 0
    """Milliseconds since the epoch when the change happened (0: unknown, use capture time)."""
    correlation_id: str = ""
    """The business transaction this change belongs to, when the source knows it (a webhook's
    ``Mesh-Correlation-Id`` header); empty: capture starts a new one (README "Tracing")."""
    causation_id: str = ""
    """The id of the message that caused this change, when the source knows it."""
    traceparent: str = ""
    """The W3C ``traceparent`` the change arrived with; the envelope carries a child of it."""


class ChangeBatch(msgspec.Struct, frozen=True, kw_only=True):
    """Changes in capture order plus the cursor that resumes right after the last of them."""

    changes: list[Change]
    cursor: str
    run: str = ""
    """The scheduled bulk run the changes belong to (see :mod:`mesh.runs.bulk`): their envelope
    ids then derive from (flow, run, key, version) and carry the ``Mesh-Run`` header."""


class SinkRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One change to apply, as the sink sees it (decoded from an envelope)."""

    id: str
    key: str
    version: int
    deleted: bool
    row: dict[str, Any]
    """The fields to write. A sink writes exactly these columns/fields: ones absent from ``row``
    keep their current value in the target (an insert leaves them at their defaults). Ownership
    rules may have removed fields another system owns before the sink sees the record."""
    origin: str
    scope: str = ""
    """Which version sequence ``version`` belongs to. Versions are compared only within one
    (key, scope): flows that take changes of one entity from several systems (ownership rules)
    set the origin here, because one system's versions say nothing about another's."""
    create: bool = True
    """False: update the row only if it exists (the origin does not own the entity's existence,
    so it may not create it); an absent row makes the record UNCHANGED."""


class Applied(enum.Enum):
    """What a sink did with one record."""

    APPLIED = "applied"
    """Written to the target (insert, update or delete took effect)."""
    STALE = "stale"
    """Skipped by the version guard: the target already holds this version or a newer one."""
    UNCHANGED = "unchanged"
    """Newer, but the target already held exactly these values: nothing was written, so the
    target's own change capture sees no change (this is what lets two-way sync fall silent).
    The version guard still advances."""


class Source(abc.ABC):
    """Reads one system's changes, resumable from a cursor. At-least-once."""

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Connect and prepare (install change capture if configured).

        Raises:
            SystemUnavailable: the system cannot be reached now.
            ConfigError: the table or columns named in the config do not exist.
        """

    @abc.abstractmethod
    async def read(self, cursor: str | None, limit: int) -> ChangeBatch:
        """Return up to ``limit`` changes after ``cursor`` (``None``: from the beginning).

        Blocks until at least one change exists and is cancellable while it waits; it never
        returns an empty batch.

        Raises:
            SystemUnavailable: the system went away; the caller retries later from the same cursor.
        """

    async def committed(self, cursor: str) -> None:  # noqa: B027 - optional hook
        """Everything up to ``cursor`` is durable in the outbox; the source may prune it."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release connections. Idempotent."""


class Sink(abc.ABC):
    """Applies changes to one system, idempotently and with a per-key version guard."""

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Connect and prepare (create the version-guard table if needed).

        Raises:
            SystemUnavailable: the system cannot be reached now.
            ConfigError: the target table does not exist and may not be created.
        """

    @abc.abstractmethod
    async def apply(self, records: Sequence[SinkRecord]) -> list[Applied | Exception]:
        """Apply ``records`` in order, returning one outcome per record.

        A record the target refuses yields a :class:`~mesh.errors.RejectedRecord` in its slot
        while the others still apply. The whole batch is durable in the target when this returns.

        Raises:
            SystemUnavailable: nothing was applied; the caller retries the batch later.
        """

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release connections. Idempotent."""

    keeps_inbox: ClassVar[bool] = False
    """Whether the sink records handled envelope ids in the target itself, in the transaction of
    the write (:meth:`apply_recording`, :meth:`handled`, :meth:`forget_handled`). The agent then
    asks the sink, not its own inbox, what it already handled: one commit per batch, and a
    redelivery after a crash between the commit and the ack is recognised from the target."""

    async def apply_recording(
        self, records: Sequence[SinkRecord], flow: str, skipped: Sequence[tuple[str, str, str, int, str]]
    ) -> list[Applied | Exception]:
        """:meth:`apply`, recording in the same transaction ``skipped`` and, for every record
        whose outcome is not an exception, ``(record.id, flow, record.key,
        record.version, outcome.value)`` (only when :attr:`keeps_inbox`).

        Raises:
            SystemUnavailable: nothing was applied nor recorded.
        """
        raise NotImplementedError(f"{type(self).__name__} keeps no inbox")

    async def handled(self, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` :meth:`apply_recording` recorded (only when :attr:`keeps_inbox`).

        Raises:
            SystemUnavailable: the target cannot be read now.
        """
        raise NotImplementedError(f"{type(self).__name__} keeps no inbox")

    async def forget_handled(self, older_than: float) -> int:
        """Forget ids recorded more than ``older_than`` seconds ago; returns how many."""
        return 0


RunStatus = Literal["running", "complete", "failed", "duplicate"]


class RunRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One batch run of an adapter (an import or an export of one file, for the CSV adapters):
    what ``meshctl files runs`` lists for adapters with the ``runs`` capability."""

    id: int
    direction: Literal["import", "export"]
    file: str
    checksum: str | None
    status: RunStatus
    started_at: float
    """Seconds since the epoch."""
    finished_at: float | None
    rows_in: int
    rows_out: int
    rows_failed: int
    detail: str = ""
    rejects_file: str | None = None
    moved_to: str | None = None
    """Where an imported file went (``done_dir`` / ``failed_dir``); None when left in place."""
