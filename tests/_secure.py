"""Secured nats-servers for the tests: every server the suite starts runs NATS decentralized
auth (operator mode, full resolver) with one security dir per test session, so no test can
talk to NATS anonymously (README "Security").

* :class:`SecuredNatsServer`: a :class:`~mesh.broker.NatsServer` started with
  :func:`~mesh.security.setup.server_config` (its own resolver dir), exposing ``admin_creds``
  and :meth:`~SecuredNatsServer.nats_config` (a NatsConfig with the admin creds).
* :func:`issue_agent_creds`: what ``meshctl security issue-agent`` writes, in-process: the
  least-privilege creds of an agent config's static flows.
* :func:`create_layout`: the streams an agent checks but never creates (the control plane owns
  them), created with the admin creds for tests that run agents without a control plane.
"""

from __future__ import annotations

import concurrent.futures
import tomllib
from pathlib import Path
from typing import Any, Self

import anyio

from mesh.broker import NatsServer
from mesh.config import AgentConfig, NatsConfig, StreamsConfig, load_agent_config
from mesh.security.authority import Authority, read_creds, write_creds
from mesh.security.jwt import new_seed, public_key_of_seed
from mesh.security.permissions import permissions_for_agent
from mesh.security.setup import init_security_dir, server_config

__all__ = [
    "SecuredNatsServer",
    "admin_creds",
    "create_layout",
    "init_test_security",
    "issue_agent_creds",
    "secure_agent",
    "secure_config",
    "with_agent_creds",
    "write_agent_config",
]


def init_test_security(directory: Path) -> Path:
    """A security dir in ``directory`` (created once per session by the ``security_dir`` fixture)."""
    init_security_dir(directory)
    return directory


def admin_creds(security_dir: Path) -> Path:
    return security_dir / "creds" / "admin.creds"


class SecuredNatsServer(NatsServer):
    """A nats-server that trusts ``security_dir`` and refuses anonymous clients.

    Its config file and resolver dir sit beside ``store_dir`` (``<store_dir>.conf``,
    ``<store_dir>-resolver``); ``tls``, ``extra_config`` and the other keywords go to
    :class:`~mesh.broker.NatsServer`, which composes them with this config.
    With ``layout`` every start also creates the mesh streams with the admin creds (what a
    control plane does), for agents run without one.
    """

    def __init__(
        self,
        store_dir: str | Path,
        security_dir: Path,
        *,
        port: int | None = None,
        monitor_port: int | None = None,
        server_name: str | None = None,
        layout: bool = False,
        **kw: Any,
    ) -> None:
        store = Path(store_dir)
        store.parent.mkdir(parents=True, exist_ok=True)
        conf = store.parent / f"{store.name}.conf"
        super().__init__(store, port=port, monitor_port=monitor_port, config_file=conf, **kw)
        self.security_dir = security_dir
        self.layout = layout
        self.admin_creds = admin_creds(security_dir)
        text = server_config(
            security_dir,
            resolver_dir=store.parent / f"{store.name}-resolver",
            store_dir=store,
            port=self.port,
            server_name=server_name or f"mesh-{self.port}",
        )
        conf.write_text(text)

    def start(self, timeout: float = 10.0) -> Self:
        was_running = self.running
        super().start(timeout)
        if self.layout and not was_running:
            create_layout(self)
        return self

    def nats_config(self, **kw: Any) -> NatsConfig:
        """A NatsConfig for this server with the admin creds (``kw`` overrides)."""
        return NatsConfig(**{"servers": [self.url], "creds": str(self.admin_creds), **kw})


def issue_agent_creds(config: Path | AgentConfig, security_dir: Path, out: Path | None = None) -> Path:
    """Write the least-privilege creds of an agent config (``meshctl security issue-agent``):
    to ``out`` or the config's ``[nats] creds``; the key of an existing file is kept."""
    cfg = config if isinstance(config, AgentConfig) else load_agent_config(config)
    target = out or (Path(cfg.nats.creds) if cfg.nats.creds else None)
    assert target is not None, "the agent config names no [nats] creds"
    seed: bytes | str = read_creds(target).seed if target.exists() else new_seed("user")
    authority = Authority.load(security_dir)
    jwt = authority.issue_user(cfg.agent.name, public_key_of_seed(seed), permissions_for_agent(cfg))
    return write_creds(target, jwt, seed)


def create_layout(server: SecuredNatsServer | NatsConfig, streams: StreamsConfig | None = None) -> None:
    """Create the mesh streams and the System API results bucket with the admin creds (what the
    control plane does), for agents that run without one; ``server`` may also be the NatsConfig
    of another server (a leaf)."""
    from mesh.api import ensure_results_bucket
    from mesh.transport.jetstream import JetStream

    cfg = server if isinstance(server, NatsConfig) else server.nats_config()

    async def main() -> None:
        async with JetStream(cfg, name="test-layout") as js:
            await js.ensure_streams(streams or StreamsConfig())
            await ensure_results_bucket(js)

    # its own thread: callable from sync tests and from inside an async test's event loop
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(anyio.run, main).result()


def secure_agent(config: Path | AgentConfig, server: SecuredNatsServer) -> Path:
    """Issue the agent's least-privilege creds (:func:`issue_agent_creds`) and make sure the
    streams it checks exist (:func:`create_layout`, as a control plane would); the creds path."""
    path = issue_agent_creds(config, server.security_dir)
    if server.running:
        create_layout(server)
    return path


def with_agent_creds(text: str, creds: Path) -> str:
    """An agent config's TOML with ``[nats] creds = creds`` and the agent's own inbox prefix
    (``_INBOX.<agent name>``, which its permissions require); adds ``[nats]`` when missing."""
    name = tomllib.loads(text)["agent"]["name"]
    lines = f'creds = "{creds}"\ninbox_prefix = "_INBOX.{name}"\n'
    if "\n[nats]\n" in text:
        return text.replace("\n[nats]\n", f"\n[nats]\n{lines}", 1)
    return f"{text}\n[nats]\n{lines}"


def write_agent_config(path: Path, text: str, server: SecuredNatsServer) -> Path:
    """Write an agent config with its own least-privilege creds (``<path>.creds``, see
    :func:`with_agent_creds` and :func:`secure_agent`); returns ``path``."""
    path.write_text(with_agent_creds(text, path.with_suffix(".creds")))
    secure_agent(path, server)
    return path


def secure_config(text: str, creds: Path, server: SecuredNatsServer) -> AgentConfig:
    """Parse an agent config's TOML with its own least-privilege creds at ``creds`` (for agents
    run in-process; see :func:`with_agent_creds` and :func:`secure_agent`)."""
    from mesh.config import parse_agent_config

    cfg = parse_agent_config(with_agent_creds(text, creds))
    secure_agent(cfg, server)
    return cfg
