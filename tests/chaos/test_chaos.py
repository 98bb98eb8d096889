"""Chaos: a 50,000-event sync (ERP SQLite -> source agent -> nats-server -> sink agent -> CRM
SQLite) while random faults hit every part of the path: SIGKILL of either agent or of
nats-server (restarted on the same port and store), SIGSTOP/SIGCONT of nats-server, and a CRM
database locked by another writer. At the end the CRM must hold exactly the ERP's rows, field by
field, with no (key, version) applied twice, versions monotonic per key, nothing dead-lettered
and the consumer settled.

The run prints its seed and fault schedule first; ``MESH_CHAOS_SEED=<seed>`` replays both (and
the load). ``MESH_CHAOS_EVENTS`` (default 50000), ``MESH_CHAOS_FAULTS`` (default 24) and
``MESH_CHAOS_SECONDS`` (how long the load and the faults last, default 60) size the run.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.chaos._chaos import (
    FAULT_KINDS,
    SINK_DURABLE,
    ChaosLoad,
    FaultInjector,
    Mesh,
    count_in_log,
    log_tail,
    make_schedule,
    reconcile,
    wait_for,
    watch,
)
from tests.integration._harness import consumer_settled, make_erp, rows

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(420)]

CONVERGE_TIMEOUT = 150.0


def _env(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    return float(value) if value else default


def test_sync_under_chaos(tmp_path: Path) -> None:
    seed = int(_env("MESH_CHAOS_SEED", random.randrange(1 << 30)))
    try:
        _sync_under_chaos(tmp_path, seed)
    except BaseException as exc:
        if f"seed={seed}" not in str(exc):
            exc.add_note(f"chaos seed={seed} (replay: MESH_CHAOS_SEED={seed} bin/chaos)")
        raise


def _sync_under_chaos(tmp_path: Path, seed: int) -> None:
    events = int(_env("MESH_CHAOS_EVENTS", 50_000))
    fault_count = int(_env("MESH_CHAOS_FAULTS", 24))
    seconds = _env("MESH_CHAOS_SECONDS", 60.0)
    schedule = make_schedule(random.Random(seed), fault_count, start=1.0, end=seconds)
    print(f"\nchaos seed={seed} events={events} faults={fault_count} seconds={seconds:g}"
          f"  (replay: MESH_CHAOS_SEED={seed} bin/chaos)")  # fmt: skip
    disabled = [k.name for k in FAULT_KINDS.values() if not k.enabled]
    print(f"fault schedule (offset from load start, fault, duration); not yet enabled: {disabled}")
    for fault in schedule:
        print(f"  {fault}")

    mesh = Mesh(tmp_path)
    mesh.install_capture()
    load = ChaosLoad(mesh.erp, seed, events)
    injector = FaultInjector(mesh, schedule)
    stop = threading.Event()
    where = f"seed={seed} (replay: MESH_CHAOS_SEED={seed} bin/chaos), data in {tmp_path}"
    began = time.monotonic()
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
            return rows(mesh.erp) == rows(mesh.crm) and consumer_settled(mesh.server.url, SINK_DURABLE)

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
        mesh.stop()

    kinds = Counter(f.kind for f, _, _ in injector.done)
    restarts = {role: agent.starts - 1 for role, agent in mesh.agents.items()}
    retries = count_in_log(mesh.sink.log, "will be retried", "retrying", "unavailable")
    print(
        f"chaos summary: seed={seed} events={events} ({dict(load.by_op)}) "
        f"rows ERP={rec.erp_rows} CRM={rec.crm_rows} applied versions={rec.applied_versions}; "
        f"faults injected={len(injector.done)} {dict(sorted(kinds.items()))}; "
        f"agent restarts={restarts} (unplanned {len(mesh.unexpected_exits)}), "
        f"nats-server starts={mesh.broker_starts}; target locked {injector.busy_held:.1f}s, "
        f"sink retry log lines={retries}; DLQ={rec.jetstream.get('dlq')}; "
        f"converged {converged_at - faults_done:.1f}s after the last fault "
        f"({converged_at - load_done:.1f}s after the load); load {load_done - t0:.1f}s, "
        f"total {time.monotonic() - began:.1f}s"
    )
    if problems:
        logs = "\n".join(
            f"  {role} agent log tail ({a.log}):\n{log_tail(a.log)}" for role, a in mesh.agents.items()
        )
        pytest.fail(
            f"chaos {where}:\n  " + "\n  ".join(problems) + f"\n  JetStream: {rec.jetstream}\n{logs}",
            pytrace=False,
        )
    assert len(injector.done) == fault_count, f"{len(injector.done)} of {fault_count} faults ran; {where}"


def test_seed_replays_schedule_and_load(tmp_path: Path) -> None:
    """The same seed gives the same fault schedule and the same changes; every enabled fault
    kind is drawn; faults on one resource never overlap."""
    schedules = [make_schedule(random.Random(7), 24, 1.0, 60.0) for _ in range(2)]
    assert schedules[0] == schedules[1]
    assert make_schedule(random.Random(8), 24, 1.0, 60.0) != schedules[0]
    assert {f.kind for f in schedules[0]} == {k.name for k in FAULT_KINDS.values() if k.enabled}
    ends: dict[str, float] = {}
    for fault in schedules[0]:
        resource = FAULT_KINDS[fault.kind].resource
        assert fault.at >= ends.get(resource, 0.0), f"{fault} overlaps the previous {resource} fault"
        ends[resource] = fault.at + fault.duration

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
