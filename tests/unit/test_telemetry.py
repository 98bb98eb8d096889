"""mesh.telemetry: off by default and inert; on, one change's spans form one trace through the
envelope's traceparent (capture -> publish, apply -> api_call / saga_step). Spans go to the SDK's
in-memory exporter here; tests/integration/test_otel.py exports over OTLP/HTTP across processes."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from adapters.rest.config import RestBearerAuth, RestSinkConfig
from adapters.rest.sink import RestSink
from mesh import telemetry
from mesh.adapters import Applied, Change, SinkRecord
from mesh.config import parse_agent_config
from mesh.envelope import Envelope, encode, encode_payload, envelope_id
from mesh.errors import ConfigError, RetryableError, SystemUnavailable

TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert telemetry.configure("memory://", service_name="test", exporter=exporter)
    try:
        yield exporter
    finally:
        telemetry.shutdown()


def _finished(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    telemetry.shutdown()  # flushes the batch processor
    return {s.name: s for s in exporter.get_finished_spans()}


def _envelope(key: str, traceparent: str) -> Envelope:
    return Envelope(
        id=envelope_id("customers", "erp", key, 3), kind="customer.upserted", flow="customers", key=key,
        version=3, origin="erp", occurred_at=int(time.time() * 1000), traceparent=traceparent,
        payload=encode_payload({"id": key}),
    )  # fmt: skip


def test_off_by_default_and_inert() -> None:
    assert telemetry.ON is False
    assert telemetry.configure("", service_name="x") is False
    assert telemetry.ON is False
    assert telemetry.capture("customers", Change(key="1", version=1), "id", 0) == ""
    assert telemetry.start_apply([_envelope("1", "")]) is None
    telemetry.applied(None, [Applied.APPLIED], ["id"])
    telemetry.published([b"not an envelope"], 0)
    with telemetry.api_call("id", "PUT", "https://crm.example.com/customers/1") as span:
        assert span is None
    with telemetry.saga_step("id", "order-to-cash", "reserve") as span:
        assert span is None


def test_endpoint_from_config_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    assert telemetry.endpoint_from("") == ""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    assert telemetry.endpoint_from("") == "http://collector:4318"
    assert telemetry.endpoint_from("http://other:4318") == "http://other:4318"


def test_config_section() -> None:
    text = '[agent]\nname = "erp"\nsystem = "erp"\nstate_dir = "/tmp/x"\n'
    assert parse_agent_config(text).telemetry.otlp_endpoint == ""
    cfg = parse_agent_config(text + '[telemetry]\notlp_endpoint = "http://collector:4318"\n')
    assert cfg.telemetry.otlp_endpoint == "http://collector:4318"
    with pytest.raises(ConfigError, match=r"telemetry\.otlp_endpint|otlp_endpint"):
        parse_agent_config(text + '[telemetry]\notlp_endpint = "http://collector:4318"\n')


def test_unavailable_is_a_config_error_naming_the_field() -> None:
    exc = telemetry.TelemetryUnavailable("x is set", path="telemetry.otlp_endpoint")
    assert isinstance(exc, ConfigError)
    assert str(exc) == "telemetry.otlp_endpoint: x is set"


def test_one_change_one_trace(spans: InMemorySpanExporter) -> None:
    change = Change(key="42", version=3, occurred_at=int(time.time() * 1000) - 5)
    eid = envelope_id("customers", "erp", "42", 3)
    traceparent = telemetry.capture("customers", change, eid, int(time.time() * 1000))
    assert TRACEPARENT.match(traceparent), traceparent
    assert int(traceparent[-2:], 16) & 1, "sampled"
    env = _envelope("42", traceparent)
    telemetry.published([encode(env), b"\x00garbage"], time.time_ns(), ["mesh.evt.customer.upserted.erp"])
    opened = telemetry.start_apply([env], "crm-agent")
    assert opened is not None
    with telemetry.api_call(env.id, "PUT", "https://crm.example.com/customers/42") as call:
        assert call is not None
        call.set_attribute("http.response.status_code", 200)
    with telemetry.saga_step(env.id, "order-to-cash", "invoice"):
        pass
    telemetry.applied(opened, [Applied.APPLIED], [env.id])

    got = _finished(spans)
    assert set(got) == {"mesh.capture", "mesh.publish", "mesh.apply", "mesh.api_call", "mesh.saga_step"}
    capture = got["mesh.capture"]
    trace_id = capture.context.trace_id
    assert traceparent.startswith(f"00-{trace_id:032x}-{capture.context.span_id:016x}-")
    assert capture.parent is None
    assert capture.start_time is not None
    assert capture.end_time is not None
    assert capture.start_time <= capture.end_time
    for name in ("mesh.publish", "mesh.apply"):
        assert got[name].context.trace_id == trace_id, name
        parent = got[name].parent
        assert parent is not None, name
        assert parent.span_id == capture.context.span_id, name
    for name in ("mesh.api_call", "mesh.saga_step"):
        assert got[name].context.trace_id == trace_id, name
        parent = got[name].parent
        assert parent is not None, name
        assert parent.span_id == got["mesh.apply"].context.span_id, name
    apply = got["mesh.apply"]
    assert apply.attributes is not None
    assert apply.attributes["mesh.outcome"] == "applied"
    assert apply.attributes["mesh.agent"] == "crm-agent"
    publish = got["mesh.publish"].attributes
    assert publish is not None
    assert publish["messaging.system"] == "nats"
    assert publish["messaging.destination.name"] == "mesh.evt.customer.upserted.erp"
    assert publish["mesh.envelope_id"] == eid
    assert got["mesh.api_call"].attributes is not None
    assert got["mesh.api_call"].attributes["http.response.status_code"] == 200
    assert got["mesh.capture"].resource.attributes["service.name"] == "test"


def test_failed_apply_and_unsettled_spans(spans: InMemorySpanExporter) -> None:
    a, b = _envelope("1", ""), _envelope("2", "")
    opened = telemetry.start_apply([a, b])
    telemetry.applied(opened, [RetryableError("target down")], [a.id])
    telemetry.shutdown()
    got = {s.attributes["mesh.key"]: s for s in spans.get_finished_spans() if s.attributes}
    assert got["1"].status.status_code is StatusCode.ERROR
    assert "RetryableError: target down" in (got["1"].status.description or "")
    assert got["2"].attributes is not None
    assert got["2"].attributes["mesh.outcome"] == "not_applied"
    assert got["1"].parent is None, "an envelope without traceparent starts its own trace"


def test_envelope_carries_traceparent_through_encoding() -> None:
    env = _envelope("1", "00-" + "a" * 32 + "-" + "b" * 16 + "-01")
    assert msgspec.msgpack.decode(encode(env), type=Envelope).traceparent == env.traceparent


@pytest.mark.anyio
async def test_rest_sink_call_is_a_child_of_the_apply_span(
    spans: InMemorySpanExporter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The REST sink's HTTP request (httpx MockTransport: no socket) gets an api_call span under
    the apply span of the envelope it applies, with the status it got."""
    monkeypatch.setenv("CRM_TOKEN", "t0ken")

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200 if request.url.path.endswith("/1") else 503)

    cfg = RestSinkConfig(
        base_url="https://crm.test/api", upsert_path="/customers/{key}", state_path=str(tmp_path / "rest.db"),
        auth=RestBearerAuth(token_env="CRM_TOKEN"), max_attempts=1, backoff_initial=0.01, backoff_max=0.01,
    )  # fmt: skip
    envs = [_envelope("1", ""), _envelope("2", "")]
    records = [
        SinkRecord(id=e.id, key=e.key, version=e.version, deleted=False, row={"id": e.key}, origin="erp")
        for e in envs
    ]
    async with RestSink(cfg, transport=httpx.MockTransport(handler)) as sink:
        opened = telemetry.start_apply(envs[:1])
        outcomes = await sink.apply(records[:1])
        telemetry.applied(opened, outcomes, [envs[0].id])
        opened = telemetry.start_apply(envs[1:])
        with pytest.raises(SystemUnavailable):
            await sink.apply(records[1:])
        telemetry.applied(opened, [], [])
    telemetry.shutdown()
    finished = spans.get_finished_spans()
    apply = {s.attributes["mesh.key"]: s for s in finished if s.name == "mesh.apply" and s.attributes}
    calls = [s for s in finished if s.name == "mesh.api_call"]
    assert len(calls) == 2
    by_parent = {c.parent.span_id: c for c in calls if c.parent is not None}
    ok, failed = by_parent[apply["1"].context.span_id], by_parent[apply["2"].context.span_id]
    assert ok.attributes is not None
    assert failed.attributes is not None
    assert ok.attributes["http.response.status_code"] == 200
    assert ok.attributes["url.path"] == "/customers/1"
    assert ok.attributes["http.request.method"] == "PUT"
    assert failed.attributes["http.response.status_code"] == 503
    assert failed.status.status_code is StatusCode.ERROR


def test_saga_step_continues_a_traceparent_outside_an_apply(spans: InMemorySpanExporter) -> None:
    """In an orchestrator (no apply span open), a saga step continues the step message's trace."""
    parent = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    with telemetry.saga_step("some-envelope", "order-to-cash", "reserve", parent) as span:
        assert span is not None
    with telemetry.saga_step("other", "order-to-cash", "bill"):
        pass
    telemetry.shutdown()
    first, second = spans.get_finished_spans()
    assert f"{first.context.trace_id:032x}" == "ab" * 16
    assert first.parent is not None
    assert f"{first.parent.span_id:016x}" == "cd" * 8
    assert second.parent is None
    assert second.attributes is not None
    assert second.attributes["mesh.saga_step"] == "bill"
