"""Benchmark of shared API policies (``bin/bench-policy``): N agent processes calling one fake
API under one policy stay within its rate, in total.

It starts a secured nats-server, a control plane (the policy coordinator) and a fake HTTP API
that records the time of every request, then N worker processes (``python -m
mesh.devtools.bench_policy worker``: an agent identity with its own least-privilege creds and
the agent's policy client) that call the API as fast as their gate lets them. It prints the
requests per 1-second window and the maximum after the first window. ``--local`` gives each
worker its own local bucket of the same rate instead (what agents did before: N times the rate).

The pieces (:class:`FakeApi`, :func:`windows`, :func:`worker_argv`, :func:`issue_worker_creds`)
are shared with the integration test.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import msgspec

from mesh.broker import NatsServer, free_port
from mesh.config import NatsConfig
from mesh.policy import PolicyClient, PolicyConfig, QuotaExhausted
from mesh.policy.bucket import RequestGate
from mesh.readiness import wait_ready
from mesh.security.authority import Authority, write_creds
from mesh.security.jwt import new_seed, public_key_of_seed
from mesh.security.permissions import agent_permissions
from mesh.security.setup import init_security_dir, server_config
from mesh.transport import JetStream

__all__ = ["FakeApi", "Hit", "issue_worker_creds", "main", "windows", "worker_argv"]


@dataclass(frozen=True)
class Hit:
    """One request the fake API received: when (monotonic seconds), from whom, in what state
    the caller's gate was (``coordinated``, ``degraded`` or ``local``)."""

    at: float
    agent: str
    state: str


class FakeApi:
    """A local HTTP server answering ``200 {}`` to everything and recording each request."""

    def __init__(self) -> None:
        self.hits: list[Hit] = []
        self._lock = threading.Lock()
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                hit = Hit(
                    time.monotonic(), self.headers.get("X-Agent", "?"), self.headers.get("X-Policy", "?")
                )
                with api._lock:
                    api.hits.append(hit)
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, format: str, *args: object) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a worker killed mid-request resets its connection: not the API's problem

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeApi:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def snapshot(self) -> list[Hit]:
        with self._lock:
            return list(self.hits)


