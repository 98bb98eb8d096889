"""The mesh's signing authority: a security dir loaded, and what it issues.

A security dir (``meshctl security init DIR``, :mod:`mesh.security.setup`) holds the operator
and account keys. :class:`Authority` loads it and issues user JWTs signed by the MESH account's
signing key, one-time enrollment tokens, and MESH account JWTs with a revocation list signed by
the operator's signing key; :func:`push_account` hands such a JWT to nats-server's full resolver
through the system account, which applies it at once (revoked users are disconnected).

Credentials files are the standard ``.creds`` format nats-py and the nats CLI read
(:func:`creds_text`, :func:`write_creds`, :func:`read_creds`).
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Self

import msgspec

from mesh.errors import ConfigError
from mesh.security._files import write_private
from mesh.security.jwt import (
    AccountClaims,
    AccountLimits,
    Claims,
    InvalidToken,
    Permissions,
    UserClaims,
    decode,
    encode,
    new_seed,
    public_key,
    public_key_of_seed,
)
from mesh.security.permissions import DEFAULT_PREFIX, enrollment_permissions, validate_token
from mesh.transport.base import Refused, Transport

__all__ = [
    "CLAIMS_UPDATE_SUBJECT",
    "ENROLL_PREFIX",
    "Authority",
    "Creds",
    "EnrollmentToken",
    "SecurityKeys",
    "creds_text",
    "mesh_account_claims",
    "parse_enrollment_token",
    "push_account",
    "read_creds",
    "write_creds",
]

ENROLL_PREFIX = "MESHENROLL1."
CLAIMS_UPDATE_SUBJECT = "$SYS.REQ.CLAIMS.UPDATE"

_CREDS = """-----BEGIN NATS USER JWT-----
{jwt}
------END NATS USER JWT------

************************* IMPORTANT *************************
NKEY Seed printed below can be used to sign and prove identity.
NKEYs are sensitive and should be treated as secrets.

-----BEGIN USER NKEY SEED-----
{seed}
------END USER NKEY SEED------

*************************************************************
"""
_BLOCK = re.compile(r"-{3,}[^\n]*BEGIN[^\n]*-{3,}\s*\n\s*(\S+)\s*\n\s*-{3,}[^\n]*END[^\n]*-{3,}")


class SecurityKeys(msgspec.Struct, frozen=True):
    """``security.json``: the public keys of a security dir (nothing secret)."""

    operator: str
    operator_signing_key: str
    system_account: str
    mesh_account: str
    mesh_account_signing_key: str
    version: int = 1


class Creds(msgspec.Struct, frozen=True):
    """A parsed ``.creds`` file: the user JWT, its seed, and the user's name and public key."""

    jwt: str
    seed: str
    name: str
    public_key: str

    def __repr__(self) -> str:  # never print the seed
        return f"<Creds {self.name} {self.public_key[:12]}...>"


class EnrollmentToken(msgspec.Struct, frozen=True):
    """A parsed enrollment token: agent ``name`` may register once before ``expires``."""

    name: str
    jwt: str
    seed: str
    token_id: str
    """The enrollment user's public key, recorded by the control plane once used."""
    expires: int

    def __repr__(self) -> str:
        return f"<EnrollmentToken {self.name} id={self.token_id[:12]}... expires={self.expires}>"


def creds_text(jwt: str, seed: bytes | str) -> str:
    """The standard ``.creds`` text for a user JWT and its seed."""
    s = seed.decode() if isinstance(seed, bytes) else seed
    return _CREDS.format(jwt=jwt.strip(), seed=s.strip())


def write_creds(path: str | Path, jwt: str, seed: bytes | str) -> Path:
    """Write a ``.creds`` file atomically, mode 0600, its directory 0700. Returns the path."""
    return write_private(Path(path), creds_text(jwt, seed))


