"""An edge site's trace records reach the hub: ``meshctl leafnode link`` makes the hub's
MESH_TRACE source the leaf's, so ``meshctl trace`` and the control plane's transaction index at
the hub show the site's capture and publish next to the cloud's apply, catch up after a WAN cut,
and hold every record once. The site's dead letters stay on site; ``meshctl dlq list`` at the
hub says where they are.

Real hub and leaf nats-servers (secured, from the files ``meshctl leafnode config`` writes), an
edge SQLite source agent on the leaf and a cloud SQLite sink agent on the hub, as processes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections import Counter
from pathlib import Path

import anyio
import pytest

from mesh.config import NatsConfig, StreamsConfig, load_agent_config
from mesh.controlplane.txn import TxnTracker
from mesh.trace import TraceRecord, TxnIndex, decode_batch, encode_batch, load_index
from mesh.transport import DLQ_STREAM, TRACE_STREAM, JetStream, OutMessage, Refused
from tests._secure import create_layout, issue_agent_creds
from tests.integration._harness import (
    AgentProcess,
    ErpLoad,
    agent_toml,
    assert_effect_once,
    make_crm,
    make_erp,
    rows,
    wait_until,
)
from tests.integration._leaf import (
    EDGE,
    LinkWatcher,
    leaf_connected,
    make_topology,
    meshctl_leafnode,
    outbox_depth,
    stream_info,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

EDGE_AGENT = "erp-agent"


def _nats(url: str, creds: Path) -> NatsConfig:
    return NatsConfig(servers=[url], creds=str(creds), request_timeout=2.0)


def trace_index(url: str, creds: Path) -> TxnIndex:
    """Everything the server's MESH_TRACE holds, indexed (what ``meshctl trace`` reads)."""

    async def read() -> TxnIndex:
        async with JetStream(_nats(url, creds), name="test-trace") as js:
            return await load_index(js, timeout=2.0)

    return asyncio.run(read())


def edge_messages(url: str, creds: Path) -> tuple[list[str], list[TraceRecord]]:
    """The Nats-Msg-Ids and records of the edge agent's trace messages in the server's MESH_TRACE."""

    async def read() -> tuple[list[str], list[TraceRecord]]:
        ids: list[str] = []
        records: list[TraceRecord] = []
        async with JetStream(_nats(url, creds), name="test-trace") as js:
            info = await js.stream_info(TRACE_STREAM)
            if not info.messages:
                return ids, records
            async with await js.read_stream(TRACE_STREAM, subject=f"trace.{EDGE_AGENT}.>") as reader:
                while (msg := await reader.next(timeout=1.0)) is not None:
                    ids.append(msg.headers.get("Nats-Msg-Id", ""))
                    records.extend(decode_batch(msg.data))
                    if msg.seq >= info.last_seq:
                        break
        return ids, records

    return asyncio.run(read())


def journey(index: TxnIndex, key: str) -> set[tuple[str, str]]:
    """(kind, agent) of every record of the transactions of business key ``key``."""
    return {(r.kind, r.agent) for t in index.find(key) for r in t.records}


FULL = {("captured", EDGE_AGENT), ("published", EDGE_AGENT), ("applied", "crm-agent")}


def all_traced(url: str, creds: Path, ids: range, want: set[tuple[str, str]]) -> bool:
    index = trace_index(url, creds)
    return all(want <= journey(index, f"customer:{i}") for i in ids)


