"""Business transactions, derived from trace records: their path and their status.

A transaction is everything that shares one correlation id. :class:`TxnIndex` holds the records
of the most recent transactions in memory (bounded), finds a transaction by its correlation id,
by the id of any envelope in it, or by a business key (``customer:ALFKI``), and derives its
status (README "Tracing business transactions"):

* ``failed``: a message of it is dead-lettered (and not applied since, e.g. by a DLQ replay), an
  API call failed for good (an error that is not retryable), or its saga failed without
  compensating;
* ``compensated``: its saga ran its compensations to the end (``saga_compensated``);
* ``completed``: every envelope captured or published in it has been applied (any final sink
  outcome: applied, unchanged, stale, duplicate, not_owner, filtered) by every sink expected to
  consume it (the durable consumers on its entity, but its own system's; when unknown, by at
  least one sink), nothing is dead-lettered, every started saga completed, and every API call
  succeeded (``ok``, or ``replayed``: the answer of an earlier call with its idempotency key);
* ``in_progress``: anything else (captured but not published yet, published and not applied
  yet, a saga still running).

The control plane and ``meshctl trace`` build the same index from the stream (see
:mod:`mesh.trace.query`). Pure code, no I/O.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import msgspec

from mesh.trace.records import TraceRecord
from mesh.transport.subjects import consumer_name

__all__ = [
    "STATUSES",
    "Expected",
    "Transaction",
    "TransactionsView",
    "TxnIndex",
    "TxnStatus",
    "TxnSummary",
    "derive_status",
]

TxnStatus = Literal["in_progress", "completed", "failed", "compensated"]
Expected = Callable[[str, str], frozenset[str]]
"""(entity, origin system) -> the durable consumers (``<flow>-<sink system>``) that apply it."""
STATUSES: tuple[str, ...] = ("in_progress", "completed", "failed", "compensated")

_MAX_RECORDS = 500
"""Records kept per transaction (its first ones: a runaway loop cannot eat the memory)."""


_RETRYABLE = frozenset({"unavailable", "timeout", "deadline_exceeded"})
"""API call outcomes a retry may cure: not a failure of the transaction (the caller retries)."""

_STAGE = {"captured": 0, "published": 1, "api_call": 2, "saga_step": 2, "applied": 3, "dead_lettered": 4}


def _order(r: TraceRecord) -> tuple[int, int]:
    return r.at, _STAGE.get(r.kind, 2)


class TxnSummary(msgspec.Struct, frozen=True, kw_only=True):
    """One transaction in a listing (``/status``, ``meshctl trace --status``)."""

    correlation_id: str
    status: str
    started: int
    updated: int
    business_keys: list[str]
    systems: list[str]
    records: int
    reason: str = ""


class TransactionsView(msgspec.Struct, frozen=True, kw_only=True):
    """Business transactions in ``/status``: how many have each status, the latest failures."""

    counts: dict[str, int]
    """``in_progress``, ``completed``, ``failed``, ``compensated`` (always all four)."""
    recent_failed: list[TxnSummary]
    """The last failed transactions, newest first (at most 10)."""
    indexed: int = 0
    """Transactions held in memory (the oldest go beyond ``max_transactions``)."""
    forged: int = 0
    """Records refused because they claimed another agent than their subject's."""


