"""``meshctl bench``: the mesh path against raw nats-py, in the same run (a benchmark, not a test).

Two measurements, each for the mesh and for the raw baseline, on the same nats-server:

* **drain**: events/s to move a backlog of N changes end to end. Mesh: N rows already in the
  source's change table; a source agent and a sink agent (separate processes, as deployed) are
  started and the clock runs until the target holds all N. Raw: a window of ``js.publish`` with
  ``Nats-Msg-Id`` plus a pull consumer (fetch + ack), no stores, until all N are acked.
* **latency**: p50/p99 from the change to its durable effect at a paced rate. Mesh: rows
  inserted at the rate; the target's trigger stamps the apply time. Raw: publish stamped at
  the rate; the consumer computes the delay on receipt.

It prints the figures and the ratio mesh/raw, and the agents' peak RSS.
"""

from __future__ import annotations

import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from mesh.broker import NatsServer
from mesh.devtools._bench_auth import Secured as _Secured

__all__ = ["run_bench", "run_outage_bench"]

_SOURCE_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY, payload TEXT NOT NULL, amount_cents INTEGER NOT NULL,
    created_ms REAL NOT NULL
);
"""
_TARGET_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY, payload TEXT NOT NULL, amount_cents INTEGER NOT NULL,
    created_ms REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS applied (id INTEGER PRIMARY KEY, applied_ms REAL NOT NULL);
CREATE TRIGGER IF NOT EXISTS events_applied AFTER INSERT ON events BEGIN
    INSERT OR REPLACE INTO applied VALUES (NEW.id, (julianday('now') - 2440587.5) * 86400000.0);
END;
"""


def _now_ms() -> float:
    return time.time() * 1000


def _agent_toml(name: str, system: str, root: Path, url: str, flow: str) -> str:
    return f"""
log_level = "warning"
[agent]
name = "{name}"
system = "{system}"
state_dir = "{root / "state" / name}"
[nats]
servers = ["{url}"]
creds = "{root / "creds" / name}.creds"
inbox_prefix = "_INBOX.{name}"
[relay]
batch_size = 2000
window = 512
[trace]
enabled = {"false" if os.environ.get("MESH_BENCH_TRACE") == "0" else "true"}
{flow}"""


def _source_flow(db: Path) -> str:
    return f"""
[[flows]]
name = "bench"
entity = "event"
[flows.source]
adapter = "sqlite"
path = "{db}"
table = "events"
key = "id"
batch_size = 2000
poll_interval = 0.005
"""


def _sink_flow(db: Path) -> str:
    return f"""
[[flows]]
name = "bench"
entity = "event"
[flows.consumer]
batch_size = 1000
fetch_timeout = 0.05
[flows.sink]
adapter = "sqlite"
path = "{db}"
table = "events"
key = "id"
"""


class _Mesh:
    """A source agent and a sink agent as child processes, with their SQLite systems."""

    def __init__(self, root: Path, url: str, sec: _Secured) -> None:
        self.root = root
        root.mkdir(parents=True)
        self.src_db, self.dst_db = root / "source.db", root / "target.db"
        with sqlite3.connect(self.src_db) as c:
            c.execute("PRAGMA journal_mode=WAL")
            c.executescript(_SOURCE_SCHEMA)
        with sqlite3.connect(self.dst_db) as c:
            c.execute("PRAGMA journal_mode=WAL")
            c.executescript(_TARGET_SCHEMA)
        self.configs = []
        for name, system, flow in (
            ("bench-src", "erp", _source_flow(self.src_db)),
            ("bench-dst", "crm", _sink_flow(self.dst_db)),
        ):
            path = root / f"{name}.toml"
            text = _agent_toml(name, system, root, url, flow)
            path.write_text(text)
            sec.agent_creds(text, root / "creds" / f"{name}.creds")
            self.configs.append(path)
        self.procs: list[subprocess.Popen[bytes]] = []

    async def install_capture(self) -> None:
        """Install change capture before the backlog is written (so it is captured as changes)."""
        from adapters.sql.sqlite import install_change_capture

        await install_change_capture(str(self.src_db), "events")

    def start(self, only: str | None = None) -> None:
        for cfg in self.configs:
            if only is not None and cfg.stem != only:
                continue
            log = open(self.root / f"{cfg.stem}.log", "ab")  # noqa: SIM115
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "mesh", "agent", "run", "--config", str(cfg)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            ))  # fmt: skip
            log.close()

    def peak_rss_mb(self) -> list[float]:
        out = []
        for p in self.procs:
            try:
                text = Path(f"/proc/{p.pid}/status").read_text()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("VmHWM:"):
                    out.append(int(line.split()[1]) / 1024)
        return out

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def applied(self) -> int:
        with sqlite3.connect(self.dst_db, timeout=10) as c:
            return int(c.execute("SELECT count(*) FROM applied").fetchone()[0])