def meshctl(*args: str, creds: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mesh", *args, "--creds", str(creds)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def hub_tracker_view(url: str, creds: Path, keys: list[str]) -> tuple[dict[str, str], int]:
    """Run the control plane's :class:`TxnTracker` against the hub (with the control plane's
    creds) until every transaction of ``keys`` is completed: (status per key, forged count)."""

    async def run() -> tuple[dict[str, str], int]:
        async with JetStream(_nats(url, creds), name="test-tracker") as js:
            tracker = TxnTracker(js, rebuild=0)
            async with anyio.create_task_group() as tg:
                await tg.start(tracker.run)
                with anyio.fail_after(30):
                    await tracker.caught_up.wait()
                    while True:
                        await tracker.refresh_sinks()
                        found = {k: [v.status for v in tracker.trace(k)] for k in keys}
                        if all(s == ["completed"] for s in found.values()):
                            break
                        await anyio.sleep(0.2)
                tg.cancel_scope.cancel()
            return {k: v[0] for k, v in found.items()}, tracker.index.forged

    return asyncio.run(run())


@pytest.mark.parametrize("outage", ["wan-cut", "hub-crash"])
def test_edge_trace_records_reach_the_hub_and_catch_up_after_an_outage(
    tmp_path: Path, security_dir: Path, outage: str
) -> None:
    """``wan-cut``: the link drops while both servers stay up. ``hub-crash``: the hub is
    SIGKILLed and restarted on the same port and store (its sources then wait for nats-server's
    retry back-off, which ``link --watch`` cuts short)."""
    topo = make_topology(tmp_path, security_dir)
    admin = topo.admin_creds
    hub, leaf, link = topo.hub, topo.leaf, topo.link
    erp, crm = tmp_path / "erp.db", tmp_path / "crm.db"
    make_erp(erp)
    make_crm(crm)
    edge_state = tmp_path / "state" / EDGE_AGENT
    agents = []
    for name, system, url, kw in (
        (EDGE_AGENT, "erp", topo.edge_url, {"source": erp}),
        ("crm-agent", "crm", hub.url, {"sink": crm}),
    ):
        cfg = tmp_path / f"{name}.toml"
        cfg.write_text(agent_toml(name=name, system=system, state=tmp_path / "state" / name,
                                  url=url, creds=tmp_path / f"{name}.creds", **kw))  # type: ignore[arg-type]  # fmt: skip
        issue_agent_creds(cfg, security_dir)
        agents.append(AgentProcess(cfg, tmp_path / f"{name}.log"))
    source, sink = agents
    watcher = LinkWatcher(hub.url, tmp_path / "link-watch.log", admin)
    load = ErpLoad(erp, seed=11)
    try:
        hub.start()
        link.restore()
        leaf.start()
        wait_until(lambda: leaf_connected(hub), 15, "the leaf node to connect to the hub")
        create_layout(NatsConfig(servers=[leaf.url], creds=str(admin)))
        # The hub has no streams yet: link creates them, MESH_TRACE with the trace retention.
        code, out, err = meshctl_leafnode(
            "link", "--domain", EDGE, "--server", hub.url, "--wait", "10", "--creds", str(admin)
        )
        assert code == 0, err
        assert "hub now sources MESH_EVENTS and MESH_TRACE of domain" in out
        assert "MESH_TRACE source: lag" in out
        trace_info = stream_info(hub.url, admin, TRACE_STREAM)
        config = trace_info["config"]
        assert isinstance(config, dict)
        assert config["subjects"] == ["trace.>"]
        assert config["max_age"] == int(StreamsConfig().trace.max_age * 1e9)
        assert config["max_bytes"] == StreamsConfig().trace.max_bytes
        assert [s["external"]["api"] for s in config["sources"]] == [f"$JS.{EDGE}.API"]
        watcher.start()
        source.start()
        sink.start()

        # --- linked: the site's steps and the cloud's apply, in one transaction at the hub -----
        load.insert(20)
        wait_until(lambda: rows(erp) == rows(crm), 30, "the first rows to reach the CRM")
        wait_until(lambda: all_traced(hub.url, admin, range(1, 21), FULL), 30, "the hub to hold the trace")
        txn = trace_index(hub.url, admin).find("customer:7")
        assert len(txn) == 1
        done = meshctl("trace", txn[0].correlation_id, "--nats", hub.url, creds=admin)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0] == f"transaction {txn[0].correlation_id}: completed"
        kinds = [line.split()[2:4] for line in lines[2:]]
        edge = f"{EDGE_AGENT}/erp"
        # In time order; "published" is stamped at the leaf's PubAck, which may come after the
        # hub already applied the sourced event.
        assert kinds[0] == ["captured", edge]
        assert sorted(kinds[1:]) == [["applied", "crm-agent/crm"], ["published", edge]]

        # --- the outage: the site keeps tracing into the leaf -------------------------------------
        if outage == "wan-cut":
            link.cut()
            wait_until(lambda: not leaf_connected(hub), 10, "the hub to see the leaf gone")
        else:
            hub.kill()
        load.insert(20)
        wait_until(lambda: outbox_depth(edge_state) == 0, 20, "the edge outbox to drain into the leaf")
        at_site = {("captured", EDGE_AGENT), ("published", EDGE_AGENT)}
        wait_until(
            lambda: all_traced(leaf.url, admin, range(21, 41), at_site), 20, "the leaf to hold the trace"
        )
        if outage == "wan-cut":
            hub_index = trace_index(hub.url, admin)
            assert all(not hub_index.find(f"customer:{i}") for i in range(21, 41))
            # The site's dead letters stay on site; the hub says where they are (and that the
            # site does not answer now).
            dlq = meshctl("dlq", "list", "--server", hub.url, creds=admin)
            assert dlq.returncode == 0, dlq.stderr
            assert f"JetStream domain '{EDGE}'" in dlq.stderr
            assert "does not answer now" in dlq.stderr

        # --- the link returns: the hub's trace catches up ----------------------------------------
        if outage == "wan-cut":
            link.restore()
        else:
            hub.start()
        wait_until(lambda: rows(erp) == rows(crm), 45, "the CRM to catch up")
        wait_until(lambda: all_traced(hub.url, admin, range(1, 41), FULL), 45, "the hub's trace to catch up")

        # Every edge trace message and record is at the hub exactly once.
        leaf_ids, leaf_records = edge_messages(leaf.url, admin)
        hub_ids, hub_records = edge_messages(hub.url, admin)
        assert len(hub_ids) == len(set(hub_ids)), "a trace message was stored twice at the hub"
        assert sorted(hub_ids) == sorted(leaf_ids)
        assert Counter(record_key(r) for r in hub_records) == Counter(record_key(r) for r in leaf_records)
        assert sum(r.kind == "captured" for r in hub_records) == 40

        # The site's server refuses a record under another agent's subject; a record that claims
        # another agent on its own subject is sourced, and the hub's tracker refuses it.
        forge_at_site(tmp_path / f"{EDGE_AGENT}.toml")
        wait_until(lambda: forged_sourced(hub.url, admin), 30, "the forged record to be sourced")

        # The control plane's transaction index at the hub (control plane creds).
        keys = [f"customer:{i}" for i in (1, 20, 21, 40)]
        statuses, forged = hub_tracker_view(hub.url, security_dir / "creds" / "control-plane.creds", keys)
        assert statuses == dict.fromkeys(keys, "completed")
        assert forged == 1

        # A dead letter on site: the hub names the site and its count.
        dead_letter_at_site(leaf.url, admin)
        dlq = meshctl("dlq", "list", "--server", hub.url, creds=admin)
        assert dlq.returncode == 0, dlq.stderr
        assert f"its {DLQ_STREAM} holds 1 entry" in dlq.stderr
        assert f"{DLQ_STREAM} is empty" in dlq.stdout  # nothing copied into the hub's

        assert source.alive, f"the edge agent died; see {source.log}"
        assert sink.alive, f"the cloud agent died; see {sink.log}"
        assert source.terminate() == 0
        assert sink.terminate() == 0
    finally:
        watcher.stop()
        source.kill()
        sink.kill()
        topo.stop()
    assert_effect_once(crm)


