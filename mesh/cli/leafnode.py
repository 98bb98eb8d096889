"""``meshctl leafnode``: set up an on-prem NATS leaf node that keeps the site working while the
WAN is down (see :mod:`mesh.leafnode` for the topology and the data path).

* ``config`` writes the leaf node's nats-server config, the hub side and the edge agents'
  ``[nats]`` section, checked by nats-server itself, and prints what to run where.
* ``link`` makes the hub's MESH_EVENTS and MESH_TRACE source a site's (once, idempotent;
  ``--watch`` keeps them prompt after outages); ``unlink`` removes those sources.

Errors the operator can fix print one line and exit 2.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import anyio
import typer

from mesh.cli._common import nats_config, talks_to_nats
from mesh.cli._output import fail
from mesh.errors import MeshError

__all__ = ["app"]

app = typer.Typer(
    help="On-prem leaf nodes: a local NATS server per site, with its own JetStream domain, "
    "connected to the cloud hub.",
    no_args_is_help=True,
)


_fail = fail


@app.command("config")
def _config(
    hub: Annotated[
        str,
        typer.Option(
            help="The hub's leaf node URL, e.g. nats-leaf://hub.example.com:7422.", show_default=False
        ),
    ],
    domain: Annotated[
        str, typer.Option(help="JetStream domain of this site's leaf node, e.g. edge.", show_default=False)
    ],
    store_dir: Annotated[
        Path, typer.Option(help="The leaf node's JetStream store directory.", show_default=False)
    ],
    out: Annotated[Path, typer.Option(help="Directory to write the files into.", show_default=False)],
    port: Annotated[
        int, typer.Option(help="Client port of the leaf node (edge agents connect here).")
    ] = 4222,
    name: Annotated[
        str | None,
        typer.Option(help="server_name of the leaf node (default: leaf-DOMAIN).", show_default=False),
    ] = None,
    listen: Annotated[str, typer.Option(help="Address the leaf node listens on for agents.")] = "127.0.0.1",
    monitor_port: Annotated[
        int, typer.Option(help="The leaf node's HTTP monitoring port on 127.0.0.1 (0: none).")
    ] = 8222,
    hub_domain: Annotated[str, typer.Option(help="JetStream domain of the hub.")] = "hub",
    hub_bind: Annotated[str, typer.Option(help="Address the hub listens on (hub.conf).")] = "0.0.0.0",
    hub_port: Annotated[int, typer.Option(help="Client port of the hub (hub.conf).")] = 4222,
    hub_store_dir: Annotated[Path, typer.Option(help="The hub's JetStream store (hub.conf).")] = Path(
        "/var/lib/nats/hub"
    ),
    sync_interval: Annotated[
        str, typer.Option(help="Leaf JetStream fsync: 'always' (no loss on power cut) or e.g. 2m.")
    ] = "always",
    credentials: Annotated[
        Path | None,
        typer.Option(
            help="Credentials file of the leaf node's link to the hub (`meshctl security issue-leaf`).",
            show_default=False,
        ),
    ] = None,
    security_dir: Annotated[
        Path | None,
        typer.Option(
            help="Mesh security dir (`meshctl security init`): both servers run its operator and the"
            " link binds to the MESH account (needs --credentials).",
            show_default=False,
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing files.")] = False,
    check: Annotated[
        bool, typer.Option("--check/--no-check", help="Have nats-server check the files (-t).")
    ] = True,
) -> None:
    """Write the leaf node config, the hub side and the edge agents' NATS settings; print what to run."""
    from mesh.leafnode import make_plan, render_instructions, write_leafnode_files

    try:
        plan = make_plan(
            hub=hub, domain=domain, store_dir=store_dir, port=port, name=name, listen=listen,
            monitor_port=monitor_port, hub_domain=hub_domain, sync_interval=sync_interval,
            credentials=credentials, hub_bind=hub_bind, hub_port=hub_port, hub_store_dir=hub_store_dir,
            security_dir=security_dir,
        )  # fmt: skip
        files = write_leafnode_files(plan, out, force=force, check=check)
    except MeshError as exc:
        _fail(exc)
        return
    typer.echo(render_instructions(plan, files), nl=False)