def _insert(db: Path, first: int, n: int) -> None:
    now = _now_ms()
    rows = [(i, f"event {i} " + "x" * 64, i * 100, now) for i in range(first, first + n)]
    with sqlite3.connect(db, timeout=10) as c:
        c.executemany("INSERT INTO events VALUES (?, ?, ?, ?)", rows)


async def _wait_applied(mesh: _Mesh, n: int, timeout: float) -> float:
    start = time.perf_counter()
    with anyio.fail_after(timeout):
        while mesh.applied() < n:
            await anyio.sleep(0.05)
    return time.perf_counter() - start


async def _mesh_drain(root: Path, url: str, events: int, sec: _Secured) -> dict[str, Any]:
    mesh = _Mesh(root, url, sec)
    await sec.streams(url)
    await mesh.install_capture()
    for first in range(1, events + 1, 5000):
        _insert(mesh.src_db, first, min(5000, events + 1 - first))
    mesh.start("bench-dst")  # the sink first, so its consumer waits when the backlog arrives
    await anyio.sleep(2)
    t0 = time.perf_counter()
    mesh.start("bench-src")
    try:
        await _wait_applied(mesh, events, timeout=600)
        elapsed = time.perf_counter() - t0
        rss = mesh.peak_rss_mb()
    finally:
        mesh.stop()
    return {"events": events, "seconds": elapsed, "rate": events / elapsed, "peak_rss_mb": rss}


async def _mesh_latency(root: Path, url: str, rate: int, seconds: float, sec: _Secured) -> dict[str, Any]:
    mesh = _Mesh(root, url, sec)
    await sec.streams(url)
    await mesh.install_capture()
    mesh.start()
    try:
        _insert(mesh.src_db, 1, 1)  # warm up: both agents connected and consuming
        await _wait_applied(mesh, 1, timeout=60)
        total = await _paced(lambda first, n: _insert(mesh.src_db, first, n), 2, rate, seconds)
        await _wait_applied(mesh, total + 1, timeout=120)
        rss = mesh.peak_rss_mb()
    finally:
        mesh.stop()
    with sqlite3.connect(mesh.dst_db) as c:
        lat = [
            r[0]
            for r in c.execute(
                "SELECT a.applied_ms - e.created_ms FROM events e JOIN applied a USING (id) WHERE e.id > 1"
            )
        ]
    return {"rate": rate, "events": len(lat), **_percentiles(lat), "peak_rss_mb": rss}


async def _paced(emit: Any, first: int, rate: int, seconds: float) -> int:
    """Call ``emit(first_id, n)`` in 10 ms ticks so that ``rate`` events/s go out."""
    tick = 0.01
    per_tick = max(1, round(rate * tick))
    sent = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        target = int((time.perf_counter() - start) / tick + 1) * per_tick
        if sent < target:
            n = target - sent
            await emit(first + sent, n) if _is_async(emit) else emit(first + sent, n)
            sent += n
        await anyio.sleep(tick / 2)
    return sent


def _is_async(fn: Any) -> bool:
    import inspect

    return inspect.iscoroutinefunction(fn)


def _percentiles(lat: list[float]) -> dict[str, float]:
    if not lat:
        return {"p50_ms": float("nan"), "p99_ms": float("nan")}
    qs = statistics.quantiles(lat, n=100, method="inclusive")
    return {"p50_ms": qs[49], "p99_ms": qs[98], "max_ms": max(lat)}


