"""``meshctl dlq`` and ``meshctl flow replay`` against a real nats-server and in-process agents:
a record the sink rejects is dead-lettered with every header, listed, shown, fixed and replayed
so that it applies exactly once; purge removes only what its filters match; a flow replayed
from the start goes through the inbox again and changes nothing."""

from __future__ import annotations

import functools
import json
import re
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import nats
import pytest
from typer import Typer
from typer.testing import CliRunner, Result

import mesh.cli.main  # noqa: F401  (builds the command tree: gives the groups their --creds option)
from agents.connector import ConnectorAgent
from mesh.broker import free_port
from mesh.cli.dlq import app as dlq_app
from mesh.cli.flow import app as flow_app
from mesh.config import parse_agent_config
from mesh.dlq import DLQ_HEADERS
from mesh.metrics import Metrics
from tests._secure import SecuredNatsServer as NatsServer
from tests._secure import secure_agent
from tests.integration._harness import (
    WRITE_LOG,
    ErpLoad,
    agent_toml,
    assert_effect_once,
    make_crm,
    make_erp,
    rows,
)

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

runner = CliRunner()

# The CRM refuses negative credit limits; the ERP allows them.
CHECKED_CUSTOMERS = """
CREATE TABLE customers (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    email TEXT,
    country TEXT,
    credit_limit_cents INTEGER NOT NULL DEFAULT 0 CHECK (credit_limit_cents >= 0),
    balance REAL
);
"""

RELAX_CHECK = """
BEGIN;
CREATE TABLE customers_relaxed (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    email TEXT,
    country TEXT,
    credit_limit_cents INTEGER NOT NULL DEFAULT 0,
    balance REAL
);
INSERT INTO customers_relaxed SELECT * FROM customers;
DROP TABLE customers;
ALTER TABLE customers_relaxed RENAME TO customers;
COMMIT;
"""


async def cli(app: Typer, *args: str, server: NatsServer | str, stdin: str | None = None) -> Result:
    """Run a command of ``app`` in a worker thread (it runs its own event loop), as the admin
    (``MESH_CREDS``)."""
    url = server if isinstance(server, str) else server.url
    env = {} if isinstance(server, str) else {"MESH_CREDS": str(server.admin_creds)}
    invoke = functools.partial(runner.invoke, app, [*args, "--server", url], input=stdin, env=env)
    result = await anyio.to_thread.run_sync(invoke)
    assert "Traceback" not in result.output, result.output
    return result


def listed(result: Result) -> list[int]:
    """The DLQ sequences in a ``dlq list`` table."""
    assert result.exit_code == 0, result.output
    return [int(m[1]) for m in re.finditer(r"^(\d+)\s+\d{4}-", result.output, re.MULTILINE)]


@asynccontextmanager
async def running(*agents: ConnectorAgent) -> AsyncIterator[None]:
    async with anyio.create_task_group() as tg:
        for a in agents:
            await tg.start(a.run)
        yield
        tg.cancel_scope.cancel()


async def stream_count(server: NatsServer, stream: str) -> int:
    nc = await nats.connect(server.url, user_credentials=str(server.admin_creds))
    try:
        return int((await nc.jetstream().stream_info(stream)).state.messages)
    finally:
        await nc.close()


async def wait_for(what: str, predicate: object, timeout: float = 15) -> None:
    with anyio.fail_after(timeout):
        while True:
            value = predicate() if callable(predicate) else predicate
            if hasattr(value, "__await__"):
                value = await value
            if value:
                return
            await anyio.sleep(0.1)


async def consumer_settled(server: NatsServer, durable: str = "customers-crm") -> bool:
    nc = await nats.connect(server.url, user_credentials=str(server.admin_creds))
    try:
        info = await nc.jetstream().consumer_info("MESH_EVENTS", durable)
    finally:
        await nc.close()
    return info.num_pending == 0 and info.num_ack_pending == 0


def writes(db: Path, key: str) -> tuple[int, int]:
    """(version-guard moves, data writes) for one key: both 1 when it applied exactly once."""
    with sqlite3.connect(db) as c:
        moves = c.execute("SELECT count(*) FROM version_log WHERE key = ?", (key,)).fetchone()[0]
        data = c.execute("SELECT count(*) FROM data_log WHERE key = ?", (key,)).fetchone()[0]
    return moves, data


