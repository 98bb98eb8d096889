"""A running mesh for the operations views: a secured nats-server, control-plane processes
(series every 0.5 s), an on-prem ERP agent and a cloud CRM agent moving customers, both
registered, heartbeating every 0.3 s, each with its own least-privilege creds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from typer.testing import CliRunner

from mesh.broker import free_port
from mesh.cli import agent_cp as cli_agent_cp
from mesh.readiness import NotReady, wait_ready
from tests._secure import SecuredNatsServer, secure_agent
from tests.integration._harness import AgentProcess, ErpLoad, agent_toml, log_tail, make_crm, make_erp

__all__ = ["OpsStack", "ops_stack"]


@dataclass
class OpsStack:
    http: str
    """The first control-plane replica's HTTP base URL."""
    nats: str
    erp: ErpLoad
    crm_db: Path
    admin_env: dict[str, str]
    agents: list[AgentProcess]
    replicas: list[str]
    """Every replica's HTTP base URL (the first is ``http``)."""

    def get(self, path: str, base: str | None = None) -> Any:
        with urllib.request.urlopen((base or self.http) + path, timeout=5) as r:
            return json.loads(r.read())

    def text(self, path: str) -> str:
        with urllib.request.urlopen(self.http + path, timeout=5) as r:
            return r.read().decode()


def _agent(tmp: Path, server: SecuredNatsServer, name: str, system: str, site: str, **sides: Path) -> Path:
    path = tmp / f"{name}.toml"
    text = agent_toml(name=name, system=system, state=tmp / f"{name}-state", url=server.url,
                      creds=path.with_suffix(".creds"), **sides)  # fmt: skip
    text = text.replace("[agent]\n", f'[agent]\nsite = "{site}"\nheartbeat_interval = 0.3\n', 1)
    path.write_text(text)
    secure_agent(path, server)
    return path


@contextmanager
def ops_stack(server: SecuredNatsServer, tmp: Path, *, replicas: int = 1) -> Iterator[OpsStack]:
    """Start everything (``replicas`` control-plane processes); stop it all on exit (SIGTERM,
    then SIGKILL after 10 s)."""
    admin_env = {"MESH_CREDS": str(server.admin_creds)}
    settings = tmp / "cp.toml"
    settings.write_text("series_resolution = 0.5\nsweep_interval = 0.25\n")
    procs: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []
    urls: list[str] = []
    agents: list[AgentProcess] = []
    try:
        for n in range(1, replicas + 1):
            port = free_port()
            log = open(tmp / f"cp{n}.log", "wb")  # noqa: SIM115 - closed below
            proc = subprocess.Popen(
                [sys.executable, "-m", "mesh", "control-plane", "run", "--config", str(settings),
                 "--nats", server.url, "--http", f"127.0.0.1:{port}", "--name", f"cp{n}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, "MESH_CREDS": str(server.security_dir / "creds" / "control-plane.creds")},
            )  # fmt: skip
            procs.append((proc, log))
            try:
                alive = lambda p=proc: p.poll() is None  # noqa: E731
                wait_ready(f"http://127.0.0.1:{port}/readyz", timeout=30, alive=alive)
            except NotReady as exc:
                raise AssertionError(f"control plane cp{n}: {exc}\n{log_tail(tmp / f'cp{n}.log')}") from None
            urls.append(f"http://127.0.0.1:{port}")
        erp_db, crm_db = tmp / "erp.db", tmp / "crm.db"
        make_erp(erp_db)
        make_crm(crm_db)
        erp_cfg = _agent(tmp, server, "erp-agent", "erp", "on-prem", source=erp_db)
        crm_cfg = _agent(tmp, server, "crm-agent", "crm", "cloud", sink=crm_db)
        runner = CliRunner(env=admin_env)
        for cfg in (erp_cfg, crm_cfg):
            result = runner.invoke(cli_agent_cp.app, ["register", "--config", str(cfg),
                                                      "--control-plane", server.url])  # fmt: skip
            assert result.exit_code == 0, result.output
        for cfg in (erp_cfg, crm_cfg):
            agent = AgentProcess(cfg, tmp / f"{cfg.stem}.log")
            agent.start()
            agents.append(agent)
        yield OpsStack(urls[0], server.url, ErpLoad(erp_db, seed=3), crm_db, admin_env, agents, urls)
    finally:
        for agent in agents:
            if agent.alive:
                agent.terminate()
        for proc, log in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.close()
