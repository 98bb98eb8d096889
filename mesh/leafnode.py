"""Leaf-node topology: an on-prem site runs its own nats-server as a **leaf node** of the cloud
hub, with its own JetStream domain, so edge agents keep publishing while the WAN is down.

Topology (DESIGN §4, "Hybrid")::

    site "edge"                                          cloud
    ERP ─► edge agent ─► leaf nats-server ══ WAN ══► hub nats-server ─► cloud agents ─► CRM
                         JetStream domain "edge"         JetStream domain "hub"
                         MESH_EVENTS (evt.>)             MESH_EVENTS (evt.>)
                                        └──── sourced via $JS.edge.API ───┘

Data path (how an event crosses):

1. Edge agents connect to the **leaf** only (``[nats] servers = ["nats://127.0.0.1:4222"]``) and
   run as usual: ``ensure_streams`` and their publishes go to the leaf's own JetStream. On a leaf
   node with its own domain, ``$JS.API.>`` is served locally and never crosses the link, so the
   agents need no domain setting. Their outbox drains into the leaf whether or not the WAN is up.
2. The hub's ``MESH_EVENTS`` (domain ``hub``) **sources** the leaf's ``MESH_EVENTS`` through
   the external API prefix ``$JS.<edge domain>.API`` (:func:`ensure_edge_sourcing`, once, by the
   operator: ``meshctl leafnode link``). The hub runs the source consumer itself and remembers the
   last edge sequence it stored, so after an outage it catches up by itself, in the edge stream's
   order. Sourced messages keep their subject and their ``Nats-Msg-Id`` (the envelope id), so
   the hub stream deduplicates them inside its duplicate window and sinks' inboxes beyond it.
   nats-server retries a failed source only after 10 s, 20 s, ... up to 2 min, so after a long
   outage catch-up could start minutes late: ``meshctl leafnode link --watch`` on the hub side
   (:func:`watch_edge_sourcing`) restarts a stalled source as soon as the site's stream answers
   again (the server resumes after the last edge sequence it stored: no gap, no copy) and puts
   the source back if something replaced the stream config. Agents' ``ensure_streams`` keeps
   a stream's sources when it updates the stream.
3. Cloud sink agents connect to the hub and consume from the hub's ``MESH_EVENTS`` as usual.
4. Trace records (:mod:`mesh.trace`) take the same way: ``link`` also makes the hub's
   ``MESH_TRACE`` source the leaf's ``MESH_TRACE`` (all of :data:`EDGE_STREAMS`; ``--watch``
   keeps each source prompt; ``unlink`` removes them), so ``meshctl trace`` and the control
   plane's transaction index at the hub see what happened on site (capture, publish, applies of
   cloud changes, dead letters) next to the cloud's steps, once the link has carried them.
   Sourced records keep their subject ``trace.<agent>.<kind>`` and their ``Nats-Msg-Id``: the
   source resumes after the last record it stored, so none is stored twice. The check that a
   record names the agent of its subject still holds: the leaf's server, which runs the same
   operator and permission table, let only that agent publish there. Agents on both sides must
   therefore have distinct names (the registry gives each one its own creds anyway).

Dead letters stay on site: the hub does **not** source the leaf's ``MESH_DLQ``. A replay
republishes into the ``MESH_EVENTS`` of the server it runs against; at the hub that would put a
site's failed apply (or capture) into the cloud's stream instead of back to the site's sink, and
a purge at the hub would not purge the site. ``meshctl dlq list`` at the hub instead names each
linked site and how many dead letters its own ``MESH_DLQ`` holds (:func:`edge_dead_letters`,
asked through ``$JS.<edge>.API``), and the hub's trace shows the ``dead_lettered`` records.

Why not let the subjects cross the link: verified with nats-server 2.15, two streams in
different JetStream domains that listen on the same subjects (``evt.>`` on both sides) do
**collide** across a leaf connection: core NATS interest crosses the link, so a publish on the leaf
is stored in *both* streams while the link is up (and the PubAck may even come from the hub), and
hub-side publishes land on the leaf too. The leaf's remote therefore denies the mesh's stream
subject spaces (:data:`MESH_SUBJECTS`) in both directions (``deny_imports``/``deny_exports``);
events reach the hub only through sourcing, which uses ``$JS.*`` subjects. Each domain keeps the
standard subject layout, so agents are configured the same on both sides. A mirror was not
chosen because a mirror cannot also take the hub's own publishes, and one hub stream can source
from many sites (one source per edge domain). The hub's leafnodes block sets ``advertise`` to the
address the sites dial, since leaf nodes fail over to the URLs the hub advertises.

Limits: the leaf keeps events for ``streams.max_age`` (7 days by default); an outage longer than
that, or one that fills the leaf's disk, loses what expired before the hub sourced it. The
generated leaf config fsyncs every write (``sync_interval: always``) because during an outage
the leaf's store is the only copy of what the agents' outboxes already deleted.

Other direction (cloud → site, e.g. CRM changes applied on site): call
:func:`ensure_domain_source` on the *leaf* with ``domain="hub"`` and a ``filter_subject`` that
selects only cloud origins (``evt.*.*.crm``). Never source ``evt.>`` both ways: events would loop.
"""

