"""The retry loop shared by the REST source, the REST sink and the templated sink: one request
tried up to ``max_attempts`` times under the circuit breaker and the rate gate, with
exponential backoff and ``Retry-After`` (:mod:`adapters.rest._retry` says how long to wait).

The caller says which answers end the loop (``final`` → ``answered``), how to refuse a request
the target says is wrong (``refused``: a 4xx), and which exception a refused credential or a
redirect raises. Everything else (timeouts, connection errors, 408, 5xx, the ``busy`` statuses)
is retried, and ``SystemUnavailable`` is raised once the attempts are used up.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import anyio
import httpx

from adapters.rest._retry import CircuitBreaker, backoff_delay, parse_retry_after
from mesh.adapters import Applied
from mesh.errors import SystemUnavailable

__all__ = [
    "CREDENTIALS_REFUSED",
    "SINK_BUSY",
    "RetryConfig",
    "RetryGate",
    "batch_outcomes",
    "send_with_retries",
    "sink_credentials_refused",
    "sink_redirected",
]

CREDENTIALS_REFUSED = frozenset({401, 403, 407})
SINK_BUSY = frozenset({429, 409})
"""Answers a sink retries as "alive, only busy" (409: a conflicting request in flight)."""
_EXCERPT = 200  # characters of a transport error quoted in a message

T = TypeVar("T")


def batch_outcomes(
    sink: object, outcomes: list[Applied | Exception | None], failure: Exception | None, log: logging.Logger
) -> list[Applied | Exception]:
    """A sink batch's answer: every record's outcome when all were tried (``failure`` None).
    Otherwise ``failure`` is raised (the agent retries the whole batch), unless it is a
    SystemUnavailable after some records took effect: then those are reported and the records
    not tried carry ``failure`` (the agent retries them).

    Raises:
        Exception: ``failure``, as described.
    """
    if failure is None:
        assert all(o is not None for o in outcomes)
        return [o for o in outcomes if o is not None]
    if not isinstance(failure, SystemUnavailable):
        raise failure
    log.warning("%r: giving the batch back: %s", sink, failure)
    if not any(o is Applied.APPLIED for o in outcomes):
        raise failure
    # Some records took effect: report those, and let the agent retry the rest.
    return [failure if o is None else o for o in outcomes]


class RetryConfig(Protocol):
    """The retry settings of a REST source or sink config."""

    @property
    def max_attempts(self) -> int: ...
    @property
    def backoff_initial(self) -> float: ...
    @property
    def backoff_max(self) -> float: ...
    @property
    def backoff_jitter(self) -> float: ...
    @property
    def timeout(self) -> float: ...
    @property
    def retry_after_cap(self) -> float: ...


class RetryGate(Protocol):
    """The rate gate (a token bucket, or the agent's policy gate)."""

    async def acquire(self) -> None: ...
    def pause_until(self, deadline: float) -> None: ...
    def slot(self) -> Any: ...


def sink_credentials_refused(what: str, status: int) -> Exception:
    """A sink's 401/403/407: the batch goes back (the agent retries it)."""
    return SystemUnavailable(
        f"{what}: HTTP {status}: the target refuses our credentials (check the sink's auth and its secret)"
    )


def sink_redirected(what: str, response: httpx.Response) -> Exception:
    """A sink's 3xx: the batch goes back (the agent retries it)."""
    return SystemUnavailable(f"{what}: HTTP {response.status_code} redirect: check base_url")


async def send_with_retries(
    what: Callable[[], str],
    send: Callable[[], Awaitable[httpx.Response]],
    *,
    cfg: RetryConfig,
    breaker: CircuitBreaker,
    gate: RetryGate,
    counts: dict[str, int],
    redact: Callable[[str], str],
    final: Callable[[int], bool],
    answered: Callable[[httpx.Response], Awaitable[T]],
    refused: Callable[[str, httpx.Response], T],
    credentials_refused: Callable[[str, int], Exception],
    redirected: Callable[[str, httpx.Response], Exception],
    busy: frozenset[int] = frozenset({429}),
    failed: Callable[[], None] | None = None,
    slot: bool = True,
    wait_over_cap: bool = False,
    between: Callable[[bool], Awaitable[T | None]] | None = None,
    log: logging.Logger,
) -> T:
    """Send ``send()`` (named ``what()`` in messages) until an answer ends it; return what the
    caller makes of that answer.

    * A ``final`` status is a healthy answer: the breaker closes and ``answered`` decides.
    * ``busy`` statuses (429; sinks add 409) are retried, the breaker is told the target lives;
      408 and 5xx, timeouts and transport errors are retried and count as failures (``failed``,
      default ``breaker.failure``).
    * 401/403/407 raise ``credentials_refused``, 3xx raise ``redirected``, any other status is
      ``refused`` (which returns a refusal, or raises).
    * ``Retry-After`` longer than ``cfg.retry_after_cap`` raises SystemUnavailable; a shorter
      one is waited for (429: exactly; others: at least) and pauses the gate for the other
      requests. With ``wait_over_cap`` the gate is paused even for a longer one, so the next
      call waits until then.
    * ``between(lost)`` runs after each wait (``lost``: the request may have reached the
      target); a result other than None ends the loop with it. Each retry is logged to ``log``.

    ``gate.acquire`` paces each try; with ``slot`` the request holds one of the gate's
    concurrency slots, and ``cfg.timeout`` bounds the request itself. ``counts`` gets
    ``requests`` and ``retries``.

    Raises:
        SystemUnavailable: attempts used up, ``Retry-After`` over the cap, or the circuit open.
        Exception: what ``credentials_refused``, ``redirected``, ``refused``, ``answered`` or
            ``between`` raise.
    """
    on_failure = failed if failed is not None else breaker.failure
    for attempt in range(1, cfg.max_attempts + 1):
        name = what()
        wait = backoff_delay(
            attempt, initial=cfg.backoff_initial, maximum=cfg.backoff_max, jitter=cfg.backoff_jitter
        )
        lost = False
        probe = await breaker.acquire()
        try:
            await gate.acquire()
            counts["requests"] += 1
            try:
                if slot:
                    async with gate.slot():  # the policy's concurrency share (mesh.policy)
                        with anyio.fail_after(cfg.timeout):
                            response = await send()
                else:
                    with anyio.fail_after(cfg.timeout):
                        response = await send()
            except (TimeoutError, httpx.TimeoutException):
                on_failure()
                problem, lost = f"no answer within {cfg.timeout:g}s", True
            except httpx.HTTPError as exc:
                on_failure()
                problem = f"{type(exc).__name__}: {redact(str(exc))}"[:_EXCERPT]
                lost = not isinstance(exc, httpx.ConnectError)  # sent, maybe applied
            else:
                status = response.status_code
                if final(status):
                    breaker.success()
                    return await answered(response)
                problem = f"HTTP {status}"
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                if status in busy:
                    breaker.success()  # it answers: alive, only busy
                elif status == 408 or status >= 500:
                    on_failure()
                elif status in CREDENTIALS_REFUSED:
                    breaker.success()  # it answers: alive, but not to us
                    raise credentials_refused(name, status)
                elif 300 <= status < 400:
                    raise redirected(name, response)
                else:
                    breaker.success()
                    return refused(name, response)
                if retry_after is not None:
                    if wait_over_cap:
                        gate.pause_until(anyio.current_time() + retry_after)
                    if retry_after > cfg.retry_after_cap:
                        raise SystemUnavailable(
                            f"{name}: {problem} with Retry-After {retry_after:.0f}s "
                            f"(over retry_after_cap {cfg.retry_after_cap:g}s)"
                        )
                    wait = max(wait, retry_after) if status != 429 else retry_after
                    if not wait_over_cap:
                        gate.pause_until(anyio.current_time() + retry_after)
        finally:
            breaker.release(probe)
        if attempt == cfg.max_attempts:
            raise SystemUnavailable(f"{name}: {problem} (tried {attempt} times)")
        counts["retries"] += 1
        log.info("%s: %s; try %d of %d in %.2fs", name, problem, attempt + 1, cfg.max_attempts, wait)
        await anyio.sleep(wait)
        if between is not None and (done := await between(lost)) is not None:
            return done
    raise AssertionError("unreachable")  # pragma: no cover
