"""/status at scale: the summary by default, ?agents=all, filters, pages, ETag/304 and gzip."""

from __future__ import annotations

import gzip
import time

import httpx
import msgspec
import pytest
from prometheus_client import CollectorRegistry

from mesh.controlplane.http import (
    SUMMARY_LIMIT,
    StatusQuery,
    create_app,
    parse_status_query,
    status_page,
)
from mesh.controlplane.models import AgentView, ControlPlaneInfo, FlowView, StatusReport

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


def agent(i: int, health: str = "healthy", site: str | None = None, state: str = "active") -> AgentView:
    return AgentView(
        name=f"agent-{i:05d}",
        agent_id=f"id{i}",
        site=site or f"site{i // 2:04d}",
        host="h",
        version="1",
        state=state,  # type: ignore[arg-type]
        health=health,  # type: ignore[arg-type]
        reason="" if health == "healthy" else f"{health} for a test",
        registered_at=1.0,
        last_heartbeat=2.0,
        heartbeat_age_seconds=0.5,
    )


def report(agents: list[AgentView]) -> StatusReport:
    counts = dict.fromkeys(("healthy", "degraded", "stale", "lost"), 0)
    for a in agents:
        counts[a.health] += 1
    return StatusReport(
        schema_version="mesh-cp-status/1",
        generated_at=time.time(),
        control_plane=ControlPlaneInfo(
            replica="cp1", leader="cp1", is_leader=True, nats_connected=True, version="1"
        ),
        agents=agents,
        flows=[
            FlowView(
                name="customers",
                state="running",
                agents=[],
                backlog=0,
                consumer_pending=0,
                lag_seconds=0.0,
                dlq_depth=0,
            )
        ],
        counts=counts,
    )


def fleet(n: int) -> list[AgentView]:
    """``n`` healthy agents, two per site, plus three that are not healthy (or not active)."""
    return [
        *(agent(i) for i in range(n)),
        agent(n, "degraded", site="plant-9"),
        agent(n + 1, "lost", site="plant-9"),
        agent(n + 2, "healthy", site="plant-8", state="revoked"),
    ]


def test_summary_lists_only_agents_needing_attention_and_does_not_grow_with_healthy_ones() -> None:
    small = status_page(report(fleet(10)), StatusQuery())
    big = status_page(report(fleet(5000)), StatusQuery())
    for page in (small, big):
        assert [a.health for a in page.agents] == ["degraded", "lost", "healthy"]
        assert page.agents[2].state == "revoked"
        assert set(page.sites) == {"plant-8", "plant-9"}
        assert page.sites["plant-9"] == {"healthy": 0, "degraded": 1, "stale": 0, "lost": 1}
        assert page.agents_page is not None
        assert (page.agents_page.mode, page.agents_page.total, page.agents_page.limit) == (
            "summary", 3, SUMMARY_LIMIT,
        )  # fmt: skip
        assert page.flows[0].name == "customers"
    assert big.counts["healthy"] == 5001  # the counts stay whole
    assert small.counts["healthy"] == 11
    assert big.agents_page is not None
    assert big.agents_page.sites == 2502
    size = len(msgspec.json.encode(big)) - len(msgspec.json.encode(small))
    assert size < 40  # only the digits of the counts differ


def test_all_filters_and_pages() -> None:
    full = report(fleet(10))
    everything = status_page(full, StatusQuery(agents="all"))
    assert everything.agents == full.agents
    assert len(everything.sites) == 7
    plant9 = status_page(full, StatusQuery(agents="all", site="plant-9"))
    assert [a.name for a in plant9.agents] == ["agent-00010", "agent-00011"]
    assert list(plant9.sites) == ["plant-9"]
    lost = status_page(full, StatusQuery(health="lost"))
    assert [a.name for a in lost.agents] == ["agent-00011"]
    healthy = status_page(full, StatusQuery(health="healthy", limit=4, offset=2))
    assert [a.name for a in healthy.agents] == ["agent-00002", "agent-00003", "agent-00004", "agent-00005"]
    assert healthy.agents_page is not None
    assert healthy.agents_page.total == 11
    assert status_page(full, StatusQuery(agents="all", offset=12)).agents == [full.agents[12]]


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ({"agents": "some"}, "agents must be summary or all"),
        ({"health": "sick"}, "health must be one of healthy, degraded, stale, lost"),
        ({"limit": "ten"}, "limit and offset must be whole numbers"),
        ({"limit": "-1"}, "limit must be from 0 to 10000"),
        ({"offset": "-3"}, "offset must be 0 or more"),
    ],
)
def test_bad_queries_are_one_line(query: dict[str, str], error: str) -> None:
    assert parse_status_query(query) == error


