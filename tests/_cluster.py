"""A three-node JetStream cluster on loopback for the tests (the production topology the Helm
chart's README recommends: streams and buckets with 3 replicas).

:class:`NatsCluster` runs ``n`` :class:`~tests._secure.SecuredNatsServer` processes that trust
one security dir (operator/account auth), each with its own resolver dir and JetStream store,
joined by ``cluster {}`` routes. Nodes are started, SIGKILLed and restarted by name
(``n1``, ``n2``, ...); :meth:`NatsCluster.wait_ready` returns once the cluster has a JetStream
meta leader and every running node answers ``/healthz`` (its JetStream assets current).
:meth:`NatsCluster.stream_leader` names the node leading a stream (``KV_<bucket>`` for a
bucket), read from the monitoring endpoint (``/jsz``).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Self

from mesh.broker import free_port
from mesh.config import NatsConfig
from tests._secure import SecuredNatsServer, admin_creds

__all__ = ["NatsCluster"]


def _get_json(url: str) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) of a monitoring URL; (0, {}) while nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"{}")
        except ValueError:
            return exc.code, {}
    except (OSError, ValueError):
        return 0, {}


class NatsCluster:
    """``size`` nats-servers in one JetStream cluster named ``name`` on 127.0.0.1."""

    def __init__(self, root: Path, security_dir: Path, *, size: int = 3, name: str = "mesh-test") -> None:
        self.root = root
        self.security_dir = security_dir
        self.admin_creds = admin_creds(security_dir)
        route_ports = {f"n{i + 1}": free_port() for i in range(size)}
        routes = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in route_ports.values())
        self.nodes: dict[str, SecuredNatsServer] = {}
        for node, route_port in route_ports.items():
            cluster = (
                "cluster {\n"
                f'  name: "{name}"\n'
                f'  listen: "127.0.0.1:{route_port}"\n'
                f"  routes: [{routes}]\n"
                "}\n"
            )
            self.nodes[node] = SecuredNatsServer(
                root / node / "store", security_dir, server_name=node, extra_config=cluster
            )

    def __repr__(self) -> str:
        up = [n for n, s in self.nodes.items() if s.running]
        return f"<NatsCluster nodes={list(self.nodes)} running={up}>"

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.nodes.values()]

    def nats_config(self, **kw: Any) -> NatsConfig:
        """A NatsConfig with every node's URL and the admin creds (``kw`` overrides)."""
        return NatsConfig(**{"servers": self.urls, "creds": str(self.admin_creds), **kw})

    def start(self, timeout: float = 30.0) -> Self:
        for server in self.nodes.values():
            server.start()
        self.wait_ready(timeout)
        return self

    def stop(self) -> None:
        for server in self.nodes.values():
            server.stop()

    def kill(self, node: str) -> None:
        """SIGKILL one node (no flush, no goodbye)."""
        self.nodes[node].kill()

    def restart(self, node: str, timeout: float = 30.0) -> None:
        """Start a stopped or killed node on its port and store; returns once the cluster is
        ready again (:meth:`wait_ready`)."""
        server = self.nodes[node]
        server.stop()
        server.start()
        self.wait_ready(timeout)

    def meta_leader(self) -> str | None:
        """The JetStream meta leader as a running node sees it; None while there is none, or
        while the survivors of a kill still name the dead node (before the next election)."""
        for server in self.nodes.values():
            if not server.running:
                continue
            _, body = _get_json(f"{server.monitor_url}/jsz")
            leader = (body.get("meta_cluster") or {}).get("leader")
            if leader and leader in self.nodes and self.nodes[leader].running:
                return str(leader)
        return None

    def wait_meta_leader(self, timeout: float = 30.0) -> str:
        """The running node that leads the JetStream meta group, once one is elected.

        Raises:
            AssertionError: no leader within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leader = self.meta_leader()
            if leader is not None:
                return leader
            time.sleep(0.1)
        raise AssertionError(f"no JetStream meta leader after {timeout}s: {self!r}")

    def ready(self) -> bool:
        """A meta leader is elected and every running node is healthy (JetStream current)."""
        if self.meta_leader() is None:
            return False
        return all(_get_json(f"{s.monitor_url}/healthz")[0] == 200 for s in self.nodes.values() if s.running)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll :meth:`ready` (a readiness check, not a fixed sleep).

        Raises:
            AssertionError: not ready within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready():
                return
            time.sleep(0.1)
        raise AssertionError(f"JetStream cluster not ready after {timeout}s: {self!r}")

    def stream_leader(self, stream: str) -> str | None:
        """The node that leads ``stream`` (``KV_<bucket>`` for a KV bucket), from ``/jsz``."""
        for server in self.nodes.values():
            if not server.running:
                continue
            _, body = _get_json(f"{server.monitor_url}/jsz?accounts=true&streams=true")
            for account in body.get("account_details") or []:
                for detail in account.get("stream_detail") or []:
                    if detail.get("name") == stream:
                        leader = (detail.get("cluster") or {}).get("leader")
                        if leader:
                            return str(leader)
        return None

    def stream_replicas(self, stream: str) -> int | None:
        """The configured replicas of ``stream``, from ``/jsz`` (None: not found)."""
        for server in self.nodes.values():
            if not server.running:
                continue
            _, body = _get_json(f"{server.monitor_url}/jsz?accounts=true&streams=true&config=true")
            for account in body.get("account_details") or []:
                for detail in account.get("stream_detail") or []:
                    if detail.get("name") == stream:
                        return int((detail.get("config") or {}).get("num_replicas", 1))
        return None

    def wait_stream_leader(self, stream: str, timeout: float = 30.0) -> str:
        """The leader of ``stream`` once one is elected.

        Raises:
            AssertionError: no leader within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leader = self.stream_leader(stream)
            if leader is not None and leader in self.nodes and self.nodes[leader].running:
                return leader
            time.sleep(0.1)
        raise AssertionError(f"no leader for {stream} after {timeout}s: {self!r}")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
