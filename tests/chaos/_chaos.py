"""Chaos machinery: a seeded change load, a seeded fault schedule and its injector, and the
reconciliation that proves a sync came through the faults exact.

Two topologies: :class:`Mesh` (one nats-server between the ERP's source agent and the CRM's sink
agent) and :class:`HybridMesh` (the source agent on an on-prem leaf nats-server with its own
JetStream domain, the sink agent on the cloud hub whose MESH_EVENTS sources the leaf's, and a TCP
proxy standing in for the WAN between them).

Everything random is drawn from the run's seed (the load from its own stream), so
``MESH_CHAOS_SEED=<seed>`` replays the same changes and the same fault schedule (offsets, kinds,
durations); only the system's own timing differs between runs.
"""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import threading
import time
import tomllib
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh.broker import NatsServer
from mesh.config import NatsConfig
from tests._secure import SecuredNatsServer, create_layout, issue_agent_creds
from tests.integration._harness import (
    AgentProcess,
    agent_toml,
    assert_effect_once,
    consumer_settled,
    make_crm,
    make_erp,
    rows,
)
from tests.integration._leaf import (
    EDGE,
    LinkWatcher,
    SealedLinkProxy,
    leaf_connected,
    make_topology,
    meshctl_leafnode,
    stream_info,
)

FLOW = "customers"
TABLE = "customers"
SINK_DURABLE = f"{FLOW}-crm"
EVENTS_STREAM = "MESH_EVENTS"
DLQ_STREAM = "MESH_DLQ"

# --------------------------------------------------------------------------------------------
# Faults


@dataclass(frozen=True)
class FaultKind:
    """One kind of fault. Faults on the same ``resource`` never overlap; others may."""

    name: str
    resource: str
    min_duration: float
    max_duration: float
    doc: str


FAULT_KINDS: dict[str, FaultKind] = {
    k.name: k
    for k in (
        FaultKind("kill_source", "source", 0.0, 1.5, "SIGKILL the source agent, restart it after <duration>"),
        FaultKind("kill_sink", "sink", 0.0, 1.5, "SIGKILL the sink agent, restart it after <duration>"),
        FaultKind(
            "kill_nats",
            "broker",
            0.0,
            2.0,
            "SIGKILL nats-server, restart it (same port and store) after <duration>",
        ),
        FaultKind("pause_nats", "broker", 1.0, 4.0, "SIGSTOP nats-server, SIGCONT it after <duration>"),
        FaultKind(
            "busy_target",
            "crm",
            1.0,
            4.0,
            "hold BEGIN IMMEDIATE on the CRM database for <duration> (SQLITE_BUSY)",
        ),
        FaultKind(
            "kill_hub",
            "hub",
            0.0,
            2.0,
            "SIGKILL the hub nats-server, restart it (same port and store) after <duration>",
        ),
        FaultKind("pause_hub", "hub", 1.0, 4.0, "SIGSTOP the hub nats-server, SIGCONT it after <duration>"),
        FaultKind(
            "kill_leaf",
            "leaf",
            0.0,
            2.0,
            "SIGKILL the leaf nats-server, restart it (same port and store) after <duration>",
        ),
        FaultKind(
            "pause_leaf", "leaf", 1.0, 4.0, "SIGSTOP the leaf nats-server, SIGCONT it after <duration>"
        ),
        FaultKind(
            "cut_wan",
            "wan",
            2.0,
            8.0,
            "cut the leaf node's WAN link to the hub (drop and refuse its connections) for <duration>",
        ),
        FaultKind("api_500", "api", 1.0, 4.0, "the CRM REST API answers 500 for <duration>"),
        FaultKind(
            "api_429", "api", 1.0, 4.0, "the CRM REST API answers 429 with Retry-After: 1 for <duration>"
        ),
        FaultKind(
            "api_slow",
            "api",
            1.0,
            3.0,
            "the CRM REST API writes, then answers only after the client's timeout, for <duration>",
        ),
        FaultKind(
            "kill_api",
            "api",
            0.0,
            1.5,
            "SIGKILL the CRM REST API process, restart it (same port and database) after <duration>",
        ),
    )
}

SINGLE_BROKER_KINDS = ("kill_source", "kill_sink", "kill_nats", "pause_nats", "busy_target")
"""The faults of :class:`Mesh` (this order is part of what a seed replays)."""
HYBRID_KINDS = (
    "kill_source",
    "kill_sink",
    "kill_hub",
    "pause_hub",
    "kill_leaf",
    "pause_leaf",
    "busy_target",
    "cut_wan",
)
"""The faults of :class:`HybridMesh`."""
REST_KINDS = ("kill_source", "kill_sink", "kill_nats", "api_500", "api_429", "api_slow", "kill_api")
"""The faults of :class:`tests.chaos._rest.RestMesh` (a REST API as the target)."""

_SERVER_OF = {
    "kill_nats": "nats",
    "pause_nats": "nats",
    "kill_hub": "hub",
    "pause_hub": "hub",
    "kill_leaf": "leaf",
    "pause_leaf": "leaf",
}


@dataclass(frozen=True)
class Fault:
    at: float
    """Seconds after the load started."""
    kind: str
    duration: float

    def __str__(self) -> str:
        return f"+{self.at:6.2f}s {self.kind:<12} {self.duration:4.2f}s"