def agents(tmp: Path, server: NatsServer, erp: Path, crm: Path) -> tuple[ConnectorAgent, ConnectorAgent]:
    erp_cfg = parse_agent_config(agent_toml(
        name="erp-agent", system="erp", state=tmp / "s-erp", url=server.url, source=erp,
        creds=tmp / "erp-agent.creds",
    ))  # fmt: skip
    crm_cfg = parse_agent_config(agent_toml(
        name="crm-agent", system="crm", state=tmp / "s-crm", url=server.url, sink=crm,
        creds=tmp / "crm-agent.creds",
    ))  # fmt: skip
    secure_agent(erp_cfg, server)
    secure_agent(crm_cfg, server)
    return ConnectorAgent(erp_cfg, metrics=Metrics()), ConnectorAgent(crm_cfg, metrics=Metrics())


async def test_rejected_record_is_listed_shown_then_fixed_and_replayed_once(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    erp, crm = tmp_path / "erp.db", tmp_path / "crm.db"
    make_erp(erp)
    with sqlite3.connect(crm) as c:
        c.execute("PRAGMA journal_mode=WAL")
        c.executescript(CHECKED_CUSTOMERS + WRITE_LOG)
    with sqlite3.connect(erp) as c:
        c.executemany(
            "INSERT INTO customers VALUES (?, ?, ?, ?, ?, ?)",
            [
                (i, f"Customer {i}", f"c{i}@example.com", "DE", -100 if i == 6 else i * 100, 1.5)
                for i in range(1, 8)
            ],
        )
    erp_agent, crm_agent = agents(tmp_path, nats_server, erp, crm)
    async with running(erp_agent, crm_agent):
        await wait_for("6 rows and 1 dead letter", lambda: len(rows(crm)) == 6)
        await wait_for("the dead letter", lambda: stream_count(nats_server, "MESH_DLQ"))
        assert [r[0] for r in rows(crm)] == [1, 2, 3, 4, 5, 7]

        # list, with every filter matching and not matching
        table = await cli(dlq_app, "list", server=nats_server)
        [seq] = listed(table)
        line = next(row for row in table.output.splitlines() if row.startswith(str(seq)))
        for part in ("customers", "RejectedRecord", "evt.customer.upserted.erp", "CHECK constraint"):
            assert part in line
        assert line.split()[6] == "6"  # the envelope key
        for args, expected in [
            (("--flow", "customers"), [seq]),
            (("--flow", "orders"), []),
            (("--error", "rejectedrecord"), [seq]),
            (("--error", "DecodeError"), []),
            (("--reason", "check constraint"), [seq]),
            (("--reason", "NOT NULL"), []),
            (("--since", "10m"), [seq]),
            (("--since", "2999-01-01T00:00:00Z"), []),
            (("--until", "10m"), []),
            (("--flow", "customers", "--error", "RejectedRecord", "--since", "1h", "--limit", "5"), [seq]),
        ]:
            assert listed(await cli(dlq_app, "list", *args, server=nats_server)) == expected, args
        [summary] = json.loads((await cli(dlq_app, "list", "--json", server=nats_server)).output)
        assert summary["envelope"]["key"] == "6"
        assert summary["error"] == "RejectedRecord"
        assert summary["permanent"] is True
        assert summary["attempts"] == 1
        assert summary["agent"] == "crm-agent"

        # show: every header, the envelope, the payload as JSON
        shown = await cli(dlq_app, "show", str(seq), "--json", server=nats_server)
        entry = json.loads(shown.output)
        assert set(entry["headers"]) >= DLQ_HEADERS
        assert entry["headers"]["Content-Type"].startswith("application/msgpack")
        assert entry["headers"]["Mesh-Original-Subject"] == "evt.customer.upserted.erp"
        assert entry["payload"]["credit_limit_cents"] == -100
        text = (await cli(dlq_app, "show", str(seq), server=nats_server)).output
        for name in DLQ_HEADERS:
            assert f"  {name}: " in text
        assert '"credit_limit_cents": -100' in text
        assert "key: 6" in text
        missing = await cli(dlq_app, "show", "9999", server=nats_server)
        assert missing.exit_code == 2
        assert missing.output.strip() == "error: no DLQ entry with seq 9999 in MESH_DLQ"

        # fix the cause, then replay: --keep twice (the second is a duplicate inside the window)
        with sqlite3.connect(crm) as c:
            c.executescript(RELAX_CHECK + WRITE_LOG)
        events = await stream_count(nats_server, "MESH_EVENTS")
        dry = await cli(dlq_app, "replay", "--dry-run", server=nats_server)
        assert "would replay 1 entry" in dry.output
        assert await stream_count(nats_server, "MESH_EVENTS") == events
        kept = await cli(dlq_app, "replay", str(seq), "--keep", server=nats_server)
        assert kept.exit_code == 0, kept.output
        assert "replayed 1, failed 0, skipped 0; kept in the DLQ" in kept.output
        await wait_for("the fixed row", lambda: 6 in [r[0] for r in rows(crm)])
        again = await cli(dlq_app, "replay", "--flow", "customers", "--keep", server=nats_server)
        assert "replayed 1 (1 already stored inside the duplicate window)" in again.output
        done = await cli(dlq_app, "replay", "--error", "RejectedRecord", server=nats_server)
        assert "1 deleted from MESH_DLQ" in done.output
        assert await stream_count(nats_server, "MESH_EVENTS") == events + 1  # stored once
        assert await stream_count(nats_server, "MESH_DLQ") == 0
        nothing = await cli(dlq_app, "replay", server=nats_server)
        assert "nothing to replay" in nothing.output
        await wait_for("the sink to settle", lambda: consumer_settled(nats_server))
        await anyio.sleep(0.3)
    assert rows(crm) == rows(erp)
    assert writes(crm, "6") == (1, 1)  # applied exactly once
    assert_effect_once(crm)
    assert listed(await cli(dlq_app, "list", server=nats_server)) == []


async def test_purge_removes_only_what_the_filters_match(tmp_path: Path, nats_server: NatsServer) -> None:
    missing = await cli(dlq_app, "list", server=nats_server)
    assert missing.exit_code == 0
    assert "does not exist yet" in missing.output
    assert json.loads((await cli(dlq_app, "list", "--json", server=nats_server)).output) == []

    nc = await nats.connect(nats_server.url, user_credentials=str(nats_server.admin_creds))
    js = nc.jetstream()
    await js.add_stream(name="MESH_DLQ", subjects=["dlq.>"])
    await js.add_stream(name="MESH_EVENTS", subjects=["evt.>"])
    entries = [  # (flow, error class, reason)
        ("a", "RejectedRecord", "customers key '1': CHECK constraint failed"),
        ("a", "DecodeError", "not a valid envelope"),
        ("b", "RejectedRecord", "NOT NULL constraint failed: customers.name"),
        ("b", "RejectedRecord", "CHECK constraint failed: credit"),
        ("a", "DecodeError", "garbage without a subject"),
    ]
    for i, (flow, error, reason) in enumerate(entries, start=1):
        headers = {"Mesh-Flow": flow, "Mesh-Error-Class": error, "Mesh-Reason": reason, "Mesh-Attempts": "1"}
        if i != 5:
            headers["Mesh-Original-Subject"] = f"evt.thing.upserted.{flow}"
        await js.publish(f"dlq.{flow}", b"\xc1 not an envelope", headers=headers)
    await nc.close()

    assert listed(await cli(dlq_app, "list", "--reason", "check", server=nats_server)) == [1, 4]
    assert listed(
        await cli(dlq_app, "list", "--flow", "b", "--error", "rejectedRECORD", server=nats_server)
    ) == [3, 4]
    assert listed(await cli(dlq_app, "list", "--limit", "2", server=nats_server)) == [1, 2]

    narrow = ("--flow", "b", "--reason", "NOT NULL")
    declined = await cli(dlq_app, "purge", *narrow, server=nats_server, stdin="n\n")
    assert declined.exit_code == 1
    assert "delete 1 entry from MESH_DLQ?" in declined.output
    assert listed(await cli(dlq_app, "list", server=nats_server)) == [1, 2, 3, 4, 5]
    confirmed = await cli(dlq_app, "purge", *narrow, server=nats_server, stdin="y\n")
    assert "deleted 1 entry" in confirmed.output
    assert listed(await cli(dlq_app, "list", server=nats_server)) == [1, 2, 4, 5]
    purged = await cli(dlq_app, "purge", "--reason", "CHECK", "--yes", server=nats_server)
    assert "deleted 2 entries" in purged.output
    assert listed(await cli(dlq_app, "list", server=nats_server)) == [2, 5]
    assert "nothing to purge" in (await cli(dlq_app, "purge", "--flow", "zzz", server=nats_server)).output

    # an entry without an original subject is skipped by replay, and stays
    skipped = await cli(dlq_app, "replay", "5", server=nats_server)
    assert skipped.exit_code == 0
    assert "replayed 0, failed 0, skipped 1" in skipped.output
    assert (await cli(dlq_app, "replay", "77", server=nats_server)).exit_code == 2  # no such seq
    assert listed(await cli(dlq_app, "list", server=nats_server)) == [2, 5]

    everything = await cli(dlq_app, "purge", "--yes", server=nats_server)
    assert "deleted 2 entries" in everything.output
    assert "MESH_DLQ is empty" in (await cli(dlq_app, "list", server=nats_server)).output

    bad_time = await cli(dlq_app, "list", "--since", "yesterday", server=nats_server)
    assert bad_time.exit_code == 2
    assert bad_time.output.startswith("error: --since:")
    down = await cli(dlq_app, "list", server=f"nats://127.0.0.1:{free_port()}")
    assert down.exit_code == 2
    assert down.output.count("\n") == 1
    assert down.output.startswith("error: cannot connect")


async def test_flow_replay_redelivers_everything_and_changes_nothing(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    erp, crm = tmp_path / "erp.db", tmp_path / "crm.db"
    make_erp(erp)
    make_crm(crm)
    load = ErpLoad(erp)
    load.insert(200)
    load.update(80)
    load.delete(20)
    erp_agent, crm_agent = agents(tmp_path, nats_server, erp, crm)
    metrics = crm_agent.metrics.registry

    def consumed(outcome: str) -> float:
        value = metrics.get_sample_value(
            "mesh_consumed_messages_total", {"flow": "customers", "outcome": outcome}
        )
        return value or 0.0

    def log_sizes() -> tuple[int, int]:
        with sqlite3.connect(crm) as c:
            return (
                c.execute("SELECT count(*) FROM version_log").fetchone()[0],
                c.execute("SELECT count(*) FROM data_log").fetchone()[0],
            )

    async with running(erp_agent, crm_agent):
        await wait_for("sync", lambda: rows(erp) == rows(crm), timeout=30)
        await wait_for("the sink to settle", lambda: consumer_settled(nats_server))
        events = await stream_count(nats_server, "MESH_EVENTS")
        assert events >= 180
        before_rows, before_logs = rows(crm), log_sizes()
        applied, duplicates = consumed("applied"), consumed("duplicate")

        result = await cli(flow_app, "replay", "customers", "--from-seq", "1", server=nats_server)
        assert result.exit_code == 0, result.output
        assert "consumer customers-crm (MESH_EVENTS, filter evt.customer.>) reset" in result.output
        assert "redelivering from stream seq 1" in result.output
        assert "now pending: " in result.output
        await wait_for("every event again", lambda: consumed("duplicate") >= duplicates + events)
        await wait_for("the sink to settle", lambda: consumer_settled(nats_server))

        since = await cli(
            flow_app, "replay", "customers", "--since", "1h", "--sink-system", "crm", server=nats_server
        )
        assert since.exit_code == 0, since.output
        assert "redelivering from stream seq 1 (first message since" in since.output
        await wait_for("every event a third time", lambda: consumed("duplicate") >= duplicates + 2 * events)
        await wait_for("the sink to settle", lambda: consumer_settled(nats_server))

        ahead = await cli(flow_app, "replay", "customers", "--from-seq", "5000", server=nats_server)
        assert ahead.exit_code == 0
        assert "nothing changed" in ahead.output
        for args in (("--sink-system", "nope", "--from-seq", "1"), ("--from-seq", "1", "--since", "1h"), ()):
            refused = await cli(flow_app, "replay", "customers", *args, server=nats_server)
            assert refused.exit_code == 2, refused.output
            assert refused.output.startswith("error: "), refused.output
        await anyio.sleep(0.3)
    assert consumed("applied") == applied  # nothing applied again
    assert rows(crm) == before_rows == rows(erp)
    assert log_sizes() == before_logs  # no (key, version) written twice, no write at all
    assert_effect_once(crm)