# The options `link` and `unlink` share (the site to source, and how to reach the hub).
_SiteDomain = Annotated[
    str, typer.Option(help="JetStream domain of the site's leaf node.", show_default=False)
]
_HubServers = Annotated[
    list[str], typer.Option(help="Hub URL (repeatable), e.g. nats://hub:4222.", show_default=False)
]
_User = Annotated[str | None, typer.Option(help="NATS user.", show_default=False)]
_PasswordEnv = Annotated[
    str | None, typer.Option(help="Environment variable holding the password.", show_default=False)
]


@app.command("link")
@talks_to_nats
def _link(
    domain: _SiteDomain,
    server: _HubServers,
    user: _User = None,
    password_env: _PasswordEnv = None,
    wait: Annotated[float, typer.Option(help="Seconds to wait for the source to become active.")] = 10.0,
    watch: Annotated[
        bool,
        typer.Option(
            "--watch",
            help="Keep running: keep the source in place and restart it when it stalls after an "
            "outage (nats-server alone retries only every 10 s to 2 min).",
        ),
    ] = False,
) -> None:
    """Make the hub's MESH_EVENTS and MESH_TRACE source the site's (idempotent; run against the hub).

    Creates the hub's mesh streams with the default settings when they do not exist yet (existing
    ones keep their settings). The site's trace records then reach the hub too, so `meshctl
    trace` and the control plane there show the steps that happened on site.
    """
    from mesh.config import StreamsConfig
    from mesh.leafnode import (
        EDGE_STREAMS,
        SourceStatus,
        edge_source_status,
        ensure_edge_sourcing,
        watch_edge_sourcing,
    )
    from mesh.transport import EVENTS_STREAM, JetStream

    async def run() -> None:
        cfg = nats_config(server, user=user, password_env=password_env)
        async with JetStream(cfg, name="meshctl-leafnode-link") as js:
            changed = await ensure_edge_sourcing(js, domain, streams=StreamsConfig())
            verb = "now sources" if changed else "already sources"
            names = " and ".join(EDGE_STREAMS)
            typer.echo(f"hub {verb} {names} of domain {domain!r} (into its streams of the same names)")
            deadline = time.monotonic() + wait
            status = await edge_source_status(js, domain)
            while time.monotonic() < deadline and (status is None or status.active is None or status.error):
                await anyio.sleep(0.25)
                status = await edge_source_status(js, domain)
            if status is not None and status.active is not None and not status.error:
                typer.echo(f"{EVENTS_STREAM} source active: lag {status.lag} message(s)")
            else:
                why = status.error if status and status.error else "the leaf node is not connected yet"
                typer.secho(
                    f"warning: source not active yet ({why}); the hub catches up once the leaf connects",
                    fg=typer.colors.YELLOW, err=True,
                )  # fmt: skip
            for stream in EDGE_STREAMS:
                if stream != EVENTS_STREAM and (st := await edge_source_status(js, domain, stream=stream)):
                    state = f"error: {st.error}" if st.error else f"lag {st.lag} message(s)"
                    typer.echo(f"{stream} source: {state}")
            if watch:

                def restarted(status: SourceStatus | None) -> None:
                    which = status.stream if status is not None else "a"
                    typer.echo(f"restarted the stalled source from domain {domain!r}: {which} ({status})")

                typer.echo(f"watching the sources from domain {domain!r} (Ctrl-C stops)")
                await watch_edge_sourcing(js, domain, on_restart=restarted)

    try:
        anyio.run(run)
    except MeshError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


@app.command("unlink")
@talks_to_nats
def _unlink(
    domain: _SiteDomain,
    server: _HubServers,
    user: _User = None,
    password_env: _PasswordEnv = None,
) -> None:
    """Stop sourcing a site into the hub (undoes `link`; idempotent; run against the hub).

    What the hub already holds stays; the site's streams are untouched. Stop a `link --watch`
    for the site first, or it puts the sources back.
    """
    from mesh.leafnode import remove_edge_sourcing
    from mesh.transport import JetStream

    async def run() -> list[str]:
        cfg = nats_config(server, user=user, password_env=password_env)
        async with JetStream(cfg, name="meshctl-leafnode-unlink") as js:
            return await remove_edge_sourcing(js, domain)

    try:
        removed = anyio.run(run)
    except MeshError as exc:
        _fail(exc)
        return
    if removed:
        typer.echo(f"hub no longer sources {' and '.join(removed)} of domain {domain!r}")
    else:
        typer.echo(f"the hub does not source domain {domain!r}: nothing to do")