async def _raw(url: str, events: int, rate: int, seconds: float, creds: Path) -> dict[str, Any]:
    """The baseline: nats-py alone, no stores (as the admin: same server, same auth)."""
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

    nc = await nats.connect(url, user_credentials=str(creds))
    try:
        js = nc.jetstream(timeout=5)
        await js.add_stream(StreamConfig(name="RAW", subjects=["raw.>"], duplicate_window=120))
        payload = b"x" * 150  # about the size of a mesh envelope for one row

        async def publish_all(tag: str, n: int) -> None:
            limiter = anyio.Semaphore(512)

            async def one(i: int) -> None:
                try:
                    await js.publish("raw.e", payload, headers={"Nats-Msg-Id": f"{tag}-{i}"}, timeout=5)
                finally:
                    limiter.release()

            async with anyio.create_task_group() as tg:
                for i in range(n):
                    await limiter.acquire()
                    tg.start_soon(one, i)

        async def consume(durable: str, n: int, on_msg: Any = None) -> None:
            sub = await js.pull_subscribe(
                "raw.>", durable=durable,
                config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=20_000),
            )  # fmt: skip
            got = 0
            while got < n:
                try:
                    msgs = await sub.fetch(1000, timeout=0.05)
                except (nats.errors.TimeoutError, TimeoutError):
                    continue
                for m in msgs:
                    if on_msg:
                        on_msg(m)
                    await m.ack()
                got += len(msgs)

        # drain: publish and consume concurrently, like outbox relay + sink
        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            tg.start_soon(publish_all, "drain", events)
            tg.start_soon(consume, "drain", events)
        drain_s = time.perf_counter() - t0
        await js.purge_stream("RAW")

        # latency at the paced rate
        lat: list[float] = []
        sent_total = 0

        async def emit(first: int, n: int) -> None:
            for i in range(first, first + n):
                await js.publish("raw.e", str(_now_ms()).encode(), headers={"Nats-Msg-Id": f"lat-{i}"})

        async def run_paced() -> None:
            nonlocal sent_total
            sent_total = await _paced(emit, 0, rate, seconds)

        def on_msg(m: Any) -> None:
            lat.append(_now_ms() - float(m.data))

        async with anyio.create_task_group() as tg:
            tg.start_soon(run_paced)
            with anyio.move_on_after(seconds + 30):
                await consume("lat", max(1, int(rate * seconds * 0.95)), on_msg)
        await js.delete_stream("RAW")
    finally:
        await nc.close()
    return {
        "drain": {"events": events, "seconds": drain_s, "rate": events / drain_s},
        "latency": {"rate": rate, "events": len(lat), **_percentiles(lat)},
    }


async def _outage(root: Path, server: NatsServer, events: int, sec: _Secured) -> dict[str, Any]:
    """Capture ``events`` changes with the broker down, then bring it up and time the drain."""
    mesh = _Mesh(root, server.url, sec)
    await mesh.install_capture()
    mesh.start("bench-src")  # the broker is down: the agent captures into its outbox only
    t0 = time.perf_counter()
    for first in range(1, events + 1, 5000):
        _insert(mesh.src_db, first, min(5000, events + 1 - first))
    outbox = root / "state" / "bench-src" / "outbox.db"
    try:
        with anyio.fail_after(600):
            while _outbox_rows(outbox) < events:
                await anyio.sleep(0.1)
        capture_s = time.perf_counter() - t0
        with sqlite3.connect(outbox) as c:
            payload = int(c.execute("SELECT sum(length(data)) FROM outbox").fetchone()[0])
        disk = sum(p.stat().st_size for p in outbox.parent.glob("outbox.db*"))
        await anyio.to_thread.run_sync(server.start)
        await sec.streams(server.url)
        mesh.start("bench-dst")
        t1 = time.perf_counter()
        await _wait_applied(mesh, events, timeout=600)
        drain_s = time.perf_counter() - t1
    finally:
        mesh.stop()
    per_event = disk / events
    return {
        "events": events,
        "capture_rate_offline": events / capture_s,
        "outbox_payload_bytes_per_event": payload / events,
        "outbox_disk_bytes_per_event": per_event,
        "drain_rate_after": events / drain_s,
        "outage_hours_per_gib": {str(r): (1 << 30) / (per_event * r) / 3600 for r in (10, 100, 1000)},
    }


