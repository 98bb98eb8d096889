"""The REST sink against a real (fake) CRM API over HTTP, and against httpx's MockTransport.

The fake (``tests.fakes.crm_api``) keeps a write log, so "applied once" is checked on the
target's side, not by trusting the sink; its chaos switch makes it fail on purpose.
"""

from __future__ import annotations

import logging
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from contextlib import closing
from email.utils import formatdate
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import pytest

from adapters.rest._retry import parse_retry_after
from adapters.rest.config import RestApiKeyAuth, RestBasicAuth, RestBearerAuth, RestSinkConfig
from adapters.rest.sink import RestSink
from mesh.adapters import Applied, SinkRecord
from mesh.config import parse_agent_config
from mesh.errors import ConfigError, RejectedRecord, SystemUnavailable
from tests.fakes.crm_api import CrmApi, serve_crm_api

pytestmark = pytest.mark.anyio

TOKEN = "s3cr3t-T0ken-value"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRM_TOKEN", TOKEN)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[CrmApi]:
    async with serve_crm_api(tmp_path / "crm.db", token=TOKEN) as server:
        yield server


def config(url: str, tmp_path: Path, **kw: Any) -> RestSinkConfig:
    settings: dict[str, Any] = {
        "upsert_path": "/customers/{key}",
        "state_path": str(tmp_path / "rest-state.db"),
        "auth": RestBearerAuth(token_env="CRM_TOKEN"),
        "timeout": 2.0,
        "backoff_initial": 0.01,
        "backoff_max": 0.05,
        **kw,
    }
    return RestSinkConfig(base_url=url, **settings)


def rec(key: Any, version: int, row: dict[str, Any] | None = None, *, deleted: bool = False) -> SinkRecord:
    return SinkRecord(
        id=f"env-{key}-{version}", key=str(key), version=version, deleted=deleted,
        row=row if row is not None else {"id": key, "name": f"n{key}v{version}"}, origin="erp",
    )  # fmt: skip


def local_versions(tmp_path: Path) -> dict[str, int]:
    path = tmp_path / "rest-state.db"
    if not path.exists():
        return {}
    with closing(sqlite3.connect(path)) as db:
        return dict(db.execute("SELECT key, version FROM mesh_rest_versions").fetchall())


def ops(api: CrmApi, key: str) -> list[tuple[int | None, str]]:
    return [(w.version, w.op) for w in api.writes(key)]


async def test_upserts_and_deletes_are_applied_with_idempotency_headers(api: CrmApi, tmp_path: Path) -> None:
    async with RestSink(config(api.url, tmp_path)) as sink:
        assert await sink.apply([rec(1, 1), rec(2, 1, {"id": 2, "email": "b@x"})]) == [Applied.APPLIED] * 2
        assert api.record("customers", "1") == {"id": 1, "name": "n1v1"}
        assert await sink.apply([rec(1, 2, {"id": 1}, deleted=True), rec(3, 1, deleted=True)]) == [
            Applied.APPLIED,
            Applied.APPLIED,  # deleting what the target does not have: 404 counts as deleted
        ]
        assert api.record("customers", "1") is None
        assert "applied=4" in repr(sink)
    assert [(w.key, w.version, w.op, w.idempotency_key) for w in api.writes()] == [
        ("1", 1, "create", "env-1-1"),
        ("2", 1, "create", "env-2-1"),
        ("1", 2, "delete", "env-1-2"),
    ]
    assert local_versions(tmp_path) == {"1": 2, "2": 1, "3": 1}


async def test_equal_or_older_version_is_stale_and_sends_no_request(api: CrmApi, tmp_path: Path) -> None:
    async with RestSink(config(api.url, tmp_path)) as sink:
        assert await sink.apply([rec(7, 5)]) == [Applied.APPLIED]
        sent = api.request_count
        assert await sink.apply([rec(7, 5), rec(7, 3)]) == [Applied.STALE, Applied.STALE]
        assert api.request_count == sent
        # A delete leaves a tombstone in the local guard: an older upsert stays stale.
        assert await sink.apply([rec(7, 6, deleted=True), rec(7, 4)]) == [Applied.APPLIED, Applied.STALE]
        assert api.request_count == sent + 1
    async with RestSink(config(api.url, tmp_path)) as reopened:  # the guard is durable
        assert await reopened.apply([rec(7, 6)]) == [Applied.STALE]
    assert ops(api, "7") == [(5, "create"), (6, "delete")]


