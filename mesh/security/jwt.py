"""A small NATS JWT (v2) encoder and decoder on top of ``nkeys``.

The format is nats-io/jwt v2's, which nats-server verifies: a header
``{"typ":"JWT","alg":"ed25519-nkey"}``, the claims, both base64url without padding, joined by
``.`` and followed by the ed25519 signature of ``header.claims`` by the issuer's nkey. ``jti`` is
the base32 (no padding) SHA-512/256 (as nats-io/jwt) of the claims JSON without ``jti``. Three
claim kinds exist: operator, account (JetStream limits, signing keys, revocations) and user (publish/subscribe
permissions, response permission, issuing account).

:func:`encode` signs claims with a seed; :func:`decode` returns them only when the signature is
valid, the issuer is one of the keys the caller trusts and the token has not expired, and raises
:class:`InvalidToken` (one line saying what is wrong) otherwise.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import time
from collections.abc import Iterable

import msgspec
import nacl.exceptions
import nacl.signing
import nkeys

from mesh.errors import ConfigError

__all__ = [
    "NO_LIMIT",
    "AccountClaims",
    "AccountLimits",
    "Claims",
    "InvalidToken",
    "OperatorClaims",
    "Permission",
    "Permissions",
    "ResponsePermission",
    "UserClaims",
    "decode",
    "encode",
    "new_seed",
    "public_key",
    "public_key_of_seed",
]

NO_LIMIT = -1
"""NATS' "unlimited" for every numeric limit."""

_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}

_PREFIXES = {
    "operator": nkeys.PREFIX_BYTE_OPERATOR,
    "account": nkeys.PREFIX_BYTE_ACCOUNT,
    "user": nkeys.PREFIX_BYTE_USER,
}
_LETTER = {"operator": "O", "account": "A", "user": "U"}


class InvalidToken(ConfigError):
    """A JWT, key or credential that is malformed, wrongly signed, from an untrusted issuer or
    expired. The message is one line naming what is wrong."""


class Permission(msgspec.Struct, frozen=True, omit_defaults=True):
    """Subjects allowed and denied (NATS wildcards). Empty ``allow`` means everything not denied."""

    allow: list[str] = msgspec.field(default_factory=list)
    deny: list[str] = msgspec.field(default_factory=list)


class ResponsePermission(msgspec.Struct, frozen=True):
    """Publishing to the reply subject of a received request: ``max`` replies within ``ttl``
    nanoseconds (0 = the server's default, two minutes)."""

    max: int = 1
    ttl: int = 0


class Permissions(msgspec.Struct, frozen=True, omit_defaults=True):
    """A user's publish/subscribe permissions, as they appear in its JWT."""

    pub: Permission = msgspec.field(default_factory=Permission)
    sub: Permission = msgspec.field(default_factory=Permission)
    resp: ResponsePermission | None = None


class AccountLimits(msgspec.Struct, frozen=True):
    """An account's limits (NATS, account and JetStream limits in one object, as v2 encodes
    them). The defaults are unlimited with JetStream enabled."""

    subs: int = NO_LIMIT
    data: int = NO_LIMIT
    payload: int = NO_LIMIT
    imports: int = NO_LIMIT
    exports: int = NO_LIMIT
    wildcards: bool = True
    conn: int = NO_LIMIT
    leaf: int = NO_LIMIT
    mem_storage: int = NO_LIMIT
    disk_storage: int = NO_LIMIT
    streams: int = NO_LIMIT
    consumer: int = NO_LIMIT


# ``version`` must always be encoded (nats-io/jwt reads a JWT without it as version 0 and
# refuses it), so the kind-specific structs do not omit defaults.
class OperatorClaims(msgspec.Struct, frozen=True, tag_field="type", tag="operator"):
    """An operator: the keys that may sign its accounts, and the system account."""

    signing_keys: list[str] = msgspec.field(default_factory=list)
    system_account: str = ""
    version: int = 2


class AccountClaims(msgspec.Struct, frozen=True, tag_field="type", tag="account"):
    """An account: its limits, the keys that may sign its users, and revoked users."""

    limits: AccountLimits = msgspec.field(default_factory=AccountLimits)
    signing_keys: list[str] = msgspec.field(default_factory=list)
    revocations: dict[str, int] = msgspec.field(default_factory=dict)
    """User public key -> unix time: the user's JWTs issued at or before it are refused."""
    default_permissions: Permissions = msgspec.field(default_factory=Permissions)
    version: int = 2


class UserClaims(msgspec.Struct, frozen=True, tag_field="type", tag="user"):
    """A user: what it may publish and subscribe, and the account that issued it (when signed
    by one of the account's signing keys)."""

    pub: Permission = msgspec.field(default_factory=Permission)
    sub: Permission = msgspec.field(default_factory=Permission)
    resp: ResponsePermission | None = None
    subs: int = NO_LIMIT
    data: int = NO_LIMIT
    payload: int = NO_LIMIT
    issuer_account: str = ""
    version: int = 2

    @property
    def permissions(self) -> Permissions:
        return Permissions(pub=self.pub, sub=self.sub, resp=self.resp)


class Claims(msgspec.Struct, frozen=True, omit_defaults=True):
    """The registered claims every NATS JWT carries, and the kind-specific ``nats`` part."""

    sub: str
    iss: str
    nats: OperatorClaims | AccountClaims | UserClaims
    name: str = ""
    iat: int = 0
    exp: int | None = None
    jti: str = ""


