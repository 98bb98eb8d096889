"""``meshctl security init DIR``: create a mesh's operator, accounts, keys and credentials, and
render nats-server configs that trust them.

Layout of DIR (dirs 0700, files 0600)::

    operator.jwt                       the operator (lists operator-signing, names SYS)
    keys/{operator,operator-signing,sys-account,mesh-account,mesh-account-signing}.nk  seeds
    creds/{admin,control-plane,sys}.creds
    accounts/{SYS,MESH}.jwt
    security.json                      the public keys
    nats-auth.conf                     operator, system_account, full resolver, preload

:func:`server_config` renders a complete nats-server config (listen, JetStream store, optional
TLS, and the auth above) for a security dir.
"""

from __future__ import annotations

import json
from pathlib import Path

import msgspec

from mesh.errors import ConfigError
from mesh.security._files import private_dir, write_private
from mesh.security.authority import SecurityKeys, creds_text, mesh_account_claims
from mesh.security.jwt import (
    AccountClaims,
    AccountLimits,
    Claims,
    OperatorClaims,
    UserClaims,
    encode,
    new_seed,
    public_key_of_seed,
)
from mesh.security.permissions import admin_permissions, control_plane_permissions

__all__ = ["auth_config", "init_security_dir", "server_config"]

_KEY_NAMES = {
    "operator": "operator",
    "operator-signing": "operator",
    "sys-account": "account",
    "mesh-account": "account",
    "mesh-account-signing": "account",
}


def _q(value: str | Path) -> str:
    return json.dumps(str(value))


def init_security_dir(
    directory: str | Path, *, force: bool = False, resolver_dir: str | Path | None = None
) -> list[Path]:
    """Create a new operator, SYS and MESH accounts, their keys and the admin, control-plane
    and sys credentials in ``directory``; returns the files written.

    ``resolver_dir`` is where nats-server keeps account JWTs (default ``DIR/resolver``).

    Raises:
        ConfigError: ``directory`` exists and is not empty (unless ``force``), or is not a dir.
    """
    d = Path(directory).absolute()
    if d.exists() and not d.is_dir():
        raise ConfigError(f"{d} exists and is not a directory")
    if d.exists() and any(d.iterdir()) and not force:
        raise ConfigError(f"{d} is not empty: choose an empty directory or pass --force to overwrite it")
    for sub in ("", "keys", "creds", "accounts"):
        private_dir(d / sub, tighten=True)
    seeds = {name: new_seed(kind) for name, kind in _KEY_NAMES.items()}
    pk = {name: public_key_of_seed(seed) for name, seed in seeds.items()}
    keys = SecurityKeys(
        operator=pk["operator"],
        operator_signing_key=pk["operator-signing"],
        system_account=pk["sys-account"],
        mesh_account=pk["mesh-account"],
        mesh_account_signing_key=pk["mesh-account-signing"],
    )
    written: list[Path] = []

    def write(rel: str, text: str) -> None:
        written.append(write_private(d / rel, text))

    for name, seed in seeds.items():
        write(f"keys/{name}.nk", seed.decode() + "\n")
    operator_jwt = encode(
        Claims(
            sub=keys.operator,
            iss=keys.operator,
            name="mesh-operator",
            nats=OperatorClaims(signing_keys=[keys.operator_signing_key], system_account=keys.system_account),
        ),
        seeds["operator"],
    )
    write("operator.jwt", operator_jwt + "\n")
    sys_jwt = encode(
        Claims(
            sub=keys.system_account,
            iss=keys.operator_signing_key,
            name="SYS",
            nats=AccountClaims(limits=AccountLimits(mem_storage=0, disk_storage=0, streams=0, consumer=0)),
        ),
        seeds["operator-signing"],
    )
    mesh_jwt = encode(mesh_account_claims(keys), seeds["operator-signing"])
    write("accounts/SYS.jwt", sys_jwt + "\n")
    write("accounts/MESH.jwt", mesh_jwt + "\n")
    for user, perms in (("admin", admin_permissions()), ("control-plane", control_plane_permissions())):
        seed = new_seed("user")
        claims = Claims(
            sub=public_key_of_seed(seed),
            iss=keys.mesh_account_signing_key,
            name=user,
            nats=UserClaims(pub=perms.pub, sub=perms.sub, issuer_account=keys.mesh_account),
        )
        write(f"creds/{user}.creds", creds_text(encode(claims, seeds["mesh-account-signing"]), seed))
    sys_seed = new_seed("user")
    sys_user = Claims(
        sub=public_key_of_seed(sys_seed), iss=keys.system_account, name="sys", nats=UserClaims()
    )
    write("creds/sys.creds", creds_text(encode(sys_user, seeds["sys-account"]), sys_seed))
    write("security.json", msgspec.json.format(msgspec.json.encode(keys)).decode() + "\n")
    resolver = Path(resolver_dir).absolute() if resolver_dir is not None else d / "resolver"
    write("nats-auth.conf", auth_config(d, resolver))
    return written


