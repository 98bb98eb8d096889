"""The saga engine: starts sagas from their triggers and advances them, durably and shared.

Guarantees (README "Orchestration (sagas)"):

* **Durable.** Every transition is saved (compare-and-swap on the saga's ``mesh_sagas`` key)
  before the engine acts on it, and each attempt is saved before it starts. A replica killed
  anywhere leaves the saga at its last saved transition; whoever claims it next carries on from
  there.
* **One runner per saga.** A replica runs a saga only while it holds the saga's lease (owner +
  ``lease_until`` in the record, renewed every ``lease/3`` seconds). Claiming and every save are
  compare-and-swap writes: when another replica took the saga over (the lease had expired) or an
  operator changed it, the next save conflicts and this replica drops the saga at once.
* **No step takes effect twice.** A step's call always carries the idempotency key
  ``<saga id>:<step>`` (``<saga id>:<step>:compensate`` for its compensation), the same on every
  attempt and after every takeover, so the API side replays a repeated call; a
  ``publish_await`` command is published with that key as its ``Nats-Msg-Id``.
* A failed step (not retryable, retries exhausted, or timed out on its last attempt) makes the
  saga ``compensating``: the compensations of the completed steps run in reverse order. A
  compensation that fails is dead-lettered to ``dlq.saga.<name>`` (header ``Mesh-Saga-Id``) and
  the saga stays ``failed`` until :func:`retry_saga` (``meshctl saga retry``) resumes it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import time
from datetime import datetime
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskGroup, TaskStatus

from mesh.api import ApiError
from mesh.api import client as api_client
from mesh.envelope import DeadLetter, Envelope
from mesh.envelope import decode as decode_envelope
from mesh.errors import MeshError, TransportError
from mesh.saga.definition import OrchestratorConfig, SagaDef, StepDef, render, resolve_path
from mesh.saga.metrics import SagaMetrics
from mesh.saga.state import (
    ACTIVE_STATES,
    SAGA_BUCKET,
    SagaRecord,
    StepRecord,
    decode_record,
    encode_record,
    new_record,
    saga_id,
)
from mesh.saga.tracing import trace_saga_event
from mesh.transport import (
    COMMANDS_STREAM,
    EVENTS_STREAM,
    Bucket,
    Delivery,
    OutMessage,
    RevisionConflict,
    Transport,
)

__all__ = ["LostSaga", "Orchestrator", "default_replica_id", "retry_saga", "trigger_data"]

log = logging.getLogger(__name__)

_BUG_PARK = 60.0
"""Seconds a saga whose run raised an unexpected error waits before any replica tries again."""


class LostSaga(MeshError):
    """This replica no longer owns the saga (another took it over, or an operator changed it)."""


class _Parked(Exception):
    """The saga was released until later (a long wait or backoff): stop running it here."""


class _StepFailed(Exception):
    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


def default_replica_id(name: str) -> str:
    return f"{name}-{socket.gethostname()}-{os.getpid()}"


def trigger_data(delivery: Delivery) -> dict[str, Any]:
    """What templates see as ``trigger``: the envelope's fields with its payload decoded, or, for
    a JSON message, ``payload`` = the JSON body; ``id`` identifies the message (envelope id,
    else ``Nats-Msg-Id``, else the stream sequence), ``subject`` where it was published.

    Raises:
        ValueError: neither an envelope nor a JSON object.
    """
    headers = delivery.headers
    try:
        env = decode_envelope(delivery.data)
    except MeshError:
        try:
            body = json.loads(delivery.data)
        except ValueError:
            raise ValueError("neither a mesh envelope nor JSON") from None
        if not isinstance(body, dict):
            raise ValueError("a JSON trigger must be an object") from None
        return {
            "id": headers.get("Nats-Msg-Id") or f"seq-{delivery.stream_seq}",
            "subject": delivery.subject,
            "correlation_id": headers.get("Mesh-Correlation-Id", ""),
            "payload": body,
        }
    return _envelope_data(env, delivery.subject)


def _envelope_data(env: Envelope, subject: str) -> dict[str, Any]:
    """The envelope's fields as plain data, its payload decoded (None when not msgpack)."""
    data: dict[str, Any] = {f: getattr(env, f) for f in env.__struct_fields__ if f != "payload"}
    try:
        data["payload"] = msgspec.to_builtins(msgspec.msgpack.decode(bytes(env.payload)))
    except (msgspec.DecodeError, TypeError):
        data["payload"] = None
    data["subject"] = subject
    return data


