"""``meshctl security``: set up NATS decentralized auth for a mesh (README "Security").

* ``init DIR`` creates the operator, the SYS and MESH accounts, their keys, the admin,
  control-plane and sys credentials and the nats-server auth config with the full resolver,
  and prints how to start nats-server with it.
* ``issue-agent --config agent.toml --dir DIR`` writes the least-privilege ``.creds`` of an agent
  that runs the static flows of its config without a control plane (on-prem, tests).
* ``issue-orchestrator --config orchestrator.toml --dir DIR`` writes the least-privilege
  ``.creds`` of a saga orchestrator (README "Orchestration (sagas)").
* ``issue-leaf --dir DIR --domain D --out PATH`` writes the ``.creds`` a site's leaf node uses
  for its link to the hub (``meshctl leafnode config --credentials``).

Errors the operator can fix print one line and exit 2.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mesh.cli._output import fail
from mesh.errors import MeshError
from mesh.security.permissions import DEFAULT_PREFIX

if TYPE_CHECKING:
    from mesh.security.jwt import Permissions

__all__ = ["app"]

app = typer.Typer(help="NATS identities: operator, accounts, credentials.", no_args_is_help=True)


@app.command("init")
def _init(
    directory: Annotated[Path, typer.Argument(help="Directory to create the keys and files in.")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite a directory that is not empty.")] = False,
    resolver_dir: Annotated[
        Path | None,
        typer.Option(help="Where nats-server keeps account JWTs (default DIR/resolver).", show_default=False),
    ] = None,
) -> None:
    """Create a new operator, accounts and credentials in DIR (dirs 0700, files 0600)."""
    from mesh.security.setup import init_security_dir

    try:
        written = init_security_dir(directory, force=force, resolver_dir=resolver_dir)
    except MeshError as exc:
        fail(exc)
    except OSError as exc:
        fail(f"cannot write {directory}: {exc.strerror or exc}")
    root = directory.absolute()
    typer.echo(f"wrote {len(written)} files in {root}:")
    for path in written:
        typer.echo(f"  {path.relative_to(root)}")
    typer.echo(
        "\nKeep keys/ secret; keys/operator.nk is only needed to re-sign the operator and can be"
        " kept offline."
        f"\nStart nats-server with it: add `include {root / 'nats-auth.conf'}` to your"
        " nats-server config (beside jetstream {store_dir: ...}), or"
        f"\n  nats-server -js -sd STORE_DIR -c {root / 'nats-auth.conf'}"
        f"\nOperators then run meshctl with --creds {root / 'creds' / 'admin.creds'}"
        f" (or MESH_CREDS={root / 'creds' / 'admin.creds'});"
        f" the control plane uses creds/control-plane.creds and creds/sys.creds."
    )


_Dir = Annotated[Path, typer.Option("--dir", help="The security dir (`meshctl security init`).")]
_Out = Annotated[
    Path | None,
    typer.Option(
        "--out",
        help="Where to write the .creds (default: the config's [nats] creds).",
        show_default=False,
    ),
]


def _creds_path(config: Path, out: Path | None, creds: str | None) -> Path:
    """``--out``, else the config's ``[nats] creds``; exits 2 (one line) when neither is set."""
    target = out if out is not None else (Path(creds) if creds else None)
    if target is None:
        fail(f"{config}: no [nats] creds path in the config: pass --out PATH or set [nats] creds")
    return target


def _write_user(directory: Path, target: Path, name: str, perms: Permissions) -> Path:
    """Sign user ``name`` with ``perms`` by the authority in ``directory`` and write its .creds
    to ``target`` (0600). The key a creds file at ``target`` already holds is kept (same identity,
    new permissions); anything else there is replaced by a new key.

    Raises:
        MeshError: the security dir cannot be read. OSError: the file cannot be written.
    """
    from mesh.security.authority import Authority, read_creds, write_creds
    from mesh.security.jwt import InvalidToken, new_seed, public_key_of_seed

    authority = Authority.load(directory)
    seed: bytes | str = new_seed("user")
    if target.exists():
        with contextlib.suppress(InvalidToken):
            seed = read_creds(target).seed
    jwt = authority.issue_user(name, public_key_of_seed(seed), perms)
    return write_creds(target, jwt, seed)


