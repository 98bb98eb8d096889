"""``meshctl runs start`` and CSV file runs in ``mesh_runs``, end to end: real agent processes on a
secured nats-server, a scheduled SQLite flow started by hand (its schedule's time is far away), a
CSV import on the same agent, both listed by ``meshctl runs list`` from the bucket."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import NamedTuple

import anyio
import pytest

from mesh.controlplane.models import AgentCommand, encode
from mesh.transport import Refused
from mesh.transport.jetstream import JetStream
from tests._secure import SecuredNatsServer as NatsServer
from tests.integration._harness import AgentProcess, log_tail, wait_until
from tests.integration.test_runs import (
    Versions,
    agent,
    create_runs_bucket,
    make_source,
    make_target,
    sink_flow,
    table,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def bulk_and_csv_flows(src: Path, tmp: Path) -> str:
    return f"""
[[flows]]
name = "customers"
entity = "customer"
[flows.source]
adapter = "sqlite"
path = "{src}"
table = "customers"
key = "id"
[flows.schedule]
cron = "0 2 1 1 *"          # once a year: nothing runs unless started by hand
version_field = "updated_at"
chunk_size = 20
[[flows]]
name = "orders-in"
entity = "order"
[flows.source]
adapter = "csv"
inbox_dir = "{tmp / "inbox"}"
state_path = "{tmp / "orders-in.db"}"
key = "id"
settle_time = 0
poll_interval = 0.05
"""


class Result(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def meshctl(server: NatsServer, *args: str) -> Result:
    """``meshctl`` in process (a subprocess costs seconds of imports on a loaded machine)."""
    from typer.testing import CliRunner

    from mesh.cli import app

    env = {"MESH_CREDS": str(server.admin_creds)}
    r = CliRunner().invoke(app, [*args, "--control-plane", server.url], env=env)
    return Result(r.exit_code, r.stdout, r.stderr)


def bucket_runs(server: NatsServer) -> dict[str, dict[str, object]]:
    got = meshctl(server, "runs", "list", "--json")
    assert got.returncode == 0, got.stderr
    return {str(r["id"]): r for r in json.loads(got.stdout)}


def test_runs_start_runs_a_scheduled_flow_now_and_csv_runs_are_listed_across_agents(
    tmp_path: Path, security_dir: Path
) -> None:
    src, dst = tmp_path / "erp.db", tmp_path / "crm.db"
    make_source(src, 50, Versions())
    make_target(dst)
    (tmp_path / "inbox").mkdir()
    server = NatsServer(tmp_path / "nats", security_dir, layout=True)
    server.start()
    procs: list[AgentProcess] = []
    try:
        create_runs_bucket(server)
        erp = agent(tmp_path, server, security_dir, "erp-agent", "erp", bulk_and_csv_flows(src, tmp_path))
        crm = agent(tmp_path, server, security_dir, "crm-agent", "crm", sink_flow(dst))
        procs += [erp, crm]
        crm.start()
        erp.start()
        data = tmp_path / "inbox" / "orders-1.csv"
        data.write_text("id,item\n1,a\n2,b\n3,c\n")
        os.utime(data, (time.time() - 5, time.time() - 5))

        started = meshctl(server, "runs", "start", "customers", "--agent", "erp-agent")
        assert started.returncode == 0, started.stderr + log_tail(erp.log)
        prefix = time.strftime("customers-%Y%m%dT", time.gmtime())
        assert started.stdout.startswith(f"customers on erp-agent: run {prefix}"), started.stdout
        run_id = started.stdout.split()[4]
        assert run_id.endswith("-now")
        wait_until(lambda: len(table(dst)) == 50, 60, f"50 rows in the target\n{log_tail(crm.log)}")

        def listed() -> bool:
            runs = bucket_runs(server)
            r, f = runs.get(run_id), runs.get("orders-in-import-1")
            return (r is not None and r["state"] == "completed" and r["applied"] == 50
                    and f is not None and f["state"] == "completed")  # fmt: skip

        wait_until(listed, 60, f"both runs in mesh_runs\n{log_tail(erp.log)}")
        runs = bucket_runs(server)
        bulk, csv = runs[run_id], runs["orders-in-import-1"]
        assert (bulk["adapter"], bulk["agent"], bulk["read"], bulk["published"]) == (
            "sqlite",
            "erp-agent",
            50,
            50,
        )
        assert (csv["adapter"], csv["agent"], csv["read"], csv["published"], csv["failed"]) == (
            "csv", "erp-agent", 3, 3, 0
        )  # fmt: skip

        # What cannot run says so in one line, exit 1.
        for flow, agent_name, why in [
            ("nosuch", "erp-agent", "agent erp-agent runs no source of flow 'nosuch'"),
            ("customers", "crm-agent", "agent crm-agent runs no source of flow 'customers'"),
            ("orders-in", "erp-agent", "flow orders-in on agent erp-agent has no [flows.schedule]"),
        ]:
            refused = meshctl(server, "runs", "start", flow, "--agent", agent_name)
            assert refused.returncode == 1, refused.stdout
            assert refused.stderr.startswith(f"error: {flow} on {agent_name}: {why}"), refused.stderr
            assert len(refused.stderr.strip().splitlines()) == 1
        away = meshctl(server, "runs", "start", "customers", "--agent", "nobody", "--timeout", "1")
        assert away.returncode == 2
        assert away.stderr.startswith("error: agent nobody did not answer the run command")
        assert "Traceback" not in away.stderr

        # An agent may not command another one (the permission table: only its own subject).
        async def forged() -> None:
            creds = str(tmp_path / "crm-agent.creds")
            cfg = server.nats_config(creds=creds, inbox_prefix="_INBOX.crm-agent")
            async with JetStream(cfg, name="crm-agent") as js:
                cmd = encode(AgentCommand(op="run", flow="customers"))
                with pytest.raises(
                    Refused, match=r"^permission denied: publish to mesh\.cp\.agent\.erp-agent"
                ):
                    await js.request("mesh.cp.agent.erp-agent", cmd, timeout=5)

        anyio.run(forged)
        with sqlite3.connect(src) as c:
            assert c.execute("SELECT count(*) FROM customers").fetchone() == (50,)
        for p in procs:
            p.terminate()
    finally:
        for p in procs:
            p.kill()
        server.stop()
