"""The REST sink's ``reconcile`` capability (:class:`mesh.plugins.ReconcileAccess`): the target's
records are read from its list endpoint (``list_path``, ``list_records_path``,
``list_pagination``: page, offset, cursor or link, as a source pages), one page per chunk, with
the sink's own auth and headers; extras are deleted with the sink's delete request (a 404
counts as deleted). A REST target is never a source of repairs (``restamp`` refuses).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import httpx

from adapters.rest._auth import Credentials
from adapters.rest._paths import MISSING, dotted
from adapters.rest.config import (
    RestCursorPagination,
    RestLinkPagination,
    RestOffsetPagination,
    RestPagePagination,
    RestSinkConfig,
)
from mesh.errors import ConfigError, SystemUnavailable

__all__ = ["REST"]

_MAX_PAGES = 1_000_000


class RestReconcile:
    """:class:`mesh.plugins.ReconcileAccess` for a ``adapter = "rest"`` sink."""

    def __repr__(self) -> str:
        return "<RestReconcile>"

    def key_field(self, cfg: Any) -> str:
        """The listed records' key field."""
        return str(cfg.list_key_field or cfg.key_field or "id")

    @staticmethod
    def _client(cfg: RestSinkConfig) -> tuple[httpx.AsyncClient, Credentials]:
        creds = Credentials(
            cfg.auth, what="REST sink", headers_env=cfg.headers_env, headers_file=cfg.headers_file
        )
        client = httpx.AsyncClient(
            base_url=cfg.base_url, headers={**cfg.headers, **creds.headers},
            timeout=httpx.Timeout(cfg.timeout), follow_redirects=False, auth=creds.auth,
        )  # fmt: skip
        creds.bind(client)
        return client, creds

    async def _page(self, client: httpx.AsyncClient, url: str, params: dict[str, Any]) -> httpx.Response:
        try:
            response = await client.get(url, params=params)
        except httpx.HTTPError as exc:
            raise SystemUnavailable(f"list endpoint {url}: {type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            raise SystemUnavailable(f"list endpoint {url}: HTTP {response.status_code}")
        return response

    async def scan(self, cfg: Any, role: str, chunk: int) -> AsyncIterator[list[dict[str, Any]]]:
        assert isinstance(cfg, RestSinkConfig)
        if cfg.list_path is None:
            raise ConfigError("reconciling a REST target needs list_path (its list endpoint) in [flows.sink]")
        pg = cfg.list_pagination
        client, _ = self._client(cfg)
        async with client:
            url: str | None = cfg.list_path
            page = pg.first_page if isinstance(pg, RestPagePagination) else 0
            offset = 0
            cursor: Any = None
            for _ in range(_MAX_PAGES):
                assert url is not None
                params: dict[str, Any] = {}
                if pg is not None and pg.size_param is not None and (url == cfg.list_path):
                    params[pg.size_param] = pg.size
                if isinstance(pg, RestPagePagination):
                    params[pg.page_param] = page
                elif isinstance(pg, RestOffsetPagination):
                    params[pg.offset_param] = offset
                elif isinstance(pg, RestCursorPagination) and cursor is not None:
                    params[pg.cursor_param] = cursor
                response = await self._page(client, url, params)
                try:
                    body = response.json()
                except ValueError:
                    raise SystemUnavailable(f"list endpoint {url}: the body is not JSON") from None
                records = dotted(body, cfg.list_records_path)
                if not isinstance(records, list):
                    raise ConfigError(
                        f"list endpoint {url}: no list of records at"
                        f" list_records_path {cfg.list_records_path!r}"
                    )
                rows = [r for r in records if isinstance(r, dict)]
                if rows:
                    yield rows
                if pg is None:
                    return
                if isinstance(pg, RestPagePagination | RestOffsetPagination):
                    short = len(records) < pg.size if pg.stop == "short" else not records
                    if short or not records:
                        return
                    page, offset = page + 1, offset + len(records)
                elif isinstance(pg, RestCursorPagination):
                    cursor = dotted(body, pg.cursor_path)
                    if cursor in (None, "", MISSING) or not records:
                        return
                elif isinstance(pg, RestLinkPagination):
                    nxt = response.links.get("next", {}).get("url")
                    if not nxt:
                        return
                    target = urljoin(str(response.url), nxt)
                    if urlsplit(target)[:2] != urlsplit(str(response.url))[:2]:
                        raise SystemUnavailable(f"list endpoint {url}: a next link to another origin")
                    url = target
        raise SystemUnavailable(f"list endpoint {cfg.list_path}: more than {_MAX_PAGES} pages")

    async def restamp(self, cfg: Any, keys: Sequence[Any]) -> int:
        raise ConfigError("a REST sink is not a source: nothing to re-emit")

    async def delete(self, cfg: Any, keys: Sequence[str]) -> int:
        assert isinstance(cfg, RestSinkConfig)
        template = cfg.delete_path or cfg.upsert_path or ""
        if "{key}" not in template:
            raise ConfigError("deleting an extra record needs a path with {key} (delete_path or upsert_path)")
        client, _ = self._client(cfg)
        done = 0
        async with client:
            for key in keys:
                path = template.replace("{key}", quote(key, safe=""))
                try:
                    response = await client.delete(path)
                except httpx.HTTPError as exc:
                    raise SystemUnavailable(f"DELETE {path}: {type(exc).__name__}: {exc}") from None
                if response.status_code not in (200, 202, 204, 404):
                    raise SystemUnavailable(f"DELETE {path}: HTTP {response.status_code}")
                done += 1
        return done


REST = RestReconcile()
