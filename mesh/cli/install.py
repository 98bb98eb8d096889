"""``meshctl agent install|uninstall``: an agent as a systemd service (``mesh-agent@<name>``).

``install --config agent.toml`` copies the config to ``/etc/mesh/<name>.toml`` (0640, group
``mesh``), writes the unit template ``/etc/systemd/system/mesh-agent@.service`` (its
``ExecStart`` is the ``meshctl`` that runs this command), creates ``/etc/mesh/credentials``
(0700) where ``LoadCredential=`` reads the agent's ``<name>.creds``, and creates the system user
``mesh`` if it is missing; with ``--token`` it also registers the agent, which writes its NATS
creds there (0600). It prints the next commands. ``--prefix DIR`` writes every file under
``DIR`` instead of ``/`` (and creates no user): a staging tree for a package, or a test.

The config must say where the unit puts things: ``[agent] state_dir = "/var/lib/mesh/<name>"``
(the unit's ``StateDirectory=``, the one path ``ProtectSystem=strict`` leaves writable; or
``"${STATE_DIRECTORY:-/var/lib/mesh/<name>}"``) and, with
security on, ``[nats] creds = "${CREDENTIALS_DIRECTORY:-/etc/mesh/credentials}/<name>.creds"``
(``mesh.config.expand_credentials_directory``). ``install`` refuses any other value, naming the
line to write. Exit 2 with one line on any problem.

``uninstall NAME`` removes the config and the creds (``--keep-state`` is the default for the
state dir: outbox and inbox are data; ``--purge`` removes ``/var/lib/mesh/<name>`` too); the
unit template stays while another ``/etc/mesh/*.toml`` uses it.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from mesh.cli._output import fail
from mesh.errors import ConfigError

__all__ = [
    "CREDENTIALS_DIR",
    "DEFAULT_MESHCTL",
    "SERVICE_USER",
    "UNIT_NAME",
    "app",
    "render_unit",
    "unit_template",
]

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

SERVICE_USER = "mesh"
UNIT_NAME = "mesh-agent@.service"
CONFIG_DIR = "etc/mesh"
CREDENTIALS_DIR = "etc/mesh/credentials"
UNIT_DIR = "etc/systemd/system"
STATE_ROOT = "/var/lib/mesh"
DEFAULT_MESHCTL = "/opt/mesh/bin/meshctl"
_CREDS_REF = "${CREDENTIALS_DIRECTORY:-/etc/mesh/credentials}"


def unit_template() -> str:
    """The unit template as shipped (deploy/systemd/mesh-agent@.service, the same text: a test
    checks), ``ExecStart`` at :data:`DEFAULT_MESHCTL`."""
    return _UNIT


def render_unit(meshctl: str) -> str:
    """The unit template with ``ExecStart`` running ``meshctl`` (an absolute path)."""
    text = unit_template()
    old = f"ExecStart={DEFAULT_MESHCTL} "
    if old not in text:  # pragma: no cover - the shipped template has it (tests check)
        raise ConfigError(f"{UNIT_NAME}: no `{old}` line to point at {meshctl}")
    return text.replace(old, f"ExecStart={meshctl} ")


def _this_meshctl() -> str:
    beside = Path(sys.executable).parent / "meshctl"
    if beside.is_file():
        return str(beside)
    found = shutil.which("meshctl")
    return str(Path(found).resolve()) if found else DEFAULT_MESHCTL


@contextlib.contextmanager
def _systemd_dirs(credentials: str | None, state: str | None) -> Iterator[None]:
    """``$CREDENTIALS_DIRECTORY`` / ``$STATE_DIRECTORY`` set (None: unset) for a while."""
    names = {"CREDENTIALS_DIRECTORY": credentials, "STATE_DIRECTORY": state}
    old = {k: os.environ.get(k) for k in names}
    try:
        for key, value in names.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _under(prefix: Path, path: str) -> Path:
    return prefix / path.lstrip("/")


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` atomically with ``mode`` (never readable by others in between)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _ensure_user(create: bool) -> str | None:
    """Create the system user ``mesh`` if missing (as root, prefix /); the note to print if not."""
    try:
        pwd.getpwnam(SERVICE_USER)
        return None
    except KeyError:
        pass
    command = ["useradd", "--system", "--user-group", "--home-dir", STATE_ROOT, "--no-create-home",
               "--shell", "/usr/sbin/nologin", SERVICE_USER]  # fmt: skip
    if create and os.geteuid() == 0 and shutil.which("useradd"):
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode == 0:
            return None
        return f"could not create user {SERVICE_USER}: {done.stderr.strip()}; run: {' '.join(command)}"
    return f"create the service user: {' '.join(command)}"


def _group_gid() -> int | None:
    try:
        return grp.getgrnam(SERVICE_USER).gr_gid
    except KeyError:
        return None


@app.command("install")
def _install(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="The agent's config (TOML).", show_default=False)
    ],
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="MESH_ENROLL_TOKEN",
            help="Enrollment token (`meshctl agent token create`): also register the agent, "
            "which writes its NATS creds to /etc/mesh/credentials/<name>.creds.",
            show_default=False,
        ),
    ] = None,
    prefix: Annotated[
        Path,
        typer.Option("--prefix", help="Write every file under this directory instead of /."),
    ] = Path("/"),
    meshctl: Annotated[
        str | None,
        typer.Option(
            "--meshctl",
            help="The meshctl the unit runs (default: the one running this command).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Install an agent as the systemd service mesh-agent@<name>: config, unit, credentials dir."""
    from mesh.config import load_agent_config

    try:
        raw = config.read_bytes()
    except OSError as exc:
        fail(f"--config: cannot read {config}: {exc.strerror or exc}")
    try:
        # As the unit will see it: creds under the directory systemd gives the service.
        with _systemd_dirs("/run/credentials/mesh-agent.service", None):
            cfg = load_agent_config(config)
    except ConfigError as exc:
        fail(exc)
    name = cfg.agent.name
    state_dir = f"{STATE_ROOT}/{name}"
    if cfg.agent.state_dir != state_dir:
        fail(f"{config}: [agent] state_dir is {cfg.agent.state_dir}; under systemd it must be "
             f'the unit\'s StateDirectory: state_dir = "{state_dir}"')  # fmt: skip
    creds_line = f'creds = "{_CREDS_REF}/{name}.creds"'
    if cfg.nats.creds is not None and cfg.nats.creds != f"/run/credentials/mesh-agent.service/{name}.creds":
        fail(f"{config}: [nats] creds is {cfg.nats.creds}; under systemd the unit loads it with "
             f"LoadCredential=: write {creds_line}")  # fmt: skip
    if token is not None and cfg.nats.creds is None:
        fail(f"--token: {config} has no [nats] creds; add {creds_line} under [nats]")
    exe = meshctl or _this_meshctl()
    if not Path(exe).is_absolute():
        fail(f"--meshctl: {exe} is not an absolute path (systemd's ExecStart needs one)")

    prefix = prefix.resolve()
    real = prefix == Path("/")
    note = _ensure_user(create=real)
    gid = _group_gid() if real else None
    config_path = _under(prefix, f"{CONFIG_DIR}/{name}.toml")
    unit_path = _under(prefix, f"{UNIT_DIR}/{UNIT_NAME}")
    creds_dir = _under(prefix, CREDENTIALS_DIR)
    try:
        config_path.parent.mkdir(parents=True, exist_ok=True)
        creds_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(creds_dir, 0o700)
        _write(config_path, raw, 0o640)
        if gid is not None and os.geteuid() == 0:
            os.chown(config_path, 0, gid)  # the service user reads it through its group
        _write(unit_path, render_unit(exe).encode(), 0o644)
    except OSError as exc:
        fail(f"cannot install {name}: {exc.strerror or exc} ({exc.filename})")
    typer.echo(f"installed {config_path}")
    typer.echo(f"installed {unit_path} (ExecStart={exe})")
    typer.echo(f"credentials: {creds_dir}/{name}.creds (LoadCredential=)")
    if note:
        typer.echo(note)
    if token is not None:
        from mesh.cli.agent_cp import _register

        # Register as the installed config reads outside systemd: creds into the credentials
        # dir, registration into the state dir (systemd gives it to the service user at start).
        with _systemd_dirs(str(creds_dir), str(_under(prefix, state_dir))):
            _register(
                site=None, name=None, state_dir=_under(prefix, state_dir), config=config_path,
                adapters=None, operations=None, token=token, token_file=None,
                control_plane=_default_control_plane(), timeout=10.0, prefix=_default_prefix(),
            )  # fmt: skip
    reload = "systemctl daemon-reload"
    typer.echo("next:")
    if token is None and cfg.nats.creds is not None:
        typer.echo(f"  meshctl agent register --config {config_path} --token <TOKEN>")
    typer.echo(f"  {reload} && systemctl enable --now mesh-agent@{name}")
    typer.echo(f"  meshctl agent health {name}")


