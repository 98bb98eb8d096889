"""System APIs end to end (README "System APIs"): a real secured nats-server, the ERP agent's
least-privilege creds, real SQLite (and PostgreSQL) databases, a real local HTTP server for REST.

Idempotency is proven by counting rows in the system's own database: however many calls with
one key, on however many replicas, exactly one row is inserted."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import pytest

from mesh.api import ApiError, call, call_detailed, ensure_results_bucket
from mesh.api._results import RESULTS_BUCKET, Results, kv_key
from mesh.api.discovery import discover
from mesh.api.server import ApiServer
from mesh.config import AgentConfig
from mesh.metrics import Metrics
from mesh.transport import JetStream, Refused
from tests._secure import SecuredNatsServer, secure_config

pytestmark = [pytest.mark.anyio, pytest.mark.integration, pytest.mark.timeout(90)]

SCHEMA = """
CREATE TABLE customers (id TEXT PRIMARY KEY, name TEXT NOT NULL, currency TEXT);
CREATE TABLE sales_orders (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    number TEXT NOT NULL UNIQUE,
    customer_id TEXT NOT NULL,
    total_minor INTEGER NOT NULL CHECK (total_minor >= 0),
    currency TEXT NOT NULL
);
INSERT INTO customers VALUES ('ALFKI', 'Alfreds Futterkiste', 'EUR');
"""

SQLITE_OPS = """
[[api.operations]]
name = "customer.get"
read = true
request = {{ fields = {{ id = "str" }} }}
response = {{ fields = {{ id = "str", name = "str", currency = "str?" }} }}
[api.operations.run]
adapter = "sqlite"
path = "{db}"
statement = "SELECT id, name, currency FROM customers WHERE id = :id"

[[api.operations]]
name = "sales_order.create"
request = {{ fields = {{ number = "str", customer_id = "str", total = "money" }} }}
[api.operations.run]
adapter = "sqlite"
path = "{db}"
statement = \"\"\"INSERT INTO sales_orders (number, customer_id, total_minor, currency)
VALUES (:number, :customer_id, :amount, :currency) RETURNING id AS order_id, number\"\"\"
params = {{ amount = "total.amount", currency = "total.currency" }}

[[api.operations]]
name = "report.broken"
read = true
[api.operations.run]
adapter = "sqlite"
path = "{db}"
statement = "SELECT * FROM no_such_table"
"""


def agent_toml(name: str, system: str, state: Path, ops: str, server: SecuredNatsServer) -> str:
    return f"""
[agent]
name = "{name}"
system = "{system}"
state_dir = "{state}"

[nats]
servers = ["{server.url}"]

[api]
claim_timeout = 0.5
{ops}
"""


def order(number: str = "SO-1", amount: int = 12_50) -> dict[str, Any]:
    return {"number": number, "customer_id": "ALFKI", "total": {"amount": amount, "currency": "EUR"}}


def rows(db: Path) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute("SELECT number, total_minor FROM sales_orders ORDER BY id").fetchall()


@pytest.fixture
def erp_db(tmp_path: Path) -> Path:
    db = tmp_path / "erp.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.executescript(SCHEMA)
    return db


@pytest.fixture
def erp(tmp_path: Path, erp_db: Path, nats_server: SecuredNatsServer) -> AgentConfig:
    text = agent_toml("erp-agent", "erp", tmp_path / "erp-state", SQLITE_OPS.format(db=erp_db), nats_server)
    return secure_config(text, tmp_path / "erp.creds", nats_server)


@contextlib.asynccontextmanager
async def admin(server: SecuredNatsServer) -> AsyncIterator[JetStream]:
    async with JetStream(server.nats_config(), name="admin") as js:
        await ensure_results_bucket(js)
        yield js


@contextlib.asynccontextmanager
async def serving(
    cfg: AgentConfig, replicas: int = 1, metrics: Metrics | None = None
) -> AsyncIterator[list[ApiServer]]:
    """``replicas`` ApiServers of the agent, each on its own connection with the agent's creds."""
    assert cfg.api is not None
    async with contextlib.AsyncExitStack() as stack, anyio.create_task_group() as tg:
        servers = []
        for i in range(replicas):
            js = await stack.enter_async_context(JetStream(cfg.nats, name=f"{cfg.agent.name}-{i}"))
            server = ApiServer(
                js, cfg.api, system=cfg.agent.system, agent=f"{cfg.agent.name}-{i}", metrics=metrics
            )
            await tg.start(server.run)
            servers.append(server)
        yield servers
        tg.cancel_scope.cancel()


