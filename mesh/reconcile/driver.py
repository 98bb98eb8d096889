"""The comparing side of reconciliation (``meshctl reconcile``): asks the agents of a flow for
their digests over NATS, drills into the buckets that differ, and repairs.

Merkle-style in two levels: ``digests`` gives one (count, hash) per key bucket from each side;
only buckets whose pairs differ are asked for per-record field hashes (``records``), grouped so
that one answer holds about ``chunk`` records. A million equal rows cost two streaming scans and
two small answers; a handful of drifted rows add one ``records`` round per side.

The comparison runs per (source side, sink side) pair: every agent running the flow's source
against every other agent running its sink whose system differs (a sink never applies its own
system's events). A one-way flow has one source and one pair per target; a two-way flow whose
agents each run both sides has one pair per direction.

Repair (:func:`repair`) goes through the normal delivery path: the source re-emits missing and
different records as new changes (new version, new envelope id: neither the inbox nor the version
guard drops them, I2/I4/I5), the sink deletes extras when the flow's ownership lets the source's
system delete; :func:`reconcile` is then run again until clean or ``wait`` seconds pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import anyio
import msgspec

from mesh.errors import MeshError
from mesh.reconcile.models import (
    Difference,
    ReconcileReply,
    ReconcileRequest,
    Report,
    TargetReport,
    reconcile_subject,
)
from mesh.security.permissions import DEFAULT_PREFIX
from mesh.transport import NoReply, NoResponders, Transport

__all__ = ["Pair", "ReconcileError", "Reconciler"]

_reply = msgspec.json.Decoder(ReconcileReply)
PER_ANSWER = 2000
"""At most this many records (or keys) per answer or request, whatever ``chunk``: every message
stays well under NATS' default 1 MB payload limit."""
_encode = msgspec.json.Encoder().encode


class ReconcileError(MeshError):
    """Reconciliation cannot run: no source or sink answers, or an agent refused (one line)."""


class Pair(NamedTuple):
    """One source side and one sink side of the flow, compared with each other."""

    source: str
    source_system: str
    sink: str
    described: ReconcileReply
    """The sink's ``describe`` answer, with the fields the source's system may write."""


