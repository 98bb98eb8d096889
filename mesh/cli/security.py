"""``meshctl security``: set up NATS decentralized auth for a mesh (README "Security").

* ``init DIR`` creates the operator, the SYS and MESH accounts, their keys, the admin,
  control-plane and sys credentials and the nats-server auth config with the full resolver,
  and prints how to start nats-server with it.

Errors the operator can fix print one line and exit 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mesh.cli._output import fail
from mesh.errors import MeshError

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