from __future__ import annotations

import logging
import re
import subprocess
import tomllib
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec

from mesh.broker import find_nats_server
from mesh.config import NatsConfig, StreamsConfig
from mesh.errors import ConfigError, TransportError
from mesh.transport import DLQ_STREAM, EVENTS_STREAM, TRACE_STREAM, JetStream, NoResponders

__all__ = [
    "DEFAULT_HUB_DOMAIN",
    "EDGE_STREAMS",
    "LEAF_PORT",
    "MESH_SUBJECTS",
    "LeafnodeFiles",
    "LeafnodePlan",
    "SourceStatus",
    "api_prefix",
    "check_nats_config",
    "domain_stream_messages",
    "edge_dead_letters",
    "edge_source_status",
    "edge_stream_ready",
    "ensure_domain_source",
    "ensure_edge_sourcing",
    "linked_domains",
    "make_plan",
    "remove_domain_source",
    "remove_edge_sourcing",
    "render_agent_nats",
    "render_hub_conf",
    "render_instructions",
    "render_leaf_conf",
    "restart_domain_source",
    "watch_edge_sourcing",
    "write_leafnode_files",
]

log = logging.getLogger(__name__)

DEFAULT_HUB_DOMAIN = "hub"
LEAF_PORT = 7422
"""nats-server's default leaf node port."""
EDGE_STREAMS: tuple[str, ...] = (EVENTS_STREAM, TRACE_STREAM)
"""The hub's streams that source the stream of the same name from each linked site."""
MESH_SUBJECTS = ("evt.>", "cmd.>", "dlq.>", "audit.>", "trace.>")
"""Subjects of the mesh's streams; they must not cross the leaf link (see the module doc)."""

_API_PREFIX = re.compile(r"^\$JS\.([A-Za-z0-9_-]{1,64})\.API\Z")
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
  2. Make the hub's MESH_EVENTS source the site's events (idempotent, safe to repeat); with
     --watch it keeps running and restarts the source promptly after each outage (run it as a
     service next to the hub):
       meshctl leafnode link --server nats://<hub>:{p.hub_port} --domain {p.domain} --watch
  3. Cloud sink agents use [nats] servers = ["nats://<hub>:{p.hub_port}"] as usual.

On site:
  4. Run the leaf node (as a service): nats-server -c {files.leaf_conf}
     It stores into {p.store_dir} and connects out to {p.hub_display}.
  5. Merge {files.agent_nats.name} into each edge agent's config, then:
       meshctl agent run --config <agent.toml>

While the WAN is down the edge agents keep capturing and publishing into the leaf's JetStream;
when it returns the hub's MESH_EVENTS catches up by itself, in order, without duplicates.
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


# --- hub-side stream sourcing -------------------------------------------------------------------


def api_prefix(domain: str | None) -> str:
    """The JetStream API prefix of ``domain`` (``$JS.<domain>.API``; ``$JS.API`` for None)."""
    return f"$JS.{domain}.API" if domain else "$JS.API"


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _ApiResponse(msgspec.Struct):
    error: _ApiError | None = None
    config: dict[str, Any] | None = None
    sources: list[dict[str, Any]] | None = None
    state: dict[str, Any] | None = None


_STREAM_NOT_FOUND = 10059


async def _api(
    js: JetStream, what: str, subject: str, body: dict[str, Any] | None = None, *, domain: str | None = None
) -> _ApiResponse:
    """One raw JetStream API request to ``domain`` (default: ``js``'s own); raw JSON keeps the
    stream config fields nats-py does not know."""
    domain = domain or js.domain
    data = msgspec.json.encode(body) if body is not None else b""
    try:
        reply = await js.request(f"{api_prefix(domain)}.{subject}", data, timeout=js.cfg.request_timeout)
    except NoResponders:
        raise TransportError(f"{what}: no JetStream answered in domain {domain or '(default)'}") from None
    except TransportError as exc:
        raise TransportError(f"{what}: {exc}") from exc
    try:
        return msgspec.json.decode(reply.data, type=_ApiResponse)
    except msgspec.DecodeError as exc:
        raise TransportError(f"{what}: unexpected answer: {exc}") from exc