def make_schedule(
    rng: random.Random,
    count: int,
    start: float,
    end: float,
    kinds: tuple[str, ...] = SINGLE_BROKER_KINDS,
) -> list[Fault]:
    """``count`` faults of ``kinds`` between ``start`` and ``end`` seconds: every kind at least
    once (when ``count`` allows), the rest drawn at random; faults on one resource do not
    overlap."""
    picked = list(kinds[:count])
    picked += [rng.choice(kinds) for _ in range(count - len(picked))]
    rng.shuffle(picked)
    drafts = sorted(
        (
            rng.uniform(start, end),
            name,
            rng.uniform(FAULT_KINDS[name].min_duration, FAULT_KINDS[name].max_duration),
        )
        for name in picked
    )
    free_at: dict[str, float] = {}
    schedule = []
    for at, name, duration in drafts:
        resource = FAULT_KINDS[name].resource
        at = max(at, free_at.get(resource, 0.0))
        free_at[resource] = at + duration + 0.5  # let the resource breathe between faults
        schedule.append(Fault(round(at, 2), name, round(duration, 2)))
    return sorted(schedule, key=lambda f: f.at)


# --------------------------------------------------------------------------------------------
# The system under test


def _sink_toml(text: str) -> str:
    """The harness's sink config, plus a target that fails fast when locked and a consumer that
    retries a busy target instead of dead-lettering it."""
    for table, line in (
        ("[flows.consumer]\n", "max_deliver = 1000\n"),
        ("[flows.sink]\n", "busy_timeout = 0.2\n"),
    ):
        assert table in text, f"the harness config no longer has a {table.strip()} table"
        text = text.replace(table, table + line, 1)
    flow = tomllib.loads(text)["flows"][0]
    assert flow["consumer"]["max_deliver"] == 1000
    assert flow["sink"]["busy_timeout"] == 0.2
    return text


class _MeshBase:
    """ERP and CRM databases, the source (ERP) and sink (CRM) agent processes, and the
    nats-servers of a topology (``servers``, by name)."""

    kinds: tuple[str, ...] = ()

    def __init__(
        self, tmp: Path, servers: dict[str, NatsServer], *, source_url: str, sink_url: str, security_dir: Path
    ) -> None:
        self.tmp = tmp
        self.servers = servers
        self.security_dir = security_dir
        self.admin_creds = security_dir / "creds" / "admin.creds"
        """Every server runs this mesh's operator; the test's own looks use the admin creds."""
        self.sink_url = sink_url
        """Where the sink agent, its consumer and its DLQ live."""
        self.erp, self.crm = tmp / "erp.db", tmp / "crm.db"
        make_erp(self.erp)
        make_crm(self.crm)
        self.agents: dict[str, AgentProcess] = {}
        for role, name, system, url, kw in (
            ("source", "erp-agent", "erp", source_url, {"source": self.erp}),
            ("sink", "crm-agent", "crm", sink_url, {"sink": self.crm}),
        ):
            text = agent_toml(name=name, system=system, state=tmp / "state" / name, url=url,
                              creds=tmp / f"{name}.creds", **kw)  # type: ignore[arg-type]  # fmt: skip
            if role == "sink":
                text = _sink_toml(text)
            cfg = tmp / f"{name}.toml"
            cfg.write_text(text)
            issue_agent_creds(cfg, security_dir)
            self.agents[role] = AgentProcess(cfg, tmp / f"{name}.log")
        # Held by whoever takes an agent down on purpose, so the watchdog can tell a planned death
        # from an agent that exited on its own.
        self.locks = {role: threading.Lock() for role in self.agents}
        self.unexpected_exits: list[str] = []
        self.server_starts: Counter[str] = Counter()

    @property
    def source(self) -> AgentProcess:
        return self.agents["source"]

    @property
    def sink(self) -> AgentProcess:
        return self.agents["sink"]

    def install_capture(self) -> None:
        """Install the ERP change capture now, before any load, and audit it: every change the
        triggers record is copied to ``chaos_changes`` (the capture prunes its own table), so the
        reconciliation knows every (key, version) the source produced."""
        import anyio

        from adapters.sql.sqlite import install_change_capture

        anyio.run(install_change_capture, self.erp, TABLE)
        with closing(sqlite3.connect(self.erp, timeout=30)) as c:
            c.executescript(AUDIT)

    def start_server(self, name: str, timeout: float = 10.0) -> None:
        self.servers[name].start(timeout=timeout)
        self.server_starts[name] += 1

    def restart_server(self, name: str, down: float) -> None:
        """SIGKILL a nats-server, restart it on the same port and store after ``down`` s."""
        self.servers[name].kill()
        time.sleep(down)
        self.start_server(name, timeout=30)

    def start(self) -> None:
        for name in self.servers:
            self.start_server(name)
        self.start_agents()

    def start_agents(self) -> None:
        """Start every agent and wait until each says ready (``/readyz``), with a deadline."""
        for agent in self.agents.values():
            agent.start(wait=False)
        for agent in self.agents.values():
            agent.wait_ready(timeout=60)

    def restart_agent(self, role: str, down: float) -> None:
        with self.locks[role]:
            agent = self.agents[role]
            agent.kill()
            time.sleep(down)
            agent.start(wait=False)  # a fault elsewhere (NATS down, a partition) may keep it unready

    def check_agents(self) -> None:
        """Restart (and record) an agent that exited without being killed by a fault."""
        for role, agent in self.agents.items():
            if not self.locks[role].acquire(blocking=False):
                continue
            try:
                if agent.proc is not None and not agent.alive:
                    code = agent.proc.returncode
                    self.unexpected_exits.append(
                        f"{role} agent exited on its own (code {code}); see {agent.log}"
                    )
                    agent.start(wait=False)
            finally:
                self.locks[role].release()

    def kill_agents(self) -> None:
        for role, agent in self.agents.items():
            with self.locks[role]:
                agent.kill()

    def stop(self) -> None:
        self.kill_agents()
        for server in self.servers.values():
            server.stop()


