"""Chaos: a 50,000-event sync (ERP SQLite -> source agent -> nats-server -> sink agent -> CRM
SQLite) while random faults hit every part of the path: SIGKILL of either agent or of
nats-server (restarted on the same port and store), SIGSTOP/SIGCONT of nats-server, and a CRM
database locked by another writer. At the end the CRM must hold exactly the ERP's rows, field by
field, with no (key, version) applied twice, versions monotonic per key, nothing dead-lettered
and the consumer settled.

The same through the leaf-node topology (``test_sync_under_chaos_hybrid``): the source agent
publishes into an on-prem leaf nats-server, the hub sources it over a WAN that gets cut.

The run prints its seed and fault schedule first; ``MESH_CHAOS_SEED=<seed>`` replays both (and
the load). ``MESH_CHAOS_EVENTS`` (default 50000), ``MESH_CHAOS_FAULTS`` (default 24) and
``MESH_CHAOS_SECONDS`` (how long the load and the faults last, default 60) size the run; when set
they apply to both tests.

Into a REST target (``test_sync_under_chaos_rest``): the sink agent's REST sink sends the changes
to the fake CRM API process, which answers 500s, 429 storms and slow responses for a while, and
is SIGKILLed. Smaller by default (10,000 events over 45 s): ``MESH_CHAOS_REST_EVENTS`` and
``MESH_CHAOS_REST_SECONDS`` size it (``MESH_CHAOS_FAULTS`` and ``MESH_CHAOS_SEED`` apply too).
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.chaos._chaos import (
    FAULT_KINDS,
    HYBRID_KINDS,
    REST_KINDS,
    SINGLE_BROKER_KINDS,
    SINK_DURABLE,
    ChaosLoad,
    FaultInjector,
    HybridMesh,
    Mesh,
    _MeshBase,
    check_cuts,
    count_in_log,
    edge_problems,
    edge_state,
    log_tail,
    make_schedule,
    reconcile,
    streams_caught_up,
    wait_for,
    watch,
)
from tests.chaos._rest import RestFaultInjector, RestMesh, api_matches, reconcile_rest
from tests.integration._harness import consumer_settled, make_erp, rows

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(420)]

CONVERGE_TIMEOUT = 150.0


def _env(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    return float(value) if value else default


def _seeded(run: Callable[[int], None], replay: str) -> None:
    seed = int(_env("MESH_CHAOS_SEED", random.randrange(1 << 30)))
    try:
        run(seed)
    except BaseException as exc:
        if f"seed={seed}" not in str(exc):
            exc.add_note(f"chaos seed={seed} (replay: MESH_CHAOS_SEED={seed} {replay})")
        raise


def test_sync_under_chaos(tmp_path: Path, security_dir: Path) -> None:
    _seeded(lambda seed: _sync_under_chaos(tmp_path, security_dir, seed, hybrid=False), "bin/chaos")


def test_sync_under_chaos_hybrid(tmp_path: Path, security_dir: Path) -> None:
    """ERP SQLite -> source agent -> on-prem LEAF nats-server (JetStream domain ``edge``) == WAN
    ==> cloud HUB nats-server, whose MESH_EVENTS sources the leaf's -> sink agent -> CRM SQLite,
    both servers from the files ``meshctl leafnode config`` writes, the WAN a TCP proxy.

    Faults: the WAN cut for 2-8 s (the edge agent must keep capturing and publishing into the
    leaf meanwhile, and the hub take nothing), SIGKILL of either agent, SIGKILL (restart on the
    same port and store) and SIGSTOP/SIGCONT of the hub and of the leaf nats-server, a locked CRM.
    The same reconciliation as the single-broker test, plus: the leaf holds one event per captured
    change, the hub exactly the leaf's, the hub's source has no lag, both DLQs are empty.

    Keeping the hub's sourcing prompt is part of the system under test: nats-server alone retries
    a broken source only after 10 s, 20 s, ... up to 2 min. The test runs, as a child process for
    the whole run, what an operator runs as a service next to the hub::

        meshctl leafnode link --domain edge --server nats://<hub>:4222 --watch

    (it keeps the source in the hub's stream config and restarts it when it stalls); an exit of
    it fails the test like an agent's.

    Defaults as the single-broker test: 50,000 events over 60 s with 24 faults (every kind at
    least once); about 60-75 s on 2 cores.
    """
    _seeded(
        lambda seed: _sync_under_chaos(tmp_path, security_dir, seed, hybrid=True),
        "bin/chaos -k under_chaos_hybrid",
    )


def _sync_under_chaos(tmp_path: Path, security_dir: Path, seed: int, *, hybrid: bool) -> None:
    events = int(_env("MESH_CHAOS_EVENTS", 50_000))
    fault_count = int(_env("MESH_CHAOS_FAULTS", 24))
    seconds = _env("MESH_CHAOS_SECONDS", 60.0)
    kinds = HYBRID_KINDS if hybrid else SINGLE_BROKER_KINDS
    replay = f"MESH_CHAOS_SEED={seed} bin/chaos" + (" -k under_chaos_hybrid" if hybrid else "")
    schedule = make_schedule(random.Random(seed), fault_count, start=1.0, end=seconds, kinds=kinds)
    topology = "leaf node + hub" if hybrid else "single broker"
    print(f"\nchaos ({topology}) seed={seed} events={events} faults={fault_count} seconds={seconds:g}"
          f"  (replay: {replay})")  # fmt: skip
    print(f"fault schedule (offset from load start, fault, duration) drawn from {list(kinds)}")
    for fault in schedule:
        print(f"  {fault}")

    mesh: _MeshBase = HybridMesh(tmp_path, security_dir) if hybrid else Mesh(tmp_path, security_dir)
    mesh.install_capture()
    load = ChaosLoad(mesh.erp, seed, events)
    injector = FaultInjector(mesh, schedule)
    stop = threading.Event()
    where = f"seed={seed} (replay: {replay}), data in {tmp_path}"
    began = time.monotonic()
    watchdog: threading.Thread | None = None
    try:
        mesh.start()
        watchdog = watch(mesh, stop)
        t0 = time.monotonic()
        loader = threading.Thread(target=load.run, args=(seconds, stop), name="chaos-load", daemon=True)
        loader.start()
        injector.start(t0)
        loader.join(seconds + 120)
        assert not loader.is_alive(), f"the load did not finish in {seconds + 120:.0f}s; {where}"
        assert load.error is None, f"the load failed: {load.error!r}; {where}"
        load_done = time.monotonic()
        injector.join(seconds + 60)
        faults_done = max(injector.last_end, t0)

        def converged() -> bool:
            if isinstance(mesh, HybridMesh) and not streams_caught_up(mesh):
                return False
            settled = consumer_settled(mesh.sink_url, SINK_DURABLE, mesh.admin_creds)
            return rows(mesh.erp) == rows(mesh.crm) and settled

        ok = wait_for(converged, CONVERGE_TIMEOUT)
        converged_at = time.monotonic()
        # Settled means no redelivery can still arrive: the rows must still match.
        rec = reconcile(mesh)
        stop.set()
        watchdog.join()
        problems = [] if ok else [f"no convergence within {CONVERGE_TIMEOUT:.0f}s after the faults"]
        problems += rec.problems(events)
        problems += [f"fault injection: {e}" for e in injector.errors]
        problems += mesh.unexpected_exits
        edge: dict[str, object] = {}
        verified_cuts = 0
        if isinstance(mesh, HybridMesh):
            edge = edge_state(mesh)
            problems += edge_problems(edge, rec.captured_events)
            cut_problems, verified_cuts = check_cuts(injector)
            problems += cut_problems
        for role, agent in mesh.agents.items():
            try:
                code = agent.terminate()
            except AssertionError as exc:  # ignored SIGTERM
                problems.append(f"{role} agent: {exc}")
                continue
            if code != 0:
                problems.append(f"{role} agent exited {code} on SIGTERM; see {agent.log}")
    finally:
        stop.set()
        injector.stop.set()
        if watchdog is not None:
            watchdog.join(10)  # so that it restarts nothing we stop
        mesh.stop()

    kinds_done = Counter(f.kind for f, _, _ in injector.done)
    restarts = {role: agent.starts - 1 for role, agent in mesh.agents.items()}
    retries = count_in_log(mesh.sink.log, "will be retried", "retrying", "unavailable")
    if isinstance(mesh, Mesh):
        servers = f"nats-server starts={mesh.broker_starts}"
    else:
        servers = f"nats-server starts={dict(mesh.server_starts)}"
    print(
        f"chaos summary: seed={seed} events={events} ({dict(load.by_op)}) "
        f"rows ERP={rec.erp_rows} CRM={rec.crm_rows} applied versions={rec.applied_versions}; "
        f"faults injected={len(injector.done)} {dict(sorted(kinds_done.items()))}; "
        f"agent restarts={restarts} (unplanned {len(mesh.unexpected_exits)}), "
        f"{servers}; target locked {injector.busy_held:.1f}s, "
        f"sink retry log lines={retries}; DLQ={rec.jetstream.get('dlq')}; "
        f"converged {converged_at - faults_done:.1f}s after the last fault "
        f"({converged_at - load_done:.1f}s after the load); load {load_done - t0:.1f}s, "
        f"total {time.monotonic() - began:.1f}s"
    )
    if isinstance(mesh, HybridMesh):
        print(
            f"  edge: {len(injector.cuts)} WAN cuts ({verified_cuts} with the edge side verified), "
            f"stalled source restarted by `link --watch` {mesh.watcher_restarts}x; streams {edge}"
        )
        for cut in injector.cuts:
            print(f"  {cut}")
    if problems:
        logs = "\n".join(
            f"  {role} agent log tail ({a.log}):\n{log_tail(a.log)}" for role, a in mesh.agents.items()
        )
        pytest.fail(
            f"chaos {where}:\n  " + "\n  ".join(problems) + f"\n  JetStream: {rec.jetstream}\n{logs}",
            pytrace=False,
        )
    assert len(injector.done) == fault_count, f"{len(injector.done)} of {fault_count} faults ran; {where}"


@pytest.mark.parametrize(
    "kinds", [SINGLE_BROKER_KINDS, HYBRID_KINDS, REST_KINDS], ids=["single", "hybrid", "rest"]
)
def test_seed_replays_schedule(kinds: tuple[str, ...]) -> None:
    """The same seed gives the same fault schedule; every kind of the topology is drawn; faults
    on one resource never overlap."""
    schedules = [make_schedule(random.Random(7), 24, 1.0, 60.0, kinds) for _ in range(2)]
    assert schedules[0] == schedules[1]
    assert make_schedule(random.Random(8), 24, 1.0, 60.0, kinds) != schedules[0]
    assert {f.kind for f in schedules[0]} == set(kinds)
    ends: dict[str, float] = {}
    for fault in schedules[0]:
        resource = FAULT_KINDS[fault.kind].resource
        assert fault.at >= ends.get(resource, 0.0), f"{fault} overlaps the previous {resource} fault"
        ends[resource] = fault.at + fault.duration
    for fault in schedules[0]:
        kind = FAULT_KINDS[fault.kind]
        assert kind.min_duration <= fault.duration <= kind.max_duration, fault


def test_seed_replays_load(tmp_path: Path) -> None:
    """The same seed gives the same changes, of every kind."""
    dumps = []
    for run in ("a", "b"):
        db = tmp_path / f"erp-{run}.db"
        make_erp(db)
        load = ChaosLoad(db, seed=7, events=3000)
        load.run(0.0, threading.Event())
        assert load.emitted == 3000
        dumps.append((rows(db), load.by_op))
    assert dumps[0] == dumps[1]
    assert set(dumps[0][1]) == {"insert", "update", "delete", "reinsert", "churn"}, dumps[0][1]


def test_sync_under_chaos_rest(tmp_path: Path, security_dir: Path) -> None:
    """ERP SQLite -> source agent -> nats-server -> sink agent with a REST sink -> the fake CRM
    API (:mod:`tests.fakes.crm_api`) as its own process, with a bearer token from the
    environment, a 2 s request timeout, 3 attempts, Retry-After honoured up to 2 s and a circuit
    breaker; the consumer retries (max_deliver 1000) rather than dead-letters an outage.

    Faults: the API answering 500 for 1-4 s, a 429 storm (Retry-After: 1) for 1-4 s, slow answers
    (the write done, the answer after the client's timeout) for 1-3 s, SIGKILL and restart of the
    API process (same port and database), SIGKILL of either agent and of nats-server.

    At the end the API's records equal the ERP's rows field by field, and its write log shows no
    (key, version, op) effective twice: a retried request after a timeout or a killed API, and a
    redelivered record after a killed sink, carry the same Idempotency-Key, which the API replays
    without writing again. Versions increase per key, each key's last effective write is the ERP's
    last change, nothing is dead-lettered and the consumer is settled.

    Defaults: 10,000 events over 45 s with 24 faults (every kind at least once); about 70-80 s
    on 2 cores.
    """
    _seeded(
        lambda seed: _rest_sync_under_chaos(tmp_path, security_dir, seed), "bin/chaos -k under_chaos_rest"
    )


def _rest_sync_under_chaos(tmp_path: Path, security_dir: Path, seed: int) -> None:
    events = int(_env("MESH_CHAOS_REST_EVENTS", 10_000))
    fault_count = int(_env("MESH_CHAOS_FAULTS", 24))
    seconds = _env("MESH_CHAOS_REST_SECONDS", 45.0)
    replay = f"MESH_CHAOS_SEED={seed} bin/chaos -k under_chaos_rest"
    schedule = make_schedule(random.Random(seed), fault_count, start=1.0, end=seconds, kinds=REST_KINDS)
    print(f"\nchaos (REST target) seed={seed} events={events} faults={fault_count} seconds={seconds:g}"
          f"  (replay: {replay})")  # fmt: skip
    print(f"fault schedule (offset from load start, fault, duration) drawn from {list(REST_KINDS)}")
    for fault in schedule:
        print(f"  {fault}")

    mesh = RestMesh(tmp_path, security_dir)
    mesh.install_capture()
    load = ChaosLoad(mesh.erp, seed, events)
    injector = RestFaultInjector(mesh, schedule)
    stop = threading.Event()
    where = f"seed={seed} (replay: {replay}), data in {tmp_path}"
    began = time.monotonic()
    watchdog: threading.Thread | None = None
    try:
        mesh.start()
        watchdog = watch(mesh, stop)
        t0 = time.monotonic()
        loader = threading.Thread(target=load.run, args=(seconds, stop), name="chaos-load", daemon=True)
        loader.start()
        injector.start(t0)
        loader.join(seconds + 120)
        assert not loader.is_alive(), f"the load did not finish in {seconds + 120:.0f}s; {where}"
        assert load.error is None, f"the load failed: {load.error!r}; {where}"
        load_done = time.monotonic()
        injector.join(seconds + 60)
        faults_done = max(injector.last_end, t0)

        def converged() -> bool:
            return api_matches(mesh) and consumer_settled(mesh.sink_url, SINK_DURABLE, mesh.admin_creds)

        ok = wait_for(converged, CONVERGE_TIMEOUT)
        converged_at = time.monotonic()
        rec = reconcile_rest(mesh)
        stop.set()
        watchdog.join()
        stats = mesh.api.stats()
        problems = [] if ok else [f"no convergence within {CONVERGE_TIMEOUT:.0f}s after the faults"]
        problems += rec.problems(events)
        problems += [f"fault injection: {e}" for e in injector.errors]
        problems += mesh.unexpected_exits
        for role, agent in mesh.agents.items():
            try:
                code = agent.terminate()
            except AssertionError as exc:  # ignored SIGTERM
                problems.append(f"{role} agent: {exc}")
                continue
            if code != 0:
                problems.append(f"{role} agent exited {code} on SIGTERM; see {agent.log}")
        with mesh.api_lock:
            code = mesh.api.terminate()
        if code != 0:
            problems.append(f"the CRM API exited {code} on SIGTERM; see {mesh.api.log}")
    finally:
        stop.set()
        injector.stop.set()
        if watchdog is not None:
            watchdog.join(10)  # so that it restarts nothing we stop
        mesh.stop()

    kinds_done = Counter(f.kind for f, _, _ in injector.done)
    restarts = {role: agent.starts - 1 for role, agent in mesh.agents.items()}
    retries = count_in_log(
        mesh.sink.log, "will be retried", "retrying", "unavailable", "giving the batch back"
    )
    print(
        f"chaos summary: seed={seed} events={events} ({dict(load.by_op)}) "
        f"rows ERP={rec.erp_rows} API={rec.api_rows}; API effective writes={rec.writes} "
        f"{rec.writes_by_op}; faults injected={len(injector.done)} {dict(sorted(kinds_done.items()))}; "
        f"API misbehaving {dict(mesh.api_chaos)} s; agent restarts={restarts}, API starts="
        f"{mesh.api.starts} (unplanned exits {len(mesh.unexpected_exits)}), nats-server starts="
        f"{mesh.broker_starts}; sink retry log lines={retries}; DLQ={rec.jetstream.get('dlq')}; "
        f"converged {converged_at - faults_done:.1f}s after the last fault "
        f"({converged_at - load_done:.1f}s after the load); load {load_done - t0:.1f}s, "
        f"total {time.monotonic() - began:.1f}s"
    )
    print(f"  API (since its last start): {stats}")
    if problems:
        logs = "\n".join(
            f"  {role} agent log tail ({a.log}):\n{log_tail(a.log)}" for role, a in mesh.agents.items()
        )
        pytest.fail(
            f"chaos {where}:\n  " + "\n  ".join(problems) + f"\n  JetStream: {rec.jetstream}\n{logs}",
            pytrace=False,
        )
    assert len(injector.done) == fault_count, f"{len(injector.done)} of {fault_count} faults ran; {where}"