def _is_source(src: dict[str, Any], source_stream: str, prefix: str) -> bool:
    return src.get("name") == source_stream and (src.get("external") or {}).get("api") == prefix


def _source_key(src: dict[str, Any]) -> tuple[str, str, str]:
    external = src.get("external") or {}
    return (str(src.get("name", "")), str(external.get("api", "")), str(src.get("filter_subject", "")))


async def ensure_domain_source(
    js: JetStream,
    domain: str,
    *,
    stream: str = EVENTS_STREAM,
    source_stream: str = EVENTS_STREAM,
    filter_subject: str | None = None,
    streams: StreamsConfig | None = None,
) -> bool:
    """Make ``stream`` (in ``js``'s domain) source ``source_stream`` of JetStream ``domain``.

    Idempotent: adds the source when missing, leaves the stream alone when it is there (other
    sources, e.g. other sites, are kept). The server keeps sourcing across outages by itself.
    When ``stream`` does not exist it is created by ``js.ensure_streams(streams)`` if ``streams``
    is given. Returns True when the stream config was changed. A source from the same stream and
    domain with another ``filter_subject`` is replaced (the server may then re-read the site's
    stream; the duplicate window and the sinks' inboxes absorb the copies).

    Raises:
        ConfigError: ``domain`` is not a single token.
        TransportError: JetStream unreachable, the stream missing (and no ``streams``), or the
            update refused.
    """
    _check_token("domain", domain)
    want: dict[str, Any] = {"name": source_stream, "external": {"api": api_prefix(domain)}}
    if filter_subject:
        want["filter_subject"] = filter_subject
    for _attempt in range(5):
        info = await _api(js, f"stream {stream}", f"STREAM.INFO.{stream}")
        if info.error is not None and info.error.err_code == _STREAM_NOT_FOUND and streams is not None:
            await js.ensure_streams(streams)
            continue
        if info.error is not None or info.config is None:
            desc = info.error.description if info.error else "no config"
            raise TransportError(f"stream {stream}: {desc}")
        config = info.config
        sources: list[dict[str, Any]] = list(config.get("sources") or [])
        if any(_source_key(s) == _source_key(want) for s in sources):
            return False
        # Same stream of the same domain with another filter: replace it rather than add a copy.
        sources = [s for s in sources if _source_key(s)[:2] != _source_key(want)[:2]]
        config["sources"] = [*sources, want]
        res = await _api(js, f"update stream {stream}", f"STREAM.UPDATE.{stream}", config)
        if res.error is not None:
            raise TransportError(f"update stream {stream}: {res.error.description}")
        # Verify: a concurrent update (another operator, another site) may have replaced ours.
        check = await _api(js, f"stream {stream}", f"STREAM.INFO.{stream}")
        if check.config is not None and any(
            _source_key(s) == _source_key(want) for s in check.config.get("sources") or []
        ):
            return True
        await anyio.sleep(0.1)
    raise TransportError(
        f"stream {stream}: the source from domain {domain} did not stick (concurrent updates?)"
    )


async def ensure_edge_sourcing(
    js_hub: JetStream,
    edge_domain: str,
    *,
    filter_subject: str | None = None,
    streams: StreamsConfig | None = None,
    edge_streams: tuple[str, ...] = EDGE_STREAMS,
) -> bool:
    """Make each of the hub's :data:`EDGE_STREAMS` (``MESH_EVENTS``, ``MESH_TRACE``) source the
    stream of the same name in ``edge_domain``; True when a stream config was changed.

    ``js_hub`` is connected to the hub (its own domain). ``filter_subject`` applies to the
    events source only; trace records are sourced whole. A hub stream that does not exist is
    created by ``js_hub.ensure_streams(streams)`` when ``streams`` is given (an existing one keeps
    its retention and limits). See :func:`ensure_domain_source`.

    Raises:
        ConfigError: ``edge_domain`` is not a single token.
        TransportError: as :func:`ensure_domain_source`.
    """
    changed = False
    for stream in edge_streams:
        changed |= await ensure_domain_source(
            js_hub, edge_domain, stream=stream, source_stream=stream,
            filter_subject=filter_subject if stream == EVENTS_STREAM else None, streams=streams,
        )  # fmt: skip
    return changed