def _event_data(data: bytes, headers: dict[str, str], subject: str) -> dict[str, Any] | None:
    try:
        env = decode_envelope(data)
    except MeshError:
        try:
            body = json.loads(data)
        except ValueError:
            return None
        return {"subject": subject, "payload": body, "id": headers.get("Nats-Msg-Id", "")}
    return _envelope_data(env, subject)


class _Owned:
    """A saga this replica holds: the record, its revision and the lease, saved under a lock."""

    def __init__(self, bucket: Bucket, rec: SagaRecord, revision: int, replica: str, lease: float) -> None:
        self.bucket = bucket
        self.rec = rec
        self.revision = revision
        self.replica = replica
        self.lease = lease
        self.lock = anyio.Lock()
        self.released = False

    async def save(self) -> None:
        """Write the record (and a fresh lease) by compare-and-swap.

        Raises:
            LostSaga: the key changed since our last write, or the lease ran out while the
                broker could not be reached.
        """
        async with self.lock:
            if self.released:
                raise LostSaga(f"saga {self.rec.id} was handed back")
            while True:
                now = time.time()
                if self.rec.lease_until < now:
                    raise LostSaga(f"saga {self.rec.id}: lease expired before the state could be saved")
                self.rec.updated_at = now
                old_lease = self.rec.lease_until
                self.rec.owner = self.replica
                self.rec.lease_until = now + self.lease
                try:
                    self.revision = await self.bucket.update(
                        self.rec.id, encode_record(self.rec), self.revision
                    )
                    return
                except RevisionConflict:
                    raise LostSaga(f"saga {self.rec.id} was changed by someone else") from None
                except TransportError as exc:
                    self.rec.lease_until = old_lease
                    log.warning("saga %s: cannot save its state yet: %s", self.rec.id, exc)
                    await anyio.sleep(0.5)

    async def release(self, resume_at: float = 0.0) -> None:
        """Give the saga up (no owner), claimable again from ``resume_at`` on; then raise
        :class:`_Parked`. Raises LostSaga when the key changed since our last write."""
        async with self.lock:
            self.rec.owner = ""
            self.rec.lease_until = 0.0
            self.rec.resume_at = resume_at
            self.rec.updated_at = time.time()
            if self.released:
                raise LostSaga(f"saga {self.rec.id} was handed back")
            self.released = True  # no save after this one, whatever happens to it
            try:
                self.revision = await self.bucket.update(self.rec.id, encode_record(self.rec), self.revision)
            except RevisionConflict:
                raise LostSaga(f"saga {self.rec.id} was changed by someone else") from None
        raise _Parked

    async def heartbeat(self, lost: anyio.Event) -> None:
        while True:
            await anyio.sleep(self.lease / 3)
            try:
                await self.save()
            except LostSaga as exc:
                log.warning("%s", exc)
                lost.set()
                return