async def test_discovery_lists_the_service_its_version_endpoints_and_agents(
    erp: AgentConfig, nats_server: SecuredNatsServer
) -> None:
    async with admin(nats_server) as js, serving(erp, replicas=2):
        pings = await js.request("$SRV.PING.mesh-erp", b"", timeout=5)
        assert json.loads(pings.data)["name"] == "mesh-erp"
        views = await discover(js, timeout=3)
    [view] = views
    assert (view.name, view.version, view.system) == ("mesh-erp", "1.0.0", "erp")
    assert view.agents == ["erp-agent-0", "erp-agent-1"]
    assert len(view.instances) == 2
    subjects = {e["subject"]: e for e in view.endpoints}
    assert set(subjects) == {"api.erp.customer.get", "api.erp.sales_order.create", "api.erp.report.broken"}
    assert subjects["api.erp.customer.get"]["name"] == "customer_get"
    assert subjects["api.erp.customer.get"]["read"] == "true"


async def test_a_read_returns_the_typed_row_and_structured_errors(
    erp: AgentConfig, nats_server: SecuredNatsServer
) -> None:
    async with admin(nats_server) as js, serving(erp):
        got = await call(js, "api.erp.customer.get", {"id": "ALFKI"}, idempotency_key=None, timeout=5)
        assert got == {"id": "ALFKI", "name": "Alfreds Futterkiste", "currency": "EUR"}
        with pytest.raises(ApiError) as missing:
            await call(js, "api.erp.customer.get", {"id": "NOPE"}, idempotency_key=None, timeout=5)
        assert (missing.value.code, missing.value.retryable) == ("not_found", False)
        with pytest.raises(ApiError) as bad:
            await call(js, "api.erp.customer.get", {"id": 7}, idempotency_key=None, timeout=5)
        assert bad.value.code == "bad_request"
        assert bad.value.message == "request: id: expected `str`, got `int`"
        with pytest.raises(ApiError) as nested:
            body = {**order(), "total": {"amount": "12.50", "currency": "EUR"}}
            await call(js, "api.erp.sales_order.create", body, idempotency_key="k", timeout=5)
        assert nested.value.code == "bad_request"
        assert nested.value.message.startswith("request: total.amount: expected `int`")
        with pytest.raises(ApiError) as unknown:
            await call(js, "api.erp.customer.get", {"id": "A", "x": 1}, idempotency_key=None, timeout=5)
        assert "unknown field `x`" in unknown.value.message
        # The raw reply also carries the micro error headers.
        raw = await js.request("api.erp.customer.get", b"[1]", timeout=5)
        assert raw.headers["Nats-Service-Error-Code"] == "400"
        assert json.loads(raw.data) == {
            "ok": False,
            "error": {
                "code": "bad_request",
                "message": "the request body must be a JSON object",
                "retryable": False,
            },
        }


async def test_a_write_needs_an_idempotency_key_and_runs_once_per_key(
    erp: AgentConfig, erp_db: Path, nats_server: SecuredNatsServer
) -> None:
    metrics = Metrics()
    async with admin(nats_server) as js, serving(erp, metrics=metrics) as [server]:
        with pytest.raises(ApiError) as nokey:
            await call(js, "api.erp.sales_order.create", order(), idempotency_key=None, timeout=5)
        assert nokey.value.code == "bad_request"
        assert "Mesh-Idempotency-Key" in nokey.value.message
        first = await call_detailed(
            js, "api.erp.sales_order.create", order(), idempotency_key="deal-42", timeout=5
        )
        again = await call_detailed(
            js, "api.erp.sales_order.create", order(), idempotency_key="deal-42", timeout=5
        )
        assert (first.replayed, again.replayed) == (False, True)
        assert first.result == again.result == {"order_id": 1, "number": "SO-1"}
        with pytest.raises(ApiError) as reused:
            await call(
                js, "api.erp.sales_order.create", order(amount=99), idempotency_key="deal-42", timeout=5
            )
        assert reused.value.code == "conflict"
        # A refusal of the system is stored and replayed too; the key never runs twice.
        for _ in range(2):
            with pytest.raises(ApiError) as refused:
                await call(
                    js, "api.erp.sales_order.create", order("SO-1"), idempotency_key="other", timeout=5
                )
            assert (refused.value.code, refused.value.retryable) == ("conflict", False)
            assert "UNIQUE" in refused.value.message
        with pytest.raises(ApiError) as check:
            await call(js, "api.erp.sales_order.create", order("SO-2", -1), idempotency_key="neg", timeout=5)
        assert check.value.code == "rejected"
    assert rows(erp_db) == [("SO-1", 1250)]
    assert server.executions == 3

    def count(outcome: str) -> float | None:
        labels = {"operation": "sales_order.create", "outcome": outcome}
        return metrics.registry.get_sample_value("mesh_api_calls_total", labels)

    assert (count("ok"), count("replayed"), count("bad_request"), count("conflict"), count("rejected")) == (
        1, 1, 1, 3, 1,
    )  # fmt: skip


