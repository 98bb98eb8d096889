"""The control plane's dashboard in headless Chromium against a running mesh (secured
nats-server, control plane, an on-prem and a cloud agent moving changes, 60 registered agents
that never ran): every chart is drawn with data points read back from uPlot (not an empty frame),
the page updates itself without a reload, reading the ``/status`` summary (never every agent)
with ``If-None-Match``; a failed business transaction (the CRM refuses one customer) is listed
and opens its trace in the page; the latest bulk run shows its counts, resumes and checksum;
the agents needing attention page 25 at a time and every agent can be filtered by site; dead
letters list their reason; no console error (a CSP violation would be one); a screenshot is
kept (tmp dir, copied to $MESH_ARTIFACTS_DIR).

With a bearer token configured: the page shell loads without it, asks for the token, shows the
401 message for a wrong one and the data for the right one (kept in sessionStorage, never in a
URL or cookie), the data routes still answer 401 without it, and when the control plane dies
the page says since when its data is stale.

Needs Debian's ``chromium`` (driven by Playwright with ``executable_path``: no browser
download); without it the test skips with the reason, unless ``MESH_REQUIRE_CHROMIUM=1``: then it
fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from prometheus_client import CollectorRegistry

from mesh.broker import free_port
from mesh.controlplane.client import ControlPlaneClient, register_agent
from mesh.controlplane.http import HttpServer, create_app
from mesh.controlplane.models import AgentView, ControlPlaneInfo, Manifest, StatusReport
from mesh.readiness import wait_ready
from mesh.runs.records import BulkRun, run_key
from mesh.runs.report import RUNS_BUCKET, RunEntry
from mesh.transport import JetStream
from tests._secure import SecuredNatsServer
from tests.integration._harness import log_tail, rows, wait_until
from tests.integration._ops_stack import OpsStack, ops_stack
from tests.integration.test_kpis import _publish_garbage

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

KINDS = ("throughput", "latency", "failures", "retries", "backlog")
IDLE = 60
"""Agents registered that never heartbeat: they go stale, so the summary lists them."""
POISON = 900_001
"""The customer id the CRM refuses (a trigger): its transaction fails and is dead-lettered."""
RUN = BulkRun(
    id="customers-20261203T020000Z", flow="customers", adapter="sqlite", agent="erp-agent",
    state="completed", started_at=time.time() - 120, finished_at=time.time() - 60, read=1200,
    published=1200, resumed=1, checksum="5be0c2f1a9d34e7788aa01",
)  # fmt: skip


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path is not None:
            return path
    reason = "chromium not found (apt-get install chromium)"
    if os.environ.get("MESH_REQUIRE_CHROMIUM") == "1":
        pytest.fail(f"{reason} (and MESH_REQUIRE_CHROMIUM=1)")
    pytest.skip(reason)


async def _idle_agents_and_a_run(server: SecuredNatsServer, tmp: Path) -> None:
    """Register the idle agents (site plant-x) and record a bulk run in ``mesh_runs`` the way an
    agent reports one (the agent side: test_run_start)."""
    async with JetStream(server.nats_config(request_timeout=5.0), name="test-dashboard") as js:
        client = ControlPlaneClient(js, timeout=10)
        for i in range(IDLE):
            name = f"idle-{i:02d}"
            await register_agent(client, name=name, site="plant-x", state_dir=str(tmp / name),
                                 manifest=Manifest(), current=None)  # fmt: skip
        bucket = await js.key_value(RUNS_BUCKET, create=False)
        entry = msgspec.json.encode(RunEntry(role="source", source=RUN))
        await bucket.put(run_key(RUN.agent, RUN.flow, RUN.id, "source"), entry)


def _poison(stack: OpsStack) -> None:
    """The CRM refuses customer POISON (an integrity error: dead-lettered, not retried)."""
    with sqlite3.connect(stack.crm_db, timeout=30) as c:
        c.execute(f"CREATE TRIGGER refuse BEFORE INSERT ON customers WHEN NEW.id = {POISON} "
                  "BEGIN SELECT RAISE(ABORT, 'refused by the CRM: customer on hold'); END")  # fmt: skip
    with sqlite3.connect(stack.erp.db, timeout=30) as c:
        c.execute(
            "INSERT INTO customers VALUES (?, 'On Hold Ltd', 'hold@example.com', 'DE', 0, 0.0)", (POISON,)
        )


def _failed_txn(stack: OpsStack) -> str | None:
    tx = stack.get("/status")["transactions"]
    for t in (tx or {}).get("recent_failed", []):
        if f"customer:{POISON}" in t["business_keys"]:
            return str(t["correlation_id"])
    return None


def test_dashboard_draws_charts_from_the_running_mesh(nats_server: SecuredNatsServer, tmp_path: Path) -> None:
    chromium = _chromium()
    from playwright.sync_api import sync_playwright

    with ops_stack(nats_server, tmp_path) as stack:
        stop = threading.Event()

        def load() -> None:
            while not stop.wait(0.05):
                stack.erp.mixed(5)

        stack.erp.insert(200)
        wait_until(lambda: len(rows(stack.crm_db)) == 200, 30, "200 rows at the CRM")
        anyio.run(_publish_garbage, stack, nats_server)
        anyio.run(_idle_agents_and_a_run, nats_server, tmp_path)
        _poison(stack)
        worker = threading.Thread(target=load, daemon=True)
        worker.start()
        try:

            def series_ready() -> bool:
                doc = stack.get("/api/series?flow=customers&minutes=5")
                return len(doc["t"]) >= 3 and any(v for v in doc["applied_per_second"])

            wait_until(series_ready, 30, "3 points of series with changes applied")
            wait_until(lambda: any(f["dlq_top_reasons"] for f in stack.get("/status")["flows"]), 20,
                       "the dead letters' reasons in /status")  # fmt: skip
            wait_until(lambda: _failed_txn(stack) is not None, 30, f"customer {POISON}'s failed transaction")
            cid = _failed_txn(stack)
            assert cid is not None
            wait_until(lambda: stack.get("/status?health=stale")["agents_page"]["total"] == IDLE, 30,
                       f"{IDLE} idle agents stale")  # fmt: skip
            wait_until(lambda: [r["run"] for r in stack.get("/status")["runs"]] == [RUN.id], 20, "the run")
            errors: list[str] = []
            status_requests: list[tuple[str, str | None]] = []
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
                try:
                    page = browser.new_page(viewport={"width": 1700, "height": 1300})
                    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                    page.on("pageerror", lambda e: errors.append(str(e)))
                    page.on(
                        "response",
                        lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None,
                    )
                    page.on("request", lambda r: status_requests.append((r.url, r.headers.get("if-none-match")))  # noqa: E501
                            if "/status" in r.url else None)  # fmt: skip
                    page.goto(stack.http + "/")
                    page.evaluate("() => { window.__sameDocument = true; }")
                    page.wait_for_function(
                        "() => window.meshCharts && window.meshCharts.customers"
                        " && window.meshCharts.customers.throughput.data[0].length >= 3",
                        timeout=20_000,
                    )
                    data = page.evaluate(
                        "() => Object.fromEntries(Object.entries(window.meshCharts.customers)"
                        ".map(([k, u]) => [k, u.data]))"
                    )
                    assert set(data) == set(KINDS)
                    assert any(v and v > 0 for v in data["throughput"][1]), data["throughput"]  # applied/s
                    assert any(v is not None and v > 0 for v in data["latency"][2]), data["latency"]  # p99
                    for kind in KINDS:
                        assert len(data[kind][0]) >= 3, kind
                        assert all(len(col) == len(data[kind][0]) for col in data[kind][1:]), kind
                    assert page.locator("#charts canvas").count() >= len(KINDS)
                    # updated in place: a later refresh, same document (no reload)
                    first = page.evaluate("() => document.body.dataset.updated")
                    page.wait_for_function(
                        f"() => document.body.dataset.updated && document.body.dataset.updated !== '{first}'",
                        timeout=15_000,
                    )
                    assert page.evaluate("() => window.__sameDocument === true")
                    summary = page.locator("#summary").inner_text()
                    assert "replica cp1 (leader) · leader cp1 · NATS connected" in summary
                    assert page.locator("#counts").inner_text().startswith(f"{IDLE + 2} agent(s): healthy ")
                    _transactions_and_trace(page, cid, tmp_path / "dashboard-trace.png")
                    _runs(page)
                    _agents(page)
                    assert "DecodeError" in page.locator("#dlq").inner_text()
                    assert page.locator("#error").inner_text() == ""
                    assert page.locator("#stale").is_hidden()
                    shot = tmp_path / "dashboard.png"
                    page.screenshot(path=str(shot), full_page=True)
                finally:
                    browser.close()
            assert errors == []
            assert shot.stat().st_size > 10_000
            # the summary by default, every agent only paged: never the whole list in one answer
            assert status_requests
            for url, _ in status_requests:
                assert "limit=" in url, url
            assert status_requests[0][0].endswith("/status?agents=summary&limit=50&offset=0")
            # the last answer's ETag goes back (an unchanged status would be a 304 with no body)
            assert any(tag for _, tag in status_requests[1:]), status_requests
            artifacts = os.environ.get("MESH_ARTIFACTS_DIR")
            if artifacts:
                Path(artifacts).mkdir(parents=True, exist_ok=True)
                shutil.copy(shot, Path(artifacts) / "dashboard.png")
                shutil.copy(tmp_path / "dashboard-trace.png", Path(artifacts) / "dashboard-trace.png")
        finally:
            stop.set()
            worker.join(10)


def _transactions_and_trace(page: Any, cid: str, shot: Path) -> None:
    txns = page.locator("#transactions").inner_text()
    assert "failed" in txns
    assert cid in txns
    assert "customer on hold" in txns
    assert page.locator("#trace").is_hidden()
    page.locator(f'#transactions a[href="#trace={cid}"]').click()
    page.wait_for_function("() => document.querySelector('#trace-body table')", timeout=10_000)
    trace = page.locator("#trace").inner_text()
    assert cid in trace
    assert "failed" in trace
    assert f"customer:{POISON}" in trace
    for step in ("captured", "erp-agent", "dead_lettered", "crm-agent"):
        assert step in trace, step
    records = page.locator("#trace-body tr").count() - 1
    assert records >= 3  # captured, published, dead-lettered
    page.locator("#trace").screenshot(path=str(shot))
    page.locator("#trace-close").click()
    page.wait_for_function("() => document.getElementById('trace').hidden", timeout=5_000)


def _runs(page: Any) -> None:
    runs = page.locator("#runs tr").nth(1).locator("td").all_inner_texts()
    assert runs[:5] == ["customers", RUN.id, "erp-agent", "sqlite", "completed"]
    assert runs[7:9] == ["1200", "1200"]  # read, published
    assert runs[12] == "1"  # resumed
    assert runs[13] == RUN.checksum[:16]


def _agent_names(page: Any) -> list[str]:
    return [t for t in page.locator("#agents td:first-child").all_inner_texts()]


def _page_text(page: Any, text: str) -> None:
    page.wait_for_function(
        "t => document.getElementById('agent-page').textContent === t", arg=text, timeout=10_000
    )


def _agents(page: Any) -> None:
    # the summary lists the agents needing attention, 50 at a time: the idle ones (stale), and a
    # running one while it is degraded (its outbox behind under load); narrowed to the stale ones
    text = page.locator("#agent-page").inner_text()
    assert text.startswith("needing attention: 1-50 of "), text
    assert int(text.split(" of ")[1].split(" ")[0]) >= IDLE, text
    page.select_option("#agent-health", "stale")
    _page_text(page, f"needing attention: 1-50 of {IDLE} · 3 site(s)")
    assert "crm-agent" not in page.locator("#agents").inner_text()
    page.select_option("#agent-limit", "25")
    _page_text(page, f"needing attention: 1-25 of {IDLE} · 3 site(s)")
    first = _agent_names(page)
    assert len(first) == 25
    assert page.locator("#agent-prev").is_disabled()
    page.locator("#agent-next").click()
    _page_text(page, f"needing attention: 26-50 of {IDLE} · 3 site(s)")
    second = _agent_names(page)
    assert len(second) == 25
    assert not set(first) & set(second)
    page.locator("#agent-next").click()
    _page_text(page, f"needing attention: 51-60 of {IDLE} · 3 site(s)")
    assert len(_agent_names(page)) == 10
    assert page.locator("#agent-next").is_disabled()
    assert set(first) | set(second) | set(_agent_names(page)) == {f"idle-{i:02d}" for i in range(IDLE)}
    # every agent, then one site by clicking it in the sites table
    page.select_option("#agent-health", "")
    page.select_option("#agent-mode", "all")
    _page_text(page, f"agents: 1-25 of {IDLE + 2} · 3 site(s)")
    page.locator('#sites button[data-site="cloud"]').click()
    _page_text(page, "agents: 1-1 of 1 · 3 site(s)")
    assert _agent_names(page) == ["crm-agent"]
    assert "site cloud" in page.locator("#agents").inner_text()
    page.fill("#agent-site", "on-prem")
    page.locator("#agent-site").dispatch_event("change")
    page.wait_for_function(
        "() => document.getElementById('agents').textContent.includes('site on-prem')", timeout=10_000
    )
    assert page.locator("#agent-page").inner_text() == "agents: 1-1 of 1 · 3 site(s)"
    assert _agent_names(page) == ["erp-agent"]
    assert "active" in page.locator("#agents").inner_text()


def _get(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_dashboard_with_a_bearer_token(nats_server: SecuredNatsServer, tmp_path: Path) -> None:
    chromium = _chromium()
    from playwright.sync_api import sync_playwright

    token = "dash-" + os.urandom(12).hex()
    settings = tmp_path / "cp.toml"
    settings.write_text('http_token_env = "MESH_TEST_DASH_TOKEN"\nsweep_interval = 0.25\n')
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "cp.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mesh", "control-plane", "run", "--config", str(settings),
             "--nats", nats_server.url, "--http", f"127.0.0.1:{port}", "--name", "cp-dash"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "MESH_TEST_DASH_TOKEN": token,
                 "MESH_CREDS": str(nats_server.security_dir / "creds" / "control-plane.creds")},
        )  # fmt: skip
    try:
        try:
            wait_ready(f"{base}/readyz", timeout=30, alive=lambda: proc.poll() is None)
        except Exception as exc:
            raise AssertionError(f"control plane: {exc}\n{log_tail(log)}") from None
        # the data routes stay behind the token; the shell and its static files do not
        for path in ("/status", "/api/series", "/trace", "/trace/customer:1", "/metrics", "/status/schema"):
            assert _get(base + path) == 401, path
            assert _get(base + path, "wrong") == 401, path
        assert _get(base + "/status", token) == 200
        assert _get(base + "/") == 200
        assert _get(base + "/static/dashboard.js") == 200

        errors: list[str] = []
        urls: list[str] = []
        auth_headers: list[str | None] = []
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            try:
                page = browser.new_page()
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.on(
                    "console",
                    lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None,
                )
                page.on(
                    "request",
                    lambda r: (urls.append(r.url), auth_headers.append(r.headers.get("authorization"))),
                )
                page.goto(base + "/")
                login = page.locator("#login")
                login.wait_for(state="visible", timeout=10_000)
                assert page.locator("#summary").inner_text() == "control plane"  # no data in the shell
                assert not [u for u in urls if "/status" in u]  # nothing asked before the token
                page.fill("#token", "not-the-token")
                page.locator("#login button[type=submit]").click()
                page.wait_for_function(
                    "() => document.getElementById('login-msg').textContent.includes('HTTP 401')",
                    timeout=10_000,
                )
                assert "refused this token" in page.locator("#login-msg").inner_text()
                assert login.is_visible()
                assert page.evaluate("() => sessionStorage.length") == 0  # a refused token is not kept
                page.fill("#token", token)
                page.locator("#login button[type=submit]").click()
                page.wait_for_function(
                    "() => document.getElementById('summary').textContent.includes('replica cp-dash')",
                    timeout=10_000,
                )
                assert login.is_hidden()
                assert "replica cp-dash (leader)" in page.locator("#summary").inner_text()
                assert "0 agent(s)" in page.locator("#counts").inner_text()
                assert page.locator("#session").is_visible()
                # kept for this tab only, never in a cookie; a reload does not ask again
                assert page.evaluate("() => Object.values(sessionStorage)") == [token]
                assert page.evaluate("() => document.cookie") == ""
                page.reload()
                page.wait_for_function(
                    "() => document.getElementById('summary').textContent.includes('replica cp-dash')",
                    timeout=10_000,
                )
                assert login.is_hidden()
                # the control plane dies: the page says since when its data is stale
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
                stale = page.locator("#stale")
                stale.wait_for(state="visible", timeout=15_000)
                text = stale.inner_text()
                assert "Data is stale: last good refresh at" in text
                assert "unreachable" in text
                assert page.evaluate("() => document.body.classList.contains('is-stale')")
            finally:
                browser.close()
        assert errors == []
        assert not [u for u in urls if token in u]  # never in a URL
        assert f"Bearer {token}" in auth_headers
        assert "Bearer not-the-token" in auth_headers
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


class _FixedSource:
    """A status source whose report changes only when the test says so (the control plane's
    HTTP app, really served; only the document is fixed), so its ETag holds between polls."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.report = self.build(nats_connected=True)

    @staticmethod
    def build(*, nats_connected: bool) -> StatusReport:
        now = time.time()
        agents = [
            AgentView(name=f"agent-{i:03d}", agent_id=f"id-{i}", site=f"site-{i % 60:02d}", host="h",
                      version="1", state="active", health="healthy" if i % 10 else "lost",
                      reason="" if i % 10 else "gone", registered_at=now - 600, last_heartbeat=now - 1,
                      heartbeat_age_seconds=1.0)
            for i in range(200)
        ]  # fmt: skip
        counts = {"healthy": 180, "degraded": 0, "stale": 0, "lost": 20}
        return StatusReport(
            schema_version="mesh-cp-status/1", generated_at=now,
            control_plane=ControlPlaneInfo(replica="cp-b", leader="cp-a", is_leader=False,
                                           nats_connected=nats_connected, version="1"),
            agents=agents, flows=[], counts=counts,
        )  # fmt: skip

    def status(self) -> StatusReport:
        return self.report

    async def readiness(self) -> str | None:
        return None


