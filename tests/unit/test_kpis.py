"""Per-flow KPIs: the agent's metrics and heartbeat counters, the control plane's in-memory series
(deltas per agent incarnation, quantiles, bounds), the KPIs in /status, /api/series and the
dashboard's static files and CSP, and the frames of `meshctl top`."""

from __future__ import annotations

import time

import httpx
import msgspec
import pytest
from prometheus_client import CollectorRegistry

from mesh.cli.top import render_frame
from mesh.controlplane.http import CSP, create_app, render_dashboard
from mesh.controlplane.models import (
    AgentView,
    ControlPlaneInfo,
    DlqReason,
    FlowKpis,
    FlowReport,
    HeartbeatPayload,
    Manifest,
    StatusReport,
)
from mesh.controlplane.series import SeriesStore, quantile
from mesh.controlplane.status import DlqInfo, flow_views, system_views
from mesh.errors import DecodeError, MappingError, RejectedRecord, SystemUnavailable
from mesh.heartbeat import flow_kpis
from mesh.metrics import LATENCY_BUCKETS, Metrics, error_class_of

NB = len(LATENCY_BUCKETS) + 1


def test_error_classes() -> None:
    assert error_class_of(SystemUnavailable("down")) == "transient"
    assert error_class_of(DecodeError("garbage")) == "integrity"
    assert error_class_of(MappingError("no field")) == "mapping"
    assert error_class_of(RejectedRecord("422")) == "rejected"
    assert error_class_of(ValueError("?")) == "other"


def test_agent_metrics_feed_the_heartbeat_counters() -> None:
    m = Metrics(CollectorRegistry())
    m.track_flow("customers", slo_seconds=0.01)
    now = time.time()
    for latency in (0.001, 0.004, 0.004, 0.02):  # the last one misses the 10 ms target
        m.applied("customers", now - latency, latency, 0.01)
        m.handled.labels("customers", "applied").inc()
    m.handled.labels("customers", "duplicate").inc(2)
    m.handled.labels("customers", "not_owner").inc()
    m.failed("customers", SystemUnavailable("crm down"))
    m.failed("customers", MappingError("bad"))
    m.retries.labels("customers").inc(3)
    m.dead_lettered.labels("customers", "MappingError").inc()
    m.captured.labels("customers").inc(7)
    k = flow_kpis(m, now=now + 2)["customers"]
    assert (k.applied, k.duplicates, k.not_owner) == (4, 2, 1)
    assert (k.retries, k.dead_lettered, k.captured) == (3, 1, 7)
    assert k.failures == {"transient": 1, "mapping": 1}
    assert (k.slo_seconds, k.slo_total, k.slo_on_time) == (0.01, 4, 3)
    assert len(k.latency_buckets) == NB
    assert k.latency_buckets[-1] == 4
    assert k.latency_buckets[LATENCY_BUCKETS.index(0.005)] == 3  # cumulative: <= 5 ms
    assert k.freshness_seconds == pytest.approx(2.001, abs=0.01)
    # the Prometheus series exist with the contract's names
    names = {s.name for fam in m.registry.collect() for s in fam.samples}
    for name in ("mesh_failures_total", "mesh_flow_freshness_seconds", "mesh_slo_target_seconds",
                 "mesh_slo_changes_total", "mesh_slo_changes_on_time_total"):  # fmt: skip
        assert name in names, name


def test_a_batch_of_applied_changes_gives_the_samples_of_one_call_each() -> None:
    # bounds themselves, just above and below them, 0, and beyond the last bound (+Inf)
    latencies = [0.0, 0.001, 0.0049, 0.005, 0.0051, 0.25, 1.0, 7.5, 99.0, 1e6, *LATENCY_BUCKETS]
    now = time.time()
    one, many = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    for m in (one, many):
        m.track_flow("customers", slo_seconds=0.5)
    for latency in latencies:
        one.applied("customers", now - latency, latency, 0.5)
    many.applied_many("customers", now, latencies, 0.5)
    many.applied_many("customers", now - 10, [], 0.5)  # nothing applied: nothing changes

    def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in m.registry.collect() for s in fam.samples
            if not s.name.endswith("_created") and "freshness" not in s.name
        }  # fmt: skip

    assert samples(many) == pytest.approx(samples(one))
    assert many.newest_applied == one.newest_applied == {"customers": now}
    k = flow_kpis(many, now=now)["customers"]
    assert (k.slo_total, k.slo_on_time) == (len(latencies), sum(1 for x in latencies if x <= 0.5))


