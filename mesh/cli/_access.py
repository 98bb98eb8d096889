"""NATS access options of ``meshctl``: :func:`add_nats_options` gives every command that talks to
NATS (one with an option read from ``MESH_NATS_URL``, or marked with :func:`talks_to_nats`) the
options ``--creds`` (env ``MESH_CREDS``) and ``--tls-ca/--tls-cert/--tls-key`` (env
``MESH_TLS_CA``, ``MESH_TLS_CERT``, ``MESH_TLS_KEY``), checked before the command runs (a missing
file is one line naming it, exit 2); :func:`nats_config` and :func:`connection` put them into
every connection the command makes. Re-exported by :mod:`mesh.cli._common`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_type_hints

import msgspec
import typer
from typer.models import OptionInfo

from mesh.cli._output import fail
from mesh.config import NatsConfig, TlsConfig
from mesh.transport import JetStream

__all__ = [
    "NATS_ACCESS_OPTIONS",
    "CredsOpt",
    "NatsAccess",
    "TlsCaOpt",
    "TlsCertOpt",
    "TlsKeyOpt",
    "add_nats_options",
    "connection",
    "nats_access",
    "nats_access_defaults",
    "nats_config",
    "talks_to_nats",
]

_T = TypeVar("_T")

CredsOpt = Annotated[
    str | None,
    typer.Option(
        "--creds",
        envvar="MESH_CREDS",
        help="NATS credentials file (.creds: user JWT + seed) (env MESH_CREDS).",
        show_default=False,
    ),
]
TlsCaOpt = Annotated[
    str | None,
    typer.Option(
        "--tls-ca",
        envvar="MESH_TLS_CA",
        help="PEM CA that signed the NATS server's certificate (env MESH_TLS_CA); turns TLS on.",
        show_default=False,
    ),
]
TlsCertOpt = Annotated[
    str | None,
    typer.Option(
        "--tls-cert",
        envvar="MESH_TLS_CERT",
        help="PEM client certificate for mutual TLS, with --tls-key (env MESH_TLS_CERT).",
        show_default=False,
    ),
]
TlsKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--tls-key",
        envvar="MESH_TLS_KEY",
        help="PEM key of --tls-cert (env MESH_TLS_KEY).",
        show_default=False,
    ),
]

NATS_ACCESS_OPTIONS = {"creds": CredsOpt, "tls_ca": TlsCaOpt, "tls_cert": TlsCertOpt, "tls_key": TlsKeyOpt}
"""The parameters :func:`add_nats_options` adds, by name."""


@dataclass(frozen=True)
class NatsAccess:
    """The credentials and TLS settings a command connects with (None: not given)."""

    creds: str | None = None
    tls: TlsConfig | None = None


_ACCESS: ContextVar[NatsAccess | None] = ContextVar("meshctl_nats_access", default=None)


def nats_access() -> NatsAccess:
    """The ``--creds``/``--tls-*`` values of the running command (checked; paths absolute)."""
    return _ACCESS.get() or NatsAccess()


def nats_access_defaults(nats: NatsConfig) -> None:
    """Fill what the command line left unset from an agent's ``[nats]`` (``--config``)."""
    access = nats_access()
    _ACCESS.set(NatsAccess(creds=access.creds or nats.creds, tls=access.tls or nats.tls))


def nats_config(servers: list[str], **fields: Any) -> NatsConfig:
    """A :class:`NatsConfig` for ``servers`` with the running command's creds and TLS."""
    access = nats_access()
    return NatsConfig(servers=servers, creds=access.creds, tls=access.tls, **fields)


