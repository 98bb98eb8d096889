"""A ConfigError found while a flow runs: the flow is ``failing`` with a one-line reason, logged
without a traceback, retried on the configured backoff, and recovers once the cause is gone."""

from __future__ import annotations

import logging
from pathlib import Path

import anyio
import pytest

from agents.delivery import CONFIG_RETRY, Capture, FlowPlan
from agents.flows import FlowHandle
from mesh.actors import Backoff
from mesh.adapters import Change, Source
from mesh.errors import ConfigError
from mesh.metrics import Metrics
from mesh.store import Outbox
from tests.unit.test_delivery import ListSource, flow, until

pytestmark = pytest.mark.anyio


def test_the_default_policy_is_slow_and_capped_at_minutes() -> None:
    assert 1 <= CONFIG_RETRY.base <= 5
    assert 60 <= CONFIG_RETRY.cap <= 600
    assert max(CONFIG_RETRY.delay(n) for n in range(40)) <= CONFIG_RETRY.cap


async def test_a_config_error_marks_the_flow_failing_until_fixed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    broken = {"yes": True}
    attempts = []

    def open_source() -> Source:
        attempts.append(1)
        if broken["yes"]:
            raise ConfigError("table 't' does not exist", source="crm.db")
        return ListSource([Change(key="1", version=1, row={"id": 1, "name": "A"})])

    cfg = flow()
    handle = FlowHandle(cfg, "config", state="running")
    plan = FlowPlan(cfg, agent="erp-agent", system="erp")
    async with Outbox(tmp_path / "outbox.db") as outbox:
        capture = Capture(
            plan, outbox, Metrics(), open_source, outbox_max_bytes=10**9, handle=handle,
            config_retry=Backoff(base=0.01, cap=0.05),
        )  # fmt: skip
        async with anyio.create_task_group() as tg:
            await tg.start(capture.run)  # started although failing: the agent does not wait
            assert handle.problems == {"capture": "crm.db: table 't' does not exist"}
            await until(lambda: len(attempts) >= 3)  # retried, still failing
            assert "capture" in handle.problems
            broken["yes"] = False
            await until(lambda: not handle.problems)
            await until(lambda: _cursor(outbox))
            tg.cancel_scope.cancel()
    assert all(r.exc_info is None for r in caplog.records)
    failing = [r.getMessage() for r in caplog.records if "failing" in r.getMessage()]
    assert failing
    assert all("\n" not in m and "table 't' does not exist" in m for m in failing)
    assert any("recovered" in r.getMessage() for r in caplog.records)


async def _cursor(outbox: Outbox) -> bool:
    return await outbox.cursor("customers") == "1"