class Mesh(_MeshBase):
    """One nats-server between the source (ERP) and the sink (CRM) agent."""

    kinds: tuple[str, ...] = SINGLE_BROKER_KINDS

    def __init__(self, tmp: Path, security_dir: Path) -> None:
        self.server = SecuredNatsServer(tmp / "nats", security_dir, layout=True)
        super().__init__(
            tmp, {"nats": self.server}, source_url=self.server.url, sink_url=self.server.url,
            security_dir=security_dir,
        )  # fmt: skip

    @property
    def broker_starts(self) -> int:
        return self.server_starts["nats"]


class HybridMesh(_MeshBase):
    """The leaf-node topology: ERP -> source agent -> on-prem **leaf** nats-server (JetStream
    domain ``edge``) == WAN (a :class:`SealedLinkProxy`) ==> cloud **hub** nats-server, whose
    MESH_EVENTS sources the leaf's -> sink agent -> CRM. Both servers run from the files
    ``meshctl leafnode config`` writes; ``meshctl leafnode link --domain edge --watch`` runs as a
    child process next to the hub, as an operator runs it as a service."""

    kinds = HYBRID_KINDS

    def __init__(self, tmp: Path, security_dir: Path) -> None:
        topo = make_topology(tmp, security_dir)
        # Same port and upstream (the configs name them), without the base proxy's cut race.
        self.link = topo.link = SealedLinkProxy.replacing(topo.link)
        self.hub, self.leaf = topo.hub, topo.leaf
        self.topology = topo
        assert topo.edge_url == self.leaf.url
        super().__init__(
            tmp,
            {"hub": self.hub, "leaf": self.leaf},
            source_url=topo.edge_url,
            sink_url=self.hub.url,
            security_dir=security_dir,
        )
        self.watcher = LinkWatcher(self.hub.url, tmp / "link-watch.log", self.admin_creds)
        self.watcher_lock = threading.Lock()

    def start(self) -> None:
        self.start_server("hub")
        self.restore_link()
        self.start_server("leaf")
        if not wait_for(lambda: leaf_connected(self.hub), 15, 0.1):
            raise AssertionError(f"the leaf node did not connect to the hub; see {self.leaf.log_file}")
        # What the operator runs once (`meshctl leafnode link`), then as a service (`--watch`).
        code, out, err = meshctl_leafnode(
            "link",
            "--domain",
            EDGE,
            "--server",
            self.hub.url,
            "--wait",
            "0",
            "--creds",
            str(self.admin_creds),
        )
        assert code == 0, f"meshctl leafnode link failed: {out}{err}"
        # The site's operator creates the leaf's streams (edge agents only check them).
        create_layout(NatsConfig(servers=[self.leaf.url], creds=str(self.admin_creds)))
        self.watcher.start()
        self.start_agents()

    def restore_link(self, timeout: float = 10.0) -> None:
        """Listen on the WAN proxy's port again (retried: the port may linger for a moment)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.link.restore()
                return
            except OSError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)

    def check_agents(self) -> None:
        """Also restart (and record) a ``link --watch`` that exited: it must ride out every fault."""
        super().check_agents()
        with self.watcher_lock:
            proc = self.watcher.proc
            if proc is not None and proc.poll() is not None:
                self.unexpected_exits.append(
                    f"`meshctl leafnode link --watch` exited on its own (code {proc.returncode}); "
                    f"see {self.watcher.log}"
                )
                self.watcher.start()

    def stop(self) -> None:
        self.kill_agents()
        with self.watcher_lock:
            self.watcher.stop()
        self.topology.stop()

    @property
    def watcher_restarts(self) -> int:
        """How often ``link --watch`` restarted a stalled source."""
        return count_in_log(self.watcher.log, "restarted the stalled source")


AUDIT = f"""
CREATE TABLE chaos_changes (seq INTEGER PRIMARY KEY, pk TEXT NOT NULL, op TEXT NOT NULL);
CREATE TRIGGER chaos_audit AFTER INSERT ON _mesh_changes_{TABLE} BEGIN
    INSERT INTO chaos_changes (seq, pk, op) VALUES (NEW.seq, NEW.pk, NEW.op);
END;
"""


def captured_changes(erp: Path) -> int:
    """Change events the ERP's capture triggers recorded so far."""
    with closing(sqlite3.connect(erp, timeout=30)) as c:
        return int(c.execute("SELECT count(*) FROM chaos_changes").fetchone()[0])


