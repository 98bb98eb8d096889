"""Shared API policies: the coordinator's bucket, concurrency split and persisted daily quota;
the client's grants, degradation to the local share and recovery (in-memory transport)."""

from __future__ import annotations

import datetime as dt
import zoneinfo
from pathlib import Path

import anyio
import httpx
import msgspec
import pytest

from mesh.config import load_agent_config
from mesh.controlplane.policy import PolicyCoordinator
from mesh.errors import ConfigError
from mesh.policy import PolicyClient, PolicyConfig, PolicyGrant, PolicyMetrics, PolicyRequest, QuotaExhausted
from mesh.policy.wire import decode_grant, encode
from mesh.transport import MemoryBucket, MemoryTransport

pytestmark = pytest.mark.anyio

SPEC = PolicyConfig(rate=50, burst=10, concurrency=8)


async def ask(coord: PolicyCoordinator, caller: str, want: int, spec: PolicyConfig = SPEC) -> PolicyGrant:
    return decode_grant(
        await coord.handle(caller, encode(PolicyRequest(policy="xero", want=want, spec=spec)))
    )


async def test_the_coordinator_grants_no_more_than_burst_plus_rate_times_elapsed() -> None:
    coord = PolicyCoordinator(MemoryBucket())
    began = anyio.current_time()
    granted = 0
    waits = 0
    while granted < 60:
        g = await ask(coord, f"a{granted % 4}", 5)
        granted += g.tokens
        if not g.tokens:
            assert g.wait > 0
            waits += 1
            await anyio.sleep(g.wait)  # what a client does; the property below is about counts
        assert granted <= 10 + 50 * (anyio.current_time() - began) + 5
    assert waits > 0  # the burst ran out: the bucket made callers wait


async def test_the_first_burst_is_the_burst() -> None:
    coord = PolicyCoordinator(MemoryBucket())
    began = anyio.current_time()
    grants = [(await ask(coord, "a", 4)).tokens for _ in range(3)]
    refilled = 50 * (anyio.current_time() - began)
    assert grants[:2] == [4, 4]
    assert grants[2] <= 2 + refilled  # 10 in the bucket, plus what the rate added meanwhile


async def test_concurrency_is_split_between_the_active_callers() -> None:
    coord = PolicyCoordinator(MemoryBucket())
    assert (await ask(coord, "a", 1)).concurrency == 8
    assert (await ask(coord, "b", 1)).concurrency == 4
    assert (await ask(coord, "c", 1)).concurrency == 2  # 8 // 3


async def test_the_daily_quota_is_counted_in_kv_and_survives_a_new_coordinator() -> None:
    bucket = MemoryBucket()
    spec = PolicyConfig(rate=1000, burst=1000, daily_quota=12, timezone="Europe/London")
    noon = dt.datetime(2026, 7, 1, 12, 0, tzinfo=zoneinfo.ZoneInfo("Europe/London")).timestamp()
    first = PolicyCoordinator(bucket, clock=lambda: noon)
    assert (await ask(first, "a", 8, spec)).tokens == 8
    entry = await bucket.get("xero.2026-07-01")
    assert entry is not None
    assert msgspec.json.decode(entry.value) == {"used": 8}
    audited: list[tuple[str, str, str, str]] = []

    async def audit(kind: str, who: str, target: str, what: str, detail: dict[str, str]) -> None:
        audited.append((kind, who, target, what))

    second = PolicyCoordinator(bucket, clock=lambda: noon, audit=audit)  # a new leader term
    g = await ask(second, "b", 8, spec)
    assert (g.tokens, g.quota_used) == (4, 12)
    spent = await ask(second, "a", 1, spec)
    assert spent.tokens == 0
    midnight = dt.datetime(2026, 7, 2, 0, 0, tzinfo=zoneinfo.ZoneInfo("Europe/London")).timestamp()
    assert spent.quota_reset == midnight
    assert (await ask(second, "b", 1, spec)).tokens == 0
    assert audited == [
        ("policy_quota", "a", "xero", "daily quota 12 of API policy xero spent for 2026-07-01")
    ]
    tomorrow = PolicyCoordinator(bucket, clock=lambda: midnight + 1)
    assert (await ask(tomorrow, "a", 3, spec)).tokens == 3  # a new day, a new count


async def test_a_malformed_request_is_answered_with_an_error() -> None:
    g = decode_grant(await PolicyCoordinator(MemoryBucket()).handle("a", b"{}"))
    assert g.tokens == 0
    assert "invalid policy request" in g.error


async def _served(
    broker_transport: MemoryTransport, coord: PolicyCoordinator, tg: anyio.abc.TaskGroup
) -> None:
    await tg.start(coord.serve, broker_transport, "mesh.cp")