async def remove_domain_source(
    js: JetStream, domain: str, *, stream: str = EVENTS_STREAM, source_stream: str = EVENTS_STREAM
) -> bool:
    """Remove ``stream``'s source from ``source_stream`` of ``domain``; False when it had none
    (or the stream does not exist). What was already sourced stays in ``stream``.

    Raises:
        ConfigError: ``domain`` is not a single token.
        TransportError: JetStream unreachable or the update refused.
    """
    _check_token("domain", domain)
    prefix = api_prefix(domain)
    info = await _api(js, f"stream {stream}", f"STREAM.INFO.{stream}")
    if info.error is not None and info.error.err_code == _STREAM_NOT_FOUND:
        return False
    if info.error is not None or info.config is None:
        raise TransportError(f"stream {stream}: {info.error.description if info.error else 'no config'}")
    sources = list(info.config.get("sources") or [])
    kept = [s for s in sources if not _is_source(s, source_stream, prefix)]
    if len(kept) == len(sources):
        return False
    res = await _api(
        js, f"update stream {stream}", f"STREAM.UPDATE.{stream}", {**info.config, "sources": kept}
    )
    if res.error is not None:
        raise TransportError(f"update stream {stream}: {res.error.description}")
    return True


async def remove_edge_sourcing(
    js_hub: JetStream, edge_domain: str, *, edge_streams: tuple[str, ...] = EDGE_STREAMS
) -> list[str]:
    """Undo :func:`ensure_edge_sourcing` (``meshctl leafnode unlink``): the hub streams that no
    longer source ``edge_domain`` (empty when none did). The site's streams are untouched.

    Raises:
        ConfigError: ``edge_domain`` is not a single token.
        TransportError: JetStream unreachable or an update refused.
    """
    return [
        stream
        for stream in edge_streams
        if await remove_domain_source(js_hub, edge_domain, stream=stream, source_stream=stream)
    ]


async def linked_domains(js: JetStream, *, stream: str = EVENTS_STREAM) -> list[str]:
    """The JetStream domains whose streams ``stream`` sources (the sites linked to this hub).

    Raises:
        TransportError: JetStream unreachable (a missing stream: no domains).
    """
    info = await _api(js, f"stream {stream}", f"STREAM.INFO.{stream}")
    if info.error is not None and info.error.err_code == _STREAM_NOT_FOUND:
        return []
    if info.error is not None or info.config is None:
        raise TransportError(f"stream {stream}: {info.error.description if info.error else 'no config'}")
    domains = []
    for src in info.config.get("sources") or []:
        m = _API_PREFIX.match(str((src.get("external") or {}).get("api", "")))
        if m and m.group(1) not in domains:
            domains.append(m.group(1))
    return domains


async def domain_stream_messages(js: JetStream, domain: str, stream: str) -> int | None:
    """How many messages ``stream`` of JetStream ``domain`` holds, asked through ``js``; None
    when it does not answer (link down, no such stream)."""
    try:
        res = await _api(js, f"stream {stream}", f"STREAM.INFO.{stream}", domain=domain)
    except TransportError:
        return None
    if res.error is not None or res.state is None:
        return None
    return int(res.state.get("messages", 0))


async def edge_dead_letters(js_hub: JetStream, *, stream: str = DLQ_STREAM) -> dict[str, int | None]:
    """Per site linked to this hub (:func:`linked_domains`): how many dead letters its own
    ``MESH_DLQ`` holds (None when the site does not answer: link down or no such stream).

    Sites' dead letters are not sourced into the hub (see the module doc): this only says where
    they are, for ``meshctl dlq list`` at the hub.

    Raises:
        TransportError: the hub's JetStream unreachable.
    """
    return {d: await domain_stream_messages(js_hub, d, stream) for d in await linked_domains(js_hub)}


@dataclass(frozen=True, slots=True)
class SourceStatus:
    """How far a stream's source from one domain is."""

    domain: str
    stream: str
    lag: int
    """Messages of the source stream not yet stored (as last seen by the server)."""
    active: float | None
    """Seconds since the source last delivered; None when it never has (or is not running)."""
    error: str | None


