"""What a contract driver is: capabilities, the driver interfaces, and shared test helpers.

A **driver** wraps one adapter and the real system behind it. It creates the system, changes
it (sources) or reads its state back (sinks), makes it go away and come back (``outage``), and
declares what the adapter can do. Every capability is either in ``capabilities`` or in
``lacks`` with a reason; a :class:`Lack` with ``gap=True`` marks something the contract asks for
and the adapter does not do yet (a finding, reported), ``gap=False`` something the system
cannot express. Tests that need a capability are generated only for drivers that have it
(``conftest.pytest_generate_tests``), so nothing is skipped.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self, TypeVar

import anyio
from anyio.abc import TaskGroup, TaskStatus

from mesh.adapters import Change, ChangeBatch, Sink, SinkRecord, Source
from mesh.broker import free_port
from mesh.envelope import envelope_id
from mesh.errors import SystemUnavailable

__all__ = [
    "BOUND",
    "FIELDS",
    "Env",
    "Lack",
    "RestartableServer",
    "SinkCap",
    "SinkDriver",
    "SourceCap",
    "SourceDriver",
    "collect",
    "eventually",
    "fields",
    "needs",
    "read_once",
    "rec",
    "row",
    "signature",
]

BOUND = 10.0
"""Seconds any single step of a contract test may take before the test fails (a hang is a bug)."""

FIELDS = ("name", "city")
"""The fields every driver's system holds besides the key (and, where it can refuse one, ``email``)."""

_T = TypeVar("_T")


class SourceCap(enum.Enum):
    """What a source can do beyond the always-tested core (inserts and updates captured with
    growing versions, the same cursor read twice gives the same changes, a blocking read that is
    cancellable and wakes up for a new change)."""

    DELETES = "deletes"
    """Deletes are captured (as ``Change.deleted``)."""
    EVERY_CHANGE = "every_change"
    """Every change is captured, in commit order; otherwise each read sees a record's latest state
    (changes between two reads of one record collapse into one)."""
    REWIND = "rewind"
    """A cursor older than one already read (but not committed) gives the same changes again."""
    RESUME = "resume"
    """After close and reopen, reading from the stored cursor loses nothing and repeats nothing
    committed."""
    OUTAGE_RAISES = "outage_raises"
    """While the system is away ``read`` raises SystemUnavailable; reading works again after it
    comes back."""
    OUTAGE_RIDDEN_OUT = "outage_ridden_out"
    """While the system is away ``read`` keeps blocking (the documented ride-out), then returns the
    changes once it is back."""


class SinkCap(enum.Enum):
    """What a sink can do beyond the always-tested core (apply; redelivery and older versions are
    STALE with no second write; deletes leave a tombstone that an older upsert cannot pass)."""

    UNCHANGED = "unchanged"
    """A newer record with the values the target already holds is UNCHANGED and writes nothing."""
    PARTIAL_ROWS = "partial_rows"
    """Fields absent from a record's row keep their value in the target."""
    UPDATE_ONLY = "update_only"
    """``SinkRecord.create = False`` updates an existing entity only (absent: UNCHANGED)."""
    SCOPES = "scopes"
    """Versions are compared per (key, scope) only."""
    POISON = "poison"
    """A record the target refuses yields RejectedRecord in its slot while the others apply."""
    OUTAGE_RAISES = "outage_raises"
    """While the system is away ``apply`` raises SystemUnavailable and applies nothing; it
    works again after the system comes back."""
    OUTAGE_RIDDEN_OUT = "outage_ridden_out"
    """While the system is away ``apply`` still succeeds (durably staged) and the records reach
    the system once it is back."""


@dataclass(frozen=True)
class Lack:
    """Why a driver does not have a capability."""

    reason: str
    gap: bool = False
    """True: the contract asks for it and the adapter falls short (a finding); False: the system
    (or the adapter's documented design) cannot do it."""


@dataclass
class Env:
    """What a driver may use: its temp dir and, for PostgreSQL drivers, the session cluster and a
    fresh database (resolved by the conftest only for drivers that need them)."""

    tmp_path: Path
    pg: Any = None
    """``tests._pg.PgCluster`` (PostgreSQL drivers only)."""
    pg_db: str = ""


class _Driver(abc.ABC):
    name: ClassVar[str]
    lacks: ClassVar[dict[Any, Lack]]
    uses_postgres: ClassVar[bool] = False
    """The conftest hands this driver the session's PostgreSQL cluster and a fresh database."""

    def __init__(self, env: Env) -> None:
        self.env = env

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Create the system (schema, server, directories)."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Tear the system down."""

    def outage(self) -> AbstractAsyncContextManager[None]:
        """The system is away inside the block and back (reachable again) after it."""
        raise NotImplementedError(f"{self!r} declares no outage")


class SourceDriver(_Driver):
    """A source adapter and the system it reads. Changes made through :meth:`upsert` and
    :meth:`delete` are committed in the system when the call returns."""

    capabilities: ClassVar[frozenset[SourceCap]]
    lacks: ClassVar[dict[SourceCap, Lack]]

    @abc.abstractmethod
    def source(self) -> Source:
        """A new, unopened Source on the system."""

    @abc.abstractmethod
    async def upsert(self, key: str, name: str, city: str) -> None:
        """Insert the entity ``key`` or update both its fields."""

    async def delete(self, key: str) -> None:
        """Delete the entity ``key`` (drivers with :attr:`SourceCap.DELETES`)."""
        raise NotImplementedError(f"{self!r} cannot delete")


