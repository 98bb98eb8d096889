"""TLS for NATS clients: the SSL context built from ``[nats.tls]`` and one-line reasons for the
handshake failures an operator can fix (unknown CA, missing client certificate, wrong name)."""

from __future__ import annotations

import ssl
from urllib.parse import urlsplit

from nats.aio.client import Client

from mesh.config import NatsConfig, TlsConfig, check_tls_files
from mesh.errors import ConfigError

__all__ = [
    "client_cert_missing",
    "client_ssl_context",
    "describe_tls_failure",
    "server_requires_tls",
    "wants_tls",
]


def wants_tls(cfg: NatsConfig) -> bool:
    """True when the connection must be TLS: ``[nats.tls]`` is set or a server URL is ``tls://``."""
    return cfg.tls is not None or any(urlsplit(s).scheme == "tls" for s in cfg.servers)


def client_ssl_context(tls: TlsConfig | None) -> ssl.SSLContext:
    """A client context that verifies the server's certificate and hostname (against
    ``tls.ca_file``, else the system's CAs), accepts TLS 1.2 and later only, and presents
    ``cert_file``/``key_file`` when given (mutual TLS).

    Raises:
        ConfigError: a named file is missing, or is not a PEM certificate/key (``nats.tls.<field>``).
    """
    tls = tls or TlsConfig()
    problems = check_tls_files(tls)
    if problems:
        raise ConfigError(problems=problems)
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.ca_file is not None:
        try:
            context.load_verify_locations(cafile=tls.ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"not a PEM CA certificate: {tls.ca_file} ({exc})", path="nats.tls.ca_file"
            ) from None
    if tls.cert_file is not None and tls.key_file is not None:
        try:
            context.load_cert_chain(tls.cert_file, tls.key_file)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"cannot load the client certificate {tls.cert_file} with key {tls.key_file} ({exc})",
                path="nats.tls.cert_file",
            ) from None
    return context


_CLIENT_CERT_REQUIRED = (
    "the server requires a client certificate (mutual TLS): give one with --tls-cert and "
    "--tls-key, MESH_TLS_CERT and MESH_TLS_KEY, or [nats.tls] cert_file and key_file"
)


def client_cert_missing(nc: Client, cfg: NatsConfig) -> str | None:
    """The reason of a failed connect when the server announced ``tls_verify`` (it requires a
    client certificate) and none is configured: with TLS 1.3 the server's refusal arrives after
    the handshake, often as a plain connection reset; None otherwise."""
    info = getattr(nc, "_server_info", None) or {}
    if info.get("tls_verify") and (cfg.tls is None or cfg.tls.cert_file is None):
        return _CLIENT_CERT_REQUIRED
    return None


def describe_tls_failure(exc: ssl.SSLError, cfg: NatsConfig) -> str:
    """What went wrong in a failed TLS handshake, in words an operator can act on."""
    tls = cfg.tls or TlsConfig()
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = exc.verify_message or str(exc)
        if exc.verify_code == 62 or "mismatch" in message.lower():
            return (
                f"the server's certificate does not name the host in the server URL "
                f"({message}): connect by a name the certificate lists, or set [nats.tls] server_name"
            )
        if tls.ca_file is not None:
            return f"the server's certificate is not signed by {tls.ca_file} ({message})"
        return (
            f"the server's certificate is not signed by a CA this host trusts ({message}): "
            "give its CA with --tls-ca, MESH_TLS_CA or [nats.tls] ca_file"
        )
    reason = (exc.reason or str(exc)).upper()
    if "CERTIFICATE_REQUIRED" in reason or (tls.cert_file is None and "HANDSHAKE_FAILURE" in reason):
        return _CLIENT_CERT_REQUIRED
    refusals = ("UNKNOWN_CA", "BAD_CERTIFICATE", "HANDSHAKE_FAILURE", "CERTIFICATE_UNKNOWN")
    if tls.cert_file is not None and any(word in reason for word in refusals):
        return f"the server refused the client certificate {tls.cert_file} ({exc.reason or exc})"
    if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER_FAILURE" in reason:
        return "the server does not speak TLS on this port"
    return f"TLS handshake failed: {exc.reason or exc}"


def server_requires_tls(nc: Client) -> bool:
    """True when the server ``nc`` is connected to announced ``tls_required`` (so nats-py
    upgraded the connection to TLS before CONNECT); nats-py keeps a server's INFO private."""
    info = getattr(nc, "_server_info", None) or {}
    return bool(info.get("tls_required"))
