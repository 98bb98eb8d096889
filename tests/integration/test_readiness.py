"""`meshctl agent run` says when it is ready, over HTTP and to systemd, as a real process:
/readyz follows its NATS link (unready while the broker is away, ready again when it is back),
sd_notify datagrams arrive on a socket the test binds (READY=1, WATCHDOG=1, STOPPING=1), and
the endpoint file it wrote for its free port is gone after a clean exit."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.broker import free_port
from mesh.endpoint import read_endpoint_file
from mesh.readiness import probe, wait_ready
from tests._secure import SecuredNatsServer as NatsServer
from tests._secure import issue_agent_creds
from tests.integration._harness import AgentProcess, ErpLoad, agent_toml, make_erp, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


class NotifyReceiver:
    """The systemd side of sd_notify: a unix datagram socket read continuously by a thread, as
    systemd reads it. (Not reading would fill the kernel queue, only 10 datagrams by default
    (net.unix.max_dgram_qlen), after which the agent drops its notifications by design: a test
    that reads only now and then would lose STOPPING=1 behind a pile of WATCHDOG=1 pings.)"""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        self._sock.settimeout(0.1)
        self._got: list[bytes] = []
        self._seen = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                self._got.append(data)
                self._cond.notify_all()

    def until(self, wanted: bytes, timeout: float = 30) -> list[bytes]:
        """Datagrams not yet returned, up to and including the first that starts with ``wanted``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(self._seen, len(self._got)):
                    if self._got[i].startswith(wanted):
                        out, self._seen = self._got[self._seen : i + 1], i + 1
                        return out
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {wanted!r} within {timeout}s; got {self._got[self._seen :]}")
                self._cond.wait(left)

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=5)
        self._sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifyReceiver]:
    receiver = NotifyReceiver(tmp_path / "notify.sock")
    try:
        yield receiver
    finally:
        receiver.close()


def test_agent_readiness_follows_nats_and_notifies_systemd(
    tmp_path: Path, security_dir: Path, notify_socket: NotifyReceiver
) -> None:
    path = notify_socket.path
    server = NatsServer(tmp_path / "nats", security_dir, layout=True)
    erp = tmp_path / "erp.db"
    make_erp(erp)
    ErpLoad(erp).insert(50)
    cfg = tmp_path / "erp-agent.toml"
    state = tmp_path / "erp-agent"
    creds = tmp_path / "erp-agent.creds"
    cfg.write_text(
        agent_toml(name="erp-agent", system="erp", state=state, url=server.url, source=erp, creds=creds)
    )
    issue_agent_creds(cfg, security_dir)
    agent = AgentProcess(cfg, tmp_path / "erp-agent.log")
    try:
        agent.start(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}, wait=False)
        snap = agent.wait_ready(checks=("signals", "stores"))
        assert snap["ready"] is False
        assert "nats" in snap["waiting"]  # type: ignore[operator]
        # The watchdog pings come from the event loop whether or not the agent is ready.
        before = notify_socket.until(b"WATCHDOG=1")
        assert not any(d.startswith(b"READY=1") for d in before)

        server.start()
        snap = agent.wait_ready()
        assert snap["checks"] == {  # every condition, each met
            name: {"ok": True, "detail": snap["checks"][name]["detail"]}  # type: ignore[index]
            for name in ("signals", "stores", "nats", "streams", "assignments", "commands")
        }
        assert notify_socket.until(b"READY=1")[-1] == b"READY=1\nSTATUS=agent erp-agent ready"
        url = agent.readyz_url
        assert url is not None
        base = url.removesuffix("/readyz")
        assert probe(f"{base}/healthz") == (200, {"status": "alive", "pid": agent.proc.pid})  # type: ignore[union-attr]
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as resp:
            assert b"mesh_nats_connected 1.0" in resp.read()

        server.stop()
        wait_until(lambda: (agent.readyz() or {}).get("waiting") == ["nats"], 20, "/readyz: waiting for nats")
        server.start()
        agent.wait_ready()

        assert agent.terminate() == 0
        assert notify_socket.until(b"STOPPING=1")[-1] == b"STOPPING=1\nSTATUS=stopping (SIGTERM)"
        assert read_endpoint_file(state) is None  # removed on a clean exit
    finally:
        agent.kill()
        server.stop()
    assert "Traceback" not in agent.log.read_text()


def test_control_plane_readiness_and_sd_notify(
    tmp_path: Path, security_dir: Path, notify_socket: NotifyReceiver
) -> None:
    """`meshctl control-plane run`: /readyz 503 naming what it waits for while NATS is away,
    200 and READY=1 once its signal handlers, NATS link, KV buckets and request handlers are up,
    STOPPING=1 on SIGTERM."""
    path = notify_socket.path
    server = NatsServer(tmp_path / "nats", security_dir)
    port = free_port()
    log = tmp_path / "cp.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mesh", "control-plane", "run", "--nats", server.url,
             "--http", f"127.0.0.1:{port}", "--name", "cp1"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "NOTIFY_SOCKET": path,
                 "MESH_CREDS": str(security_dir / "creds" / "control-plane.creds")},
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}/readyz"
    try:
        # NATS is not running yet: the HTTP endpoint answers, and says why it is not ready.
        wait_until(lambda: probe(url) is not None, 30, "the control plane's HTTP endpoint")
        answer = probe(url)
        assert answer is not None
        assert answer[0] == 503
        assert "nats" in str(answer[1]["reason"])
        server.start()
        assert wait_ready(url, timeout=30, alive=lambda: proc.poll() is None) == {"ready": True}
        assert notify_socket.until(b"READY=1")[-1] == b"READY=1\nSTATUS=control plane cp1 ready"
        proc.send_signal(signal.SIGTERM)
        assert notify_socket.until(b"STOPPING=1")[-1] == b"STOPPING=1\nSTATUS=stopping (SIGTERM)"
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.stop()
    assert "Traceback" not in log.read_text()
