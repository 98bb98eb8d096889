"""An agent without a control plane (not registered) is not at fault: its heartbeat actor says so
once, at info level, and sends nothing; credentials of another agent are a warning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from mesh.controlplane.identity import Credentials, save_credentials
from mesh.controlplane.models import HeartbeatPayload
from mesh.heartbeat import Heartbeat
from mesh.transport import Transport

pytestmark = pytest.mark.anyio


async def _no_broker() -> Transport:
    raise AssertionError("an unregistered agent must not reach for the broker")


async def _collect() -> HeartbeatPayload:
    return HeartbeatPayload()


async def test_unregistered_agent_says_once_what_standalone_means(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hb = Heartbeat("erp", "plant-1", _no_broker, _collect, state_dir=tmp_path, interval=1)
    with caplog.at_level(logging.DEBUG, logger="mesh.heartbeat"):
        for _ in range(5):
            assert await hb.beat() is None
    records = [r for r in caplog.records if r.name == "mesh.heartbeat"]
    assert [r.levelno for r in records] == [logging.INFO]
    text = records[0].getMessage()
    assert "runs without a control plane" in text
    assert "no heartbeats and takes no remote commands" in text
    assert f"meshctl agent register --name erp --site plant-1 --state-dir {tmp_path}" in text
    assert hb.sent == 0


async def test_credentials_of_another_agent_are_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    save_credentials(tmp_path, Credentials(agent_id="a1", name="crm", site="cloud", token="t" * 32))
    hb = Heartbeat("erp", "plant-1", _no_broker, _collect, state_dir=tmp_path, interval=1)
    with caplog.at_level(logging.DEBUG, logger="mesh.heartbeat"):
        assert await hb.beat() is None
        assert await hb.beat() is None  # within the minute: not repeated
    records = [r for r in caplog.records if r.name == "mesh.heartbeat"]
    assert [r.levelno for r in records] == [logging.WARNING]
    assert "are agent crm's" in records[0].getMessage()