def read_creds(path: str | Path) -> Creds:
    """Parse a ``.creds`` file (signature and seed checked, issuer not: that is the server's job).

    Raises:
        ConfigError: the file does not exist or cannot be read.
        InvalidToken: it is not a creds file, or its seed does not match its JWT.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"creds file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read creds file {p}: {exc}") from None
    blocks = _BLOCK.findall(text)
    if len(blocks) != 2:
        raise InvalidToken(f"{p} is not a NATS .creds file (expected a JWT and a seed block)")
    jwt, seed = blocks
    try:
        claims = decode(jwt, kind=UserClaims)
    except InvalidToken as exc:
        raise InvalidToken(f"{p}: {exc}") from None
    if public_key_of_seed(seed) != claims.sub:
        raise InvalidToken(f"{p}: the seed is not the key of the JWT's user {claims.name or claims.sub}")
    return Creds(jwt=jwt, seed=seed, name=claims.name, public_key=claims.sub)


def mesh_account_claims(keys: SecurityKeys, revocations: Mapping[str, int] | None = None) -> Claims:
    """The MESH account's claims: JetStream unlimited, its signing key, the revocation list;
    issued by the operator's signing key."""
    return Claims(
        sub=keys.mesh_account,
        iss=keys.operator_signing_key,
        name="MESH",
        nats=AccountClaims(
            limits=AccountLimits(),
            signing_keys=[keys.mesh_account_signing_key],
            revocations=dict(sorted((revocations or {}).items())),
        ),
    )


