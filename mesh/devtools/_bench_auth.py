"""The benchmarks' brokers run secured, as production does (README "Security"): NATS
decentralized auth from a fresh security dir, each agent its own least-privilege creds, the raw
nats-py baseline, the setup and the simulators as the admin."""

from __future__ import annotations

from pathlib import Path

from mesh.broker import NatsServer, free_port
from mesh.config import StreamsConfig

__all__ = ["Secured"]


class Secured:
    """A fresh security dir in ``root/security`` and the secured nats-servers it trusts."""

    def __init__(self, root: Path) -> None:
        from mesh.security.setup import init_security_dir

        self.dir = root / "security"
        init_security_dir(self.dir)

    @property
    def admin_creds(self) -> Path:
        return self.dir / "creds" / "admin.creds"

    def server(self, store: Path) -> NatsServer:
        from mesh.security.setup import server_config

        port = free_port()
        conf = store.with_name(store.name + ".conf")
        conf.parent.mkdir(parents=True, exist_ok=True)
        resolver = store.with_name(store.name + "-resolver")
        conf.write_text(server_config(self.dir, resolver_dir=resolver, store_dir=store, port=port))
        return NatsServer(store, port=port, config_file=conf)

    def agent_creds(self, config_text: str, path: Path) -> None:
        """Write the least-privilege creds of the agent config ``config_text`` to ``path``."""
        from mesh.config import parse_agent_config
        from mesh.security.authority import Authority, write_creds
        from mesh.security.jwt import new_seed, public_key_of_seed
        from mesh.security.permissions import permissions_for_agent

        cfg = parse_agent_config(config_text)
        seed = new_seed("user")
        jwt = Authority.load(self.dir).issue_user(
            cfg.agent.name, public_key_of_seed(seed), permissions_for_agent(cfg)
        )
        write_creds(path, jwt, seed)

    async def streams(self, url: str) -> None:
        """Create the mesh streams as the admin (the control plane's job; agents only check)."""
        from mesh.config import NatsConfig
        from mesh.transport import JetStream

        async with JetStream(
            NatsConfig(servers=[url], creds=str(self.admin_creds)), name="bench-setup"
        ) as js:
            await js.ensure_streams(StreamsConfig())