@contextmanager
def _serve(source: _FixedSource) -> Iterator[str]:
    """The control plane's HTTP app for ``source`` on a free loopback port, in a thread."""
    server = HttpServer(create_app(source), "127.0.0.1", 0, grace=1)
    started = threading.Event()
    stop = threading.Event()

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(server.run)
            started.set()
            await anyio.to_thread.run_sync(stop.wait)
            tg.cancel_scope.cancel()

    thread = threading.Thread(target=anyio.run, args=(main,), daemon=True)
    thread.start()
    try:
        assert started.wait(10), "the HTTP server did not start"
        yield server.url
    finally:
        stop.set()
        thread.join(10)


def test_dashboard_revalidates_status_with_etag_and_flags_a_replica_without_nats() -> None:
    chromium = _chromium()
    from playwright.sync_api import sync_playwright

    source = _FixedSource()
    statuses: list[int] = []
    errors: list[str] = []
    with _serve(source) as base, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("response", lambda r: statuses.append(r.status) if "/status?" in r.url else None)
            page.goto(base + "/")
            # the unchanged document is revalidated: 304s, no body, the page keeps showing it
            page.wait_for_function("() => window.meshStats.notModified >= 1", timeout=20_000)
            assert statuses[0] == 200
            assert 304 in statuses
            assert page.evaluate("() => window.meshStats.refreshes") >= 2
            assert (
                "replica cp-b (follower) · leader cp-a · NATS connected"
                in page.locator("#summary").inner_text()
            )
            assert page.locator("#agent-page").inner_text() == "needing attention: 1-20 of 20 · 60 site(s)"
            assert "agent-010" in page.locator("#agents").inner_text()
            assert "agent-011" not in page.locator("#agents").inner_text()  # healthy: counted, not listed
            assert page.locator("#stale").is_hidden()
            # every agent: 60 sites, the table shows 50, the ones with agents needing attention first
            page.select_option("#agent-mode", "all")
            _page_text(page, "agents: 1-50 of 200 · 60 site(s)")
            sites = page.locator("#sites tr td:first-child").all_inner_texts()
            assert len(sites) == 50
            assert sites[:6] == ["site-00", "site-10", "site-20", "site-30", "site-40", "site-50"]
            assert "10 more site(s)" in page.locator("#sites").inner_text()
            # the replica loses NATS: its data is flagged even though HTTP still answers
            source.report = source.build(nats_connected=False)
            stale = page.locator("#stale")
            stale.wait_for(state="visible", timeout=15_000)
            assert "Replica cp-b has lost its NATS connection" in stale.inner_text()
            assert "NATS DISCONNECTED" in page.locator("#summary").inner_text()
        finally:
            browser.close()
    assert errors == []