def _outbox_rows(path: Path) -> int:
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as c:
            return int(c.execute("SELECT count(*) FROM outbox").fetchone()[0])
    except sqlite3.Error:
        return 0


def run_outage_bench(*, events: int, json_out: Path | None) -> dict[str, Any]:
    """How long an outage the edge survives per GiB of disk, and how fast it drains after."""
    root = Path(tempfile.mkdtemp(prefix="mesh-outage-"))
    sec = _Secured(root)
    server = sec.server(root / "nats")  # started only after the capture
    try:
        print(f"outage: {events} changes captured with the broker down, then drained ...", flush=True)
        res = anyio.run(_outage, root / "run", server, events, sec)
        raw = anyio.run(
            _raw, server.url, events, 1000, 0.5, sec.admin_creds, backend_options={"use_uvloop": True}
        )
    finally:
        server.stop()
    res["raw_drain_rate"] = raw["drain"]["rate"]
    print()
    print(f"captured offline       {res['capture_rate_offline']:10.0f} events/s")
    print(f"outbox on disk         {res['outbox_disk_bytes_per_event']:10.0f} bytes/event "
          f"(envelopes {res['outbox_payload_bytes_per_event']:.0f})")  # fmt: skip
    for r, hours in res["outage_hours_per_gib"].items():
        print(f"outage per GiB @ {r:>4}/s {hours:10.1f} hours")
    print(f"drain after the outage {res['drain_rate_after']:10.0f} events/s "
          f"({res['drain_rate_after'] / res['raw_drain_rate']:.2f}x raw nats-py "
          f"{res['raw_drain_rate']:.0f}/s in the same run)")  # fmt: skip
    if json_out:
        json_out.write_text(json.dumps(res, indent=2))
    return res


def run_bench(*, events: int, rate: int, seconds: float, json_out: Path | None) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="mesh-bench-"))
    sec = _Secured(root)
    with sec.server(root / "nats") as server:
        print(f"nats-server {server.url} (secured: {sec.dir}); work dir {root}", flush=True)
        print(f"raw nats-py: drain {events} + paced {rate}/s for {seconds:.0f}s ...", flush=True)
        raw = anyio.run(
            _raw, server.url, events, rate, seconds, sec.admin_creds, backend_options={"use_uvloop": True}
        )
        print(f"mesh: drain {events} ...", flush=True)
        drain = anyio.run(_mesh_drain, root / "drain", server.url, events, sec)
        print(f"mesh: paced {rate}/s for {seconds:.0f}s ...", flush=True)
        latency = anyio.run(_mesh_latency, root / "latency", server.url, rate, seconds, sec)
    result = {
        "raw": raw,
        "mesh": {"drain": drain, "latency": latency},
        "drain_ratio_mesh_over_raw": drain["rate"] / raw["drain"]["rate"],
        "cpus": os.cpu_count(),
    }
    print()
    print(f"{'':24}{'mesh':>12}{'raw nats-py':>14}{'mesh/raw':>10}")
    print(f"{'drain events/s':24}{drain['rate']:12.0f}{raw['drain']['rate']:14.0f}"
          f"{result['drain_ratio_mesh_over_raw']:10.2f}")  # fmt: skip
    for q in ("p50_ms", "p99_ms"):
        m, r = latency[q], raw["latency"][q]
        print(f"{q + f' @ {rate}/s':24}{m:12.1f}{r:14.1f}{m / r if r else float('nan'):10.2f}")
    rss = latency["peak_rss_mb"] + drain["peak_rss_mb"]
    print(f"agent peak RSS (MB): {', '.join(f'{x:.0f}' for x in rss)}")
    if json_out:
        json_out.write_text(json.dumps(result, indent=2))
    return result
