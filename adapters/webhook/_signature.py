"""HMAC-SHA256 signatures of inbound webhooks, in Stripe's scheme, with secret rotation.

The sender computes ``HMAC-SHA256(secret, f"{timestamp}." + body)`` and sends it with the unix
timestamp (seconds)::

    Webhook-Signature: t=1732700000,v1=5257a869e7ecebeda32affa62cdca3fa51cad7e77a0e56ff536d0ce8e108d8bd

or, with ``timestamp_header`` configured, the timestamp in a header of its own and only the
signatures (``v1=<sig>``, or bare) in the signature header. Several signatures may be sent (a
sender rotating its secret signs with both), and several secrets may be configured (we rotate):
one match of any signature with any secret is enough. The secret string's UTF-8 bytes are the
HMAC key (as Stripe uses its ``whsec_...`` secrets).

Guarantees: digests are compared with :func:`hmac.compare_digest` (constant time); a request
whose timestamp is further than ``tolerance`` seconds from our clock, in the past or the future,
is refused even with a valid signature, so a captured request cannot be replayed after that
window. Secrets are read from the environment when the source opens and never appear in a
repr, an error or a log line.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

from adapters.webhook.config import WebhookSourceConfig
from mesh.secrets import read_secret

__all__ = ["SignatureError", "Verifier", "compute_signature"]

_MAX_HEADER = 4096
_MAX_CANDIDATES = 16
_TIMESTAMP_RE = re.compile(r"[0-9]{1,12}")
Encoding = Literal["hex", "base64"]


class SignatureError(Exception):
    """The request is not authentic (or no longer fresh): answer 401 with ``str(self)``."""


def compute_signature(secret: str | bytes, timestamp: int, body: bytes, encoding: Encoding = "hex") -> str:
    """The signature of ``body`` sent at ``timestamp`` (unix seconds), as the sender computes it."""
    key = secret.encode() if isinstance(secret, str) else secret
    digest = hmac.new(key, str(timestamp).encode() + b"." + body, hashlib.sha256).digest()
    return digest.hex() if encoding == "hex" else base64.b64encode(digest).decode("ascii")


def _decode(candidate: str, encoding: Encoding) -> bytes | None:
    try:
        if encoding == "hex":
            return bytes.fromhex(candidate)
        return base64.b64decode(candidate, validate=True)
    except (ValueError, binascii.Error):
        return None


class Verifier:
    """Checks one request's signature and timestamp against the configured secrets."""

    def __init__(
        self,
        secrets: Sequence[bytes],
        *,
        signature_header: str = "Webhook-Signature",
        scheme: str = "v1",
        encoding: Encoding = "hex",
        timestamp_header: str | None = None,
        tolerance: float = 300.0,
        clock: Callable[[], float] = time.time,
        names: Sequence[str] = (),
    ) -> None:
        if not secrets:
            raise ValueError("at least one secret is needed")
        self._secrets = list(secrets)
        self.signature_header = signature_header
        self.scheme = scheme
        self.encoding: Encoding = encoding
        self.timestamp_header = timestamp_header
        self.tolerance = tolerance
        self._clock = clock
        self._names = list(names)

    def __repr__(self) -> str:
        refs = (n if n.startswith("file:") else f"${n}" for n in self._names)
        where = ", ".join(refs) or f"{len(self._secrets)} secret(s)"
        return f"<Verifier {self.signature_header} {self.scheme}/{self.encoding} {where}>"

    @classmethod
    def from_config(cls, cfg: WebhookSourceConfig, environ: Mapping[str, str] | None = None) -> Verifier:
        """The verifier for ``cfg``, its secrets read from ``environ`` (default: the process's).

        Raises:
            ConfigError: a secret variable is unset or empty, or a secret file unreadable or
                empty (the message names the variable or file, never a value).
        """
        env = os.environ if environ is None else environ
        refs: list[tuple[str | None, str | None, str]] = [
            (cfg.secret_env, cfg.secret_file, "secret"),
            *((n, None, f"rotation_secret_envs[{i}]") for i, n in enumerate(cfg.rotation_secret_envs)),
            *((None, f, f"rotation_secret_files[{i}]") for i, f in enumerate(cfg.rotation_secret_files)),
        ]
        names = [env_name or f"file:{file}" for env_name, file, _ in refs]
        secrets = []
        for env_name, file, field in refs:
            label = None if field == "secret" else field
            value = read_secret(
                env_name, file, field=field, what="webhook signing", environ=env, label=label
            )
            secrets.append(value.encode())
        return cls(
            secrets,
            signature_header=cfg.signature_header,
            scheme=cfg.signature_scheme,
            encoding=cfg.signature_encoding,
            timestamp_header=cfg.timestamp_header,
            tolerance=cfg.tolerance,
            names=names,
        )

    def verify(self, headers: Mapping[str, str], body: bytes) -> int:
        """The signed timestamp (unix seconds) of an authentic, fresh request.

        Raises:
            SignatureError: the signature is missing, malformed or matches no secret, or the
                timestamp is missing or outside the tolerance.
        """
        raw = headers.get(self.signature_header)
        if not raw:
            raise SignatureError(f"missing {self.signature_header} header")
        if len(raw) > _MAX_HEADER:
            raise SignatureError(f"{self.signature_header} header too long")
        stamp: str | None = None
        candidates: list[str] = []
        for token in raw.replace(",", " ").split():
            name, sep, value = token.partition("=")
            if sep and name == "t":
                stamp = value
            elif sep and name == self.scheme:
                candidates.append(value)
            elif sep and _decode(token, self.encoding) is None:
                continue  # another scheme's entry (``v0=...``)
            else:
                candidates.append(token)  # a bare signature (base64 may end in "=")
        if self.timestamp_header is not None:
            stamp = headers.get(self.timestamp_header)
        if stamp is None:
            where = self.timestamp_header or f"t= in {self.signature_header}"
            raise SignatureError(f"missing timestamp ({where})")
        if not _TIMESTAMP_RE.fullmatch(stamp.strip()):
            raise SignatureError("timestamp is not unix seconds")
        timestamp = int(stamp.strip())
        if not candidates:
            raise SignatureError(f"no {self.scheme} signature in {self.signature_header}")
        signed = str(timestamp).encode() + b"." + body
        expected = [hmac.new(key, signed, hashlib.sha256).digest() for key in self._secrets]
        valid = False
        for candidate in candidates[:_MAX_CANDIDATES]:
            given = _decode(candidate, self.encoding)
            if given is None:
                continue
            for digest in expected:
                valid |= hmac.compare_digest(given, digest)
        if not valid:
            raise SignatureError("invalid signature")
        # Checked after the signature, so an unauthenticated caller learns nothing about our clock.
        if abs(self._clock() - timestamp) > self.tolerance:
            raise SignatureError("timestamp outside the tolerance (stale or from the future)")
        return timestamp