async def test_one_batch_keeps_each_keys_order(api: CrmApi, tmp_path: Path) -> None:
    batch = [rec("a", 1), rec("b", 1), rec("a", 2), rec("a", 1), rec("b", 3), rec("a", 4)]
    async with RestSink(config(api.url, tmp_path)) as sink:
        outcomes = await sink.apply(batch)
    assert outcomes == [Applied.APPLIED] * 3 + [Applied.STALE] + [Applied.APPLIED] * 2
    assert [v for v, _ in ops(api, "a")] == [1, 2, 4]
    assert [v for v, _ in ops(api, "b")] == [1, 3]


async def test_500s_then_ok_within_max_attempts_apply_once(api: CrmApi, tmp_path: Path) -> None:
    api.chaos("500", count=2)
    async with RestSink(config(api.url, tmp_path, max_attempts=3)) as sink:
        assert await sink.apply([rec(1, 1)]) == [Applied.APPLIED]
        assert "retries=2" in repr(sink)
    assert api.request_count == 3
    assert ops(api, "1") == [(1, "create")]


async def test_429_retry_after_is_honoured(api: CrmApi, tmp_path: Path) -> None:
    api.chaos("429", count=1, retry_after=1)
    async with RestSink(config(api.url, tmp_path)) as sink:
        started = time.monotonic()
        assert await sink.apply([rec(1, 1)]) == [Applied.APPLIED]
        assert time.monotonic() - started >= 0.9
    assert ops(api, "1") == [(1, "create")]


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("-4") == 0.0
    later = parse_retry_after(formatdate(time.time() + 20, usegmt=True))
    assert later is not None
    assert 15 <= later <= 21
    assert parse_retry_after(formatdate(time.time() - 60, usegmt=True)) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


async def test_429_storm_beyond_the_cap_gives_the_batch_back_unrecorded(api: CrmApi, tmp_path: Path) -> None:
    api.chaos("429", retry_after=60)
    async with RestSink(config(api.url, tmp_path, retry_after_cap=5)) as sink:
        with anyio.fail_after(3), pytest.raises(SystemUnavailable, match=r"Retry-After 60s .*over"):
            await sink.apply([rec(1, 1), rec(2, 1)])
        assert local_versions(tmp_path) == {}
        api.chaos("429", retry_after=0)  # short waits, but more of them than max_attempts
        with pytest.raises(SystemUnavailable, match=r"HTTP 429 \(tried 3 times\)"):
            await sink.apply([rec(1, 1)])
        assert local_versions(tmp_path) == {}
        api.chaos("ok")
        assert await sink.apply([rec(1, 1), rec(2, 1)]) == [Applied.APPLIED] * 2
    assert api.writes() != []
    assert len(api.writes()) == 2


async def test_circuit_breaker_opens_then_probes_half_open(api: CrmApi, tmp_path: Path) -> None:
    cfg = config(api.url, tmp_path, max_attempts=3, breaker_threshold=3, breaker_cooldown=0.5)
    api.chaos("500")
    async with RestSink(cfg) as sink:
        with pytest.raises(SystemUnavailable, match="tried 3 times"):
            await sink.apply([rec(1, 1)])
        assert "breaker=open" in repr(sink)
        assert api.request_count == 3
        with pytest.raises(SystemUnavailable, match="circuit open"):
            await sink.apply([rec(1, 1)])
        assert api.request_count == 3  # refused without a request
        await anyio.sleep(0.6)
        assert "breaker=half-open" in repr(sink)
        with pytest.raises(SystemUnavailable, match="circuit open"):
            await sink.apply([rec(1, 1)])  # the probe fails: open again
        assert api.request_count == 4
        api.chaos("ok")
        await anyio.sleep(0.6)
        assert await sink.apply([rec(1, 1), rec(2, 1)]) == [Applied.APPLIED] * 2
        assert "breaker=closed" in repr(sink)
    assert local_versions(tmp_path) == {"1": 1, "2": 1}


async def test_a_400_rejects_that_record_while_the_others_apply(api: CrmApi, tmp_path: Path) -> None:
    batch = [rec(1, 1), rec(2, 1, {"id": 2, "email": "not-an-address"}), rec(3, 1)]
    async with RestSink(config(api.url, tmp_path)) as sink:
        first, refused, third = await sink.apply(batch)
    assert (first, third) == (Applied.APPLIED, Applied.APPLIED)
    assert isinstance(refused, RejectedRecord)
    assert "PUT /customers/2: HTTP 400" in str(refused)
    assert "invalid email" in str(refused)
    assert "Bearer ***" in str(refused)  # the fake echoes the header; the sink masks it
    assert TOKEN not in str(refused)
    assert local_versions(tmp_path) == {"1": 1, "3": 1}