class Source:
    """Hands out the same report object until ``rebuild`` (as the control plane does)."""

    def __init__(self, n: int) -> None:
        self.registry = CollectorRegistry()
        self.n = n
        self.report = report(fleet(n))
        self.calls = 0

    def rebuild(self, n: int) -> None:
        self.report = report(fleet(n))

    def status(self) -> StatusReport:
        self.calls += 1
        return self.report

    async def readiness(self) -> str | None:
        return None


def client(source: Source) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(source)), base_url="http://cp")


async def test_http_status_default_summary_and_all() -> None:
    source = Source(40)
    async with client(source) as c:
        doc = (await c.get("/status")).json()
        assert [a["health"] for a in doc["agents"]] == ["degraded", "lost", "healthy"]
        assert doc["agents_page"]["mode"] == "summary"
        assert doc["counts"]["healthy"] == 41
        doc = (await c.get("/status", params={"agents": "all"})).json()
        assert len(doc["agents"]) == 43
        r = await c.get("/status", params={"health": "sick"})
        assert r.status_code == 400
        assert r.json() == {"error": "health must be one of healthy, degraded, stale, lost", "status": 400}


async def test_etag_and_if_none_match() -> None:
    source = Source(10)
    async with client(source) as c:
        first = await c.get("/status", headers={"Accept-Encoding": "identity"})
        tag = first.headers["etag"]
        assert first.headers["cache-control"] == "no-cache"
        again = await c.get("/status", headers={"Accept-Encoding": "identity", "If-None-Match": tag})
        assert again.status_code == 304
        assert again.content == b""
        assert again.headers["etag"] == tag
        assert (await c.get("/status", headers={"If-None-Match": f'"other", W/{tag}'})).status_code == 304
        # another variant has another tag
        other = await c.get("/status", params={"agents": "all"}, headers={"If-None-Match": tag})
        assert other.status_code == 200
        assert other.headers["etag"] != tag
        source.rebuild(11)  # the document changed: the old tag no longer matches
        changed = await c.get("/status", headers={"Accept-Encoding": "identity", "If-None-Match": tag})
        assert changed.status_code == 200
        assert changed.headers["etag"] != tag
        assert changed.json()["counts"]["healthy"] == 12


async def test_large_status_is_gzipped_for_clients_that_accept_it() -> None:
    source = Source(3000)
    async with client(source) as c:
        plain = await c.get("/status", params={"agents": "all"}, headers={"Accept-Encoding": "identity"})
        assert "content-encoding" not in plain.headers
        zipped = await c.get("/status", params={"agents": "all"}, headers={"Accept-Encoding": "gzip"})
        assert zipped.headers["content-encoding"] == "gzip"
        assert zipped.headers["vary"] == "Accept-Encoding"
        assert int(zipped.headers["content-length"]) < len(plain.content) / 5
        assert zipped.json() == plain.json()  # httpx decodes it: the same document
        assert zipped.headers["etag"] != plain.headers["etag"]  # another representation
        tag = zipped.headers["etag"]
        assert (await c.get("/status", params={"agents": "all"},
                            headers={"If-None-Match": tag})).status_code == 304  # fmt: skip
        # the dashboard page goes through the middleware's gzip
        page = await c.get("/", headers={"Accept-Encoding": "gzip"})
        assert page.headers["content-encoding"] == "gzip"
        assert "3003 agent(s): healthy 3001" in page.text  # the summary: counts, not every agent
        async with c.stream("GET", "/status", params={"agents": "all"},
                            headers={"Accept-Encoding": "gzip"}) as raw:  # fmt: skip
            body = b"".join([chunk async for chunk in raw.aiter_raw()])
        assert gzip.decompress(body) == plain.content