@dataclass(eq=False)
class Transaction:
    """The records of one correlation id, in time order."""

    correlation_id: str
    records: list[TraceRecord] = field(default_factory=list)
    dropped: int = 0
    expected: Expected | None = None
    _status: tuple[TxnStatus, str] | None = None

    def add(self, r: TraceRecord) -> None:
        self._status = None
        if len(self.records) >= _MAX_RECORDS:
            self.dropped += 1
            return
        key = _order(r)
        if self.records and key < _order(self.records[-1]):
            # Records of several agents arrive out of order: keep the list sorted by time (and,
            # within one millisecond, by the order of the journey).
            i = len(self.records)
            while i and _order(self.records[i - 1]) > key:
                i -= 1
            self.records.insert(i, r)
        else:
            self.records.append(r)

    @property
    def started(self) -> int:
        return self.records[0].at if self.records else 0

    @property
    def updated(self) -> int:
        return self.records[-1].at if self.records else 0

    def status(self) -> tuple[TxnStatus, str]:
        """(status, reason), derived once per change (see :func:`derive_status`)."""
        if self._status is None:
            self._status = derive_status(self.records, self.expected)
        return self._status

    def summary(self) -> TxnSummary:
        status, reason = self.status()
        keys = sorted({r.business_key for r in self.records if r.business_key})
        systems = sorted({r.system for r in self.records if r.system})
        return TxnSummary(
            correlation_id=self.correlation_id, status=status, started=self.started, updated=self.updated,
            business_keys=keys, systems=systems, records=len(self.records), reason=reason,
        )  # fmt: skip


def derive_status(records: list[TraceRecord], expected: Expected | None = None) -> tuple[TxnStatus, str]:
    """The status of a transaction made of ``records`` (time order) and, for ``failed`` and
    ``compensated``, the reason; the rules are in the module docstring. ``expected`` names the
    sinks (durable consumers ``<flow>-<system>``) that must apply an envelope of an entity from
    an origin; without it (or when it names none), one sink is enough."""
    published: set[str] = set()
    applied: set[str] = set()
    applied_by: dict[str, set[str]] = {}
    origin_of: dict[str, tuple[str, str]] = {}
    dead: dict[str, str] = {}
    sagas_open = 0
    saga_failed = ""
    compensated = ""
    api_failed = ""
    api_open = 0
    for r in records:
        k = r.kind
        if k in ("captured", "published"):
            published.add(r.envelope_id)  # captured: on its way, it must be applied too
            if k == "captured" and r.business_key:
                origin_of[r.envelope_id] = (r.business_key.partition(":")[0], r.system)
        elif k == "applied":
            applied.add(r.envelope_id)
            applied_by.setdefault(r.envelope_id, set()).add(consumer_name(r.flow, r.system))
            dead.pop(r.envelope_id, None)  # a replayed dead letter that now applied
        elif k == "dead_lettered":
            dead[r.envelope_id] = r.detail or "dead-lettered"
        elif k == "api_call":
            if r.outcome == "started":
                api_open += 1
            elif r.outcome in ("ok", "replayed"):
                api_open = max(0, api_open - 1)
            else:
                api_open = max(0, api_open - 1)
                if r.outcome not in _RETRYABLE:
                    api_failed = f"{r.detail or 'API call'}: {r.outcome}"
        elif k == "saga_step":
            if r.outcome == "saga_started":
                sagas_open += 1
            elif r.outcome == "saga_completed":
                sagas_open = max(0, sagas_open - 1)
            elif r.outcome == "saga_compensated":
                sagas_open = max(0, sagas_open - 1)
                compensated = r.detail or "compensated"
            elif r.outcome == "saga_failed":
                sagas_open = max(0, sagas_open - 1)
                saga_failed = r.detail or "saga failed"
    if compensated:
        return "compensated", compensated
    if dead:
        eid, reason = next(iter(dead.items()))
        return "failed", f"{eid} dead-lettered: {reason}"
    if saga_failed:
        return "failed", saga_failed
    if api_failed:
        return "failed", api_failed
    pending = published - applied
    if expected is not None and not pending:
        for eid, (entity, origin) in origin_of.items():
            if not expected(entity, origin) <= applied_by.get(eid, set()):
                pending.add(eid)
                break
    if not records or pending or sagas_open or api_open:
        return "in_progress", ""
    return "completed", ""


