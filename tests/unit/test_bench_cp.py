"""The control-plane benchmark's own logic: percentiles, /proc readings, line reading, verdicts;
and the per-flow aggregation of /status it led to (one pass instead of a scan per flow)."""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import anyio
import pytest

from mesh.controlplane.models import AgentView, FlowReport
from mesh.controlplane.status import flow_views
from mesh.devtools.bench_cp import (
    ProcSample,
    _Lines,
    _problems,
    cpu_percent,
    machine_busy_seconds,
    percentiles,
    proc_sample,
)


def test_percentiles_interpolate_like_statistics_inclusive() -> None:
    xs = [float(x) for x in (7, 1, 3, 10, 2, 8, 5, 4, 9, 6, 30, 0.5)]
    got = percentiles(xs)
    qs = statistics.quantiles(xs, n=100, method="inclusive")
    assert got["p50"] == pytest.approx(qs[49])
    assert got["p95"] == pytest.approx(qs[94])
    assert got["p99"] == pytest.approx(qs[98])
    assert got["max"] == 30
    assert got["n"] == len(xs)


def test_percentiles_of_one_value_and_of_none() -> None:
    assert percentiles([4.0]) == {"n": 1, "p50": 4.0, "p95": 4.0, "p99": 4.0, "max": 4.0}
    empty = percentiles([])
    assert empty["n"] == 0
    assert all(math.isnan(empty[k]) for k in ("p50", "p95", "p99", "max"))


def test_percentiles_bounds() -> None:
    xs = [1.0, 2.0, 3.0]
    assert percentiles(xs, (0, 100)) == {"n": 3, "p0": 1.0, "p100": 3.0, "max": 3.0}
    with pytest.raises(ValueError, match="101"):
        percentiles(xs, (101,))


def test_proc_sample_reads_cpu_and_memory_of_a_live_process() -> None:
    before = proc_sample(os.getpid())
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:  # burn some CPU
        sum(range(1000))
    after = proc_sample(os.getpid())
    assert after.cpu_seconds - before.cpu_seconds >= 0.1
    assert 0 < after.rss_kb <= after.hwm_kb
    assert cpu_percent(before, after) > 0


def test_proc_sample_of_a_process_that_is_gone_raises() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    with pytest.raises(FileNotFoundError):
        proc_sample(child.pid)


def test_cpu_percent_is_per_core() -> None:
    a = ProcSample(at=10.0, cpu_seconds=1.0, rss_kb=1, hwm_kb=1)
    b = ProcSample(at=12.0, cpu_seconds=4.0, rss_kb=1, hwm_kb=1)
    assert cpu_percent(a, b) == pytest.approx(150.0)  # 3 CPU seconds in 2 s: 1.5 cores
    assert math.isnan(cpu_percent(a, a))


def test_machine_busy_seconds_only_grows() -> None:
    first = machine_busy_seconds()
    assert first > 0
    assert machine_busy_seconds() >= first


@pytest.mark.anyio
async def test_lines_reassembles_partial_writes_and_returns_the_rest_at_eof() -> None:
    r, w = os.pipe()
    lines = _Lines(r)
    try:
        os.write(w, b'{"event": "reg')
        async with anyio.create_task_group() as tg:
            got: list[bytes] = []

            async def read_two() -> None:
                got.append(await lines.readline())
                got.append(await lines.readline())

            tg.start_soon(read_two)
            await anyio.sleep(0.05)  # the reader waits for the rest of the line
            os.write(w, b'istered"}\nstart\nsto')
        assert got == [b'{"event": "registered"}\n', b"start\n"]
        os.close(w)
        w = -1
        assert await lines.readline() == b"sto"
        assert await lines.readline() == b""
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def _beats(sent: int = 40, refused: int = 0, failed: int = 0) -> dict[str, Any]:
    return {
        "sent": sent,
        "refused": refused,
        "failed": failed,
        "refusals": {"unauthorized: bad credential": refused} if refused else {},
        "failures": {"the control plane did not answer": failed} if failed else {},
    }


