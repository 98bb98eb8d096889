"""REST sinks: ``integrity_statuses`` (a status that means "a related record is missing" is an
IntegrityPending the agent retries within its integrity budget, not a RejectedRecord
dead-lettered at once) and ``preflight_path`` on source and sink configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from adapters.rest._preflight import _request
from adapters.rest.config import RestOperation, RestSinkConfig, RestSourceConfig
from adapters.rest.sink import RestSink
from mesh.adapters import Applied, SinkRecord
from mesh.config import RetryConfig, parse_agent_config
from mesh.errors import ConfigError, IntegrityPending, RejectedRecord

pytestmark = pytest.mark.anyio


def rec(key: str, row: dict[str, Any] | None = None) -> SinkRecord:
    return SinkRecord(
        id=f"e-{key}", key=key, version=1, deleted=False, row=row or {"customer": "ALFKI"}, origin="erp"
    )


def plain(tmp_path: Path, **kw: Any) -> RestSinkConfig:
    return RestSinkConfig(
        base_url="http://fin.test/api", state_path=str(tmp_path / "s.db"), upsert_path="/invoices/{key}",
        backoff_initial=0.01, backoff_max=0.02, **kw,
    )  # fmt: skip


def refusing(status: int, keys: set[str], calls: list[str]) -> httpx.MockTransport:
    """Answers ``status`` with an error body for requests about ``keys``, 200 otherwise."""

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if any(request.url.path.endswith(f"/{k}") for k in keys) or (
            request.content and any(k.encode() in request.content for k in keys)
        ):
            return httpx.Response(status, json={"Message": "customer ALFKI is not known"})
        return httpx.Response(200, json={})

    return httpx.MockTransport(handler)


@pytest.mark.parametrize("status", [409, 422])
async def test_an_integrity_status_is_integrity_pending_at_once_while_the_others_apply(
    tmp_path: Path, status: int
) -> None:
    calls: list[str] = []
    cfg = plain(tmp_path, integrity_statuses=[409, 422], error_path="Message")
    async with RestSink(cfg, transport=refusing(status, {"2"}, calls)) as sink:
        first, pending = await sink.apply([rec("1"), rec("2")])
    assert first is Applied.APPLIED
    assert isinstance(pending, IntegrityPending), pending
    assert f"HTTP {status}: customer ALFKI is not known" in str(pending)
    # the answer, not a retry inside the adapter: the agent retries on its integrity schedule
    assert calls.count("/api/invoices/2") == 1
    extra = pending.dead_letter_extra  # type: ignore[attr-defined]
    assert extra["http_status"] == status
    assert "ALFKI" in extra["response_body"]
    assert RetryConfig().action(pending) == "retry"


async def test_without_integrity_statuses_a_422_is_a_refusal(tmp_path: Path) -> None:
    calls: list[str] = []
    async with RestSink(plain(tmp_path), transport=refusing(422, {"2"}, calls)) as sink:
        _, refused = await sink.apply([rec("1"), rec("2")])
    assert isinstance(refused, RejectedRecord)
    assert not isinstance(refused, IntegrityPending)


async def test_a_status_not_listed_stays_a_refusal(tmp_path: Path) -> None:
    calls: list[str] = []
    cfg = plain(tmp_path, integrity_statuses=[409])
    async with RestSink(cfg, transport=refusing(400, {"2"}, calls)) as sink:
        _, refused = await sink.apply([rec("1"), rec("2")])
    assert isinstance(refused, RejectedRecord)


async def test_a_batched_request_answered_with_an_integrity_status_holds_each_of_its_records(
    tmp_path: Path,
) -> None:
    calls: list[str] = []
    cfg = RestSinkConfig(
        base_url="http://fin.test/api", state_path=str(tmp_path / "s.db"),
        create=RestOperation(method="POST", path="/Invoices"), envelope="Invoices", batch_size=10,
        delete_path="/Invoices/{key}",
        integrity_statuses=[422], backoff_initial=0.01, backoff_max=0.02,
    )  # fmt: skip
    async with RestSink(cfg, transport=refusing(422, {"ANATR"}, calls)) as sink:
        outcomes = await sink.apply([rec("1", {"customer": "ANATR"}), rec("2", {"customer": "ANATR"})])
    assert [type(o) for o in outcomes] == [IntegrityPending, IntegrityPending]
    assert calls == ["/api/Invoices"]


def test_integrity_statuses_must_be_client_errors(tmp_path: Path) -> None:
    raw = {
        "base_url": "http://x.test",
        "state_path": "s.db",
        "upsert_path": "/a/{key}",
        "integrity_statuses": [500],
    }
    with pytest.raises(msgspec.ValidationError, match=r"integrity_statuses\[0\]"):
        msgspec.convert(raw, RestSinkConfig)


def _agent(tmp_path: Path, sink_extra: str) -> str:
    return f"""
[agent]
name = "fin"
system = "finance"
state_dir = "{tmp_path}"
[nats]
servers = ["nats://127.0.0.1:4222"]
[[flows]]
name = "invoices"
entity = "invoice"
[flows.sink]
adapter = "rest"
base_url = "http://fin.test/api"
state_path = "s.db"
upsert_path = "/invoices/{{key}}"
{sink_extra}
"""


def test_preflight_path_parses_and_must_be_a_path(tmp_path: Path) -> None:
    cfg = parse_agent_config(
        _agent(tmp_path, 'preflight_path = "/Organisation"\nintegrity_statuses = [409, 422]'), base=tmp_path
    )
    sink = cfg.flows[0].sink
    assert isinstance(sink, RestSinkConfig)
    assert (sink.preflight_path, sink.integrity_statuses) == ("/Organisation", [409, 422])
    with pytest.raises(ConfigError, match=r"flows\[0\]\.sink\.preflight_path"):
        parse_agent_config(_agent(tmp_path, 'preflight_path = "Organisation?x=1"'), base=tmp_path)


async def test_preflight_gets_preflight_path_for_sinks_and_sources(tmp_path: Path) -> None:
    """The preflight builds its own client; a MockTransport cannot reach it, so what is checked
    here is the request it would send (the network side is tests/integration/test_preflight_rest.py)."""
    sink = plain(tmp_path, preflight_path="/Organisation")
    assert _request(sink) == ("GET", "http://fin.test/api/Organisation", {}, "preflight_path")
    assert _request(plain(tmp_path))[:2] == ("HEAD", "http://fin.test/api")
    source = RestSourceConfig(
        base_url="http://fin.test/api", path="/Contacts", version_field="UpdatedDateUTC",
        preflight_path="/Organisation",
    )  # fmt: skip
    assert _request(source)[1:] == ("http://fin.test/api/Organisation", {}, "preflight_path")
