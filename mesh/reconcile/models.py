"""The reconciliation wire messages (JSON over NATS request/reply on
``<prefix>.reconcile.<agent>``, see :func:`reconcile_subject`) and the report.

A request names an ``op``:

* ``describe``: which sides of the flow the agent runs (``sides``; a two-way flow: both); a
  sink also says how it compares (its key column, the fields it writes and its
  ``from_canonical`` mapping), a source its system.

Every request may name the ``side`` it is for (an agent running both sides of a two-way flow
answers for that one); without it, the agent's source if it runs one, else its sink.
* ``digests``: stream every record of the side, in chunks of ``chunk`` rows, and answer the
  per-bucket count and hash (``buckets`` buckets by key hash).
* ``records``: the per-field hashes of the records in the buckets ``select``.
* ``restamp`` (source): emit the records with target keys ``keys`` again as new changes
  (a new version and envelope id, through the outbox: the normal path).
* ``delete`` (sink): delete the target records ``keys`` when ``origin`` may delete them.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from mesh.security.permissions import DEFAULT_PREFIX, validate_token

__all__ = [
    "Difference",
    "ReconcileReply",
    "ReconcileRequest",
    "Report",
    "TargetReport",
    "reconcile_subject",
]

Op = Literal["describe", "digests", "records", "restamp", "delete"]


def reconcile_subject(agent: str, prefix: str = DEFAULT_PREFIX) -> str:
    """``<prefix>.reconcile.<agent>``: where agent ``agent`` answers reconciliation requests.

    Raises:
        ConfigError: ``agent`` is not one subject token.
    """
    return f"{prefix}.reconcile.{validate_token(agent, 'agent name')}"


class ReconcileRequest(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    op: Op
    flow: str
    side: Literal["source", "sink", ""] = ""
    """The flow side asked (empty: the source if the agent runs one, else the sink)."""
    key_field: str = ""
    """The target's key column: records are matched by its value, as text."""
    fields: list[str] = []
    """The target-form fields compared (the sink's mapped columns)."""
    mapping: dict[str, Any] | None = None
    """The sink's ``from_canonical`` mapping (builtins): the source maps its rows through its own
    ``to_canonical`` and then this, so both sides hash the same target form."""
    buckets: int = 1024
    chunk: int = 1000
    select: list[int] = []
    keys: list[str] = []
    origin: str = ""
    """``delete``: the source system, whose right to delete the sink's ownership rules decide."""


class ReconcileReply(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    ok: bool = True
    message: str = ""
    side: Literal["source", "sink", ""] = ""
    sides: list[str] = []
    """``describe``: every side of the flow the agent runs (``side`` is the one described)."""
    system: str = ""
    key_field: str = ""
    fields: list[str] = []
    mapping: dict[str, Any] | None = None
    digests: dict[str, list[Any]] = {}
    """``{bucket: [count, hash]}`` (buckets without records are absent)."""
    records: dict[str, dict[str, str]] = {}
    """``{key: {field: hash}}``."""
    count: int = 0
    chunks: int = 0
    """How many chunk reads the side made for this answer."""
    done: int = 0
    """``restamp``/``delete``: how many records were re-emitted / deleted."""


class Difference(msgspec.Struct, frozen=True):
    key: str
    fields: list[str]


class TargetReport(msgspec.Struct, kw_only=True):
    """One sink of the flow compared with one source (``source``)."""

    agent: str
    system: str = ""
    source: str = ""
    """The source agent compared with this sink (a two-way flow has one pair per direction)."""
    source_count: int = 0
    target_count: int = 0
    missing: list[str] = []
    extra: list[str] = []
    different: list[Difference] = []
    requests: dict[str, int] = {}
    """Requests made per op (``digests``, ``records``)."""
    chunks: int = 0
    """Chunk reads the two agents made."""


class Report(msgspec.Struct, kw_only=True):
    """The ``--json`` document: ``missing``/``extra``/``different`` over every target (one
    target: exactly its lists), ``targets`` per sink, ``repaired`` what a repair did."""

    flow: str
    missing: list[str] = []
    extra: list[str] = []
    different: list[Difference] = []
    targets: list[TargetReport] = []
    repaired: dict[str, int] = {}
    kept_extra: list[str] = []
    """Extras a repair could not delete (ownership forbids the source's system to delete)."""

    @property
    def clean(self) -> bool:
        return not (self.missing or self.extra or self.different)
