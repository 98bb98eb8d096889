"""Leaf-node topology: an on-prem leaf nats-server with its own JetStream domain, connected to a
cloud hub. The edge agent keeps capturing and publishing into the leaf while the hub is down, and
the hub's MESH_EVENTS (which sources the leaf's) catches up once it is back.

Both servers run from the files ``meshctl leafnode config`` writes, on random loopback ports."""

from __future__ import annotations

import json
import threading
import time
from functools import partial
from pathlib import Path

import anyio
import pytest

from mesh.config import NatsConfig, StreamsConfig, TraceRetention
from mesh.errors import ConfigError, TransportError
from mesh.leafnode import (
    check_nats_config,
    edge_dead_letters,
    edge_source_status,
    ensure_domain_source,
    ensure_edge_sourcing,
    linked_domains,
    remove_domain_source,
    remove_edge_sourcing,
    watch_edge_sourcing,
)
from mesh.transport import EVENTS_STREAM, TRACE_STREAM, JetStream, OutMessage
from tests._secure import SecuredNatsServer as NatsServer
from tests._secure import create_layout, issue_agent_creds
from tests.integration._harness import (
    AgentProcess,
    ErpLoad,
    agent_toml,
    assert_effect_once,
    assert_same_rows,
    consumer_settled,
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
    stream_messages,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.mark.parametrize("outage", ["wan-cut", "hub-crash"])
def test_edge_keeps_publishing_through_an_outage(tmp_path: Path, security_dir: Path, outage: str) -> None:
    """``wan-cut``: the link between leaf and hub drops while both servers and the cloud agent
    stay up. ``hub-crash``: the hub is SIGKILLed and restarted on the same port and store."""
    topo = make_topology(tmp_path, security_dir)
    admin = topo.admin_creds
    hub, leaf, link = topo.hub, topo.leaf, topo.link
    assert topo.edge_url == leaf.url  # the agents' fragment points at the local leaf
    erp, crm = tmp_path / "erp.db", tmp_path / "crm.db"
    make_erp(erp)
    make_crm(crm)
    edge_state = tmp_path / "state" / "erp-agent"
    agents = []
    for name, system, url, kw in (
        ("erp-agent", "erp", topo.edge_url, {"source": erp}),
        ("crm-agent", "crm", hub.url, {"sink": crm}),
    ):
        cfg = tmp_path / f"{name}.toml"
        cfg.write_text(agent_toml(name=name, system=system, state=tmp_path / "state" / name,
                                  url=url, creds=tmp_path / f"{name}.creds", **kw))  # type: ignore[arg-type]  # fmt: skip
        issue_agent_creds(cfg, security_dir)
        agents.append(AgentProcess(cfg, tmp_path / f"{name}.log"))
    source, sink = agents
    watcher = LinkWatcher(hub.url, tmp_path / "link-watch.log", admin)
    load = ErpLoad(erp, seed=7)
    stop = threading.Event()

    def drive() -> None:
        while not stop.is_set():
            load.mixed(1)
            time.sleep(0.02)

    try:
        hub.start()
        link.restore()
        leaf.start()
        wait_until(lambda: leaf_connected(hub), 15, "the leaf node to connect to the hub")
        # Linked before any edge agent created the leaf's stream: the hub waits for it.
        code, out, err = meshctl_leafnode(
            "link", "--domain", EDGE, "--server", hub.url, "--wait", "0", "--creds", str(admin)
        )
        assert code == 0, err
        assert "now sources" in out
        assert "not active yet" in err
        # The site's operator creates the leaf's streams (edge agents only check them).
        create_layout(NatsConfig(servers=[leaf.url], creds=str(admin)))
        watcher.start()
        source.start()
        sink.start()
        load.insert(300)
        wait_until(lambda: rows(erp) == rows(crm), 30, "the first rows to reach the CRM through the hub")
        code, out, err = meshctl_leafnode(
            "link", "--domain", EDGE, "--server", hub.url, "--wait", "5", "--creds", str(admin)
        )
        assert code == 0, err
        assert "already sources" in out  # idempotent
        assert "source active" in out
        # The sink agent's ensure_streams updated the hub stream: its source must have survived.
        sources = stream_info(hub.url, admin)["config"]["sources"]  # type: ignore[index]
        assert [s["external"]["api"] for s in sources] == [f"$JS.{EDGE}.API"]

        # --- the outage ---------------------------------------------------------------------
        if outage == "wan-cut":
            link.cut()
            wait_until(lambda: not leaf_connected(hub), 10, "the hub to see the leaf gone")
        else:
            hub.kill()
        before = stream_messages(leaf.url, admin)
        crm_before = rows(crm)
        loader = threading.Thread(target=drive, daemon=True)
        loader.start()
        time.sleep(3)
        stop.set()
        loader.join()
        load.insert(200)
        # The edge kept working: everything captured went from its outbox into the leaf.
        wait_until(lambda: outbox_depth(edge_state) == 0, 20, "the edge outbox to drain into the leaf")
        during = stream_messages(leaf.url, admin)
        assert during >= before + 200, f"leaf stream grew from {before} to {during} only"
        assert rows(crm) == crm_before, "the CRM changed during the outage"
        assert rows(erp) != crm_before
        assert source.alive, f"the edge agent died during the outage; see {source.log}"

        # --- the link returns -----------------------------------------------------------------
        if outage == "wan-cut":
            link.restore()
        else:
            hub.start()
        wait_until(lambda: rows(erp) == rows(crm), 45, "the CRM to catch up after the outage")
        wait_until(lambda: consumer_settled(hub.url, "customers-crm", admin), 30, "the consumer to settle")
        # Every event of the leaf is in the hub exactly once (the sourcing resumed where it was).
        wait_until(
            lambda: stream_messages(hub.url, admin) == stream_messages(leaf.url, admin), 10, "hub == leaf"
        )
        assert rows(erp) == rows(crm)
        assert source.alive, f"the edge agent died; see {source.log}"
        assert sink.alive, f"the cloud agent died; see {sink.log}"
        assert source.terminate() == 0
        assert sink.terminate() == 0
    finally:
        stop.set()
        watcher.stop()
        source.kill()
        sink.kill()
        topo.stop()
    assert_same_rows(erp, crm)
    assert_effect_once(crm)
    assert len(rows(crm)) >= 300


@pytest.mark.anyio
async def test_sourcing_is_idempotent_and_survives_ensure_streams(tmp_path: Path, security_dir: Path) -> None:
    server = NatsServer(tmp_path / "nats", security_dir).start()
    try:
        async with JetStream(server.nats_config(request_timeout=2.0), name="t") as js:
            streams = StreamsConfig(duplicate_window=60)
            assert await ensure_edge_sourcing(js, "site-a", streams=streams)  # creates the stream
            assert not await ensure_edge_sourcing(js, "site-a")
            assert await ensure_edge_sourcing(js, "site-b")  # a second site is added, not swapped
            assert await ensure_domain_source(js, "site-b", filter_subject="evt.customer.>")  # replaced
            assert not await ensure_domain_source(js, "site-b", filter_subject="evt.customer.>")
            # An agent with other stream settings updates the stream but keeps its sources.
            await js.ensure_streams(StreamsConfig(duplicate_window=30))
            info = await js.js.stream_info(EVENTS_STREAM)
            assert info.config.duplicate_window == 30
            apis = sorted(s.external.api for s in info.config.sources or [] if s.external)
            assert apis == ["$JS.site-a.API", "$JS.site-b.API"]
            # The hub's own publishes still land (sources do not take the stream's subjects).
            await js.publish(OutMessage("evt.customer.upserted.crm", b"x", "m1"))
            status = await edge_source_status(js, "site-a")
            assert status is not None
            assert status.domain == "site-a"
            assert await edge_source_status(js, "nowhere") is None
            # MESH_TRACE sources every site's records too (whole: the events filter is not its).
            trace = await js.js.stream_info(TRACE_STREAM)
            got = [
                (s.name, s.external.api, s.filter_subject) for s in trace.config.sources or [] if s.external
            ]
            assert got == [(TRACE_STREAM, "$JS.site-a.API", None), (TRACE_STREAM, "$JS.site-b.API", None)]
            assert await linked_domains(js) == ["site-a", "site-b"]
            assert await edge_dead_letters(js) == {"site-a": None, "site-b": None}  # no such sites
            # unlink removes both sources of one site and keeps the other site's (idempotent).
            assert await remove_edge_sourcing(js, "site-a") == [EVENTS_STREAM, TRACE_STREAM]
            assert await remove_edge_sourcing(js, "site-a") == []
            assert await linked_domains(js) == ["site-b"]
            assert await linked_domains(js, stream=TRACE_STREAM) == ["site-b"]
        # Only the operator (admin creds) may link or unlink: an agent's creds are refused.
        cfg = tmp_path / "erp-agent.toml"
        creds = tmp_path / "erp-agent.creds"
        cfg.write_text(agent_toml(name="erp-agent", system="erp", state=tmp_path / "s", url=server.url,
                                  source=tmp_path / "erp.db", creds=creds))  # fmt: skip
        agent = NatsConfig(servers=[server.url], creds=str(issue_agent_creds(cfg, security_dir)),
                           inbox_prefix="_INBOX.erp-agent", request_timeout=2.0)  # fmt: skip
        async with JetStream(agent, name="erp-agent") as js:
            update = r"^update stream MESH_EVENTS: permission denied: publish to \$JS\.API\.STREAM\.UPDATE\."
            with pytest.raises(TransportError, match=update):
                await remove_edge_sourcing(js, "site-b")
            with pytest.raises(TransportError, match=update):
                await ensure_edge_sourcing(js, "site-c")
        async with JetStream(server.nats_config(request_timeout=2.0), name="t") as js:
            assert await linked_domains(js) == ["site-b"]
    finally:
        server.stop()


@pytest.mark.anyio
async def test_the_watcher_keeps_each_source_on_its_own(tmp_path: Path, security_dir: Path) -> None:
    """``link --watch`` puts a removed source back even while another hub stream is missing."""
    server = NatsServer(tmp_path / "nats", security_dir).start()
    try:
        async with JetStream(server.nats_config(request_timeout=2.0), name="t") as js:
            await ensure_edge_sourcing(js, "site-a", streams=StreamsConfig())
            await js.js.delete_stream(EVENTS_STREAM)
            assert await remove_domain_source(js, "site-a", stream=TRACE_STREAM, source_stream=TRACE_STREAM)
            assert await linked_domains(js, stream=TRACE_STREAM) == []
            async with anyio.create_task_group() as tg:
                tg.start_soon(partial(watch_edge_sourcing, js, "site-a", interval=0.1))
                with anyio.fail_after(10):
                    while await linked_domains(js, stream=TRACE_STREAM) != ["site-a"]:
                        await anyio.sleep(0.1)
                tg.cancel_scope.cancel()
            assert await linked_domains(js) == []  # MESH_EVENTS is still missing: nothing made up
    finally:
        server.stop()


def test_link_then_unlink_from_the_cli(tmp_path: Path, security_dir: Path) -> None:
    """``link`` against a hub whose site is not there (yet) sources both streams; ``unlink``
    removes them again, idempotently, and refuses a bad domain in one line."""
    server = NatsServer(tmp_path / "nats", security_dir).start()
    try:
        # The hub's streams exist with their own settings: link adds the sources and keeps them.
        create_layout(server, StreamsConfig(trace=TraceRetention(max_age=3600, max_bytes=5_000_000)))
        access = ["--server", server.url, "--creds", str(server.admin_creds)]
        code, out, err = meshctl_leafnode("link", "--domain", "site-b", "--wait", "0", *access)
        assert code == 0, err
        assert out.startswith("hub now sources MESH_EVENTS and MESH_TRACE of domain")
        for stream in (EVENTS_STREAM, TRACE_STREAM):
            config = stream_info(server.url, server.admin_creds, stream)["config"]
            assert isinstance(config, dict)
            assert [s["external"]["api"] for s in config["sources"]] == ["$JS.site-b.API"]
        trace = stream_info(server.url, server.admin_creds, TRACE_STREAM)["config"]
        assert isinstance(trace, dict)
        assert (trace["max_age"], trace["max_bytes"]) == (3600 * 10**9, 5_000_000)
        code, out, err = meshctl_leafnode("unlink", "--domain", "site-b", *access)
        assert code == 0, err
        assert out == "hub no longer sources MESH_EVENTS and MESH_TRACE of domain 'site-b'\n"
        code, out, err = meshctl_leafnode("unlink", "--domain", "site-b", *access)
        assert (code, out) == (0, "the hub does not source domain 'site-b': nothing to do\n")
        code, out, err = meshctl_leafnode("unlink", "--domain", "a.b", *access)
        assert code == 2
        assert err.count("\n") == 1
        assert "domain 'a.b': expected 1-64 letters" in err
        for stream in (EVENTS_STREAM, TRACE_STREAM):
            assert "sources" not in stream_info(server.url, server.admin_creds, stream)["config"]
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--hub", "http://hub:7422"], "--hub 'http://hub:7422': expected nats-leaf://"),
        (["--hub", "nats-leaf://hub:70000"], "--hub 'nats-leaf://hub:70000'"),
        (["--hub", "nats-leaf://:7422"], "no host"),
        (["--domain", "edge.site"], "--domain 'edge.site': expected 1-64 letters"),
        (["--domain", "hub"], "must differ from the hub's JetStream domain"),
        (["--port", "0"], "--port 0: expected a TCP port"),
        (["--sync-interval", "often"], "--sync-interval 'often'"),
        (["--listen", "a b"], "--listen 'a b'"),
    ],
)
def test_config_rejects_bad_input_in_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    base = {"--hub": "nats-leaf://hub.example.com:7422", "--domain": "edge"}
    opts = dict(zip(args[::2], args[1::2], strict=True))
    argv = ["config", "--store-dir", str(tmp_path / "js"), "--out", str(tmp_path / "out")]
    for k, v in {**base, **opts}.items():
        argv += [k, v]
    code, out, err = meshctl_leafnode(*argv)
    assert code == 2
    assert message in err, err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err + out
    assert not (tmp_path / "out" / "leaf.conf").exists()


