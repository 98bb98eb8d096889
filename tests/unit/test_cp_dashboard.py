"""The dashboard page and the bearer-token middleware's public routes: with a token configured
the page shell and its static files are served without it and carry no data; every data route
still answers 401 without the right token. Without a token the page is server-rendered from the
``/status`` summary: transactions (a failed one links to its trace), bulk runs, the agents that
need attention."""

from __future__ import annotations

import time

import httpx
import msgspec
import pytest
from prometheus_client import CollectorRegistry

from mesh.controlplane.http import CSP, create_app, is_public, render_dashboard
from mesh.controlplane.models import AgentView, ControlPlaneInfo, FlowView, StatusReport
from mesh.runs.report import RunSummary
from mesh.trace import TransactionsView, TxnSummary

pytestmark = [pytest.mark.timeout(20)]

TOKEN = "tok-dash-7"


def agent(name: str, site: str, health: str) -> AgentView:
    now = time.time()
    return AgentView(
        name=name, agent_id=f"id-{name}", site=site, host="h1", version="1.0", state="active",
        health=health, reason="" if health == "healthy" else "no heartbeat for 40 s",  # type: ignore[arg-type]
        registered_at=now - 60, last_heartbeat=now - 1, heartbeat_age_seconds=1.0,
    )  # fmt: skip


def report() -> StatusReport:
    now = time.time()
    failed = TxnSummary(
        correlation_id="corr-failed-1", status="failed", started=int(now * 1000) - 900,
        updated=int(now * 1000), business_keys=["customer:42"], systems=["crm", "erp"], records=3,
        reason="dead-lettered by crm-agent: refused by the CRM",
    )  # fmt: skip
    run = RunSummary(
        flow="customers", run="customers-20261203T020000Z", agent="erp-agent", adapter="sqlite",
        state="completed", started_at=now - 120, finished_at=now - 60, read=1200, published=1200,
        applied=1199, skipped=1, resumed=2, checksum="9f3c0a7be1d24c55aa01",
    )  # fmt: skip
    return StatusReport(
        schema_version="mesh-cp-status/1",
        generated_at=now,
        control_plane=ControlPlaneInfo(
            replica="cp-replica-2", leader="cp-replica-1", is_leader=False, nats_connected=True, version="1"
        ),
        agents=[agent("plant-agent-lost", "plant-9", "lost"), agent("fine-agent-ok", "cloud", "healthy")],
        flows=[
            FlowView(
                name="flow-customers",
                state="running",
                agents=["x"],
                backlog=0,
                consumer_pending=0,
                lag_seconds=None,
                dlq_depth=0,
            )
        ],
        counts={"healthy": 1, "degraded": 0, "stale": 0, "lost": 1},
        transactions=TransactionsView(
            counts={"in_progress": 0, "completed": 7, "failed": 1, "compensated": 0}, recent_failed=[failed]
        ),
        runs=[run],
    )


class Source:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()

    def status(self) -> StatusReport:
        return report()

    async def readiness(self) -> str | None:
        return None


def client(token: str | None) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(Source(), token=token)),
                             base_url="http://cp")  # fmt: skip


@pytest.mark.parametrize(
    ("path", "public"),
    [
        ("/", True),
        ("/healthz", True),
        ("/readyz", True),
        ("/static/dashboard.js", True),
        ("/static/uPlot.min.css", True),
        ("/static/unknown.js", True),  # public, and 404: no such package file
        ("/static/", False),
        ("/static", False),
        ("/static/a/b", False),
        ("/static/../http.py", False),
        ("/status", False),
        ("/status/schema", False),
        ("/api/series", False),
        ("/metrics", False),
        ("/trace", False),
        ("/trace/corr-failed-1", False),
        ("//", False),
        ("/index.html", False),
        ("/healthz/", False),
    ],
)
def test_public_routes(path: str, public: bool) -> None:
    assert is_public(path) is public