def windows(stamps: list[float], width: float = 1.0) -> list[int]:
    """Requests per ``width``-second window, the first starting at the first stamp."""
    if not stamps:
        return []
    start = min(stamps)
    out = [0] * (int((max(stamps) - start) // width) + 1)
    for t in stamps:
        out[int((t - start) // width)] += 1
    return out


def issue_worker_creds(security_dir: Path, name: str, out: Path) -> Path:
    """Least-privilege creds of agent ``name`` (an agent with no flows) written to ``out``."""
    seed = new_seed("user")
    jwt = Authority.load(security_dir).issue_user(
        name, public_key_of_seed(seed), agent_permissions(name, [], [], [])
    )
    return write_creds(out, jwt, seed)


def worker_argv(
    nats_url: str,
    creds: Path,
    name: str,
    api_url: str,
    policy: PolicyConfig,
    *,
    local: bool = False,
    tasks: int = 4,
) -> list[str]:
    """The command line of one worker process."""
    argv = [sys.executable, "-m", "mesh.devtools.bench_policy", "worker", "--nats", nats_url]
    argv += ["--creds", str(creds), "--name", name, "--url", api_url, "--tasks", str(tasks)]
    argv += ["--policy", msgspec.json.encode(policy).decode()]
    return argv + (["--local"] if local else [])


async def _worker(args: argparse.Namespace) -> None:
    spec = msgspec.json.decode(args.policy, type=PolicyConfig)
    cfg = NatsConfig(servers=[args.nats], creds=args.creds, inbox_prefix=f"_INBOX.{args.name}")
    async with JetStream(cfg, name=args.name) as js, httpx.AsyncClient(timeout=10) as http:
        await js.connect()
        client = PolicyClient(
            args.name, {"bench": spec}, lambda: js if js.is_connected else None, retry_every=0.5
        )
        gate = client.gate("bench")
        local = RequestGate(spec.rate, spec.effective_burst)

        async def call() -> None:
            while True:
                if args.local:
                    await local.acquire()
                    state = "local"
                else:
                    try:
                        await gate.acquire()
                    except QuotaExhausted as exc:
                        await anyio.sleep(max(0.1, exc.reset_at - time.time()))
                        continue
                    state = "degraded" if gate.degraded else "coordinated"
                async with gate.slot():
                    await http.get(args.url, headers={"X-Agent": args.name, "X-Policy": state})

        async with anyio.create_task_group() as tg:
            for _ in range(args.tasks):
                tg.start_soon(call)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _bench(args: argparse.Namespace) -> int:
    spec = PolicyConfig(rate=args.rate, burst=args.burst, concurrency=max(args.agents, 8))
    with tempfile.TemporaryDirectory(prefix="bench-policy-") as tmp, FakeApi() as api:
        d = Path(tmp)
        sec = d / "security"
        init_security_dir(sec)
        server = NatsServer(d / "nats", config_file=d / "nats.conf")
        (d / "nats.conf").write_text(
            server_config(sec, resolver_dir=d / "resolver", store_dir=d / "nats", port=server.port)
        )
        procs: list[subprocess.Popen[bytes]] = []
        server.start()
        try:
            port = free_port()
            env = {**os.environ, "MESH_CREDS": str(sec / "creds" / "control-plane.creds")}
            cp = subprocess.Popen(
                [sys.executable, "-m", "mesh", "control-plane", "run", "--nats", server.url,
                 "--http", f"127.0.0.1:{port}", "--name", "cp1"],
                stdout=subprocess.DEVNULL, stderr=open(d / "cp.log", "wb"), stdin=subprocess.DEVNULL,  # noqa: SIM115
                env=env, start_new_session=True,
            )  # fmt: skip
            procs.append(cp)
            wait_ready(f"http://127.0.0.1:{port}/readyz", timeout=60, alive=lambda: cp.poll() is None)
            for i in range(args.agents):
                name = f"bench-{i}"
                creds = issue_worker_creds(sec, name, d / f"{name}.creds")
                argv = worker_argv(server.url, creds, name, api.url, spec, local=args.local)
                procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True))
            began = time.monotonic()
            while time.monotonic() - began < args.seconds + 1:
                time.sleep(0.2)
        finally:
            for p in reversed(procs):
                _stop(p)
            server.stop()
        counts = windows([h.at for h in api.snapshot()])
        after_first = counts[1:-1]  # the last window is cut short by the stop
        peak = max(after_first, default=0)
        bound = args.rate + args.burst
        if args.json:
            print(
                json.dumps({"windows": counts, "max_after_first": peak, "bound": bound, "local": args.local})
            )
        else:
            mode = "each agent alone (--local)" if args.local else "shared policy"
            print(f"{args.agents} agents, {args.rate:g} req/s burst {args.burst}, {mode}")
            for i, n in enumerate(counts):
                print(f"  window {i:3d}: {n:5d}")
            print(f"max after the first window: {peak} (bound rate + burst = {bound})")
        return 0 if args.local or peak <= bound else 1


def main(argv: list[str] | None = None) -> int:
    """``bench`` (default) or ``worker``; exit status 1 when a window exceeds rate + burst."""
    p = argparse.ArgumentParser(prog="bench-policy", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd")
    b = sub.add_parser("bench")
    w = sub.add_parser("worker")
    for q in (p, b):
        q.add_argument("--agents", type=int, default=4)
        q.add_argument("--rate", type=float, default=50.0)
        q.add_argument("--burst", type=int, default=10)
        q.add_argument("--seconds", type=float, default=10.0)
        q.add_argument("--local", action="store_true", help="no shared policy: each agent its own bucket")
        q.add_argument("--json", action="store_true")
    w.add_argument("--nats", required=True)
    w.add_argument("--creds", required=True)
    w.add_argument("--name", required=True)
    w.add_argument("--url", required=True)
    w.add_argument("--policy", required=True)
    w.add_argument("--tasks", type=int, default=4)
    w.add_argument("--local", action="store_true")
    args = p.parse_args(argv)
    if args.cmd == "worker":
        anyio.run(_worker, args)
        return 0
    return _bench(args)


if __name__ == "__main__":
    sys.exit(main())