async def test_a_slow_answer_times_out_and_the_retry_is_a_replay(api: CrmApi, tmp_path: Path) -> None:
    api.chaos("slow", count=1, delay=1.5)  # the first request writes, then answers too late
    async with RestSink(config(api.url, tmp_path, timeout=0.5)) as sink:
        assert await sink.apply([rec(1, 1)]) == [Applied.APPLIED]
    assert api.request_count >= 2
    assert api.replays == api.request_count - 1
    assert ops(api, "1") == [(1, "create")]


async def test_replay_after_a_crash_between_2xx_and_local_record_has_one_effect(
    api: CrmApi, tmp_path: Path
) -> None:
    async with RestSink(config(api.url, tmp_path)) as sink:
        assert await sink.apply([rec(1, 1)]) == [Applied.APPLIED]
    with closing(sqlite3.connect(tmp_path / "rest-state.db")) as db, db:
        db.execute("DELETE FROM mesh_rest_versions WHERE key = '1'")  # the record never happened
    async with RestSink(config(api.url, tmp_path)) as sink:
        assert await sink.apply([rec(1, 1)]) == [Applied.APPLIED]  # redelivered: same request again
    assert api.request_count == 2
    assert api.replays == 1
    assert ops(api, "1") == [(1, "create")]
    assert local_versions(tmp_path) == {"1": 1}


async def test_expired_token_gives_the_batch_back_instead_of_rejecting(api: CrmApi, tmp_path: Path) -> None:
    api.chaos("expire")
    async with RestSink(config(api.url, tmp_path)) as sink:
        with pytest.raises(SystemUnavailable, match="HTTP 401: the target refuses our credentials"):
            await sink.apply([rec(1, 1), rec(2, 1)])
        assert local_versions(tmp_path) == {}
        api.chaos("ok")
        assert await sink.apply([rec(1, 1), rec(2, 1)]) == [Applied.APPLIED] * 2