class Reconciler:
    """Compares flow ``flow`` across ``agents`` (the agents that run its sides) over ``transport``.

    ``buckets``: key buckets of the first round; ``chunk``: rows per read and records per answer;
    ``timeout``: seconds per request (a scan of a large table needs it generous).
    """

    def __init__(
        self,
        transport: Transport,
        flow: str,
        agents: Sequence[str],
        *,
        prefix: str = DEFAULT_PREFIX,
        buckets: int = 1024,
        chunk: int = 1000,
        timeout: float = 120.0,
    ) -> None:
        self.transport, self.flow, self.agents = transport, flow, list(agents)
        self.prefix, self.buckets, self.chunk, self.timeout = prefix, buckets, chunk, timeout
        self.source = ""
        """The first source agent (a two-way flow has several: see :attr:`pairs`)."""
        self.source_system = ""
        self.sinks: dict[str, ReconcileReply] = {}
        """Sink agent -> its ``describe`` answer (for the last source it was paired with)."""
        self.pairs: list[Pair] = []

    def __repr__(self) -> str:
        pairs = [f"{p.source}->{p.sink}" for p in self.pairs]
        return f"<Reconciler {self.flow} pairs={pairs or '?'}>"

    async def ask(self, agent: str, req: ReconcileRequest) -> ReconcileReply:
        """One request and its successful reply.

        Raises:
            ReconcileError: the agent did not answer, or answered with a failure.
        """
        reply = await self._request(agent, req, quiet=False)
        assert reply is not None  # only a quiet request returns None
        return reply

    async def _request(self, agent: str, req: ReconcileRequest, *, quiet: bool) -> ReconcileReply | None:
        """:meth:`ask`, but None when ``quiet`` and the agent does not answer or runs no side."""
        subject = reconcile_subject(agent, self.prefix)
        try:
            msg = await self.transport.request(subject, _encode(req), timeout=self.timeout)
        except (NoResponders, NoReply) as exc:
            if quiet:
                return None
            raise ReconcileError(f"agent {agent} does not answer on {subject}: {exc}") from None
        try:
            reply = _reply.decode(msg.data)
        except msgspec.DecodeError as exc:
            raise ReconcileError(f"agent {agent}: unreadable reconcile reply: {exc}") from None
        if not reply.ok:
            if quiet and "does not run flow" in reply.message:
                return None
            raise ReconcileError(reply.message)
        return reply

    async def describe(self) -> None:
        """Find the flow's sources and sinks among the agents, and pair them.

        Raises:
            ReconcileError: no source, or no sink of another system, answers for the flow.
        """
        sources: dict[str, str] = {}
        sinks: list[str] = []
        systems: dict[str, str] = {}
        for agent in self.agents:
            reply = await self._request(agent, ReconcileRequest(op="describe", flow=self.flow), quiet=True)
            if reply is None:
                continue
            systems[agent] = reply.system
            sides = reply.sides or [reply.side]  # an agent of before two-way reconcile: one side
            if "source" in sides:
                sources[agent] = reply.system
            if "sink" in sides:
                sinks.append(agent)
        if not sources:
            raise ReconcileError(
                f"flow {self.flow}: reconcile needs a source agent (found none among "
                f"{', '.join(self.agents) or 'no agents'}); name them with --agent"
            )
        self.pairs, self.sinks = [], {}
        for source, system in sources.items():
            for agent in sinks:
                if agent == source or systems.get(agent) == system:
                    continue  # a sink does not apply its own system's events
                # naming the source's system: a sink with ownership rules then compares only the
                # fields that system may write
                req = ReconcileRequest(op="describe", flow=self.flow, side="sink", origin=system)
                described = await self.ask(agent, req)
                self.pairs.append(Pair(source, system, agent, described))
                self.sinks[agent] = described
        if not self.pairs:
            raise ReconcileError(
                f"flow {self.flow}: no sink agent of another system answers (asked {', '.join(self.agents)})"
            )
        self.source, self.source_system = self.pairs[0].source, self.pairs[0].source_system

    def _spec(self, sink: ReconcileReply, **kw: Any) -> ReconcileRequest:
        return ReconcileRequest(
            flow=self.flow, key_field=sink.key_field, fields=sink.fields, mapping=sink.mapping,
            buckets=self.buckets, chunk=self.chunk, **kw,
        )  # fmt: skip

    async def compare(self) -> Report:
        """One comparison of the source with every sink (:meth:`describe` first if not done).

        Raises:
            ReconcileError: see :meth:`ask` and :meth:`describe`.
        """
        if not self.pairs:
            await self.describe()
        report = Report(flow=self.flow)
        for pair in sorted(self.pairs, key=lambda p: (p.sink, p.source)):
            report.targets.append(await self._compare_one(pair))
        missing: set[str] = set()
        extra: set[str] = set()
        different: dict[str, set[str]] = {}
        for t in report.targets:
            missing.update(t.missing)
            extra.update(t.extra)
            for d in t.different:
                different.setdefault(d.key, set()).update(d.fields)
        report.missing, report.extra = _sorted_keys(missing), _sorted_keys(extra)
        report.different = [Difference(k, sorted(different[k])) for k in _sorted_keys(different)]
        return report

    async def _compare_one(self, pair: Pair) -> TargetReport:
        agent, sink, source = pair.sink, pair.described, pair.source
        t = TargetReport(
            agent=agent, system=sink.system, source=source, requests={"digests": 0, "records": 0}
        )
        src = await self.ask(source, self._spec(sink, op="digests", side="source"))
        dst = await self.ask(agent, self._spec(sink, op="digests", side="sink"))
        t.requests["digests"] += 2
        t.chunks += src.chunks + dst.chunks
        t.source_count, t.target_count = src.count, dst.count
        differing = sorted(
            int(b) for b in set(src.digests) | set(dst.digests) if src.digests.get(b) != dst.digests.get(b)
        )
        for group in self._groups(differing, src, dst):
            s = await self.ask(source, self._spec(sink, op="records", select=group, side="source"))
            d = await self.ask(agent, self._spec(sink, op="records", select=group, side="sink"))
            t.requests["records"] += 2
            t.chunks += s.chunks + d.chunks
            t.missing += [k for k in s.records if k not in d.records]
            t.extra += [k for k in d.records if k not in s.records]
            for k, fields in s.records.items():
                theirs = d.records.get(k)
                if theirs is not None and theirs != fields:
                    names = sorted(f for f in set(fields) | set(theirs) if fields.get(f) != theirs.get(f))
                    t.different.append(Difference(k, names))
        t.missing, t.extra = _sorted_keys(t.missing), _sorted_keys(t.extra)
        t.different.sort(key=lambda d: _key_order(d.key))
        return t

    def _groups(self, buckets: list[int], src: ReconcileReply, dst: ReconcileReply) -> list[list[int]]:
        """Differing buckets in groups of about ``chunk`` records (at most :data:`PER_ANSWER`,
        by the larger side's counts)."""
        limit = min(self.chunk, PER_ANSWER)
        groups: list[list[int]] = []
        current: list[int] = []
        size = 0
        for b in buckets:
            n = max(src.digests.get(str(b), [0])[0], dst.digests.get(str(b), [0])[0])
            if current and size + n > limit:
                groups.append(current)
                current, size = [], 0
            current.append(b)
            size += n
        if current:
            groups.append(current)
        return groups

    async def repair(self, report: Report) -> dict[str, int]:
        """Re-emit missing and different records from the source; delete extras where allowed
        (the rest land in ``report.kept_extra``). Counts by action.

        Two-way flows: each key is re-emitted by one source only (the first in ``agents``
        order whose target misses it or differs), and a key that a source holds is never deleted
        as an extra of another direction: it is propagated instead. (Without tombstones a record
        deleted behind the mesh's back on one side cannot be told from one created on the other:
        it comes back.)

        Raises:
            ReconcileError: see :meth:`ask` (an ownership refusal of a delete is not an error).
        """
        done = {"reemitted": 0, "deleted": 0}
        pairs = {(p.source, p.sink): p for p in self.pairs}
        # Per source: the keys its targets miss or hold differently, each key re-emitted by ONE
        # source: in a two-way flow a key differing in both directions would otherwise be sent
        # both ways and swap; the first source in ``agents`` order wins.
        order = {a: i for i, a in enumerate(self.agents)}
        resend: dict[str, tuple[ReconcileReply, set[str]]] = {}
        claimed: set[str] = set()
        for t in sorted(report.targets, key=lambda t: (order.get(t.source, len(order)), t.source)):
            pair = pairs[(t.source, t.agent)]
            fresh = {*t.missing, *(d.key for d in t.different)} - claimed
            claimed |= fresh
            resend.setdefault(t.source, (pair.described, set()))[1].update(fresh)
        # A key some target misses exists at a source: in a two-way flow it is "extra" in the
        # other direction, and is propagated (above), not deleted.
        sourced = {k for t in report.targets for k in t.missing}
        for source, (described, wanted) in sorted(resend.items()):
            ordered = sorted(wanted, key=_key_order)
            for start in range(0, len(ordered), PER_ANSWER):
                keys = ordered[start : start + PER_ANSWER]
                req = self._spec(described, op="restamp", keys=keys, side="source")
                done["reemitted"] += (await self.ask(source, req)).done
        for t in report.targets:
            pair = pairs[(t.source, t.agent)]
            extra = [k for k in t.extra if k not in sourced]
            for start in range(0, len(extra), PER_ANSWER):
                keys = extra[start : start + PER_ANSWER]
                req = self._spec(
                    pair.described, op="delete", keys=keys, origin=pair.source_system, side="sink"
                )
                try:
                    reply = await self.ask(t.agent, req)
                except ReconcileError as exc:
                    if "ownership" not in str(exc):
                        raise
                    report.kept_extra += keys
                    continue
                done["deleted"] += reply.done
        return done

    async def run(self, *, repair: bool = False, wait: float = 60.0, poll: float = 0.5) -> Report:
        """Compare; with ``repair``, repair and compare again until the report is clean (extras
        ownership keeps aside) or ``wait`` seconds pass. The last report, ``repaired`` filled in.

        Raises:
            ReconcileError: see :meth:`compare`.
        """
        report = await self.compare()
        if not repair or report.clean:
            return report
        repaired = await self.repair(report)
        kept = list(report.kept_extra)
        with anyio.move_on_after(wait):
            while True:
                report = await self.compare()
                if not (report.missing or report.different or set(report.extra) - set(kept)):
                    break
                await anyio.sleep(poll)  # the repair travels through the outbox and the stream
        report.repaired, report.kept_extra = repaired, kept
        return report


def _key_order(key: str) -> tuple[int, int | str]:
    """Numeric keys in numeric order, then the others as text."""
    return (0, int(key)) if key.lstrip("-").isdigit() and len(key) < 19 else (1, key)


def _sorted_keys(keys: Any) -> list[str]:
    return sorted(keys, key=_key_order)