async def edge_source_status(
    js: JetStream, domain: str, *, stream: str = EVENTS_STREAM
) -> SourceStatus | None:
    """Status of ``stream``'s source from ``domain``; None when it has none.

    Raises:
        TransportError: JetStream unreachable or the stream missing.
    """
    info = await _api(js, f"stream {stream}", f"STREAM.INFO.{stream}")
    if info.error is not None:
        raise TransportError(f"stream {stream}: {info.error.description}")
    prefix = api_prefix(domain)
    for src in info.sources or []:
        if (src.get("external") or {}).get("api") != prefix:
            continue
        active_ns = int(src.get("active", -1))
        err = src.get("error")
        return SourceStatus(
            domain=domain,
            stream=str(src.get("name", "")),
            lag=int(src.get("lag", 0)),
            active=active_ns / 1e9 if active_ns >= 0 else None,
            error=str(err.get("description", err)) if isinstance(err, dict) else None,
        )
    return None


async def edge_stream_ready(js: JetStream, domain: str, *, stream: str = EVENTS_STREAM) -> bool:
    """True when ``stream`` of JetStream ``domain`` answers through ``js`` (the link is up and
    the site's stream exists)."""
    try:
        res = await _api(js, f"stream {stream}", f"STREAM.INFO.{stream}", domain=domain)
    except TransportError:
        return False
    return res.error is None


async def restart_domain_source(
    js: JetStream, domain: str, *, stream: str = EVENTS_STREAM, source_stream: str = EVENTS_STREAM
) -> bool:
    """Remove and re-add ``stream``'s source from ``domain``, so the server sets it up again now.

    nats-server retries a failed source with a growing delay (10 s, 20 s, ... up to 2 min), so
    after a WAN outage a source may sit idle long after the link is back. Re-adding it starts it
    at once; the server finds where it stopped from the stream's own messages, so nothing is
    stored twice or skipped. Returns False when the stream has no such source.
    """
    prefix = api_prefix(domain)

    def ours(src: dict[str, Any]) -> bool:
        return _is_source(src, source_stream, prefix)

    info = await _api(js, f"stream {stream}", f"STREAM.INFO.{stream}")
    if info.error is not None or info.config is None:
        raise TransportError(f"stream {stream}: {info.error.description if info.error else 'no config'}")
    sources = list(info.config.get("sources") or [])
    removed = [s for s in sources if ours(s)]
    if not removed:
        return False
    config = {**info.config, "sources": [s for s in sources if not ours(s)]}
    res = await _api(js, f"update stream {stream}", f"STREAM.UPDATE.{stream}", config)
    if res.error is not None:
        raise TransportError(f"update stream {stream}: {res.error.description}")
    src = removed[0]
    await ensure_domain_source(
        js, domain, stream=stream, source_stream=source_stream, filter_subject=src.get("filter_subject")
    )
    return True


def _stalled(status: SourceStatus | None, stall_after: float) -> bool:
    if status is None:
        return False
    return status.error is not None or status.active is None or status.active > stall_after


async def watch_edge_sourcing(
    js_hub: JetStream,
    edge_domain: str,
    *,
    edge_streams: tuple[str, ...] = EDGE_STREAMS,
    interval: float = 2.0,
    stall_after: float = 5.0,
    min_restart_interval: float = 10.0,
    on_restart: Callable[[SourceStatus | None], None] | None = None,
) -> None:
    """Keep the hub's sources from ``edge_domain`` (one per stream of ``edge_streams``) present
    and prompt; runs until cancelled.

    Every ``interval`` seconds: make sure the sources exist (:func:`ensure_edge_sourcing`; an
    agent or an operator may have replaced a stream config), and when one has been idle for more
    than ``stall_after`` seconds (or in error) while the site's stream answers, restart it
    (:func:`restart_domain_source`), each at most once per ``min_restart_interval``. Transport
    errors are logged and retried; the connection reconnects by itself.
    """
    last_restart = dict.fromkeys(edge_streams, -min_restart_interval)
    while True:
        try:
            await ensure_edge_sourcing(js_hub, edge_domain, edge_streams=edge_streams)
            for stream in edge_streams:
                status = await edge_source_status(js_hub, edge_domain, stream=stream)
                now = anyio.current_time()
                if (
                    _stalled(status, stall_after)
                    and now - last_restart[stream] >= min_restart_interval
                    and await edge_stream_ready(js_hub, edge_domain, stream=stream)
                ):
                    log.info(
                        "%s source from domain %s is stalled (%s): restarting it", stream, edge_domain, status
                    )
                    await restart_domain_source(js_hub, edge_domain, stream=stream, source_stream=stream)
                    last_restart[stream] = now
                    if on_restart is not None:
                        on_restart(status)
        except TransportError as exc:
            log.warning("watching the sources from domain %s: %s", edge_domain, exc)
        await anyio.sleep(interval)