async def test_the_client_takes_tokens_from_the_coordinator() -> None:
    async with MemoryTransport(name="cp") as cp, anyio.create_task_group() as tg:
        agent = MemoryTransport(cp.broker, name="agent")
        await agent.connect()
        await _served(cp, PolicyCoordinator(), tg)
        metrics = PolicyMetrics()
        client = PolicyClient("a1", {"xero": SPEC}, lambda: agent, metrics=metrics)
        gate = client.gate("xero")
        for _ in range(12):
            await gate.acquire()
        assert not gate.degraded
        granted = metrics.registry.get_sample_value("mesh_policy_tokens_granted_total", {"policy": "xero"})
        assert granted is not None
        assert 12 <= granted <= 12 + gate.batch
        assert client.problems() == []
        tg.cancel_scope.cancel()


async def test_the_client_degrades_to_its_local_share_and_recovers() -> None:
    async with MemoryTransport(name="cp") as cp, anyio.create_task_group() as tg:
        agent = MemoryTransport(cp.broker, name="agent")
        await agent.connect()
        metrics = PolicyMetrics()
        client = PolicyClient("a1", {"xero": SPEC}, lambda: agent, metrics=metrics, retry_every=0.05)
        gate = client.gate("xero")
        await gate.acquire()  # nobody serves mesh.cp.policy.a1: the local share lets it through
        assert gate.degraded
        assert metrics.registry.get_sample_value("mesh_policy_degraded", {"policy": "xero"}) == 1
        assert "coordinator unreachable" in client.problems()[0]
        await _served(cp, PolicyCoordinator(), tg)
        with anyio.fail_after(10):
            while gate.degraded:
                await gate.acquire()
        assert metrics.registry.get_sample_value("mesh_policy_degraded", {"policy": "xero"}) == 0
        assert client.problems() == []
        tg.cancel_scope.cancel()


async def test_a_spent_quota_raises_until_it_resets() -> None:
    spec = PolicyConfig(rate=100, burst=100, daily_quota=3)
    async with MemoryTransport(name="cp") as cp, anyio.create_task_group() as tg:
        agent = MemoryTransport(cp.broker, name="agent")
        await agent.connect()
        await _served(cp, PolicyCoordinator(), tg)
        metrics = PolicyMetrics()
        gate = PolicyClient("a1", {"q": spec}, lambda: agent, metrics=metrics).gate("q")
        for _ in range(3):
            await gate.acquire()
        with pytest.raises(QuotaExhausted, match="daily quota spent") as info:
            await gate.acquire()
        assert info.value.reset_at > 0
        assert metrics.registry.get_sample_value("mesh_policy_quota_exhausted", {"policy": "q"}) == 1
        assert "daily quota spent" in (gate.problem() or "")
        tg.cancel_scope.cancel()


def test_an_undeclared_policy_is_a_config_error() -> None:
    client = PolicyClient("a1", {"xero": SPEC}, lambda: None)
    with pytest.raises(ConfigError, match=r"\[policies.hubspot\]"):
        client.gate("hubspot")


def test_a_bad_timezone_is_refused_with_the_file_and_field(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        '[agent]\nname = "a1"\nsystem = "erp"\nstate_dir = "state"\n'
        '[policies.xero]\nrate = 50\ntimezone = "Mars/Olympus"\n'
    )
    with pytest.raises(
        ConfigError, match=r"agent.toml: policies.*timezone 'Mars/Olympus' is not an IANA time zone"
    ):
        load_agent_config(cfg)


async def test_a_rest_sink_under_a_spent_quota_gives_its_batch_back(tmp_path: Path) -> None:
    from adapters.rest.config import RestSinkConfig
    from adapters.rest.sink import RestSink
    from mesh.adapters import Applied, SinkRecord
    from mesh.policy import install

    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.path)
        return httpx.Response(200, json={})

    def rec(key: int) -> SinkRecord:
        return SinkRecord(id=f"e{key}", key=str(key), version=1, deleted=False, row={"id": key}, origin="erp")

    cfg = RestSinkConfig(
        base_url="http://crm.test",
        upsert_path="/customers/{key}",
        state_path=str(tmp_path / "s.db"),
        policy="crm",
    )
    spec = PolicyConfig(rate=100, burst=100, daily_quota=2)
    async with MemoryTransport(name="cp") as cp, anyio.create_task_group() as tg:
        agent = MemoryTransport(cp.broker, name="agent")
        await agent.connect()
        await _served(cp, PolicyCoordinator(), tg)
        install(PolicyClient("a1", {"crm": spec}, lambda: agent))
        try:
            async with RestSink(cfg, transport=httpx.MockTransport(handler)) as sink:
                assert await sink.apply([rec(1), rec(2)]) == [Applied.APPLIED, Applied.APPLIED]
                with pytest.raises(QuotaExhausted, match="API policy 'crm': daily quota spent"):
                    await sink.apply([rec(3)])
        finally:
            install(None)
        tg.cancel_scope.cancel()
    assert sent == ["/customers/1", "/customers/2"]  # nothing went out over the quota