async def test_secrets_never_appear_in_reprs_errors_or_logs(
    api: CrmApi, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    sink = RestSink(config(api.url, tmp_path, max_attempts=2))
    async with sink:
        seen.append(repr(sink))
        seen += map(str, await sink.apply([rec(1, 1, {"email": "nope"})]))
        api.chaos("500", count=1)
        seen += map(str, await sink.apply([rec(2, 1)]))
        api.chaos("expire")
        with pytest.raises(SystemUnavailable) as info:
            await sink.apply([rec(3, 1)])
        seen.append(str(info.value))
    seen += [repr(sink), caplog.text]
    assert "try 2 of 2" in caplog.text
    assert not [text for text in seen if TOKEN in text]
    monkeypatch.delenv("CRM_TOKEN")
    with pytest.raises(ConfigError, match="CRM_TOKEN") as missing:
        await RestSink(config(api.url, tmp_path)).open()
    assert TOKEN not in str(missing.value)


async def test_the_fake_runs_as_a_process_with_http_controls(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "tests.fakes.crm_api", "--port", "0", "--db", str(tmp_path / "crm.db")]
    async with await anyio.open_process([*command, "--token-env", "CRM_TOKEN"], cwd=ROOT) as process:
        assert process.stdout is not None
        line = b""
        with anyio.fail_after(20):
            while not line.endswith(b"\n"):
                line += await process.stdout.receive(1)
        url = line.decode().rsplit(" ", 1)[1].strip()
        try:
            async with httpx.AsyncClient(base_url=url) as control:
                await control.post("/_chaos", json={"mode": "500", "count": 1})
                async with RestSink(config(url, tmp_path)) as sink:
                    assert await sink.apply([rec(1, 1)]) == [Applied.APPLIED]
                stats = (await control.get("/_stats")).json()
                writes = (await control.get("/_writes")).json()
            assert (stats["requests"], stats["by_status"]) == (2, {"500": 1, "201": 1})
            assert [(w["key"], w["version"], w["op"]) for w in writes] == [("1", 1, "create")]
        finally:
            process.terminate()
        assert await process.wait() == 0


@pytest.mark.parametrize(
    ("auth", "header", "expected"),
    [
        (
            RestBasicAuth(user="svc", password_env="CRM_TOKEN"),
            "authorization",
            "Basic c3ZjOnMzY3IzdC1UMGtlbi12YWx1ZQ==",
        ),
        (RestApiKeyAuth(key_env="CRM_TOKEN", header="X-Api-Token"), "x-api-token", TOKEN),
        (RestBearerAuth(token_env="CRM_TOKEN"), "authorization", f"Bearer {TOKEN}"),
    ],
    ids=["basic", "api_key", "bearer"],
)
async def test_auth_kinds_send_their_header_and_hide_it(
    tmp_path: Path, auth: Any, header: str, expected: str
) -> None:
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(401 if len(requests) == 2 else 200)

    cfg = config("https://crm.test/api/v2", tmp_path, auth=auth, headers={"User-Agent": "mesh-test"})
    sink = RestSink(cfg, transport=httpx.MockTransport(handler))
    async with sink:
        assert await sink.apply([rec(1, 1)]) == [Applied.APPLIED]
        with pytest.raises(SystemUnavailable) as info:
            await sink.apply([rec(2, 1)])
        text = repr(sink) + str(info.value) + repr(getattr(sink, "_credentials", None))
    first = requests[0]
    assert first.headers[header] == expected
    assert first.headers["user-agent"] == "mesh-test"
    assert first.headers["idempotency-key"] == "env-1-1"
    assert first.headers["x-mesh-version"] == "1"
    assert str(first.url) == "https://crm.test/api/v2/customers/1"
    assert TOKEN not in text
    assert expected not in text


async def test_concurrency_is_bounded_and_each_key_stays_in_order(tmp_path: Path) -> None:
    in_flight = 0
    peak = 0
    arrived: dict[str, list[int]] = {}

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        key = request.url.path.rsplit("/", 1)[1]
        arrived.setdefault(key, []).append(int(request.headers["x-mesh-version"]))
        await anyio.sleep(0.02)
        in_flight -= 1
        return httpx.Response(204)

    batch = [rec(k, v) for v in (1, 2, 3) for k in range(10)]
    sink = RestSink(
        config("http://crm.test", tmp_path, concurrency=4), transport=httpx.MockTransport(handler)
    )
    async with sink:
        assert await sink.apply(batch) == [Applied.APPLIED] * len(batch)
    assert 1 < peak <= 4
    assert arrived == {str(k): [1, 2, 3] for k in range(10)}


async def test_rate_limit_spaces_requests(tmp_path: Path) -> None:
    stamps: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        stamps.append(time.monotonic())
        return httpx.Response(200)

    cfg = config("http://crm.test", tmp_path, rate_limit=20, burst=1)
    async with RestSink(cfg, transport=httpx.MockTransport(handler)) as sink:
        await sink.apply([rec(k, 1) for k in range(6)])
    assert stamps[-1] - stamps[0] >= 5 / 20 * 0.9


async def test_partial_batch_reports_the_rest_as_unavailable(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200 if request.url.path.endswith("/1") else 503)

    cfg = config("http://crm.test", tmp_path, concurrency=1, max_attempts=2)
    async with RestSink(cfg, transport=httpx.MockTransport(handler)) as sink:
        applied, later, untried = await sink.apply([rec(1, 1), rec(2, 1), rec(3, 1)])
    assert applied is Applied.APPLIED
    assert isinstance(later, SystemUnavailable)
    assert isinstance(untried, SystemUnavailable)
    assert local_versions(tmp_path) == {"1": 1}


async def test_tombstone_mode_and_posting_to_a_collection(api: CrmApi, tmp_path: Path) -> None:
    cfg = config(
        api.url, tmp_path, upsert_path="/customers", method="POST", key_field="external_id",
        fields=["name"], delete_path="/customers/{key}", delete_mode="tombstone",
    )  # fmt: skip
    async with RestSink(cfg) as sink:
        assert await sink.apply([rec("c-1", 1, {"name": "Ada", "secret_margin": 3})]) == [Applied.APPLIED]
        assert api.record("customers", "c-1") == {"name": "Ada", "external_id": "c-1"}
        assert await sink.apply([rec("c-1", 2, deleted=True)]) == [Applied.APPLIED]
    assert api.record("customers", "c-1") == {"name": "Ada", "external_id": "c-1", "deleted": True}
    assert ops(api, "c-1") == [(1, "create"), (2, "patch")]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"upsert_path": "/customers/{id}"}, "sink.upsert_path: unknown placeholder"),
        ({"upsert_path": "/customers"}, "sink.upsert_path: needs {key}"),
        ({"upsert_path": "/c", "key_field": "external_id"}, "sink.delete_path: needs {key}"),
    ],
)
def test_sink_refuses_templates_it_cannot_fill(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RestSink(config("http://crm.test", tmp_path, **change))


AGENT = """
[agent]
name = "crm-agent"
system = "crm"
state_dir = "state"

[[flows]]
name = "customers"
entity = "customer"

[flows.sink]
adapter = "rest"
base_url = "https://crm.example.com/api"
upsert_path = "/customers/{key}"
state_path = "state/rest-customers.db"
rate_limit = 5
%s
[flows.sink.auth]
type = "bearer"
token_env = "CRM_TOKEN"
"""


def test_rest_sink_config_parses(tmp_path: Path) -> None:
    cfg = parse_agent_config(AGENT % "", source="agent.toml", base=tmp_path)
    sink = cfg.flows[0].sink
    assert isinstance(sink, RestSinkConfig)
    assert sink.method == "PUT"
    assert sink.rate_limit == 5
    assert sink.auth == RestBearerAuth(token_env="CRM_TOKEN")
    assert sink.state_path == str(tmp_path / "state" / "rest-customers.db")  # relative to the file
    assert msgspec.json.decode(msgspec.json.encode(sink), type=RestSinkConfig) == sink


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('method = "GET"', "flows[0].sink.method: invalid enum value 'GET'"),
        ("max_attempts = 0", "flows[0].sink.max_attempts: expected `int` >= 1"),
        ("timout = 3", "flows[0].sink: object contains unknown field `timout`"),
        ('base_url = "https://u:p@crm.example.com"', "flows[0].sink.base_url: expected `str` matching regex"),
    ],
    ids=["method", "attempts", "typo", "credentials-in-url"],
)
def test_bad_rest_sink_config_names_the_field(extra: str, message: str) -> None:
    text = AGENT % extra
    if extra.startswith("base_url"):
        text = text.replace('base_url = "https://crm.example.com/api"\n', "")
    with pytest.raises(ConfigError) as info:
        parse_agent_config(text, source="agent.toml")
    assert message in str(info.value)


