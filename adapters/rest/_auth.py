"""Credentials for the REST sink and source, read from the environment variables or files the
config names (``auth`` and the secret headers of ``headers_env`` / ``headers_file``).

Guarantees: a secret is read when the adapter opens (a missing or empty variable or file is a
:class:`~mesh.errors.ConfigError` naming the *variable* or file, never a value), lives only in the
request headers this module builds, and :meth:`Credentials.redact` removes it (and its basic-auth
encoding, and every OAuth2 access token issued to us) from any text the adapter is about to put
in an error or a log line. ``repr`` shows the kind of credential and the variable's name (or
the file's path) only.

OAuth2 client credentials (:class:`OAuth2ClientCredentials`, an ``httpx.Auth``): the token is
fetched on the first request, shared by concurrent requests (one fetch at a time), reused until
``refresh_margin`` seconds (at most a tenth of its lifetime) before ``expires_in`` runs out, and
fetched again once when the API answers 401 to a token that had not been replaced meanwhile;
the request is then sent once more with the new token. A second 401 is the API's answer.
Token endpoint failures map onto the error tree:

* no answer, a connection error, 408, 429 or 5xx: :class:`~mesh.errors.SystemUnavailable`
  (retry later), naming ``token_url``;
* any other 4xx (``invalid_client``, ``invalid_scope``, ...), or a 2xx that is not a bearer
  token: :class:`~mesh.errors.ConfigError` naming ``token_url`` and the server's ``error``:
  retrying cannot help until the client id, secret, scope or audience are fixed.
"""

from __future__ import annotations

import base64
import os
from collections import deque
from collections.abc import AsyncGenerator, Generator, Mapping
from typing import Any
from urllib.parse import quote

import anyio
import httpx
import msgspec

from adapters.rest.config import RestApiKeyAuth, RestAuth, RestBasicAuth, RestBearerAuth, RestOAuth2Auth
from mesh.errors import ConfigError, SystemUnavailable
from mesh.secrets import read_secret

__all__ = ["Credentials", "OAuth2ClientCredentials"]

_MASK = "***"
_EXCERPT = 200
_KEEP_TOKENS = 16  # issued tokens remembered for redaction (a late error may quote an old one)
_JSON = msgspec.json.Decoder(dict[str, Any])


