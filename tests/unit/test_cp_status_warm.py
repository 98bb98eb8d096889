"""/status encodings warmed ahead of requests: what a request gets is what the sweep built."""

from __future__ import annotations

import gzip

import httpx
import msgspec
import pytest

from mesh.controlplane.http import StatusEncodings, StatusQuery, create_app, status_page
from mesh.controlplane.models import FlowView, StatusReport
from tests.unit.test_cp_status_page import Source, fleet, report

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


def big(n_flows: int) -> StatusReport:
    """A report whose summary is large (its flows), as the bench's 5,000 flows make it."""
    flows = [
        FlowView(name=f"flow-{i:05d}", state="running", agents=[f"agent-{i:05d}"], backlog=i,
                 consumer_pending=0, lag_seconds=0.0, dlq_depth=0)
        for i in range(n_flows)
    ]  # fmt: skip
    return msgspec.structs.replace(report(fleet(20)), flows=flows)


def client(source: Source, encodings: StatusEncodings) -> httpx.AsyncClient:
    app = create_app(source, encodings=encodings)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://cp")


@pytest.mark.parametrize("n_flows", [1, 3000], ids=["small", "large-in-a-thread"])
async def test_warm_builds_the_summary_body_etag_and_gzip_before_any_request(n_flows: int) -> None:
    source = Source(10)
    source.report = big(n_flows)
    enc = StatusEncodings()
    await enc.warm(source.report)
    warm = enc.variants[StatusQuery()]
    assert warm.body == msgspec.json.encode(status_page(source.report, StatusQuery()))
    assert warm.gzipped is not None
    assert gzip.decompress(warm.gzipped) == warm.body
    async with client(source, enc) as c:
        async with c.stream("GET", "/status", headers={"Accept-Encoding": "gzip"}) as raw:
            body = b"".join([chunk async for chunk in raw.aiter_raw()])
            zipped_tag = raw.headers["etag"]
        assert body == warm.gzipped  # served as built, not compressed again
        plain = await c.get("/status", headers={"Accept-Encoding": "identity"})
        assert plain.content == warm.body
        assert zipped_tag == plain.headers["etag"][:-1] + '-gz"'
        assert enc.variants[StatusQuery()] is warm
        again = await c.get("/status", headers={"If-None-Match": plain.headers["etag"]})
        assert again.status_code == 304
        # other variants are still built on demand, for the same report
        every = await c.get("/status", params={"agents": "all"}, headers={"Accept-Encoding": "identity"})
        assert len(every.json()["agents"]) == 23
        assert set(enc.variants) == {StatusQuery(), StatusQuery(agents="all")}


async def test_warming_a_new_report_changes_the_etag_and_drops_the_old_variants() -> None:
    source = Source(10)
    enc = StatusEncodings()
    await enc.warm(source.report)
    first = enc.variants[StatusQuery()]
    await enc.warm(source.report)  # the same report: nothing rebuilt
    assert enc.variants[StatusQuery()] is first
    async with client(source, enc) as c:
        tag = (await c.get("/status", headers={"Accept-Encoding": "identity"})).headers["etag"]
        await c.get("/status", params={"agents": "all"})
        source.rebuild(11)
        await enc.warm(source.report)
        assert set(enc.variants) == {StatusQuery()}
        changed = await c.get("/status", headers={"Accept-Encoding": "identity", "If-None-Match": tag})
        assert changed.status_code == 200
        assert changed.headers["etag"] != tag
        assert changed.json()["counts"]["healthy"] == 12
        assert enc.variants[StatusQuery()].body == changed.content


async def test_a_request_for_a_report_other_than_the_warmed_one_is_still_right() -> None:
    source = Source(10)
    enc = StatusEncodings()
    await enc.warm(report(fleet(30)))  # warmed, but the source still hands out its own
    async with client(source, enc) as c:
        doc = (await c.get("/status")).json()
        assert doc["counts"]["healthy"] == 11
        assert enc.report is source.report


def test_series_observe_in_steps_yields_and_takes_the_same_growth() -> None:
    from mesh.controlplane.models import FlowKpis
    from mesh.controlplane.series import SeriesStore
    from tests.unit.test_kpis import agent as kpi_agent

    def fleet_beating(n: int, beat: float, applied: int) -> list:
        return [kpi_agent(f"a{i}", FlowKpis(applied=applied), beat, agent_id=f"id-{i}", depth=i % 3)
                for i in range(n)]  # fmt: skip

    at_once, stepped = SeriesStore(resolution=5), SeriesStore(resolution=5)
    t = 1000.0
    for beat, applied in ((t, 10), (t + 5, 15)):
        agents = fleet_beating(1000, beat, applied)
        want = at_once.observe(agents, now=beat)
        steps = stepped.observe_steps(agents, now=beat)
        yields = 0
        while True:
            try:
                next(steps)
                yields += 1
            except StopIteration as done:
                got = done.value
                break
        assert yields == 4  # every 250 agents
        assert got == want
        at_once.tick(now=beat)
        stepped.tick(now=beat)
    assert got["customers"].applied == 5000  # 1000 agents x 5 more
    assert stepped.points("customers", now=t + 5) == at_once.points("customers", now=t + 5)