def _default_control_plane() -> str:
    from mesh.cli._common import DEFAULT_URL

    return DEFAULT_URL


def _default_prefix() -> str:
    from mesh.cli._common import DEFAULT_PREFIX

    return DEFAULT_PREFIX


@app.command("uninstall")
def _uninstall(
    name: Annotated[str, typer.Argument(help="The agent's name.", show_default=False)],
    prefix: Annotated[
        Path,
        typer.Option("--prefix", help="The directory install wrote under."),
    ] = Path("/"),
    purge: Annotated[
        bool,
        typer.Option("--purge", help="Also remove its state dir (outbox, inbox: undelivered data)."),
    ] = False,
) -> None:
    """Remove an installed agent's config and creds (stop it first: systemctl disable --now
    mesh-agent@NAME); the state dir stays unless --purge."""
    if "/" in name or name in ("", ".", ".."):
        fail(f"{name!r} is not an agent name")
    prefix = prefix.resolve()
    config_dir = _under(prefix, CONFIG_DIR)
    removed = []
    targets = [config_dir / f"{name}.toml", _under(prefix, CREDENTIALS_DIR) / f"{name}.creds"]
    for path in targets:
        if path.exists():
            path.unlink()
            removed.append(path)
    if not removed:
        fail(f"agent {name} is not installed under {prefix} (no {targets[0]})", code=1)
    others = sorted(config_dir.glob("*.toml"))
    unit_path = _under(prefix, f"{UNIT_DIR}/{UNIT_NAME}")
    if not others and unit_path.exists():
        unit_path.unlink()
        removed.append(unit_path)
    if purge:
        state = _under(prefix, f"{STATE_ROOT}/{name}")
        if state.exists():
            shutil.rmtree(state)
            removed.append(state)
    for path in removed:
        typer.echo(f"removed {path}")
    if not purge:
        typer.echo(f"kept {_under(prefix, f'{STATE_ROOT}/{name}')} (--purge removes it)")