def test_heartbeats_of_old_agents_still_decode() -> None:
    old = b'{"health":"ok","flows":[{"name":"customers","outbox_depth":3,"errors":1}]}'
    payload = msgspec.json.decode(old, type=HeartbeatPayload)
    assert payload.flows[0].kpis is None
    new = msgspec.json.encode(HeartbeatPayload(flows=[FlowReport(name="f", kpis=FlowKpis(applied=1))]))
    assert msgspec.json.decode(new, type=HeartbeatPayload).flows[0].kpis == FlowKpis(applied=1)


def cumulative(per_bucket: dict[float, int]) -> list[int]:
    out, total = [], 0
    for b in (*LATENCY_BUCKETS, float("inf")):
        total += per_bucket.get(b, 0)
        out.append(total)
    return out


def test_quantiles_read_a_5ms_p99() -> None:
    counts = [0] * NB
    counts[LATENCY_BUCKETS.index(0.002)] = 98  # (1 ms, 2 ms]
    counts[LATENCY_BUCKETS.index(0.005)] = 2  # (4 ms, 5 ms]
    p50, p99 = quantile(0.5, counts), quantile(0.99, counts)
    assert p50 is not None
    assert 0.001 < p50 <= 0.002
    assert p99 is not None
    assert 0.004 < p99 <= 0.005
    assert quantile(0.99, [0] * NB) is None
    over = [0] * NB
    over[-1] = 5
    assert quantile(0.5, over) == LATENCY_BUCKETS[-1]


def agent(name: str, kpis: FlowKpis | None, beat: float, *, agent_id: str = "id-1", site: str = "on-prem",
          system: str = "erp", depth: int | None = None, pending: int | None = 0) -> AgentView:  # fmt: skip
    return AgentView(
        name=name, agent_id=agent_id, site=site, host="h", version="1", state="active", health="healthy",
        reason="", registered_at=0.0, last_heartbeat=beat, heartbeat_age_seconds=0.1,
        flows=[FlowReport(name="customers", outbox_depth=depth, consumer_pending=pending, kpis=kpis)],
        manifest=Manifest(system=system),
    )  # fmt: skip


def test_series_takes_deltas_per_incarnation_and_draws_points() -> None:
    s = SeriesStore(resolution=5, capacity=4)
    t = 1000.0
    s.observe([agent("crm", FlowKpis(applied=100, retries=1), t)], now=t)
    assert not s.tick(now=t)  # the first tick starts the clock
    # +50 applied in 5 s, bucket growth: 49 fast changes and one at (4, 5] ms
    k = FlowKpis(applied=150, retries=3, failures={"transient": 2},
                 latency_buckets=cumulative({0.002: 49, 0.005: 1}), slo_total=50, slo_on_time=50)  # fmt: skip
    s.observe([agent("crm", k, t + 5, depth=None, pending=7)], now=t + 5)
    s.observe([agent("crm", k, t + 5, pending=7)], now=t + 5)  # same heartbeat again: not counted twice
    assert s.tick(now=t + 5)
    p = s.points("customers", now=t + 5)[-1]
    assert p.applied == pytest.approx(10.0)
    assert p.retries == pytest.approx(0.4)
    assert p.failures == pytest.approx(0.4)  # a class absent before had counted 0
    assert p.backlog == 7
    assert p.p99 is not None
    assert 0.004 < p.p99 <= 0.005
    # the agent restarted: counters start again from 0; the new values are the growth
    k2 = FlowKpis(applied=20, failures={"transient": 1}, latency_buckets=cumulative({0.01: 20}))
    s.observe([agent("crm", k2, t + 10)], now=t + 10)
    assert not s.tick(now=t + 9)
    assert s.tick(now=t + 10)
    p = s.points("customers", now=t + 10)[-1]
    assert p.applied == pytest.approx(4.0)
    assert p.failures == pytest.approx(0.2)
    assert p.p50 is not None
    assert 0.0075 < p.p50 <= 0.01
    p50, p99 = s.latency("customers")
    assert p50 is not None
    assert p99 is not None
    assert p50 <= p99
    assert s.slo("customers") == (50, 50)
    doc = s.as_json("customers", minutes=60, now=t + 10)
    assert doc["t"] == [t + 5, t + 10]
    assert doc["applied_per_second"] == [10.0, 4.0]
    # bounded: at most `capacity` points
    for i in range(3, 10):
        s.observe([agent("crm", k2, t + 10)], now=t + 5 * i)
        s.tick(now=t + 5 * i)
    assert len(s.series["customers"]) == 4
    # a flow nobody reports for the length of the series is forgotten
    s.observe([], now=t + 100)
    s.tick(now=t + 100)
    assert s.flows() == []


