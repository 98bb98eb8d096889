"""A 100,000-row PostgreSQL bulk run, its agent SIGKILLed twice mid-run: it resumes from its
last committed chunk and every row reaches the target exactly once (slow: ``crash``)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from tests._pg import PgCluster
from tests._secure import SecuredNatsServer as NatsServer
from tests.integration._harness import AgentProcess, assert_effect_once, log_tail, wait_until
from tests.integration.test_runs import (
    agent,
    create_runs_bucket,
    local_runs,
    make_target,
    meshctl,
    sink_flow,
    table,
)

pytestmark = [pytest.mark.integration, pytest.mark.crash, pytest.mark.timeout(600)]

N = 100_000


def test_a_100k_row_postgres_run_killed_twice_resumes_and_applies_once(
    tmp_path: Path, security_dir: Path, pg_cluster: PgCluster, pg_db: str
) -> None:
    with pg_cluster.connect(pg_db) as db:
        db.execute(
            "CREATE TABLE customers (id integer PRIMARY KEY, name text, credit bigint,"
            " updated_at bigint NOT NULL)"
        )
        # updated_at: the row's change sequence (what a real-time capture would version it by)
        db.execute(
            "INSERT INTO customers SELECT g, 'c' || g, g * 7, 1000000 + g FROM generate_series(1, %s) g", (N,)
        )
    dst = tmp_path / "crm.db"
    make_target(dst)
    server = NatsServer(tmp_path / "nats", security_dir, layout=True)
    server.start()
    source = sink = None
    try:
        create_runs_bucket(server)
        flow = f"""
[[flows]]
name = "customers"
entity = "customer"
[flows.source]
adapter = "postgres"
dsn = "{pg_cluster.dsn(pg_db)}"
table = "customers"
key = "id"
[flows.schedule]
cron = "0 2 * * *"
first_run = "now"
version_field = "updated_at"
chunk_size = 1000
"""
        source = agent(tmp_path, server, security_dir, "erp-agent", "erp", flow)
        sink = agent(tmp_path, server, security_dir, "crm-agent", "crm", sink_flow(dst))
        sink.start()
        source.start()
        state = source.state_dir
        killed_at: list[int] = []
        for _ in range(2):
            floor = killed_at[-1] if killed_at else 0
            wait_until(
                lambda f=floor: any(r.read >= f + 20_000 for r in local_runs(state)),  # type: ignore[misc]
                120, f"run progress\n{log_tail(source.log)}",
            )  # fmt: skip
            source.kill()
            run = local_runs(state)[-1]
            assert run.state == "running", f"run ended before the kill: {run}"
            killed_at.append(run.read)
            source.start()
        wait_until(lambda: any(r.state == "completed" for r in local_runs(state)), 300, "run completed")
        wait_until(lambda: len(table(dst)) == N, 300, f"{N} rows in the target\n{log_tail(sink.log)}")
        with pg_cluster.connect(pg_db) as db:
            want = [
                tuple(r) for r in db.execute("SELECT id, name, credit, updated_at FROM customers ORDER BY id")
            ]
        assert table(dst) == want
        assert_effect_once(dst)
        with sqlite3.connect(dst) as c:
            writes = c.execute("SELECT count(*) FROM data_log").fetchone()[0]
        assert writes == N, f"{writes} data writes for {N} rows: some row was applied twice"
        [run] = local_runs(state)
        assert (run.state, run.read, run.published, run.resumed) == ("completed", N, N, 2)
        print(f"killed at {killed_at} rows; run took {run.finished_at - run.started_at:.1f}s")  # type: ignore[operator]

        def applied() -> int:
            out = meshctl(server, "runs", "show", run.id, "--json")
            return int(json.loads(out.stdout)["run"]["applied"]) if out.returncode == 0 else -1

        wait_until(lambda: applied() == N, 60, "the sink's applied count in mesh_runs")
        source.terminate()
        sink.terminate()
    finally:
        for proc in (source, sink):
            if isinstance(proc, AgentProcess):
                proc.kill()
        server.stop()
