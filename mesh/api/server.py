"""Serve a system's operations as a NATS service (README "System APIs").

:class:`ApiServer` starts one service ``mesh-<system>`` (the NATS services protocol, so
``$SRV.PING``, ``$SRV.INFO`` and ``$SRV.STATS`` discover it) with one endpoint per configured
operation at ``api.<system>.<entity>.<operation>``; replicas of the agent share the calls
(queue group). Guarantees:

* Every request gets exactly one reply, ``{"ok": true, ...}`` or a structured error; nothing is
  executed after the caller's ``Mesh-Deadline`` (``deadline_exceeded``) and no execution runs
  longer than the operation's ``timeout``. An unexpected exception is logged here and answered
  ``internal`` without a stack trace.
* A non-read operation needs ``Mesh-Idempotency-Key``. The first call with a key claims it in
  ``mesh_api_results`` (compare-and-swap create, state ``running``) and stores the reply there;
  a concurrent or later call with the key, on any replica, waits for and returns that reply
  (``replayed``) and never executes. A claim whose holder died is taken over (compare-and-swap)
  once its deadline plus ``claim_timeout`` has passed: the new holder first asks the operation
  for a result the system recorded (SQL: the ``mesh_api_calls`` row written in the statement's
  own transaction) and executes only when there is none. Errors a retry could cure
  (``unavailable``, ``deadline_exceeded``, ``internal``) release the claim; refusals
  (``bad_request``, ``not_found``, ``conflict``, ``rejected``) are stored and replayed.
* Every call is traced (README "Tracing business transactions"): an ``api_call`` record
  ``started`` when it arrives and one with its outcome (``ok``, ``replayed`` or the error code)
  and latency when answered, both in the transaction named by ``Mesh-Correlation-Id`` (a call
  without one is its own transaction, named by a new id), recorded to the agent's
  :class:`~mesh.trace.TraceRecorder` (:func:`mesh.trace.record`; nothing without one).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskStatus

from mesh._api_config import ApiConfig, OperationConfig
from mesh.api import _micro
from mesh.api._results import Conflict, Results, kv_key
from mesh.api._shapes import compile_shape, validate
from mesh.api._wire import (
    CAUSATION_ID,
    CORRELATION_ID,
    DEADLINE,
    IDEMPOTENCY_KEY,
    TRACEPARENT,
    ApiError,
    decode,
    endpoint_name,
    endpoint_subject,
    error_reply,
    ok_reply,
    service_name,
)
from mesh.api.operation import Call, Operation, Replayed
from mesh.errors import ConfigError, RejectedRecord, RetryableError
from mesh.faults import crash_point
from mesh.metrics import Metrics
from mesh.plugins import AdapterRegistry, adapter_registry
from mesh.trace import child_traceparent, record, trace_context
from mesh.transport import Refused, Transport

__all__ = ["ApiServer"]

log = logging.getLogger(__name__)

_REPLY_MARGIN = 0.25
"""Seconds before the caller's deadline at which a call stops (running or waiting) and replies."""
_REPLAYABLE = frozenset({"bad_request", "not_found", "conflict", "rejected"})
_canonical = msgspec.json.Encoder(order="sorted")


@dataclass
class _Endpoint:
    cfg: OperationConfig
    op: Operation
    request: Any
    response: Any | None
    subject: str


