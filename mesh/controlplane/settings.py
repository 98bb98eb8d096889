"""Typed settings of one control-plane replica (from ``meshctl control-plane run`` flags or TOML).

Guarantees: like the agent config, an unknown key, a wrong type or an inconsistent value raises
:class:`~mesh.errors.ConfigError` naming the source, the field path and what was expected.
Secrets are referenced: the HTTP bearer token is read from the environment variable named by
``http_token_env``, never stored here.
"""

from __future__ import annotations

import os
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any

import msgspec

from mesh.config import NatsConfig, PositiveInt, StreamsConfig, check_tls_files
from mesh.controlplane.health import HealthPolicy
from mesh.errors import ConfigError, ConfigProblem
from mesh.reconcile.schedule import ReconcileSchedule
from mesh.runs.report import DEFAULT_RUNS_MAX_AGE

__all__ = ["ControlPlaneSettings", "default_replica_name", "load_settings", "settings_from"]

PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]


def default_replica_name() -> str:
    """``<host>-<pid>``: unique per process, so two replicas never mistake each other's lease."""
    return f"{socket.gethostname()}-{os.getpid()}"


class ControlPlaneSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]+$(?!\n)", min_length=1, max_length=128)] = (
        msgspec.field(default_factory=default_replica_name)
    )
    """This replica's name (lease holder, audit ``replica``, NATS client name)."""
    nats: NatsConfig = msgspec.field(default_factory=NatsConfig)
    streams: StreamsConfig = msgspec.field(default_factory=StreamsConfig)
    """Must match the agents' (the control plane ensures the same streams, MESH_AUDIT included)."""
    subject_prefix: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$(?!\n)")] = (
        "mesh.cp"
    )
    http_host: str = "127.0.0.1"
    http_port: Port | None = 8080
    """None: no HTTP endpoint."""
    http_token_env: str | None = None
    http_tls_cert_file: str | None = None
    """PEM certificate (chain) the HTTP endpoint serves HTTPS with; needs ``http_tls_key_file``."""
    http_tls_key_file: str | None = None
    """PEM private key of ``http_tls_cert_file``."""
    """Name of the environment variable holding the bearer token the HTTP endpoint requires."""
    health: HealthPolicy = msgspec.field(default_factory=HealthPolicy)
    security_dir: str | None = None
    """The dir of ``meshctl security init`` (env MESH_SECURITY_DIR): security on. The replica
    issues enrollment tokens and agents' user JWTs, pushes revocations, and connects with
    ``creds/control-plane.creds`` unless ``nats.creds`` is set. None: security off."""
    lease_ttl: PositiveFloat = 5.0
    """Seconds without a lease renewal after which a follower takes over (failover time ~ this)."""
    lease_renew: PositiveFloat = 1.0
    sweep_interval: PositiveFloat = 1.0
    """How often health verdicts, gauges and dead-letter depths are refreshed."""
    reconcile: list[ReconcileSchedule] = []
    """``[[reconcile]]`` tables: flows the leader reconciles on an interval (see
    :mod:`mesh.reconcile.schedule`)."""
    runs_max_age: Annotated[float, msgspec.Meta(ge=0)] = DEFAULT_RUNS_MAX_AGE
    """Seconds a run record stays in the ``mesh_runs`` bucket after its last update (default 30
    days; 0: forever). Applied to the bucket at start, also when it already exists."""
    trace_transactions: PositiveInt = 20_000
    """Business transactions kept in memory from MESH_TRACE (about 1.2 KB each with three
    records: 20,000 is ~25 MB); older ones are still in the stream for ``meshctl trace``."""
    trace_rebuild: Annotated[float, msgspec.Meta(ge=0)] = 3600.0
    """Seconds of MESH_TRACE read back at start to rebuild the index (0: all it retains)."""
    series_resolution: PositiveFloat = 5.0
    """Seconds between two points of the dashboard's in-memory time series (one hour of them
    is kept per flow: 720 points at the default)."""

    def __post_init__(self) -> None:
        if (self.http_tls_cert_file is None) != (self.http_tls_key_file is None):
            raise ValueError("http_tls_cert_file and http_tls_key_file go together: give both or neither")
        if not self.lease_renew < self.lease_ttl / 2:
            raise ValueError(
                f"lease_renew ({self.lease_renew}) must be under lease_ttl/2 ({self.lease_ttl / 2})"
            )

    def http_token(self) -> str | None:
        """The bearer token, read from the environment.

        Raises:
            ConfigError: ``http_token_env`` names a variable that is not set or empty.
        """
        if self.http_token_env is None:
            return None
        value = os.environ.get(self.http_token_env)
        if not value:
            raise ConfigError(f"http_token_env: environment variable {self.http_token_env} is not set")
        return value


def settings_from(raw: dict[str, Any], *, source: str = "<flags>") -> ControlPlaneSettings:
    """Validate a plain dict (parsed TOML, or flags) into settings.

    Raises:
        ConfigError: naming ``source``, the field path and the problem.
    """
    try:
        settings = msgspec.convert(raw, ControlPlaneSettings)
    except msgspec.ValidationError as exc:
        text = str(exc)
        path = ""
        if " - at `$." in text:
            text, _, rest = text.partition(" - at `$.")
            path = rest.rstrip("`")
        raise ConfigError(f"{text[:1].lower()}{text[1:]}", source=source, path=path) from None
    problems = check_tls_files(settings.nats.tls)
    if settings.security_dir is not None:
        sec = Path(settings.security_dir).expanduser()
        if not (sec / "security.json").is_file():
            problems.append(ConfigProblem(
                "security_dir", f"{sec} is not a mesh security dir (run `meshctl security init {sec}`)"
            ))  # fmt: skip
        elif settings.nats.creds is None:
            creds = str((sec / "creds" / "control-plane.creds").absolute())
            settings = msgspec.structs.replace(
                settings, nats=msgspec.structs.replace(settings.nats, creds=creds)
            )
    for field in ("http_tls_cert_file", "http_tls_key_file"):
        value = getattr(settings, field)
        if value is not None and not Path(value).expanduser().is_file():
            problems.append(ConfigProblem(field, f"no such file: {value}"))
    if problems:
        raise ConfigError(source=source, problems=problems)
    return settings


def load_settings(path: str | Path, overrides: dict[str, Any] | None = None) -> ControlPlaneSettings:
    """Settings from a TOML file, with ``overrides`` (flags given on the command line) on top.

    Raises:
        ConfigError: unreadable file, invalid TOML or invalid settings.
    """
    file = Path(path)
    try:
        raw: dict[str, Any] = tomllib.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", source=str(file)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", source=str(file)) from None
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return settings_from(raw, source=str(file))
