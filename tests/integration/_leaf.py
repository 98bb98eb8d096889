"""Helpers for the leaf-node tests: a hub and a leaf nats-server started from the files
``meshctl leafnode config`` writes, and looks into streams, the leaf link and agents' outboxes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sqlite3
import subprocess
import sys
import threading
import tomllib
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import nats
from typer.testing import CliRunner

import mesh.cli.main  # noqa: F401  (builds the command tree: gives `link` and `unlink` --creds)
from mesh.broker import NatsServer, free_port
from mesh.cli.leafnode import app
from mesh.cli.security import app as security_app

EDGE = "edge"


@dataclass
class LeafTopology:
    hub: NatsServer
    leaf: NatsServer
    link: LinkProxy
    conf_dir: Path
    edge_url: str
    """What the generated agent fragment tells edge agents to connect to."""
    security_dir: Path
    """Both servers run this mesh's operator (``meshctl leafnode config --security-dir``)."""

    @property
    def admin_creds(self) -> Path:
        return self.security_dir / "creds" / "admin.creds"

    def stop(self) -> None:
        self.leaf.stop()
        self.link.cut()
        self.hub.stop()


def meshctl_leafnode(*args: str) -> tuple[int, str, str]:
    """Run ``meshctl leafnode ARGS`` in-process: (exit code, stdout, stderr)."""
    res = CliRunner().invoke(app, list(args))
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.stdout, res.stderr


def make_topology(tmp: Path, security_dir: Path) -> LeafTopology:
    """Generate the configs on random loopback ports and wrap both servers (not started), both
    secured by ``security_dir``, the leaf linked as user leaf-edge (``meshctl security
    issue-leaf``). The leaf reaches the hub's leaf port through a :class:`LinkProxy`
    (``topology.link``)."""
    hub_port, hub_mon, leaf_link, leaf_port, leaf_mon = (free_port() for _ in range(5))
    link = LinkProxy(leaf_link)
    conf = tmp / "conf"
    leaf_creds = tmp / "leaf-edge.creds"
    issued = CliRunner().invoke(
        security_app, ["issue-leaf", "--dir", str(security_dir), "--domain", EDGE, "--out", str(leaf_creds)]
    )
    assert issued.exit_code == 0, issued.output
    code, out, err = meshctl_leafnode(
        "config", "--hub", f"nats-leaf://127.0.0.1:{link.port}", "--domain", EDGE,
        "--store-dir", str(tmp / "leaf"), "--out", str(conf), "--port", str(leaf_port),
        "--monitor-port", str(leaf_mon), "--hub-bind", "127.0.0.1", "--hub-port", str(hub_port),
        "--hub-store-dir", str(tmp / "hub"), "--security-dir", str(security_dir),
        "--credentials", str(leaf_creds),
    )  # fmt: skip
    assert code == 0, err
    assert "meshctl leafnode link" in out
    # The leaf dials the proxy (what hub.conf advertises); the hub listens behind it.
    hub_conf = conf / "hub.conf"
    text = hub_conf.read_text()
    listen = f'listen: "127.0.0.1:{link.port}"'
    assert listen in text
    hub_conf.write_text(text.replace(listen, f'listen: "127.0.0.1:{leaf_link}"'))
    # The command-line options NatsServer adds repeat what the files say (same ports and stores).
    hub = NatsServer(tmp / "hub", port=hub_port, monitor_port=hub_mon, config_file=conf / "hub.conf")
    leaf = NatsServer(tmp / "leaf", port=leaf_port, monitor_port=leaf_mon, config_file=conf / "leaf.conf")
    fragment = tomllib.loads((conf / "agent-nats.toml").read_text())
    return LeafTopology(hub, leaf, link, conf, fragment["nats"]["servers"][0], security_dir)


def leaf_connected(hub: NatsServer) -> bool:
    try:
        with urllib.request.urlopen(f"{hub.monitor_url}/leafz", timeout=1) as resp:
            return int(json.load(resp).get("leafnodes", 0)) >= 1
    except OSError:
        return False


def stream_info(url: str, creds: Path, stream: str = "MESH_EVENTS") -> dict[str, object]:
    """Raw ``STREAM.INFO`` of the server's own domain (state, config, sources), asked with ``creds``."""

    async def get() -> dict[str, object]:
        nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=1, user_credentials=str(creds))
        try:
            reply = await nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=2)
        finally:
            await nc.close()
        return json.loads(reply.data)

    return asyncio.run(get())


def stream_messages(url: str, creds: Path, stream: str = "MESH_EVENTS") -> int:
    state = stream_info(url, creds, stream)["state"]
    assert isinstance(state, dict)
    return int(state["messages"])


def outbox_depth(state_dir: Path) -> int:
    with sqlite3.connect(state_dir / "outbox.db", timeout=30) as c:
        return int(c.execute("SELECT count(*) FROM outbox").fetchone()[0])


class LinkProxy:
    """A TCP forwarder standing in for the WAN between the leaf node and the hub's leaf port:
    ``cut()`` drops every connection and refuses new ones, ``restore()`` listens again on the
    same port."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.port = free_port()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._listener: socket.socket | None = None

    def restore(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        listener.settimeout(0.2)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                down, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                up = socket.create_connection(self.upstream, timeout=2)
            except OSError:
                down.close()
                continue
            up.settimeout(None)
            down.settimeout(None)
            with self._lock:
                self._socks += [down, up]
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


class LinkWatcher:
    """``meshctl leafnode link --watch`` against the hub, as a child process."""

    def __init__(self, hub_url: str, log: Path, creds: Path) -> None:
        self.hub_url = hub_url
        self.log = log
        self.creds = creds
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mesh", "leafnode", "link",
                 "--domain", EDGE, "--server", self.hub_url, "--wait", "0", "--watch",
                 "--creds", str(self.creds)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class SealedLinkProxy(LinkProxy):
    """A :class:`LinkProxy` whose ``cut()`` cannot miss a connection being set up.

    :meth:`LinkProxy._accept` registers a connection only after it has dialled the hub, outside
    the lock, so a ``cut()`` in that moment (the leaf redials every second while the link is down
    or the hub restarts) leaves that connection forwarding through the "cut". Here a connection
    is registered under the lock ``cut()`` takes, and only while the listener that accepted it is
    still the current one; otherwise it is closed. ``port`` reuses the port of a proxy that
    :func:`make_topology` already wrote into the configs."""

    def __init__(self, upstream_port: int, port: int | None = None) -> None:
        super().__init__(upstream_port)
        if port is not None:
            self.port = port

    @classmethod
    def replacing(cls, link: LinkProxy) -> SealedLinkProxy:
        """A sealed proxy on ``link``'s port and upstream (``link`` must not be listening)."""
        return cls(link.upstream[1], port=link.port)

    @property
    def is_cut(self) -> bool:
        return self._listener is None

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            socks, self._socks = self._socks, []
        if listener is not None:
            listener.close()
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                down, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                up = socket.create_connection(self.upstream, timeout=2)
            except OSError:
                down.close()
                continue
            up.settimeout(None)
            down.settimeout(None)
            with self._lock:
                current = self._listener is listener
                if current:
                    self._socks += [down, up]
            if not current:  # cut while dialling: this connection must not survive the cut
                down.close()
                up.close()
                return
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()
