"""A throwaway PKI for ``meshctl dev up --tls``: a CA, a server certificate for 127.0.0.1 and
localhost, and one client certificate (mutual TLS), made with ``cryptography`` (EC P-256, valid
for 30 days). Keys are written 0600 in a 0700 directory. For development only: the CA key sits
next to the certificates it signed."""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh.broker import ServerTls
from mesh.config import TlsConfig

__all__ = ["DevPki", "make_dev_pki"]


@dataclass(frozen=True)
class DevPki:
    """Paths of the dev stack's CA, server and client certificates and keys (PEM)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def server_tls(self) -> ServerTls:
        """TLS required, client certificates signed by the CA required."""
        return ServerTls(self.server_cert, self.server_key, ca_file=self.ca, verify=True)

    def client_tls(self) -> TlsConfig:
        return TlsConfig(ca_file=str(self.ca), cert_file=str(self.client_cert), key_file=str(self.client_key))

    def cli_args(self) -> list[str]:
        """``--tls-ca/--tls-cert/--tls-key`` for a meshctl command that talks to NATS."""
        return [
            "--tls-ca",
            str(self.ca),
            "--tls-cert",
            str(self.client_cert),
            "--tls-key",
            str(self.client_key),
        ]

    def toml(self) -> str:
        """The ``[nats.tls]`` table of an agent config."""
        return (
            f'\n[nats.tls]\nca_file = "{self.ca}"\ncert_file = "{self.client_cert}"\n'
            f'key_file = "{self.client_key}"\n'
        )

    def exports(self) -> str:
        """The shell lines that give operator commands the same TLS settings."""
        return f"export MESH_TLS_CA={self.ca} MESH_TLS_CERT={self.client_cert} MESH_TLS_KEY={self.client_key}"


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "connector-mesh dev"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_dev_pki(directory: Path) -> DevPki:
    """Create (or replace) the CA, server and client certificates in ``directory``.

    Raises:
        OSError: ``directory`` cannot be created or written.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    now = datetime.datetime.now(datetime.UTC)
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=30))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("connector-mesh dev CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(
        common_name: str, usage: x509.ObjectIdentifier, names: list[x509.GeneralName]
    ) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid[0])
            .not_valid_after(valid[1])
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)

    server = leaf(
        "localhost",
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client = leaf("meshctl dev client", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    pki = DevPki(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server-key.pem",
        client_cert=directory / "client.pem",
        client_key=directory / "client-key.pem",
    )
    _write(directory / "ca-key.pem", _key_pem(ca_key), 0o600)
    _write(pki.ca, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(pki.server_cert, server[0], 0o644)
    _write(pki.server_key, server[1], 0o600)
    _write(pki.client_cert, client[0], 0o644)
    _write(pki.client_key, client[1], 0o600)
    return pki
