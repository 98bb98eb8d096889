"""OpenTelemetry: one synced change is one trace, capture -> publish -> apply, across two agent
processes, exported over OTLP/HTTP to a real local receiver (an HTTP server in this test that
decodes the protobuf ``ExportTraceServiceRequest`` with ``opentelemetry-proto``)."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests._secure import SecuredNatsServer, write_agent_config
from tests.integration._harness import AgentProcess, ErpLoad, agent_toml, make_crm, make_erp, rows, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    service: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, object]


class OtlpReceiver:
    """POST /v1/traces (application/x-protobuf, optionally gzip): keeps every span it decodes."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                ok = (
                    self.path == "/v1/traces" and self.headers.get("Content-Type") == "application/x-protobuf"
                )
                if ok:
                    receiver.add(ExportTraceServiceRequest.FromString(body))
                self.send_response(200 if ok else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add(self, request: ExportTraceServiceRequest) -> None:
        with self.lock:
            self.requests += 1
            for rs in request.resource_spans:
                res = {a.key: a.value.string_value for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        attrs: dict[str, object] = {}
                        for a in s.attributes:
                            kind = a.value.WhichOneof("value")
                            attrs[a.key] = getattr(a.value, kind) if kind else None
                        self.spans.append(
                            ReceivedSpan(
                                s.name, res.get("service.name", ""), s.trace_id.hex(), s.span_id.hex(),
                                s.parent_span_id.hex(), attrs,
                            )
                        )  # fmt: skip

    def of_key(self, key: str) -> list[ReceivedSpan]:
        with self.lock:
            return [s for s in self.spans if s.attributes.get("mesh.key") == key]


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver()
    r.thread.start()
    try:
        yield r
    finally:
        r.server.shutdown()
        r.server.server_close()


def test_one_change_is_one_trace_across_two_agents(
    tmp_path: Path, nats_server: SecuredNatsServer, receiver: OtlpReceiver
) -> None:
    erp_db, crm_db = tmp_path / "erp.db", tmp_path / "crm.db"
    make_erp(erp_db)
    make_crm(crm_db)
    url = nats_server.url
    # The source agent names the collector in its config; the sink agent gets it from the
    # standard environment variable.
    erp = write_agent_config(
        tmp_path / "erp-agent.toml",
        agent_toml(name="erp-agent", system="erp", state=tmp_path / "erp-state", url=url, source=erp_db)
        + f'\n[telemetry]\notlp_endpoint = "{receiver.url}"\n',
        nats_server,
    )
    crm = write_agent_config(
        tmp_path / "crm-agent.toml",
        agent_toml(name="crm-agent", system="crm", state=tmp_path / "crm-state", url=url, sink=crm_db),
        nats_server,
    )
    procs = [AgentProcess(erp, tmp_path / "erp.log"), AgentProcess(crm, tmp_path / "crm.log")]
    procs[0].start()
    procs[1].start(env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url})
    try:
        ErpLoad(erp_db).insert(1)
        wait_until(lambda: len(rows(crm_db)) == 1, 30, "the change applied at the CRM")
        wait_until(
            lambda: {s.name for s in receiver.of_key("1")} >= {"mesh.capture", "mesh.publish", "mesh.apply"},
            30,
            "capture, publish and apply spans for key 1",
        )
    finally:
        for p in procs:
            assert p.terminate() == 0, p.log.read_text()[-3000:]

    spans = {s.name: s for s in receiver.of_key("1")}
    capture, publish, apply = spans["mesh.capture"], spans["mesh.publish"], spans["mesh.apply"]
    assert len(receiver.of_key("1")) == 3, receiver.of_key("1")
    assert capture.trace_id == publish.trace_id == apply.trace_id
    assert capture.trace_id != "0" * 32
    assert capture.parent_span_id == "", "capture is the root of the change's trace"
    assert publish.parent_span_id == capture.span_id
    assert apply.parent_span_id == capture.span_id
    assert capture.service == publish.service == "connector-mesh.erp-agent"
    assert apply.service == "connector-mesh.crm-agent"
    assert apply.attributes["mesh.outcome"] == "applied"
    assert apply.attributes["mesh.flow"] == "customers"
    assert publish.attributes["messaging.system"] == "nats"
    assert capture.attributes["mesh.envelope_id"] == apply.attributes["mesh.envelope_id"]


def test_an_endpoint_without_the_extra_is_one_line_at_start(tmp_path: Path) -> None:
    """With ``opentelemetry`` not importable (a package on PYTHONPATH that refuses to import
    stands in for the missing extra), an agent configured to export stops at start with one
    line naming the field and the fix, before it connects anywhere."""
    hidden = tmp_path / "site" / "opentelemetry"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text('raise ImportError("hidden", name="opentelemetry")\n')
    config = tmp_path / "erp.toml"
    config.write_text(
        f'[agent]\nname = "erp"\nsystem = "erp"\nstate_dir = "{tmp_path / "state"}"\n'
        '[telemetry]\notlp_endpoint = "http://127.0.0.1:4318"\n'
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    done = subprocess.run(
        [sys.executable, "-m", "mesh", "agent", "run", "--config", str(config)],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "telemetry.otlp_endpoint" in lines[0]
    assert "pip install 'connector-mesh[otel]'" in lines[0]
    assert "Traceback" not in done.stderr + done.stdout