def _wrote(
    config: Path,
    kind: str,
    name: str,
    path: Path,
    perms: Permissions,
    configured: str | None,
    *,
    unset_ok: bool,
) -> None:
    """Warn when the config's ``[nats] inbox_prefix`` is not the one the creds allow (unset too,
    unless ``unset_ok``), then say what was written."""
    from mesh.security.permissions import inbox_prefix

    wanted = inbox_prefix(name)
    if configured != wanted and not (unset_ok and configured is None):
        typer.secho(
            f"warning: {config}: [nats] inbox_prefix is {configured!r}; these creds only"
            f" receive replies on {wanted!r}",
            fg=typer.colors.YELLOW,
            err=True,
        )
    typer.echo(
        f"wrote {path} for {kind} {name}: publishes {len(perms.pub.allow)} subjects,"
        f" subscribes {len(perms.sub.allow)}"
    )


@app.command("issue-agent")
def _issue_agent(
    config: Annotated[Path, typer.Option("--config", "-c", help="The agent's config file (TOML).")],
    directory: _Dir,
    out: _Out = None,
    prefix: Annotated[
        str,
        typer.Option(
            "--subject-prefix", envvar="MESH_CP_PREFIX", help="Control-plane subject prefix.", hidden=True
        ),
    ] = DEFAULT_PREFIX,
) -> None:
    """Write the .creds of the agent in --config, allowed exactly what its static flows need.

    For an agent run without a control plane: it may publish events of its own system (flows
    with a source), consume its own durable consumers (flows with a sink), dead-letter into its
    flows' DLQ subjects, and nothing else (README "Security", permission table). The agent's key
    is kept when the file already holds one (re-issue after a flow change); the file is 0600.
    Set ``[nats] inbox_prefix = "_INBOX.<agent name>"`` in the agent config.
    """
    from mesh.config import load_agent_config
    from mesh.security.permissions import permissions_for_agent

    try:
        cfg = load_agent_config(config)
        target = _creds_path(config, out, cfg.nats.creds)
        perms = permissions_for_agent(cfg, prefix)
        path = _write_user(directory, target, cfg.agent.name, perms)
    except MeshError as exc:
        fail(exc)
    except OSError as exc:
        fail(f"cannot write the creds of agent {config}: {exc.strerror or exc}")
    _wrote(config, "agent", cfg.agent.name, path, perms, cfg.nats.inbox_prefix, unset_ok=True)


@app.command("issue-leaf")
def _issue_leaf(
    directory: _Dir,
    domain: Annotated[
        str, typer.Option(help="JetStream domain of the site's leaf node.", show_default=False)
    ],
    out: Annotated[Path, typer.Option("--out", help="Where to write the .creds.", show_default=False)],
) -> None:
    """Write the .creds of a site's leaf node for its link to the hub (user leaf-DOMAIN).

    The link binds the leaf's MESH account to the hub's: the user may carry the whole account
    (the stream subjects never cross: the leaf's remote denies them both ways; events reach the
    hub only by stream sourcing). Keep the file on the site, 0600.
    """
    from mesh.security.permissions import admin_permissions, validate_token

    try:
        name = f"leaf-{validate_token(domain, 'domain')}"
        path = _write_user(directory, out, name, admin_permissions())
    except MeshError as exc:
        fail(exc)
    except OSError as exc:
        fail(f"cannot write {out}: {exc.strerror or exc}")
    typer.echo(f"wrote {path} (user {name}): pass it to `meshctl leafnode config --credentials`")


@app.command("issue-orchestrator")
def _issue_orchestrator(
    config: Annotated[Path, typer.Option("--config", "-c", help="The orchestrator config (TOML).")],
    directory: _Dir,
    out: _Out = None,
) -> None:
    """Write the .creds of the orchestrator in --config, allowed exactly what its sagas need.

    It may read and write the saga bucket mesh_sagas, bind its sagas' trigger consumers
    (saga-<name>), call system APIs (api.>), publish its publish_await commands, dead-letter
    into dlq.saga.<name>, and nothing else (README "Security", permission table). Re-issue after
    adding a saga. Set ``[nats] inbox_prefix = "_INBOX.<orchestrator name>"`` in the config.
    """
    from mesh.saga.definition import load_orchestrator_config
    from mesh.security.permissions import permissions_for_orchestrator

    try:
        cfg = load_orchestrator_config(config)
        target = _creds_path(config, out, cfg.nats.creds)
        perms = permissions_for_orchestrator(cfg)
        path = _write_user(directory, target, cfg.orchestrator.name, perms)
    except MeshError as exc:
        fail(exc)
    except OSError as exc:
        fail(f"cannot write the creds of orchestrator {config}: {exc.strerror or exc}")
    _wrote(config, "orchestrator", cfg.orchestrator.name, path, perms, cfg.nats.inbox_prefix, unset_ok=False)