def _result(**changes: Any) -> dict[str, Any]:
    poll = {"errors": {}, "latency_ms": percentiles([1.0])}
    res: dict[str, Any] = {
        "agents": 4,
        "heartbeats": _beats(),
        "baseline": {"/status": poll, "/healthz": poll},
        "load": {"/status": poll, "/healthz": poll},
        "final_counts": {"healthy": 3, "degraded": 1, "stale": 0, "lost": 0},
        "final_agents": 4,
    }
    for key, value in changes.items():
        res[key] = value
    return res


def test_problems_none_when_every_heartbeat_was_accepted_and_every_agent_is_fresh() -> None:
    assert _problems(_result()) == []


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"heartbeats": _beats(refused=2)}, "2 heartbeat(s) refused"),
        ({"heartbeats": _beats(failed=1)}, "1 heartbeat(s) unanswered"),
        ({"heartbeats": _beats(sent=0)}, "no heartbeat"),
        ({"final_counts": {"healthy": 3, "degraded": 0, "stale": 1, "lost": 0}}, "expected 4 fresh"),
        ({"final_agents": 3}, "3 agent(s)"),
    ],
)
def test_problems_name_what_broke(changes: dict[str, Any], expected: str) -> None:
    problems = _problems(_result(**changes))
    assert len(problems) == 1
    assert expected in problems[0]


def test_problems_report_http_errors() -> None:
    bad = {"errors": {"HTTP 500": 3}, "latency_ms": percentiles([1.0])}
    ok = {"errors": {}, "latency_ms": percentiles([1.0])}
    problems = _problems(_result(load={"/status": bad, "/healthz": ok}))
    assert problems == ["load /status: {'HTTP 500': 3}"]


def _view(name: str, health: str, flows: list[FlowReport], state: str = "active") -> AgentView:
    return AgentView(
        name=name,
        agent_id=name,
        site="s",
        host="h",
        version="1",
        state=state,  # type: ignore[arg-type]
        health=health,  # type: ignore[arg-type]
        reason="",
        registered_at=0.0,
        last_heartbeat=None,
        heartbeat_age_seconds=None,
        flows=flows,
    )


def test_flow_views_aggregate_each_flow_over_the_agents_that_report_it() -> None:
    agents = [
        _view("a-erp", "healthy", [FlowReport(name="a-cust", outbox_depth=3, outbox_age_seconds=1.5),
                                   FlowReport(name="shared", outbox_depth=1, errors=2)]),
        _view("a-cloud", "stale", [FlowReport(name="a-cust", state="failing", consumer_pending=7),
                                   FlowReport(name="shared", consumer_pending=4, dead_lettered=1, errors=1)]),
        _view("b-erp", "degraded", [FlowReport(name="shared", state="paused", outbox_age_seconds=9.0)]),
    ]  # fmt: skip
    views = {v.name: v for v in flow_views(agents, {"shared": 5, "dlq-only": 2})}
    assert sorted(views) == ["a-cust", "dlq-only", "shared"]
    cust = views["a-cust"]
    # a stale agent's "failing" does not count: only fresh agents decide the state
    assert (cust.state, cust.agents, cust.backlog, cust.consumer_pending) == (
        "running", ["a-cloud", "a-erp"], 3, 7
    )  # fmt: skip
    assert (cust.lag_seconds, cust.dlq_depth) == (1.5, 0)
    shared = views["shared"]
    assert (shared.state, shared.agents) == ("paused", ["a-cloud", "a-erp", "b-erp"])
    assert (shared.backlog, shared.consumer_pending, shared.lag_seconds) == (1, 4, 9.0)
    assert (shared.dlq_depth, shared.errors, shared.dead_lettered) == (5, 3, 1)
    only = views["dlq-only"]
    assert (only.state, only.agents, only.backlog, only.dlq_depth) == ("unknown", [], 0, 2)