def test_series_forgets_flows_beyond_max_flows() -> None:
    s = SeriesStore(resolution=1, capacity=10, max_flows=2)
    s.tick(now=0)
    for i, name in enumerate(("a", "b", "c")):
        view = agent("x", FlowKpis(), float(i))
        view = msgspec.structs.replace(view, flows=[FlowReport(name=name, kpis=FlowKpis())])
        s.observe([view], now=float(i))
    s.tick(now=5)
    assert s.flows() == ["b", "c"]


def test_status_kpis_per_flow_and_per_system() -> None:
    s = SeriesStore(resolution=1, capacity=100)
    now = 5000.0
    erp = agent("erp", FlowKpis(captured=0), now, agent_id="e", system="erp", depth=0, pending=None)
    crm = agent("crm", FlowKpis(applied=0), now, agent_id="c", site="cloud", system="crm")
    s.observe([erp, crm], now=now)
    s.tick(now=now)
    erp = agent("erp", FlowKpis(captured=40), now + 2, agent_id="e", system="erp", depth=3, pending=None)
    crm = agent("crm", FlowKpis(applied=40, slo_total=40, slo_on_time=30, freshness_seconds=0.5,
                                latency_buckets=cumulative({0.003: 40}), failures={"rejected": 0}),
                now + 2, agent_id="c", site="cloud", system="crm")  # fmt: skip
    s.observe([erp, crm], now=now + 2)
    s.tick(now=now + 2)
    reasons = [DlqReason(error_class="integrity", reason="bad", count=2)]
    dlq = {"customers": DlqInfo(oldest_at=now - 60, top_reasons=reasons)}
    [f] = flow_views([erp, crm], {"customers": 2}, series=s, dlq=dlq, now=now + 3)
    assert f.applied_per_second == pytest.approx(20.0)
    assert f.captured_per_second == pytest.approx(20.0)
    assert f.latency_p50_seconds is not None
    assert 0.002 < f.latency_p50_seconds <= 0.003
    assert f.slo_ratio == pytest.approx(0.75)
    assert f.slo_seconds == 5.0
    assert f.freshness_seconds == pytest.approx(1.5)  # reported 0.5 s, heartbeat 1 s old
    assert f.dlq_oldest_age_seconds == pytest.approx(63.0)
    assert f.dlq_top_reasons[0].error_class == "integrity"
    assert (f.applied, f.backlog) == (40, 3)
    systems = {v.name: v for v in system_views([erp, crm], s)}
    assert systems["crm"].applied_per_second == pytest.approx(20.0)
    assert systems["crm"].sites == ["cloud"]
    assert systems["erp"].captured_per_second == pytest.approx(20.0)
    assert systems["erp"].backlog == 3


