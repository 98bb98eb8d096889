"""The control plane's view of bulk runs: ``/status`` lists the latest run of each flow from the
``mesh_runs`` bucket (source record plus the sinks' counts, with its age), and the bucket's
entries are kept ``runs_max_age`` seconds (applied at start, also to an existing bucket)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import msgspec
import pytest

from agents.control_plane import ControlPlane
from mesh.controlplane.settings import settings_from
from mesh.runs.records import BulkRun, SinkCounts, run_key
from mesh.runs.report import RUNS_BUCKET, RunEntry
from mesh.transport import JetStream
from tests._secure import SecuredNatsServer as NatsServer

pytestmark = [pytest.mark.integration, pytest.mark.anyio, pytest.mark.timeout(60)]


@asynccontextmanager
async def control_plane(server: NatsServer, **extra: Any) -> AsyncIterator[ControlPlane]:
    creds = server.security_dir / "creds" / "control-plane.creds"
    cp = ControlPlane(settings_from({
        "name": "cp1", "nats": {"servers": [server.url], "request_timeout": 2.0, "creds": str(creds)},
        "http_port": 0, "sweep_interval": 0.2, **extra,
    }))  # fmt: skip
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(15):
            await tg.start(lambda task_status: cp.run(task_status=task_status))
            await cp.lease.wait(leader=True)  # type: ignore[union-attr]
        try:
            yield cp
        finally:
            cp.stop()


async def max_age_of_runs_bucket(js: JetStream) -> float:
    msg = await js.request(f"$JS.API.STREAM.INFO.KV_{RUNS_BUCKET}", b"", timeout=5)
    return int(msgspec.json.decode(msg.data)["config"]["max_age"]) / 1e9


def entry(run: BulkRun | None = None, sink: SinkCounts | None = None) -> bytes:
    if run is not None:
        return msgspec.json.encode(RunEntry(role="source", source=run))
    return msgspec.json.encode(RunEntry(role="sink", sink=sink))


async def test_status_shows_the_latest_run_of_each_flow_and_the_bucket_keeps_runs_max_age(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    now = time.time()
    old = BulkRun(
        id="customers-20261201T020000Z", flow="customers", adapter="sqlite", agent="erp-agent",
        state="completed", started_at=now - 86400, finished_at=now - 86000, read=10, published=10,
    )  # fmt: skip
    new = BulkRun(
        id="customers-20261202T020000Z", flow="customers", adapter="sqlite", agent="erp-agent",
        state="completed", started_at=now - 700, finished_at=now - 600, read=12, published=12,
    )  # fmt: skip
    orders = BulkRun(
        id="orders-import-3", flow="orders", adapter="csv", agent="files-agent", state="running",
        started_at=now - 30, read=5, published=4, failed=1,
    )  # fmt: skip
    sink = SinkCounts(flow="customers", run=new.id, agent="crm-agent", applied=11, skipped=1)
    async with JetStream(nats_server.nats_config(request_timeout=2.0), name="test") as js:
        async with control_plane(nats_server, runs_max_age=3600) as cp:
            assert await max_age_of_runs_bucket(js) == 3600
            bucket = await js.key_value(RUNS_BUCKET, create=False)
            for r in (old, new, orders):
                await bucket.put(run_key(r.agent, r.flow, r.id, "source"), entry(r))
            await bucket.put(run_key("crm-agent", "customers", new.id, "sink"), entry(sink=sink))
            await bucket.put("bad-agent.customers.x.source", b"not json")  # left out, not fatal
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{cp.http_port}", timeout=5) as http:
                with anyio.fail_after(15):
                    while True:
                        runs = (await http.get("/status")).json()["runs"]
                        if len(runs) == 2 and runs[0]["applied"] == 11:
                            break
                        await anyio.sleep(0.05)
        customers, order_run = runs
        assert customers["flow"] == "customers"
        assert customers["run"] == new.id
        assert (customers["state"], customers["read"], customers["published"]) == ("completed", 12, 12)
        assert (customers["applied"], customers["skipped"], customers["failed"]) == (11, 1, 0)
        assert 600 <= customers["age_seconds"] < 700
        assert order_run["flow"] == "orders"
        assert (order_run["adapter"], order_run["state"], order_run["failed"]) == ("csv", "running", 1)
        assert order_run["finished_at"] is None
        assert 30 <= order_run["age_seconds"] < 120
        # A restart with another limit brings the existing bucket to it; its entries stay.
        async with control_plane(nats_server, runs_max_age=7 * 86400):
            assert await max_age_of_runs_bucket(js) == 7 * 86400
            assert await bucket.get(run_key(new.agent, new.flow, new.id, "source")) is not None


async def test_the_default_max_age_of_run_records_is_thirty_days(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async with (
        JetStream(nats_server.nats_config(request_timeout=2.0), name="test") as js,
        control_plane(nats_server),
    ):
        assert await max_age_of_runs_bucket(js) == 30 * 86400


async def test_a_run_record_older_than_runs_max_age_leaves_the_bucket(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """``runs_max_age = 1``: JetStream removes the entry about a second after its last put (the
    bucket's duplicate window is shortened to fit, as JetStream requires)."""
    run = BulkRun(id="customers-1", flow="customers", adapter="sqlite", agent="erp-agent", started_at=1.0)
    key = run_key(run.agent, run.flow, run.id, "source")
    async with (
        JetStream(nats_server.nats_config(request_timeout=2.0), name="test") as js,
        control_plane(nats_server, runs_max_age=1),
    ):
        bucket = await js.key_value(RUNS_BUCKET, create=False)
        await bucket.put(key, entry(run))
        assert await bucket.get(key) is not None
        with anyio.fail_after(20):
            while await bucket.get(key) is not None:
                await anyio.sleep(0.1)


async def test_a_real_agents_scheduled_run_shows_in_status(nats_server: NatsServer, tmp_path: Path) -> None:
    """End to end: an agent process runs a scheduled SQLite flow (``first_run = "now"``), reports
    its run to ``mesh_runs``, and the control plane's ``/status`` shows it completed."""
    from tests.integration._harness import AgentProcess, log_tail
    from tests.integration.test_runs import Versions, agent, bulk_flow, make_source

    src = tmp_path / "erp.db"
    make_source(src, 30, Versions())
    proc: AgentProcess | None = None
    async with control_plane(nats_server) as cp:
        proc = agent(tmp_path, nats_server, nats_server.security_dir, "erp-agent", "erp", bulk_flow(src))
        try:
            await anyio.to_thread.run_sync(proc.start)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{cp.http_port}", timeout=5) as http:
                with anyio.fail_after(60):
                    while True:
                        runs = (await http.get("/status")).json()["runs"]
                        if runs and runs[0]["state"] == "completed":
                            break
                        await anyio.sleep(0.1)
            [run] = runs
            assert (run["flow"], run["agent"], run["adapter"]) == ("customers", "erp-agent", "sqlite")
            assert (run["read"], run["published"]) == (30, 30), log_tail(proc.log)
            assert run["finished_at"] is not None
        finally:
            await anyio.to_thread.run_sync(proc.kill)