def test_bad_auth_type_names_the_field() -> None:
    text = (AGENT % "").replace('type = "bearer"', 'type = "oauth9"')
    with pytest.raises(ConfigError, match=r"flows\[0\].sink.auth.type: invalid value 'oauth9'"):
        parse_agent_config(text, source="agent.toml")


async def test_an_older_version_is_never_sent_after_a_newer_one_may_have_taken_effect(
    api: CrmApi, tmp_path: Path
) -> None:
    """Found by the REST chaos test: v2 took effect at the target but the sink never saw the
    answer (it gave the batch back, or was killed). The redelivered v1 must not overwrite it."""
    async with RestSink(config(api.url, tmp_path, timeout=0.3, max_attempts=1)) as sink:
        api.chaos("slow", count=1, delay=1.0)  # v2 is written, the answer comes too late
        with pytest.raises(SystemUnavailable):
            await sink.apply([rec(1, 2, {"id": 1, "name": "newer"})])
        await anyio.sleep(1.0)  # the slow answer has gone out by now
        sent = api.request_count
        assert await sink.apply([rec(1, 1, {"id": 1, "name": "older"})]) == [Applied.STALE]
        assert api.request_count == sent  # no request for the older version
        assert await sink.apply([rec(1, 2, {"id": 1, "name": "newer"})]) == [Applied.APPLIED]  # a replay
    assert api.record("customers", "1") == {"id": 1, "name": "newer"}
    assert ops(api, "1") == [(2, "create")]


async def test_update_only_records_patch_and_never_create(api: CrmApi, tmp_path: Path) -> None:
    """A record whose origin may not create the entity (ownership) is a PATCH of the fields it
    carries; a target without the record answers 404 and nothing is created (UNCHANGED)."""
    import msgspec

    async with RestSink(config(api.url, tmp_path)) as sink:
        assert await sink.apply([rec(1, 1, {"id": 1, "name": "Ada", "email": "a@x"})]) == [Applied.APPLIED]
        patch = msgspec.structs.replace(rec(1, 5, {"id": 1, "email": "new@x"}), scope="crm", create=False)
        ghost = msgspec.structs.replace(rec(2, 5, {"id": 2, "email": "g@x"}), scope="crm", create=False)
        assert await sink.apply([patch, ghost]) == [Applied.APPLIED, Applied.UNCHANGED]
        assert api.record("customers", "1") == {"id": 1, "name": "Ada", "email": "new@x"}
        assert api.record("customers", "2") is None
        # The guard moved for both: a redelivery sends nothing.
        sent = api.request_count
        assert await sink.apply([patch, ghost]) == [Applied.STALE, Applied.STALE]
        assert api.request_count == sent
    assert [w.op for w in api.writes()] == ["create", "patch"]
