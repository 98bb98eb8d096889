"""``meshctl control-plane run|status``: run a control-plane replica, or ask one how it is.

``run`` takes its settings from flags, optionally on top of a TOML file (``--config``; its keys
are those of :class:`~mesh.controlplane.settings.ControlPlaneSettings`). Run several replicas
against the same NATS: one leads, the others serve reads and HTTP and take over within about
``--lease-ttl`` seconds when the leader dies. Bad settings print one line and exit 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer

from mesh.cli._common import (
    DEFAULT_PREFIX,
    DEFAULT_URL,
    ControlPlaneOpt,
    JsonOpt,
    PrefixOpt,
    TimeoutOpt,
    ago,
    fail,
    nats_access,
    run_with_client,
    table,
)
from mesh.cli._output import command_group, echo_json
from mesh.errors import ConfigError, MeshError

__all__ = ["app", "parse_http_address"]

app = command_group(
    "control-plane", "Run the control plane (registry, health, leader election, HTTP status endpoint)."
)


def parse_http_address(text: str) -> tuple[str, int] | None:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6) -> (host, port); ``off`` -> None.

    Raises:
        ConfigError: not an address.
    """
    if text.strip().lower() in ("off", "none", ""):
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--http: expected HOST:PORT or off, got {text!r}")
    return (host.strip("[]") or "127.0.0.1"), int(port)


def _opt(help: str) -> Any:
    return typer.Option(help=help, show_default=False)


@app.command("run")
def _run(
    nats: Annotated[
        str | None,
        typer.Option(
            "--nats",
            envvar="MESH_NATS_URL",
            help="NATS URL(s), comma-separated (env MESH_NATS_URL).",
            show_default=False,
        ),
    ] = None,
    http: Annotated[
        str | None,
        typer.Option(
            "--http", help="HTTP status endpoint HOST:PORT, or off [127.0.0.1:8080].", show_default=False
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Replica name [HOST-PID].", show_default=False)
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Settings file (TOML).", show_default=False)
    ] = None,
    stale_after: Annotated[
        float | None, _opt("Seconds without heartbeat before an agent is stale [15].")
    ] = None,
    lost_after: Annotated[
        float | None, _opt("Seconds without heartbeat before an agent is lost [60].")
    ] = None,
    max_outbox_age: Annotated[float | None, _opt("Outbox age that makes an agent degraded [300].")] = None,
    lease_ttl: Annotated[
        float | None, _opt("Leader lease: seconds without renewal before takeover [5].")
    ] = None,
    lease_renew: Annotated[float | None, _opt("Leader lease: seconds between renewals [1].")] = None,
    http_token_env: Annotated[
        str | None, _opt("Environment variable holding a bearer token the HTTP endpoint requires.")
    ] = None,
    http_tls_cert: Annotated[
        str | None, _opt("PEM certificate: serve the HTTP endpoint as HTTPS (with --http-tls-key).")
    ] = None,
    http_tls_key: Annotated[str | None, _opt("PEM key of --http-tls-cert.")] = None,
    subject_prefix: Annotated[str | None, _opt("Control-plane subject prefix [mesh.cp].")] = None,
    security_dir: Annotated[
        str | None,
        typer.Option(
            "--security-dir",
            envvar="MESH_SECURITY_DIR",
            help="Dir of `meshctl security init`: security on (enrollment tokens, agents' JWTs, "
            "revocations; connects with its creds/control-plane.creds unless --creds) "
            "(env MESH_SECURITY_DIR).",
            show_default=False,
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    log_format: Annotated[str, typer.Option(help="text, or json (one JSON object per line).")] = "text",
) -> None:
    """Run one control-plane replica until SIGTERM or Ctrl-C."""
    from agents.control_plane import run_control_plane_process
    from mesh.controlplane.settings import load_settings, settings_from
    from mesh.logs import setup_logging

    raw: dict[str, Any] = {}
    if nats is not None:
        raw["nats"] = {"servers": [u.strip() for u in nats.split(",") if u.strip()]}
    access = nats_access()  # --creds / --tls-* (over the settings file's [nats])
    if access.creds is not None:
        raw.setdefault("nats", {})["creds"] = access.creds
    if access.tls is not None:
        raw.setdefault("nats", {})["tls"] = msgspec.to_builtins(access.tls)
    try:
        if http is not None:
            address = parse_http_address(http)
            raw["http_port"] = None if address is None else address[1]
            if address is not None:
                raw["http_host"] = address[0]
        for key, value in (
            ("name", name),
            ("lease_ttl", lease_ttl),
            ("lease_renew", lease_renew),
            ("http_token_env", http_token_env),
            ("http_tls_cert_file", http_tls_cert),
            ("http_tls_key_file", http_tls_key),
            ("subject_prefix", subject_prefix),
            ("security_dir", None if security_dir is None else str(Path(security_dir).absolute())),
        ):
            if value is not None:
                raw[key] = value
        health = {
            k: v
            for k, v in (
                ("stale_after", stale_after),
                ("lost_after", lost_after),
                ("max_outbox_age", max_outbox_age),
            )
            if v is not None
        }
        if health:
            raw["health"] = health
        settings = load_settings(config, raw) if config is not None else settings_from(raw)
        settings.http_token()  # a missing secret is a config error now, not at the first request
    except ConfigError as exc:
        fail(exc)
    if log_format not in ("text", "json"):
        fail(ConfigError(f"--log-format: expected text or json, got {log_format!r}"))
    setup_logging(log_level, fmt="json" if log_format == "json" else "text")
    try:
        run_control_plane_process(settings)
    except MeshError as exc:
        fail(exc)


@app.command("status")
def _status(
    as_json: JsonOpt = False,
    control_plane: ControlPlaneOpt = DEFAULT_URL,
    timeout: TimeoutOpt = 5.0,
    prefix: PrefixOpt = DEFAULT_PREFIX,
) -> None:
    """Ask a replica for the status document: leader, agents by health, flows."""
    report = run_with_client(control_plane, timeout, prefix, lambda c: c.status())
    if as_json:
        echo_json(report)
        return
    cp = report.control_plane
    typer.echo(f"answered by {cp.replica}; leader: {cp.leader or 'none'}; version {cp.version}")
    typer.echo("agents: " + ", ".join(f"{v} {k}" for k, v in report.counts.items()))
    if report.flows:
        table(
            ("FLOW", "STATE", "AGENTS", "BACKLOG", "PENDING", "LAG (s)", "DLQ"),
            [
                (
                    f.name,
                    f.state,
                    ",".join(f.agents) or "-",
                    f.backlog,
                    f.consumer_pending,
                    f"{f.lag_seconds:.1f}",
                    f.dlq_depth,
                )
                for f in report.flows
            ],
        )
    stale = [a for a in report.agents if a.health != "healthy"]
    for a in stale:
        typer.echo(f"  {a.name}: {a.health} (last heartbeat {ago(a.last_heartbeat)}) {a.reason}")
