"""Reconciling a REST target whose list endpoint pages by offset (``?offset=O&limit=S``) or by
cursor (``meta.next_cursor`` sent back as ``?cursor=``): a real HTTP server on a loopback port, a
real SQLite source, the two agents' reconcile services on an in-memory broker. Every page is read
once (one chunk each), records on every page are compared, the injected drift is found exactly."""

from __future__ import annotations

import functools
import http.server
import json
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from mesh.config import parse_agent_config
from mesh.reconcile import Difference, Reconciler, ReconcileService, reconcile_subject
from mesh.transport.memory import MemoryBroker, MemoryTransport

pytestmark = [pytest.mark.integration, pytest.mark.anyio, pytest.mark.timeout(60)]

N = 25


class PagedApi:
    """``GET /customers`` in key order, by ``offset``/``limit`` or by an opaque ``cursor``
    (``{"data": [...], "meta": {"next_cursor": ...}}``); records the query of every request."""

    def __init__(self, size: int) -> None:
        self.records = {str(i): {"id": str(i), "name": f"C{i}"} for i in range(1, N + 1)}
        self.queries: list[dict[str, str]] = []
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                q = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
                api.queries.append(q)
                ordered = [api.records[k] for k in sorted(api.records, key=int)]
                if url.path == "/by-offset":
                    start, limit = int(q["offset"]), int(q["limit"])
                    doc: dict[str, Any] = {"data": ordered[start : start + limit]}
                else:  # /by-cursor: the cursor is the index of the next record, as text
                    start = int(q.get("cursor", "0"))
                    page = ordered[start : start + size]
                    nxt = str(start + size) if start + size < len(ordered) else None
                    doc = {"data": page, "meta": {"next_cursor": nxt}}
                body = json.dumps(doc).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def api() -> Iterator[PagedApi]:
    a = PagedApi(size=10)
    try:
        yield a
    finally:
        a.close()


def source_config(db: Path) -> str:
    return f"""
[agent]
name = "erp-agent"
system = "erp"
state_dir = "/nonexistent"
[[flows]]
name = "customers"
entity = "customer"
[flows.source]
adapter = "sqlite"
path = "{db}"
table = "customers"
key = "id"
[flows.to_canonical.fields]
id = {{ from = "id", convert = "str" }}
name = "name"
"""


def sink_config(tmp: Path, url: str, path: str, pagination: str) -> str:
    return f"""
[agent]
name = "crm-agent"
system = "crm"
state_dir = "/nonexistent"
[[flows]]
name = "customers"
entity = "customer"
[flows.sink]
adapter = "rest"
base_url = "{url}"
upsert_path = "/customers/{{key}}"
state_path = "{tmp / "rest-versions.db"}"
list_path = "{path}"
list_records_path = "data"
list_key_field = "id"
[flows.sink.list_pagination]
{pagination}
[flows.from_canonical.fields]
id = "id"
name = "name"
"""


PAGINATIONS = {
    "offset": ("/by-offset", 'type = "offset"\nsize = 10'),
    "cursor": ("/by-cursor", 'type = "cursor"\ncursor_path = "meta.next_cursor"'),
}


@pytest.mark.parametrize("kind", sorted(PAGINATIONS))
async def test_reconcile_reads_every_page_of_a_rest_list_endpoint(
    tmp_path: Path, api: PagedApi, kind: str
) -> None:
    db = tmp_path / "erp.db"
    with sqlite3.connect(db) as c:
        c.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
        c.executemany("INSERT INTO customers VALUES (?, ?)", [(i, f"C{i}") for i in range(1, N + 1)])
    path, pagination = PAGINATIONS[kind]
    configs = [
        parse_agent_config(source_config(db)),
        parse_agent_config(sink_config(tmp_path, api.url, path, pagination)),
    ]
    # drift on the first, a middle and the last page
    del api.records["2"]
    api.records["14"] = {"id": "14", "name": "Changed"}
    api.records["26"] = {"id": "26", "name": "Only in the CRM"}
    broker = MemoryBroker()
    async with anyio.create_task_group() as tg:
        for cfg in configs:
            t = await MemoryTransport(broker, name=cfg.agent.name).__aenter__()
            flows = {f.name: f for f in cfg.flows}
            svc = ReconcileService(cfg.agent.name, cfg.agent.system, flows.get)
            await tg.start(functools.partial(t.serve, reconcile_subject(cfg.agent.name), svc.answer))
        async with MemoryTransport(broker, name="meshctl") as op:
            rec = Reconciler(op, "customers", ["erp-agent", "crm-agent"], timeout=30, buckets=4)
            report = await rec.compare()
        tg.cancel_scope.cancel()
    assert report.missing == ["2"]
    assert report.extra == ["26"]
    assert report.different == [Difference("14", ["name"])]
    target = report.targets[0]
    assert (target.source_count, target.target_count) == (N, N)
    # 25 records, 10 a page: 3 pages per scan (offset: the short third page ends it; cursor: a
    # null next cursor), one chunk each; two scans of the target (digests, then records)
    pages = [0, 10, 20] if kind == "offset" else [None, "10", "20"]
    got = [q.get("offset") if kind == "offset" else q.get("cursor") for q in api.queries]
    want = [str(p) if kind == "offset" and p is not None else p for p in pages] * 2
    assert got == want
    if kind == "offset":
        assert {q["limit"] for q in api.queries} == {"10"}