def _access_from_options(
    creds: str | None, tls_ca: str | None, tls_cert: str | None, tls_key: str | None
) -> NatsAccess:
    """Check the options (files exist, cert and key together); a problem exits 2 with one line."""
    for option, value in (
        ("--creds", creds),
        ("--tls-ca", tls_ca),
        ("--tls-cert", tls_cert),
        ("--tls-key", tls_key),
    ):
        if value is not None and not Path(value).expanduser().is_file():
            env = "MESH_" + option.removeprefix("--").replace("-", "_").upper()
            fail(f"{option} ({env}): no such file: {value}")
    if (tls_cert is None) != (tls_key is None):
        fail("--tls-cert and --tls-key go together (mutual TLS): give both or neither")

    def absolute(value: str | None) -> str | None:
        return None if value is None else str(Path(value).expanduser().resolve())

    tls = None
    if tls_ca is not None or tls_cert is not None:
        tls = TlsConfig(ca_file=absolute(tls_ca), cert_file=absolute(tls_cert), key_file=absolute(tls_key))
    return NatsAccess(creds=absolute(creds), tls=tls)


def talks_to_nats(command: Callable[..., _T]) -> Callable[..., _T]:
    """Mark a command that connects to NATS without a ``MESH_NATS_URL`` option, so that
    :func:`add_nats_options` gives it the access options too."""
    command.__dict__["__meshctl_nats__"] = True
    return command


def _has_nats_url_option(command: Callable[..., Any]) -> bool:
    if command.__dict__.get("__meshctl_nats__"):
        return True
    try:
        hints = get_type_hints(command, include_extras=True)
    except (NameError, TypeError):
        return False
    for hint in hints.values():
        for info in getattr(hint, "__metadata__", ()):
            if isinstance(info, OptionInfo):
                envvar = info.envvar
                names = [envvar] if isinstance(envvar, str) else list(envvar or [])
                if "MESH_NATS_URL" in names:
                    return True
    return False


def _with_access_options(command: Callable[..., Any]) -> Callable[..., Any]:
    hints = get_type_hints(command, include_extras=True)
    signature = inspect.signature(command)
    params = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in signature.parameters.values()]
    taken = {p.name for p in params}
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=hint)
        for name, hint in NATS_ACCESS_OPTIONS.items()
        if name not in taken
    ]

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(name, None) for name in NATS_ACCESS_OPTIONS if name not in taken}
        token = _ACCESS.set(_access_from_options(**values))
        try:
            return command(*args, **kwargs)
        finally:
            _ACCESS.reset(token)

    wrapper.__signature__ = signature.replace(parameters=[*params, *added])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in [*params, *added]}
    wrapper.__dict__["__meshctl_nats_wrapped__"] = True
    del wrapper.__wrapped__  # typer must see the new signature, not the command's
    return wrapper


def add_nats_options(app: typer.Typer) -> None:
    """Give every command of ``app`` and its sub-apps that talks to NATS the ``--creds`` and
    ``--tls-*`` options (see the module doc). Idempotent; call once the command tree is built."""
    for info in app.registered_commands:
        callback = info.callback
        if callback is None or callback.__dict__.get("__meshctl_nats_wrapped__"):
            continue
        if _has_nats_url_option(callback):
            info.callback = _with_access_options(callback)
    for group in app.registered_groups:
        if group.typer_instance is not None:
            add_nats_options(group.typer_instance)


def connection(
    url: str,
    timeout: float,
    name: str = "meshctl",
    *,
    creds: str | None = None,
    inbox_prefix: str | None = None,
) -> JetStream:
    """A JetStream for ``url`` with the command's ``--creds``/``--tls-*`` (``async with`` it).

    ``creds`` replaces the command's creds (an agent registering with its enrollment token or
    its own creds file) and ``inbox_prefix`` its reply subjects (``_INBOX.<agent>``: the only
    inbox such creds may subscribe to)."""
    cfg = nats_config(
        [url], connect_timeout=min(timeout, 2.0), request_timeout=timeout, inbox_prefix=inbox_prefix
    )
    if creds is not None:
        cfg = msgspec.structs.replace(cfg, creds=creds)
    return JetStream(cfg, name=name)
