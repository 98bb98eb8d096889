"""Preflight of the REST adapters (the ``preflight`` capability, :class:`mesh.plugins.Preflight`):
one authenticated request that shows the API is reachable and takes the configured credentials.

Which request: a GET of ``preflight_path`` when the config has one (a cheap authenticated
endpoint such as ``/Organisation``); else for a source the first page of its list endpoint
(``path`` with ``params``), for a sink a HEAD of ``base_url``. A 401 or 403 is a problem at
``auth`` (the credentials are refused); no answer, a connection error or a 5xx at ``base_url``;
a 404 of a source's ``path`` or of ``preflight_path`` at that field. For a HEAD of ``base_url``
any other answer counts as reachable (many APIs have nothing at their root). Secrets never
appear in a problem (they are redacted with the adapter's own :class:`Credentials`). The
sink's ``state_path`` is not touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx

from adapters.rest._auth import Credentials
from adapters.rest.config import RestSinkConfig, RestSourceConfig
from mesh.errors import ConfigError, ConfigProblem, MeshError

__all__ = ["rest_preflight"]


def _request(cfg: RestSourceConfig | RestSinkConfig) -> tuple[str, str, dict[str, str], str]:
    """(method, url, query params, the config field the path comes from)."""
    base = cfg.base_url.rstrip("/")
    if cfg.preflight_path:
        return "GET", base + cfg.preflight_path, {}, "preflight_path"
    if isinstance(cfg, RestSourceConfig):
        return "GET", base + cfg.path, dict(cfg.params), "path"
    return "HEAD", cfg.base_url, {}, "base_url"


def _auth_field(cfg: RestSourceConfig | RestSinkConfig) -> str:
    if cfg.auth is not None:
        return "auth"
    if cfg.headers_env:
        return "headers_env"
    if cfg.headers_file:
        return "headers_file"
    return "auth"


async def rest_preflight(cfg: Any, *, columns: Sequence[str] | None = None) -> list[ConfigProblem]:
    """The problems of one REST source or sink config (see the module docstring)."""
    if not isinstance(cfg, RestSourceConfig | RestSinkConfig):
        raise TypeError(f"not a REST adapter config: {type(cfg).__name__}")
    try:
        creds = Credentials(cfg.auth, headers_env=cfg.headers_env, headers_file=cfg.headers_file)
    except ConfigError as exc:
        return [ConfigProblem(p.path or _auth_field(cfg), p.message) for p in exc.problems]
    method, url, params, field = _request(cfg)
    timeout = getattr(cfg, "timeout", 10.0)
    headers = {**cfg.headers, **creds.headers, "Accept": "application/json"}
    try:
        async with httpx.AsyncClient(timeout=timeout, auth=creds.auth, follow_redirects=False) as client:
            creds.bind(client)
            response = await client.request(method, url, params=params, headers=headers)
    except ConfigError as exc:  # an OAuth2 token endpoint that refuses the grant
        return [ConfigProblem(p.path or "auth", creds.redact(p.message)) for p in exc.problems]
    except MeshError as exc:
        return [ConfigProblem("base_url", creds.redact(" ".join(str(exc).split())))]
    except httpx.HTTPError as exc:
        reason = creds.redact(" ".join(str(exc).split())) or type(exc).__name__
        return [ConfigProblem("base_url", f"cannot reach {method} {url}: {reason}")]
    status = response.status_code
    said = f"{method} {url} answered HTTP {status}"
    if status in (401, 403):
        what = "refused the credentials" if status == 401 else "refused access with these credentials"
        return [ConfigProblem(_auth_field(cfg), f"{said}: the API {what}")]
    if status >= 500:
        return [ConfigProblem("base_url", f"{said}: the API is failing")]
    if status == 404 and field != "base_url":
        return [ConfigProblem(field, f"{said}: no such endpoint")]
    return []
