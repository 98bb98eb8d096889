"""The full extract of a REST list endpoint for scheduled bulk runs (the ``bulk`` capability of
the REST adapter; see :mod:`mesh.runs.bulk`).

A REST listing has no key order to resume from, so the extract lists every page once per
process (with the source's own pagination, auth, retries, rate limit and circuit breaker, and
without its incremental filter), keeps the latest version of each record, and hands the records
out in key order. A run resumed after a crash lists again and continues after the last key its
checkpoint holds. Versions are the source's own (``version_field`` / ``version_type``), and a
record flagged by ``deleted_field`` is extracted as a delete.
"""

from __future__ import annotations

import bisect
from typing import Any

import msgspec

from adapters.rest.config import RestSourceConfig
from adapters.rest.source import RestSource, _Mark
from mesh.adapters import Change
from mesh.runs.bulk import BulkExtract, BulkRow

__all__ = ["RestExtract", "rest_extract"]


class RestExtract(BulkExtract):
    """Every record of a REST list endpoint, in key order (listed once per process)."""

    def __init__(self, cfg: RestSourceConfig) -> None:
        self.cfg = cfg
        self._source = RestSource(msgspec.structs.replace(cfg, incremental=None, lookback=0.0))
        self._keys: list[str] | None = None
        self._changes: dict[str, Change] = {}

    def __repr__(self) -> str:
        listed = "not listed" if self._keys is None else f"{len(self._keys)} records"
        return f"<RestExtract GET {self.cfg.base_url.rstrip('/')}{self.cfg.path} {listed}>"

    async def open(self) -> None:
        await self._source.open()

    async def _list(self) -> list[str]:
        # The source's own listing (same package): every page, its retries and breaker.
        changes, _ = await self._source._poll(_Mark())
        latest: dict[str, Change] = {}
        for c in changes:
            if c.key not in latest or c.version > latest[c.key].version:
                latest[c.key] = c
        self._changes = latest
        return sorted(latest)

    async def chunk(self, after: Any, limit: int) -> list[BulkRow]:
        """Raises SystemUnavailable (the API failed for good: the run retries later) or
        ConfigError (the body is not shaped as configured), like the source's poll."""
        if self._keys is None:
            self._keys = await self._list()
        start = 0 if after is None else bisect.bisect_right(self._keys, str(after))
        out = []
        for key in self._keys[start : start + limit]:
            c = self._changes[key]
            out.append(BulkRow(key, key, c.row, version=c.version, deleted=c.deleted))
        return out

    async def aclose(self) -> None:
        await self._source.aclose()


def rest_extract(cfg: RestSourceConfig) -> RestExtract:
    return RestExtract(cfg)
