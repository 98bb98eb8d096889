"""Credentials for the REST sink, read from the environment variables the config names.

Guarantees: a secret is read when the sink opens (a missing or empty variable is a
:class:`~mesh.errors.ConfigError` naming the *variable*, never a value), lives only in the
request headers this module builds, and :meth:`Credentials.redact` removes it (and its basic-auth
encoding) from any text the sink is about to put in an error or a log line. ``repr`` shows the
kind of credential and the variable's name only.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping

from mesh.config import RestApiKeyAuth, RestAuth, RestBasicAuth, RestBearerAuth
from mesh.errors import ConfigError

__all__ = ["Credentials"]

_MASK = "***"


class Credentials:
    """The auth headers of one sink, resolved from the environment."""

    def __init__(self, auth: RestAuth | None, environ: Mapping[str, str] | None = None) -> None:
        self._auth = auth
        env = os.environ if environ is None else environ
        self._headers: dict[str, str] = {}
        self._secrets: list[str] = []
        if auth is None:
            return
        if isinstance(auth, RestBearerAuth):
            token = _read(env, auth.token_env)
            self._headers["Authorization"] = f"Bearer {token}"
            self._secrets.append(token)
        elif isinstance(auth, RestBasicAuth):
            password = _read(env, auth.password_env)
            pair = base64.b64encode(f"{auth.user}:{password}".encode()).decode("ascii")
            self._headers["Authorization"] = f"Basic {pair}"
            self._secrets += [password, pair]
        elif isinstance(auth, RestApiKeyAuth):
            key = _read(env, auth.key_env)
            self._headers[auth.header] = key
            self._secrets.append(key)
        # Longest first, so a secret that contains another is masked whole.
        self._secrets.sort(key=len, reverse=True)

    def __repr__(self) -> str:
        auth = self._auth
        if isinstance(auth, RestBearerAuth):
            return f"<Credentials bearer ${auth.token_env}>"
        if isinstance(auth, RestBasicAuth):
            return f"<Credentials basic user={auth.user!r} ${auth.password_env}>"
        if isinstance(auth, RestApiKeyAuth):
            return f"<Credentials api_key {auth.header} ${auth.key_env}>"
        return "<Credentials none>"

    @property
    def headers(self) -> dict[str, str]:
        """Headers to add to every request (a fresh copy)."""
        return dict(self._headers)

    def redact(self, text: str) -> str:
        """``text`` with every secret replaced by ``***``."""
        for secret in self._secrets:
            text = text.replace(secret, _MASK)
        return text


def _read(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "")
    if not value:
        raise ConfigError(f"environment variable {name} (a REST sink secret) is not set or empty")
    return value
