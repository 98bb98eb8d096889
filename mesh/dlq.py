"""Operating on dead letters (``MESH_DLQ``) and replaying a flow from a point in ``MESH_EVENTS``.

A dead-letter entry is the original message bytes, published to ``dlq.<flow>`` with the headers
of a :class:`~mesh.envelope.DeadLetter` (``Mesh-Reason``, ``Mesh-Error-Class``, ``Mesh-Flow``,
``Mesh-Original-Subject``, ...) plus the original's own non-``Nats-`` headers.

Guarantees:

* **Reading never consumes.** :meth:`DeadLetters.scan` and :meth:`DeadLetters.get` read with
  :meth:`~mesh.transport.Transport.get_message` (the next message on a subject from a
  sequence, one message per request): no consumer is created, nothing is acked, and a missing
  or empty stream reads as no entries.
  A scan stops at the stream's last sequence as it was when the scan began.
* **Replay is idempotent inside the duplicate window.** :meth:`DeadLetters.replay` republishes
  an entry's original bytes to its original subject with ``Nats-Msg-Id: replay-<dlq seq>``, so
  replaying one entry twice within the window stores it once. The entry is deleted from the DLQ
  only after the PubAck (and not at all with ``keep``). The sink agent did not record the
  dead-lettered envelope id in its inbox, so the replayed copy applies once; any other sink on
  the same subject that already applied it sees a duplicate (inbox) or a stale version (guard).
* **Flow replay moves a consumer back, never forward.** :func:`replay_flow` resets the flow's
  durable consumer (``<flow>-<sink system>``) with
  :meth:`~mesh.transport.Transport.reset_consumer` (on JetStream: nats-server 2.14+) so it
  redelivers from a stream sequence; the running sink agent keeps its binding and passes
  everything through its inbox and version guard again, so nothing applies twice and no old
  version overwrites a newer one. A start beyond the consumer's ack floor would skip
  undelivered messages, so it is refused as a no-op.

Failures are :class:`~mesh.errors.TransportError` (server unreachable or not answering) or
:class:`DlqError` (no such entry, consumer or stream; a request the server refuses).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import msgspec

from mesh.config import NatsConfig
from mesh.envelope import DEAD_LETTER_HEADERS, DeadLetter, Envelope, decode
from mesh.errors import DecodeError, MeshError
from mesh.transport import (
    DLQ_STREAM,
    EVENTS_STREAM,
    ConsumerState,
    JetStream,
    NoResponders,
    NotFound,
    NotSupported,
    OutMessage,
    Refused,
    StoredMessage,
    Transport,
)

__all__ = [
    "DEFAULT_NATS_URL",
    "DLQ_HEADERS",
    "HTTP_HEADERS",
    "DeadLetters",
    "DlqEntry",
    "DlqError",
    "DlqFilter",
    "FlowReplay",
    "ReplayOutcome",
    "ReplayReport",
    "connect",
    "format_time",
    "parse_time",
    "replay_flow",
    "replay_msg_id",
]

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
"""Where the CLI connects when neither ``--server`` nor ``MESH_NATS_URL`` says otherwise."""

HTTP_HEADERS: frozenset[str] = frozenset({"Mesh-Http-Status", "Mesh-Request-Body", "Mesh-Response-Body"})
"""The headers only a dead letter from an HTTP target carries (status, request and response)."""

DLQ_HEADERS = DEAD_LETTER_HEADERS - HTTP_HEADERS
"""The headers every dead letter carries beyond the original's own
(:class:`~mesh.envelope.DeadLetter`); an HTTP target's add :data:`HTTP_HEADERS`."""

_RELATIVE = re.compile(r"(?:\d+(?:\.\d+)?[smhdw])+")
_RELATIVE_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_FRACTION = re.compile(r"\.(\d+)")
_ANY_DECODER = msgspec.msgpack.Decoder()


class DlqError(MeshError):
    """An operator request that cannot be carried out: no such entry, consumer or stream, or a
    request the server refuses. The message says which and what to do."""


def replay_msg_id(dlq_seq: int) -> str:
    """The ``Nats-Msg-Id`` of the replayed copy of DLQ entry ``dlq_seq`` (deterministic, so a
    second replay inside the duplicate window is dropped by JetStream)."""
    return f"replay-{dlq_seq}"