async def test_a_rest_sink_naming_an_undeclared_policy_fails_with_a_config_error(tmp_path: Path) -> None:
    from adapters.rest.config import RestSinkConfig
    from adapters.rest.sink import RestSink
    from mesh.adapters import SinkRecord
    from mesh.policy import install

    install(None)
    cfg = RestSinkConfig(
        base_url="http://crm.test", upsert_path="/c/{key}", state_path=str(tmp_path / "s.db"), policy="crm"
    )
    record = SinkRecord(id="e", key="1", version=1, deleted=False, row={"id": 1}, origin="erp")
    transport = httpx.MockTransport(lambda r: httpx.Response(200, json={}))
    async with RestSink(cfg, transport=transport) as sink:
        with pytest.raises(ConfigError, match=r"declare \[policies.crm\] in the agent config"):
            await sink.apply([record])


async def test_a_system_api_rest_operation_under_a_spent_quota_is_unavailable() -> None:
    from adapters.rest._api import RestOperation, RestOperationConfig
    from mesh.api import Call
    from mesh.policy import install

    spec = PolicyConfig(rate=100, daily_quota=1)
    bucket = MemoryBucket()
    today = dt.datetime.now(dt.UTC).date().isoformat()
    await bucket.create(f"finance.{today}", b'{"used": 1}')  # spent by other agents today
    op = RestOperation(
        RestOperationConfig(
            base_url="http://127.0.0.1:9", path="/invoices", policy="finance"
        )  # nothing listens
    )
    async with MemoryTransport(name="cp") as cp, anyio.create_task_group() as tg:
        agent = MemoryTransport(cp.broker, name="agent")
        await agent.connect()
        await _served(cp, PolicyCoordinator(bucket), tg)
        install(PolicyClient("a1", {"finance": spec}, lambda: agent))
        try:
            async with op:
                with pytest.raises(QuotaExhausted, match="API policy 'finance': daily quota spent"):
                    await op.run({"amount": 1}, Call(operation="invoice.create", key="k", deadline=0))
        finally:
            install(None)
        tg.cancel_scope.cancel()


async def test_an_agent_declares_policies_and_installs_their_client(tmp_path: Path) -> None:
    from agents.connector import ConnectorAgent
    from mesh.config import parse_agent_config
    from mesh.policy import current_client, install, policy_gate

    text = f"""
[agent]
name = "crm-agent"
system = "crm"
state_dir = "{tmp_path / "state"}"

[policies.xero]
rate = 50
burst = 10
daily_quota = 5000
timezone = "Europe/London"

[[flows]]
name = "customers"
entity = "customer"
[flows.sink]
adapter = "rest"
base_url = "https://api.example.com"
upsert_path = "/customers/{{key}}"
state_path = "{tmp_path / "rest.db"}"
policy = "xero"
"""
    cfg = parse_agent_config(text)
    assert cfg.policies["xero"].effective_burst == 10
    sink = cfg.flows[0].sink
    assert sink is not None
    assert getattr(sink, "policy", None) == "xero"
    try:
        agent = ConnectorAgent(cfg)
        assert current_client() is agent.policies
        gate = policy_gate("xero")
        assert gate.spec.daily_quota == 5000
        assert agent.policies.problems() == []
        value = agent.metrics.registry.get_sample_value("mesh_policy_degraded", {"policy": "xero"})
        assert value == 0  # the agent's /metrics carries the policy series
    finally:
        install(None)


@pytest.mark.parametrize("policy", [None, "crm"])
async def test_a_rest_sink_keeps_to_its_share_of_the_policy_concurrency(
    tmp_path: Path, policy: str | None
) -> None:
    from adapters.rest.config import RestSinkConfig
    from adapters.rest.sink import RestSink
    from mesh.adapters import Applied, SinkRecord
    from mesh.policy import install

    inflight = peak = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal inflight, peak
        inflight += 1
        peak = max(peak, inflight)
        for _ in range(2000):  # let the other requests of the batch start meanwhile, if they may
            if peak > 1:
                break
            await anyio.lowlevel.checkpoint()
        inflight -= 1
        return httpx.Response(200, json={})

    records = [
        SinkRecord(id=f"e{k}", key=str(k), version=1, deleted=False, row={"id": k}, origin="erp")
        for k in range(6)
    ]
    cfg = RestSinkConfig(
        base_url="http://crm.test", upsert_path="/c/{key}", state_path=str(tmp_path / "s.db"), policy=policy
    )
    spec = PolicyConfig(rate=1000, burst=100, concurrency=1)
    async with MemoryTransport(name="cp") as cp, anyio.create_task_group() as tg:
        agent = MemoryTransport(cp.broker, name="agent")
        await agent.connect()
        await _served(cp, PolicyCoordinator(), tg)
        install(PolicyClient("a1", {"crm": spec}, lambda: agent))
        try:
            async with RestSink(cfg, transport=httpx.MockTransport(handler)) as sink:
                assert await sink.apply(records) == [Applied.APPLIED] * 6
        finally:
            install(None)
        tg.cancel_scope.cancel()
    if policy:
        assert peak == 1
    else:
        assert peak > 1  # the sink alone sends several at once (up to its own concurrency, 8)