_UNIT = """\
# connector-mesh agent, one instance per agent: mesh-agent@<name>.service runs the agent whose
# config is /etc/mesh/<name>.toml. `meshctl agent install --config agent.toml` puts this unit,
# the config and the agent's NATS creds in place (README: "Running on-prem (systemd)").
#
# The agent's config points at its secrets through the credentials directory:
#   [agent] state_dir = "/var/lib/mesh/<name>"
#   [nats]  creds = "${CREDENTIALS_DIRECTORY:-/etc/mesh/credentials}/<name>.creds"
# (the agent expands ${CREDENTIALS_DIRECTORY}; run by hand, the default is the source file).
# More secrets (database passwords, API tokens): one LoadCredential= line each in a drop-in,
#   systemctl edit mesh-agent@<name>, then under [Service]:
#   LoadCredential=pg-password:/etc/mesh/credentials/pg-password
# and password_file = "${CREDENTIALS_DIRECTORY:-/etc/mesh/credentials}/pg-password" in the config.

[Unit]
Description=connector-mesh agent %i
Wants=network-online.target
After=network-online.target
ConditionPathExists=/etc/mesh/%i.toml

[Service]
# READY=1 once the agent's /readyz would answer 200 (mesh/sdnotify.py); WATCHDOG=1 from its loop.
Type=notify
NotifyAccess=main
ExecStart=/opt/mesh/bin/meshctl agent run --config /etc/mesh/%i.toml
User=mesh
Group=mesh
# /var/lib/mesh/<name>: outbox, inbox, registration; systemd creates it and gives it to User=.
StateDirectory=mesh/%i
StateDirectoryMode=0700
# The agent's .creds file, readable by root only on disk; systemd hands a copy to the service
# in its private $CREDENTIALS_DIRECTORY.
LoadCredential=%i.creds:/etc/mesh/credentials/%i.creds
Restart=on-failure
RestartSec=5
# READY=1 waits for NATS; an edge agent started during a WAN outage captures into its outbox
# meanwhile, so systemd must not give up on it.
TimeoutStartSec=infinity
# More than agent.shutdown_grace (default 10 s): the agent finishes its fetched batch on SIGTERM.
KillSignal=SIGTERM
TimeoutStopSec=30
WatchdogSec=30
# Hardening.
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictSUIDSGID=yes
RestrictRealtime=yes
RestrictNamespaces=yes
LockPersonality=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
SystemCallArchitectures=native
CapabilityBoundingSet=
AmbientCapabilities=
UMask=0077

[Install]
WantedBy=multi-user.target
"""