def parse_time(text: str, *, now: datetime | None = None) -> datetime:
    """A point in time from ISO-8601 (``2024-05-01T12:00:00Z``; naive means UTC) or from a
    duration ago (``30s``, ``15m``, ``2h``, ``1d``, ``1w``, combinable: ``1h30m``). Always UTC.

    Raises:
        ValueError: neither form; the message shows both.
    """
    value = text.strip()
    now = now or datetime.now(UTC)
    if _RELATIVE.fullmatch(value.lower()):
        seconds = sum(float(n) * _UNITS[u] for n, u in _RELATIVE_PART.findall(value.lower()))
        try:
            return now - timedelta(seconds=seconds)
        except OverflowError:
            raise ValueError(f"{text!r} reaches back before year 1") from None
    try:
        parsed = datetime.fromisoformat(_FRACTION.sub(lambda m: "." + m.group(1)[:6], value))
    except ValueError:
        raise ValueError(
            f"{text!r} is neither an ISO-8601 time (2024-05-01T12:00:00Z) "
            "nor a duration ago (30s, 15m, 2h, 1d, 1w)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def format_time(t: datetime) -> str:
    """``2024-05-01T12:00:00Z`` (UTC, whole seconds)."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _rfc3339(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class DlqEntry:
    """One message in ``MESH_DLQ``: its DLQ sequence and time, the original bytes and all headers.

    ``envelope`` is the decoded original when it is a valid envelope; otherwise
    ``decode_error`` says why not.
    """

    seq: int
    subject: str
    time: datetime
    data: bytes
    headers: Mapping[str, str]
    envelope: Envelope | None = None
    decode_error: str | None = None

    @classmethod
    def of(cls, seq: int, subject: str, time: datetime, data: bytes, headers: Mapping[str, str]) -> DlqEntry:
        """Build an entry, decoding the original envelope once (tolerating garbage)."""
        try:
            return cls(seq, subject, time, data, dict(headers), envelope=decode(data))
        except DecodeError as exc:
            return cls(seq, subject, time, data, dict(headers), decode_error=str(exc))

    @property
    def dead_letter(self) -> DeadLetter | None:
        """The dead-letter headers as one value; None when they are incomplete (a message
        published to ``dlq.*`` by something else)."""
        try:
            return DeadLetter.from_headers(self.headers)
        except DecodeError:
            return None

    @property
    def flow(self) -> str:
        return self.headers.get("Mesh-Flow") or self.subject.removeprefix("dlq.")

    @property
    def error_class(self) -> str:
        return self.headers.get("Mesh-Error-Class", "")

    @property
    def reason(self) -> str:
        return self.headers.get("Mesh-Reason", "")

    @property
    def attempts(self) -> int | None:
        return _int_or_none(self.headers.get("Mesh-Attempts"))

    @property
    def permanent(self) -> bool | None:
        value = self.headers.get("Mesh-Permanent")
        return None if value is None else value.lower() == "true"

    @property
    def original_subject(self) -> str:
        return self.headers.get("Mesh-Original-Subject", "")

    @property
    def original_seq(self) -> int | None:
        return _int_or_none(self.headers.get("Mesh-Original-Stream-Seq"))

    @property
    def original_msg_id(self) -> str:
        return self.headers.get("Mesh-Original-Msg-Id", "")

    @property
    def agent(self) -> str:
        return self.headers.get("Mesh-Agent", "")

    def original_headers(self) -> dict[str, str]:
        """The headers the original message carried (without the DLQ's and ``Nats-*`` ones)."""
        return {
            k: v
            for k, v in self.headers.items()
            if k not in DEAD_LETTER_HEADERS and not k.startswith("Nats-")
        }

    def payload_json(self) -> Any:
        """The envelope's payload as JSON-ready data (any msgpack value; bytes as base64, None
        for a nil payload).

        Raises:
            DecodeError: there is no envelope, or its payload is not msgpack.
        """
        if self.envelope is None:
            raise DecodeError(self.decode_error or "not an envelope")
        try:
            return msgspec.to_builtins(_ANY_DECODER.decode(self.envelope.payload), enc_hook=repr)
        except (msgspec.DecodeError, TypeError) as exc:
            raise DecodeError(f"payload is not msgpack: {exc}") from None

    @property
    def http(self) -> dict[str, Any] | None:
        """What an HTTP target answered (status, the request body sent, the response body;
        each body one line, at most 4 KiB, secrets masked), or None for other dead letters."""
        status = self.headers.get("Mesh-Http-Status")
        if status is None:
            return None
        return {
            "status": int(status) if status.isdigit() else status,
            "request_body": self.headers.get("Mesh-Request-Body", ""),
            "response_body": self.headers.get("Mesh-Response-Body", ""),
        }

    def summary(self) -> dict[str, Any]:
        """The entry as JSON-ready data: DLQ facts, the envelope's identity, the reason."""
        env = self.envelope
        return {
            "seq": self.seq,
            "time": _rfc3339(self.time),
            "flow": self.flow,
            "error": self.error_class,
            "permanent": self.permanent,
            "attempts": self.attempts,
            "agent": self.agent,
            "original_subject": self.original_subject,
            "original_seq": self.original_seq,
            "original_msg_id": self.original_msg_id,
            "reason": self.reason,
            "envelope": None
            if env is None
            else {
                "id": env.id,
                "kind": env.kind,
                "key": env.key,
                "version": env.version,
                "origin": env.origin,
            },
            "decode_error": self.decode_error,
            "size": len(self.data),
        }


@dataclass(frozen=True, slots=True)
class DlqFilter:
    """Which entries an operation touches. Every given criterion must hold; none means all.

    ``reason`` is a case-insensitive substring of ``Mesh-Reason``; ``error`` is the error
    class, case-insensitive; ``since``/``until`` bound the DLQ entry's time (inclusive).
    """

    flow: str | None = None
    reason: str | None = None
    error: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    @property
    def is_empty(self) -> bool:
        return all(v is None for v in (self.flow, self.reason, self.error, self.since, self.until))

    def matches(self, entry: DlqEntry) -> bool:
        if self.flow is not None and entry.flow != self.flow:
            return False
        if self.reason is not None and self.reason.lower() not in entry.reason.lower():
            return False
        if self.error is not None and entry.error_class.lower() != self.error.lower():
            return False
        if self.since is not None and entry.time < self.since:
            return False
        return not (self.until is not None and entry.time > self.until)


class ReplayOutcome(StrEnum):
    REPLAYED = "replayed"
    """Stored in the target stream (a new message)."""
    DUPLICATE = "duplicate"
    """Acknowledged as a duplicate: an earlier replay of this entry is inside the window."""
    FAILED = "failed"
    """Not acknowledged (or the DLQ entry could not be deleted); the entry stays."""
    SKIPPED = "skipped"
    """Not replayable: no original subject (or one that would loop back into the DLQ)."""


@dataclass(slots=True)
class ReplayReport:
    """Counts of one replay. ``duplicates`` are also counted in ``replayed``."""

    replayed: int = 0
    duplicates: int = 0
    failed: int = 0
    skipped: int = 0
    deleted: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class FlowReplay:
    """What :func:`replay_flow` did to one consumer."""

    consumer: str
    stream: str
    filter_subject: str
    reset: bool
    """False when nothing was changed (``note`` says why)."""
    from_seq: int
    """The stream sequence the next delivery is at or above (when ``reset``)."""
    pending: int
    """Messages the consumer has not yet delivered, after the reset."""
    ack_pending: int
    stream_last_seq: int
    note: str = ""


def connect(server: str, *, name: str = "meshctl", timeout: float = 5.0) -> JetStream:
    """A :class:`~mesh.transport.JetStream` for one server URL (``async with`` it to connect)."""
    return JetStream(
        NatsConfig(servers=[server], connect_timeout=min(timeout, 2.0), request_timeout=timeout), name=name
    )


async def _first_since(js: Transport, stream: str, since: datetime, subject: str) -> int | None:
    """The sequence of the first message on ``subject`` stored at or after ``since``; None if
    none (or no stream)."""
    try:
        message = await js.get_message(stream, subject=subject, since=since)
    except NotFound:
        return None
    return None if message is None else message.seq


class DeadLetters:
    """List, show, replay and purge the entries of the dead-letter stream.

    Use with a connected :class:`~mesh.transport.Transport` (JetStream, or in memory in
    tests); nothing here creates a consumer.
    """

    def __init__(self, js: Transport, *, stream: str = DLQ_STREAM) -> None:
        self.js = js
        self.stream = stream

    def __repr__(self) -> str:
        return f"<DeadLetters {self.stream} via {self.js!r}>"

    async def bounds(self) -> tuple[int, int, int] | None:
        """(first seq, last seq, message count) of the stream; None when it does not exist."""
        try:
            info = await self.js.stream_info(self.stream)
        except NotFound:
            return None
        return info.first_seq, info.last_seq, info.messages

    def _entry(self, m: StoredMessage | None) -> DlqEntry | None:
        return None if m is None else DlqEntry.of(m.seq, m.subject, m.time, m.data, m.headers)

    async def get(self, seq: int) -> DlqEntry:
        """The entry at ``seq``.

        Raises:
            DlqError: there is no such entry (or no DLQ stream).
        """
        if seq < 1:
            raise DlqError(f"no DLQ entry with seq {seq} (sequences start at 1)")
        try:
            entry = self._entry(await self.js.get_message(self.stream, seq=seq))
        except NotFound:
            entry = None
        if entry is None:
            raise DlqError(f"no DLQ entry with seq {seq} in {self.stream}")
        return entry

    async def scan(
        self, flt: DlqFilter = DlqFilter(), *, limit: int | None = None
    ) -> AsyncIterator[DlqEntry]:
        """The entries matching ``flt``, oldest first, up to ``limit``. Reads only."""
        bounds = await self.bounds()
        if bounds is None or bounds[2] == 0:
            return
        first, last, _ = bounds
        subject = f"dlq.{flt.flow}" if flt.flow is not None else ">"
        found = 0
        seq = first
        if flt.since is not None:
            start = await _first_since(self.js, self.stream, flt.since, subject)
            if start is None:
                return
            seq = start
        while seq <= last and (limit is None or found < limit):
            try:
                entry = self._entry(await self.js.get_message(self.stream, seq=seq, subject=subject))
            except NotFound:
                return
            if entry is None or entry.seq > last:
                return
            if flt.until is not None and entry.time > flt.until:
                return
            if flt.matches(entry):
                found += 1
                yield entry
            seq = entry.seq + 1

    async def select(
        self, flt: DlqFilter = DlqFilter(), seqs: Iterable[int] = (), *, limit: int | None = None
    ) -> list[DlqEntry]:
        """The entries at ``seqs`` (each must exist) that match ``flt``, or, without ``seqs``,
        every matching entry; oldest first, at most ``limit``.

        Raises:
            DlqError: one of ``seqs`` does not exist (nothing is returned then).
        """
        wanted = sorted(set(seqs))
        if not wanted:
            return [e async for e in self.scan(flt, limit=limit)]
        entries = [await self.get(s) for s in wanted]
        chosen = [e for e in entries if flt.matches(e)]
        return chosen if limit is None else chosen[:limit]

    async def delete(self, seq: int) -> bool:
        """Delete one entry; False when it was already gone."""
        return await self.js.delete_message(self.stream, seq)

    async def purge_all(self, up_to_seq: int) -> int:
        """Delete every entry with a sequence up to and including ``up_to_seq``; the count."""
        return await self.js.purge(self.stream, up_to_seq=up_to_seq)

    async def purge(self, entries: Iterable[DlqEntry]) -> int:
        """Delete these entries; the number actually deleted."""
        deleted = 0
        for e in entries:
            deleted += await self.delete(e.seq)
        return deleted

    async def replay_one(self, entry: DlqEntry, *, keep: bool = False) -> ReplayOutcome:
        """Republish one entry to its original subject; then (unless ``keep``) delete it."""
        subject = entry.original_subject
        if not subject or subject.startswith("dlq.") or subject == entry.subject:
            return ReplayOutcome.SKIPPED
        if entry.headers.get("Mesh-Stage") == "capture":
            # The source's own mapping refused the change: its raw row would only be refused
            # again downstream. Fix the mapping, then change the record at its source again.
            return ReplayOutcome.SKIPPED
        headers = {**entry.original_headers(), "Mesh-Replay-Of": f"{self.stream}:{entry.seq}"}
        try:
            ack = await self.js.publish_ack(
                OutMessage(subject, entry.data, replay_msg_id(entry.seq), headers)
            )
        except NoResponders as exc:
            raise DlqError(f"no stream stores subject {subject}") from exc
        if not keep:
            await self.delete(entry.seq)
        return ReplayOutcome.DUPLICATE if ack.duplicate else ReplayOutcome.REPLAYED

    async def replay(
        self,
        entries: Iterable[DlqEntry],
        *,
        keep: bool = False,
        progress: Callable[[DlqEntry, ReplayOutcome], None] | None = None,
    ) -> ReplayReport:
        """Replay entries in order; count the outcomes. Never raises for one entry's failure
        (it is counted and described in ``problems``); once the connection is lost the rest
        count as failed without being tried."""
        report = ReplayReport()
        for entry in entries:
            if not self.js.is_connected:
                outcome = ReplayOutcome.FAILED
                report.problems.append(f"seq {entry.seq}: not tried, the connection is lost")
            else:
                try:
                    outcome = await self.replay_one(entry, keep=keep)
                except MeshError as exc:
                    outcome = ReplayOutcome.FAILED
                    report.problems.append(f"seq {entry.seq}: {exc}")
            if outcome is ReplayOutcome.SKIPPED:
                report.skipped += 1
                if entry.headers.get("Mesh-Stage") == "capture":
                    report.problems.append(
                        f"seq {entry.seq}: skipped, refused by the capture side's mapping ({entry.reason}): "
                        "fix the flow's to_canonical mapping, then change the record at its source again "
                        "(it is captured anew)"
                    )
                else:
                    report.problems.append(f"seq {entry.seq}: skipped, no original subject to replay to")
            elif outcome is ReplayOutcome.FAILED:
                report.failed += 1
            else:
                report.replayed += 1
                report.duplicates += outcome is ReplayOutcome.DUPLICATE
                report.deleted += not keep
            if progress is not None:
                progress(entry, outcome)
        return report


async def _find_consumer(js: Transport, stream: str, flow: str, sink_system: str | None) -> ConsumerState:
    if sink_system is not None:
        name = f"{flow}-{sink_system}"
        try:
            return await js.consumer_info(stream, name)
        except NotFound:
            try:
                await js.stream_info(stream)
            except NotFound:
                raise DlqError(f"stream {stream} does not exist") from None
            raise DlqError(
                f"no consumer {name} on {stream}: is a sink agent of system {sink_system!r} "
                f"running flow {flow!r}?"
            ) from None
    try:
        infos = await js.consumers(stream)
    except NotFound:
        raise DlqError(f"stream {stream} does not exist") from None
    matching = [c for c in infos if c.name.startswith(f"{flow}-")]
    if not matching:
        known = ", ".join(sorted(c.name for c in infos)) or "none"
        raise DlqError(
            f"no consumer for flow {flow!r} on {stream} (expected {flow}-<sink system>; consumers: {known})"
        )
    if len(matching) > 1:
        names = ", ".join(sorted(c.name for c in matching))
        raise DlqError(f"flow {flow!r} has several consumers ({names}): choose one with --sink-system")
    return matching[0]


async def replay_flow(
    js: Transport,
    flow: str,
    *,
    sink_system: str | None = None,
    since: datetime | None = None,
    from_seq: int | None = None,
    stream: str = EVENTS_STREAM,
) -> FlowReplay:
    """Make the durable consumer ``<flow>-<sink system>`` redeliver from ``from_seq``, or from
    the first message on its filter at or after ``since``.

    Uses the consumer-reset API (nats-server 2.14+): the consumer keeps its name, config and
    bound subscribers; pending and redelivery counts are cleared and the next delivery is at or
    above the start sequence. Without ``sink_system`` the flow must have exactly one consumer.

    Raises:
        DlqError: no such consumer (or several), a server without consumer reset, a bad start,
            or the server refused the reset.
        TransportError: the server did not answer.
    """
    if (since is None) == (from_seq is None):
        raise DlqError("give exactly one of a start time (--since) or a stream sequence (--from-seq)")
    if from_seq is not None and from_seq < 1:
        raise DlqError(f"--from-seq must be 1 or more, got {from_seq}")
    info = await _find_consumer(js, stream, flow, sink_system)
    name = info.name
    filter_subject = info.filter_subject
    try:
        last_seq = (await js.stream_info(stream)).last_seq
    except NotFound:
        raise DlqError(f"stream {stream} does not exist") from None
    ack_floor = info.ack_floor

    def unchanged(start: int, note: str) -> FlowReplay:
        return FlowReplay(
            consumer=name, stream=stream, filter_subject=filter_subject, reset=False, from_seq=start,
            pending=info.num_pending, ack_pending=info.num_ack_pending, stream_last_seq=last_seq, note=note,
        )  # fmt: skip

    if since is not None:
        first = await _first_since(js, stream, since, filter_subject)
        if first is None:
            return unchanged(
                0, f"no message on {filter_subject} since {format_time(since)}: nothing to replay"
            )
        start = first
    else:
        assert from_seq is not None
        start = from_seq
    if start > ack_floor + 1:
        return unchanged(
            start,
            f"{name} has acknowledged only up to stream seq {ack_floor}; messages from {start} on are "
            "still to be delivered, and moving it forward would skip the ones before: nothing changed",
        )
    try:
        reset_seq = await js.reset_consumer(stream, name, start)
        after = await js.consumer_info(stream, name)
    except NotSupported as exc:
        raise DlqError(f"{exc}; replaying a flow needs the consumer reset API") from None
    except NotFound as exc:
        raise DlqError(f"consumer {name}: {exc}") from None
    except Refused as exc:
        raise DlqError(f"reset of consumer {name} refused: {exc}") from exc
    return FlowReplay(
        consumer=name,
        stream=stream,
        filter_subject=filter_subject,
        reset=True,
        from_seq=reset_seq,
        pending=after.num_pending,
        ack_pending=after.num_ack_pending,
        stream_last_seq=last_seq,
    )
