"""The files of the leaf-node topology (``meshctl leafnode config``): the leaf node's and the
hub's nats-server configs and the edge agents' ``[nats]`` section, validated and checked by
nats-server itself. See :mod:`mesh.leafnode` for the topology.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import msgspec

from mesh.broker import find_nats_server
from mesh.config import NatsConfig
from mesh.errors import ConfigError

__all__ = [
    "DEFAULT_HUB_DOMAIN",
    "LEAF_PORT",
    "MESH_SUBJECTS",
    "LeafnodeFiles",
    "LeafnodePlan",
    "check_nats_config",
    "make_plan",
    "render_agent_nats",
    "render_hub_conf",
    "render_instructions",
    "render_leaf_conf",
    "write_leafnode_files",
]

DEFAULT_HUB_DOMAIN = "hub"
LEAF_PORT = 7422
"""nats-server's default leaf node port."""
MESH_SUBJECTS = ("evt.>", "cmd.>", "dlq.>", "audit.>", "trace.>")
"""Subjects of the mesh's streams; they must not cross the leaf link (see the module doc)."""

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
_DURATION = re.compile(r"^(always|[0-9]+(ns|us|ms|s|m|h))$")
_HUB_SCHEMES = ("nats-leaf", "nats", "tls")


@dataclass(frozen=True, slots=True)
class LeafnodePlan:
    """Validated inputs of ``meshctl leafnode config`` (build it with :func:`make_plan`)."""

    hub_url: str
    hub_host: str
    leaf_port: int
    """The hub's leaf node port (from ``hub_url``)."""
    domain: str
    hub_domain: str
    store_dir: Path
    name: str
    listen: str
    port: int
    monitor_port: int
    """Leaf's HTTP monitoring port on 127.0.0.1; 0 = none."""
    sync_interval: str
    credentials: Path | None
    hub_bind: str
    hub_port: int
    hub_store_dir: Path
    security_dir: Path | None = None
    """A mesh security dir (``meshctl security init``): both servers then run its operator with
    their own full resolver dirs, and the leaf's link binds to the MESH account."""
    mesh_account: str | None = None
    """The MESH account's public key (from ``security_dir``)."""

    @property
    def resolver_dir(self) -> Path:
        """Where the leaf node keeps account JWTs (beside its store)."""
        return self.store_dir.with_name(self.store_dir.name + "-resolver")

    @property
    def hub_resolver_dir(self) -> Path:
        return self.hub_store_dir.with_name(self.hub_store_dir.name + "-resolver")

    @property
    def hub_display(self) -> str:
        """``hub_url`` without credentials, for messages."""
        scheme = self.hub_url.split("://", 1)[0]
        return f"{scheme}://{self.hub_advertise}"

    @property
    def hub_advertise(self) -> str:
        return _hostport(self.hub_host, self.leaf_port)

    @property
    def agent_url(self) -> str:
        host = "127.0.0.1" if self.listen in ("0.0.0.0", "::") else self.listen
        return f"nats://{_hostport(host, self.port)}"


@dataclass(frozen=True, slots=True)
class LeafnodeFiles:
    leaf_conf: Path
    hub_conf: Path
    agent_nats: Path


def _bad(message: str) -> ConfigError:
    return ConfigError(message)


def _check_token(what: str, value: str) -> str:
    if not _TOKEN.match(value):
        raise _bad(f"{what} {value!r}: expected 1-64 letters, digits, '-' or '_' (no dots or spaces)")
    return value