def last_seq(server: NatsServer, stream: str = EVENTS_STREAM, timeout: float = 1.0) -> int | None:
    """The stream's last sequence, from the server's monitoring endpoint (``/jsz``: no client
    connection to leave behind); None when the server does not answer within ``timeout`` (killed,
    stopped, starting) or has no such stream."""
    try:
        with urllib.request.urlopen(f"{server.monitor_url}/jsz?streams=true", timeout=timeout) as resp:
            jsz = json.load(resp)
    except (OSError, ValueError):
        return None
    for account in jsz.get("account_details") or []:
        for detail in account.get("stream_detail") or []:
            if detail.get("name") == stream:
                return int(detail["state"]["last_seq"])
    return None


@dataclass(frozen=True)
class CutSample:
    """One look at both sides during a WAN cut (None: that server did not answer in time)."""

    t: float
    erp: int
    """Change events the ERP's capture had recorded."""
    leaf: int | None
    """The leaf's MESH_EVENTS last sequence."""
    hub: int | None
    """The hub's MESH_EVENTS last sequence."""
    hub_lists_leaf: bool | None


@dataclass
class WanCut:
    """What one WAN cut looked like from outside: samples of the ERP's captured changes and of
    both streams, from shortly after the cut until the link was restored."""

    fault: Fault
    cut_at: float = 0.0
    restored_at: float = 0.0
    samples: list[CutSample] = field(default_factory=list)
    hub_since: float = 0.0
    """From when the hub's stream must stand still (see :func:`check_cuts`)."""

    def growth(self, side: str, since: float = 0.0) -> int | None:
        """How much ``side`` grew between its first answer at or after ``since`` and its last."""
        seen = [v for v in (getattr(s, side) for s in self.samples if s.t >= since) if v is not None]
        return seen[-1] - seen[0] if len(seen) >= 2 else None

    def trace(self) -> str:
        """The samples, for a failure message: offset from the cut, ERP, leaf, hub."""
        return ", ".join(
            f"+{s.t - self.cut_at:.1f}s {s.erp}/{_value(s.leaf)}/{_value(s.hub)}" for s in self.samples
        )

    @property
    def hub_listed_leaf_at_end(self) -> bool:
        answered = [s.hub_lists_leaf for s in self.samples if s.hub_lists_leaf is not None]
        return bool(answered and answered[-1])

    def __str__(self) -> str:
        return (
            f"cut {self.fault.at:+.2f}s for {self.restored_at - self.cut_at:.1f}s ({len(self.samples)} "
            f"samples): ERP captured {_delta(self.growth('erp'))}, leaf stream "
            f"{_delta(self.growth('leaf'))}, hub stream {_delta(self.growth('hub', self.hub_since))}"
        )


def _delta(n: int | None) -> str:
    return "?" if n is None else f"{n:+d}"


def _value(n: int | None) -> str:
    return "?" if n is None else str(n)