class TxnIndex:
    """The most recent ``max_transactions`` transactions, by correlation id, envelope id and
    business key. ``forged`` counts records refused because their ``agent`` is not the one in
    their subject."""

    def __init__(self, max_transactions: int = 100_000, expected: Expected | None = None) -> None:
        self.max_transactions = max_transactions
        self.expected = expected
        """Which sinks must apply an envelope (see :func:`derive_status`)."""
        self.txns: OrderedDict[str, Transaction] = OrderedDict()
        self.by_envelope: dict[str, str] = {}
        self.by_key: dict[str, list[str]] = {}
        self.records = 0
        self.forged = 0
        self.last_seq = 0
        self._counts = dict.fromkeys(STATUSES, 0)
        self._failed: OrderedDict[str, None] = OrderedDict()
        """Failed transactions, the latest to fail last (``/status`` lists them without a scan)."""

    def __repr__(self) -> str:
        return f"<TxnIndex transactions={len(self.txns)} records={self.records}>"

    def add(self, r: TraceRecord, *, subject_agent: str | None = None) -> None:
        """Index one record; with ``subject_agent`` (the agent token of the subject it came on),
        a record claiming another agent is refused (counted in ``forged``)."""
        if subject_agent is not None and r.agent != subject_agent:
            self.forged += 1
            return
        corr = r.correlation_id or (self.by_envelope.get(r.envelope_id, "") if r.envelope_id else "")
        corr = corr or r.envelope_id
        if not corr:
            return
        txn = self.txns.get(corr)
        old: str | None = None
        if txn is None:
            txn = self.txns[corr] = Transaction(corr, expected=self.expected)
            if len(self.txns) > self.max_transactions:
                self._evict()
        else:
            self.txns.move_to_end(corr)
            old = txn.status()[0]
        txn.add(r)
        self.records += 1
        new = txn.status()[0]  # kept current, so that counts and listings never scan
        if old is not None:
            self._counts[old] -= 1
        self._counts[new] += 1
        if new == "failed":
            self._failed[corr] = None
            self._failed.move_to_end(corr)
        elif old == "failed":
            self._failed.pop(corr, None)
        if r.envelope_id:
            self.by_envelope.setdefault(r.envelope_id, corr)
        if r.business_key:
            ids = self.by_key.setdefault(r.business_key, [])
            if corr not in ids:
                ids.append(corr)

    def _evict(self) -> None:
        corr, txn = self.txns.popitem(last=False)
        if txn.records:
            self._counts[txn.status()[0]] -= 1
        self._failed.pop(corr, None)
        for r in txn.records:
            if self.by_envelope.get(r.envelope_id) == corr:
                del self.by_envelope[r.envelope_id]
            ids = self.by_key.get(r.business_key)
            if ids is not None and corr in ids:
                ids.remove(corr)
                if not ids:
                    del self.by_key[r.business_key]

    def find(self, ident: str) -> list[Transaction]:
        """The transactions ``ident`` names: a correlation id, an envelope id or a business key
        (``<entity>:<key>``; every transaction that touched it, oldest first)."""
        if ident in self.txns:
            return [self.txns[ident]]
        corr = self.by_envelope.get(ident)
        if corr is not None and corr in self.txns:
            return [self.txns[corr]]
        found = [self.txns[c] for c in self.by_key.get(ident, []) if c in self.txns]
        return sorted(found, key=lambda t: t.started)

    def list(self, status: str | None = None, since_ms: int = 0, limit: int = 100) -> list[TxnSummary]:
        """The most recently touched transactions (updated at or after ``since_ms``, of
        ``status`` if given), newest first, at most ``limit``."""
        out: list[TxnSummary] = []
        # The most recently touched first: for "failed" only the failed ones are visited.
        for corr in reversed(self._failed if status == "failed" else self.txns):
            txn = self.txns[corr]
            if txn.updated < since_ms or (status is not None and txn.status()[0] != status):
                continue
            out.append(txn.summary())
            if len(out) >= limit:
                break
        out.sort(key=lambda s: s.updated, reverse=True)
        return out

    def counts(self) -> dict[str, int]:
        """How many transactions have each status (kept as records arrive: no scan)."""
        return dict(self._counts)