def _check_port(what: str, value: int, *, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        raise _bad(f"{what} {value}: expected a TCP port {low}-65535")
    return value


def _check_text(what: str, value: str) -> str:
    if not value or any(c in value for c in '"\\\n\r\t') or not value.isprintable():
        raise _bad(f"{what} {value!r}: must be non-empty, printable, without quotes or backslashes")
    return value


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_host(what: str, value: str) -> str:
    if not re.match(r"^[A-Za-z0-9.:_-]+$", value):
        raise _bad(f"{what} {value!r}: expected a host name or IP address")
    return value


def _parse_hub_url(url: str) -> tuple[str, str, int]:
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _bad(f"--hub {url!r}: {exc}") from None
    if parts.scheme not in _HUB_SCHEMES:
        raise _bad(f"--hub {url!r}: expected {', '.join(s + '://' for s in _HUB_SCHEMES)}HOST[:PORT]")
    if not parts.hostname:
        raise _bad(f"--hub {url!r}: no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise _bad(f"--hub {url!r}: expected no path, query or fragment")
    _check_text("--hub", url)
    if port is None:
        port = LEAF_PORT
    _check_port("--hub port", port)
    netloc = parts.netloc if parts.port is not None else f"{parts.netloc}:{port}"
    return f"{parts.scheme}://{netloc}", parts.hostname, port


def _absolute(what: str, path: Path) -> Path:
    _check_text(what, str(path))
    resolved = path.expanduser().resolve()
    if resolved.exists() and not resolved.is_dir():
        raise _bad(f"{what} {str(path)!r}: exists and is not a directory")
    return resolved


def make_plan(
    *,
    hub: str,
    domain: str,
    store_dir: Path,
    port: int = 4222,
    name: str | None = None,
    listen: str = "127.0.0.1",
    monitor_port: int = 8222,
    hub_domain: str = DEFAULT_HUB_DOMAIN,
    sync_interval: str = "always",
    credentials: Path | None = None,
    hub_bind: str = "0.0.0.0",
    hub_port: int = 4222,
    hub_store_dir: Path = Path("/var/lib/nats/hub"),
    security_dir: Path | None = None,
) -> LeafnodePlan:
    """Validate the inputs of ``meshctl leafnode config``.

    Raises:
        ConfigError: one line naming the option and what was expected.
    """
    hub_url, hub_host, leaf_port = _parse_hub_url(hub)
    _check_token("--domain", domain)
    _check_token("--hub-domain", hub_domain)
    if domain == hub_domain:
        raise _bad(f"--domain {domain!r}: must differ from the hub's JetStream domain ({hub_domain!r})")
    name = _check_token("--name", name or f"leaf-{domain}")
    if name == hub_domain:
        raise _bad(f"--name {name!r}: must differ from the hub's server name ({hub_domain!r})")
    _check_port("--port", port)
    _check_port("--monitor-port", monitor_port, allow_zero=True)
    _check_port("--hub-port", hub_port)
    if monitor_port == port:
        raise _bad(f"--monitor-port {monitor_port}: same as --port")
    _check_host("--listen", listen)
    _check_host("--hub-bind", hub_bind)
    if not _DURATION.match(sync_interval):
        raise _bad(f"--sync-interval {sync_interval!r}: expected 'always' or a duration like 10s, 2m")
    if credentials is not None:
        _check_text("--credentials", str(credentials))
        credentials = credentials.expanduser().resolve()
    mesh_account = None
    if security_dir is not None:
        _check_text("--security-dir", str(security_dir))
        security_dir = security_dir.expanduser().resolve()
        mesh_account = _mesh_account(security_dir)
        if credentials is None:
            raise _bad(
                "--security-dir needs --credentials: the leaf node's user for the hub (a MESH account"
                " .creds file: `meshctl security issue-leaf`)"
            )
    return LeafnodePlan(
        hub_url=hub_url,
        hub_host=hub_host,
        leaf_port=leaf_port,
        domain=domain,
        hub_domain=hub_domain,
        store_dir=_absolute("--store-dir", store_dir),
        name=name,
        listen=listen,
        port=port,
        monitor_port=monitor_port,
        sync_interval=sync_interval,
        credentials=credentials,
        hub_bind=hub_bind,
        hub_port=hub_port,
        hub_store_dir=_absolute("--hub-store-dir", hub_store_dir),
        security_dir=security_dir,
        mesh_account=mesh_account,
    )


def _mesh_account(security_dir: Path) -> str:
    from mesh.security.authority import SecurityKeys

    try:
        keys = msgspec.json.decode((security_dir / "security.json").read_bytes(), type=SecurityKeys)
    except (OSError, msgspec.DecodeError) as exc:
        raise _bad(
            f"--security-dir {str(security_dir)!r}: not a mesh security dir ({exc});"
            " run `meshctl security init`"
        ) from None
    return keys.mesh_account


def _auth(security_dir: Path | None, resolver_dir: Path) -> str:
    """The auth block of a secured server (:func:`mesh.security.setup.auth_config`), or ""."""
    if security_dir is None:
        return ""
    from mesh.security.setup import auth_config

    return "\n" + auth_config(security_dir, resolver_dir)


def _list(items: tuple[str, ...]) -> str:
    return "[" + ", ".join(f'"{s}"' for s in items) + "]"


def render_leaf_conf(plan: LeafnodePlan) -> str:
    """The nats-server config of the on-prem leaf node."""
    p = plan
    http = (
        f'http: "127.0.0.1:{p.monitor_port}"   # monitoring: /healthz, /leafz, /jsz (loopback only)\n'
        if p.monitor_port
        else '# http: "127.0.0.1:8222"   # monitoring: /healthz, /leafz, /jsz\n'
    )
    creds = (
        f'      credentials: "{p.credentials}"\n'
        if p.credentials
        else '      # credentials: "/etc/nats/leaf.creds"   # when the hub requires them\n'
    )
    account = (
        f'      account: "{p.mesh_account}"   # the MESH account: local clients and the hub\'s meet\n'
        if p.mesh_account
        else ""
    )
    return f"""\
# nats-server configuration of the on-prem LEAF NODE "{p.name}" (JetStream domain "{p.domain}").
# Written by `meshctl leafnode config`. Run it on the site, next to the edge agents:
#     nats-server -c leaf.conf
# Edge agents publish into this server's own JetStream (MESH_EVENTS in domain "{p.domain}"), so
# they keep working while the WAN is down; the hub's MESH_EVENTS sources this stream through
# $JS.{p.domain}.API and catches up by itself when the link returns.

server_name: "{p.name}"
listen: "{_hostport(p.listen, p.port)}"
{http}
jetstream {{
  domain: "{p.domain}"
  store_dir: "{p.store_dir}"
  # During a WAN outage this store holds the only copy of what the agents published (their
  # outbox rows are deleted once this server acked them). "always" fsyncs every write so a power
  # cut cannot lose acked events; the server default "2m" is faster but may lose up to two
  # minutes of acked events on power loss (not on a process crash).
  sync_interval: "{p.sync_interval}"
  # Size the store for the longest outage you must ride out (events/s x seconds x ~1 KiB):
  # max_file_store: 50G
}}

leafnodes {{
  reconnect_interval: "1s"
  remotes: [
    {{
      urls: ["{p.hub_url}"]
{creds}{account}\
      # The mesh's stream subjects must not cross the link: the hub's MESH_* streams listen on
      # the same subjects, and nats-server would store each publish in BOTH domains. Events
      # reach the hub only by stream sourcing, which uses $JS.* subjects.
      deny_imports: {_list(MESH_SUBJECTS)}
      deny_exports: {_list(MESH_SUBJECTS)}
    }}
  ]
}}
{_auth(p.security_dir, p.resolver_dir)}"""


def render_hub_conf(plan: LeafnodePlan) -> str:
    """The hub side: a complete config whose ``jetstream.domain`` and ``leafnodes`` blocks are
    what an existing hub config needs."""
    p = plan
    return f"""\
# nats-server configuration of the cloud HUB (JetStream domain "{p.hub_domain}") that leaf node
# "{p.name}" connects to. Written by `meshctl leafnode config`. Run it as is
#     nats-server -c hub.conf
# or copy the `jetstream.domain` and `leafnodes` blocks into your existing hub configuration
# (every server of a hub cluster needs the same domain and a unique server_name).

server_name: "{p.hub_domain}"
listen: "{_hostport(p.hub_bind, p.hub_port)}"
# http: "127.0.0.1:8222"   # monitoring: /healthz, /leafz, /jsz

jetstream {{
  domain: "{p.hub_domain}"
  store_dir: "{p.hub_store_dir}"
}}

leafnodes {{
  # Leaf nodes connect here (the site's leaf.conf points at {p.hub_display}).
  # Before opening this port to the internet, require TLS and credentials:
  #   tls {{ cert_file: ..., key_file: ... }}, authorization {{ user: ..., password: ... }}
  listen: "{_hostport(p.hub_bind, p.leaf_port)}"
  # Leaf nodes learn the URLs the hub advertises and fail over to them: advertise the address
  # the sites dial (behind NAT or a load balancer the listen address is not reachable from
  # there). In a hub cluster, give each server its own public address here.
  advertise: "{p.hub_advertise}"
}}
{_auth(p.security_dir, p.hub_resolver_dir)}"""


def render_agent_nats(plan: LeafnodePlan) -> str:
    """The ``[nats]`` fragment of the edge agents' configs."""
    creds = (
        "# each agent its own credentials (`meshctl security issue-agent` or registration):\n"
        '# creds = "/var/lib/mesh/<agent>/agent.creds"\n'
        '# inbox_prefix = "_INBOX.<agent name>"\n'
        if plan.security_dir is not None
        else ""
    )
    return f"""\
# [nats] section of the connector agents at site "{plan.domain}": merge it into each agent's
# config. They talk to the local leaf node only, whose JetStream (domain "{plan.domain}") keeps
# their events while the WAN is down. No domain setting is needed: on a leaf node with its own
# JetStream domain the JetStream API is served locally.
[nats]
servers = ["{plan.agent_url}"]
{creds}"""


def render_instructions(plan: LeafnodePlan, files: LeafnodeFiles) -> str:
    """What to run where (printed by ``meshctl leafnode config``)."""
    p = plan
    secured = (
        f"""
Secured ({p.security_dir}): both servers run the mesh's operator, each with its own account
resolver dir beside its store; the link authenticates with {p.credentials} and binds the site's
MESH account to the hub's. Operator commands (step 2) take --creds <admin.creds>; the site's
streams are created once with the admin creds against the leaf (agents only check them); each
edge agent gets its own creds (`meshctl security issue-agent --config <agent.toml> --dir
{p.security_dir}`) named in its [nats] creds, with inbox_prefix = "_INBOX.<agent name>".
"""
        if p.security_dir is not None
        else ""
    )
    return f"""\
Leaf node "{p.name}" (JetStream domain "{p.domain}") -> hub {p.hub_display} (domain "{p.hub_domain}")

Wrote:
  {files.leaf_conf}   nats-server config of the on-prem leaf node
  {files.hub_conf}    hub side: JetStream domain "{p.hub_domain}" and the leaf node listener
  {files.agent_nats}  [nats] section for the edge agents

In the cloud (hub):
  1. Run the hub with hub.conf, or merge its `jetstream.domain` and `leafnodes` blocks into the
     hub's config; allow TCP {p.leaf_port} from the site.
  2. Make the hub's MESH_EVENTS and MESH_TRACE source the site's events and trace records
     (idempotent, safe to repeat); with --watch it keeps running and restarts a source promptly
     after each outage (run it as a service next to the hub):
       meshctl leafnode link --server nats://<hub>:{p.hub_port} --domain {p.domain} --watch
  3. Cloud sink agents use [nats] servers = ["nats://<hub>:{p.hub_port}"] as usual.

On site:
  4. Run the leaf node (as a service): nats-server -c {files.leaf_conf}
     It stores into {p.store_dir} and connects out to {p.hub_display}.
  5. Merge {files.agent_nats.name} into each edge agent's config, then:
       meshctl agent run --config <agent.toml>

While the WAN is down the edge agents keep capturing and publishing into the leaf's JetStream;
when it returns the hub's MESH_EVENTS (and MESH_TRACE: `meshctl trace` at the hub shows the
site's steps) catches up by itself, in order, without duplicates. The site's dead letters stay
in its own MESH_DLQ: run `meshctl dlq` against the leaf node.
{secured}"""


def check_nats_config(path: Path, *, binary: str | None = None, timeout: float = 15.0) -> None:
    """Have nats-server itself check a config file (``nats-server -t -c path``).

    Raises:
        ConfigError: nats-server refused the file (its message), or could not be run.
    """
    exe = binary or find_nats_server()
    try:
        res = subprocess.run(
            [exe, "-t", "-c", str(path)], capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"cannot run {exe} -t: {exc}", source=str(path)) from None
    if res.returncode != 0:
        out = (res.stderr or res.stdout).strip().splitlines()
        detail = out[0].removeprefix("nats-server: ") if out else f"exit code {res.returncode}"
        raise ConfigError(f"nats-server refused the file: {detail}", source=str(path))


def _check_agent_nats(text: str, path: Path) -> None:
    try:
        msgspec.convert(tomllib.loads(text)["nats"], NatsConfig)
    except (tomllib.TOMLDecodeError, KeyError, msgspec.ValidationError) as exc:  # a bug here, not input
        raise ConfigError(f"generated [nats] section is not valid: {exc}", source=str(path)) from None


def write_leafnode_files(
    plan: LeafnodePlan, out_dir: Path, *, force: bool = False, check: bool = True
) -> LeafnodeFiles:
    """Write ``leaf.conf``, ``hub.conf`` and ``agent-nats.toml`` into ``out_dir``.

    With ``check`` every nats-server file is checked by nats-server (``-t``) first; nothing is
    left behind when one is refused.

    Raises:
        ConfigError: a file exists (without ``force``), cannot be written, or nats-server
            refuses it.
    """
    out_dir = out_dir.expanduser().resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {str(out_dir)!r}: exists and is not a directory")
    files = LeafnodeFiles(
        leaf_conf=out_dir / "leaf.conf", hub_conf=out_dir / "hub.conf", agent_nats=out_dir / "agent-nats.toml"
    )
    texts = {
        files.leaf_conf: render_leaf_conf(plan),
        files.hub_conf: render_hub_conf(plan),
        files.agent_nats: render_agent_nats(plan),
    }
    if not force:
        for path in texts:
            if path.exists():
                raise ConfigError(f"{path} exists; pass --force to overwrite it")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for path, text in texts.items():
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text, encoding="utf-8")
            if path.suffix == ".toml":
                _check_agent_nats(text, path)
            elif check:
                try:
                    check_nats_config(tmp)
                except ConfigError:
                    tmp.unlink(missing_ok=True)
                    raise
            tmp.replace(path)
    except OSError as exc:
        raise ConfigError(f"cannot write into {out_dir}: {exc.strerror or exc}") from None
    return files