class FaultInjector:
    """Runs a schedule against a mesh: one thread per resource, each fault at its offset from
    ``t0``; records when each fault really started and ended, and any failure to inject or undo
    one."""

    def __init__(self, mesh: _MeshBase, schedule: list[Fault]) -> None:
        self.mesh = mesh
        self.schedule = schedule
        self.done: list[tuple[Fault, float, float]] = []  # fault, started, ended (monotonic)
        self.errors: list[str] = []
        self.busy_held = 0.0
        self.cuts: list[WanCut] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.stop = threading.Event()

    def start(self, t0: float) -> None:
        by_resource: dict[str, list[Fault]] = {}
        for fault in self.schedule:
            by_resource.setdefault(FAULT_KINDS[fault.kind].resource, []).append(fault)
        for resource, faults in by_resource.items():
            t = threading.Thread(target=self._run, args=(t0, faults), name=f"chaos-{resource}", daemon=True)
            t.start()
            self._threads.append(t)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            self.stop.set()
            raise AssertionError(f"fault injection did not finish within {timeout:.0f}s")

    @property
    def last_end(self) -> float:
        return max((end for _, _, end in self.done), default=0.0)

    def _run(self, t0: float, faults: list[Fault]) -> None:
        for fault in faults:
            if self.stop.wait(max(0.0, t0 + fault.at - time.monotonic())):
                return
            started = time.monotonic()
            try:
                self._inject(fault)
            except Exception as exc:
                with self._lock:
                    self.errors.append(f"{fault}: {type(exc).__name__}: {exc}")
            with self._lock:
                self.done.append((fault, started, time.monotonic()))

    def _inject(self, fault: Fault) -> None:
        mesh, d = self.mesh, fault.duration
        if fault.kind not in mesh.kinds:
            raise ValueError(f"fault kind {fault.kind!r} does not apply to {type(mesh).__name__}")
        if fault.kind == "kill_source":
            mesh.restart_agent("source", d)
        elif fault.kind == "kill_sink":
            mesh.restart_agent("sink", d)
        elif fault.kind.startswith("kill_"):
            mesh.restart_server(_SERVER_OF[fault.kind], d)
        elif fault.kind.startswith("pause_"):
            server = mesh.servers[_SERVER_OF[fault.kind]]
            server.pause()
            try:
                time.sleep(d)
            finally:
                server.resume()
        elif fault.kind == "busy_target":
            self._hold_target(d)
        elif fault.kind == "cut_wan":
            assert isinstance(mesh, HybridMesh)
            self._cut_wan(mesh, fault)
        else:
            raise ValueError(f"unknown fault kind {fault.kind!r}")

    def _hold_target(self, duration: float) -> None:
        """Hold the CRM database's write lock, as another writer (a long report, a migration)
        would: the sink's writes fail with SQLITE_BUSY after its busy_timeout."""
        conn = sqlite3.connect(self.mesh.crm, timeout=30, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            held = time.monotonic()
            time.sleep(duration)
            conn.execute("ROLLBACK")
            self.busy_held += time.monotonic() - held
        finally:
            conn.close()

    def _cut_wan(self, mesh: HybridMesh, fault: Fault) -> None:
        """Cut the WAN proxy between leaf and hub (every connection dropped, new ones refused)
        for the fault's duration, and sample both sides meanwhile: the leaf should keep taking
        the edge agent's events, the hub should take none. The link is restored on time even
        when a probe hangs on a killed or stopped server (that sample then lacks the value)."""
        cut = WanCut(fault)
        mesh.link.cut()
        cut.cut_at = time.monotonic()
        restore_at = cut.cut_at + fault.duration
        pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="chaos-cut-probe")
        try:
            # Let what was already in flight to the hub land before the first look.
            self.stop.wait(min(0.5, fault.duration / 4))
            while (t := time.monotonic()) < restore_at - 0.1 and not self.stop.is_set():
                erp = captured_changes(mesh.erp)
                probes: list[futures.Future[Any]] = [
                    pool.submit(last_seq, mesh.leaf),
                    pool.submit(last_seq, mesh.hub),
                    pool.submit(leaf_connected, mesh.hub),
                ]
                futures.wait(probes, timeout=max(0.0, restore_at - time.monotonic()))
                leaf, hub, listed = (_result(f) for f in probes)
                cut.samples.append(CutSample(t, erp, leaf, hub, listed))
                self.stop.wait(max(0.0, min(t + 0.4, restore_at) - time.monotonic()))
            self.stop.wait(max(0.0, restore_at - time.monotonic()))
        finally:
            mesh.restore_link()
            cut.restored_at = time.monotonic()
            pool.shutdown(wait=False, cancel_futures=True)
            with self._lock:
                self.cuts.append(cut)


def _result(f: futures.Future[Any]) -> Any:
    """A probe's value; None when it has not finished (in time) or failed."""
    return f.result() if f.done() and f.exception() is None else None


def check_cuts(injector: FaultInjector, margin: float = 3.0) -> tuple[list[str], int]:
    """Judge every WAN cut: (problems, cuts whose edge side was verified).

    - The hub's MESH_EVENTS must not grow during a cut (else the cut did not cut), and the hub
      must no longer list the leaf connection at its end.
    - The edge keeps publishing: take two samples of the leaf's stream at least a second apart
      between which neither the source agent nor the leaf server was disturbed (killed, stopped,
      or back for less than ``margin`` seconds). If the ERP had changes the first sample's leaf
      stream did not hold yet at least one second before the second sample, the leaf's stream
      must have grown in between. A cut with such a pair is "verified".
    """
    problems, verified = [], 0
    disturbing = [
        (started, ended + margin)
        for f, started, ended in injector.done
        if f.kind in ("kill_source", "kill_leaf", "pause_leaf")
    ]

    def undisturbed(a: float, b: float) -> bool:
        return not any(start < b and end > a for start, end in disturbing)

    for cut in injector.cuts:
        # A hub stopped (SIGSTOP) when the link was cut still holds, unread in its socket, what
        # the link delivered before the cut: it stores that once it runs again.
        since = cut.cut_at
        for f, started, ended in injector.done:
            if f.kind == "pause_hub" and started <= cut.cut_at <= ended:
                since = max(since, ended + 0.5)
        cut.hub_since = since
        grew = cut.growth("hub", since)
        if grew:
            problems.append(
                f"the WAN cut did not cut: the hub stored {grew} events during it ({cut}; samples "
                f"ERP/leaf/hub: {cut.trace()})"
            )
        if cut.hub_listed_leaf_at_end:
            problems.append(f"the hub still listed the leaf connection at the end of the cut ({cut})")
        leaf = [s for s in cut.samples if s.leaf is not None]
        checked = False
        for i, first in enumerate(leaf):
            for last in reversed(leaf[i + 1 :]):
                if last.t - first.t < 1.0 or not undisturbed(first.t, last.t):
                    continue
                backlog = [s.erp for s in cut.samples if first.t <= s.t <= last.t - 1.0]
                if not backlog or max(backlog) <= (first.leaf or 0):
                    continue  # nothing new for the edge to publish in this stretch
                checked = True
                if last.leaf == first.leaf:
                    problems.append(
                        f"the edge agent published nothing into the leaf for {last.t - first.t:.1f}s "
                        f"of a WAN cut with {max(backlog) - (first.leaf or 0)} changes waiting ({cut})"
                    )
                break
            if checked:
                break
        verified += checked
    return problems, verified


