"""Readiness end to end inside one process: the conditions, the agent's HTTP endpoint
(/readyz, /healthz, /metrics on a real socket), sd_notify datagrams received on a socket the
test binds (path and abstract namespace), and the signal runner that ties them together."""

from __future__ import annotations

import os
import signal
import socket
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from prometheus_client import CollectorRegistry, Counter

from agents.runner import run_until_signalled
from mesh.endpoint import AgentEndpoint, read_endpoint_file, remove_endpoint_file, write_endpoint_file
from mesh.errors import ConfigError, StopError
from mesh.readiness import NotReady, Readiness, probe, wait_ready
from mesh.sdnotify import Notifier

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound unix datagram socket standing in for systemd; yields (socket, NOTIFY_SOCKET)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(5)
    try:
        yield sock, str(path)
    finally:
        sock.close()


def test_conditions_stopping_and_snapshot() -> None:
    r = Readiness(["stores", "nats"])
    assert not r.ready
    assert r.waiting() == ["stores", "nats"]
    r.set("stores")
    r.set("nats", False, "NATS disconnected")
    snap = r.snapshot()
    assert snap["ready"] is False
    assert snap["waiting"] == ["nats"]
    assert snap["checks"] == {"stores": {"ok": True, "detail": ""},
                              "nats": {"ok": False, "detail": "NATS disconnected"}}  # fmt: skip
    assert snap["detail"] == "waiting for nats (NATS disconnected)"
    r.set("nats")
    assert r.ready
    assert r.ever_ready
    assert r.snapshot()["ready"] is True
    assert repr(r) == "<Readiness ready>"
    r.stopping("stopping (SIGTERM)")
    r.stopping("ignored: the first reason is kept")
    assert not r.ready
    assert r.is_stopping
    snap = r.snapshot()
    assert (snap["ready"], snap["stopping"], snap["detail"]) == (False, True, "stopping (SIGTERM)")
    r.set("nats")  # a condition met again does not make a stopping process ready
    assert not r.ready


@pytest.mark.anyio
async def test_wait_returns_once_every_condition_is_met() -> None:
    r = Readiness(["a", "b"])
    order: list[str] = []

    async def waiter() -> None:
        await r.wait()
        order.append("ready")

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        r.set("a")
        await anyio.wait_all_tasks_blocked()
        order.append("a set")
        r.set("b")
    assert order == ["a set", "ready"]


def test_sd_notify_path_socket(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("agent a ready")
    assert sock.recv(1024) == b"READY=1\nSTATUS=agent a ready"
    assert n.stopping()
    assert sock.recv(1024) == b"STOPPING=1\nSTATUS=stopping"
    assert n.watchdog()
    assert sock.recv(1024) == b"WATCHDOG=1"
    n.close()


def test_sd_notify_abstract_namespace() -> None:
    name = f"mesh-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    try:
        n = Notifier({"NOTIFY_SOCKET": f"@{name}"})
        assert n.ready()
        assert sock.recv(1024) == b"READY=1\nSTATUS=ready"
        n.close()
    finally:
        sock.close()


def test_sd_notify_off_gone_and_watchdog_settings(tmp_path: Path) -> None:
    off = Notifier({})
    assert not off.enabled
    assert not off.ready()
    assert off.watchdog_interval is None
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")})
    assert gone.enabled
    assert gone.ready() is False
    assert gone.stopping() is False
    gone.close()
    mine = Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())})
    assert mine.watchdog_interval == 1.5
    other = Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval is None  # meant for another process


def _get(url: str, method: str = "GET") -> tuple[int, bytes]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_agent_endpoint_routes() -> None:
    registry = CollectorRegistry()
    Counter("mesh_test_things", "things", registry=registry).inc(3)
    r = Readiness(["signals", "nats"])
    with AgentEndpoint(registry, r, "127.0.0.1", 0) as ep:
        assert ep.port != 0
        answer = probe(f"{ep.url}/readyz")
        assert answer is not None
        status, body = answer
        assert status == 503
        assert body["waiting"] == ["signals", "nats"]
        r.set("signals")
        r.set("nats")
        assert probe(f"{ep.url}/readyz") == (200, r.snapshot())
        r.stopping("stopping (SIGTERM)")
        status, body = probe(f"{ep.url}/readyz") or (0, {})
        assert status == 503
        assert body["stopping"] is True
        assert body["detail"] == "stopping (SIGTERM)"
        status, body = probe(f"{ep.url}/healthz") or (0, {})
        assert status == 200
        assert body == {"status": "alive", "pid": os.getpid()}
        status, text = _get(f"{ep.url}/metrics")
        assert status == 200
        assert b"mesh_test_things_total 3.0" in text
        assert _get(f"{ep.url}/nope")[0] == 404
        assert _get(f"{ep.url}/readyz", "POST")[0] == 405
        with pytest.raises(ConfigError, match=r"cannot serve the agent endpoint on 127\.0\.0\.1"):
            AgentEndpoint(registry, r, "127.0.0.1", ep.port).start()
    assert probe(f"{ep.url}/healthz") is None  # closed
    ep.close()  # idempotent


