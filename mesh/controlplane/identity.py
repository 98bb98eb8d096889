"""An agent's identity and credentials, kept in its state directory.

* ``identity``: a random token generated once (256 bits, URL-safe). It is what makes
  re-registration idempotent: the control plane recognises the same agent by it, and refuses the
  same name presented with another one.
* ``credentials.json``: the agent id and the credential token the control plane issued; the
  agent sends the credential with every heartbeat. With NATS auth on, the broker authenticates
  the agent and no token is issued: ``registration.json`` holds the agent id alone, and no
  ``identity`` file is made (the agent's public key is its identity).

Guarantees: both files are created with mode 0600 (the directory, when created here, 0700) and
written atomically (temporary file, fsync, rename), so a crash leaves the old file or the new one,
never half of one. Tokens are never logged.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

import msgspec

from mesh.errors import ConfigError

__all__ = [
    "CREDENTIALS_FILE",
    "IDENTITY_FILE",
    "REGISTRATION_FILE",
    "Credentials",
    "load_credentials",
    "load_or_create_identity",
    "remove_credentials",
    "save_credentials",
]

IDENTITY_FILE = "identity"
CREDENTIALS_FILE = "credentials.json"
REGISTRATION_FILE = "registration.json"


class Credentials(msgspec.Struct, frozen=True, kw_only=True):
    """What registration returned (file ``credentials.json``)."""

    agent_id: str
    name: str
    site: str
    token: str
    control_plane: str = ""
    """The NATS URL the agent registered through."""
    registered_at: float = 0.0

    def __repr__(self) -> str:  # never print the token
        return f"<Credentials {self.name} id={self.agent_id}>"


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)  # whatever the umask did
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


def load_or_create_identity(state_dir: str | Path) -> str:
    """The agent's identity token, created (once) when the state dir has none.

    Raises:
        ConfigError: the state dir or the file cannot be read or written.
    """
    path = Path(state_dir) / IDENTITY_FILE
    data = _read(path)
    if data is not None and data.strip():
        return data.decode().strip()
    token = secrets.token_urlsafe(32)
    try:
        _write_private(path, token.encode() + b"\n")
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None
    return token


def save_credentials(state_dir: str | Path, creds: Credentials) -> Path:
    """Store ``creds`` (mode 0600). Returns the file's path: ``credentials.json`` when they hold
    a heartbeat token (security off), else ``registration.json`` (security on: the agent's NATS
    .creds file is its only credential; this file holds no secret), the other one removed.

    Raises:
        ConfigError: the file cannot be written.
    """
    name, other = CREDENTIALS_FILE, REGISTRATION_FILE
    if not creds.token:
        name, other = other, name
    path = Path(state_dir) / name
    try:
        _write_private(path, msgspec.json.format(msgspec.json.encode(creds)) + b"\n")
        (Path(state_dir) / other).unlink(missing_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None
    return path


def load_credentials(state_dir: str | Path) -> Credentials | None:
    """The stored credentials, or None when the agent is not registered.

    Raises:
        ConfigError: the file exists but cannot be read or is not valid.
    """
    path = Path(state_dir) / CREDENTIALS_FILE
    data = _read(path)
    if data is None:
        path = Path(state_dir) / REGISTRATION_FILE
        data = _read(path)
    if data is None:
        return None
    try:
        return msgspec.json.decode(data, type=Credentials)
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{path}: not valid credentials ({exc}); register the agent again") from None


def remove_credentials(state_dir: str | Path) -> bool:
    """Delete the credentials (after deregistration). True when there were some."""
    removed = False
    for name in (CREDENTIALS_FILE, REGISTRATION_FILE):
        try:
            (Path(state_dir) / name).unlink()
        except FileNotFoundError:
            continue
        removed = True
    return removed