def record_key(r: TraceRecord) -> tuple[object, ...]:
    return (r.kind, r.at, r.agent, r.envelope_id, r.correlation_id, r.flow, r.outcome)


def forge_at_site(config: Path) -> None:
    """Publish with the edge agent's own creds, to the leaf (its config's server)."""
    from agents.connector import agent_nats_config

    cfg = load_agent_config(config)

    async def run() -> None:
        claim = TraceRecord(kind="applied", at=1, agent="crm-agent", correlation_id="forged-at-edge")
        async with JetStream(agent_nats_config(cfg), name=EDGE_AGENT) as js:
            with pytest.raises(Refused, match=r"^permission denied: publish to trace\.crm-agent\.applied$"):
                await js.publish(OutMessage("trace.crm-agent.applied", encode_batch([claim]), "forged-1"))
            await js.publish(OutMessage(f"trace.{EDGE_AGENT}.applied", encode_batch([claim]), "forged-2"))

    asyncio.run(run())


def forged_sourced(hub_url: str, creds: Path) -> bool:
    index = trace_index(hub_url, creds)
    return index.forged == 1 and not index.find("forged-at-edge")


def dead_letter_at_site(leaf_url: str, creds: Path) -> None:
    async def run() -> None:
        async with JetStream(_nats(leaf_url, creds), name="test-dlq") as js:
            await js.publish(OutMessage("dlq.customers", b"not an envelope", "dead-1"))

    asyncio.run(run())