def parse_enrollment_token(token: str, *, now: float | None = None) -> EnrollmentToken:
    """Read an enrollment token pasted by an operator (surrounding whitespace is ignored).

    Checks its shape, that its seed is its JWT's user and that it has not expired. The issuer
    is checked by the server when the token connects.

    Raises:
        InvalidToken: malformed (one line saying how) or expired (saying when).
    """
    text = token.strip()
    if not text.startswith(ENROLL_PREFIX):
        raise InvalidToken(f"not a mesh enrollment token (it must start with {ENROLL_PREFIX})")
    body = text[len(ENROLL_PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        fields = msgspec.json.decode(raw, type=dict[str, str])
        name, jwt, seed = fields["name"], fields["jwt"], fields["seed"]
    except (binascii.Error, ValueError, msgspec.DecodeError, KeyError):
        raise InvalidToken("malformed enrollment token (truncated or altered when pasted?)") from None
    try:
        claims = decode(jwt, kind=UserClaims, now=now)
    except InvalidToken as exc:
        if "expired" in str(exc):
            raise InvalidToken(
                f"enrollment token for {name} {str(exc).split(' ', 2)[2]}: ask for a new one"
            ) from None
        raise InvalidToken(f"malformed enrollment token: {exc}") from None
    if public_key_of_seed(seed) != claims.sub or claims.name != name or claims.exp is None:
        raise InvalidToken("malformed enrollment token (its parts do not belong together)")
    return EnrollmentToken(name=name, jwt=jwt, seed=seed, token_id=claims.sub, expires=claims.exp)


class Authority:
    """The keys of a security dir, and the JWTs they sign.

    Needs ``keys/mesh-account-signing.nk`` to issue users and ``keys/operator-signing.nk`` to
    sign account updates; the operator identity seed is never read (it may be kept offline).
    """

    def __init__(self, directory: Path, keys: SecurityKeys, account_seed: bytes, operator_seed: bytes | None):
        self.directory = directory
        self.keys = keys
        self._account_seed = account_seed
        self._operator_seed = operator_seed

    def __repr__(self) -> str:
        return f"<Authority {self.directory} account={self.keys.mesh_account[:12]}...>"

    @classmethod
    def load(cls, directory: str | Path) -> Self:
        """Load a security dir.

        Raises:
            ConfigError: it is not a security dir (missing file), or a key does not match
                security.json.
        """
        d = Path(directory)
        try:
            keys = msgspec.json.decode((d / "security.json").read_bytes(), type=SecurityKeys)
            account_seed = (d / "keys" / "mesh-account-signing.nk").read_bytes().strip()
        except FileNotFoundError as exc:
            raise ConfigError(
                f"{d} is not a mesh security dir ({exc.filename} missing): run `meshctl security init {d}`"
            ) from None
        except (OSError, msgspec.DecodeError) as exc:
            raise ConfigError(f"cannot read security dir {d}: {exc}") from None
        operator_path = d / "keys" / "operator-signing.nk"
        operator_seed = operator_path.read_bytes().strip() if operator_path.exists() else None
        if public_key_of_seed(account_seed) != keys.mesh_account_signing_key:
            raise ConfigError(f"{d}: keys/mesh-account-signing.nk does not match security.json")
        if operator_seed is not None and public_key_of_seed(operator_seed) != keys.operator_signing_key:
            raise ConfigError(f"{d}: keys/operator-signing.nk does not match security.json")
        return cls(d, keys, account_seed, operator_seed)

    @property
    def user_issuers(self) -> set[str]:
        """The keys a MESH user JWT may be issued by."""
        return {self.keys.mesh_account, self.keys.mesh_account_signing_key}

    def issue_user(
        self, name: str, public_key_: str, permissions: Permissions, expires: float | None = None
    ) -> str:
        """A MESH user JWT for ``name`` (its ``name`` claim, the caller token) with key
        ``public_key_`` and ``permissions``; ``expires`` is a unix time (None = never).

        Raises:
            ConfigError: ``name`` is not one subject token. InvalidToken: not a user public key.
        """
        validate_token(name, "user name")
        public_key(public_key_, "user")
        claims = Claims(
            sub=public_key_,
            iss=self.keys.mesh_account_signing_key,
            name=name,
            exp=None if expires is None else int(expires),
            nats=UserClaims(
                pub=permissions.pub,
                sub=permissions.sub,
                resp=permissions.resp,
                issuer_account=self.keys.mesh_account,
            ),
        )
        return encode(claims, self._account_seed)

    def verify_user(self, jwt: str, *, now: float | None = None) -> Claims:
        """The claims of a MESH user JWT this authority issued. Raises InvalidToken otherwise."""
        claims = decode(jwt, trusted=self.user_issuers, kind=UserClaims, now=now)
        assert isinstance(claims.nats, UserClaims)
        if claims.nats.issuer_account not in ("", self.keys.mesh_account):
            raise InvalidToken(f"JWT {claims.name} belongs to another account")
        return claims

    def enrollment_token(
        self, name: str, ttl: float, prefix: str = DEFAULT_PREFIX, *, now: float | None = None
    ) -> tuple[str, str]:
        """A one-time enrollment token for agent ``name``, valid ``ttl`` seconds: it may only
        publish ``<prefix>.register.<name>``. Returns (token string, token id = its public key).

        Raises:
            ConfigError: a bad name or prefix, or ``ttl`` not positive.
        """
        if not ttl > 0:
            raise ConfigError(f"enrollment token ttl must be positive, got {ttl}")
        seed = new_seed("user")
        pk = public_key_of_seed(seed)
        expires = (time.time() if now is None else now) + ttl
        jwt = self.issue_user(name, pk, enrollment_permissions(name, prefix), expires=expires)
        body = msgspec.json.encode({"name": name, "jwt": jwt, "seed": seed.decode()})
        return ENROLL_PREFIX + base64.urlsafe_b64encode(body).rstrip(b"=").decode(), pk

    def revoked_account_jwt(self, revocations: Mapping[str, int]) -> str:
        """The MESH account JWT with ``revocations`` (user public key -> unix time; a user's
        JWTs issued at or before that time are refused), signed by the operator's signing key.

        Raises:
            ConfigError: this dir has no ``keys/operator-signing.nk``.
            InvalidToken: a key that is not a user public key.
        """
        if self._operator_seed is None:
            raise ConfigError(
                f"{self.directory}/keys/operator-signing.nk is missing: cannot sign account updates"
            )
        for key in revocations:
            public_key(key, "user")
        return encode(mesh_account_claims(self.keys, revocations), self._operator_seed)


async def push_account(transport: Transport, account_jwt: str, *, timeout: float = 5.0) -> None:
    """Hand an account JWT to nats-server (``$SYS.REQ.CLAIMS.UPDATE``); the full resolver stores
    it and applies it at once. ``transport`` must be connected with a SYS-account user.

    Raises:
        Refused: the server answered with an error (its description is in the message).
        TransportError: no answer (not a system-account connection, or no resolver).
    """
    msg = await transport.request(CLAIMS_UPDATE_SUBJECT, account_jwt.encode(), timeout=timeout)
    try:
        answer = msgspec.json.decode(msg.data, type=dict[str, object])
    except msgspec.DecodeError:
        raise Refused(f"{CLAIMS_UPDATE_SUBJECT}: unreadable answer {msg.data[:200]!r}") from None
    error = answer.get("error")
    if error is not None:
        desc = error.get("description", error) if isinstance(error, dict) else error
        raise Refused(f"nats-server refused the account update: {desc}")
    data = answer.get("data")
    if not isinstance(data, dict) or data.get("code") not in (200, None):
        raise Refused(f"nats-server did not confirm the account update: {answer}")
