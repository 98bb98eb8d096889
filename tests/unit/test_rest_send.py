"""The retry loop the REST source and sinks share (adapters/rest/_send.py), driven with answers
built in process (no server: the loop's decisions, not HTTP, are under test here; the adapters'
own tests run it against real local servers)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from adapters.rest._retry import CircuitBreaker
from adapters.rest._send import SINK_BUSY, send_with_retries, sink_credentials_refused, sink_redirected
from mesh.errors import ConfigError, SystemUnavailable
from mesh.policy.bucket import RequestGate

pytestmark = pytest.mark.anyio

log = logging.getLogger("tests.rest_send")


@dataclass(frozen=True)
class Cfg:
    max_attempts: int = 3
    backoff_initial: float = 0.001
    backoff_max: float = 0.001
    backoff_jitter: float = 0.0
    timeout: float = 5.0
    retry_after_cap: float = 5.0


def answers(*items: int | tuple[int, dict[str, str]] | Exception) -> Callable[[], Awaitable[httpx.Response]]:
    script = list(items)

    async def send() -> httpx.Response:
        item = script.pop(0)
        if isinstance(item, Exception):
            raise item
        status, headers = item if isinstance(item, tuple) else (item, {})
        return httpx.Response(status, headers=headers, request=httpx.Request("GET", "http://x/r"))

    return send


async def run(
    send: Callable[[], Awaitable[httpx.Response]], gate: RequestGate, counts: dict[str, int], **kw: Any
) -> Any:
    async def answered(response: httpx.Response) -> str:
        return f"answered {response.status_code}"

    options: dict[str, Any] = {
        "cfg": Cfg(), "breaker": CircuitBreaker(5, 30), "gate": gate, "counts": counts,
        "redact": lambda text: text, "final": lambda status: 200 <= status < 300, "answered": answered,
        "refused": lambda what, response: f"refused {response.status_code}",
        "credentials_refused": sink_credentials_refused, "redirected": sink_redirected, "log": log,
    }  # fmt: skip
    options.update(kw)
    return await send_with_retries(lambda: "PUT /r/1", send, **options)


async def test_busy_and_failing_answers_are_retried_until_a_final_one() -> None:
    counts = {"requests": 0, "retries": 0}
    gate = RequestGate(0)
    got = await run(answers(409, 503, 200), gate, counts, busy=SINK_BUSY)
    assert (got, counts) == ("answered 200", {"requests": 3, "retries": 2})
    # Without 409 among the busy statuses (the source), a 409 is a refusal.
    assert await run(answers(409), gate, counts) == "refused 409"
    with pytest.raises(SystemUnavailable, match=r"^PUT /r/1: HTTP 500 \(tried 3 times\)$"):  # the last
        await run(answers(503, 502, 500), gate, counts)


async def test_credentials_and_redirects_raise_what_the_caller_says() -> None:
    counts = {"requests": 0, "retries": 0}
    breaker = CircuitBreaker(2, 30)
    with pytest.raises(SystemUnavailable, match="HTTP 401: the target refuses our credentials"):
        await run(answers(401), RequestGate(0), counts, breaker=breaker)

    def source_redirect(what: str, response: httpx.Response) -> Exception:
        return ConfigError(f"{what}: HTTP {response.status_code} redirect", path="source.base_url")

    with pytest.raises(ConfigError, match="HTTP 302 redirect"):
        await run(answers(302), RequestGate(0), counts, redirected=source_redirect)
    assert counts == {"requests": 2, "retries": 0}
    assert breaker.state == "closed"


async def test_a_retry_after_over_the_cap_gives_up_and_pauses_the_gate_only_when_asked() -> None:
    counts = {"requests": 0, "retries": 0}
    over = (429, {"Retry-After": "60"})
    sink_gate, source_gate = RequestGate(0), RequestGate(0)
    with pytest.raises(SystemUnavailable, match=r"HTTP 429 with Retry-After 60s \(over retry_after_cap 5s\)"):
        await run(answers(over), sink_gate, counts)
    assert "paused" not in repr(sink_gate)  # a sink gives the batch back at once
    with pytest.raises(SystemUnavailable, match="over retry_after_cap"):
        await run(answers(over), source_gate, counts, wait_over_cap=True)
    assert "paused=" in repr(source_gate)  # the source's next poll waits for it
    # Within the cap: waited for, and the gate holds the other requests as long.
    gate = RequestGate(0)
    assert await run(answers((503, {"Retry-After": "0.01"}), 200), gate, counts) == "answered 200"


async def test_a_request_that_may_have_arrived_is_reported_lost_between_tries() -> None:
    counts = {"requests": 0, "retries": 0}
    seen: list[bool] = []

    async def between(lost: bool) -> str | None:
        seen.append(lost)
        return "found it" if len(seen) == 3 else None

    request = httpx.Request("PUT", "http://x/r/1")
    send = answers(
        httpx.ConnectError("refused", request=request),  # never sent
        httpx.ReadError("reset", request=request),  # sent: may have taken effect
        httpx.ReadTimeout("slow", request=request),
    )
    cfg = Cfg(max_attempts=5)
    assert await run(send, RequestGate(0), counts, cfg=cfg, between=between) == "found it"
    assert seen == [False, True, True]
    assert counts == {"requests": 3, "retries": 3}