async def test_concurrent_calls_with_one_key_on_two_replicas_execute_once(
    erp: AgentConfig, erp_db: Path, nats_server: SecuredNatsServer
) -> None:
    async with admin(nats_server) as js, serving(erp, replicas=2) as servers:
        results: list[Any] = []

        async def one(i: int) -> None:
            res = await call_detailed(
                js, "api.erp.sales_order.create", order("SO-7"), idempotency_key="saga-7/step-2", timeout=10
            )
            results.append((res.result, res.replayed))

        async with anyio.create_task_group() as tg:
            for i in range(12):
                tg.start_soon(one, i)
    assert rows(erp_db) == [("SO-7", 1250)]
    assert len(results) == 12
    assert {json.dumps(r) for r, _ in results} == {json.dumps({"order_id": 1, "number": "SO-7"})}
    assert sum(1 for _, replayed in results if not replayed) == 1
    assert sum(s.executions for s in servers) == 1
    assert all(s.calls > 0 for s in servers), "the queue group spreads calls over both replicas"


async def test_a_claim_abandoned_after_commit_is_answered_from_the_systems_record(
    erp: AgentConfig, erp_db: Path, nats_server: SecuredNatsServer
) -> None:
    """A replica that crashed after its SQL commit but before storing the result left the claim
    ``running`` and the ``mesh_api_calls`` row: the retry takes the claim over once it expired
    and returns the recorded result without inserting again. One that crashed before the
    commit left no row: the retry executes."""
    async with admin(nats_server) as js, serving(erp) as [server]:
        results = Results(js)
        await call(js, "api.erp.sales_order.create", order("SO-1"), idempotency_key="k1", timeout=5)
        key = kv_key("erp", "k1")
        done, rev = await results.get(key)
        assert done is not None
        crashed = {**done, "state": "running", "owner": "erp-agent/dead", "until": time.time() + 0.3}
        del crashed["reply"]
        await results.write(key, crashed, rev)
        res = await call_detailed(
            js, "api.erp.sales_order.create", order("SO-1"), idempotency_key="k1", timeout=10
        )
        assert (res.result, res.replayed) == ({"order_id": 1, "number": "SO-1"}, True)
        assert server.executions == 1

        # Crashed before its commit: a claim, no row.
        digest = hashlib.sha256(json.dumps(order("SO-2"), sort_keys=True, separators=(",", ":")).encode())
        claim = {"state": "running", "owner": "erp-agent/dead", "until": time.time() + 0.3,
                 "request": digest.hexdigest(), "operation": "sales_order.create"}  # fmt: skip
        await results.write(kv_key("erp", "k2"), claim, 0)
        res = await call_detailed(
            js, "api.erp.sales_order.create", order("SO-2"), idempotency_key="k2", timeout=10
        )
        assert (res.result, res.replayed) == ({"order_id": 2, "number": "SO-2"}, False)
    assert rows(erp_db) == [("SO-1", 1250), ("SO-2", 1250)]


