"""mesh.preflight around third-party checks: a check's problems go under the side's config path;
a check that raises, hangs or is broken becomes one problem at that side, never a traceback; a
side whose adapter declares no preflight is listed as not checked."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
import pytest

from mesh.config import AdapterConfig, FlowConfig
from mesh.errors import ConfigError, ConfigProblem, SystemUnavailable
from mesh.mapping import MappingConfig
from mesh.plugins import AdapterPlugin, AdapterRegistry, Role
from mesh.preflight import preflight_flow, preflight_flows, unchecked

pytestmark = pytest.mark.anyio


class ToySource(AdapterConfig, frozen=True, tag="toy"):
    behaviour: str = "ok"


class ToySink(AdapterConfig, frozen=True, tag="toy"):
    behaviour: str = "ok"


class PlainSink(AdapterConfig, frozen=True, tag="plain"):
    pass


SEEN: list[Sequence[str] | None] = []


async def toy_check(cfg: Any, *, columns: Sequence[str] | None = None) -> list[ConfigProblem]:
    SEEN.append(columns)
    if cfg.behaviour == "problems":
        return [ConfigProblem("table", 'table "t" not found'), ConfigProblem("", "whole config")]
    if cfg.behaviour == "raise":
        raise RuntimeError("bug\nin the plugin")
    if cfg.behaviour == "config":
        raise ConfigError(problems=[("dsn", "bad dsn"), ("password_env", "unset")])
    if cfg.behaviour == "down":
        raise SystemUnavailable("host unreachable")
    if cfg.behaviour == "hang":
        await anyio.sleep_forever()
    return []


BrokenSink = type("BrokenSink", (AdapterConfig,), {}, frozen=True, tag="broken")

REGISTRY = AdapterRegistry([
    AdapterPlugin(name="toy", source=Role(ToySource, "x:y"), sink=Role(ToySink, "x:y"),
                  preflight="tests.unit.test_preflight_core:toy_check"),
    AdapterPlugin(name="plain", sink=Role(PlainSink, "x:y")),
    AdapterPlugin(name="broken", sink=Role(BrokenSink, "x:y"), preflight="tests.unit.nowhere:check"),
])  # fmt: skip


def flow(source: AdapterConfig | None = None, sink: AdapterConfig | None = None) -> FlowConfig:
    return FlowConfig(name="f", entity="customer", source=source, sink=sink)


async def test_problems_go_under_the_side_path_source_first() -> None:
    problems = await preflight_flow(
        flow(ToySource(behaviour="problems"), ToySink(behaviour="problems")), "flows[3]", registry=REGISTRY
    )
    assert problems == [
        ("flows[3].source.table", 'table "t" not found'),
        ("flows[3].source", "whole config"),
        ("flows[3].sink.table", 'table "t" not found'),
        ("flows[3].sink", "whole config"),
    ]


async def test_failures_of_a_check_are_one_line_problems_at_the_side() -> None:
    checks = [
        ("flows[0]", flow(sink=ToySink(behaviour="raise"))),
        ("flows[1]", flow(sink=ToySink(behaviour="config"))),
        ("flows[2]", flow(sink=ToySink(behaviour="down"))),
        ("flows[3]", flow(sink=ToySink(behaviour="hang"))),
        ("flows[4]", flow(sink=BrokenSink())),
    ]
    with anyio.fail_after(5):
        problems = await preflight_flows(checks, registry=REGISTRY, timeout=0.2)
    assert problems[:5] == [
        ("flows[0].sink", "preflight failed: RuntimeError: bug in the plugin"),
        ("flows[1].sink.dsn", "bad dsn"),
        ("flows[1].sink.password_env", "unset"),
        ("flows[2].sink", "host unreachable"),
        ("flows[3].sink", "no answer within 0.2s (is the system reachable?)"),
    ]
    [(path, message)] = problems[5:]
    assert path == "flows[4].sink"
    assert "cannot load its preflight 'tests.unit.nowhere:check'" in message


async def test_a_side_without_preflight_is_unchecked_and_sinks_get_the_mapped_columns() -> None:
    SEEN.clear()
    cfg = flow(ToySource(), PlainSink())
    assert await preflight_flow(cfg, "flows[0]", registry=REGISTRY) == []
    assert unchecked(cfg, "flows[0]", registry=REGISTRY) == ["flows[0].sink (plain)"]
    assert SEEN == [None]  # the source: no columns
    SEEN.clear()
    mapping = MappingConfig(fields={"id": "id", "address.city": "billing_address.city", "name": "name"})
    mapped = FlowConfig(name="f", entity="customer", sink=ToySink(), from_canonical=mapping)
    assert await preflight_flow(mapped, "flows[1]", registry=REGISTRY) == []
    assert SEEN == [["id", "address", "name"]]  # the sink: the top-level targets its mapping writes