def report(series: SeriesStore | None = None) -> StatusReport:
    now = time.time()
    views = [agent("erp-agent", None, now - 1, depth=2), agent("<b>crm</b>", None, now - 1, site="cloud")]
    return StatusReport(
        schema_version="mesh-cp-status/1", generated_at=now,
        control_plane=ControlPlaneInfo(replica="cp1", leader="cp1", is_leader=True, nats_connected=True,
                                       version="1"),
        agents=views, flows=flow_views(views, {"customers": 1}, series=series, now=now),
        counts={"healthy": 2, "degraded": 0, "stale": 0, "lost": 0}, systems=system_views(views, series),
    )  # fmt: skip


def test_top_frame_plain_and_coloured() -> None:
    plain = render_frame(report(), width=200)
    assert "\x1b" not in plain
    lines = plain.splitlines()
    assert lines[0].startswith("meshctl top · replica cp1 (leader)")
    assert any(line.startswith("SITE") and "HEALTH" in line for line in lines)
    assert any(line.startswith("cloud") and "<b>crm</b>" in line for line in lines)
    assert any(line.startswith("FLOW") and "P99" in line and "SLO" in line for line in lines)
    assert any(line.startswith("customers") for line in lines)
    coloured = render_frame(report(), width=200, ansi=True)
    assert "\x1b[32mhealthy" in coloured


class Source:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()

    def status(self) -> StatusReport:
        return report()

    async def readiness(self) -> str | None:
        return None


@pytest.mark.anyio
async def test_api_series_static_files_and_csp() -> None:
    s = SeriesStore(resolution=1, capacity=10)
    s.tick(now=time.time() - 2)
    s.observe([agent("crm", FlowKpis(applied=1), 1.0)])
    s.tick()
    app = create_app(Source(), series=s)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://cp") as c:
        r = await c.get("/api/series", params={"flow": "customers", "minutes": "5"})
        assert r.status_code == 200
        assert r.headers["content-security-policy"] == CSP
        doc = r.json()
        assert doc["flow"] == "customers"
        assert len(doc["t"]) == 1
        assert set(doc) >= {"applied_per_second", "latency_p99_seconds", "backlog_messages"}
        assert [d["flow"] for d in (await c.get("/api/series")).json()["flows"]] == ["customers"]
        r = await c.get("/api/series", params={"flow": "nope"})
        assert r.status_code == 404
        assert "customers" in r.json()["error"]
        assert (await c.get("/api/series", params={"minutes": "x"})).status_code == 400
        js = await c.get("/static/uPlot.iife.min.js")
        assert js.status_code == 200
        assert js.headers["content-type"].startswith("text/javascript")
        assert "uPlot" in js.text
        assert (await c.get("/static/dashboard.js")).status_code == 200
        assert "MIT" in (await c.get("/static/uPlot.LICENSE")).text
        assert (await c.get("/static/..%2Fhttp.py")).status_code == 404
        assert (await c.get("/static/nothing.js")).status_code == 404
        page = await c.get("/")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert "http-equiv" not in page.text  # updated by fetch, not by reloading the page
        assert '<script src="static/dashboard.js?v=' in page.text
        assert "<script>" not in page.text


def test_dashboard_groups_agents_by_site_and_escapes() -> None:
    page = render_dashboard(report())
    assert page.index("site cloud") < page.index("site on-prem")
    assert "&lt;b&gt;crm&lt;/b&gt;" in page
    assert "<b>crm</b>" not in page


@pytest.mark.anyio
async def test_series_needs_the_bearer_token_static_files_do_not() -> None:
    app = create_app(Source(), token="tok-9", series=SeriesStore())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://cp") as c:
        r = await c.get("/api/series")
        assert r.status_code == 401
        assert r.headers["content-security-policy"] == CSP
        for path in ("/static/dashboard.js", "/static/uPlot.iife.min.js"):  # package files, no data
            r = await c.get(path)
            assert r.status_code == 200, path
            assert r.headers["content-security-policy"] == CSP
        r = await c.get("/api/series", headers={"Authorization": "Bearer tok-9"})
        assert r.json() == {"flows": []}