class Orchestrator:
    """Runs the sagas of ``cfg`` on ``transport``: one durable trigger consumer per saga
    definition, and every active saga in ``mesh_sagas`` whose lease is free (whatever replica
    started it; the record carries its own definition).

    ``async with`` nothing: :meth:`run` owns every task and returns only when cancelled.
    """

    def __init__(
        self,
        cfg: OrchestratorConfig,
        transport: Transport,
        *,
        replica: str | None = None,
        metrics: SagaMetrics | None = None,
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics or SagaMetrics()
        self.transport = transport
        self.replica = replica or cfg.orchestrator.replica or default_replica_id(cfg.orchestrator.name)
        self.lease = cfg.orchestrator.lease
        self.running: set[str] = set()
        """Ids of the sagas this replica runs now."""
        self._known: dict[str, tuple[SagaRecord, int]] = {}
        self._loaded = anyio.Event()
        self._wake = anyio.Event()
        self._bucket: Bucket | None = None
        self._tg: TaskGroup | None = None

    def __repr__(self) -> str:
        return f"<Orchestrator {self.replica} sagas={len(self.cfg.sagas)} running={len(self.running)}>"

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled. ``task_status.started()`` once the triggers are bound and the
        existing sagas loaded.

        Raises:
            TransportError: the ``mesh_sagas`` bucket or a trigger's stream is missing, or the
                credentials refuse them.
        """
        try:
            self._bucket = await self.transport.key_value(SAGA_BUCKET, create=False)
        except TransportError as exc:
            if "does not exist" not in str(exc):
                raise
            raise TransportError(
                f"KV bucket {SAGA_BUCKET} does not exist: the control plane creates it"
                " (`meshctl control-plane run`), or create it with admin creds"
            ) from None
        async with anyio.create_task_group() as tg:
            self._tg = tg
            await tg.start(self._watch_loop)
            for saga in self.cfg.sagas:
                await tg.start(self._trigger_loop, saga)
            tg.start_soon(self._claim_loop)
            task_status.started()

    # -- discovery and claiming ------------------------------------------------------------

    async def _watch_loop(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        assert self._bucket is not None
        started = False
        while True:
            reconnects = self.transport.reconnects
            try:
                async with await self._bucket.watch() as watch:
                    while self.transport.reconnects == reconnects:
                        update = await watch.next(timeout=2.0)
                        if update is None:
                            continue
                        if update.op == "loaded":
                            self._loaded.set()
                            self._wake.set()
                            if not started:
                                started = True
                                task_status.started()
                        elif update.op == "delete":
                            self._known.pop(update.key, None)
                        else:
                            try:
                                rec = decode_record(update.value)
                            except (msgspec.DecodeError, msgspec.ValidationError):
                                log.error("%s: unreadable saga record %s", SAGA_BUCKET, update.key)
                                continue
                            if rec.state not in ACTIVE_STATES:
                                self._known.pop(update.key, None)  # finished: nothing to run
                                continue
                            self._known[update.key] = (rec, update.revision)
                            if rec.claimable(time.time()):
                                self._wake.set()
            except TransportError as exc:
                if not started:
                    raise
                log.warning("watching %s: %s; watching again", SAGA_BUCKET, exc)
                await anyio.sleep(1.0)

    async def _claim_loop(self) -> None:
        await self._loaded.wait()
        while True:
            with anyio.move_on_after(max(0.2, self.lease / 3)):
                await self._wake.wait()
            self._wake = anyio.Event()
            now = time.time()
            for sid, (rec, revision) in list(self._known.items()):
                if sid not in self.running and rec.claimable(now):
                    await self._claim(rec, revision)

    async def _claim(self, rec: SagaRecord, revision: int) -> None:
        assert self._bucket is not None
        assert self._tg is not None
        previous = rec.owner if rec.lease_until else ""
        rec = decode_record(encode_record(rec))  # our own copy: the watch keeps the cached one
        rec.owner = self.replica
        rec.resume_at = 0.0
        rec.lease_until = time.time() + self.lease
        rec.updated_at = time.time()
        try:
            new_revision = await self._bucket.update(rec.id, encode_record(rec), revision)
        except RevisionConflict:
            return  # someone else was faster, or it changed: the watch brings the new value
        except TransportError as exc:
            log.warning("cannot claim saga %s: %s", rec.id, exc)
            return
        if previous and previous != self.replica:
            log.info("saga %s: taken over from %s (lease expired)", rec.id, previous)
        self._start(rec, new_revision)

    def _start(self, rec: SagaRecord, revision: int) -> None:
        assert self._bucket is not None
        assert self._tg is not None
        self.running.add(rec.id)
        self.metrics.running.set(len(self.running))
        self._tg.start_soon(self._own, _Owned(self._bucket, rec, revision, self.replica, self.lease))

    # -- triggers ----------------------------------------------------------------------------

    async def _trigger_loop(
        self, saga: SagaDef, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        assert self._bucket is not None
        stream = COMMANDS_STREAM if saga.trigger.subject.startswith("cmd.") else EVENTS_STREAM
        durable = f"saga-{saga.name}"
        consumer = await self.transport.pull_consumer(
            durable=durable,
            filter_subject=saga.trigger.subject,
            ack_wait=30.0,
            max_deliver=100,
            max_ack_pending=256,
            stream=stream,
        )
        task_status.started()
        async with consumer:
            while True:
                try:
                    batch = await consumer.fetch(16, timeout=2.0)
                except TransportError as exc:
                    log.warning("saga %s trigger %s: %s", saga.name, durable, exc)
                    await anyio.sleep(1.0)
                    continue
                for delivery in batch:
                    try:
                        await self._start_from(saga, delivery)
                    except TransportError as exc:
                        log.warning("saga %s: trigger %s: %s", saga.name, delivery.subject, exc)
                    except Exception as exc:  # one bad message must not stop the triggers
                        log.error("saga %s: trigger %s dropped: %s: %s", saga.name, delivery.subject,
                                  type(exc).__name__, exc, exc_info=True)  # fmt: skip
                        with contextlib.suppress(TransportError):
                            await delivery.term()

    async def _start_from(self, saga: SagaDef, delivery: Delivery) -> None:
        assert self._bucket is not None
        try:
            trigger = trigger_data(delivery)
        except ValueError as exc:
            log.error("saga %s: ignoring trigger message %s: %s", saga.name, delivery.subject, exc)
            await delivery.term()
            return
        sid = saga_id(saga.name, str(trigger.get("id", "")))
        rec = new_record(saga, sid, trigger, owner=self.replica, lease=self.lease)
        try:
            revision = await self._bucket.create(sid, encode_record(rec))
        except RevisionConflict:
            await delivery.ack()  # this message already started its saga
            return
        except TransportError as exc:
            log.warning("saga %s: cannot store a new saga yet: %s", saga.name, exc)
            await delivery.nak(1.0)
            return
        await delivery.ack()
        log.info("saga %s started (%s)", sid, delivery.subject)
        await self._trace(rec, None, "started")
        self._start(rec, revision)

    # -- running one saga ----------------------------------------------------------------------

    async def _own(self, owned: _Owned) -> None:
        lost = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(owned.heartbeat, lost)

                async def stop_when_lost() -> None:
                    await lost.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(stop_when_lost)
                try:
                    await self._advance(owned)
                except LostSaga as exc:
                    log.warning("%s", exc)
                except _Parked:
                    log.info("saga %s parked until %s", owned.rec.id, _iso(owned.rec.resume_at))
                except Exception as exc:  # a bug must not stop the other sagas: retry it later
                    log.error("saga %s: unexpected %s: %s; parked for %gs", owned.rec.id, type(exc).__name__,
                              exc, _BUG_PARK, exc_info=True)  # fmt: skip
                    owned.rec.error = f"internal error: {type(exc).__name__}: {exc}"
                    with contextlib.suppress(_Parked, LostSaga, TransportError):
                        await owned.release(time.time() + _BUG_PARK)
                tg.cancel_scope.cancel()
        except BaseException:
            # stopping (SIGTERM): hand the saga back at once instead of letting the lease run out
            if not lost.is_set() and owned.rec.owner == self.replica:
                with anyio.move_on_after(2.0, shield=True), contextlib.suppress(Exception):
                    await owned.release()
            raise
        finally:
            self.running.discard(owned.rec.id)
            self.metrics.running.set(len(self.running))
            self._wake.set()

    async def _trace(self, rec: SagaRecord, step: StepRecord | None, event: str) -> None:
        m = self.metrics
        if step is None:
            if event == "started":
                m.started.labels(rec.name).inc()
            else:
                m.finished.labels(rec.name, event).inc()
        else:
            m.steps.labels(rec.name, event).inc()
            if event == "completed" and step.started_at and step.finished_at:
                m.step_seconds.labels(rec.name).observe(max(0.0, step.finished_at - step.started_at))
        try:
            await trace_saga_event(self.transport, rec, step, event)
        except Exception as exc:  # tracing must never stop a saga
            log.warning("saga %s: tracing %s failed: %s", rec.id, event, exc)

    def _context(self, rec: SagaRecord) -> dict[str, Any]:
        saga = {"id": rec.id, "name": rec.name, "error": rec.error}  # error: why it compensates
        return {"trigger": rec.trigger, "saga": saga, "steps": rec.results()}

    async def _advance(self, owned: _Owned) -> None:
        while True:
            rec = owned.rec
            if rec.state == "running":
                step = next((s for s in rec.steps if s.state in ("pending", "running")), None)
                if step is None:
                    rec.state = "completed"
                    rec.finished_at = time.time()
                    await owned.save()
                    log.info("saga %s completed", rec.id)
                    await self._trace(rec, None, "completed")
                    return
                await self._forward(owned, _step_def(rec.definition, step.name), step)
            elif rec.state == "compensating":
                await self._compensate(owned)
            else:
                return

    async def _forward(self, owned: _Owned, sdef: StepDef, srec: StepRecord) -> None:
        rec = owned.rec
        now = time.time()
        if srec.next_attempt_at is not None and srec.next_attempt_at > now:
            if srec.next_attempt_at - now > self.lease:
                await owned.release(srec.next_attempt_at)  # any replica resumes it then
            await anyio.sleep(srec.next_attempt_at - now)
        if sdef.kind == "wait":
            await self._wait(owned, sdef, srec)
            return
        srec.state = "running"
        srec.attempts += 1
        srec.started_at = srec.started_at or time.time()
        srec.attempt_started_at = time.time()
        srec.next_attempt_at = None
        await owned.save()
        await self._trace(rec, srec, "attempt")
        try:
            result = await self._execute(owned, sdef, srec)
        except _StepFailed as exc:
            srec.error = str(exc)
            if exc.retryable and srec.attempts < sdef.retry.attempts:
                srec.next_attempt_at = time.time() + sdef.retry.delay(srec.attempts)
                await owned.save()
                log.info(
                    "saga %s step %s attempt %d failed, retrying: %s", rec.id, srec.name, srec.attempts, exc
                )
                return
            srec.state = "failed"
            srec.finished_at = time.time()
            rec.state = "compensating"
            rec.error = f"step {srec.name} failed after {srec.attempts} attempt(s): {exc}"
            await owned.save()
            log.warning("saga %s: %s; compensating", rec.id, rec.error)
            await self._trace(rec, srec, "failed")
            return
        srec.state = "completed"
        srec.result = result
        srec.error = ""
        srec.finished_at = time.time()
        await owned.save()
        await self._trace(rec, srec, "completed")

    async def _wait(self, owned: _Owned, sdef: StepDef, srec: StepRecord) -> None:
        if srec.wake_at is None:
            srec.state = "running"
            srec.attempts = 1
            srec.started_at = time.time()
            if sdef.duration is not None:
                srec.wake_at = srec.started_at + sdef.duration
            else:
                try:
                    srec.wake_at = _when(render(sdef.until, self._context(owned.rec)))
                except (KeyError, ValueError) as exc:
                    srec.error = f"until: {exc}"
                    srec.state = "failed"
                    owned.rec.state = "compensating"
                    owned.rec.error = f"step {srec.name} failed: {srec.error}"
                    await owned.save()
                    return
            await owned.save()
        delay = srec.wake_at - time.time()
        if delay > self.lease:
            await owned.release(srec.wake_at)  # no lease held for hours: any replica resumes it then
        if delay > 0:
            await anyio.sleep(delay)
        srec.state = "completed"
        srec.result = {"woke_at": srec.wake_at}
        srec.finished_at = time.time()
        await owned.save()
        await self._trace(owned.rec, srec, "completed")

    async def _execute(self, owned: _Owned, sdef: StepDef, srec: StepRecord) -> dict[str, Any]:
        rec = owned.rec
        ctx = self._context(rec)
        try:
            body = render(sdef.request, ctx)
        except KeyError as exc:
            raise _StepFailed(f"request: {exc.args[0]}", retryable=False) from None
        key = f"{rec.id}:{srec.name}"
        if sdef.kind == "call":
            return await self._call(rec, sdef.subject, body, key, sdef.timeout)
        return await self._publish_await(owned, sdef, srec, body, key, ctx)

    async def _call(
        self, rec: SagaRecord, subject: str, body: Any, key: str, timeout: float
    ) -> dict[str, Any]:
        try:
            with anyio.fail_after(timeout + 1.0):
                result: dict[str, Any] = await api_client.call(
                    self.transport,
                    subject,
                    body,
                    idempotency_key=key,
                    timeout=timeout,
                    correlation_id=str(rec.trigger.get("correlation_id") or rec.id),
                    causation_id=str(rec.trigger.get("id", "")),
                    traceparent=str(rec.trigger.get("traceparent", "")),
                )
                return result
        except ApiError as exc:
            raise _StepFailed(f"{subject}: {exc}", retryable=exc.retryable) from None
        except TimeoutError:
            raise _StepFailed(f"{subject}: timeout after {timeout:g}s", retryable=True) from None
        except TransportError as exc:
            raise _StepFailed(f"{subject}: {exc}", retryable=True) from None

    async def _publish_await(
        self, owned: _Owned, sdef: StepDef, srec: StepRecord, body: Any, key: str, ctx: dict[str, Any]
    ) -> dict[str, Any]:
        rec = owned.rec
        try:
            expected = render(sdef.match, ctx)
        except KeyError as exc:
            raise _StepFailed(f"match: {exc.args[0]}", retryable=False) from None
        try:
            if srec.await_from_seq is None:
                srec.await_from_seq = (await self.transport.stream_info(EVENTS_STREAM)).last_seq
                await owned.save()
            headers = {"Mesh-Saga-Id": rec.id, "Mesh-Idempotency-Key": key}
            if rec.trigger.get("correlation_id"):
                headers["Mesh-Correlation-Id"] = str(rec.trigger["correlation_id"])
            await self.transport.publish_ack(
                OutMessage(sdef.subject, json.dumps(body).encode(), msg_id=key, headers=headers)
            )
            with anyio.move_on_after(sdef.timeout):
                async with await self.transport.read_stream(
                    EVENTS_STREAM, subject=sdef.await_event, start_seq=srec.await_from_seq + 1
                ) as reader:
                    while True:
                        msg = await reader.next(timeout=1.0)
                        if msg is None:
                            continue
                        event = _event_data(msg.data, msg.headers, msg.subject)
                        if event is not None and _matches(event, expected):
                            return event
        except TransportError as exc:
            raise _StepFailed(f"{sdef.subject}: {exc}", retryable=True) from None
        raise _StepFailed(
            f"no {sdef.await_event} event matching {expected} within {sdef.timeout:g}s", retryable=True
        )

    async def _compensate(self, owned: _Owned) -> None:
        rec = owned.rec
        for srec in reversed(rec.steps):
            sdef = _step_def(rec.definition, srec.name)
            if sdef.compensate is None or srec.state not in (
                "completed",
                "compensating",
                "compensation_failed",
            ):
                continue
            comp = sdef.compensate
            tries = 0
            while True:
                tries += 1
                srec.state = "compensating"
                srec.compensation_attempts += 1
                await owned.save()
                try:
                    body = render(comp.request, self._context(rec))
                except KeyError as exc:
                    error, retryable = f"compensate request: {exc.args[0]}", False
                else:
                    try:
                        await self._call(
                            rec, comp.subject, body, f"{rec.id}:{srec.name}:compensate", comp.timeout
                        )
                        break
                    except _StepFailed as exc:
                        error, retryable = str(exc), exc.retryable
                if retryable and tries < comp.retry.attempts:
                    srec.compensation_error = error
                    await owned.save()
                    await anyio.sleep(comp.retry.delay(tries))
                    continue
                await self._compensation_failed(owned, srec, error, tries)
                return
            srec.state = "compensated"
            srec.compensation_error = ""
            srec.compensated_at = time.time()
            await owned.save()
            log.info("saga %s: compensated step %s", rec.id, srec.name)
            await self._trace(rec, srec, "compensated")
        rec.state = "compensated"
        rec.finished_at = time.time()
        await owned.save()
        log.info("saga %s compensated", rec.id)
        await self._trace(rec, None, "compensated")

    async def _compensation_failed(self, owned: _Owned, srec: StepRecord, error: str, tries: int) -> None:
        rec = owned.rec
        srec.state = "compensation_failed"
        srec.compensation_error = error
        reason = f"saga {rec.id}: compensation of step {srec.name} failed: {error}"
        letter = DeadLetter(
            reason=reason,
            error_class="CompensationFailed",
            flow=f"saga-{rec.name}",
            original_subject=str(rec.trigger.get("subject", "")),
            permanent=True,
            attempts=tries,
            agent=self.replica,
        )
        # dead-letter first (deduplicated by its id): a crash before the save below repeats
        # the compensation and publishes the same letter again, which the stream drops
        msg = OutMessage(
            f"dlq.saga.{rec.name}",
            encode_record(rec),
            msg_id=f"saga:{rec.id}:{srec.name}:{rec.retries}",
            headers={**letter.to_headers(), "Mesh-Saga-Id": rec.id},
        )
        while True:
            try:
                await self.transport.publish_ack(msg)
                break
            except TransportError as exc:
                log.warning("saga %s: cannot dead-letter yet: %s", rec.id, exc)
                await anyio.sleep(1.0)
        rec.state = "failed"
        rec.error = reason
        rec.finished_at = time.time()
        await owned.save()
        log.error(
            "%s (dead-lettered to dlq.saga.%s; `meshctl saga retry %s` resumes it)", reason, rec.name, rec.id
        )
        await self._trace(rec, srec, "compensation_failed")
        await self._trace(rec, None, "failed")


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _step_def(saga: SagaDef, name: str) -> StepDef:
    return next(s for s in saga.steps if s.name == name)


def _matches(event: dict[str, Any], expected: dict[str, Any]) -> bool:
    for path, value in expected.items():
        try:
            if resolve_path(event, path) != value:
                return False
        except KeyError:
            return False
    return True


def _when(value: Any) -> float:
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    raise ValueError(f"{value!r} is neither unix seconds nor an ISO-8601 time")


async def retry_saga(bucket: Bucket, sid: str) -> SagaRecord:
    """Resume a ``failed`` saga: its failed compensation runs again (then the earlier ones), on
    whichever replica claims it first. Compare-and-swap, so a concurrent change is not lost.

    Raises:
        LookupError: no saga ``sid``.
        ValueError: the saga is not ``failed`` (the message says its state).
        RevisionConflict: it changed while we wrote.
    """
    entry = await bucket.get(sid)
    if entry is None:
        raise LookupError(f"no saga {sid!r}")
    rec = decode_record(entry.value)
    if rec.state != "failed":
        raise ValueError(f"saga {sid} is {rec.state}; only a failed saga can be retried")
    for s in rec.steps:
        if s.state == "compensation_failed":
            s.state = "compensating"
            s.compensation_attempts = 0
    rec.state = "compensating"
    rec.owner = ""
    rec.lease_until = 0.0
    rec.retries += 1
    rec.finished_at = None
    rec.updated_at = time.time()
    await bucket.update(sid, encode_record(rec), entry.revision)
    return rec