def test_config_refuses_to_overwrite_and_files_pass_nats_server_check(tmp_path: Path) -> None:
    argv = ["config", "--hub", "nats-leaf://hub.example.com", "--domain", "edge", "--store-dir",
            str(tmp_path / "js"), "--out", str(tmp_path / "out")]  # fmt: skip
    code, out, _ = meshctl_leafnode(*argv)
    assert code == 0
    assert "nats-leaf://hub.example.com:7422" in out
    for name in ("leaf.conf", "hub.conf"):
        check_nats_config(tmp_path / "out" / name)
    leaf_conf = (tmp_path / "out" / "leaf.conf").read_text()
    assert 'domain: "edge"' in leaf_conf
    assert 'deny_exports: ["evt.>"' in leaf_conf
    code, _, err = meshctl_leafnode(*argv)
    assert code == 2
    assert "pass --force" in err
    assert meshctl_leafnode(*argv, "--force")[0] == 0
    broken = tmp_path / "broken.conf"
    broken.write_text('jetstream { sync_interval: "often" }\n')
    with pytest.raises(ConfigError, match="nats-server refused the file"):
        check_nats_config(broken)


def test_secured_config_binds_the_link_to_the_mesh_account(tmp_path: Path, security_dir: Path) -> None:
    argv = ["config", "--hub", "nats-leaf://hub.example.com", "--domain", "edge", "--store-dir",
            str(tmp_path / "js"), "--out", str(tmp_path / "out"),
            "--security-dir", str(security_dir)]  # fmt: skip
    code, _, err = meshctl_leafnode(*argv)
    assert code == 2
    assert "--security-dir needs --credentials" in err
    creds = tmp_path / "leaf.creds"
    code, out, err = meshctl_leafnode(*argv, "--credentials", str(creds))
    assert code == 0, err
    assert "meshctl security issue-agent" in out
    mesh_account = json.loads((security_dir / "security.json").read_text())["mesh_account"]
    leaf_conf = (tmp_path / "out" / "leaf.conf").read_text()
    assert f'account: "{mesh_account}"' in leaf_conf
    assert f'credentials: "{creds}"' in leaf_conf
    for name in ("leaf.conf", "hub.conf"):
        text = (tmp_path / "out" / name).read_text()
        assert "resolver: {" in text
        assert f"operator: {json.dumps(str(security_dir / 'operator.jwt'))}" in text
    assert "# creds = " in (tmp_path / "out" / "agent-nats.toml").read_text()