def test_endpoint_file_names_its_process(tmp_path: Path) -> None:
    assert read_endpoint_file(tmp_path) is None
    write_endpoint_file(tmp_path / "state", "http://127.0.0.1:1234")
    doc = read_endpoint_file(tmp_path / "state", pid=os.getpid())
    url = "http://127.0.0.1:1234"
    assert doc == {"pid": os.getpid(), "url": url, "readyz": f"{url}/readyz", "metrics": f"{url}/metrics"}
    assert read_endpoint_file(tmp_path / "state", pid=os.getpid() + 1) is None  # a previous run's
    remove_endpoint_file(tmp_path / "state")
    assert read_endpoint_file(tmp_path / "state") is None


def test_wait_ready_deadline_exit_and_partial_checks() -> None:
    r = Readiness(["signals", "nats"])
    with AgentEndpoint(CollectorRegistry(), r, "127.0.0.1", 0) as ep:
        url = f"{ep.url}/readyz"
        with pytest.raises(NotReady, match="not ready after 0s") as info:
            wait_ready(url, timeout=0.2)
        assert info.value.last is not None
        assert info.value.last["waiting"] == ["signals", "nats"]
        with pytest.raises(NotReady, match="exited"):
            wait_ready(url, timeout=5, alive=lambda: False)
        r.set("signals")
        assert wait_ready(url, timeout=5, checks=("signals",))["ready"] is False
        threading.Timer(0.2, r.set, ("nats",)).start()
        assert wait_ready(lambda: url, timeout=5)["ready"] is True
    with pytest.raises(NotReady, match="no answer"):
        wait_ready(url, timeout=0.2)  # nothing listens any more


@pytest.mark.anyio
async def test_signal_runner_ready_then_sigterm(notify_socket: tuple[socket.socket, str]) -> None:
    """READY=1 once every condition is met; SIGTERM (sent only once "signals" is met, or it
    would kill the test process) makes the process unready, sends STOPPING=1 and calls stop."""
    sock, path = notify_socket
    r = Readiness(["signals", "work"])
    notifier = Notifier({"NOTIFY_SOCKET": path})
    release = anyio.Event()
    stopped: list[str] = []

    async def run() -> None:
        r.set("work")
        await release.wait()

    def stop(signame: str) -> None:
        stopped.append(signame)
        release.set()

    async def drive() -> None:
        assert await anyio.to_thread.run_sync(sock.recv, 1024) == b"READY=1\nSTATUS=test ready"
        assert r.ready
        os.kill(os.getpid(), signal.SIGTERM)
        assert await anyio.to_thread.run_sync(sock.recv, 1024) == b"STOPPING=1\nSTATUS=stopping (SIGTERM)"

    async with anyio.create_task_group() as tg:
        tg.start_soon(drive)
        await run_until_signalled(run, stop, r, notifier, "test")
    assert stopped == ["SIGTERM"]
    assert r.is_stopping
    assert r.snapshot()["ready"] is False
    notifier.close()


def test_sd_notify_never_blocks_on_a_full_queue(notify_socket: tuple[socket.socket, str]) -> None:
    """A receiver that stops reading fills its queue: sends are then dropped, never blocking
    (they come from the event loop)."""
    sock, path = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path})
    results = [n.watchdog() for _ in range(2000)]  # far more than a unix datagram queue holds
    assert results[0] is True
    assert results[-1] is False
    assert sock.recv(1024) == b"WATCHDOG=1"
    n.close()


@pytest.mark.anyio
async def test_signal_runner_raises_the_error_itself() -> None:
    """What ``run()`` raises reaches the caller as itself (the CLI prints a MeshError in one
    line), and the process is no longer ready."""
    r = Readiness(["signals"])

    async def run() -> None:
        raise StopError("store corrupt")

    with pytest.raises(StopError, match="store corrupt"):
        await run_until_signalled(run, lambda _: None, r, Notifier({}), "test")
    assert r.is_stopping