def watch(mesh: _MeshBase, stop: threading.Event, interval: float = 0.25) -> threading.Thread:
    """A watchdog thread: restarts (and records) agents that die on their own."""

    def loop() -> None:
        while not stop.wait(interval):
            mesh.check_agents()

    t = threading.Thread(target=loop, name="chaos-watchdog", daemon=True)
    t.start()
    return t


# --------------------------------------------------------------------------------------------
# The load


class ChaosLoad:
    """Exactly ``events`` change events on the ERP customers table, in transactions of up to
    ``batch`` statements, all decided by ``seed``: inserts, updates (a share on a small hot set,
    so entities collect many versions), deletes, re-inserts of deleted keys (the sink must get
    past the tombstone) and churn (insert, update and delete one key in one transaction).
    Every statement touches exactly one row, so one statement is one change event.

    The pace is bursty, also by seed: the run is cut into segments of about 3 seconds, each with
    a random share of the events, so quiet stretches alternate with bursts of several thousand
    events per second that build a backlog while faults hit."""

    def __init__(self, db: Path, seed: int, events: int, batch: int = 200) -> None:
        self.db = db
        self.rng = random.Random(f"chaos-load-{seed}")
        pace = random.Random(f"chaos-pace-{seed}")
        self.weights = [max(0.05, pace.expovariate(1.0)) for _ in range(64)]
        self.events = events
        self.batch = batch
        self.emitted = 0
        self.by_op: Counter[str] = Counter()
        self.live: list[int] = []
        self._live_set: set[int] = set()
        self.dead: list[int] = []
        self.hot: list[int] = []
        self.next_id = 1
        self.error: BaseException | None = None

    def _row(self, i: int, rev: int = 0) -> tuple[Any, ...]:
        r = self.rng
        return (
            i,
            f"Customer {i} \u00e9\u00df \u2603 r{rev}",
            None if r.random() < 0.05 else f"c{i}.{rev}@example.com",
            r.choice(["DE", "FR", "US", "GB", None]),
            r.randrange(-(2**62), 2**62),
            None if r.random() < 0.05 else round(r.uniform(-1e6, 1e6), 2),
        )

    def _plan(self, budget: int) -> list[tuple[str, str, tuple[Any, ...]]]:
        """One transaction's statements: (op, sql, params)."""
        r = self.rng
        n = min(budget, r.randint(self.batch // 4, self.batch))
        ins = "INSERT INTO customers VALUES (?, ?, ?, ?, ?, ?)"
        upd = (
            "UPDATE customers SET name = ?, email = ?, country = ?, credit_limit_cents = ?, balance = ? "
            "WHERE id = ?"
        )
        dele = "DELETE FROM customers WHERE id = ?"
        roll = r.random()
        out: list[tuple[str, str, tuple[Any, ...]]] = []
        if roll < 0.35 or len(self.live) < 500:
            for _ in range(n):
                i = self.next_id
                self.next_id += 1
                out.append(("insert", ins, self._row(i)))
                self._add(i)
                if len(self.hot) < 50 and r.random() < 0.1:
                    self.hot.append(i)
        elif roll < 0.80:
            for k in range(n):
                hot = [h for h in self.hot if h in self._live_set]
                i = r.choice(hot) if hot and r.random() < 0.3 else r.choice(self.live)
                _, *values = self._row(i, rev=k + 1)
                out.append(("update", upd, (*values, i)))
        elif roll < 0.92:
            n = min(n, len(self.live) - 400)
            for i in r.sample(self.live, n):
                out.append(("delete", dele, (i,)))
                self._remove(i)
        elif roll < 0.96 and self.dead:
            for i in r.sample(self.dead, min(n, len(self.dead))):
                out.append(("reinsert", ins, self._row(i, rev=99)))
                self.dead.remove(i)
                self._add(i)
        else:
            while len(out) + 4 <= n:  # insert, update twice, delete: four events on one key
                i = self.next_id
                self.next_id += 1
                out.append(("churn", ins, self._row(i)))
                for rev in (1, 2):
                    _, *values = self._row(i, rev)
                    out.append(("churn", upd, (*values, i)))
                out.append(("churn", dele, (i,)))
                self.dead.append(i)
            if not out:  # the budget's last few events
                for _ in range(n):
                    i = self.next_id
                    self.next_id += 1
                    out.append(("insert", ins, self._row(i)))
                    self._add(i)
        return out

    def _add(self, i: int) -> None:
        self.live.append(i)
        self._live_set.add(i)

    def _remove(self, i: int) -> None:
        self._live_set.discard(i)
        self.dead.append(i)

    def due(self, fraction: float, duration: float) -> float:
        """Seconds after the start by which ``fraction`` of the events should be out."""
        segments = self.weights[: max(1, min(len(self.weights), round(duration / 3)))]
        total = sum(segments)
        length = duration / len(segments)
        done = 0.0
        for k, w in enumerate(segments):
            share = w / total
            if fraction <= done + share:
                return (k + (fraction - done) / share) * length
            done += share
        return duration

    def run(self, duration: float, stop: threading.Event) -> None:
        """Emit all events, paced to take about ``duration`` seconds (or less if stopped)."""
        try:
            start = time.monotonic()
            with closing(sqlite3.connect(self.db, timeout=60, isolation_level=None)) as c:
                while self.emitted < self.events and not stop.is_set():
                    plan = self._plan(self.events - self.emitted)
                    self.live = [i for i in self.live if i in self._live_set]
                    c.execute("BEGIN IMMEDIATE")
                    for _, sql, params in plan:
                        cur = c.execute(sql, params)
                        assert cur.rowcount == 1, f"{sql} {params[-1]} changed {cur.rowcount} rows"
                    c.execute("COMMIT")
                    self.emitted += len(plan)
                    self.by_op.update(op for op, _, _ in plan)
                    ahead = start + self.due(self.emitted / self.events, duration) - time.monotonic()
                    if ahead > 0:
                        stop.wait(ahead)
        except BaseException as exc:
            self.error = exc
            raise


# --------------------------------------------------------------------------------------------
# Reconciliation


async def _jetstream_state(url: str, creds: Path) -> dict[str, Any]:
    import nats

    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=1, user_credentials=str(creds))
    try:
        js = nc.jetstream(timeout=5)
        dlq = await js.stream_info(DLQ_STREAM)
        out: dict[str, Any] = {"dlq": int(dlq.state.messages), "dlq_samples": []}
        first = int(dlq.state.first_seq or 0)
        for seq in range(first, first + min(out["dlq"], 5)):
            msg = await js.get_msg(DLQ_STREAM, seq)
            headers = msg.headers or {}
            out["dlq_samples"].append({k: v for k, v in headers.items() if k.startswith("Mesh-")})
        events = await js.stream_info(EVENTS_STREAM)
        out["stream_messages"] = int(events.state.messages)
        ci = await js.consumer_info(EVENTS_STREAM, SINK_DURABLE)
        out["consumer"] = {
            "num_pending": ci.num_pending,
            "num_ack_pending": ci.num_ack_pending,
            "num_redelivered": ci.num_redelivered,
            "delivered": ci.delivered.stream_seq if ci.delivered else None,
            "ack_floor": ci.ack_floor.stream_seq if ci.ack_floor else None,
        }
        return out
    finally:
        await nc.close()


def jetstream_state(url: str, creds: Path) -> dict[str, Any]:
    """DLQ depth (and the first few DLQ entries' headers), stream size and the sink consumer."""
    try:
        return asyncio.run(_jetstream_state(url, creds))
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


@dataclass
class Reconciliation:
    erp_rows: int = 0
    crm_rows: int = 0
    missing: list[int] = field(default_factory=list)
    extra: list[int] = field(default_factory=list)
    different: list[tuple[Any, Any]] = field(default_factory=list)
    double_effects: list[tuple[str, int, int]] = field(default_factory=list)
    effect_once_error: str | None = None
    behind: list[tuple[str, Any, Any]] = field(default_factory=list)
    """Entities whose version guard in the CRM is not the ERP's last change (key, ERP, CRM)."""
    phantoms: list[tuple[str, int]] = field(default_factory=list)
    """(key, version) applied in the CRM that the ERP never produced."""
    applied_versions: int = 0
    captured_events: int = 0
    settled: bool = False
    jetstream: dict[str, Any] = field(default_factory=dict)

    def problems(self, expected_events: int) -> list[str]:
        out = []
        if self.missing:
            out.append(f"{len(self.missing)} rows missing in CRM (e.g. ids {self.missing[:10]})")
        if self.extra:
            out.append(f"{len(self.extra)} extra rows in CRM (e.g. ids {self.extra[:10]})")
        if self.different:
            out.append(f"{len(self.different)} rows differ (e.g. ERP/CRM {self.different[:3]})")
        if self.double_effects:
            out.append(f"{len(self.double_effects)} (key, version) applied twice: {self.double_effects[:10]}")
        if self.effect_once_error:
            out.append(f"effect-once/monotonic versions: {self.effect_once_error}")
        if self.behind:
            out.append(
                f"{len(self.behind)} entities' CRM version guard is not at the ERP's last change "
                f"(key, ERP (version, deleted), CRM): {self.behind[:10]}"
            )
        if self.phantoms:
            out.append(
                f"{len(self.phantoms)} versions applied that the ERP never produced: {self.phantoms[:10]}"
            )
        if self.captured_events != expected_events:
            out.append(f"ERP captured {self.captured_events} change events, the load made {expected_events}")
        dlq = self.jetstream.get("dlq")
        if dlq != 0:
            out.append(f"{DLQ_STREAM} holds {dlq} messages: {self.jetstream.get('dlq_samples')}")
        if not self.settled:
            out.append(f"consumer {SINK_DURABLE} not settled: {self.jetstream.get('consumer')}")
        if "error" in self.jetstream:
            out.append(f"JetStream state unreadable: {self.jetstream['error']}")
        return out


def reconcile(mesh: _MeshBase) -> Reconciliation:
    """Compare ERP and CRM row by row and field by field; check the effect log (no (key,
    version) twice, versions increasing), that every entity's version guard, deleted ones
    included, is at the ERP's last change, the number of captured changes, the DLQ and the
    consumer."""
    rec = Reconciliation()
    erp: dict[Any, tuple[object, ...]] = {r[0]: r for r in rows(mesh.erp)}
    crm: dict[Any, tuple[object, ...]] = {r[0]: r for r in rows(mesh.crm)}
    rec.erp_rows, rec.crm_rows = len(erp), len(crm)
    rec.missing = sorted(erp.keys() - crm.keys())
    rec.extra = sorted(crm.keys() - erp.keys())
    rec.different = [(erp[k], crm[k]) for k in sorted(erp.keys() & crm.keys()) if erp[k] != crm[k]]
    with closing(sqlite3.connect(mesh.erp, timeout=30)) as c:
        rec.captured_events = c.execute("SELECT count(*) FROM chaos_changes").fetchone()[0]
        produced = set(c.execute("SELECT pk, seq FROM chaos_changes").fetchall())
        # SQLite takes the bare column (op) from the row holding max(seq).
        last = {pk: (seq, int(op == "D")) for pk, seq, op in c.execute(
            "SELECT pk, max(seq), op FROM chaos_changes GROUP BY pk")}  # fmt: skip
    with closing(sqlite3.connect(mesh.crm, timeout=30)) as c:
        rec.double_effects = c.execute(
            "SELECT key, version, count(*) FROM version_log GROUP BY key, version HAVING count(*) > 1"
        ).fetchall()
        applied = c.execute("SELECT key, version FROM version_log").fetchall()
        guard = {k: (v, d) for k, v, d in c.execute(
            "SELECT key, version, deleted FROM _mesh_versions WHERE tbl = ?", (TABLE,))}  # fmt: skip
    rec.applied_versions = len(applied)
    rec.phantoms = sorted(set(applied) - produced)
    rec.behind = sorted((k, v, guard.get(k)) for k, v in last.items() if guard.get(k) != v)
    rec.behind += sorted((k, None, v) for k, v in guard.items() if k not in last)
    try:
        assert_effect_once(mesh.crm)
    except AssertionError as exc:
        rec.effect_once_error = str(exc)
    rec.settled = consumer_settled(mesh.sink_url, SINK_DURABLE, mesh.admin_creds)
    rec.jetstream = jetstream_state(mesh.sink_url, mesh.admin_creds)
    return rec


def _stream_state(url: str, creds: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for stream in (EVENTS_STREAM, DLQ_STREAM):
        info = stream_info(url, creds, stream)
        if "error" in info:
            out[stream] = {"error": info["error"]}
            continue
        state = info["state"]
        assert isinstance(state, dict)
        out[stream] = {"messages": int(state["messages"]), "last_seq": int(state["last_seq"])}
        sources = info.get("sources")
        if isinstance(sources, list):
            out[stream]["sources"] = [
                {k: s.get(k) for k in ("name", "lag", "active", "error")} for s in sources
            ]
    return out


def edge_state(mesh: HybridMesh) -> dict[str, Any]:
    """MESH_EVENTS and MESH_DLQ of the leaf and of the hub (messages, last sequence, sources)."""
    out: dict[str, Any] = {}
    for name, server in (("leaf", mesh.leaf), ("hub", mesh.hub)):
        try:
            out[name] = _stream_state(server.url, mesh.admin_creds)
        except Exception as exc:
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def streams_caught_up(mesh: HybridMesh) -> bool:
    """The hub's MESH_EVENTS holds as many events as the leaf's."""
    leaf, hub = last_seq(mesh.leaf), last_seq(mesh.hub)
    return leaf is not None and leaf == hub


def edge_problems(state: dict[str, Any], captured: int) -> list[str]:
    """Stream counts of the leaf-node topology: the leaf holds exactly one event per captured
    change (the relay's republishes deduplicated), the hub exactly the leaf's (sourced, none
    skipped or stored twice), the hub's source has no lag and no error, the leaf's DLQ is empty
    (the hub's is checked with the consumer)."""
    out = []
    try:
        leaf, hub = state["leaf"][EVENTS_STREAM], state["hub"][EVENTS_STREAM]
        leaf_dlq = state["leaf"][DLQ_STREAM]
        if "error" in leaf or "error" in hub or "error" in leaf_dlq:
            return [f"stream state unreadable: {state}"]
    except KeyError:
        return [f"stream state unreadable: {state}"]
    if leaf["messages"] != captured or leaf["last_seq"] != captured:
        out.append(
            f"leaf {EVENTS_STREAM} holds {leaf['messages']} events (last seq {leaf['last_seq']}) "
            f"for {captured} captured changes"
        )
    if hub["messages"] != leaf["messages"] or hub["last_seq"] != hub["messages"]:
        out.append(
            f"hub {EVENTS_STREAM} holds {hub['messages']} events (last seq {hub['last_seq']}), "
            f"the leaf's {leaf['messages']}"
        )
    sources = hub.get("sources") or []
    if len(sources) != 1 or sources[0].get("lag") or sources[0].get("error"):
        out.append(f"hub {EVENTS_STREAM} sources: {sources}")
    if leaf_dlq["messages"]:
        out.append(f"leaf {DLQ_STREAM} holds {leaf_dlq['messages']} messages")
    return out


def wait_for(pred: Callable[[], bool], timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"<{exc}>"
    return "\n".join(f"    {line}" for line in text[-lines:])


def count_in_log(path: Path, *needles: str) -> int:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return 0
    return sum(1 for line in text.splitlines() if any(n in line for n in needles))