async def test_deadlines_and_internal_errors_are_replies_not_hangs(
    erp: AgentConfig, erp_db: Path, nats_server: SecuredNatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with admin(nats_server) as js, serving(erp):
        past = {"Mesh-Deadline": str(int(time.time() * 1000) - 1), "Mesh-Idempotency-Key": "late"}
        raw = await js.request(
            "api.erp.sales_order.create", json.dumps(order()).encode(), timeout=5, headers=past
        )
        reply = json.loads(raw.data)
        assert reply["error"]["code"] == "deadline_exceeded"
        assert raw.headers["Nats-Service-Error-Code"] == "504"
        with pytest.raises(ApiError) as internal:
            await call(js, "api.erp.report.broken", {}, idempotency_key=None, timeout=5)
        assert internal.value.code == "internal"
        assert "Traceback" not in internal.value.message
        assert "no_such_table" not in internal.value.message
        assert "see the log of agent erp-agent-0" in internal.value.message
        # Waiting for a live claim of another replica ends just before the caller's deadline,
        # with a structured reply (not the caller's own timeout); nothing ran.
        live = {"state": "running", "owner": "erp-agent/other", "until": time.time() + 60,
                "request": "?", "operation": "sales_order.create"}  # fmt: skip
        await Results(js).write(kv_key("erp", "busy"), live, 0)
        with pytest.raises(ApiError) as waiting:
            await call(js, "api.erp.sales_order.create", order(), idempotency_key="busy", timeout=3)
        assert waiting.value.code == "conflict", "a different request under the key is refused at once"
        live["request"] = hashlib.sha256(
            json.dumps(order(), sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()
        await Results(js).write(kv_key("erp", "busy2"), live, 0)
        with pytest.raises(ApiError) as waited:
            await call(js, "api.erp.sales_order.create", order(), idempotency_key="busy2", timeout=3)
        assert (waited.value.code, waited.value.retryable) == ("deadline_exceeded", True)
        assert "still running" in waited.value.message
        with pytest.raises(ApiError) as nobody:
            await call(js, "api.crm.deal.get", {}, idempotency_key=None, timeout=2)
        assert (nobody.value.code, nobody.value.retryable) == ("unavailable", True)
    assert rows(erp_db) == []
    assert any(
        "no_such_table" in r.getMessage() or "no_such_table" in str(r.exc_info) for r in caplog.records
    )


class _Api(BaseHTTPRequestHandler):
    """A finance API: POST /invoices (422 when the amount is negative, 503 for customer DOWN);
    GET /slow sleeps past any test deadline."""

    calls: list[tuple[str, str, dict[str, Any], str | None]] = []
    stop = threading.Event()

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, doc: dict[str, Any]) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        doc = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.calls.append(("POST", self.path, doc, self.headers.get("Idempotency-Key")))
        if doc["amount"] < 0:
            self._send(422, {"message": "amount must not be negative"})
        elif doc["customer"] == "DOWN":
            self._send(503, {"message": "maintenance"})
        else:
            self._send(201, {"data": {"invoice_id": f"INV-{len(self.calls)}", "customer": doc["customer"]}})

    def do_GET(self) -> None:
        self.stop.wait(10)
        self._send(200, {})


@pytest.fixture
def finance_api() -> Iterator[str]:
    _Api.calls = []
    _Api.stop = threading.Event()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        _Api.stop.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


REST_OPS = """
[[api.operations]]
name = "invoice.create"
request = {{ fields = {{ customer_id = "str", amount = "int" }} }}
[api.operations.run]
adapter = "rest"
base_url = "{url}"
path = "/invoices"
body = {{ customer = "customer_id", amount = "amount" }}
response_path = "data"

[[api.operations]]
name = "invoice.slow"
read = true
timeout = 0.5
[api.operations.run]
adapter = "rest"
base_url = "{url}"
method = "GET"
path = "/slow"
"""


async def test_rest_operations_map_the_body_the_response_and_the_status(
    tmp_path: Path, finance_api: str, nats_server: SecuredNatsServer
) -> None:
    text = agent_toml(
        "finance-agent", "finance", tmp_path / "fin", REST_OPS.format(url=finance_api), nats_server
    )
    cfg = secure_config(text, tmp_path / "fin.creds", nats_server)
    subject = "api.finance.invoice.create"
    async with admin(nats_server) as js, serving(cfg):
        got = await call(
            js, subject, {"customer_id": "ALFKI", "amount": 100}, idempotency_key="inv-1", timeout=5
        )
        assert got == {"invoice_id": "INV-1", "customer": "ALFKI"}
        again = await call_detailed(
            js, subject, {"customer_id": "ALFKI", "amount": 100}, idempotency_key="inv-1", timeout=5
        )
        assert again.replayed
        with pytest.raises(ApiError) as refused:
            await call(
                js, subject, {"customer_id": "ALFKI", "amount": -5}, idempotency_key="inv-2", timeout=5
            )
        assert refused.value.code == "rejected"
        assert "422: amount must not be negative" in refused.value.message
        with pytest.raises(ApiError) as down:
            await call(js, subject, {"customer_id": "DOWN", "amount": 1}, idempotency_key="inv-3", timeout=5)
        assert (down.value.code, down.value.retryable) == ("unavailable", True)
        with pytest.raises(ApiError) as slow:
            await call(js, "api.finance.invoice.slow", {}, idempotency_key=None, timeout=5)
        assert (slow.value.code, slow.value.retryable) == ("deadline_exceeded", True)
    posts = [c for c in _Api.calls if c[0] == "POST"]
    assert [c[2] for c in posts] == [
        {"customer": "ALFKI", "amount": 100},
        {"customer": "ALFKI", "amount": -5},
        {"customer": "DOWN", "amount": 1},
    ]
    assert posts[0][3] == hashlib.sha256(b"inv-1").hexdigest(), "the idempotency key is passed on, hashed"


async def test_an_agent_of_crm_cannot_serve_erps_api_nor_touch_erps_results(
    tmp_path: Path, erp_db: Path, erp: AgentConfig, nats_server: SecuredNatsServer
) -> None:
    crm_text = agent_toml("crm-agent", "crm", tmp_path / "crm", SQLITE_OPS.format(db=erp_db), nats_server)
    crm = secure_config(crm_text, tmp_path / "crm.creds", nats_server)
    assert crm.api is not None
    async with admin(nats_server) as js, serving(erp):
        await call(js, "api.erp.sales_order.create", order(), idempotency_key="k", timeout=5)
        async with JetStream(crm.nats, name="crm-agent") as crm_js:
            impostor = ApiServer(crm_js, crm.api, system="erp", agent="crm-agent")
            with pytest.raises(Refused, match=r"permission denied: subscribe to api\.erp\."):
                await impostor.run()
            theirs = Results(crm_js)
            with pytest.raises(Refused, match="permission denied"):
                await crm_js.read_key(RESULTS_BUCKET, kv_key("erp", "k"))
            with pytest.raises(Refused, match="permission denied"):
                await theirs.write(kv_key("erp", "k"), {"state": "done", "reply": {"ok": True}}, 0)
            # Its own system's keys and service are fine.
            async with serving(crm):
                got = await call(js, "api.crm.customer.get", {"id": "ALFKI"}, idempotency_key=None, timeout=5)
                assert got["id"] == "ALFKI"


async def test_every_call_is_traced_in_its_callers_transaction(
    erp: AgentConfig, erp_db: Path, nats_server: SecuredNatsServer
) -> None:
    """The server records ``api_call`` started + outcome (ok, replayed, the error code) with the
    caller's correlation id to the agent's recorder; the index reads those outcomes."""
    from mesh.trace import TraceRecorder, TxnIndex, use_recorder

    tracer = TraceRecorder("erp-agent", "erp")  # no transport: records stay in memory
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with use_recorder(tracer):
        async with admin(nats_server) as js, serving(erp) as _:
            for _ in range(2):
                await call(js, "api.erp.sales_order.create", order(), idempotency_key="t-1", timeout=5,
                           correlation_id="deal:7-txn", causation_id="env-1", traceparent=parent)  # fmt: skip
            with pytest.raises(ApiError):
                await call(js, "api.erp.sales_order.create", order("SO-2", -1), idempotency_key="t-2",
                           timeout=5, correlation_id="deal:8-txn")  # fmt: skip
            await call(js, "api.erp.customer.get", {"id": "ALFKI"}, idempotency_key=None, timeout=5)
    by_corr: dict[str, list[Any]] = {}
    for r in tracer.buffer:
        assert r.kind == "api_call"
        assert (r.agent, r.system) == ("erp-agent", "erp")
        by_corr.setdefault(r.correlation_id, []).append(r)
    ok = by_corr.pop("deal:7-txn")
    assert [r.outcome for r in ok] == ["started", "ok", "started", "replayed"]
    assert {r.detail for r in ok} == {"api.erp.sales_order.create"}
    assert {r.causation_id for r in ok} == {"env-1"}
    assert all(r.traceparent.split("-")[1] == parent.split("-")[1] for r in ok), "same trace id"
    assert all(r.traceparent != parent for r in ok), "a child span, not the caller's"
    refused = by_corr.pop("deal:8-txn")
    assert [r.outcome for r in refused] == ["started", "rejected"]
    assert refused[1].detail.startswith("api.erp.sales_order.create: ")
    # an uncorrelated call is traced as its own transaction
    [(corr, read)] = by_corr.items()
    assert [r.outcome for r in read] == ["started", "ok"]
    assert corr

    index = TxnIndex()
    for r in tracer.buffer:
        index.add(r)
    assert index.find("deal:7-txn")[0].status() == ("completed", "")
    status, reason = index.find("deal:8-txn")[0].status()
    assert status == "failed"
    assert reason.startswith("api.erp.sales_order.create: ")
    assert reason.endswith(": rejected")