class OAuth2ClientCredentials(httpx.Auth):
    """An ``httpx.Auth`` flow for the OAuth2 client credentials grant (see the module doc).

    The token request goes through the client given to :meth:`bind` (so through its transport),
    without that client's default headers. Async only.
    """

    def __init__(self, config: RestOAuth2Auth, secret: str) -> None:
        self.config = config
        self._secret = secret
        self._client: httpx.AsyncClient | None = None
        self._token: str | None = None
        self._expires_at: float | None = None  # anyio.current_time(); None: until refused
        self._issued: deque[str] = deque(maxlen=_KEEP_TOKENS)
        self._lock: anyio.Lock | None = None
        self.token_requests = 0
        """Token requests sent so far (for tests and reprs)."""
        pair = f"{quote(config.client_id, safe='')}:{quote(secret, safe='')}"
        self._basic = base64.b64encode(pair.encode()).decode("ascii")

    def __repr__(self) -> str:
        cfg = self.config
        if self._token is None:
            state = "no token"
        elif self._expires_at is None:
            state = "token (no expiry)"
        else:
            state = f"token valid {max(0.0, self._expires_at - anyio.current_time()):.0f}s"
        return (
            f"<OAuth2ClientCredentials {cfg.token_url} client_id={cfg.client_id!r} "
            f"{_ref(cfg.client_secret_env, cfg.client_secret_file)} {state} "
            f"fetched={self.token_requests}>"
        )

    @property
    def secrets(self) -> list[str]:
        """Every value that must never be shown: the secret, its basic encoding, issued tokens."""
        return [self._secret, self._basic, *self._issued]

    def bind(self, client: httpx.AsyncClient) -> None:
        """Send token requests through ``client`` (the adapter's own client)."""
        self._client = client

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        raise RuntimeError("OAuth2ClientCredentials works with httpx.AsyncClient only")
        yield request  # pragma: no cover - makes this a generator

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        token = await self.token()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code != 401:
            return
        # Expired or revoked early: one new token, one more try; a second 401 is the answer.
        fresh = await self.refresh(token)
        request.headers["Authorization"] = f"Bearer {fresh}"
        yield request

    async def token(self) -> str:
        """A valid access token: the cached one, or a new one.

        Raises:
            SystemUnavailable: the token endpoint cannot be reached or failed (5xx, 429, 408).
            ConfigError: the token endpoint refused the grant, or did not answer with a token.
        """
        async with self._locked():
            if self._token is None or (
                self._expires_at is not None and anyio.current_time() >= self._expires_at
            ):
                await self._fetch()
            assert self._token is not None
            return self._token

    async def refresh(self, stale: str) -> str:
        """A token other than ``stale`` (which the API refused): a new one unless another
        request fetched one meanwhile."""
        async with self._locked():
            if self._token is None or self._token == stale:
                await self._fetch()
            assert self._token is not None
            return self._token

    def _locked(self) -> anyio.Lock:
        if self._lock is None:  # created in the event loop that uses it
            self._lock = anyio.Lock()
        return self._lock

    def _request(self) -> httpx.Request:
        cfg = self.config
        form = {"grant_type": "client_credentials"}
        headers = {"Accept": "application/json"}
        if cfg.client_auth == "basic":
            headers["Authorization"] = f"Basic {self._basic}"
        else:
            form.update(client_id=cfg.client_id, client_secret=self._secret)
        if cfg.scope:
            form["scope"] = cfg.scope
        if cfg.audience:
            form["audience"] = cfg.audience
        return httpx.Request(
            "POST", cfg.token_url, data=form, headers=headers,
            extensions={"timeout": httpx.Timeout(cfg.timeout).as_dict()},
        )  # fmt: skip

    def redact(self, text: str) -> str:
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, _MASK)
        return text

    async def _fetch(self) -> None:
        cfg = self.config
        if self._client is None:
            raise RuntimeError(f"{self!r} is not bound to a client")
        where = f"OAuth2 token endpoint {cfg.token_url}"
        self.token_requests += 1
        sent_at = anyio.current_time()
        try:
            with anyio.fail_after(cfg.timeout):
                response = await self._client.send(self._request(), auth=None)
                body = await response.aread()
        except (TimeoutError, httpx.TimeoutException):
            raise SystemUnavailable(f"{where}: no answer within {cfg.timeout:g}s") from None
        except httpx.HTTPError as exc:
            raise SystemUnavailable(f"{where}: {type(exc).__name__}: {self.redact(str(exc))}") from None
        status = response.status_code
        doc = _decode(body)
        if status >= 500 or status in (408, 429):
            raise SystemUnavailable(f"{where}: HTTP {status} (retry later)")
        if status >= 300:
            error = self.redact(_describe(doc, body))
            hint = f"check client_id, {_ref(cfg.client_secret_env, cfg.client_secret_file)}"
            if cfg.scope or cfg.audience:
                hint += ", scope and audience"
            raise ConfigError(
                f"{where} refused the client credentials grant: HTTP {status} {error} ({hint})", path="auth"
            )
        token = doc.get("access_token") if doc is not None else None
        if not isinstance(token, str) or not token:
            raise ConfigError(
                f"{where}: HTTP {status} without an access_token: {self.redact(_describe(doc, body))}",
                path="auth.token_url",
            )
        kind = doc.get("token_type", "Bearer") if doc is not None else "Bearer"
        if not isinstance(kind, str) or kind.lower() != "bearer":
            raise ConfigError(f"{where}: token_type {kind!r} is not supported (only Bearer)", path="auth")
        self._issued.append(token)
        self._token = token
        self._expires_at = None
        lifetime = doc.get("expires_in") if doc is not None else None
        if isinstance(lifetime, str):
            try:
                lifetime = float(lifetime)
            except ValueError:
                lifetime = None
        if isinstance(lifetime, int | float) and not isinstance(lifetime, bool):
            margin = min(cfg.refresh_margin, max(0.0, lifetime) / 10)
            self._expires_at = sent_at + lifetime - margin


def _decode(body: bytes) -> dict[str, Any] | None:
    try:
        return _JSON.decode(body)
    except msgspec.DecodeError:
        return None


def _describe(doc: dict[str, Any] | None, body: bytes) -> str:
    """``invalid_client: the description`` from an RFC 6749 5.2 error body, or an excerpt."""
    if doc is not None and isinstance(doc.get("error"), str):
        text = doc["error"]
        if isinstance(doc.get("error_description"), str):
            text += f": {doc['error_description']}"
        return text[:_EXCERPT]
    text = " ".join(body[: _EXCERPT * 4].decode("utf-8", "replace").split())
    return (text[:_EXCERPT] + "...") if len(text) > _EXCERPT else (text or "(empty body)")


