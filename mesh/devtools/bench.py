"""``meshctl bench``: the mesh path against raw nats-py, in the same run (a benchmark, not a test).

Two measurements, each for the mesh and for the raw baseline, on the same nats-server:

* **drain**: events/s to move a backlog of N changes end to end. Mesh: N rows already in the
  source's change table; a source agent and a sink agent (separate processes, as deployed) are
  started and the clock runs until the target holds all N. Raw: a window of ``js.publish`` with
  ``Nats-Msg-Id`` plus a pull consumer (fetch + ack), no stores, until all N are acked.
* **latency**: p50/p99 from the change to its durable effect at a paced rate. Mesh: rows
  inserted at the rate; the target's trigger stamps the apply time. Raw: publish stamped at
  the rate; the consumer computes the delay on receipt.

**The FastStream peer** (:mod:`mesh.devtools.bench_faststream`, the ``bench`` extra) does the
same job the way a competent user would write it, in two processes like the agents; it runs as
shipped and with its batch-pull TimeoutError worked around, and the faster of the two is the one
compared against (JSON key ``faststream``; both are kept). Every pipeline's processes are
measured for CPU seconds (``/proc/<pid>/stat``: source, sink, and the nats-server over the same
phase) and peak RSS. ``--repeat N`` interleaves the pipelines N times, each round on a fresh
nats-server, and reports medians.

It prints the figures and the ratios.

Profiling hook (for developers): with ``MESH_BENCH_PROFILE=<dir>`` set, each mesh agent of a
drain is sampled by ``py-spy record`` (200 Hz, collapsed stacks) into
``<dir>/<phase>-<role>-<pid>.txt``, and the pids are printed; ``MESH_BENCH_PROFILE_ROLES``
(default ``source,sink``) names the roles sampled, ``MESH_BENCH_PROFILE_ARGS`` adds py-spy
options (e.g. ``--native``). py-spy must be on PATH (or next to the
interpreter); the sampling costs CPU, so profiled runs are not measurements.
"""

from __future__ import annotations

import contextlib
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

__all__ = ["run_bench", "run_outage_bench", "run_scale_bench"]

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
CREATE TABLE IF NOT EXISTS writes (id INTEGER NOT NULL);
CREATE TRIGGER IF NOT EXISTS events_inserted AFTER INSERT ON events BEGIN
    INSERT INTO writes VALUES (NEW.id);
END;
CREATE TRIGGER IF NOT EXISTS events_updated AFTER UPDATE ON events BEGIN
    INSERT INTO writes VALUES (NEW.id);
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


class _Procs:
    """A pipeline's processes and its target database."""

    procs: list[subprocess.Popen[bytes]]
    roles: list[str]
    dst_db: Path

    def peak_rss_mb(self) -> dict[str, float]:
        return {role: _peak_rss_mb(p.pid) for role, p in zip(self.roles, self.procs, strict=True)}

    def cpu_s(self) -> dict[str, float]:
        return {role: _cpu_s(p.pid) for role, p in zip(self.roles, self.procs, strict=True)}

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def effects(self) -> tuple[int, int]:
        """(writes to the target's rows, distinct rows written): equal when every event took
        effect once."""
        with sqlite3.connect(self.dst_db, timeout=10) as c:
            n, distinct = c.execute("SELECT count(*), count(DISTINCT id) FROM writes").fetchone()
            return int(n), int(distinct)

    def applied(self) -> int:
        with sqlite3.connect(self.dst_db, timeout=10) as c:
            return int(c.execute("SELECT count(*) FROM applied").fetchone()[0])