def auth_config(security_dir: str | Path, resolver_dir: str | Path) -> str:
    """The auth part of a nats-server config: operator, system account, the full NATS-based
    resolver in ``resolver_dir`` (account updates and revocations apply at once, without a
    restart) and the SYS and MESH account JWTs preloaded.

    Raises:
        ConfigError: ``security_dir`` lacks security.json or an account JWT.
    """
    d = Path(security_dir).absolute()
    try:
        keys = msgspec.json.decode((d / "security.json").read_bytes(), type=SecurityKeys)
        sys_jwt = (d / "accounts" / "SYS.jwt").read_text().strip()
        mesh_jwt = (d / "accounts" / "MESH.jwt").read_text().strip()
    except (OSError, msgspec.DecodeError) as exc:
        raise ConfigError(f"{d} is not a complete mesh security dir: {exc}") from None
    return (
        "# Mesh NATS auth (meshctl security init): decentralized JWT auth, full resolver.\n"
        f"operator: {_q(d / 'operator.jwt')}\n"
        f"system_account: {keys.system_account}\n"
        "resolver: {\n"
        "  type: full\n"
        f"  dir: {_q(Path(resolver_dir).absolute())}\n"
        "  allow_delete: false\n"
        '  interval: "2m"\n'
        '  timeout: "1.9s"\n'
        "}\n"
        "resolver_preload: {\n"
        f"  {keys.system_account}: {_q(sys_jwt)}\n"
        f"  {keys.mesh_account}: {_q(mesh_jwt)}\n"
        "}\n"
    )


def server_config(
    security_dir: str | Path,
    *,
    resolver_dir: str | Path,
    store_dir: str | Path,
    port: int = 4222,
    host: str = "127.0.0.1",
    monitor_port: int | None = None,
    server_name: str | None = None,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
    tls_ca: str | Path | None = None,
    tls_verify: bool = False,
) -> str:
    """A complete nats-server config: listen address, JetStream in ``store_dir``, the auth of
    ``security_dir`` (:func:`auth_config`) and, with ``tls_cert``/``tls_key``, TLS (``tls_ca``
    and ``tls_verify`` require client certificates: mutual TLS).

    Raises:
        ConfigError: an incomplete security dir, or only one of ``tls_cert``/``tls_key``.
    """
    lines = [
        f"server_name: {_q(server_name or f'mesh-{port}')}",
        f"listen: {_q(f'{host}:{port}')}",
    ]
    if monitor_port is not None:
        lines.append(f"http: {_q(f'{host}:{monitor_port}')}")
    lines.append(f"jetstream: {{ store_dir: {_q(Path(store_dir).absolute())} }}")
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("nats-server TLS needs both a certificate and a key file")
    if tls_cert is not None and tls_key is not None:
        tls = [f"  cert_file: {_q(Path(tls_cert).absolute())}", f"  key_file: {_q(Path(tls_key).absolute())}"]
        if tls_ca is not None:
            tls.append(f"  ca_file: {_q(Path(tls_ca).absolute())}")
        if tls_verify:
            tls.append("  verify: true")
        lines += ["tls: {", *tls, "}"]
    private_dir(Path(resolver_dir))
    return "\n".join(lines) + "\n" + auth_config(security_dir, resolver_dir)
