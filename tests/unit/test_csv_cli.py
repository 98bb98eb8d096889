"""``meshctl files runs``: run records of CSV imports and exports, read from real state files."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import anyio
import pytest
from typer.testing import CliRunner

from adapters.files.config import CsvSinkConfig, CsvSourceConfig
from adapters.files.csv_sink import CsvSink
from adapters.files.csv_source import CsvSource
from mesh.adapters import SinkRecord
from mesh.cli import app
from mesh.config import load_agent_config

pytestmark = pytest.mark.anyio

runner = CliRunner()

AGENT = """
[agent]
name = "files-agent"
system = "files"
state_dir = "state"
[[flows]]
name = "orders-in"
entity = "order"
[flows.source]
adapter = "csv"
inbox_dir = "in"
state_path = "state/orders-in.db"
key = "id"
settle_time = 0
[[flows]]
name = "orders-out"
entity = "order"
[flows.sink]
adapter = "csv"
out_dir = "out"
state_path = "state/orders-out.db"
[[flows]]
name = "other"
entity = "customer"
[flows.sink]
adapter = "sqlite"
path = "crm.db"
table = "customers"
key = "id"
"""


async def make_runs(tmp: Path) -> Path:
    config = tmp / "agent.toml"
    config.write_text(AGENT)
    for d in ("in", "out"):
        (tmp / d).mkdir()
    cfg = load_agent_config(config)
    src, sink = cfg.flows[0].source, cfg.flows[1].sink
    assert isinstance(src, CsvSourceConfig)
    assert isinstance(sink, CsvSinkConfig)
    data = tmp / "in" / "a.csv"
    data.write_text("id,v\n1,a\n2\n3,c\n")
    os.utime(data, (time.time() - 5, time.time() - 5))
    async with CsvSource(src) as source:
        batch = await source.read(None, 100)
        await source.committed(batch.cursor)
    async with CsvSink(sink) as out:
        await out.apply([SinkRecord(id="x", key="1", version=1, deleted=False, row={"id": "1"}, origin="o")])
        await out.flush()
    return config


async def test_runs_table_and_json(tmp_path: Path) -> None:
    config = await make_runs(tmp_path)
    result = runner.invoke(app, ["files", "runs", "--config", str(config)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == [
        "FLOW", "RUN", "DIRECTION", "STATUS", "STARTED", "FINISHED", "IN", "OUT", "FAILED", "SHA256", "FILE",
    ]  # fmt: skip
    body = {line.split()[0]: line.split() for line in lines[1:]}
    assert body["orders-in"][1:4] == ["1", "import", "complete"]
    assert body["orders-in"][6:9] == ["3", "2", "1"]
    assert "rejects:" in result.output
    assert body["orders-out"][1:4] == ["1", "export", "complete"]

    result = runner.invoke(app, ["files", "runs", "--config", str(config), "--flow", "orders-in", "--json"])
    assert result.exit_code == 0, result.output
    [run] = json.loads(result.output)
    assert run["flow"] == "orders-in"
    assert (run["rows_in"], run["rows_out"], run["rows_failed"]) == (3, 2, 1)
    assert run["file"] == str(tmp_path / "in" / "a.csv")
    assert len(run["checksum"]) == 64
    assert run["rejects_file"].endswith("orders-in-rejects/run-000001.csv")


def test_unknown_flow_or_no_csv_flow_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(AGENT)
    result = runner.invoke(app, ["files", "runs", "--config", str(config), "--flow", "other"])
    assert result.exit_code == 2
    assert "flow 'other' has no csv source or sink" in result.output
    result = runner.invoke(app, ["files", "runs", "--config", str(config)])
    assert result.exit_code == 0
    assert result.output.strip() == "no runs yet"
    result = runner.invoke(app, ["files", "runs", "--config", str(tmp_path / "missing.toml")])
    assert result.exit_code == 2
    assert "cannot read config" in result.output
    assert "Traceback" not in result.output


async def test_runs_are_readable_while_a_source_holds_the_state_file(tmp_path: Path) -> None:
    config = await make_runs(tmp_path)
    cfg = load_agent_config(config)
    src = cfg.flows[0].source
    assert isinstance(src, CsvSourceConfig)
    async with CsvSource(src):
        result = await anyio.to_thread.run_sync(
            lambda: runner.invoke(app, ["files", "runs", "-c", str(config), "--flow", "orders-in", "--json"])
        )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)[0]["status"] == "complete"