class _Mesh(_Procs):
    """A source agent and a sink agent as child processes, with their SQLite systems."""

    def __init__(self, root: Path, url: str, sec: _Secured, sinks: int = 1) -> None:
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
        agents = [("bench-src", "erp", _source_flow(self.src_db))]
        # replicas of one sink share its durable consumer (same flow, same system)
        agents += [(f"bench-dst{i or ''}", "crm", _sink_flow(self.dst_db)) for i in range(sinks)]
        for name, system, flow in agents:
            path = root / f"{name}.toml"
            text = _agent_toml(name, system, root, url, flow)
            path.write_text(text)
            sec.agent_creds(text, root / "creds" / f"{name}.creds")
            self.configs.append(path)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.roles: list[str] = []

    async def install_capture(self) -> None:
        """Install change capture before the backlog is written (so it is captured as changes)."""
        from adapters.sql.sqlite import install_change_capture

        await install_change_capture(str(self.src_db), "events")

    def start(self, only: str | None = None) -> None:
        for cfg in self.configs:
            role = "source" if cfg.stem == "bench-src" else "sink"
            if only is not None and role != only:
                continue
            if role in self.roles:
                role = cfg.stem.replace("bench-dst", "sink")
            log = open(self.root / f"{cfg.stem}.log", "ab")  # noqa: SIM115
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "mesh", "agent", "run", "--config", str(cfg)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            ))  # fmt: skip
            log.close()
            self.roles.append(role)
            _profile(self.procs[-1].pid, role, self.root.name)


