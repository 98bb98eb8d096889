"""Tracing business transactions end to end, on a secured nats-server: an ERP change crosses
three systems (ERP -> CRM SQLite, ERP -> finance REST API); one of them is dead-lettered by the
finance API. ``meshctl trace`` finds each transaction by correlation id, envelope id and business
key and prints its path in time order; the control plane derives the statuses (/status,
/trace/<id>); an agent may not publish trace records under another agent's name."""

from __future__ import annotations

import json
import sqlite3
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from agents.connector import ConnectorAgent, agent_nats_config
from agents.control_plane import ControlPlane
from mesh.controlplane.settings import settings_from
from mesh.trace import TraceRecord, encode_batch
from mesh.transport import JetStream, OutMessage, Refused
from tests._secure import SecuredNatsServer as NatsServer
from tests._secure import secure_config
from tests.fakes.crm_api import serve_crm_api
from tests.integration._harness import agent_toml, make_crm, make_erp

pytestmark = [pytest.mark.anyio, pytest.mark.integration, pytest.mark.timeout(120)]


def finance_toml(tmp: Path, url: str, api: str) -> str:
    return f"""
[agent]
name = "finance-agent"
system = "finance"
state_dir = "{tmp / "s-fin"}"
[nats]
servers = ["{url}"]
request_timeout = 2.0
[[flows]]
name = "customers"
entity = "customer"
[flows.consumer]
fetch_timeout = 0.2
[flows.retry]
initial_delay = 0.2
max_delay = 1.0
[flows.sink]
adapter = "rest"
base_url = "{api}"
upsert_path = "/customers/{{key}}"
state_path = "{tmp / "s-fin" / "rest-versions.db"}"
timeout = 2.0
max_attempts = 2
"""


@asynccontextmanager
async def control_plane(server: NatsServer) -> AsyncIterator[ControlPlane]:
    cp = ControlPlane(settings_from({
        "name": "cp1", "http_port": 0,
        "nats": {"servers": [server.url], "request_timeout": 2.0,
                 "creds": str(server.security_dir / "creds" / "control-plane.creds")},
    }))  # fmt: skip
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(15):
            await tg.start(lambda task_status: cp.run(task_status=task_status))
        try:
            yield cp
        finally:
            cp.stop()


async def meshctl(server: NatsServer, *args: str) -> tuple[int, str, str]:
    access = ["--nats", server.url, "--creds", str(server.admin_creds)]
    cmd = [sys.executable, "-m", "mesh", "trace", *args, *access]
    done = await anyio.run_process(cmd, check=False)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def wait_for(what: str, check: Any, timeout: float = 30.0) -> Any:
    with anyio.fail_after(timeout):
        while True:
            found = await check()
            if found:
                return found
            await anyio.sleep(0.1)
    raise AssertionError(what)  # pragma: no cover