class SinkDriver(_Driver):
    """A sink adapter and the system it writes; reads the target's state back."""

    capabilities: ClassVar[frozenset[SinkCap]]
    lacks: ClassVar[dict[SinkCap, Lack]]

    @abc.abstractmethod
    def sink(self) -> Sink:
        """A new, unopened Sink on the system."""

    @abc.abstractmethod
    async def state(self, sink: Sink) -> dict[str, dict[str, Any]]:
        """What the target holds: key -> the :data:`FIELDS` (None when empty)."""

    @abc.abstractmethod
    async def writes(self, sink: Sink) -> int:
        """Effective writes the target has seen so far (inserts, updates, deletes, file rows)."""

    def poison(self, key: str) -> dict[str, Any]:
        """A row the target refuses (drivers with :attr:`SinkCap.POISON`)."""
        raise NotImplementedError(f"{self!r} has no poison record")

    async def deliver(self, sink: Sink) -> bool:
        """Ride-out sinks: push what is staged to the system now; False if it is away."""
        raise NotImplementedError(f"{self!r} stages nothing")


def needs(*caps: SourceCap | SinkCap) -> Callable[[_T], _T]:
    """Generate the decorated test only for drivers that have every one of ``caps``."""

    def mark(fn: _T) -> _T:
        fn.contract_needs = frozenset(caps)  # type: ignore[attr-defined]
        return fn

    return mark


def row(key: str, name: str | None, city: str | None, **more: Any) -> dict[str, Any]:
    """A full row as the sinks get it (integer id, as a mapped ERP row would carry it)."""
    return {"id": int(key), "name": name, "city": city, **more}


def rec(
    key: str,
    version: int,
    data: dict[str, Any] | None = None,
    *,
    deleted: bool = False,
    scope: str = "",
    create: bool = True,
) -> SinkRecord:
    """A sink record with the envelope id the agent would give it (I2)."""
    origin = scope or "erp"
    return SinkRecord(
        id=envelope_id("contract", origin, key, version), key=key, version=version, deleted=deleted,
        row={} if deleted else (data if data is not None else {}), origin=origin, scope=scope,
        create=create,
    )  # fmt: skip


def fields(change: Change) -> dict[str, Any]:
    """The contract fields of a captured row."""
    return {f: change.row.get(f) for f in FIELDS}


def signature(changes: list[Change]) -> list[tuple[str, int, bool]]:
    """What must not differ between two reads of the same changes: key, version, delete."""
    return [(c.key, c.version, c.deleted) for c in changes]


async def collect(source: Source, cursor: str | None, n: int, *, limit: int = 2) -> tuple[list[Change], str]:
    """Read batches of at most ``limit`` until ``n`` changes arrived; then check that nothing
    more is waiting. Returns the changes and the last cursor."""
    got: list[Change] = []
    with anyio.fail_after(BOUND):
        while len(got) < n:
            batch = await source.read(cursor, limit)
            _check_batch(batch, limit)
            got += batch.changes
            cursor = batch.cursor
    assert cursor is not None
    with anyio.move_on_after(0.2):
        extra = await source.read(cursor, limit)
        raise AssertionError(f"more changes than expected: {signature(got)} then {signature(extra.changes)}")
    return got, cursor


async def read_once(source: Source, cursor: str | None, limit: int = 2) -> ChangeBatch:
    """One bounded read."""
    with anyio.fail_after(BOUND):
        batch = await source.read(cursor, limit)
    _check_batch(batch, limit)
    return batch


def _check_batch(batch: ChangeBatch, limit: int) -> None:
    assert batch.changes, "read() returned an empty batch"
    assert len(batch.changes) <= limit, f"{len(batch.changes)} changes for limit {limit}"


async def eventually(action: Callable[[], Awaitable[_T]]) -> _T:
    """``action`` retried while it raises SystemUnavailable (as the agent retries with backoff:
    a circuit breaker may still be cooling down right after the system came back)."""
    with anyio.fail_after(BOUND):
        while True:
            try:
                return await action()
            except SystemUnavailable:
                await anyio.sleep(0.05)


class RestartableServer:
    """Runs ``serve(host, port, task_status=...)`` on a fixed loopback port in a task group, and
    stops it (listener closed) and starts it again on the same port."""

    def __init__(self, tg: TaskGroup, serve: Any) -> None:
        self._tg = tg
        self._serve = serve
        self.port = free_port()
        self._scope: anyio.CancelScope | None = None
        self._done = anyio.Event()

    async def up(self) -> None:
        scope, done = anyio.CancelScope(), anyio.Event()

        async def run(*, task_status: TaskStatus[None]) -> None:
            try:
                with scope:
                    await self._serve("127.0.0.1", self.port, task_status=task_status)
            finally:
                done.set()

        await self._tg.start(run)
        self._scope, self._done = scope, done

    async def down(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
            await self._done.wait()
            self._scope = None