class ApiServer:
    """The System API service of one agent (use :meth:`run` in a task group)."""

    def __init__(
        self,
        transport: Transport,
        api: ApiConfig,
        *,
        system: str,
        agent: str,
        registry: AdapterRegistry | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.transport = transport
        self.metrics = metrics
        self.api = api
        self.system = system
        self.agent = agent
        self.registry = registry
        self.results = Results(transport)
        self.instance = uuid.uuid4().hex[:12]
        self.calls = 0
        self.executions = 0
        self.replays = 0
        self._endpoints: dict[str, _Endpoint] = {}

    def __repr__(self) -> str:
        return (
            f"<ApiServer {service_name(self.system)} ops={len(self.api.operations)}"
            f" calls={self.calls} executions={self.executions} replays={self.replays}>"
        )

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Open the operations, start the service, serve until cancelled, then stop it.

        Raises:
            ConfigError: an operation cannot be opened (its adapter refuses its config).
            TransportError: the service cannot subscribe (e.g. permission denied).
        """
        registry = self.registry or adapter_registry()
        self._endpoints = {}
        send, receive = anyio.create_memory_object_stream[tuple[_Endpoint, _micro.Incoming]](
            self.api.max_concurrent * 10
        )
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(send.close)
            stack.callback(receive.close)
            for cfg in self.api.operations:
                op: Operation = registry.open_operation(cfg.run)
                await stack.enter_async_context(op)
                subject = endpoint_subject(self.system, cfg.name)
                self._endpoints[subject] = _Endpoint(
                    cfg,
                    op,
                    compile_shape(cfg.request, f"{endpoint_name(cfg.name)}_request"),
                    None
                    if cfg.response is None
                    else compile_shape(cfg.response, f"{endpoint_name(cfg.name)}_response"),
                    subject,
                )

            def accept(ep: _Endpoint) -> Any:
                def put(incoming: _micro.Incoming) -> bool:
                    try:
                        send.send_nowait((ep, incoming))
                    except anyio.WouldBlock:
                        log.warning("API %s: too many calls waiting; answered unavailable", ep.subject)
                        return False
                    return True

                return put

            busy = error_reply(ApiError("unavailable", "too many calls waiting; try again", True))

            specs = [
                _micro.EndpointSpec(
                    endpoint_name(ep.cfg.name),
                    ep.subject,
                    accept(ep),
                    busy,
                    {
                        "operation": ep.cfg.name,
                        "read": str(ep.cfg.read).lower(),
                        "description": ep.cfg.description,
                    },
                )
                for ep in self._endpoints.values()
            ]
            nc = getattr(self.transport, "nc", None)
            if nc is None:
                raise ConfigError("System APIs need a NATS (JetStream) transport")
            svc = await _micro.start_service(
                nc,
                name=service_name(self.system),
                version=self.api.version,
                description=f"System API of {self.system}",
                metadata={"system": self.system, "agent": self.agent},
                endpoints=specs,
            )
            stack.push_async_callback(_micro.stop_service, svc)
            refused = await _micro.check_subscriptions(nc, list(self._endpoints))
            if refused is not None:
                raise Refused(
                    f"permission denied: subscribe to {refused} (serving {service_name(self.system)})"
                )
            log.info(
                "API %s %s serving %s",
                service_name(self.system),
                self.api.version,
                ", ".join(self._endpoints),
            )
            slots = anyio.Semaphore(self.api.max_concurrent)
            async with anyio.create_task_group() as tg, receive:
                task_status.started()
                async for ep, incoming in receive:
                    await slots.acquire()
                    tg.start_soon(self._answer, ep, incoming, slots)

    async def _answer(self, ep: _Endpoint, incoming: _micro.Incoming, slots: anyio.Semaphore) -> None:
        started = time.monotonic()
        ctx = trace_context(incoming.headers)
        corr = ctx.get("correlation_id") or uuid.uuid4().hex
        parent = child_traceparent(ctx.get("traceparent", ""))
        cause = ctx.get("causation_id", "")
        try:
            self.calls += 1
            record("api_call", correlation_id=corr, causation_id=cause, outcome="started",
                   detail=ep.subject, traceparent=parent, system=self.system)  # fmt: skip
            try:
                data, replayed = await self.handle(ep, incoming.data, incoming.headers)
                body, headers = ok_reply(data, replayed=replayed), dict[str, str]()
                outcome = "replayed" if replayed else "ok"
                detail = ep.subject
            except ApiError as exc:
                body, headers = error_reply(exc)
                outcome = exc.code
                detail = f"{ep.subject}: {exc.message}"
            record("api_call", correlation_id=corr, causation_id=cause, outcome=outcome, detail=detail,
                   latency_ms=int((time.monotonic() - started) * 1000), traceparent=parent,
                   system=self.system)  # fmt: skip
            if self.metrics is not None:
                self.metrics.api_calls.labels(ep.cfg.name, outcome).inc()
                self.metrics.api_call_duration.labels(ep.cfg.name).observe(time.monotonic() - started)
            with anyio.move_on_after(5), contextlib.suppress(Exception):
                await incoming.respond(body, headers)
        finally:
            slots.release()

    async def handle(self, ep: _Endpoint, body: bytes, headers: dict[str, str]) -> tuple[Any, bool]:
        """(result, replayed) of one call, or raises :class:`ApiError` (never anything else)."""
        try:
            return await self._handle(ep, body, headers)
        except ApiError:
            raise
        except TimeoutError:
            raise ApiError(
                "deadline_exceeded", f"{ep.cfg.name}: the deadline passed", retryable=True
            ) from None
        except RetryableError as exc:
            raise ApiError("unavailable", f"{ep.cfg.name}: {exc}", retryable=True) from None
        except RejectedRecord as exc:
            raise ApiError("rejected", f"{ep.cfg.name}: {exc}", retryable=False) from None
        except Exception:
            ref = uuid.uuid4().hex[:8]
            log.exception("API %s: call failed (ref %s)", ep.subject, ref)
            raise ApiError(
                "internal", f"{ep.cfg.name} failed; see the log of agent {self.agent} (ref {ref})", False
            ) from None

    async def _handle(self, ep: _Endpoint, body: bytes, headers: dict[str, str]) -> tuple[Any, bool]:
        now = time.time()
        raw_deadline = headers.get(DEADLINE)
        if raw_deadline is None:
            deadline = now + ep.cfg.timeout
        else:
            try:
                deadline = int(raw_deadline) / 1000.0
            except ValueError:
                raise ApiError(
                    "bad_request", f"{DEADLINE}: expected unix epoch milliseconds", False
                ) from None
        if deadline <= now:
            raise ApiError(
                "deadline_exceeded", f"{ep.cfg.name}: the deadline had passed on arrival; nothing ran"
            )
        try:
            data = decode(body) if body else {}
        except msgspec.DecodeError:
            raise ApiError("bad_request", "the request body is not JSON", False) from None
        if not isinstance(data, dict):
            raise ApiError("bad_request", "the request body must be a JSON object", False)
        request = validate(data, ep.request, "request")
        key = headers.get(IDEMPOTENCY_KEY) or None
        if key is None and not ep.cfg.read:
            raise ApiError("bad_request", f"{IDEMPOTENCY_KEY} header is required for {ep.cfg.name}", False)
        # Stop a little before the caller's deadline, so it gets a structured deadline_exceeded
        # rather than its own timeout.
        margin = min(_REPLY_MARGIN, (deadline - now) * 0.1)
        run_until = min(deadline - margin, now + ep.cfg.timeout)
        call = Call(
            ep.cfg.name,
            None if key is None else hashlib.sha256(key.encode()).hexdigest(),
            run_until,
            headers.get(CORRELATION_ID, ""),
            headers.get(CAUSATION_ID, ""),
            headers.get(TRACEPARENT, ""),
        )
        if key is None:
            return await self._execute(ep, request, call)
        return await self._idempotent(ep, request, call, kv_key(self.system, key))

    async def _execute(self, ep: _Endpoint, request: dict[str, Any], call: Call) -> tuple[Any, bool]:
        remaining = call.deadline - time.time()
        if remaining <= 0:
            raise ApiError("deadline_exceeded", f"{ep.cfg.name}: the deadline passed before it ran")
        self.executions += 1
        with anyio.fail_after(remaining):
            out = await ep.op.run(request, call)
        replayed = isinstance(out, Replayed)
        result = out.result if isinstance(out, Replayed) else out
        if ep.response is not None:
            try:
                result = validate(result, ep.response, "response")
            except ApiError as exc:
                log.error(
                    "API %s: the system's result does not match the response shape: %s",
                    ep.subject,
                    exc.message,
                )
                raise ApiError(
                    "internal",
                    f"{ep.cfg.name}: the system's result does not match the declared response",
                    False,
                ) from None
        return result, replayed

    async def _idempotent(
        self, ep: _Endpoint, request: dict[str, Any], call: Call, key: str
    ) -> tuple[Any, bool]:
        digest = hashlib.sha256(_canonical.encode(request)).hexdigest()
        wait = 0.02
        while True:
            value, rev = await self.results.get(key)
            if value is not None and value.get("request") != digest:
                raise ApiError("conflict", "this idempotency key was used with a different request", False)
            if value is not None and value.get("state") == "done":
                self.replays += 1
                return _replay(value["reply"])
            takeover = value is not None and time.time() > float(value.get("until", 0))
            if value is None or takeover:
                claim = {
                    "state": "running",
                    "owner": f"{self.agent}/{self.instance}",
                    "until": call.deadline + self.api.claim_timeout,
                    "request": digest,
                    "operation": ep.cfg.name,
                }
                try:
                    rev = await self.results.write(key, claim, rev)
                except Conflict:
                    continue
                crash_point("api.after_claim")
                return await self._claimed(ep, request, call, key, rev, digest, takeover)
            remaining = call.deadline - time.time()
            if remaining <= 0:
                raise ApiError(
                    "deadline_exceeded", f"{ep.cfg.name}: the first call with this key is still running"
                )
            # Waiting for the holder of the claim: bounded backoff, ended by the caller's deadline.
            await anyio.sleep(min(wait, remaining))
            wait = min(wait * 2, 0.5)

    async def _claimed(
        self,
        ep: _Endpoint,
        request: dict[str, Any],
        call: Call,
        key: str,
        rev: int,
        digest: str,
        takeover: bool,
    ) -> tuple[Any, bool]:
        try:
            found = await ep.op.recorded(call.key) if takeover and call.key is not None else None
            if found is not None:
                result, replayed = found, True
                log.info(
                    "API %s: took over an abandoned call; the system had recorded its result", ep.subject
                )
            else:
                result, replayed = await self._run_claimed(ep, request, call)
        except ApiError as exc:
            if exc.code in _REPLAYABLE:
                await self._store(key, {"ok": False, "error": exc.to_dict()}, rev, digest)
            else:
                await self._release(key, rev)
            raise
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._release(key, rev)
            raise
        await self._store(key, {"ok": True, "result": result}, rev, digest)
        return result, replayed

    async def _run_claimed(self, ep: _Endpoint, request: dict[str, Any], call: Call) -> tuple[Any, bool]:
        try:
            return await self._execute(ep, request, call)
        except TimeoutError:
            raise ApiError("deadline_exceeded", f"{ep.cfg.name}: the deadline passed while it ran") from None
        except RetryableError as exc:
            raise ApiError("unavailable", f"{ep.cfg.name}: {exc}", retryable=True) from None
        except RejectedRecord as exc:
            raise ApiError("rejected", f"{ep.cfg.name}: {exc}", retryable=False) from None

    async def _store(self, key: str, reply: dict[str, Any], rev: int, digest: str) -> None:
        try:
            await self.results.write(key, {"state": "done", "reply": reply, "request": digest}, rev)
        except Conflict:
            log.warning("API: result of %s not stored: another replica took the claim over", key)
        except Exception as exc:
            log.warning("API: result of %s not stored (%s); a retry will find the claim and wait", key, exc)

    async def _release(self, key: str, rev: int) -> None:
        with anyio.move_on_after(5):
            try:
                await self.results.write(key, None, rev)
            except Exception as exc:
                log.warning("API: claim %s not released (%s); it expires after its deadline", key, exc)


def _replay(reply: dict[str, Any]) -> tuple[Any, bool]:
    if reply.get("ok"):
        return reply.get("result"), True
    err = reply.get("error") or {}
    raise ApiError(str(err.get("code", "internal")), str(err.get("message", "")), bool(err.get("retryable")))