class Credentials:
    """The auth of one REST adapter, resolved from the environment.

    Static kinds (bearer, basic, api_key) become :attr:`headers`; OAuth2 becomes :attr:`auth`,
    an ``httpx.Auth`` to hand to the client, which must then be passed to :meth:`bind`.
    """

    def __init__(
        self,
        auth: RestAuth | None,
        environ: Mapping[str, str] | None = None,
        *,
        what: str = "REST",
        headers_env: Mapping[str, str] | None = None,
        headers_file: Mapping[str, str] | None = None,
    ) -> None:
        """Read every secret now (``headers_env`` / ``headers_file``: secret headers, header
        name -> variable / file).

        Raises:
            ConfigError: a variable is unset or empty, a file unreadable or empty (one line
                naming the field and the variable or file, never the value).
        """
        self._auth = auth
        env = os.environ if environ is None else environ
        self._headers: dict[str, str] = {}
        self._secrets: list[str] = []
        self._oauth: OAuth2ClientCredentials | None = None
        self._secret_headers = sorted({*(headers_env or {}), *(headers_file or {})})
        for name, var in (headers_env or {}).items():
            value = read_secret(var, None, field=name, what=what, environ=env, label=f"headers_env.{name}")
            self._headers[name] = value
            self._secrets.append(value)
        for name, file in (headers_file or {}).items():
            value = read_secret(None, file, field=name, what=what, environ=env, label=f"headers_file.{name}")
            self._headers[name] = value
            self._secrets.append(value)
        if isinstance(auth, RestBearerAuth):
            token = read_secret(auth.token_env, auth.token_file, field="auth.token", what=what, environ=env)
            self._headers["Authorization"] = f"Bearer {token}"
            self._secrets.append(token)
        elif isinstance(auth, RestBasicAuth):
            password = read_secret(
                auth.password_env, auth.password_file, field="auth.password", what=what, environ=env
            )
            pair = base64.b64encode(f"{auth.user}:{password}".encode()).decode("ascii")
            self._headers["Authorization"] = f"Basic {pair}"
            self._secrets += [password, pair]
        elif isinstance(auth, RestApiKeyAuth):
            key = read_secret(auth.key_env, auth.key_file, field="auth.key", what=what, environ=env)
            self._headers[auth.header] = key
            self._secrets.append(key)
        elif isinstance(auth, RestOAuth2Auth):
            secret = read_secret(
                auth.client_secret_env, auth.client_secret_file,
                field="auth.client_secret", what=what, environ=env,
            )  # fmt: skip
            self._oauth = OAuth2ClientCredentials(auth, secret)
        # Longest first, so a secret that contains another is masked whole.
        self._secrets.sort(key=len, reverse=True)

    def __repr__(self) -> str:
        auth = self._auth
        extra = f" secret headers={self._secret_headers}" if self._secret_headers else ""
        if isinstance(auth, RestBearerAuth):
            return f"<Credentials bearer {_ref(auth.token_env, auth.token_file)}{extra}>"
        if isinstance(auth, RestBasicAuth):
            ref = _ref(auth.password_env, auth.password_file)
            return f"<Credentials basic user={auth.user!r} {ref}{extra}>"
        if isinstance(auth, RestApiKeyAuth):
            return f"<Credentials api_key {auth.header} {_ref(auth.key_env, auth.key_file)}{extra}>"
        if self._oauth is not None:
            return f"<Credentials {self._oauth!r}{extra}>"
        return f"<Credentials none{extra}>"

    @property
    def headers(self) -> dict[str, str]:
        """Static headers to add to every request (a fresh copy; empty for OAuth2)."""
        return dict(self._headers)

    @property
    def auth(self) -> OAuth2ClientCredentials | None:
        """The per-request auth flow (OAuth2), or None when :attr:`headers` say it all."""
        return self._oauth

    def bind(self, client: httpx.AsyncClient) -> None:
        """Let the OAuth2 flow fetch tokens through ``client`` (no-op for static kinds)."""
        if self._oauth is not None:
            self._oauth.bind(client)

    def redact(self, text: str) -> str:
        """``text`` with every secret (and every OAuth2 token issued to us) replaced by ``***``."""
        if self._oauth is not None:
            text = self._oauth.redact(text)
        for secret in self._secrets:
            text = text.replace(secret, _MASK)
        return text


def _ref(env: str | None, file: str | None) -> str:
    """Where a secret comes from, for reprs: ``$VAR`` or ``file:/path``."""
    return f"${env}" if env is not None else f"file:{file}"