async def test_a_transaction_across_three_systems_traced_end_to_end(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    erp_db, crm_db = tmp_path / "erp.db", tmp_path / "crm.db"
    make_erp(erp_db)
    make_crm(crm_db)
    with sqlite3.connect(erp_db) as c:
        c.execute("INSERT INTO customers VALUES (1, 'Alfred', 'a@example.com', 'DE', 100, 1.5)")
        c.execute("INSERT INTO customers VALUES (2, 'Bertha', 'no-at-sign', 'FR', 200, 2.5)")
    erp_cfg = secure_config(agent_toml(
        name="erp-agent", system="erp", state=tmp_path / "s-erp", url=nats_server.url, source=erp_db,
    ), tmp_path / "erp.creds", nats_server)  # fmt: skip
    crm_cfg = secure_config(agent_toml(
        name="crm-agent", system="crm", state=tmp_path / "s-crm", url=nats_server.url, sink=crm_db,
    ), tmp_path / "crm.creds", nats_server)  # fmt: skip
    async with (
        serve_crm_api(tmp_path / "api.db") as api,
        control_plane(nats_server) as cp,
        anyio.create_task_group() as tg,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{cp.http_port}", timeout=5) as http,
    ):
        fin_toml = finance_toml(tmp_path, nats_server.url, api.url)
        fin_cfg = secure_config(fin_toml, tmp_path / "fin.creds", nats_server)
        for cfg in (erp_cfg, crm_cfg, fin_cfg):
            await tg.start(ConnectorAgent(cfg).run)

        async def settled() -> dict[str, Any] | None:
            one = await http.get("/trace/customer:1")
            two = await http.get("/trace/customer:2")
            if one.status_code != 200 or two.status_code != 200:
                return None
            t1, t2 = one.json()["transactions"][0], two.json()["transactions"][0]
            if t1["status"] != "completed" or t2["status"] != "failed":
                return None
            # records of different agents arrive in any order: wait for every one expected
            seen1 = {(r["kind"], r["system"]) for r in t1["records"]}
            done1 = seen1 >= {("applied", "crm"), ("applied", "finance")}
            done2 = any(r["kind"] == "applied" for r in t2["records"])  # the CRM took customer 2
            return {"one": t1, "two": t2} if done1 and done2 else None

        found = await wait_for("customer 1 completed and customer 2 failed", settled)
        one, two = found["one"], found["two"]

        # The control plane's /status counts them.
        status = (await http.get("/status")).json()
        tx = status["transactions"]
        assert tx["counts"]["completed"] >= 1
        assert tx["counts"]["failed"] >= 1
        assert two["correlation_id"] in [t["correlation_id"] for t in tx["recent_failed"]]
        assert tx["forged"] == 0
        await cp.txns.refresh_sinks()  # which sinks apply customers: the consumers on MESH_EVENTS
        assert cp.txns.sinks["customer"] == {"customers-crm", "customers-finance"}
        assert cp.txns.expected("customer", "erp") == {"customers-crm", "customers-finance"}
        assert cp.txns.expected("customer", "crm") == {"customers-finance"}
        page = (await http.get("/")).text
        assert '<span class="t-failed">failed ' in page
        assert f'href="#trace={two["correlation_id"]}"' in page  # opens /trace/<id> in the page

        # Customer 1: captured at the ERP, published, applied at the CRM and at finance, in time order.
        kinds = [(r["kind"], r["system"]) for r in one["records"]]
        assert kinds[:2] == [("captured", "erp"), ("published", "erp")], kinds
        assert sorted(kinds[2:]) == [("applied", "crm"), ("applied", "finance")], kinds
        times = [r["at"] for r in one["records"]]
        assert times == sorted(times)
        eid = one["records"][0]["envelope_id"]
        assert one["correlation_id"] == eid  # a new transaction starts at its capture
        assert {r["envelope_id"] for r in one["records"]} == {eid}
        # published names the envelope only (the relay decodes nothing); the rest name the key
        keys = [r.get("business_key") for r in one["records"]]
        assert keys == ["customer:1", None, "customer:1", "customer:1"]
        assert one["records"][0]["traceparent"].startswith("00-")

        # Customer 2: the finance API refused it (400): dead-lettered there, applied at the CRM.
        dead = [r for r in two["records"] if r["kind"] == "dead_lettered"]
        assert [(r["agent"], r["system"]) for r in dead] == [("finance-agent", "finance")]
        assert "email" in dead[0]["detail"]
        assert "dead-lettered" in two["reason"]

        # meshctl trace finds customer 1's transaction by correlation id, envelope id and key alike.
        printed = []
        for ident in (one["correlation_id"], eid, "customer:1"):
            rc, out, err = await meshctl(nats_server, ident, "--json")
            assert rc == 0, err
            doc = json.loads(out)
            assert [t["correlation_id"] for t in doc["transactions"]] == [one["correlation_id"]]
            printed.append([(r["kind"], r["agent"]) for r in doc["transactions"][0]["records"]])
        assert printed[0] == printed[1] == printed[2]

        rc, out, err = await meshctl(nats_server, "customer:2")
        assert rc == 0, err
        lines = out.splitlines()
        assert lines[0].startswith(f"transaction {two['correlation_id']}: failed")
        path = [line.split()[2] for line in lines[2:]]
        assert path[:2] == ["captured", "published"], out
        assert "dead_lettered" in path, out
        assert "applied" in path, out
        assert "finance-agent/finance" in out
        assert "crm-agent/crm" in out
        assert "erp-agent/erp" in out

        rc, out, err = await meshctl(nats_server, "--status", "failed", "--since", "1h", "--json")
        assert rc == 0, err
        listed = [t["correlation_id"] for t in json.loads(out)["transactions"]]
        assert two["correlation_id"] in listed
        assert one["correlation_id"] not in listed

        rc, out, err = await meshctl(nats_server, "customer:999")
        assert rc == 1
        assert "no transaction found" in err

        tg.cancel_scope.cancel()


async def test_an_agent_may_publish_trace_records_only_under_its_own_name(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    cfg = secure_config(agent_toml(
        name="erp-agent", system="erp", state=tmp_path / "s-erp", url=nats_server.url,
        source=tmp_path / "e.db",
    ), tmp_path / "erp.creds", nats_server)  # fmt: skip
    record = TraceRecord(kind="applied", at=1, agent="crm-agent", correlation_id="c1")
    async with JetStream(agent_nats_config(cfg), name="erp-agent") as js:
        with pytest.raises(Refused, match=r"^permission denied: publish to trace\.crm-agent\.applied$"):
            await js.publish(OutMessage("trace.crm-agent.applied", encode_batch([record]), "forged-1"))
        own = TraceRecord(kind="captured", at=1, agent="erp-agent", correlation_id="c1")
        assert await js.publish(OutMessage("trace.erp-agent.captured", encode_batch([own]), "own-1")) >= 1
        with pytest.raises(Refused, match=r"^permission denied: publish to trace\.erp-agent\.x\.y$"):
            await js.publish(OutMessage("trace.erp-agent.x.y", b"", "deep-1"))


async def test_trace_retention_is_configurable(nats_server: NatsServer) -> None:
    import nats

    from mesh.config import StreamsConfig, TraceRetention

    async with JetStream(nats_server.nats_config(), name="layout") as js:
        await js.ensure_streams(StreamsConfig())
        nc = await nats.connect(nats_server.url, user_credentials=str(nats_server.admin_creds))
        try:
            info = await nc.jetstream().stream_info("MESH_TRACE")
            assert info.config.subjects == ["trace.>"]
            assert (info.config.max_age, info.config.max_bytes) == (7 * 24 * 3600, 1 << 30)
            # the layout keepers bring an existing stream to the configured retention
            await js.ensure_streams(StreamsConfig(trace=TraceRetention(max_age=3600, max_bytes=5_000_000)))
            info = await nc.jetstream().stream_info("MESH_TRACE")
            assert (info.config.max_age, info.config.max_bytes) == (3600, 5_000_000)
        finally:
            await nc.close()


def extra_flow(name: str, *, source: Path | None = None, sink: Path | None = None) -> str:
    text = f'\n[[flows]]\nname = "{name}"\nentity = "customer"\n'
    if source is not None:
        text += f'[flows.source]\nadapter = "sqlite"\npath = "{source}"\ntable = "customers"\nkey = "id"\n'
        text += "poll_interval = 0.02\n"
    if sink is not None:
        text += "[flows.consumer]\nfetch_timeout = 0.2\n"
        text += f'[flows.sink]\nadapter = "sqlite"\npath = "{sink}"\ntable = "customers"\nkey = "id"\n'
    return text


async def test_the_echo_of_a_two_way_sync_stays_in_its_transaction(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """ERP -> CRM -> ERP: the CRM captures the change it just applied (its own change capture
    sees the write) and sends it back; the ERP finds nothing new. All of it is one transaction."""
    erp_db, crm_db = tmp_path / "erp.db", tmp_path / "crm.db"
    make_erp(erp_db)
    make_crm(crm_db)
    erp_cfg = secure_config(agent_toml(
        name="erp-agent", system="erp", state=tmp_path / "s-erp", url=nats_server.url, source=erp_db,
        extra=extra_flow("crm-out", sink=erp_db),
    ), tmp_path / "erp.creds", nats_server)  # fmt: skip
    crm_cfg = secure_config(agent_toml(
        name="crm-agent", system="crm", state=tmp_path / "s-crm", url=nats_server.url, sink=crm_db,
        extra=extra_flow("crm-out", source=crm_db),
    ), tmp_path / "crm.creds", nats_server)  # fmt: skip
    with sqlite3.connect(erp_db) as c:
        c.execute("INSERT INTO customers VALUES (5, 'Eve', 'e@example.com', 'DE', 100, 1.5)")
    async with (
        control_plane(nats_server) as cp,
        anyio.create_task_group() as tg,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{cp.http_port}", timeout=5) as http,
    ):
        for cfg in (erp_cfg, crm_cfg):
            await tg.start(ConnectorAgent(cfg).run)

        async def round_trip() -> list[dict[str, Any]] | None:
            answer = await http.get("/trace/customer:5")
            if answer.status_code != 200:
                return None
            [txn] = answer.json()["transactions"]
            # records of different agents arrive in any order: wait for all six
            kinds = {(r["kind"], r["system"]) for r in txn["records"]}
            return txn["records"] if len(kinds) == 6 and txn["status"] == "completed" else None

        records = await wait_for("the echo back at the ERP", round_trip)
        tg.cancel_scope.cancel()
    path = [(r["kind"], r["system"]) for r in records]
    assert sorted(path) == sorted([
        ("captured", "erp"), ("published", "erp"), ("applied", "crm"),
        ("captured", "crm"), ("published", "crm"), ("applied", "erp"),
    ]), path  # fmt: skip
    assert path[0] == ("captured", "erp")
    at = {p: r["at"] for p, r in zip(path, records, strict=True)}
    causal = [("captured", "erp"), ("applied", "crm"), ("captured", "crm"), ("applied", "erp")]
    assert [at[p] for p in causal] == sorted(at[p] for p in causal)
    first, echo = records[0], records[path.index(("captured", "crm"))]
    assert echo["causation_id"] == first["envelope_id"]
    assert echo["envelope_id"] != first["envelope_id"]
    assert echo["traceparent"].split("-")[1] == first["traceparent"].split("-")[1]
    back = records[path.index(("applied", "erp"))]
    assert back["outcome"] in ("unchanged", "stale", "not_owner")  # nothing new for the ERP


async def test_the_control_plane_rebuilds_its_index_from_recent_records(nats_server: NatsServer) -> None:
    import time

    from mesh.config import StreamsConfig
    from mesh.controlplane.txn import TxnTracker

    def batch(corr: str) -> bytes:
        return encode_batch([TraceRecord(kind="captured", at=1, agent="erp-agent", correlation_id=corr)])

    async with JetStream(nats_server.nats_config(), name="admin") as js:
        await js.ensure_streams(StreamsConfig())
        await js.publish(OutMessage("trace.erp-agent.captured", batch("old"), "m-old"))
        stored = time.time()
        with anyio.fail_after(5):
            while time.time() < stored + 0.3:  # the record must be older than the window below
                await anyio.sleep(0.05)
        everything, recent = TxnTracker(js, rebuild=0), TxnTracker(js, rebuild=0.25)
        async with anyio.create_task_group() as tg:
            for tracker in (everything, recent):
                await tg.start(tracker.run)
                with anyio.fail_after(10):
                    await tracker.caught_up.wait()
            assert [t.correlation_id for t in everything.index.find("old")] == ["old"]
            assert recent.index.find("old") == []  # beyond the rebuild window
            await js.publish(OutMessage("trace.erp-agent.captured", batch("new"), "m-new"))
            with anyio.fail_after(10):
                while not recent.index.find("new"):
                    await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