@pytest.mark.anyio
async def test_with_a_token_the_shell_and_static_files_are_public_and_carry_no_data() -> None:
    async with client(TOKEN) as c:
        page = await c.get("/")
        assert page.status_code == 200
        assert page.headers["content-security-policy"] == CSP
        assert 'data-auth="token"' in page.text
        assert '<form id="login"' in page.text
        assert 'type="password"' in page.text
        for data in ("cp-replica-2", "plant-agent-lost", "fine-agent-ok", "corr-failed-1", "customers-2026",
                     "flow-customers", "plant-9"):  # fmt: skip
            assert data not in page.text, data
        assert "<script>" not in page.text  # no inline script: the CSP would refuse it
        assert 'href="status"' not in page.text  # a link cannot carry the token: none to data routes
        assert 'href="metrics"' not in page.text
        for name in ("dashboard.js", "dashboard.css", "uPlot.iife.min.js", "uPlot.min.css", "uPlot.LICENSE"):
            r = await c.get(f"/static/{name}")
            assert r.status_code == 200, name
            assert r.headers["content-security-policy"] == CSP
        assert (await c.get("/static/nothing.js")).status_code == 404


@pytest.mark.anyio
async def test_with_a_token_every_data_route_still_needs_it() -> None:
    paths = ("/status", "/status?agents=all", "/status/schema", "/api/series", "/metrics", "/trace",
             "/trace/corr-failed-1", "/static/a/b", "/nope")  # fmt: skip
    async with client(TOKEN) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
            for path in paths:
                r = await c.get(path, headers=headers)
                assert r.status_code == 401, (path, headers)
                assert r.headers["www-authenticate"].startswith("Bearer")
                assert r.json() == {"error": "missing or wrong bearer token", "status": 401}
                assert "plant-agent-lost" not in r.text
        ok = await c.get("/status", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200
        assert ok.json()["agents"][0]["name"] == "plant-agent-lost"


@pytest.mark.anyio
async def test_without_a_token_the_page_is_the_rendered_summary() -> None:
    async with client(None) as c:
        page = (await c.get("/")).text
    assert 'data-auth="none"' in page
    assert '<a href="status">status JSON</a>' in page
    assert "cp-replica-2</b> (follower) · leader cp-replica-1" in page
    assert "2 agent(s): healthy 1 · degraded 0 · stale 0 · lost 1" in page
    assert "plant-agent-lost" in page
    assert "fine-agent-ok" not in page  # the summary: healthy agents are counted, not listed
    assert '<a href="#trace=corr-failed-1">corr-failed-1</a>' in page  # opens the trace panel
    assert "refused by the CRM" in page
    assert "failed 1" in page
    assert "completed 7" in page
    runs = page[page.index('<div id="runs">') : page.index("<h2>Agents</h2>")]
    for cell in ("customers-20261203T020000Z", "completed", "<td>1200</td>", "<td>1199</td>", "<td>2</td>",
                 "9f3c0a7be1d24c55"):  # fmt: skip
        assert cell in runs, cell


def test_shell_without_report_and_escaping() -> None:
    shell = render_dashboard(None)
    assert "loading…" in shell
    hostile = msgspec.structs.replace(
        report(), agents=[agent("<img src=x onerror=alert(1)>", "s<b>", "lost")]
    )
    txns = hostile.transactions
    assert txns is not None
    bad = msgspec.structs.replace(
        txns.recent_failed[0], correlation_id='x"><script>1</script>', reason="<b>r</b>"
    )
    hostile = msgspec.structs.replace(
        hostile,
        transactions=msgspec.structs.replace(txns, recent_failed=[bad]),
        runs=[msgspec.structs.replace(hostile.runs[0], run="<i>run</i>", checksum="<u>")],
    )
    page = render_dashboard(hostile)
    assert "<script>" not in page
    assert (
        '<a href="#trace=x%22%3E%3Cscript%3E1%3C%2Fscript%3E">x&quot;&gt;&lt;script&gt;1&lt;/script&gt;</a>'
        in page
    )
    for raw in ("<b>r</b>", "<i>run</i>", "<u>"):
        assert raw not in page
    assert "&lt;i&gt;run&lt;/i&gt;" in page
    assert "<img src=x" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "site s&lt;b&gt;" in page
