"""Per-flow KPIs end to end: two agents move changes through a secured nats-server while two
control-plane replicas record them (the follower too). /status has rates, p50/p99, freshness,
SLO ratio, failures by class and dead letters (oldest age, top reasons); /api/series has points
on every replica; every /metrics exposition passes `promtool check metrics`; `meshctl top
--once` prints one plain frame of the same KPIs, and live `meshctl top` prints frame after frame
until Ctrl-C (exit 0)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import anyio
import pytest

from mesh.transport import JetStream, OutMessage
from tests._secure import SecuredNatsServer
from tests.integration._harness import rows, wait_until
from tests.integration._ops_stack import OpsStack, ops_stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _flow(stack: OpsStack) -> dict[str, object]:
    [flow] = [f for f in stack.get("/status")["flows"] if f["name"] == "customers"]
    return flow


def _promtool(exposition: str, tmp: Path) -> None:
    tool = shutil.which("promtool")
    if tool is None:
        reason = "promtool not found (apt-get install prometheus)"
        if os.environ.get("MESH_REQUIRE_PROMTOOL") == "1":
            pytest.fail(f"{reason} (and MESH_REQUIRE_PROMTOOL=1)")
        pytest.skip(reason)
    done = subprocess.run([tool, "check", "metrics"], input=exposition, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


async def _publish_garbage(stack: OpsStack, server: SecuredNatsServer) -> None:
    async with JetStream(server.nats_config(), name="test-garbage") as js:
        for i in range(3):
            await js.publish(OutMessage("evt.customer.upserted.erp", b"not an envelope", f"garbage-{i}"))


def test_kpis_in_status_series_metrics_and_top(nats_server: SecuredNatsServer, tmp_path: Path) -> None:
    with ops_stack(nats_server, tmp_path, replicas=2) as stack:
        stack.erp.insert(300)
        wait_until(lambda: len(rows(stack.crm_db)) == 300, 30, "300 rows at the CRM")
        anyio.run(_publish_garbage, stack, nats_server)
        stack.erp.insert(200)
        wait_until(lambda: len(rows(stack.crm_db)) == 500, 30, "500 rows at the CRM")

        def kpis_in() -> bool:
            f = _flow(stack)
            return (
                f["applied"] == 500 and f["captured"] == 500 and f["dlq_depth"] == 3
                and bool(f["dlq_top_reasons"]) and f["slo_ratio"] is not None
                and f["latency_p99_seconds"] is not None
            )  # fmt: skip

        wait_until(kpis_in, 30, "the flow's KPIs in /status")
        f = _flow(stack)
        assert f["failures"] == {"integrity": 3}
        assert f["slo_seconds"] == 5.0
        assert 0 < f["slo_ratio"] <= 1
        assert 0 < f["latency_p50_seconds"] <= f["latency_p99_seconds"] < 5
        assert f["freshness_seconds"] is not None
        assert f["dlq_oldest_age_seconds"] >= 0
        [reason] = f["dlq_top_reasons"]
        assert reason["error_class"] == "DecodeError"
        assert reason["count"] == 3
        systems = {s["name"]: s for s in stack.get("/status")["systems"]}
        assert systems["erp"]["sites"] == ["on-prem"]
        assert systems["crm"]["sites"] == ["cloud"]

        def applied_in_series(replica: str) -> bool:
            series = stack.get("/api/series?flow=customers&minutes=5", replica)
            return len(series["t"]) >= 2 and sum(v or 0 for v in series["applied_per_second"]) > 0

        for replica in stack.replicas:  # the follower records the series too
            # A follower sees the leader's stored heartbeats: counters up to 5 s old (README
            # "/status with many agents"), so its growth may land a few points later.
            wait_until(lambda r=replica: applied_in_series(r), 30, f"applied in the series on {replica}")
            series = stack.get("/api/series?flow=customers&minutes=5", replica)
            assert sum(v or 0 for v in series["applied_per_second"]) > 0, replica
            assert any(v is not None for v in series["latency_p99_seconds"]), replica

        cp_metrics = stack.text("/metrics")
        for name in ("mesh_cp_flow_applied_total{flow=\"customers\"}", "mesh_cp_flow_slo_ratio",
                     "mesh_cp_flow_latency_seconds{flow=\"customers\",quantile=\"0.99\"}",
                     "mesh_cp_flow_dead_letters_oldest_age_seconds", "mesh_cp_agent_heartbeat_age_seconds",
                     "mesh_cp_flow_freshness_seconds"):  # fmt: skip
            assert name in cp_metrics, name
        _promtool(cp_metrics, tmp_path)
        expositions = {}
        for agent in stack.agents:
            url = agent.readyz_url
            assert url is not None
            with urllib.request.urlopen(url.replace("/readyz", "/metrics"), timeout=5) as r:
                expositions[agent.config.stem] = exposition = r.read().decode()
            _promtool(exposition, tmp_path)
        erp, crm = expositions["erp-agent"], expositions["crm-agent"]
        assert 'mesh_flow_outbox_depth_messages{flow="customers"}' in erp
        assert 'mesh_flow_outbox_oldest_age_seconds{flow="customers"}' in erp
        assert 'mesh_failures_total{error_class="integrity",flow="customers"} 3.0' in crm
        assert 'mesh_slo_changes_total{flow="customers"} 500.0' in crm
        assert 'mesh_slo_target_seconds{flow="customers"} 5.0' in crm
        assert 'mesh_end_to_end_latency_seconds_bucket{flow="customers",le="0.005"}' in crm
        assert 'mesh_flow_freshness_seconds{flow="customers"}' in crm

        top = subprocess.run(
            [sys.executable, "-m", "mesh", "top", "--once", "--control-plane", stack.nats],
            capture_output=True, text=True, timeout=30, env={**os.environ, **stack.admin_env},
        )  # fmt: skip
        assert top.returncode == 0, top.stderr
        assert "\x1b" not in top.stdout
        lines = top.stdout.splitlines()
        assert any(line.startswith("on-prem") and "erp-agent" in line for line in lines), top.stdout
        assert any(line.startswith("cloud") and "crm-agent" in line for line in lines), top.stdout
        assert any(line.startswith("customers") for line in lines), top.stdout
        assert "customers: 3 x DecodeError" in top.stdout

        # live: frames one after the other (plain text off a terminal) until Ctrl-C, exit 0
        live = subprocess.Popen(
            [sys.executable, "-m", "mesh", "top", "-n", "0.3", "--control-plane", stack.nats],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **stack.admin_env},
        )  # fmt: skip
        assert live.stdout is not None
        frames = 0
        while frames < 2:
            line = live.stdout.readline()
            assert line, live.stderr.read() if live.stderr else "top ended"
            frames += line.startswith("meshctl top · replica")
        live.send_signal(signal.SIGINT)
        out, err = live.communicate(timeout=15)
        assert live.returncode == 0, err
        assert "\x1b" not in out
        assert "Traceback" not in err

        # an agent's own creds may not read the status (no publish right on <prefix>.status)
        refused = subprocess.run(
            [sys.executable, "-m", "mesh", "top", "--once", "--control-plane", stack.nats, "--timeout", "2"],
            capture_output=True, text=True, timeout=30,
            env={**os.environ, "MESH_CREDS": str(tmp_path / "erp-agent.creds")},
        )  # fmt: skip
        assert refused.returncode == 2, refused.stdout
        assert "permission denied" in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert "Traceback" not in refused.stderr