_encoder = msgspec.json.Encoder()
_claims_decoder = msgspec.json.Decoder(Claims)
_header_decoder = msgspec.json.Decoder(dict[str, str])


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_seed(kind: str) -> bytes:
    """A fresh random seed for an ``operator``, ``account`` or ``user`` nkey."""
    return bytes(nkeys.encode_seed(os.urandom(32), _PREFIXES[kind]))


def public_key_of_seed(seed: bytes | str) -> str:
    """The public key of an nkey seed. Raises InvalidToken for a malformed seed."""
    raw = seed.encode() if isinstance(seed, str) else seed
    try:
        kp = nkeys.from_seed(bytearray(raw.strip()))
        return str(kp.public_key.decode())
    except (nkeys.NkeysError, binascii.Error, ValueError, TypeError) as exc:
        raise InvalidToken(f"not a valid nkey seed ({type(exc).__name__})") from None


def public_key(key: str, kind: str | None = None) -> bytes:
    """The raw 32-byte ed25519 key of an nkey public key (``kind`` checks its prefix letter).

    Raises:
        InvalidToken: not a public nkey (bad base32, prefix or checksum), or of another kind.
    """
    if kind is not None and not key.startswith(_LETTER[kind]):
        article = "an" if kind in ("operator", "account") else "a"
        raise InvalidToken(f"{key[:12]}... is not {article} {kind} public key")
    try:
        raw = base64.b32decode(key + "=" * (-len(key) % 8))
    except (binascii.Error, ValueError):
        raise InvalidToken(f"{key[:12]}... is not an nkey public key (bad base32)") from None
    if len(raw) != 35 or not nkeys.valid_public_prefix_byte(raw[0]):
        raise InvalidToken(f"{key[:12]}... is not an nkey public key")
    body, crc = raw[:-2], int.from_bytes(raw[-2:], "little")
    if nkeys.crc16(body) != crc:
        raise InvalidToken(f"{key[:12]}... is not an nkey public key (bad checksum)")
    return bytes(body[1:])


def _jti(claims: Claims) -> str:
    digest = hashlib.new("sha512_256", _encoder.encode(msgspec.structs.replace(claims, jti=""))).digest()
    return base64.b32encode(digest).rstrip(b"=").decode()


def encode(claims: Claims, seed: bytes | str) -> str:
    """Sign ``claims`` with ``seed``, which must be the key named in ``claims.iss``.

    ``iat`` (when 0) is set to now and ``jti`` is computed. Raises InvalidToken for a seed
    that is not the issuer's.
    """
    raw_seed = seed.encode() if isinstance(seed, str) else seed
    if public_key_of_seed(raw_seed) != claims.iss:
        raise InvalidToken(f"the signing seed is not the key of iss {claims.iss[:12]}...")
    if claims.iat == 0:
        claims = msgspec.structs.replace(claims, iat=int(time.time()))
    claims = msgspec.structs.replace(claims, jti=_jti(claims))
    signing_input = f"{_b64(_encoder.encode(_HEADER))}.{_b64(_encoder.encode(claims))}"
    kp = nkeys.from_seed(bytearray(raw_seed.strip()))
    try:
        signature = kp.sign(signing_input.encode())
    finally:
        kp.wipe()
    return f"{signing_input}.{_b64(signature)}"


def decode(
    token: str,
    *,
    trusted: str | Iterable[str] | None = None,
    kind: type[OperatorClaims | AccountClaims | UserClaims] | None = None,
    now: float | None = None,
) -> Claims:
    """The claims of ``token`` once it is proved genuine.

    Checks, in order: three base64url parts, the v2 header, the claims' shape (and ``kind``),
    the signature by ``iss``, ``iss`` among ``trusted`` (a key or keys, e.g. an account and its
    signing keys; None accepts any issuer, e.g. for a self-signed operator JWT whose ``iss``
    is checked by the caller) and ``exp`` not passed (at ``now``, default the current time).

    Raises:
        InvalidToken: the first check that fails, in one line.
    """
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise InvalidToken("not a JWT: expected three dot-separated parts")
    try:
        header = _header_decoder.decode(_unb64(parts[0]))
        claims = _claims_decoder.decode(_unb64(parts[1]))
        signature = _unb64(parts[2])
    except (binascii.Error, ValueError, msgspec.DecodeError) as exc:
        raise InvalidToken(f"not a NATS JWT: {exc}") from None
    if header.get("alg") != "ed25519-nkey" or header.get("typ", "JWT").upper() != "JWT":
        raise InvalidToken(f"not a NATS v2 JWT (header {header})")
    if kind is not None and not isinstance(claims.nats, kind):
        raise InvalidToken(f"a {claims.nats.__class__.__name__} JWT where a {kind.__name__} was expected")
    issuer_key = public_key(claims.iss)
    try:
        nacl.signing.VerifyKey(issuer_key).verify(f"{parts[0]}.{parts[1]}".encode(), signature)
    except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
        raise InvalidToken(f"JWT {claims.name or claims.sub} has a bad signature (tampered?)") from None
    if trusted is not None:
        allowed = {trusted} if isinstance(trusted, str) else set(trusted)
        if claims.iss not in allowed:
            raise InvalidToken(
                f"JWT {claims.name or claims.sub} is issued by {claims.iss[:12]}..., not a trusted key"
            )
    current = time.time() if now is None else now
    if claims.exp is not None and claims.exp <= current:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(claims.exp))
        raise InvalidToken(f"JWT {claims.name or claims.sub} expired at {stamp}")
    return claims
