"""OpenTelemetry tracing of a change's way through the mesh (optional: the ``otel`` extra).

One change is one trace: the source agent's **capture** span is its root and its W3C
``traceparent`` travels in the envelope (:attr:`mesh.envelope.Envelope.traceparent`); the
**publish** span (source agent, once the broker acked) and the **apply** span (sink agent) are its
children, whichever process or host records them; **api_call** and **saga_step** spans are children
of the apply span they run under (:func:`api_call`, :func:`saga_step`). Spans are exported over
OTLP/HTTP (protobuf) to ``[telemetry] otlp_endpoint`` or, unset, ``OTEL_EXPORTER_OTLP_ENDPOINT``
(the collector's base URL; ``/v1/traces`` is appended).

Off (the default), the record points in the agent cost one module-attribute check each
(``if telemetry.ON:``): nothing is imported, allocated or called. ``bin/bench-otel`` measures it.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from mesh.envelope import Envelope, decode
from mesh.errors import ConfigError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

    from mesh.adapters import Change
    from mesh.config import AgentConfig

__all__ = [
    "ON",
    "TelemetryUnavailable",
    "answered",
    "api_call",
    "applied",
    "capture",
    "configure",
    "configure_agent",
    "endpoint_from",
    "published",
    "saga_step",
    "shutdown",
    "start_apply",
]

log = logging.getLogger(__name__)

ON = False
"""True once :func:`configure` set up an exporter; the record points check this first."""

_tracer: Tracer | None = None
_provider: TracerProvider | None = None
_apply_spans: contextvars.ContextVar[dict[str, Span] | None] = contextvars.ContextVar(
    "mesh_apply_spans", default=None
)


class TelemetryUnavailable(ConfigError):
    """An OTLP endpoint is configured but the ``otel`` extra is not installed."""


def endpoint_from(configured: str) -> str:
    """The OTLP/HTTP base URL to export to: ``configured``, else ``OTEL_EXPORTER_OTLP_ENDPOINT``,
    else "" (tracing off)."""
    return (configured or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")).strip()


def configure(
    endpoint: str,
    *,
    service_name: str,
    attributes: dict[str, str] | None = None,
    exporter: SpanExporter | None = None,
) -> bool:
    """Export spans to the OTLP/HTTP collector at ``endpoint`` (a base URL such as
    ``http://collector:4318``); an empty ``endpoint`` leaves tracing off. Returns whether it is on.
    ``exporter`` replaces the OTLP exporter (spans then go there; ``endpoint`` only turns it on).

    Raises:
        TelemetryUnavailable: ``endpoint`` is set and the ``otel`` extra is missing.
    """
    global ON, _tracer, _provider
    if not endpoint:
        return False
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise TelemetryUnavailable(
            f"{endpoint} is set but OpenTelemetry is not installed ({exc.name}); "
            "pip install 'connector-mesh[otel]' or unset the endpoint",
            path="telemetry.otlp_endpoint",
        ) from None
    resource = Resource.create({"service.name": service_name, **(attributes or {})})
    provider = TracerProvider(resource=resource)
    url = endpoint.rstrip("/") + "/v1/traces"
    if exporter is None:
        exporter = OTLPSpanExporter(endpoint=url, timeout=5)
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=1000))
    _provider, _tracer = provider, provider.get_tracer("connector-mesh")
    ON = True
    log.info("telemetry: exporting spans to %s as service %s", url, service_name)
    return True


def configure_agent(cfg: AgentConfig) -> bool:
    """:func:`configure` from an agent's ``[telemetry]`` section (or the environment).

    Raises:
        TelemetryUnavailable: an endpoint is set and the ``otel`` extra is missing.
    """
    a, t = cfg.agent, cfg.telemetry
    return configure(
        endpoint_from(t.otlp_endpoint),
        service_name=t.service_name or f"connector-mesh.{a.name}",
        attributes={"mesh.agent": a.name, "mesh.site": a.site, "mesh.system": a.system},
    )


def shutdown() -> None:
    """Flush the spans still queued (bounded by the exporter's timeout) and turn tracing off."""
    global ON, _tracer, _provider
    provider, ON, _tracer, _provider = _provider, False, None, None
    if provider is not None:
        provider.shutdown()


def _context(traceparent: str) -> Any:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({"traceparent": traceparent}) if traceparent else None


def _traceparent(span: Span) -> str:
    c = span.get_span_context()
    return f"00-{c.trace_id:032x}-{c.span_id:016x}-{int(c.trace_flags):02x}"


def _attributes(env: Envelope | None = None, **extra: object) -> dict[str, Any]:
    out: dict[str, Any] = {k.replace("_", ".", 1): v for k, v in extra.items() if v is not None}
    if env is not None:
        out.update(_envelope_attributes(env.flow, env.key, env.version, env.id))
        out.update({"mesh.origin": env.origin, "mesh.kind": env.kind})
    return out


def _envelope_attributes(flow: str, key: str, version: int, envelope_id: str) -> dict[str, Any]:
    return {"mesh.flow": flow, "mesh.key": key, "mesh.version": version, "mesh.envelope_id": envelope_id}


def capture(flow: str, change: Change, envelope_id: str, now_ms: int, traceparent: str = "") -> str:
    """Record the capture of one change (from when it occurred at the source, else ``now_ms``,
    until now) as the root of its trace (or a child of ``traceparent``, one the source handed
    over); returns the ``traceparent`` the envelope carries on, "" while tracing is off."""
    if _tracer is None:
        return ""
    from opentelemetry.trace import SpanKind

    occurred_ns = (change.occurred_at or now_ms) * 1_000_000
    span = _tracer.start_span(
        "mesh.capture",
        context=_context(traceparent),
        kind=SpanKind.PRODUCER,
        start_time=min(occurred_ns, time.time_ns()),
        attributes=_envelope_attributes(flow, change.key, change.version, envelope_id),
    )
    span.end()
    return _traceparent(span)


def published(envelopes: Sequence[bytes], started_ns: int, subjects: Sequence[str] = ()) -> None:
    """Record one publish span per envelope the broker acknowledged (``envelopes`` are their
    encoded bytes), from ``started_ns`` (``time.time_ns()`` before publishing) until now."""
    if _tracer is None:
        return
    from opentelemetry.trace import SpanKind

    end = time.time_ns()
    for i, data in enumerate(envelopes):
        try:
            env = decode(data)
        except Exception:
            continue
        attrs = _attributes(env, messaging_system="nats")
        if i < len(subjects):
            attrs["messaging.destination.name"] = subjects[i]
        span = _tracer.start_span(
            "mesh.publish", context=_context(env.traceparent), kind=SpanKind.PRODUCER,
            start_time=started_ns, attributes=attrs,
        )  # fmt: skip
        span.end(end_time=end)


def start_apply(envs: Sequence[Envelope], agent: str = "") -> dict[str, Span] | None:
    """Open one apply span per envelope (a child of its ``traceparent``) before the sink runs;
    :func:`api_call` spans inside the sink become their children. Close with :func:`applied`."""
    if _tracer is None:
        return None
    from opentelemetry.trace import SpanKind

    spans = {
        env.id: _tracer.start_span(
            "mesh.apply",
            context=_context(env.traceparent),
            kind=SpanKind.CONSUMER,
            attributes=_attributes(env, mesh_agent=agent or None),
        )
        for env in envs
    }
    _apply_spans.set(spans)
    return spans


def applied(spans: dict[str, Span] | None, outcomes: Sequence[object], ids: Sequence[str]) -> None:
    """Close the spans of :func:`start_apply`: ``outcomes[i]`` (an ``Applied`` or the exception)
    is what happened to the envelope ``ids[i]``; spans without an outcome end as not applied."""
    if spans is None:
        return
    from opentelemetry.trace import Status, StatusCode

    _apply_spans.set(None)
    for envelope_id, outcome in zip(ids, outcomes, strict=False):
        span = spans.pop(envelope_id, None)
        if span is None:
            continue
        if isinstance(outcome, BaseException):
            span.record_exception(outcome)
            span.set_status(Status(StatusCode.ERROR, f"{type(outcome).__name__}: {outcome}"))
        else:
            span.set_attribute("mesh.outcome", str(getattr(outcome, "value", outcome)))
        span.end()
    for span in spans.values():
        span.set_attribute("mesh.outcome", "not_applied")
        span.end()


@contextlib.contextmanager
def _child(
    name: str, envelope_id: str, attributes: dict[str, Any], traceparent: str = ""
) -> Iterator[Span | None]:
    if _tracer is None:
        yield None
        return
    from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context

    parent = (_apply_spans.get() or {}).get(envelope_id)
    context = set_span_in_context(parent) if parent is not None else _context(traceparent)
    kind = SpanKind.CLIENT if name == "mesh.api_call" else SpanKind.INTERNAL
    with _tracer.start_as_current_span(
        name, context=context, kind=kind, attributes=attributes, set_status_on_exception=False
    ) as span:
        try:
            yield span
        except BaseException as exc:
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            raise


_OFF: contextlib.nullcontext[None] = contextlib.nullcontext()


def api_call(envelope_id: str, method: str, url: str) -> contextlib.AbstractContextManager[Span | None]:
    """A span around one call to an external API made while applying envelope ``envelope_id``
    (a child of its apply span); ``url`` is absolute or a path. Yields the span, None while
    tracing is off (then nothing is allocated); see :func:`answered`."""
    if _tracer is None:
        return _OFF
    where = "url.full" if "://" in url else "url.path"
    return _child("mesh.api_call", envelope_id, {"http.request.method": method, where: url})


def answered(span: Span | None, status: int) -> None:
    """Record the HTTP status an :func:`api_call` got (4xx/5xx mark the span as an error)."""
    if span is None:
        return
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("http.response.status_code", status)
    if status >= 400:
        span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))


def saga_step(
    envelope_id: str, saga: str, step: str, traceparent: str = ""
) -> contextlib.AbstractContextManager[Span | None]:
    """A span around one step of a saga: a child of the apply span of envelope ``envelope_id``
    when one is open in this task, else of ``traceparent`` (the step message's, in an
    orchestrator process), else a new trace. The record point for saga steps to call."""
    if _tracer is None:
        return _OFF
    return _child("mesh.saga_step", envelope_id, {"mesh.saga": saga, "mesh.saga_step": step}, traceparent)