def _profile(pid: int, role: str, phase: str) -> None:
    """Sample ``pid`` with py-spy when ``MESH_BENCH_PROFILE`` asks for it (module docstring)."""
    out = os.environ.get("MESH_BENCH_PROFILE")
    if not out or role not in os.environ.get("MESH_BENCH_PROFILE_ROLES", "source,sink").split(","):
        return
    spy = Path(sys.executable).parent / "py-spy"
    exe = str(spy) if spy.exists() else "py-spy"
    Path(out).mkdir(parents=True, exist_ok=True)
    dest = Path(out) / f"{phase}-{role}-{pid}.txt"
    print(f"profiling {role} pid {pid} into {dest}", flush=True)
    subprocess.Popen(
        [exe, "record", "--pid", str(pid), "-r", "200", "-f", "raw", "-o", str(dest), "--nonblocking",
         *os.environ.get("MESH_BENCH_PROFILE_ARGS", "").split()],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def _insert(db: Path, first: int, n: int) -> None:
    now = _now_ms()
    rows = [(i, f"event {i} " + "x" * 64, i * 100, now) for i in range(first, first + n)]
    with sqlite3.connect(db, timeout=10) as c:
        c.executemany("INSERT INTO events VALUES (?, ?, ?, ?)", rows)


async def _wait_applied(mesh: _Procs, n: int, timeout: float) -> float:
    start = time.perf_counter()
    with anyio.fail_after(timeout):
        while mesh.applied() < n:
            await anyio.sleep(0.05)
    return time.perf_counter() - start


class _Peer(_Procs):
    """The FastStream pipeline (``bench_faststream``): a publisher and a subscriber process on
    the same SQLite schemas as the mesh, as the admin (like the raw baseline)."""

    def __init__(self, root: Path, url: str, sec: _Secured, *, patched: bool) -> None:
        self.root, self.url, self.creds, self.patched = root, url, sec.admin_creds, patched
        root.mkdir(parents=True)
        self.src_db, self.dst_db = root / "source.db", root / "target.db"
        for db, schema in ((self.src_db, _SOURCE_SCHEMA), (self.dst_db, _TARGET_SCHEMA)):
            with sqlite3.connect(db) as c:
                c.execute("PRAGMA journal_mode=WAL")
                c.executescript(schema)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.roles: list[str] = []

    async def install_capture(self) -> None:
        """Create the peer's stream (fresh) as the admin; the peer reads the table directly."""
        import nats
        from nats.js.api import StreamConfig

        from mesh.devtools.bench_faststream import STREAM, SUBJECT

        nc = await nats.connect(self.url, user_credentials=str(self.creds))
        try:
            js = nc.jetstream(timeout=5)
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(STREAM)
            await js.add_stream(StreamConfig(name=STREAM, subjects=[SUBJECT], duplicate_window=120))
        finally:
            await nc.close()

    def start(self, only: str | None = None) -> None:
        for role, arg in (("sink", "sub"), ("source", "pub")):
            if only is not None and only != role:
                continue
            log = open(self.root / f"fs-{arg}.log", "ab")  # noqa: SIM115
            cmd = [
                sys.executable,
                "-m",
                "mesh.devtools.bench_faststream",
                arg,
                "--url",
                self.url,
                "--creds",
                str(self.creds),
                "--db",
                str(self.dst_db if arg == "sub" else self.src_db),
            ]
            if self.patched:
                cmd.append("--patched")
            self.procs.append(
                subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            )
            log.close()
            self.roles.append(role)


_Pipeline = _Mesh | _Peer


def _cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a live process (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss_mb(pid: int | None) -> float:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def _drain(
    pipe: _Pipeline, url: str, events: int, sec: _Secured, server_pid: int | None, drain_timeout: float = 600
) -> dict[str, Any]:
    """Time the drain of ``events`` rows; one not done within ``drain_timeout`` is reported with
    what was applied by then (``complete`` false) instead of failing the whole run."""
    await sec.streams(url)
    await pipe.install_capture()
    for first in range(1, events + 1, 5000):
        _insert(pipe.src_db, first, min(5000, events + 1 - first))
    pipe.start("sink")  # the sink first, so its consumer waits when the backlog arrives
    await anyio.sleep(2)
    server0 = _cpu_s(server_pid)
    t0 = time.perf_counter()
    pipe.start("source")
    complete = True
    try:
        try:
            await _wait_applied(pipe, events, timeout=drain_timeout)
        except TimeoutError:
            complete = False  # e.g. FastStream as shipped, waiting for ack_wait redeliveries
        elapsed = time.perf_counter() - t0
        done = events if complete else pipe.applied()
        rss = pipe.peak_rss_mb()
        cpu = pipe.cpu_s()
        cpu["nats-server"] = _cpu_s(server_pid) - server0
    finally:
        pipe.stop()
    writes, distinct = pipe.effects()
    return {
        "events": events, "applied": done, "complete": complete, "seconds": elapsed, "rate": done / elapsed,
        "effect_once": writes == distinct, "target_writes": writes,
        "peak_rss_mb": rss, "cpu_s": cpu, "cpu_us_per_event": sum(cpu.values()) / max(1, done) * 1e6,
    }  # fmt: skip


async def _latency(pipe: _Pipeline, url: str, rate: int, seconds: float, sec: _Secured) -> dict[str, Any]:
    await sec.streams(url)
    await pipe.install_capture()
    pipe.start()
    try:
        _insert(pipe.src_db, 1, 1)  # warm up: both processes connected and consuming
        await _wait_applied(pipe, 1, timeout=60)
        total = await _paced(lambda first, n: _insert(pipe.src_db, first, n), 2, rate, seconds)
        with contextlib.suppress(TimeoutError):  # reported as missing instead
            await _wait_applied(pipe, total + 1, timeout=60)
        rss = pipe.peak_rss_mb()
    finally:
        pipe.stop()
    with sqlite3.connect(pipe.dst_db) as c:
        lat = [
            r[0]
            for r in c.execute(
                "SELECT a.applied_ms - e.created_ms FROM events e JOIN applied a USING (id) WHERE e.id > 1"
            )
        ]
    return {
        "rate": rate,
        "events": len(lat),
        "missing": total - len(lat),
        **_percentiles(lat),
        "peak_rss_mb": rss,
    }


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
    mesh.start("source")  # the broker is down: the agent captures into its outbox only
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
        mesh.start("sink")
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


def _median_of(runs: list[Any]) -> Any:
    """The median of every number across same-shaped results (dicts recursively)."""
    first = runs[0]
    if isinstance(first, dict):
        return {k: _median_of([r[k] for r in runs if isinstance(r, dict) and k in r]) for k in first}
    if isinstance(first, bool) or not isinstance(first, int | float):
        return first
    return statistics.median(runs)


def _round(
    root: Path, sec: _Secured, events: int, rate: int, seconds: float, peers: list[str]
) -> dict[str, Any]:
    """One interleaved round on a fresh nats-server: raw, mesh, FastStream (shipped, patched)."""
    out: dict[str, Any] = {}
    with sec.server(root / "nats") as server:
        print(f"nats-server {server.url} (secured: {sec.dir}); work dir {root}", flush=True)
        print(f"raw nats-py: drain {events} + paced {rate}/s for {seconds:.0f}s ...", flush=True)
        cpu0, srv0 = time.process_time(), _cpu_s(server.pid)
        raw = anyio.run(
            _raw, server.url, events, rate, seconds, sec.admin_creds, backend_options={"use_uvloop": True}
        )
        raw["cpu_s_whole_run"] = {
            "client": time.process_time() - cpu0,
            "nats-server": _cpu_s(server.pid) - srv0,
        }
        out["raw"] = raw
        for name in peers:
            print(f"{name}: drain {events}, then paced {rate}/s for {seconds:.0f}s ...", flush=True)

            def make(phase: str, name: str = name) -> _Pipeline:
                if name == "mesh":
                    return _Mesh(root / f"{name}-{phase}", server.url, sec)
                return _Peer(root / f"{name}-{phase}", server.url, sec, patched=name.endswith("patched"))

            bound = max(60.0, events / 500)  # generous for a pipeline at a tenth of the mesh's rate
            drain = anyio.run(_drain, make("drain"), server.url, events, sec, server.pid, bound)
            latency = anyio.run(_latency, make("latency"), server.url, rate, seconds, sec)
            out[name] = {"drain": drain, "latency": latency}
    out["load"] = os.getloadavg()  # other work on the machine during the round
    print(f"round done; load average {out['load'][0]:.2f}", flush=True)
    return out


def run_bench(
    *, events: int, rate: int, seconds: float, json_out: Path | None, repeat: int = 1, faststream: bool = True
) -> dict[str, Any]:
    """Run raw, the mesh and the FastStream peer ``repeat`` times interleaved; print and return
    the medians (the ``faststream`` key is the faster of FastStream as shipped and patched)."""
    root = Path(tempfile.mkdtemp(prefix="mesh-bench-"))
    sec = _Secured(root)
    peers = ["mesh"]
    if faststream:
        try:
            import aiosqlite  # noqa: F401
            import faststream as _fs  # noqa: F401
        except ImportError:
            print("FastStream peer skipped: install the bench extra (pip install 'connector-mesh[bench]')")
        else:
            peers += ["faststream_shipped", "faststream_patched"]
    rounds = []
    for r in range(repeat):
        order = peers[r % len(peers) :] + peers[: r % len(peers)]  # rotate who runs first
        rounds.append(_round(root / f"round{r + 1}", sec, events, rate, seconds, order))
    result: dict[str, Any] = _median_of(rounds)
    result["rounds"] = rounds
    result["cpus"] = os.cpu_count()
    result["load"] = os.getloadavg()
    if "faststream_shipped" in result:
        fs = max(
            (result["faststream_shipped"], result["faststream_patched"]), key=lambda x: x["drain"]["rate"]
        )
        result["faststream"] = fs
    _print(result, rate, repeat)
    if json_out:
        json_out.write_text(json.dumps(result, indent=2))
    return result


def _print(result: dict[str, Any], rate: int, repeat: int) -> None:
    names = [n for n in ("mesh", "raw", "faststream_shipped", "faststream_patched") if n in result]
    heads = {
        "mesh": "mesh",
        "raw": "raw nats-py",
        "faststream_shipped": "FS shipped",
        "faststream_patched": "FS patched",
    }
    print()
    print(
        f"medians of {repeat} interleaved run(s); load average {result['load'][0]:.2f}"
        f" on {result['cpus']} CPUs"
    )
    print(f"{'':26}" + "".join(f"{heads[n]:>13}" for n in names))
    print(f"{'drain events/s':26}" + "".join(f"{result[n]['drain']['rate']:13.0f}" for n in names))
    for q in ("p50_ms", "p99_ms", "max_ms"):
        print(f"{q + f' @ {rate}/s':26}" + "".join(f"{result[n]['latency'][q]:13.1f}" for n in names))
    for part in ("source", "sink", "nats-server"):
        row = [result[n]["drain"].get("cpu_s", {}).get(part) for n in names]
        print(
            f"{'drain CPU s ' + part:26}"
            + "".join("            -" if v is None else f"{v:13.2f}" for v in row)
        )
    row = [result[n]["drain"].get("cpu_us_per_event") for n in names]
    print(f"{'drain CPU us/event':26}" + "".join("            -" if v is None else f"{v:13.0f}" for v in row))
    for part in ("source", "sink"):
        row = [
            max(
                result[n]["drain"].get("peak_rss_mb", {}).get(part, 0),
                result[n]["latency"].get("peak_rss_mb", {}).get(part, 0),
            )
            if n != "raw"
            else None
            for n in names
        ]
        print(
            f"{'peak RSS MB ' + part:26}"
            + "".join("            -" if v is None else f"{v:13.0f}" for v in row)
        )
    mesh, raw = result["mesh"], result["raw"]
    print(
        f"raw nats-py CPU (client process, whole run incl. paced): {raw['cpu_s_whole_run']['client']:.2f} s"
    )
    print()
    print(f"mesh/raw drain         {mesh['drain']['rate'] / raw['drain']['rate']:.2f}x")
    if "faststream" in result:
        fs = result["faststream"]
        which = "patched" if fs is result["faststream_patched"] else "shipped"
        print(
            f"mesh/FastStream drain  {mesh['drain']['rate'] / fs['drain']['rate']:.2f}x"
            f" (against {which}, the faster)"
        )
        print(f"mesh/FastStream p99    {mesh['latency']['p99_ms'] / fs['latency']['p99_ms']:.2f}x")


def run_scale_bench(*, events: int, replicas: int, json_out: Path | None) -> dict[str, Any]:
    """One sink flow drained by 1 agent, then by ``replicas`` agents sharing its durable consumer
    (same flow, same system), on one secured nats-server; checks that every event took effect
    once (the target's insert and update triggers count every write)."""
    root = Path(tempfile.mkdtemp(prefix="mesh-scale-"))
    sec = _Secured(root)
    result: dict[str, Any] = {"cpus": os.cpu_count()}
    with sec.server(root / "nats") as server:
        for n in (1, replicas):
            print(f"mesh: drain {events} with {n} sink replica(s) ...", flush=True)
            pipe = _Mesh(root / f"sinks{n}", server.url, sec, sinks=n)
            result[f"sinks_{n}"] = anyio.run(_drain, pipe, server.url, events, sec, server.pid)
    result["load"] = os.getloadavg()
    one, many = result["sinks_1"], result[f"sinks_{replicas}"]
    print()
    print(f"load average {result['load'][0]:.2f} on {result['cpus']} CPUs")
    for n, r in ((1, one), (replicas, many)):
        print(f"{n} sink replica(s): drain {r['rate']:8.0f} events/s, target writes {r['target_writes']}"
              f" for {events} events, effect once: {r['effect_once']}")  # fmt: skip
    print(f"scaling {many['rate'] / one['rate']:.2f}x with {replicas} replicas")
    if json_out:
        json_out.write_text(json.dumps(result, indent=2))
    return result
